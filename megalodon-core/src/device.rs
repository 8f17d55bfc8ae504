//! Per-device implementations of the sequence-mixing ops.
//!
//! Every op has a *composed* implementation built only from dfdx tensor ops: it runs on every
//! device (`Cpu`, `Cuda`) and is the reference. A device may override an op with a faster or
//! leaner kernel (e.g. a fused CPU attention that keeps O(T) memory for backward); such kernels are
//! tested against the composed path through the same test body. All model code is generic over
//! `D: MegaDevice<E>`.

pub use crate::ops::block_attention::{composed_block_attention, BlockMask, Blocks};
use crate::ops::cema::{CemaState, MultiHeadComplexEma};
use crate::ops::gates::{
    composed_linear, composed_linear_add, composed_qk_norm, composed_silu, composed_silu_gate,
};
use crate::ops::norms::{composed_layer_norm, composed_rms_norm};
use crate::ops::rope::Rope;
use crate::ops::timestep_norm::{composed_timestep_norm, NormState};
use crate::util::{Float, Heads, Seq};
use anyhow::Result;
use dfdx::prelude::*;

/// The device hooks of the Megalodon ops (defaults: the composed dfdx implementations).
pub trait MegaDevice<E: Float>: Device<E> + Cache + Sized {
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

    /// `x (B, T, I) W^T + b`, `W (O, I)`, see [`composed_linear`].
    fn linear<const I: usize, const O: usize, T: Tape<E, Self>>(
        x: Seq<I, E, Self, T>,
        w: &Tensor<Rank2<O, I>, E, Self>,
        b: Option<&Tensor<Rank1<O>, E, Self>>,
    ) -> Result<Seq<O, E, Self, T>> {
        Ok(composed_linear(x, w, b))
    }

    /// `x W^T + b + r` (the linear layer plus a residual), see [`composed_linear_add`].
    fn linear_add<const I: usize, const O: usize, T: Tape<E, Self>>(
        x: Seq<I, E, Self, T>,
        w: &Tensor<Rank2<O, I>, E, Self>,
        b: Option<&Tensor<Rank1<O>, E, Self>>,
        r: Seq<O, E, Self, T>,
    ) -> Result<Seq<O, E, Self, T>> {
        Ok(composed_linear_add(x, w, b, r))
    }

    /// `x sigmoid(x)`.
    fn silu<S: Shape, T: Tape<E, Self>>(x: Tensor<S, E, Self, T>) -> Result<Tensor<S, E, Self, T>> {
        Ok(composed_silu(x))
    }

    /// The gate `a * silu(g)`.
    fn silu_gate<S: Shape, T: Tape<E, Self>>(
        g: Tensor<S, E, Self, T>,
        a: Tensor<S, E, Self, T>,
    ) -> Result<Tensor<S, E, Self, T>> {
        Ok(composed_silu_gate(g, a))
    }

    /// Queries and keys from the shared Z, see [`composed_qk_norm`].
    #[allow(clippy::type_complexity)]
    fn qk_norm<const ZW: usize, const H: usize, T: Tape<E, Self>>(
        z: Seq<ZW, E, Self, T>,
        gamma: &Tensor<Rank2<2, ZW>, E, Self>,
        beta: &Tensor<Rank2<2, ZW>, E, Self>,
        eps: f64,
    ) -> Result<(Seq<ZW, E, Self, T>, Seq<ZW, E, Self, T>)> {
        Ok(composed_qk_norm::<ZW, H, E, Self, T>(z, gamma, beta, eps))
    }

    /// Chunk-restarting RoPE of `x (B, T, H, dz)` at within-chunk `positions`, see [`Rope::apply`].
    fn rope<const H: usize, T: Tape<E, Self>>(
        rope: &Rope,
        x: Heads<H, E, Self, T>,
        positions: &[usize],
    ) -> Result<Heads<H, E, Self, T>> {
        Ok(rope.apply(x, positions))
    }

    /// RMSNorm over the last axis (weight `1 + w` when given), see [`composed_rms_norm`].
    fn rms_norm<const K: usize, T: Tape<E, Self>>(
        x: Seq<K, E, Self, T>,
        w: Option<&Tensor<Rank1<K>, E, Self>>,
        eps: f64,
    ) -> Result<Seq<K, E, Self, T>> {
        Ok(composed_rms_norm(x, w, eps))
    }

    /// LayerNorm over the last axis (weight `1 + w`, bias), see [`composed_layer_norm`].
    fn layer_norm<const K: usize, T: Tape<E, Self>>(
        x: Seq<K, E, Self, T>,
        w: &Tensor<Rank1<K>, E, Self>,
        b: &Tensor<Rank1<K>, E, Self>,
        eps: f64,
    ) -> Result<Seq<K, E, Self, T>> {
        Ok(composed_layer_norm(x, w, b, eps))
    }

    /// TimestepNorm with carried state and optional padding, see [`composed_timestep_norm`].
    #[allow(clippy::type_complexity)]
    fn timestep_norm<const M: usize, const G: usize, T: Tape<E, Self> + Merge<NoneTape>>(
        x: Seq<M, E, Self, T>,
        weight: &Tensor<Rank1<M>, E, Self>,
        bias: &Tensor<Rank1<M>, E, Self>,
        eps: f64,
        state: Option<NormState<G, E, Self, T>>,
        pad: Option<&[bool]>,
    ) -> Result<(Seq<M, E, Self, T>, NormState<G, E, Self, T>)> {
        composed_timestep_norm(x, weight, bias, eps, state, pad)
    }

    /// Called by the training loop after each step, once that step's gradients are dropped:
    /// housekeeping of the device's kernels (default: nothing). On `Cpu` it takes out of dfdx's
    /// allocation cache the empty entries left by the gradient buffers the kernels released
    /// early, which would otherwise pile up by a few hundred bytes a step.
    fn end_step(&self) {}
}

#[cfg_attr(feature = "composed-ops", allow(unused_macros))]
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

            fn linear<const I: usize, const O: usize, T: Tape<$e, Self>>(x: Seq<I, $e, Self, T>, w: &Tensor<Rank2<O, I>, $e, Self>, b: Option<&Tensor<Rank1<O>, $e, Self>>) -> Result<Seq<O, $e, Self, T>> {
                crate::ops::gates_cpu::linear(x, w, b)
            }

            fn linear_add<const I: usize, const O: usize, T: Tape<$e, Self>>(x: Seq<I, $e, Self, T>, w: &Tensor<Rank2<O, I>, $e, Self>, b: Option<&Tensor<Rank1<O>, $e, Self>>, r: Seq<O, $e, Self, T>) -> Result<Seq<O, $e, Self, T>> {
                crate::ops::gates_cpu::linear_add(x, w, b, r)
            }

            fn silu<S: Shape, T: Tape<$e, Self>>(x: Tensor<S, $e, Self, T>) -> Result<Tensor<S, $e, Self, T>> {
                crate::ops::gates_cpu::silu(x)
            }

            fn silu_gate<S: Shape, T: Tape<$e, Self>>(g: Tensor<S, $e, Self, T>, a: Tensor<S, $e, Self, T>) -> Result<Tensor<S, $e, Self, T>> {
                crate::ops::gates_cpu::silu_gate(g, a)
            }

            #[allow(clippy::type_complexity)]
            fn qk_norm<const ZW: usize, const H: usize, T: Tape<$e, Self>>(z: Seq<ZW, $e, Self, T>, gamma: &Tensor<Rank2<2, ZW>, $e, Self>, beta: &Tensor<Rank2<2, ZW>, $e, Self>, eps: f64) -> Result<(Seq<ZW, $e, Self, T>, Seq<ZW, $e, Self, T>)> {
                crate::ops::gates_cpu::qk_norm::<ZW, H, $e, T>(z, gamma, beta, eps)
            }

            fn rope<const H: usize, T: Tape<$e, Self>>(rope: &Rope, x: Heads<H, $e, Self, T>, positions: &[usize]) -> Result<Heads<H, $e, Self, T>> {
                crate::ops::gates_cpu::rope(rope, x, positions)
            }

            fn rms_norm<const K: usize, T: Tape<$e, Self>>(x: Seq<K, $e, Self, T>, w: Option<&Tensor<Rank1<K>, $e, Self>>, eps: f64) -> Result<Seq<K, $e, Self, T>> {
                crate::ops::norms_cpu::rms_norm(x, w, eps)
            }

            fn layer_norm<const K: usize, T: Tape<$e, Self>>(x: Seq<K, $e, Self, T>, w: &Tensor<Rank1<K>, $e, Self>, b: &Tensor<Rank1<K>, $e, Self>, eps: f64) -> Result<Seq<K, $e, Self, T>> {
                crate::ops::norms_cpu::layer_norm(x, w, b, eps)
            }

            // padding, and a carried state that wants gradients, take the composed op
            #[allow(clippy::type_complexity)]
            fn timestep_norm<const M: usize, const G: usize, T: Tape<$e, Self> + Merge<NoneTape>>(x: Seq<M, $e, Self, T>, weight: &Tensor<Rank1<M>, $e, Self>, bias: &Tensor<Rank1<M>, $e, Self>, eps: f64, state: Option<NormState<G, $e, Self, T>>, pad: Option<&[bool]>) -> Result<(Seq<M, $e, Self, T>, NormState<G, $e, Self, T>)> {
                if pad.is_none() && (state.is_none() || !T::OWNS_TAPE) {
                    crate::ops::norms_cpu::timestep_norm(x, weight, bias, eps, state)
                } else {
                    composed_timestep_norm(x, weight, bias, eps, state, pad)
                }
            }
            fn end_step(&self) {
                crate::ops::host::drain_released::<$e>(self)
            }
        }
    };
}
#[cfg(not(feature = "composed-ops"))]
cpu_mega_device!(f32);
#[cfg(not(feature = "composed-ops"))]
cpu_mega_device!(f64);

// With `composed-ops`, `Cpu` runs the composed reference ops end to end: the path every other
// device (CUDA) takes, checked against the golden vectors in CI.
#[cfg(feature = "composed-ops")]
impl MegaDevice<f32> for Cpu {}
#[cfg(feature = "composed-ops")]
impl MegaDevice<f64> for Cpu {}

#[cfg(feature = "cuda")]
impl MegaDevice<f32> for Cuda {}
#[cfg(feature = "cuda")]
impl MegaDevice<f64> for Cuda {}

/// The first CUDA device, or why there is none: asks the driver first (library missing, no
/// device, driver error), because dfdx's `Cuda::try_build` panics instead of failing when there
/// is no device.
#[cfg(feature = "cuda")]
pub fn cuda_device() -> Result<Cuda> {
    use cudarc::driver::result;
    result::init()
        .map_err(|e| anyhow::anyhow!("the CUDA driver did not initialise: {}", driver_error(&e)))?;
    let n = result::device::get_count()
        .map_err(|e| anyhow::anyhow!("counting CUDA devices failed: {}", driver_error(&e)))?;
    anyhow::ensure!(n > 0, "no CUDA device is visible");
    Cuda::try_build(0, 0).map_err(|e| anyhow::anyhow!("building CUDA device 0 failed: {e:?}"))
}

/// A driver error as text. cudarc's `Debug` asks the driver for the message and panics if that
/// fails (a broken or stand-in driver library), so the message is fetched here without
/// unwrapping.
#[cfg(feature = "cuda")]
fn driver_error(e: &cudarc::driver::DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// Bytes of device memory in use on the current CUDA context's device (total less free, as the
/// driver reports it): what `bench_scaling --device cuda` records as a run's memory.
#[cfg(feature = "cuda")]
pub fn cuda_mem_used() -> Result<usize> {
    let (free, total) = cudarc::driver::result::mem_get_info().map_err(|e| {
        anyhow::anyhow!(
            "asking the CUDA driver for free memory failed: {}",
            driver_error(&e)
        )
    })?;
    Ok(total.saturating_sub(free))
}

/// The folder of the bundled test fixtures: `$MEGALODON_FIXTURES` when set (a test binary
/// carried to another machine, see docs/cuda.md), else `default` (the source tree's).
pub fn fixtures_dir(default: &str) -> std::path::PathBuf {
    std::env::var_os("MEGALODON_FIXTURES")
        .map(Into::into)
        .unwrap_or_else(|| default.into())
}
