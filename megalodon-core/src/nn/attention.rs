//! Moving-average gated attention (spec sections 2, 5, 6): TimestepNorm -> CEMA -> RMSNorm ->
//! shared normalised Z -> Q/K affine -> chunked causal softmax attention with per-chunk
//! interleaved RoPE -> output gate -> `wh1`/`wh2` projection and the first residual.
//! Official: `megalodon/modules/moving_average_gated_attention.py`.

use super::cema::{CemaState, MultiHeadComplexEma};
use super::layers::{rms_normalize, silu, Linear, RmsNorm, Seq};
use super::timestep_norm::{NormState, TimestepNorm};
use crate::device::{BlockMask, MegaDevice};
use crate::params::{join, ParamVisitor, Params};
use crate::util::{c, to_f64, Float};
use anyhow::{ensure, Result};
use dfdx::prelude::*;
use rand::Rng;
use std::collections::BTreeMap;

/// `(B, T, H, d)`: per-head tensors with a run-time head width.
pub type Heads<const H: usize, E, D, T = NoneTape> =
    Tensor<(usize, usize, Const<H>, usize), E, D, T>;

/// Named intermediate values captured during a forward pass (for parity tests and debugging).
#[derive(Default, Debug, Clone)]
pub struct Probe(pub BTreeMap<String, Vec<f64>>);

impl Probe {
    /// Records `t` under `name` when a probe is attached.
    pub(crate) fn put<S: Shape, E: Dtype, D: Device<E>, T>(
        probe: &mut Option<&mut Probe>,
        name: &str,
        t: &Tensor<S, E, D, T>,
    ) {
        if let Some(p) = probe.as_deref_mut() {
            p.0.insert(name.to_string(), to_f64(t));
        }
    }
}

/// Interleaved rotary embedding restarting at every chunk (spec 5.2).
#[derive(Debug, Clone)]
pub struct Rope {
    /// `rope.freqs` (dz/2,): `1 / base^(2j/dz)` computed in f64, stored as f32.
    pub freqs: Vec<f32>,
}

impl Rope {
    pub fn new(dz: usize, base: f64) -> Self {
        let freqs = (0..dz / 2)
            .map(|j| (1.0 / base.powf((2 * j) as f64 / dz as f64)) as f32)
            .collect();
        Self { freqs }
    }

    /// `(cos, signed sin)` tables `(len(positions), dz)`: for pair j at position m the angle is
    /// `m * freqs[j]` in f32; `sin` carries `-sin` at even and `+sin` at odd slots.
    fn tables<E: Dtype>(&self, positions: &[usize]) -> (Vec<E>, Vec<E>) {
        let dz = self.freqs.len() * 2;
        let mut cs = Vec::with_capacity(positions.len() * dz);
        let mut sn = Vec::with_capacity(positions.len() * dz);
        for &m in positions {
            for &f in &self.freqs {
                let ang = (m as f32 * f) as f64;
                let (s, co) = ang.sin_cos();
                cs.push(c(co));
                cs.push(c(co));
                sn.push(c(-s));
                sn.push(c(s));
            }
        }
        (cs, sn)
    }

    /// Rotates `x (B, T, H, dz)`; `positions` has length T (within-chunk positions).
    pub fn apply<const H: usize, E: Float, D: MegaDevice<E>, T: Tape<E, D>>(
        &self,
        x: Heads<H, E, D, T>,
        positions: &[usize],
    ) -> Heads<H, E, D, T> {
        let (b, t, _, dz) = *x.shape();
        let dev = x.device().clone();
        let (cs, sn) = self.tables::<E>(positions);
        let cs: Tensor<(usize, usize), E, D> = dev.tensor_from_vec(cs, (t, dz));
        let sn: Tensor<(usize, usize), E, D> = dev.tensor_from_vec(sn, (t, dz));
        // swap matrix: (x P)[2j] = x[2j+1], (x P)[2j+1] = x[2j]
        let mut p = vec![c::<E>(0.0); dz * dz];
        for j in 0..dz / 2 {
            p[(2 * j + 1) * dz + 2 * j] = c(1.0);
            p[(2 * j) * dz + 2 * j + 1] = c(1.0);
        }
        let p: Tensor<(usize, usize), E, D> = dev.tensor_from_vec(p, (dz, dz));
        let shape = (b, t, Const::<H>, dz);
        let swapped = x
            .retaped::<T>()
            .reshape_like(&(b * t, Const::<H>, dz))
            .matmul(p)
            .reshape_like(&shape);
        x * cs.broadcast_like::<_, Axes2<0, 2>>(&shape)
            + swapped * sn.broadcast_like::<_, Axes2<0, 2>>(&shape)
    }
}

/// Rotated keys and values of the current, unfinished chunk: `(B, c, H, dz)` and `(B, c, H, dv)`.
pub struct KvCache<const H: usize, E: Dtype, D: Device<E>> {
    pub k: Heads<H, E, D>,
    pub v: Heads<H, E, D>,
}

impl<const H: usize, E: Dtype, D: Device<E>> Clone for KvCache<H, E, D> {
    fn clone(&self) -> Self {
        Self {
            k: self.k.clone(),
            v: self.v.clone(),
        }
    }
}

impl<const H: usize, E: Dtype, D: Device<E>> KvCache<H, E, D> {
    /// Number of cached positions c.
    pub fn len(&self) -> usize {
        self.k.shape().1
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Zero-pads `x (B, L, H, d)` along time with `front` and `back` steps.
fn pad_time<const H: usize, E: Float, D: MegaDevice<E>, T: Tape<E, D>>(
    x: Heads<H, E, D, T>,
    front: usize,
    back: usize,
) -> Heads<H, E, D, T> {
    let (b, _, _, d) = *x.shape();
    let dev = x.device().clone();
    let mut x = x;
    if front > 0 {
        let z: Heads<H, E, D> = dev.zeros_like(&(b, front, Const, d));
        x = (z.retaped::<T>(), x).concat_along(Axis::<1>);
    }
    if back > 0 {
        let z: Heads<H, E, D> = dev.zeros_like(&(b, back, Const, d));
        x = (x, z.retaped::<T>()).concat_along(Axis::<1>);
    }
    x
}

/// Which keys a query may see inside its chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masking {
    /// Causal (the LM): query i sees keys j <= i of its own chunk.
    Causal,
    /// Bidirectional (classifiers): every real key of its own chunk.
    Full,
}

/// Block-diagonal chunked softmax attention (spec 5.1-5.3) continuing a stream whose current
/// chunk already holds `cache` (rotated keys and values of `c` earlier positions).
///
/// `q, k: (B, T, H, dz)` before RoPE, `v: (B, T, H, dv)`. Chunks are aligned to multiples of
/// `chunk` counted from the start of the stream; RoPE positions restart at every chunk. Any T
/// works: the last partial chunk is padded internally and masked. Cost is O((c + T) * chunk).
/// Returns `A (B, T, H, dv)` and the cache after the call (`None` when the chunk is complete).
#[allow(clippy::type_complexity)]
pub fn chunked_attention<const H: usize, E: Float, D: MegaDevice<E>, T: Tape<E, D>>(
    q: Heads<H, E, D, T>,
    k: Heads<H, E, D, T>,
    v: Heads<H, E, D, T>,
    cache: Option<&KvCache<H, E, D>>,
    chunk: usize,
    rope: &Rope,
    masking: Masking,
) -> Result<(Heads<H, E, D, T>, Option<KvCache<H, E, D>>)> {
    let (b, t, _, dz) = *q.shape();
    let dv = v.shape().3;
    ensure!(chunk > 0, "chunk_size must be > 0");
    ensure!(t > 0, "attention over an empty sequence");
    ensure!(
        k.shape() == q.shape() && v.shape().0 == b && v.shape().1 == t,
        "attention: q, k, v shapes disagree"
    );
    let cl = cache.map(|c| c.len()).unwrap_or(0);
    ensure!(
        cl < chunk,
        "KV cache holds {cl} positions, more than chunk_size - 1 = {}",
        chunk - 1
    );
    if let Some(cc) = cache {
        ensure!(
            cc.k.shape().0 == b,
            "KV cache batch {} differs from input batch {b}",
            cc.k.shape().0
        );
    }
    let positions: Vec<usize> = (cl..cl + t).map(|p| p % chunk).collect();
    let qr = rope.apply(q, &positions);
    let kr = rope.apply(k, &positions);
    let (k_all, v_all) = match cache {
        Some(cc) if cl > 0 => (
            (cc.k.retaped::<T>(), kr).concat_along(Axis::<1>),
            (cc.v.retaped::<T>(), v).concat_along(Axis::<1>),
        ),
        _ => (kr, v),
    };
    let l = cl + t;
    // cache after the call: the last (l mod chunk) keys/values
    let rem = l % chunk;
    let new_cache = if rem == 0 {
        None
    } else {
        let kk = k_all.retaped::<NoneTape>().slice((.., l - rem..l, .., ..));
        let vv = v_all.retaped::<NoneTape>().slice((.., l - rem..l, .., ..));
        Some(KvCache {
            k: kk.reshape_like(&(b, rem, Const::<H>, dz)),
            v: vv.reshape_like(&(b, rem, Const::<H>, dv)),
        })
    };

    if l <= chunk {
        // one (partial) chunk: only the T new queries are computed
        let mask = BlockMask {
            causal_offset: (masking == Masking::Causal).then_some(cl),
            valid_keys: None,
        };
        let qh = qr.permute::<_, Axes4<0, 2, 1, 3>>(); // (B, H, T, dz)
        let kh = k_all.permute::<_, Axes4<0, 2, 1, 3>>(); // (B, H, L, dz)
        let vh = v_all.permute::<_, Axes4<0, 2, 1, 3>>(); // (B, H, L, dv)
        let a = D::block_attention(qh, kh, vh, &mask)?.permute::<_, Axes4<0, 2, 1, 3>>(); // (B, T, H, dv)
        return Ok((a.reshape_like(&(b, t, Const::<H>, dv)), new_cache));
    }

    // general case: [cache | new | pad] cut into whole chunks; the c cached positions get zero
    // queries whose outputs are discarded
    let nc = l.div_ceil(chunk);
    let lp = nc * chunk;
    let q_all = pad_time(qr, cl, lp - l);
    let k_all = pad_time(k_all, 0, lp - l);
    let v_all = pad_time(v_all, 0, lp - l);
    let bn = b * nc;
    let valid_keys = (lp > l).then(|| {
        (0..bn)
            .map(|i| {
                if i % nc == nc - 1 {
                    l - (nc - 1) * chunk
                } else {
                    chunk
                }
            })
            .collect()
    });
    let mask = match masking {
        // causal masking already hides the padded keys from every real query
        Masking::Causal => BlockMask {
            causal_offset: Some(0),
            valid_keys: None,
        },
        Masking::Full => BlockMask {
            causal_offset: None,
            valid_keys,
        },
    };
    let q4 = q_all
        .reshape_like(&(bn, chunk, Const::<H>, dz))
        .permute::<_, Axes4<0, 2, 1, 3>>();
    let k4 = k_all
        .reshape_like(&(bn, chunk, Const::<H>, dz))
        .permute::<_, Axes4<0, 2, 1, 3>>();
    let v4 = v_all
        .reshape_like(&(bn, chunk, Const::<H>, dv))
        .permute::<_, Axes4<0, 2, 1, 3>>();
    let a = D::block_attention(q4, k4, v4, &mask)?; // (B*nc, H, C, dv)
    let a = a
        .permute::<_, Axes4<0, 2, 1, 3>>()
        .reshape_like(&(b, lp, Const::<H>, dv));
    let a = a
        .slice((.., cl..cl + t, .., ..))
        .reshape_like(&(b, t, Const::<H>, dv));
    Ok((a, new_cache))
}

/// Streaming state of one layer (official cache `((K, V, count), (n, mean, var), h)`).
pub struct LayerState<
    const M: usize,
    const H: usize,
    const N: usize,
    const G: usize,
    E: Dtype,
    D: Device<E>,
> {
    pub norm: NormState<G, E, D>,
    /// CEMA hidden state; `None` = zeros.
    pub cema: Option<CemaState<M, N, E, D>>,
    /// Keys/values of the current unfinished chunk; `None` = empty.
    pub kv: Option<KvCache<H, E, D>>,
}

impl<
        const M: usize,
        const H: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > LayerState<M, H, N, G, E, D>
{
    pub fn new(dev: &D, batch: usize) -> Self {
        Self {
            norm: NormState::empty(dev, batch),
            cema: None,
            kv: None,
        }
    }

    /// Bytes held by this state (constant in the number of tokens processed).
    pub fn bytes(&self) -> usize {
        let e = std::mem::size_of::<E>();
        let mut n = self.norm.count.len() * 8
            + (self.norm.mean.shape().num_elements() + self.norm.var.shape().num_elements()) * e;
        if let Some(s) = &self.cema {
            n += 2 * s.re.shape().num_elements() * e;
        }
        if let Some(kv) = &self.kv {
            n += (kv.k.shape().num_elements() + kv.v.shape().num_elements()) * e;
        }
        n
    }
}

/// The projections, shared Z, chunked attention and output gate of a Megalodon attention unit,
/// everything after the CEMA: `Y = X + MX Wh1^T + bh1 + (attn(Q, K, silu(Xn Wv^T)) * R) Wh2^T`
/// with `MX = RMSNorm(M)`. Shared by the causal unit and the bidirectional block; its parameter
/// names sit directly under the unit's prefix (`gamma`, `beta`, `rmsnorm`, `wv`, `wz`, `wr`,
/// `wh1`, `wh2`), as in the official state dict.
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
    fn queries_keys<T: Tape<E, D>>(
        &self,
        mx: Seq<M, E, D, T>,
        probe: &mut Option<&mut Probe>,
    ) -> (Heads<H, E, D, T>, Heads<H, E, D, T>) {
        let (b, t, _) = *mx.shape();
        let dz = Z / H;
        let dev = mx.device().clone();
        let zr = self.wz.forward(mx);
        Probe::put(probe, "Zr", &zr);
        let zn = rms_normalize(zr.reshape_like(&(b, t, Const::<H>, dz)), self.eps)
            .reshape_like(&(b, t, Const::<Z>));
        Probe::put(probe, "Zn", &zn);
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
        Probe::put(probe, "Q", &q);
        Probe::put(probe, "K", &k);
        (
            q.reshape_like(&(b, t, Const::<H>, dz)),
            k.reshape_like(&(b, t, Const::<H>, dz)),
        )
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
        masking: Masking,
        probe: &mut Option<&mut Probe>,
    ) -> Result<(Seq<M, E, D, T>, Option<KvCache<H, E, D>>)> {
        let (b, t, _) = *x.shape();
        let mx = self.rmsnorm.forward(m);
        Probe::put(probe, "MX", &mx);
        let (q, k) = self.queries_keys(mx.retaped::<T>(), probe);
        let vv = silu(self.wv.forward(xn));
        Probe::put(probe, "Vv", &vv);
        let r = silu(self.wr.forward(mx.retaped::<T>()));
        Probe::put(probe, "R", &r);
        let (a, kv) = chunked_attention(
            q,
            k,
            vv.reshape_like(&(b, t, Const::<H>, V / H)),
            cache,
            chunk,
            &self.rope,
            masking,
        )?;
        let a = a.reshape_like(&(b, t, Const::<V>));
        Probe::put(probe, "A", &a);
        let y = x + self.wh1.forward(mx) + self.wh2.forward(a * r);
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
        let (xn, norm1) = self.timenorm.try_forward(x.retaped::<T>(), norm0, None)?;
        Probe::put(&mut probe, "Xn", &xn);
        let (m, h1) = D::cema(&self.cema, xn.retaped::<T>(), h0, state.is_some())?;
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
