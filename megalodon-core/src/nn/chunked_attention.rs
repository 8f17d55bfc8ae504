//! Block-diagonal chunked softmax attention (`docs/design.md`, "Chunked attention and RoPE"):
//! causal for the language model, full (with per-row key lengths) for the bidirectional encoder.

use super::rope::Rope;
use super::state::KvCache;
use crate::device::{BlockMask, MegaDevice};
use crate::profile::{self, OpClass};
use crate::util::Float;
use anyhow::{ensure, Result};
use dfdx::prelude::*;

pub use crate::util::Heads;

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

/// `(B, L, H, d) -> (B, H, L, d)`: a permute, or with one head a reshape (the same memory
/// order, so no copy; dfdx would copy the permuted view, whose size-1 axis has another stride).
fn heads_first<const H: usize, E: Float, D: MegaDevice<E>, T: Tape<E, D>>(
    x: Heads<H, E, D, T>,
) -> Tensor<(usize, Const<H>, usize, usize), E, D, T> {
    if H == 1 {
        let (b, l, _, d) = *x.shape();
        x.reshape_like(&(b, Const::<H>, l, d))
    } else {
        x.permute::<_, Axes4<0, 2, 1, 3>>()
    }
}

/// `(B, H, L, d) -> (B, L, H, d)`, the inverse of [`heads_first`].
fn time_first<const H: usize, E: Float, D: MegaDevice<E>, T: Tape<E, D>>(
    x: Tensor<(usize, Const<H>, usize, usize), E, D, T>,
) -> Heads<H, E, D, T> {
    if H == 1 {
        let (b, _, l, d) = *x.shape();
        x.reshape_like(&(b, l, Const::<H>, d))
    } else {
        x.permute::<_, Axes4<0, 2, 1, 3>>()
    }
}

/// Which keys a query may see inside its chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masking<'a> {
    /// Causal (the LM): query i sees keys j <= i of its own chunk.
    Causal,
    /// Bidirectional (classifiers): every real key of its own chunk. With `Some(lengths)` (one
    /// per batch row), row `r` has `lengths[r]` real steps followed by padding: no query sees a
    /// padded key. Queries at padded steps see key 0 of their chunk when it holds no real key
    /// (their outputs are finite and meaningless; the encoder zeroes them).
    Full(Option<&'a [usize]>),
}

/// Real keys of block `ci` (chunk index within its row) of a row with `len` real steps, when the
/// stream holds `l` steps cut in chunks of `chunk`; at least 1 so that no softmax row is empty.
fn block_keys(len: usize, l: usize, ci: usize, chunk: usize) -> usize {
    let start = ci * chunk;
    len.min(l).saturating_sub(start).clamp(1, chunk)
}

/// Block-diagonal chunked softmax attention (`docs/design.md` §5) continuing a stream whose current
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
    masking: Masking<'_>,
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
    let lengths = match masking {
        Masking::Full(Some(lens)) => {
            ensure!(
                lens.len() == b,
                "attention: {} row lengths for a batch of {b}",
                lens.len()
            );
            ensure!(
                cl == 0,
                "attention: row lengths (padding) cannot continue a stream with a KV cache"
            );
            if let Some((r, &n)) = lens.iter().enumerate().find(|(_, &n)| n == 0 || n > t) {
                anyhow::bail!("attention: row {r} has length {n}, expected 1..={t}");
            }
            Some(lens)
        }
        _ => None,
    };
    let positions: Vec<usize> = (cl..cl + t).map(|p| p % chunk).collect();
    let q = profile::enter(OpClass::Elementwise, q);
    let qr = D::rope(rope, q, &positions)?;
    let kr = profile::leave(OpClass::Elementwise, D::rope(rope, k, &positions)?);
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
            valid_keys: lengths.map(|lens| lens.iter().map(|&n| n.min(l)).collect()),
        };
        let qh = heads_first(qr); // (B, H, T, dz)
        let kh = heads_first(k_all); // (B, H, L, dz)
        let vh = heads_first(v_all); // (B, H, L, dv)
        let qh = profile::enter(OpClass::Attention, qh);
        let a = D::block_attention(qh, kh, vh, &mask)?;
        let a = time_first(profile::leave(OpClass::Attention, a)); // (B, T, H, dv)
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
    let valid_keys: Option<Vec<usize>> = (lp > l || lengths.is_some()).then(|| {
        (0..bn)
            .map(|i| {
                let len = lengths.map_or(l, |lens| lens[i / nc]);
                block_keys(len, l, i % nc, chunk)
            })
            .collect()
    });
    let mask = match masking {
        // causal masking already hides the padded keys from every real query
        Masking::Causal => BlockMask {
            causal_offset: Some(0),
            valid_keys: None,
        },
        Masking::Full(_) => BlockMask {
            causal_offset: None,
            valid_keys,
        },
    };
    let q4 = heads_first(q_all.reshape_like(&(bn, chunk, Const::<H>, dz)));
    let k4 = heads_first(k_all.reshape_like(&(bn, chunk, Const::<H>, dz)));
    let v4 = heads_first(v_all.reshape_like(&(bn, chunk, Const::<H>, dv)));
    let q4 = profile::enter(OpClass::Attention, q4);
    let a = D::block_attention(q4, k4, v4, &mask)?; // (B*nc, H, C, dv)
    let a = profile::leave(OpClass::Attention, a);
    let a = time_first(a).reshape_like(&(b, lp, Const::<H>, dv));
    if cl == 0 && lp == t {
        // whole chunks from the start of the stream: every row is an output
        return Ok((a, new_cache));
    }
    let a = a
        .slice((.., cl..cl + t, .., ..))
        .reshape_like(&(b, t, Const::<H>, dv));
    Ok((a, new_cache))
}
