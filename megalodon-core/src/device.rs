//! Per-device implementations of the sequence-mixing ops.
//!
//! Every op has a *composed* implementation built only from dfdx tensor ops: it runs on every
//! device (`Cpu`, `Cuda`) and is the reference. A device may override an op with a faster or
//! leaner kernel (e.g. a fused CPU attention that keeps O(T) memory for backward); such kernels are
//! tested against the composed path through the same test body. All model code is generic over
//! `D: MegaDevice<E>`.

use crate::nn::cema::{CemaState, MultiHeadComplexEma};
use crate::nn::layers::Seq;
use crate::util::{c, Float};
use anyhow::{ensure, Result};
use dfdx::prelude::*;

/// `(Bn, H, L, d)`: per-block, per-head tensors.
pub type Blocks<const H: usize, E, D, T = NoneTape> =
    Tensor<(usize, Const<H>, usize, usize), E, D, T>;

/// Which keys each query of a block may see. Query `i` sees key `j` iff `j <= i + offset` (when
/// `causal_offset` is `Some(offset)`) and `j < valid_keys[bn]` (when given, per block `bn`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockMask {
    pub causal_offset: Option<usize>,
    pub valid_keys: Option<Vec<usize>>,
}

impl BlockMask {
    /// Whether query `i` of block `bn` may see key `j`.
    #[inline]
    pub fn allows(&self, bn: usize, i: usize, j: usize) -> bool {
        self.causal_offset.is_none_or(|o| j <= i + o)
            && self.valid_keys.as_ref().is_none_or(|v| j < v[bn])
    }
}

/// The device hooks of the Megalodon ops (defaults: the composed dfdx implementations).
pub trait MegaDevice<E: Float>: Device<E> + Sized {
    /// Causal CEMA, see [`MultiHeadComplexEma::try_forward`].
    #[allow(clippy::type_complexity)]
    fn cema<const M: usize, const N: usize, T: Tape<E, Self>>(
        ema: &MultiHeadComplexEma<M, N, E, Self>,
        u: Seq<M, E, Self, T>,
        h0: Option<CemaState<M, N, E, Self, T>>,
        want_state: bool,
    ) -> Result<(Seq<M, E, Self, T>, Option<CemaState<M, N, E, Self, T>>)> {
        ema.try_forward(u, h0, want_state)
    }

    /// Anti-causal CEMA, see [`MultiHeadComplexEma::try_forward_anticausal`].
    fn cema_anticausal<const M: usize, const N: usize, T: Tape<E, Self>>(
        ema: &MultiHeadComplexEma<M, N, E, Self>,
        u: Seq<M, E, Self, T>,
    ) -> Result<Seq<M, E, Self, T>> {
        ema.try_forward_anticausal(u)
    }

    /// Softmax attention inside independent blocks: `q (Bn, H, Lq, dz)`, `k (Bn, H, Lk, dz)`,
    /// `v (Bn, H, Lk, dv)` -> `(Bn, H, Lq, dv)`; no scaling (Megalodon folds it into Q and K).
    fn block_attention<const H: usize, T: Tape<E, Self>>(
        q: Blocks<H, E, Self, T>,
        k: Blocks<H, E, Self, T>,
        v: Blocks<H, E, Self, T>,
        mask: &BlockMask,
    ) -> Result<Blocks<H, E, Self, T>> {
        composed_block_attention(q, k, v, mask)
    }
}

macro_rules! cpu_mega_device {
    ($e:ty) => {
        impl MegaDevice<$e> for Cpu {
            #[allow(clippy::type_complexity)]
            fn cema<const M: usize, const N: usize, T: Tape<$e, Self>>(
                ema: &MultiHeadComplexEma<M, N, $e, Self>,
                u: Seq<M, $e, Self, T>,
                h0: Option<CemaState<M, N, $e, Self, T>>,
                want_state: bool,
            ) -> Result<(Seq<M, $e, Self, T>, Option<CemaState<M, N, $e, Self, T>>)> {
                crate::ops::cema_cpu::cema(ema, u, h0, want_state)
            }

            fn cema_anticausal<const M: usize, const N: usize, T: Tape<$e, Self>>(ema: &MultiHeadComplexEma<M, N, $e, Self>, u: Seq<M, $e, Self, T>) -> Result<Seq<M, $e, Self, T>> {
                crate::ops::cema_cpu::cema_anticausal(ema, u)
            }

            fn block_attention<const H: usize, T: Tape<$e, Self>>(q: Blocks<H, $e, Self, T>, k: Blocks<H, $e, Self, T>, v: Blocks<H, $e, Self, T>, mask: &BlockMask) -> Result<Blocks<H, $e, Self, T>> {
                crate::ops::attention_cpu::block_attention(q, k, v, mask)
            }
        }
    };
}
cpu_mega_device!(f32);
cpu_mega_device!(f64);

#[cfg(feature = "cuda")]
impl MegaDevice<f32> for Cuda {}
#[cfg(feature = "cuda")]
impl MegaDevice<f64> for Cuda {}

/// The reference block attention from dfdx ops (scores, additive -inf mask, softmax, values).
/// Memory: a few `(Bn, H, Lq, Lk)` tensors are kept for backward.
pub fn composed_block_attention<const H: usize, E: Float, D: Device<E>, T: Tape<E, D>>(
    q: Blocks<H, E, D, T>,
    k: Blocks<H, E, D, T>,
    v: Blocks<H, E, D, T>,
    mask: &BlockMask,
) -> Result<Blocks<H, E, D, T>> {
    let (bn, _, lq, _) = *q.shape();
    let lk = k.shape().2;
    ensure!(
        k.shape().0 == bn && v.shape().0 == bn && v.shape().2 == lk,
        "block attention: q/k/v shapes disagree"
    );
    if let Some(vk) = &mask.valid_keys {
        ensure!(
            vk.len() == bn,
            "block attention: {} valid-key counts for {bn} blocks",
            vk.len()
        );
    }
    let dev = q.device().clone();
    let s = q.matmul(k.permute::<_, Axes4<0, 1, 3, 2>>()); // (Bn, H, Lq, Lk)
    let shape = *s.shape();
    let ninf = <E as num_traits::Float>::neg_infinity();
    let s = match (&mask.valid_keys, mask.causal_offset) {
        (None, None) => s,
        (None, Some(_)) => {
            let m: Vec<E> = (0..lq)
                .flat_map(|i| (0..lk).map(move |j| (i, j)))
                .map(|(i, j)| if mask.allows(0, i, j) { c(0.0) } else { ninf })
                .collect();
            let m: Tensor<(usize, usize), E, D> = dev.tensor_from_vec(m, (lq, lk));
            s + m.broadcast_like::<_, Axes2<0, 1>>(&shape)
        }
        (Some(_), _) => {
            let mut m = Vec::with_capacity(bn * lq * lk);
            for b in 0..bn {
                for i in 0..lq {
                    for j in 0..lk {
                        m.push(if mask.allows(b, i, j) { c(0.0) } else { ninf });
                    }
                }
            }
            let m: Tensor<(usize, usize, usize), E, D> = dev.tensor_from_vec(m, (bn, lq, lk));
            s + m.broadcast_like::<_, Axis<1>>(&shape)
        }
    };
    Ok(s.softmax::<Axis<3>>().matmul(v))
}
