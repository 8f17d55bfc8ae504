//! Linear-cost cumulative sums along time, built from dfdx ops only (so they run on every
//! device). dfdx 0.13 has no cumsum; a sum over `T` positions is done hierarchically: within
//! blocks of `BLOCK` positions by a matmul with a `BLOCK x BLOCK` triangular matrix, across
//! blocks by recursing on the block totals. Cost O(T * BLOCK), memory O(T), depth log_BLOCK T.

use crate::util::{c, Float};
use dfdx::prelude::*;

/// Block length of the in-block triangular matmul.
pub const BLOCK: usize = 32;

/// Inclusive cumulative sum along the last axis of a `(rows, T)` tensor.
pub fn cumsum_last<E: Float, D: Device<E>, T: Tape<E, D> + Merge<NoneTape>>(
    x: Tensor<(usize, usize), E, D, T>,
) -> Tensor<(usize, usize), E, D, T> {
    let (rows, t) = *x.shape();
    let dev = x.device().clone();
    if t <= BLOCK {
        // (rows, t) x (t, t) upper-triangular ones: y[r, j] = sum_{s <= j} x[r, s]
        let tri: Tensor<(usize, usize), E, D> = dev.upper_tri_like(&(t, t), c::<E>(1.0), None);
        return x.matmul(tri);
    }
    let nb = t.div_ceil(BLOCK);
    let tp = nb * BLOCK;
    // zero-pad at the end (does not change any earlier cumulative sum)
    let xp = if tp > t {
        let z: Tensor<(usize, usize), E, D> = dev.zeros_like(&(rows, tp - t));
        (x, z).concat_along(Axis::<1>)
    } else {
        x
    };
    let xb = xp.reshape_like(&(rows * nb, BLOCK));
    let totals = xb
        .retaped::<T>()
        .sum::<(usize,), Axis<1>>()
        .reshape_like(&(rows, nb));
    let tri: Tensor<(usize, usize), E, D> = dev.upper_tri_like(&(BLOCK, BLOCK), c::<E>(1.0), None);
    let local = xb.matmul(tri).reshape_like(&(rows, nb, BLOCK));
    // exclusive prefix of the block totals = inclusive prefix - own total
    let incl = cumsum_last(totals.retaped::<T>());
    let excl = incl - totals;
    let y = local + excl.broadcast_like::<_, Axis<2>>(&(rows, nb, BLOCK));
    let y = y.reshape_like(&(rows, tp));
    if tp > t {
        // slicing a fresh tensor with a single consumer (dfdx CPU slice backward overwrites)
        y.slice((.., ..t)).reshape_like(&(rows, t))
    } else {
        y
    }
}

/// Inclusive cumulative sum along the time axis of a `(B, T, K)` tensor.
pub fn cumsum_time<K: Dim, E: Float, D: Device<E>, T: Tape<E, D> + Merge<NoneTape>>(
    x: Tensor<(usize, usize, K), E, D, T>,
) -> Tensor<(usize, usize, K), E, D, T> {
    let (b, t, k) = *x.shape();
    let rows = x
        .permute::<_, Axes3<0, 2, 1>>()
        .reshape_like(&(b * k.size(), t));
    cumsum_last(rows)
        .reshape_like(&(b, k, t))
        .permute::<_, Axes3<0, 2, 1>>()
        .reshape_like(&(b, t, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumsum_matches_sequential_for_many_lengths() {
        let dev: Cpu = Default::default();
        for t in [1usize, 5, 32, 33, 100, 1100, 1025] {
            let data: Vec<f64> = (0..3 * t).map(|i| ((i * 37 % 11) as f64) - 5.0).collect();
            let x = dev.tensor_from_vec(data.clone(), (3usize, t));
            let y = cumsum_last(x).as_vec();
            for r in 0..3 {
                let mut acc = 0.0;
                for j in 0..t {
                    acc += data[r * t + j];
                    assert!((y[r * t + j] - acc).abs() < 1e-9, "t={t} r={r} j={j}");
                }
            }
        }
    }

    #[test]
    fn cumsum_gradient_is_reverse_cumsum() {
        let dev: Cpu = Default::default();
        let t = 70;
        let x: Tensor<(usize, usize), f64, _> = dev.tensor_from_vec(vec![0.5; 2 * t], (2usize, t));
        let w: Vec<f64> = (0..2 * t).map(|i| (i % 7) as f64).collect();
        let wt = dev.tensor_from_vec(w.clone(), (2usize, t));
        let g = (cumsum_last(x.leaky_trace()) * wt).sum().backward();
        let gx = g.get(&x).as_vec();
        for r in 0..2 {
            for j in 0..t {
                let expect: f64 = (j..t).map(|s| w[r * t + s]).sum();
                assert!((gx[r * t + j] - expect).abs() < 1e-9);
            }
        }
    }
}
