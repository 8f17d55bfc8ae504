//! Small helpers shared by the modules.

use dfdx::prelude::*;

/// A `(B, T, K)` tensor with a compile-time feature width.
pub type Seq<const K: usize, E, D, T = NoneTape> = Tensor<(usize, usize, Const<K>), E, D, T>;

/// `(B, T, H, d)`: per-head tensors with a run-time head width.
pub type Heads<const H: usize, E, D, T = NoneTape> =
    Tensor<(usize, usize, Const<H>, usize), E, D, T>;

/// The float dtypes the model runs in (f32 for use, f64 for gradient checks).
pub trait Float: Dtype + num_traits::Float + std::fmt::Debug {}
impl Float for f32 {}
impl Float for f64 {}

/// Converts an f64 constant to the model dtype.
#[inline]
pub fn c<E: Dtype>(x: f64) -> E {
    // Every Dtype implements FromPrimitive for f64 (f32/f64 always succeed).
    E::from_f64(x).expect("f64 constant representable in the model dtype")
}

/// A tensor's values as f64 on the host.
pub fn to_f64<S: Shape, E: Dtype, D: Device<E>, T>(t: &Tensor<S, E, D, T>) -> Vec<f64> {
    t.as_vec()
        .into_iter()
        .map(|x| x.to_f64().unwrap_or(f64::NAN))
        .collect()
}

/// Steps `lo..hi` of a row-major `(B, T, W)` buffer, as a row-major `(B, hi - lo, W)` buffer.
pub fn time_slice<X: Copy>(v: &[X], b: usize, t: usize, w: usize, lo: usize, hi: usize) -> Vec<X> {
    assert!(
        lo <= hi && hi <= t && v.len() == b * t * w,
        "time_slice: steps {lo}..{hi} of a ({b}, {t}, {w}) buffer of {} values",
        v.len()
    );
    (0..b)
        .flat_map(|bi| v[(bi * t + lo) * w..(bi * t + hi) * w].iter().copied())
        .collect()
}
