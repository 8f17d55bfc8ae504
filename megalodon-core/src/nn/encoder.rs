//! The bidirectional Megalodon encoder shared by the classifiers (vision, audio): a stack of
//! [`BidirectionalBlock`]s and a final [`SequenceNorm`], with an optional per-row length (padding
//! mask), plus masked mean pooling. Design notes: `docs/design.md`, "The bidirectional encoder".
//!
//! Parameter names follow the causal backbone's scheme: `layers.{i}.mega.*`, `layers.{i}.nffn.*`
//! and `output.final_norm.*`.

use super::bidirectional::{padding_mask, BidirectionalBlock};
use super::layers::Seq;
use super::timestep_norm::SequenceNorm;
use crate::config::{Dims, ModelConf};
use crate::device::MegaDevice;
use crate::params::{join, ParamVisitor, Params};
use crate::util::{c, Float};
use anyhow::{ensure, Result};
use dfdx::prelude::*;
use rand::{Rng, SeedableRng};

/// Pooled features `(B, M)`.
pub type Pooled<const M: usize, E, D, T = NoneTape> = Tensor<(usize, Const<M>), E, D, T>;

/// A bidirectional encoder `(B, T, M) -> (B, T, M)`. Generics as the causal backbone: `L`
/// num_layers, `M` model_dim, `Z` z_dim, `V` value_dim, `H` num_heads, `F` ffn_hidden_dim, `N`
/// cema_ndim, `G` norm_num_groups. The chunk size is the run-time `conf.chunk_size`;
/// `conf.vocab_size` is unused (may be 0).
pub struct BidirectionalEncoder<
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
    pub layers: Vec<BidirectionalBlock<M, Z, V, H, F, N, G, E, D>>,
    /// `output.final_norm`.
    pub final_norm: SequenceNorm<M, G, E, D>,
    /// Widths (checked against the type) and the run-time chunk size.
    pub conf: ModelConf,
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
    > BidirectionalEncoder<L, M, Z, V, H, F, N, G, E, D>
{
    /// The compile-time widths of this encoder type.
    pub const DIMS: Dims = Dims::of::<L, M, Z, V, H, F, N, G>();

    /// A config with this type's widths, no vocabulary, and the given chunk size.
    pub fn default_conf(chunk_size: usize) -> ModelConf {
        ModelConf::from_dims(Self::DIMS, chunk_size, 0)
    }

    /// A freshly initialised encoder, deterministic in `seed`.
    pub fn new(dev: &D, conf: ModelConf, seed: u64) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Self::init(dev, conf, &mut rng)
    }

    /// A freshly initialised encoder drawing from `rng` (for heads that initialise more
    /// parameters from the same generator).
    pub fn init(dev: &D, conf: ModelConf, rng: &mut impl Rng) -> Result<Self> {
        conf.check_dims(&Self::DIMS)?;
        let layers = (0..L)
            .map(|i| BidirectionalBlock::new(dev, rng, &conf, i))
            .collect();
        Ok(Self {
            layers,
            final_norm: SequenceNorm::new(dev, conf.norm_eps),
            conf,
        })
    }

    /// `x (B, T, M) -> (B, T, M)`. `lengths` (one per row, each in `1..=T`) marks the steps after
    /// each row's length as padding: outputs at real steps do not depend on padded inputs, padded
    /// inputs get zero gradient, and the outputs at padded steps are zero.
    pub fn forward<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        x: Seq<M, E, D, T>,
        lengths: Option<&[usize]>,
    ) -> Result<Seq<M, E, D, T>> {
        let (b, t, _) = *x.shape();
        ensure!(b > 0 && t > 0, "encoder input is empty ({b} x {t})");
        let pad = lengths.map(|l| padding_mask(l, b, t)).transpose()?;
        let mut x = x;
        for layer in &self.layers {
            x = layer.forward(x, self.conf.chunk_size, lengths)?;
        }
        self.final_norm.try_forward(x, pad.as_deref())
    }
}

/// Mean over the real steps of each row: `x (B, T, M) -> (B, M)`; `lengths` as in
/// [`BidirectionalEncoder::forward`] (`None`: every step is real).
pub fn masked_mean_pool<const M: usize, E: Float, D: Device<E>, T: Tape<E, D>>(
    x: Seq<M, E, D, T>,
    lengths: Option<&[usize]>,
) -> Result<Pooled<M, E, D, T>> {
    let (b, t, _) = *x.shape();
    ensure!(b > 0 && t > 0, "pooling an empty input ({b} x {t})");
    let w: Vec<E> = match lengths {
        Some(lens) => {
            let pad = padding_mask(lens, b, t)?;
            pad.iter()
                .enumerate()
                .map(|(i, &p)| {
                    if p {
                        c(0.0)
                    } else {
                        c(1.0 / lens[i / t] as f64)
                    }
                })
                .collect()
        }
        None => vec![c(1.0 / t as f64); b * t],
    };
    let w: Tensor<(usize, usize), E, D> = x.device().tensor_from_vec(w, (b, t));
    let shape = *x.shape();
    Ok((x * w.broadcast_like::<_, Axis<2>>(&shape)).sum::<_, Axis<1>>())
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
    > Params<E, D> for BidirectionalEncoder<L, M, Z, V, H, F, N, G, E, D>
{
    fn visit_params<Vis: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut Vis) -> Result<()> {
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.visit_params(&join(prefix, &format!("layers.{i}")), v)?;
        }
        self.final_norm
            .visit_params(&join(prefix, "output.final_norm"), v)
    }
}
