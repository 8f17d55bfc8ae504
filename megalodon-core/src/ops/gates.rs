//! The composed (dfdx-only) references of the per-position ops around the sequence mixers: the
//! linear layer, SiLU, the SiLU gate and the per-head normalised Q/K affine. Every device runs
//! these unless it overrides them in [`crate::device::MegaDevice`] (the CPU does, with the fused
//! kernels of [`super::gates_cpu`], tested against these through one test body).

use crate::ops::consts;
use crate::util::{c, Float, Seq};
use dfdx::prelude::*;

/// `x (B, T, I) W^T + b` with `W (O, I)` (PyTorch layout).
pub fn composed_linear<const I: usize, const O: usize, E: Float, D: Device<E>, T: Tape<E, D>>(
    x: Seq<I, E, D, T>,
    w: &Tensor<Rank2<O, I>, E, D>,
    b: Option<&Tensor<Rank1<O>, E, D>>,
) -> Seq<O, E, D, T> {
    let y = x.matmul(w.retaped::<T>().permute::<Rank2<I, O>, _>());
    match b {
        Some(b) => {
            let s = *y.shape();
            y + b.retaped::<T>().broadcast_like::<_, Axes2<0, 1>>(&s)
        }
        None => y,
    }
}

/// `x W^T + b + r`: the linear layer plus a residual.
pub fn composed_linear_add<
    const I: usize,
    const O: usize,
    E: Float,
    D: Device<E>,
    T: Tape<E, D>,
>(
    x: Seq<I, E, D, T>,
    w: &Tensor<Rank2<O, I>, E, D>,
    b: Option<&Tensor<Rank1<O>, E, D>>,
    r: Seq<O, E, D, T>,
) -> Seq<O, E, D, T> {
    r + composed_linear(x, w, b)
}

/// `silu(x) = x * sigmoid(x)`.
pub fn composed_silu<S: Shape, E: Float, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> Tensor<S, E, D, T> {
    let s = x.retaped::<T>().sigmoid();
    x * s
}

/// The gate `a * silu(g)`.
pub fn composed_silu_gate<S: Shape, E: Float, D: Device<E>, T: Tape<E, D>>(
    g: Tensor<S, E, D, T>,
    a: Tensor<S, E, D, T>,
) -> Tensor<S, E, D, T> {
    a * composed_silu(g)
}

/// Root-mean-square normalisation over the last axis without weight: `x / sqrt(mean(x^2) + eps)`.
pub fn rms_normalize<S, E, D, T>(x: Tensor<S, E, D, T>, eps: f64) -> Tensor<S, E, D, T>
where
    S: Shape + ReduceShape<S::LastAxis>,
    E: Float,
    D: Device<E>,
    T: Tape<E, D>,
{
    let shape = *x.shape();
    let ms = x.retaped::<T>().square().mean::<_, S::LastAxis>();
    let r = (ms + c::<E>(eps)).sqrt().recip();
    x * r.broadcast_like(&shape)
}

/// Queries and keys from the shared `Z (B, T, Zw)`: RMS-normalised per head (`H` heads of width
/// `dz = Zw / H`), then `q = zn (1 + gamma_0) / sqrt(dz) + beta_0`, `k` likewise with row 1.
#[allow(clippy::type_complexity)]
pub fn composed_qk_norm<const ZW: usize, const H: usize, E: Float, D: Device<E>, T: Tape<E, D>>(
    z: Seq<ZW, E, D, T>,
    gamma: &Tensor<Rank2<2, ZW>, E, D>,
    beta: &Tensor<Rank2<2, ZW>, E, D>,
    eps: f64,
) -> (Seq<ZW, E, D, T>, Seq<ZW, E, D, T>) {
    let (b, t, _) = *z.shape();
    let dz = ZW / H;
    let dev = z.device().clone();
    let zn = rms_normalize(z.reshape_like(&(b, t, Const::<H>, dz)), eps).reshape_like(&(
        b,
        t,
        Const::<ZW>,
    ));
    let shape = (b, t, Const::<ZW>);
    let scale = c::<E>(1.0 / (dz as f64).sqrt());
    let row = |p: &Tensor<Rank2<2, ZW>, E, D>, i: usize| {
        p.retaped::<T>()
            .select(consts::indices::<_, E, _>(
                &dev,
                "gates.row",
                &[i as u64],
                (),
                || vec![i],
            ))
            .broadcast_like::<_, Axes2<0, 1>>(&shape)
    };
    let q = zn.retaped::<T>() * ((row(gamma, 0) + c::<E>(1.0)) * scale) + row(beta, 0);
    let k = zn * ((row(gamma, 1) + c::<E>(1.0)) * scale) + row(beta, 1);
    (q, k)
}
