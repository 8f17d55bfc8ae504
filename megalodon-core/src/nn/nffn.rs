//! Normalized feed-forward network (`docs/design.md` §2, `NormalizedFeedForwardNetwork`):
//! `out = X + fc2(silu(fc1(LN(Y))) [* fc3(LN(Y))])` — the two-hop residual adds the *layer
//! input* X, not the attention output Y.

use super::attention::Probe;
use super::layers::{silu, LayerNorm, Linear, Seq};
use crate::device::MegaDevice;
use crate::params::{join, ParamVisitor, Params};
use crate::profile::{self, OpClass};
use crate::util::{c, Float};
use anyhow::Result;
use dfdx::prelude::*;
use rand::Rng;

/// Plain (`fc1`, `fc2`) or SwiGLU (`fc3` too) FFN of hidden width `F` with pre-LayerNorm.
#[derive(Clone)]
pub struct NormalizedFfn<const M: usize, const F: usize, E: Dtype, D: Device<E>> {
    pub norm: LayerNorm<M, E, D>,
    pub fc1: Linear<M, F, E, D>,
    pub fc2: Linear<F, M, E, D>,
    /// Present iff `swiglu`.
    pub fc3: Option<Linear<M, F, E, D>>,
    /// Present iff `rescale_nffn` (init `0.1 * 0.5^layer_id`).
    pub alpha: Option<Tensor<Rank1<M>, E, D>>,
}

impl<const M: usize, const F: usize, E: Float, D: Device<E>> NormalizedFfn<M, F, E, D> {
    pub fn new(
        dev: &D,
        rng: &mut impl Rng,
        eps: f64,
        swiglu: bool,
        rescale: Option<usize>,
    ) -> Self {
        Self {
            norm: LayerNorm::new(dev, eps),
            fc1: Linear::new(dev, rng, false),
            fc2: Linear::new(dev, rng, false),
            fc3: swiglu.then(|| Linear::new(dev, rng, false)),
            alpha: rescale.map(|layer| {
                dev.tensor_from_vec(
                    vec![c::<E>(0.1 * 0.5f64.powi(layer as i32)); M],
                    Rank1::<M>::default(),
                )
            }),
        }
    }

    /// `y`: attention-unit output (FFN input); `x`: the layer input for the residual.
    pub fn forward<T: Tape<E, D>>(
        &self,
        y: Seq<M, E, D, T>,
        x: Seq<M, E, D, T>,
        probe: &mut Option<&mut Probe>,
    ) -> Result<Seq<M, E, D, T>>
    where
        D: MegaDevice<E>,
    {
        let y = profile::enter(OpClass::Elementwise, y);
        let yn = self.norm.forward(y)?;
        Probe::put(probe, "Yn", &yn);
        let u = match &self.fc3 {
            Some(fc3) => D::silu_gate(self.fc1.forward(yn.retaped::<T>())?, fc3.forward(yn)?)?,
            None => silu(self.fc1.forward(yn)?)?,
        };
        Probe::put(probe, "U", &u);
        let out = match &self.alpha {
            Some(a) => {
                let o = self.fc2.forward(u)?;
                let s = *o.shape();
                x + o * a.retaped::<T>().broadcast_like::<_, Axes2<0, 1>>(&s)
            }
            None => self.fc2.forward_add(u, x)?,
        };
        Ok(profile::leave(OpClass::Elementwise, out))
    }
}

impl<const M: usize, const F: usize, E: Float, D: Device<E>> Params<E, D>
    for NormalizedFfn<M, F, E, D>
{
    fn visit_params<V: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut V) -> Result<()> {
        self.norm.visit_params(&join(prefix, "norm"), v)?;
        self.fc1.visit_params(&join(prefix, "fc1"), v)?;
        self.fc2.visit_params(&join(prefix, "fc2"), v)?;
        if let Some(fc3) = &mut self.fc3 {
            fc3.visit_params(&join(prefix, "fc3"), v)?;
        }
        if let Some(a) = &mut self.alpha {
            v.visit(&join(prefix, "alpha"), a)?;
        }
        Ok(())
    }
}
