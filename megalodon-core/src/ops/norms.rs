//! The composed (dfdx-only) references of the per-position norms, both with the Megalodon `1 + w`
//! weight: RMSNorm and LayerNorm over the last axis. The CPU overrides them with the fused
//! kernels of [`super::norms_cpu`] (TimestepNorm's composed op is in [`super::timestep_norm`]).

use super::gates::rms_normalize;
use crate::util::{c, Float, Seq};
use dfdx::prelude::*;

/// `x / sqrt(mean(x^2) + eps) * (1 + w)` (no weight: just the normalisation).
pub fn composed_rms_norm<const K: usize, E: Float, D: Device<E>, T: Tape<E, D>>(
    x: Seq<K, E, D, T>,
    w: Option<&Tensor<Rank1<K>, E, D>>,
    eps: f64,
) -> Seq<K, E, D, T> {
    let s = *x.shape();
    let y = rms_normalize(x, eps);
    match w {
        Some(w) => y * (w.retaped::<T>() + c::<E>(1.0)).broadcast_like::<_, Axes2<0, 1>>(&s),
        None => y,
    }
}

/// `(x - mean) / sqrt(var + eps) * (1 + w) + b` over the last axis (population variance).
pub fn composed_layer_norm<const K: usize, E: Float, D: Device<E>, T: Tape<E, D>>(
    x: Seq<K, E, D, T>,
    w: &Tensor<Rank1<K>, E, D>,
    b: &Tensor<Rank1<K>, E, D>,
    eps: f64,
) -> Seq<K, E, D, T> {
    let s = *x.shape();
    let w = (w.retaped::<T>() + c::<E>(1.0)).broadcast_like::<_, Axes2<0, 1>>(&s);
    let b = b.retaped::<T>().broadcast_like::<_, Axes2<0, 1>>(&s);
    x.normalize::<Axis<2>>(eps) * w + b
}
