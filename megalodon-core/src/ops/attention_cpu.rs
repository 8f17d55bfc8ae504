//! Fused block attention for `Cpu` (placeholder: delegates to the composed reference).

use crate::device::{composed_block_attention, BlockMask, Blocks};
use crate::util::Float;
use anyhow::Result;
use dfdx::prelude::*;

/// Block attention on the CPU; same contract as [`crate::device::MegaDevice::block_attention`].
pub fn block_attention<const H: usize, E: Float, T: Tape<E, Cpu>>(
    q: Blocks<H, E, Cpu, T>,
    k: Blocks<H, E, Cpu, T>,
    v: Blocks<H, E, Cpu, T>,
    mask: &BlockMask,
) -> Result<Blocks<H, E, Cpu, T>>
where
    Cpu: Device<E>,
{
    composed_block_attention(q, k, v, mask)
}
