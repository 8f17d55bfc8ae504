//! Vectorised exponentials for the CPU kernels, and the run-time AVX2 dispatch they share with
//! the streaming engine (`docs/design.md` §15).
//!
//! `f32::exp` is a call into libm per element, which dominated the SiLU gates and the softmax
//! once everything around them was fused. Here `exp` is written branch-free on plain `f32`
//! arithmetic (range reduction `x = n ln2 + r`, a degree-6 polynomial for `e^r`, `2^n` put into the
//! exponent bits: Cephes' `expf`, within 2 ulp of the correctly rounded result on its range) so
//! that the compiler vectorises whole slices, compiled for AVX2 + FMA when the CPU has them. Inputs
//! are clamped to `[-87.3, 88.7]` (results stay normal and finite there; above it the true value
//! overflows f32 anyway, below it the result is exactly 0, so `e^-inf = 0`), and NaN stays NaN. Only `f32` takes this path: `f64`
//! (the gradient checks) keeps the exact `exp`.

use crate::util::Float;
use std::any::TypeId;

/// Defines `fn $name(args)` that runs `$generic(args)` compiled for AVX-512 when the CPU has it,
/// else for AVX2 + FMA when it has those (detected at run time), and as plain code otherwise.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) => $generic:ident) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    $generic($($arg),*)
                }
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512bw")
                {
                    // SAFETY: the CPU has these AVX-512 subsets (checked just above), which
                    // imply AVX2 and FMA.
                    unsafe { avx512($($arg),*) };
                    return;
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $generic($($arg),*)
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    unsafe { avx2($($arg),*) };
                    return;
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// `e^x` for one lane (see the module docs); inlined into the slice loops below.
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x0 = x;
    // NaN becomes 0 here (and NaN again at the end), so that `n` below is always finite
    let x = if x0.is_nan() {
        0.0
    } else {
        x0.clamp(-87.3, 88.7)
    };
    let n = (x * LOG2E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    // n is in [-126, 128] here; 2^n built in two halves so that n = 128 does not overflow the
    // exponent field before the multiplication
    // SAFETY: n is a whole number in [-126, 128] (x is finite and clamped above). The unchecked
    // conversion vectorises; `as i32` saturates and is done lane by lane.
    let n: i32 = unsafe { n.to_int_unchecked() };
    let h = n >> 1;
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - h + 127) as u32) << 23);
    // below the range the true value is (almost) zero: exactly zero, so that a masked score of
    // -inf gets no weight at all
    let v = if x0 < -87.3 { 0.0 } else { e * s1 * s2 };
    // keep NaN a NaN whatever the arithmetic above made of it
    if x0.is_nan() {
        x0
    } else {
        v
    }
}

fn exp_generic(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = exp_lane(*v);
    }
}

fn sigmoid_generic(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = 1.0 / (1.0 + exp_lane(-v));
    }
}

simd_dispatch! {
    /// `x <- e^x` element by element.
    fn exp_f32(x: &mut [f32]) => exp_generic
}

simd_dispatch! {
    /// `out = 1 / (1 + e^-x)` element by element.
    fn sigmoid_f32(x: &[f32], out: &mut [f32]) => sigmoid_generic
}

fn as_f32<E: Float>(x: &[E]) -> Option<&[f32]> {
    // SAFETY: E is f32 (checked), so the memory is a valid [f32] of the same length.
    (TypeId::of::<E>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
}

fn as_f32_mut<E: Float>(x: &mut [E]) -> Option<&mut [f32]> {
    // SAFETY: as in `as_f32`; the borrow is moved into the returned slice.
    (TypeId::of::<E>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<f32>(), x.len()) })
}

/// `x <- e^x` (vectorised for f32, exact `exp` otherwise).
pub fn exp_in_place<E: Float>(x: &mut [E]) {
    match as_f32_mut(x) {
        Some(xf) => exp_f32(xf),
        None => x.iter_mut().for_each(|v| *v = v.exp()),
    }
}

/// `out = sigmoid(x)` (vectorised for f32, exact otherwise).
pub fn sigmoid<E: Float>(x: &[E], out: &mut [E]) {
    assert_eq!(x.len(), out.len(), "sigmoid: slice lengths differ");
    if let Some(xf) = as_f32(x) {
        if let Some(of) = as_f32_mut(out) {
            return sigmoid_f32(xf, of);
        }
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = E::one() / (E::one() + (-v).exp());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised exp and sigmoid against the exact ones over the whole range, at the ends,
    /// at +-inf and NaN.
    #[test]
    fn fast_exp_and_sigmoid_match_the_exact_ones() {
        let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0437).collect();
        xs.extend([-87.3, 88.7, 0.0, -0.0, 1e-30, -1e-30, 20.5, -20.5]);
        let mut e = xs.clone();
        exp_in_place(&mut e);
        for (&x, &v) in xs.iter().zip(&e) {
            if x < -87.3 {
                // the true value is below f32's smallest normal number
                assert_eq!(v, 0.0, "exp({x})");
                continue;
            }
            let want = (x as f64).exp();
            let rel = (v as f64 - want).abs() / want;
            assert!(rel <= 3e-7, "exp({x}) = {v}, want {want} (rel {rel:e})");
        }
        let mut s = vec![0f32; xs.len()];
        sigmoid(&xs, &mut s);
        for (&x, &v) in xs.iter().zip(&s) {
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!(
                (v as f64 - want).abs() <= 3e-7 * want.max(1e-30) + 1e-38,
                "sigmoid({x}) = {v}, want {want}"
            );
        }
        let mut special = [f32::NEG_INFINITY, -1000.0, f32::INFINITY, f32::NAN];
        exp_in_place(&mut special);
        assert_eq!(special[0], 0.0);
        assert_eq!(special[1], 0.0);
        assert!(special[2].is_finite() && special[2] > 1e38);
        assert!(special[3].is_nan());
    }
}
