//! TimestepNorm (`docs/design.md` §3): a causal group norm whose statistics at step t pool every
//! element of the group over all steps seen so far (including a carried prefix), and its
//! non-causal twin [`SequenceNorm`] for the bidirectional classifier block.
//! Official: `megalodon/modules/timestep_norm.py`, kernels `csrc/ops/timestep_norm*`. The op
//! itself (closed form, carried state) is `ops::timestep_norm`, dispatched per device through
//! [`MegaDevice::timestep_norm`].

pub use super::layers::Seq;
use crate::device::MegaDevice;
use crate::ops::timestep_norm::real_steps;
pub use crate::ops::timestep_norm::{GroupStat, NormState};
use crate::params::{join, ParamVisitor, Params};
use crate::util::{c, Float};
use anyhow::{ensure, Result};
use dfdx::prelude::*;

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
    ) -> Result<(Seq<M, E, D, T>, NormState<G, E, D, T>)>
    where
        D: MegaDevice<E>,
    {
        D::timestep_norm(x, &self.weight, &self.bias, self.eps, state, pad)
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
        let shp3 = (b, t, Const::<G>);
        let shp4 = (b, t, Const::<G>, gs);
        let xg = x.reshape_like(&shp4);
        let mu = xg.retaped::<T>().mean::<_, Axis<3>>();
        let m2 = xg.retaped::<T>().square().mean::<_, Axis<3>>();
        // without padding every step counts: a scalar 1/T, nothing copied to the device
        let (mean, var, keep_t) = match pad {
            None => {
                let ninv = c::<E>(1.0 / t as f64);
                let mean = mu.sum::<_, Axis<1>>() * ninv;
                let var = m2.sum::<_, Axis<1>>() * ninv - mean.retaped::<T>().square();
                (mean, var, None)
            }
            Some(_) => {
                let real = real_steps(pad, b, t)?;
                let keep: Vec<E> = real.iter().map(|&r| c(if r { 1.0 } else { 0.0 })).collect();
                let ninv: Vec<E> = real
                    .chunks(t)
                    .map(|row| c(1.0 / row.iter().filter(|&&r| r).count().max(1) as f64))
                    .collect();
                let keep_t: Tensor<(usize, usize), E, D> = dev.tensor_from_vec(keep, (b, t));
                let ninv_t: Tensor<(usize,), E, D> = dev.tensor_from_vec(ninv, (b,));
                let k3 = keep_t.clone().broadcast_like::<_, Axis<2>>(&shp3);
                let ninv2 = ninv_t.broadcast_like::<_, Axis<1>>(&(b, Const::<G>));
                let mean = (mu * k3.clone()).sum::<_, Axis<1>>() * ninv2.clone();
                let var = (m2 * k3).sum::<_, Axis<1>>() * ninv2 - mean.retaped::<T>().square();
                (mean, var, Some(keep_t))
            }
        };
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
        let y = normed * w + bias;
        Ok(match keep_t {
            Some(k) => y * k.broadcast_like::<_, Axis<2>>(&(b, t, Const::<M>)),
            None => y,
        })
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
