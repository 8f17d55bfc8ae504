//! One Megalodon layer (`MegaBlock`): attention unit then normalized FFN with the two-hop
//! residual, `out = X + FFN(LN(X + Attn(X)))`.

use super::attention::{LayerState, MovingAverageGatedAttention, Probe};
use super::layers::Seq;
use super::nffn::NormalizedFfn;
use crate::config::ModelConf;
use crate::device::MegaDevice;
use crate::params::{join, ParamVisitor, Params};
use crate::util::Float;
use anyhow::Result;
use dfdx::prelude::*;
use rand::Rng;

/// Generics: `M` model_dim, `Z` z_dim, `V` value_dim, `H` num_heads, `F` ffn_hidden_dim,
/// `N` cema_ndim, `G` norm_num_groups; dtype `E` and device `D` last.
#[derive(Clone)]
pub struct MegaBlock<
    const M: usize,
    const Z: usize,
    const V: usize,
    const H: usize,
    const F: usize,
    const N: usize,
    const G: usize,
    E: Dtype,
    D: Device<E>,
> {
    pub mega: MovingAverageGatedAttention<M, Z, V, H, N, G, E, D>,
    pub nffn: NormalizedFfn<M, F, E, D>,
}

impl<
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > MegaBlock<M, Z, V, H, F, N, G, E, D>
{
    /// Official initialisation of layer `layer_id` under `conf`.
    pub fn new(dev: &D, rng: &mut impl Rng, conf: &ModelConf, layer_id: usize) -> Self {
        Self {
            mega: MovingAverageGatedAttention::new(dev, rng, conf.norm_eps, conf.rope_base()),
            nffn: NormalizedFfn::new(
                dev,
                rng,
                conf.norm_eps,
                conf.swiglu,
                conf.rescale_nffn.then_some(layer_id),
            ),
        }
    }

    /// `x (B, T, M) -> (B, T, M)`; see [`MovingAverageGatedAttention::forward`] for `state`.
    pub fn forward<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        x: Seq<M, E, D, T>,
        chunk: usize,
        state: Option<&mut LayerState<M, H, N, G, E, D>>,
        mut probe: Option<&mut Probe>,
    ) -> Result<Seq<M, E, D, T>> {
        let y = self
            .mega
            .forward(x.retaped::<T>(), chunk, state, probe.as_deref_mut())?;
        let out = self.nffn.forward(y, x, &mut probe)?;
        Probe::put(&mut probe, "out", &out);
        Ok(out)
    }
}

impl<
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > Params<E, D> for MegaBlock<M, Z, V, H, F, N, G, E, D>
{
    fn visit_params<Vis: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut Vis) -> Result<()> {
        self.mega.visit_params(&join(prefix, "mega"), v)?;
        self.nffn.visit_params(&join(prefix, "nffn"), v)
    }
}
