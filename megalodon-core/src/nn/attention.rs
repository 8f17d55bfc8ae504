//! Moving-average gated attention (`docs/design.md`, "The attention unit"): TimestepNorm -> CEMA
//! -> RMSNorm -> shared normalised Z -> Q/K affine -> chunked softmax attention with per-chunk
//! interleaved RoPE -> output gate -> `wh1`/`wh2` projection and the first residual.
//! Official module: `megalodon/modules/moving_average_gated_attention.py`.

use super::cema::{CemaState, MultiHeadComplexEma};
pub use super::chunked_attention::{chunked_attention, Heads, Masking};
use super::layers::{rms_normalize, silu, Linear, RmsNorm, Seq};
pub use super::probe::Probe;
pub use super::rope::Rope;
pub use super::state::{KvCache, LayerState};
use super::timestep_norm::{NormState, TimestepNorm};
use crate::device::MegaDevice;
use crate::params::{join, ParamVisitor, Params};
use crate::profile::{self, OpClass};
use crate::util::Float;
use anyhow::Result;
use dfdx::prelude::*;
use rand::Rng;

/// The projections, shared Z, chunked attention and output gate of a Megalodon attention unit,
/// everything after the CEMA: `Y = X + MX Wh1^T + bh1 + (attn(Q, K, silu(Xn Wv^T)) * R) Wh2^T`
/// with `MX = RMSNorm(M)`. Shared by the causal unit and the bidirectional block; its parameter
/// names sit directly under the unit's prefix (`gamma`, `beta`, `rmsnorm`, `wv`, `wz`, `wr`,
/// `wh1`, `wh2`), as in the official state dict.
#[derive(Clone)]
pub struct GatedProjections<
    const M: usize,
    const Z: usize,
    const V: usize,
    const H: usize,
    E: Dtype,
    D: Device<E>,
> {
    pub rmsnorm: RmsNorm<M, E, D>,
    pub wv: Linear<M, V, E, D>,
    pub wz: Linear<M, Z, E, D>,
    pub wr: Linear<M, V, E, D>,
    pub wh1: Linear<M, M, E, D>,
    pub wh2: Linear<V, M, E, D>,
    /// `(2, Z)`: Q/K scales, applied as `1 + gamma`.
    pub gamma: Tensor<Rank2<2, Z>, E, D>,
    /// `(2, Z)`: Q/K offsets.
    pub beta: Tensor<Rank2<2, Z>, E, D>,
    pub eps: f64,
    pub rope: Rope,
}

impl<
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        E: Float,
        D: MegaDevice<E>,
    > GatedProjections<M, Z, V, H, E, D>
{
    const TYPE_CHECK: () = assert!(
        H > 0 && Z.is_multiple_of(H) && V.is_multiple_of(H) && (Z / H).is_multiple_of(2),
        "num_heads must divide z_dim and value_dim, and z_dim / num_heads must be even"
    );

    /// Official initialisation ("he" linears, zero biases, gamma and beta).
    pub fn new(dev: &D, rng: &mut impl Rng, eps: f64, rope_base: f64) -> Self {
        #[allow(clippy::let_unit_value)]
        let _ = Self::TYPE_CHECK;
        Self {
            rmsnorm: RmsNorm::new(dev, eps),
            wv: Linear::new(dev, rng, true),
            wz: Linear::new(dev, rng, true),
            wr: Linear::new(dev, rng, true),
            wh1: Linear::new(dev, rng, true),
            wh2: Linear::new(dev, rng, false),
            gamma: dev.zeros(),
            beta: dev.zeros(),
            eps,
            rope: Rope::new(Z / H, rope_base),
        }
    }

    /// Per-head RMS-normalised Z and the Q/K affine: returns `(Q, K)` as `(B, T, H, dz)`.
    #[allow(clippy::type_complexity)]
    fn queries_keys<T: Tape<E, D>>(
        &self,
        mx: Seq<M, E, D, T>,
        probe: &mut Option<&mut Probe>,
    ) -> Result<(Heads<H, E, D, T>, Heads<H, E, D, T>)> {
        let (b, t, _) = *mx.shape();
        let dz = Z / H;
        let zr = self.wz.forward(mx)?;
        Probe::put(probe, "Zr", &zr);
        if probe.is_some() {
            let zn = rms_normalize(
                zr.retaped::<NoneTape>()
                    .reshape_like(&(b, t, Const::<H>, dz)),
                self.eps,
            )
            .reshape_like(&(b, t, Const::<Z>));
            Probe::put(probe, "Zn", &zn);
        }
        let (q, k) = D::qk_norm::<Z, H, T>(zr, &self.gamma, &self.beta, self.eps)?;
        Probe::put(probe, "Q", &q);
        Probe::put(probe, "K", &k);
        Ok((
            q.reshape_like(&(b, t, Const::<H>, dz)),
            k.reshape_like(&(b, t, Const::<H>, dz)),
        ))
    }

    /// `x`: unit input, `xn`: its normalised form (values come from it), `m`: the CEMA output.
    /// Returns `Y` and the KV cache after the call (see [`chunked_attention`]).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Seq<M, E, D, T>,
        xn: Seq<M, E, D, T>,
        m: Seq<M, E, D, T>,
        chunk: usize,
        cache: Option<&KvCache<H, E, D>>,
        masking: Masking<'_>,
        probe: &mut Option<&mut Probe>,
    ) -> Result<(Seq<M, E, D, T>, Option<KvCache<H, E, D>>)> {
        let (b, t, _) = *x.shape();
        let x = profile::enter(OpClass::Elementwise, x);
        let mx = self.rmsnorm.forward(m)?;
        Probe::put(probe, "MX", &mx);
        let (q, k) = self.queries_keys(mx.retaped::<T>(), probe)?;
        let vv = silu(self.wv.forward(xn)?)?;
        Probe::put(probe, "Vv", &vv);
        // the gate's pre-activation; R = silu(rg) is only materialised for a probe
        let rg = self.wr.forward(mx.retaped::<T>())?;
        if probe.is_some() {
            Probe::put(probe, "R", &silu(rg.retaped::<NoneTape>())?);
        }
        let (a, kv) = chunked_attention(
            profile::enter(OpClass::Copies, q),
            k,
            vv.reshape_like(&(b, t, Const::<H>, V / H)),
            cache,
            chunk,
            &self.rope,
            masking,
        )?;
        let a = profile::leave(OpClass::Copies, a.reshape_like(&(b, t, Const::<V>)));
        Probe::put(probe, "A", &a);
        let y = self.wh1.forward_add(mx, x)?;
        let y = self.wh2.forward_add(D::silu_gate(rg, a)?, y)?;
        let y = profile::leave(OpClass::Elementwise, y);
        Probe::put(probe, "Y", &y);
        Ok((y, kv))
    }
}

impl<const M: usize, const Z: usize, const V: usize, const H: usize, E: Float, D: Device<E>>
    Params<E, D> for GatedProjections<M, Z, V, H, E, D>
{
    fn visit_params<Vis: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut Vis) -> Result<()> {
        v.visit(&join(prefix, "gamma"), &mut self.gamma)?;
        v.visit(&join(prefix, "beta"), &mut self.beta)?;
        self.rmsnorm.visit_params(&join(prefix, "rmsnorm"), v)?;
        self.wv.visit_params(&join(prefix, "wv"), v)?;
        self.wz.visit_params(&join(prefix, "wz"), v)?;
        self.wr.visit_params(&join(prefix, "wr"), v)?;
        self.wh1.visit_params(&join(prefix, "wh1"), v)?;
        self.wh2.visit_params(&join(prefix, "wh2"), v)
    }
}

/// The attention half of a Megalodon layer (`MovingAverageGatedAttention`): TimestepNorm, CEMA,
/// then [`GatedProjections`]; returns `Y = X + MX Wh1^T + bh1 + (A * R) Wh2^T`.
///
/// Generics: `M` model_dim, `Z` z_dim, `V` value_dim, `H` num_heads, `N` cema_ndim, `G`
/// norm_num_groups.
#[derive(Clone)]
pub struct MovingAverageGatedAttention<
    const M: usize,
    const Z: usize,
    const V: usize,
    const H: usize,
    const N: usize,
    const G: usize,
    E: Dtype,
    D: Device<E>,
> {
    pub timenorm: TimestepNorm<M, G, E, D>,
    pub cema: MultiHeadComplexEma<M, N, E, D>,
    pub proj: GatedProjections<M, Z, V, H, E, D>,
}

impl<
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > MovingAverageGatedAttention<M, Z, V, H, N, G, E, D>
{
    /// Official initialisation.
    pub fn new(dev: &D, rng: &mut impl Rng, eps: f64, rope_base: f64) -> Self {
        let timenorm = TimestepNorm::new(dev, eps);
        let cema = MultiHeadComplexEma::new(dev, rng);
        Self {
            timenorm,
            cema,
            proj: GatedProjections::new(dev, rng, eps, rope_base),
        }
    }

    /// Forward over `x (B, T, M)`. With `state`, continues the stream it describes and updates it
    /// (streaming inference); without, the call starts a fresh stream (training).
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Seq<M, E, D, T>,
        chunk: usize,
        state: Option<&mut LayerState<M, H, N, G, E, D>>,
        mut probe: Option<&mut Probe>,
    ) -> Result<Seq<M, E, D, T>> {
        let (norm0, h0, kv) = match &state {
            Some(s) => (
                Some(NormState {
                    count: s.norm.count.clone(),
                    mean: s.norm.mean.retaped::<T>(),
                    var: s.norm.var.retaped::<T>(),
                }),
                s.cema.as_ref().map(|h| CemaState {
                    re: h.re.retaped::<T>(),
                    im: h.im.retaped::<T>(),
                }),
                s.kv.as_ref(),
            ),
            None => (None, None, None),
        };
        let xin = profile::enter(OpClass::Norms, x.retaped::<T>());
        let (xn, norm1) = self.timenorm.try_forward(xin, norm0, None)?;
        let xn = profile::leave(OpClass::Norms, xn);
        Probe::put(&mut probe, "Xn", &xn);
        let u = profile::enter(OpClass::Cema, xn.retaped::<T>());
        let (m, h1) = D::cema(&self.cema, u, h0, state.is_some())?;
        let m = profile::leave(OpClass::Cema, m);
        Probe::put(&mut probe, "M", &m);
        let (y, kv1) = self
            .proj
            .forward(x, xn, m, chunk, kv, Masking::Causal, &mut probe)?;
        if let Some(s) = state {
            s.norm = NormState {
                count: norm1.count,
                mean: norm1.mean.retaped(),
                var: norm1.var.retaped(),
            };
            s.cema = h1.map(|h| CemaState {
                re: h.re.retaped(),
                im: h.im.retaped(),
            });
            s.kv = kv1;
        }
        Ok(y)
    }
}

impl<
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > Params<E, D> for MovingAverageGatedAttention<M, Z, V, H, N, G, E, D>
{
    fn visit_params<Vis: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut Vis) -> Result<()> {
        self.timenorm.visit_params(&join(prefix, "timenorm"), v)?;
        self.cema.visit_params(&join(prefix, "cema"), v)?;
        self.proj.visit_params(prefix, v)
    }
}
