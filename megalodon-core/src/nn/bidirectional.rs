//! Bidirectional (non-causal) Megalodon layer for classification, shared by the vision and audio
//! heads.
//!
//! The Megalodon repository has no classification code, so this variant is our design
//! (`docs/design.md` §10; the paper's exact classifier is unconfirmed):
//! - **norm**: [`SequenceNorm`] (the official, unused `sequence_norm` kernel: a group norm over all
//!   time steps) replaces the causal TimestepNorm;
//! - **CEMA both ways** (Mega's bidirectional EMA): `cema` runs forward in time and `cema_rev`
//!   backward (the causal recurrence applied to the time-reversed input). Each keeps its own
//!   `omega`, so the skip term is `(omega_fwd + omega_rev) * x`; Mega's single length-(2L-1)
//!   kernel counts the zero-lag tap of both directions the same way;
//! - **attention**: softmax attention over all positions of each chunk (no causal mask), with
//!   per-chunk RoPE; the padded tail of a partial last chunk is masked;
//! - everything else (RMSNorm, shared Z, Q/K affine, gate, `wh1`/`wh2`, normalized FFN, two-hop
//!   residual) is the causal block's.
//!
//! There is no streaming state: a classifier sees the whole input at once.

use super::attention::{GatedProjections, Masking};
use super::cema::MultiHeadComplexEma;
use super::layers::Seq;
use super::nffn::NormalizedFfn;
use super::timestep_norm::SequenceNorm;
use crate::config::ModelConf;
use crate::device::MegaDevice;
use crate::params::{join, ParamVisitor, Params};
use crate::util::Float;
use anyhow::Result;
use dfdx::prelude::*;
use rand::Rng;

/// A bidirectional Megalodon layer. Generics as [`super::block::MegaBlock`].
pub struct BidirectionalBlock<
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
    pub norm: SequenceNorm<M, G, E, D>,
    pub cema: MultiHeadComplexEma<M, N, E, D>,
    pub cema_rev: MultiHeadComplexEma<M, N, E, D>,
    pub proj: GatedProjections<M, Z, V, H, E, D>,
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
    > BidirectionalBlock<M, Z, V, H, F, N, G, E, D>
{
    /// Official-style initialisation (as the causal block) of layer `layer_id`.
    pub fn new(dev: &D, rng: &mut impl Rng, conf: &ModelConf, layer_id: usize) -> Self {
        let eps = conf.norm_eps;
        let norm = SequenceNorm::new(dev, eps);
        let cema = MultiHeadComplexEma::new(dev, rng);
        let cema_rev = MultiHeadComplexEma::new(dev, rng);
        let proj = GatedProjections::new(dev, rng, eps, conf.rope_base());
        let nffn = NormalizedFfn::new(
            dev,
            rng,
            eps,
            conf.swiglu,
            conf.rescale_nffn.then_some(layer_id),
        );
        Self {
            norm,
            cema,
            cema_rev,
            proj,
            nffn,
        }
    }

    /// The two-way CEMA: `cema(x) + cema_rev` run backward in time.
    pub fn bidirectional_ema<T: Tape<E, D>>(&self, xn: Seq<M, E, D, T>) -> Result<Seq<M, E, D, T>> {
        let (fwd, _) = D::cema(&self.cema, xn.retaped::<T>(), None, false)?;
        let bwd = D::cema_anticausal(&self.cema_rev, xn)?;
        Ok(fwd + bwd)
    }

    /// `x (B, T, M) -> (B, T, M)` with attention inside chunks of `chunk` positions.
    ///
    /// `lengths` (one per row, each in `1..=T`) marks steps `lengths[r]..T` of row `r` as
    /// padding: they are left out of the norm statistics, enter the CEMA as zeros and are hidden
    /// from every attention query, so outputs at real steps do not depend on them. Outputs at
    /// padded steps are finite but meaningless.
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Seq<M, E, D, T>,
        chunk: usize,
        lengths: Option<&[usize]>,
    ) -> Result<Seq<M, E, D, T>> {
        let (b, t, _) = *x.shape();
        let pad = lengths.map(|l| padding_mask(l, b, t)).transpose()?;
        let xn = self.norm.try_forward(x.retaped::<T>(), pad.as_deref())?;
        let m = self.bidirectional_ema(xn.retaped::<T>())?;
        let (y, _) = self.proj.forward(
            x.retaped::<T>(),
            xn,
            m,
            chunk,
            None,
            Masking::Full(lengths),
            &mut None,
        )?;
        self.nffn.forward(y, x, &mut None)
    }
}

/// The `B x T` padding mask (`true` = padded) of rows with the given real lengths; each length
/// must be in `1..=T`.
pub fn padding_mask(lengths: &[usize], b: usize, t: usize) -> Result<Vec<bool>> {
    anyhow::ensure!(
        lengths.len() == b,
        "{} row lengths for a batch of {b} rows",
        lengths.len()
    );
    if let Some((r, &n)) = lengths.iter().enumerate().find(|(_, &n)| n == 0 || n > t) {
        anyhow::bail!("row {r} has length {n}; expected 1..={t} (the sequence length)");
    }
    Ok(lengths
        .iter()
        .flat_map(|&n| (0..t).map(move |i| i >= n))
        .collect())
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
    > Params<E, D> for BidirectionalBlock<M, Z, V, H, F, N, G, E, D>
{
    fn visit_params<Vis: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut Vis) -> Result<()> {
        let p = join(prefix, "mega");
        self.norm.visit_params(&join(&p, "seqnorm"), v)?;
        self.cema.visit_params(&join(&p, "cema"), v)?;
        self.cema_rev.visit_params(&join(&p, "cema_rev"), v)?;
        self.proj.visit_params(&p, v)?;
        self.nffn.visit_params(&join(prefix, "nffn"), v)
    }
}
