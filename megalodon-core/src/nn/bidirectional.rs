//! Bidirectional (non-causal) Megalodon layer for classification, shared by the vision and audio
//! heads.
//!
//! The Megalodon repository has no classification code, so this variant is our design (spec
//! section 15; the paper's exact classifier is unconfirmed):
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

use super::attention::{chunked_attention, Heads, Masking, Rope};
use super::cema::MultiHeadComplexEma;
use super::layers::{rms_normalize, silu, Linear, RmsNorm, Seq};
use super::nffn::NormalizedFfn;
use super::timestep_norm::SequenceNorm;
use crate::config::ModelConf;
use crate::device::MegaDevice;
use crate::params::{join, ParamVisitor, Params};
use crate::util::{c, Float};
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
    pub rmsnorm: RmsNorm<M, E, D>,
    pub wv: Linear<M, V, E, D>,
    pub wz: Linear<M, Z, E, D>,
    pub wr: Linear<M, V, E, D>,
    pub wh1: Linear<M, M, E, D>,
    pub wh2: Linear<V, M, E, D>,
    pub gamma: Tensor<Rank2<2, Z>, E, D>,
    pub beta: Tensor<Rank2<2, Z>, E, D>,
    pub nffn: NormalizedFfn<M, F, E, D>,
    pub eps: f64,
    pub rope: Rope,
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
    const TYPE_CHECK: () = assert!(
        H > 0 && Z.is_multiple_of(H) && V.is_multiple_of(H) && (Z / H).is_multiple_of(2) && G > 0 && M.is_multiple_of(G),
        "num_heads must divide z_dim and value_dim (z_dim / num_heads even); norm_num_groups must divide model_dim"
    );

    /// Official-style initialisation (as the causal block) of layer `layer_id`.
    pub fn new(dev: &D, rng: &mut impl Rng, conf: &ModelConf, layer_id: usize) -> Self {
        #[allow(clippy::let_unit_value)]
        let _ = Self::TYPE_CHECK;
        let eps = conf.norm_eps;
        Self {
            norm: SequenceNorm::new(dev, eps),
            cema: MultiHeadComplexEma::new(dev, rng),
            cema_rev: MultiHeadComplexEma::new(dev, rng),
            rmsnorm: RmsNorm::new(dev, eps),
            wv: Linear::new(dev, rng, true),
            wz: Linear::new(dev, rng, true),
            wr: Linear::new(dev, rng, true),
            wh1: Linear::new(dev, rng, true),
            wh2: Linear::new(dev, rng, false),
            gamma: dev.zeros(),
            beta: dev.zeros(),
            nffn: NormalizedFfn::new(
                dev,
                rng,
                eps,
                conf.swiglu,
                conf.rescale_nffn.then_some(layer_id),
            ),
            eps,
            rope: Rope::new(Z / H, conf.rope_base()),
        }
    }

    /// The two-way CEMA: `cema(x) + cema_rev` run backward in time.
    pub fn bidirectional_ema<T: Tape<E, D> + Merge<T> + Merge<NoneTape>>(
        &self,
        xn: Seq<M, E, D, T>,
    ) -> Result<Seq<M, E, D, T>> {
        let (fwd, _) = D::cema(&self.cema, xn.retaped::<T>(), None, false)?;
        let bwd = D::cema_anticausal(&self.cema_rev, xn)?;
        Ok(fwd + bwd)
    }

    /// `x (B, T, M) -> (B, T, M)` with attention inside chunks of `chunk` positions.
    pub fn forward<T: Tape<E, D> + Merge<T> + Merge<NoneTape>>(
        &self,
        x: Seq<M, E, D, T>,
        chunk: usize,
    ) -> Result<Seq<M, E, D, T>> {
        let (b, t, _) = *x.shape();
        let dev = x.device().clone();
        let xn = self.norm.try_forward(x.retaped::<T>(), None)?;
        let m = self.bidirectional_ema(xn.retaped::<T>())?;
        let mx = self.rmsnorm.forward(m);
        let dz = Z / H;
        let zn = rms_normalize(
            self.wz
                .forward(mx.retaped::<T>())
                .reshape_like(&(b, t, Const::<H>, dz)),
            self.eps,
        )
        .reshape_like(&(b, t, Const::<Z>));
        let shape = (b, t, Const::<Z>);
        let scale = c::<E>(1.0 / (dz as f64).sqrt());
        let row = |p: &Tensor<Rank2<2, Z>, E, D>, i: usize| {
            p.retaped::<T>()
                .select(dev.tensor(i))
                .broadcast_like::<_, Axes2<0, 1>>(&shape)
        };
        let q =
            zn.retaped::<T>() * ((row(&self.gamma, 0) + c::<E>(1.0)) * scale) + row(&self.beta, 0);
        let k = zn * ((row(&self.gamma, 1) + c::<E>(1.0)) * scale) + row(&self.beta, 1);
        let q: Heads<H, E, D, T> = q.reshape_like(&(b, t, Const::<H>, dz));
        let k: Heads<H, E, D, T> = k.reshape_like(&(b, t, Const::<H>, dz));
        let vv = silu(self.wv.forward(xn)).reshape_like(&(b, t, Const::<H>, V / H));
        let r = silu(self.wr.forward(mx.retaped::<T>()));
        let (a, _) = chunked_attention(q, k, vv, None, chunk, &self.rope, Masking::Full)?;
        let a = a.reshape_like(&(b, t, Const::<V>));
        let y = x.retaped::<T>() + self.wh1.forward(mx) + self.wh2.forward(a * r);
        Ok(self.nffn.forward(y, x, &mut None))
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
    > Params<E, D> for BidirectionalBlock<M, Z, V, H, F, N, G, E, D>
{
    fn visit_params<Vis: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut Vis) -> Result<()> {
        let p = join(prefix, "mega");
        v.visit(&join(&p, "gamma"), &mut self.gamma)?;
        v.visit(&join(&p, "beta"), &mut self.beta)?;
        self.norm.visit_params(&join(&p, "seqnorm"), v)?;
        self.cema.visit_params(&join(&p, "cema"), v)?;
        self.cema_rev.visit_params(&join(&p, "cema_rev"), v)?;
        self.rmsnorm.visit_params(&join(&p, "rmsnorm"), v)?;
        self.wv.visit_params(&join(&p, "wv"), v)?;
        self.wz.visit_params(&join(&p, "wz"), v)?;
        self.wr.visit_params(&join(&p, "wr"), v)?;
        self.wh1.visit_params(&join(&p, "wh1"), v)?;
        self.wh2.visit_params(&join(&p, "wh2"), v)?;
        self.nffn.visit_params(&join(prefix, "nffn"), v)
    }
}
