//! Block attention's shared types and its composed reference: softmax attention inside
//! independent blocks, built from dfdx ops (runs on every device). The fused CPU kernel
//! (`attention_cpu`) is tested against it through the same test body.

use crate::ops::consts;
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
        (None, Some(off)) => {
            // a constant of (lq, lk, offset), built once
            let m: Tensor<(usize, usize), E, D> =
                consts::tensor(&dev, "attention.causal", &[off as u64], (lq, lk), || {
                    (0..lq)
                        .flat_map(|i| (0..lk).map(move |j| (i, j)))
                        .map(|(i, j)| if mask.allows(0, i, j) { c(0.0) } else { ninf })
                        .collect()
                });
            s + m.broadcast_like::<_, Axes2<0, 1>>(&shape)
        }
        // padding: the mask is data, copied per call
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
