//! TimestepNorm (`docs/design.md` §3): a causal group norm whose statistics at step t pool every
//! element of the group over all steps seen so far (including a carried prefix), and its
//! non-causal twin [`SequenceNorm`] for the bidirectional classifier block.
//! Official: `megalodon/modules/timestep_norm.py`, kernels `csrc/ops/timestep_norm*`.
//!
//! The official kernel merges per-step moments with Welford updates; since every step adds the
//! same number of elements the result equals the pooled closed form used here:
//! `M_t = (n0 m0 + sum_{s<=t} mu_s) / n_t`, `V_t = (n0 (v0 + m0^2) + sum_{s<=t} (s2_s + mu_s^2)) / n_t - M_t^2`,
//! with the cumulative sums done by the linear-cost [`cumsum_time`](super::scan::cumsum_time).

pub use super::layers::Seq;
use super::scan::cumsum_time;
use crate::params::{join, ParamVisitor, Params};
use crate::util::{c, Float};
use anyhow::{ensure, Result};
use dfdx::prelude::*;

/// Per-row group statistics `(B, G)`.
pub type GroupStat<const G: usize, E, D, T = NoneTape> = Tensor<(usize, Const<G>), E, D, T>;

/// Carried TimestepNorm state: per batch row the number of steps seen and the running group
/// mean and (population) variance. Official cache entry `(n, mean, var)`.
pub struct NormState<const G: usize, E: Dtype, D: Device<E>, T = NoneTape> {
    pub count: Vec<usize>,
    pub mean: GroupStat<G, E, D, T>,
    pub var: GroupStat<G, E, D, T>,
}

impl<const G: usize, E: Dtype, D: Device<E>> Clone for NormState<G, E, D> {
    fn clone(&self) -> Self {
        Self {
            count: self.count.clone(),
            mean: self.mean.clone(),
            var: self.var.clone(),
        }
    }
}

impl<const G: usize, E: Float, D: Device<E>> NormState<G, E, D> {
    /// The official empty state (count 0, mean 0, var 1) for `batch` rows.
    pub fn empty(dev: &D, batch: usize) -> Self {
        Self {
            count: vec![0; batch],
            mean: dev.zeros_like(&(batch, Const)),
            var: dev.ones_like(&(batch, Const)),
        }
    }
}

/// Per-step flags (`true` = real step) from an optional row-major `B*T` padding mask
/// (`true` = padding); the error names the expected length.
fn real_steps(pad: Option<&[bool]>, b: usize, t: usize) -> Result<Vec<bool>> {
    match pad {
        Some(p) => {
            ensure!(
                p.len() == b * t,
                "padding mask has {} entries, expected B*T = {}",
                p.len(),
                b * t
            );
            Ok(p.iter().map(|&x| !x).collect())
        }
        None => Ok(vec![true; b * t]),
    }
}

/// Causal group norm over `M` features in `G` contiguous groups. Weight is applied as `1 + w`.
#[derive(Clone)]
pub struct TimestepNorm<const M: usize, const G: usize, E: Dtype, D: Device<E>> {
    pub weight: Tensor<Rank1<M>, E, D>,
    pub bias: Tensor<Rank1<M>, E, D>,
    pub eps: f64,
}

impl<const M: usize, const G: usize, E: Float, D: Device<E>> TimestepNorm<M, G, E, D> {
    const TYPE_CHECK: () = assert!(
        G > 0 && M.is_multiple_of(G),
        "norm_num_groups must divide model_dim"
    );

    /// Zero-initialised weight and bias (official init).
    pub fn new(dev: &D, eps: f64) -> Self {
        #[allow(clippy::let_unit_value)]
        let _ = Self::TYPE_CHECK;
        Self {
            weight: dev.zeros(),
            bias: dev.zeros(),
            eps,
        }
    }

    /// Normalises `x (B, T, M)` continuing from `state` (the official empty state if `None`).
    /// `pad` is an optional `B*T` row-major mask, `true` = padding: padded steps output 0 and do
    /// not update the statistics. Returns the output and the state after the last step.
    /// Gradients flow to `x`, the parameters and (if taped) the carried mean and variance.
    #[allow(clippy::type_complexity)]
    pub fn try_forward<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        x: Seq<M, E, D, T>,
        state: Option<NormState<G, E, D, T>>,
        pad: Option<&[bool]>,
    ) -> Result<(Seq<M, E, D, T>, NormState<G, E, D, T>)> {
        let (b, t, _) = *x.shape();
        ensure!(t > 0, "TimestepNorm: empty sequence");
        let dev = x.device().clone();
        let gs = M / G;
        let (count0, mean0, var0) = match state {
            Some(s) => {
                ensure!(
                    s.count.len() == b,
                    "TimestepNorm state has batch {}, input has batch {b}",
                    s.count.len()
                );
                ensure!(
                    s.mean.shape().0 == b,
                    "TimestepNorm state mean has batch {}, input has batch {b}",
                    s.mean.shape().0
                );
                (s.count, s.mean, s.var)
            }
            None => {
                let e = NormState::<G, E, D>::empty(&dev, b);
                (e.count, e.mean.retaped::<T>(), e.var.retaped::<T>())
            }
        };
        // host-side step counts n_t (depend only on the mask)
        let real = real_steps(pad, b, t)?;
        let keep: Vec<E> = real.iter().map(|&r| c(if r { 1.0 } else { 0.0 })).collect();
        let mut ninv = vec![c::<E>(0.0); b * t];
        let mut final_count = count0.clone();
        for bi in 0..b {
            let mut n = count0[bi];
            for ti in 0..t {
                n += usize::from(real[bi * t + ti]);
                ninv[bi * t + ti] = c(1.0 / n.max(1) as f64);
            }
            final_count[bi] = n;
        }
        let keep_t: Tensor<(usize, usize), E, D> = dev.tensor_from_vec(keep, (b, t));
        let ninv_t: Tensor<(usize, usize), E, D> = dev.tensor_from_vec(ninv, (b, t));
        let n0: Vec<E> = count0.iter().map(|&n| c(n as f64)).collect();
        let n0_t: Tensor<(usize,), E, D> = dev.tensor_from_vec(n0, (b,));
        let shp3 = (b, t, Const::<G>);

        // per-step group moments (B, T, G)
        let xg = x.reshape_like(&(b, t, Const::<G>, gs));
        let mu = xg.retaped::<T>().mean::<_, Axis<3>>();
        let m2 = xg.retaped::<T>().square().mean::<_, Axis<3>>();
        let (mu, m2) = if pad.is_some() {
            let k = keep_t.clone().broadcast_like::<_, Axis<2>>(&shp3);
            (mu * k.clone(), m2 * k)
        } else {
            (mu, m2)
        };
        // carried prefix sums (B, G)
        let n0g = n0_t.broadcast_like::<_, Axis<1>>(&(b, Const::<G>));
        let p1 = mean0.retaped::<T>() * n0g.clone();
        let p2 = (var0 + mean0.square()) * n0g;
        let s1 = cumsum_time(mu) + p1.broadcast_like::<_, Axis<1>>(&shp3);
        let s2 = cumsum_time(m2) + p2.broadcast_like::<_, Axis<1>>(&shp3);
        let ninv3 = ninv_t.broadcast_like::<_, Axis<2>>(&shp3);
        let mean_t = s1 * ninv3.clone();
        let var_t = s2 * ninv3 - mean_t.retaped::<T>().square();

        // state after the last step
        let last: Tensor<(usize,), usize, D> = dev.tensor_from_vec(vec![t - 1; b], (b,));
        let mean_last = mean_t.retaped::<T>().select(last.clone());
        let var_last = var_t.retaped::<T>().select(last);

        let shp4 = (b, t, Const::<G>, gs);
        let rstd = (var_t + c::<E>(self.eps))
            .sqrt()
            .recip()
            .broadcast_like::<_, Axis<3>>(&shp4);
        let centered = xg - mean_t.broadcast_like::<_, Axis<3>>(&shp4);
        let normed = (centered * rstd).reshape_like(&(b, t, Const::<M>));
        let w = (self.weight.retaped::<T>() + c::<E>(1.0))
            .broadcast_like::<_, Axes2<0, 1>>(&(b, t, Const::<M>));
        let bias = self
            .bias
            .retaped::<T>()
            .broadcast_like::<_, Axes2<0, 1>>(&(b, t, Const::<M>));
        let mut y = normed * w + bias;
        if pad.is_some() {
            y = y * keep_t.broadcast_like::<_, Axis<2>>(&(b, t, Const::<M>));
        }
        Ok((
            y,
            NormState {
                count: final_count,
                mean: mean_last,
                var: var_last,
            },
        ))
    }
}

impl<const M: usize, const G: usize, E: Float, D: Device<E>> Params<E, D>
    for TimestepNorm<M, G, E, D>
{
    fn visit_params<V: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut V) -> Result<()> {
        v.visit(&join(prefix, "weight"), &mut self.weight)?;
        v.visit(&join(prefix, "bias"), &mut self.bias)
    }
}

/// Non-causal group norm (official `sequence_norm` kernel, unused by the LM): each group is
/// normalised with the mean and variance of all its elements over every non-padded step of the
/// sequence. Used in place of TimestepNorm by the bidirectional classifier block.
pub struct SequenceNorm<const M: usize, const G: usize, E: Dtype, D: Device<E>> {
    pub weight: Tensor<Rank1<M>, E, D>,
    pub bias: Tensor<Rank1<M>, E, D>,
    pub eps: f64,
}

impl<const M: usize, const G: usize, E: Float, D: Device<E>> SequenceNorm<M, G, E, D> {
    /// Zero-initialised weight and bias (weight applied as `1 + w`).
    pub fn new(dev: &D, eps: f64) -> Self {
        Self {
            weight: dev.zeros(),
            bias: dev.zeros(),
            eps,
        }
    }

    /// `x (B, T, M)`; `pad` as in [`TimestepNorm::try_forward`].
    pub fn try_forward<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        x: Seq<M, E, D, T>,
        pad: Option<&[bool]>,
    ) -> Result<Seq<M, E, D, T>> {
        let (b, t, _) = *x.shape();
        ensure!(t > 0, "SequenceNorm: empty sequence");
        let dev = x.device().clone();
        let gs = M / G;
        let real = real_steps(pad, b, t)?;
        let keep: Vec<E> = real.iter().map(|&r| c(if r { 1.0 } else { 0.0 })).collect();
        let ninv: Vec<E> = real
            .chunks(t)
            .map(|row| c(1.0 / row.iter().filter(|&&r| r).count().max(1) as f64))
            .collect();
        let keep_t: Tensor<(usize, usize), E, D> = dev.tensor_from_vec(keep, (b, t));
        let ninv_t: Tensor<(usize,), E, D> = dev.tensor_from_vec(ninv, (b,));
        let shp3 = (b, t, Const::<G>);
        let shp4 = (b, t, Const::<G>, gs);
        let xg = x.reshape_like(&shp4);
        let k3 = keep_t.clone().broadcast_like::<_, Axis<2>>(&shp3);
        let mu = xg.retaped::<T>().mean::<_, Axis<3>>() * k3.clone();
        let m2 = xg.retaped::<T>().square().mean::<_, Axis<3>>() * k3;
        let ninv2 = ninv_t.broadcast_like::<_, Axis<1>>(&(b, Const::<G>));
        let mean = mu.sum::<_, Axis<1>>() * ninv2.clone();
        let var = m2.sum::<_, Axis<1>>() * ninv2 - mean.retaped::<T>().square();
        let rstd = (var + c::<E>(self.eps))
            .sqrt()
            .recip()
            .broadcast_like::<_, Axes2<1, 3>>(&shp4);
        let normed = ((xg - mean.broadcast_like::<_, Axes2<1, 3>>(&shp4)) * rstd)
            .reshape_like(&(b, t, Const::<M>));
        let w = (self.weight.retaped::<T>() + c::<E>(1.0))
            .broadcast_like::<_, Axes2<0, 1>>(&(b, t, Const::<M>));
        let bias = self
            .bias
            .retaped::<T>()
            .broadcast_like::<_, Axes2<0, 1>>(&(b, t, Const::<M>));
        Ok((normed * w + bias) * keep_t.broadcast_like::<_, Axis<2>>(&(b, t, Const::<M>)))
    }
}

impl<const M: usize, const G: usize, E: Float, D: Device<E>> Params<E, D>
    for SequenceNorm<M, G, E, D>
{
    fn visit_params<V: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut V) -> Result<()> {
        v.visit(&join(prefix, "weight"), &mut self.weight)?;
        v.visit(&join(prefix, "bias"), &mut self.bias)
    }
}
