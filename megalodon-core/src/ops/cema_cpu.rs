//! CEMA scan for `Cpu` (placeholder: delegates to the composed reference).

use crate::nn::cema::{CemaState, MultiHeadComplexEma};
use crate::nn::layers::Seq;
use crate::util::Float;
use anyhow::Result;
use dfdx::prelude::*;

/// Causal CEMA on the CPU; same contract as [`crate::device::MegaDevice::cema`].
#[allow(clippy::type_complexity)]
pub fn cema<const M: usize, const N: usize, E: Float, T: Tape<E, Cpu>>(
    ema: &MultiHeadComplexEma<M, N, E, Cpu>,
    u: Seq<M, E, Cpu, T>,
    h0: Option<CemaState<M, N, E, Cpu, T>>,
    want_state: bool,
) -> Result<(Seq<M, E, Cpu, T>, Option<CemaState<M, N, E, Cpu, T>>)>
where
    Cpu: Device<E>,
{
    ema.try_forward(u, h0, want_state)
}

/// Anti-causal CEMA on the CPU; same contract as [`crate::device::MegaDevice::cema_anticausal`].
pub fn cema_anticausal<const M: usize, const N: usize, E: Float, T: Tape<E, Cpu>>(
    ema: &MultiHeadComplexEma<M, N, E, Cpu>,
    u: Seq<M, E, Cpu, T>,
) -> Result<Seq<M, E, Cpu, T>>
where
    Cpu: Device<E>,
{
    ema.try_forward_anticausal(u)
}
