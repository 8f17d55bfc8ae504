//! Named parameter traversal.
//!
//! dfdx 0.13's `TensorCollection` only admits compile-time shapes, but the embedding and the LM
//! head have a run-time vocabulary size. Every Megalodon module therefore implements [`Params`],
//! a small visitor over its tensors named with the official PyTorch state-dict keys
//! (`layers.0.mega.cema.alpha`, ...). Checkpoints, optimizers, gradient clipping and parameter
//! counting are all written once against this trait.

use dfdx::prelude::*;

/// Something that is shown every named tensor of a module.
pub trait ParamVisitor<E: Dtype, D: Device<E>> {
    /// Called once per parameter with its full dotted name (official state-dict key).
    fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> anyhow::Result<()>;
}

/// A module whose parameters can be visited by name.
pub trait Params<E: Dtype, D: Device<E>> {
    /// Visit every parameter; `prefix` is prepended (with a dot) to each local name.
    fn visit_params<V: ParamVisitor<E, D>>(
        &mut self,
        prefix: &str,
        v: &mut V,
    ) -> anyhow::Result<()>;

    /// Total number of scalar parameters.
    fn num_params(&mut self) -> usize {
        let mut c = CountVisitor(0);
        // CountVisitor never fails.
        let _ = self.visit_params("", &mut c);
        c.0
    }

    /// All parameter names in visiting order.
    fn param_names(&mut self) -> Vec<String> {
        let mut c = NameVisitor(Vec::new());
        let _ = self.visit_params("", &mut c);
        c.0
    }
}

/// Joins a prefix and a local name with a dot (no dot when the prefix is empty).
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else if name.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

struct CountVisitor(usize);
impl<E: Dtype, D: Device<E>> ParamVisitor<E, D> for CountVisitor {
    fn visit<S: Shape>(&mut self, _: &str, t: &mut Tensor<S, E, D>) -> anyhow::Result<()> {
        self.0 += t.shape().num_elements();
        Ok(())
    }
}

struct NameVisitor(Vec<String>);
impl<E: Dtype, D: Device<E>> ParamVisitor<E, D> for NameVisitor {
    fn visit<S: Shape>(&mut self, name: &str, _: &mut Tensor<S, E, D>) -> anyhow::Result<()> {
        self.0.push(name.to_string());
        Ok(())
    }
}

/// Every parameter's name and values (host copies), in visiting order: for comparing models
/// (resume, fine-tuning, data-parallel ranks) and inspecting them.
pub fn param_values<E: Dtype, D: Device<E>, M: Params<E, D>>(
    model: &mut M,
) -> anyhow::Result<Vec<(String, Vec<E>)>> {
    struct Values<E>(Vec<(String, Vec<E>)>);
    impl<E: Dtype, D: Device<E>> ParamVisitor<E, D> for Values<E> {
        fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> anyhow::Result<()> {
            self.0.push((name.to_string(), t.as_vec()));
            Ok(())
        }
    }
    let mut v = Values(Vec::new());
    model.visit_params("", &mut v)?;
    Ok(v.0)
}

/// The device the model's parameters live on (`None` for a model without parameters).
pub fn device_of<E: Dtype, D: Device<E>, M: Params<E, D>>(
    model: &mut M,
) -> anyhow::Result<Option<D>> {
    struct First<D>(Option<D>);
    impl<E: Dtype, D: Device<E>> ParamVisitor<E, D> for First<D> {
        fn visit<S: Shape>(&mut self, _: &str, t: &mut Tensor<S, E, D>) -> anyhow::Result<()> {
            if self.0.is_none() {
                self.0 = Some(t.device().clone());
            }
            Ok(())
        }
    }
    let mut f = First(None);
    model.visit_params("", &mut f)?;
    Ok(f.0)
}

/// Allocates (zeroed) gradients for every parameter, so that `grads.get(&param)` never panics
/// even for parameters a particular forward pass did not touch.
pub fn alloc_grads<E: Dtype, D: Device<E>, M: Params<E, D>>(
    model: &mut M,
) -> anyhow::Result<Gradients<E, D>> {
    struct Alloc<E: Dtype, D: Device<E>>(Gradients<E, D>);
    impl<E: Dtype, D: Device<E>> ParamVisitor<E, D> for Alloc<E, D> {
        fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> anyhow::Result<()> {
            self.0
                .try_alloc_for(&*t)
                .map_err(|e| anyhow::anyhow!("allocating the gradient of {name}: {e:?}"))
        }
    }
    let mut a = Alloc(Gradients::leaky());
    model.visit_params("", &mut a)?;
    Ok(a.0)
}
