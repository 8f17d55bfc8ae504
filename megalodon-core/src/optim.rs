//! The optimizer, generic over any model that implements [`Params`]: the official optimizer
//! settings ([`OptimConf`]), the learning-rate schedule, global gradient-norm clipping and
//! torch-semantics [`AdamW`] with save/load of its state.
//!
//! dfdx's `Gradients` offers no device-generic way to scale a gradient in place, so clipping is
//! done as a scale factor ([`clip_scale`]) that [`AdamW::step`] applies to every gradient before
//! the moment updates — numerically the same as torch's `clip_grad_norm_` followed by
//! `AdamW.step()`.
//!
//! Resuming from a saved model, optimizer and [`TrainState`] reproduces an uninterrupted run
//! bit for bit: the optimizer state is written in the model dtype's width (F32 for f32, F64 for
//! f64).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Raw};
use crate::params::{ParamVisitor, Params};
use crate::util::{c, Float};

/// File name of the optimizer state inside a run directory.
pub const OPTIM_FILE: &str = "optim.safetensors";

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear decay from `lr` to `end_lr_ratio * lr` at `max_steps` (official default).
    #[default]
    Linear,
    /// Cosine decay from `lr` to `end_lr_ratio * lr` at `max_steps`.
    Cosine,
    /// `lr` after warmup.
    Constant,
}

/// Optimizer settings with the official defaults (torch AdamW over all parameters, no decay
/// exclusions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimConf {
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps (linear from `init_lr_ratio * lr` to `lr`).
    pub warmup: usize,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; `<= 0` disables clipping.
    pub clip: f64,
    /// Step at which the decay reaches `end_lr_ratio * lr`.
    pub max_steps: usize,
    /// Learning rate at step 0 as a fraction of `lr`.
    pub init_lr_ratio: f64,
    /// Final learning rate as a fraction of `lr`.
    pub end_lr_ratio: f64,
    pub schedule: Schedule,
}

impl Default for OptimConf {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            warmup: 2000,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            clip: 1.0,
            max_steps: 100_000,
            init_lr_ratio: 1e-4,
            end_lr_ratio: 0.01,
            schedule: Schedule::Linear,
        }
    }
}

impl OptimConf {
    /// The learning rate for the update made after `step` completed updates (step 0 is the first
    /// update): linear warmup from `init_lr_ratio * lr` (step 0) to `lr` (step `warmup`), then the
    /// schedule's decay to `end_lr_ratio * lr` at `max_steps`, constant afterwards.
    pub fn lr_at(&self, step: usize) -> f64 {
        let lr = self.lr;
        if step < self.warmup {
            let r0 = self.init_lr_ratio;
            return lr * (r0 + (1.0 - r0) * step as f64 / self.warmup as f64);
        }
        let end = self.end_lr_ratio * lr;
        if self.schedule == Schedule::Constant {
            return lr;
        }
        if step >= self.max_steps || self.max_steps <= self.warmup {
            return if step >= self.max_steps { end } else { lr };
        }
        let p = (step - self.warmup) as f64 / (self.max_steps - self.warmup) as f64;
        match self.schedule {
            Schedule::Linear => lr + (end - lr) * p,
            Schedule::Cosine => end + (lr - end) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            Schedule::Constant => lr,
        }
    }

    /// Checks for settings AdamW cannot run with.
    pub fn validate(&self) -> Result<()> {
        let ok = self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.weight_decay >= 0.0;
        if !ok {
            bail!("invalid optimizer config: {self:?}");
        }
        Ok(())
    }
}

/// The gradient of `t`. A parameter the loss did not reach has no entry in `grads`; it gets a
/// zero gradient (exactly what [`crate::params::alloc_grads`] gives it), allocated here before
/// reading, since dfdx's `Gradients::get` panics on a missing entry.
fn grad_of<S: Shape, E: Dtype, D: Device<E>>(
    name: &str,
    grads: &mut Gradients<E, D>,
    t: &Tensor<S, E, D>,
) -> Result<Tensor<S, E, D>> {
    grads
        .get_or_alloc_mut(t)
        .map_err(|e| anyhow::anyhow!("allocating the gradient of parameter `{name}`: {e:?}"))?;
    Ok(grads.get(t))
}

/// Where an optimizer step reads each parameter's gradient: the tape's [`Gradients`], or
/// [`HostGrads`] (e.g. gradients averaged over the ranks of a data-parallel run).
pub trait GradSource<E: Dtype, D: Device<E>> {
    /// The gradient of parameter `name`, `t`.
    fn grad<S: Shape>(&mut self, name: &str, t: &Tensor<S, E, D>) -> Result<Tensor<S, E, D>>;
}

impl<E: Dtype, D: Device<E>> GradSource<E, D> for Gradients<E, D> {
    fn grad<S: Shape>(&mut self, name: &str, t: &Tensor<S, E, D>) -> Result<Tensor<S, E, D>> {
        grad_of(name, self, t)
    }
}

/// Gradients held on the host, by parameter name (flattened in the parameter's layout).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostGrads<E> {
    /// Parameter name to its gradient's values.
    pub map: BTreeMap<String, Vec<E>>,
}

impl<E: Float, D: Device<E>> GradSource<E, D> for HostGrads<E> {
    fn grad<S: Shape>(&mut self, name: &str, t: &Tensor<S, E, D>) -> Result<Tensor<S, E, D>> {
        let v = self
            .map
            .get(name)
            .with_context(|| format!("no gradient for parameter `{name}`"))?;
        let n = t.shape().num_elements();
        if v.len() != n {
            bail!(
                "the gradient of `{name}` has {} values, the parameter {n}",
                v.len()
            );
        }
        Ok(t.device().tensor_from_vec(v.clone(), *t.shape()))
    }
}

/// Every gradient of `model` in visiting order as `(name, values)`, read from the tape.
pub fn grads_to_host<E: Float, D: Device<E>, M: Params<E, D>>(
    model: &mut M,
    grads: &mut Gradients<E, D>,
) -> Result<Vec<(String, Vec<E>)>> {
    struct Collect<'a, E: Dtype, D: Device<E>>(&'a mut Gradients<E, D>, Vec<(String, Vec<E>)>);
    impl<E: Float, D: Device<E>> ParamVisitor<E, D> for Collect<'_, E, D> {
        fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> Result<()> {
            let g = grad_of(name, &mut *self.0, t)?;
            self.1.push((name.to_string(), g.as_vec()));
            Ok(())
        }
    }
    let mut v = Collect(grads, Vec::new());
    model.visit_params("", &mut v)?;
    Ok(v.1)
}

/// Global L2 norm of the gradients of every parameter of `model` (accumulated in f64 over the
/// per-parameter sums of squares). The sums stay on the device until one copy of all of them at
/// the end: one device-to-host transfer per step, not one per parameter.
pub fn grad_norm<E: Float, D: Device<E>, M: Params<E, D>, G: GradSource<E, D>>(
    model: &mut M,
    grads: &mut G,
) -> Result<f64> {
    struct Norm<'a, G, E: Dtype, D: Device<E>>(&'a mut G, Vec<Tensor<Rank0, E, D>>);
    impl<E: Float, D: Device<E>, G: GradSource<E, D>> ParamVisitor<E, D> for Norm<'_, G, E, D> {
        fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> Result<()> {
            let g = self.0.grad(name, t)?;
            let n = g.shape().num_elements();
            self.1
                .push(g.reshape_like(&(n,)).square().sum::<Rank0, _>());
            Ok(())
        }
    }
    let mut v = Norm(grads, Vec::new());
    model.visit_params("", &mut v)?;
    if v.1.is_empty() {
        return Ok(0.0);
    }
    let sums = v.1.stack().as_vec();
    Ok(sums
        .iter()
        .map(|s| s.to_f64().unwrap_or(f64::NAN))
        .sum::<f64>()
        .sqrt())
}

/// torch's `clip_grad_norm_` factor: `max_norm / (norm + 1e-6)` when that is below 1, else 1.
/// `max_norm <= 0` disables clipping (factor 1).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        coef
    } else {
        1.0
    }
}

/// Global gradient norm and the clip factor [`AdamW::step_scaled`] should apply; returns
/// `(pre-clip norm, scale)`.
pub fn clip_grad_norm<E: Float, D: Device<E>, M: Params<E, D>, G: GradSource<E, D>>(
    model: &mut M,
    grads: &mut G,
    max_norm: f64,
) -> Result<(f64, f64)> {
    let norm = grad_norm(model, grads)?;
    Ok((norm, clip_scale(norm, max_norm)))
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Factor applied to every gradient (1 when not clipped).
    pub clip_scale: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// First and second moments of one parameter, flattened.
struct Moments<E: Dtype, D: Device<E>> {
    m: Tensor<(usize,), E, D>,
    v: Tensor<(usize,), E, D>,
}

/// AdamW with torch semantics: decoupled weight decay (`p *= 1 - lr * wd`), bias-corrected
/// moments, `eps` added to `sqrt(v_hat)`. State lives on the device, keyed by parameter name.
pub struct AdamW<E: Dtype, D: Device<E>> {
    pub conf: OptimConf,
    /// Number of updates done so far.
    pub step: u64,
    state: BTreeMap<String, Moments<E, D>>,
}

impl<E: Float, D: Device<E>> AdamW<E, D> {
    /// A fresh optimizer (moments are allocated lazily, zeroed, on the first step).
    pub fn new(conf: OptimConf) -> Self {
        Self {
            conf,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// The scheduled learning rate for the next update.
    pub fn next_lr(&self) -> f64 {
        self.conf.lr_at(self.step as usize)
    }

    /// Clips the gradients to `conf.clip` (global norm) and does one update at learning rate
    /// `lr`. A parameter without a gradient in `grads` is treated as having a zero one.
    pub fn step<M: Params<E, D>, G: GradSource<E, D>>(
        &mut self,
        model: &mut M,
        grads: &mut G,
        lr: f64,
    ) -> Result<StepInfo> {
        let (norm, scale) = clip_grad_norm(model, grads, self.conf.clip)?;
        self.step_scaled(model, grads, lr, scale)?;
        Ok(StepInfo {
            grad_norm: norm,
            clip_scale: scale,
            lr,
        })
    }

    /// One update at learning rate `lr` with every gradient multiplied by `grad_scale` (no norm
    /// computation).
    pub fn step_scaled<M: Params<E, D>, G: GradSource<E, D>>(
        &mut self,
        model: &mut M,
        grads: &mut G,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.conf.validate()?;
        self.step += 1;
        let t = self.step as i32;
        let cf = &self.conf;
        let bc1 = 1.0 - cf.beta1.powi(t);
        let bc2 = 1.0 - cf.beta2.powi(t);
        let mut u = Update {
            grads,
            state: &mut self.state,
            beta1: cf.beta1,
            beta2: cf.beta2,
            eps: cf.eps,
            decay: 1.0 - lr * cf.weight_decay,
            step_size: lr / bc1,
            bc2_sqrt: bc2.sqrt(),
            grad_scale,
        };
        model.visit_params("", &mut u)
    }

    /// Writes the moments (`m.<key>`, `v.<key>`, in the model dtype's width) and the step count
    /// (metadata `step`) to `path`, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (k, mo) in &self.state {
            let n = mo.m.shape().0;
            tensors.insert(format!("m.{k}"), Raw::native_from(vec![n], &mo.m.as_vec()));
            tensors.insert(format!("v.{k}"), Raw::native_from(vec![n], &mo.v.as_vec()));
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "megalodon-adamw".to_string());
        meta.insert("step".to_string(), self.step.to_string());
        checkpoint::write_safetensors(path, &tensors, Some(meta))
    }

    /// Restores the state written by [`AdamW::save`] for the parameters of `model` (used for the
    /// shapes and the device). When the file has moments, every parameter must have them, with
    /// matching sizes, and the file must hold no other keys.
    pub fn load<M: Params<E, D>>(&mut self, model: &mut M, path: &Path) -> Result<()> {
        let bytes = checkpoint::read_file(path)?;
        let meta = checkpoint::parse_metadata(&bytes, path)?;
        let st = checkpoint::parse(&bytes, path)?;
        let step: u64 = meta
            .get("step")
            .with_context(|| format!("{} has no `step` metadata", path.display()))?
            .parse()
            .with_context(|| format!("parsing the `step` metadata of {}", path.display()))?;
        struct Ld<'a, E: Dtype, D: Device<E>> {
            st: &'a ::safetensors::SafeTensors<'a>,
            path: &'a Path,
            out: BTreeMap<String, Moments<E, D>>,
            used: usize,
        }
        impl<E: Float, D: Device<E>> ParamVisitor<E, D> for Ld<'_, E, D> {
            fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> Result<()> {
                let n = t.shape().num_elements();
                let mut read = |k: String| -> Result<Tensor<(usize,), E, D>> {
                    let v = self.st.tensor(&k).map_err(|e| {
                        anyhow::anyhow!(
                            "optimizer state {}: missing or unreadable `{k}` (parameter of {n} values): {e:?}",
                            self.path.display()
                        )
                    })?;
                    if v.shape() != [n] {
                        bail!(
                            "optimizer state {}: `{k}` has shape {:?}, the parameter has {n} values",
                            self.path.display(),
                            v.shape()
                        );
                    }
                    let vals = checkpoint::view_to_f64(&k, &v)?;
                    self.used += 1;
                    Ok(t.device()
                        .tensor_from_vec(checkpoint::to_dtype::<E>(&vals), (n,)))
                };
                let m = read(format!("m.{name}"))?;
                let v = read(format!("v.{name}"))?;
                self.out.insert(name.to_string(), Moments { m, v });
                Ok(())
            }
        }
        let mut ld = Ld {
            st: &st,
            path,
            out: BTreeMap::new(),
            used: 0,
        };
        if st.is_empty() {
            if step != 0 {
                bail!(
                    "optimizer state {} has step {step} but no moments",
                    path.display()
                );
            }
        } else {
            model.visit_params("", &mut ld)?;
            if ld.used != st.len() {
                let known: std::collections::BTreeSet<String> = ld
                    .out
                    .keys()
                    .flat_map(|k| [format!("m.{k}"), format!("v.{k}")])
                    .collect();
                let extra: Vec<String> = st
                    .names()
                    .into_iter()
                    .filter(|k| !known.contains(*k))
                    .cloned()
                    .collect();
                bail!(
                    "optimizer state {} has keys for no parameter of this model: {}",
                    path.display(),
                    extra.join(", ")
                );
            }
        }
        self.state = ld.out;
        self.step = step;
        Ok(())
    }
}

struct Update<'a, E: Dtype, D: Device<E>, G> {
    grads: &'a mut G,
    state: &'a mut BTreeMap<String, Moments<E, D>>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    decay: f64,
    step_size: f64,
    bc2_sqrt: f64,
    grad_scale: f64,
}

impl<E: Float, D: Device<E>, G: GradSource<E, D>> ParamVisitor<E, D> for Update<'_, E, D, G> {
    fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> Result<()> {
        let shape = *t.shape();
        let n = shape.num_elements();
        let mut g = self.grads.grad(name, t)?.reshape_like(&(n,));
        if self.grad_scale != 1.0 {
            g = g * c::<E>(self.grad_scale);
        }
        let mo = match self.state.entry(name.to_string()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let dev = t.device();
                e.insert(Moments {
                    m: dev.zeros_like(&(n,)),
                    v: dev.zeros_like(&(n,)),
                })
            }
        };
        if mo.m.shape().0 != n {
            bail!(
                "optimizer state for `{name}` has {} values, the parameter {n}",
                mo.m.shape().0
            );
        }
        // m = b1 m + (1 - b1) g ; v = b2 v + (1 - b2) g^2
        mo.m.axpy(self.beta1, &g, 1.0 - self.beta1);
        mo.v.axpy(self.beta2, &g.square(), 1.0 - self.beta2);
        // p = p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
        let denom = (mo.v.clone().sqrt() / c::<E>(self.bc2_sqrt)) + c::<E>(self.eps);
        let upd = (mo.m.clone() / denom).reshape_like(&shape);
        t.axpy(self.decay, &upd, -self.step_size);
        Ok(())
    }
}
