//! The causal Megalodon backbone: `L` layers and the final TimestepNorm, hidden states in and out
//! (`(B, T, M) -> (B, T, M)`), with its streaming state. The language model
//! ([`super::model::Megalodon`]) puts the embedding and the output layer around it; any other
//! causal head can use it directly.
//!
//! Parameter names are the official ones: `layers.{i}.*` and `output.final_norm.*` (the official
//! code keeps the final norm inside its output module).

use super::attention::Probe;
use super::block::MegaBlock;
use super::layers::Seq;
use super::state::{ModelState, Rewindow};
use super::timestep_norm::{NormState, TimestepNorm};
use crate::config::{Dims, ModelConf};
use crate::device::MegaDevice;
use crate::params::{join, ParamVisitor, Params};
use crate::profile::{self, OpClass};
use crate::util::Float;
use anyhow::{ensure, Result};
use dfdx::prelude::*;
use rand::{Rng, SeedableRng};

/// The causal backbone. Generics: `L` num_layers, `M` model_dim, `Z` z_dim, `V` value_dim, `H`
/// num_heads, `F` ffn_hidden_dim, `N` cema_ndim, `G` norm_num_groups; dtype `E`, device `D`.
pub struct Backbone<
    const L: usize,
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
    /// `layers.{i}`.
    pub layers: Vec<MegaBlock<M, Z, V, H, F, N, G, E, D>>,
    /// `output.final_norm`.
    pub final_norm: TimestepNorm<M, G, E, D>,
    /// The run-time configuration (official `ModelConf`; `vocab_size` is not used here).
    pub conf: ModelConf,
    /// Recompute each layer's activations in backward instead of keeping them (training without
    /// a streaming state; see [`MegaBlock::forward_recomputed`]): less memory, one more forward.
    pub recompute: bool,
}

impl<
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E> + 'static,
    > Backbone<L, M, Z, V, H, F, N, G, E, D>
{
    /// The compile-time widths of this type.
    pub const DIMS: Dims = Dims::of::<L, M, Z, V, H, F, N, G>();

    /// A config with this type's widths, no vocabulary, and the given chunk size.
    pub fn default_conf(chunk_size: usize) -> ModelConf {
        ModelConf::from_dims(Self::DIMS, chunk_size, 0)
    }

    /// A freshly initialised backbone (official init), deterministic in `seed`.
    pub fn new(dev: &D, conf: ModelConf, seed: u64) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Self::init(dev, conf, &mut rng)
    }

    /// A freshly initialised backbone drawing from `rng` (the LM draws its embedding first).
    pub fn init(dev: &D, conf: ModelConf, rng: &mut impl Rng) -> Result<Self> {
        conf.check_dims(&Self::DIMS)?;
        let layers = (0..L).map(|i| MegaBlock::new(dev, rng, &conf, i)).collect();
        Ok(Self {
            layers,
            final_norm: TimestepNorm::new(dev, conf.norm_eps),
            conf,
            recompute: false,
        })
    }

    /// A fresh streaming state for `batch` rows.
    pub fn new_state(&self, batch: usize) -> ModelState<M, H, N, G, E, D> {
        ModelState::new(self.final_norm.weight.device(), L, batch)
    }

    /// Hidden states `x (B, T, M) -> (B, T, M)` through every layer and the final norm.
    ///
    /// With `state`, the call continues the stream the state describes (any number of steps per
    /// call; feeding a sequence in any split gives the output of one call) and updates it;
    /// without, it starts a fresh stream. TimestepNorm re-windowing works on token ids and is
    /// done by the language model: a re-windowing state is refused here.
    pub fn forward_hidden<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        x: Seq<M, E, D, T>,
        state: Option<&mut ModelState<M, H, N, G, E, D>>,
    ) -> Result<Seq<M, E, D, T>> {
        if let Some(s) = &state {
            ensure!(
                s.rewindow.is_none(),
                "Backbone::forward_hidden cannot re-window (it sees no token ids); use the \
                 language model's forward_stream or a cumulative state"
            );
        }
        self.run(x, state, None)
    }

    /// The layers and the final norm, with optional state and per-layer probes.
    pub(crate) fn run<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        x: Seq<M, E, D, T>,
        mut state: Option<&mut ModelState<M, H, N, G, E, D>>,
        mut probes: Option<&mut Vec<Probe>>,
    ) -> Result<Seq<M, E, D, T>> {
        let (b, t, _) = *x.shape();
        ensure!(b > 0 && t > 0, "empty input ({b} x {t})");
        if let Some(s) = &state {
            ensure!(
                s.batch() == b && s.layers.len() == L,
                "streaming state has batch {} and {} layers, the input has batch {b} and the \
                 model {L} layers",
                s.batch(),
                s.layers.len()
            );
        }
        let chunk = self.conf.chunk_size;
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            let ls = state.as_deref_mut().map(|s| &mut s.layers[i]);
            let probe = probes.as_deref_mut().map(|p| {
                p.push(Probe::default());
                p.last_mut().expect("just pushed")
            });
            x = match (ls, probe) {
                (None, None) if self.recompute => layer.forward_recomputed(x, chunk)?,
                (ls, probe) => layer.forward(x, chunk, ls, probe)?,
            };
        }
        let norm0 = state.as_ref().map(|s| NormState {
            count: s.final_norm.count.clone(),
            mean: s.final_norm.mean.retaped::<T>(),
            var: s.final_norm.var.retaped::<T>(),
        });
        let x = profile::enter(OpClass::Norms, x);
        let (y, norm1) = self.final_norm.try_forward(x, norm0, None)?;
        let y = profile::leave(OpClass::Norms, y);
        if let Some(s) = state {
            s.final_norm = NormState {
                count: norm1.count,
                mean: norm1.mean.retaped(),
                var: norm1.var.retaped(),
            };
            s.position += t;
        }
        Ok(y)
    }

    /// A fresh re-windowing state (see [`Rewindow`]); used by the language model.
    pub fn new_state_rewindowed(
        &self,
        batch: usize,
        rewindow: Rewindow,
    ) -> Result<ModelState<M, H, N, G, E, D>> {
        self.new_state(batch).with_rewindow(rewindow)
    }
}

impl<
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > Params<E, D> for Backbone<L, M, Z, V, H, F, N, G, E, D>
{
    fn visit_params<Vis: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut Vis) -> Result<()> {
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.visit_params(&join(prefix, &format!("layers.{i}")), v)?;
        }
        self.final_norm
            .visit_params(&join(prefix, "output.final_norm"), v)
    }
}
