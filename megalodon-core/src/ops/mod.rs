//! Sequence-mixing ops below the modules: the composed references (CEMA with its parameters,
//! block attention) and the CPU kernels that override the composed ops on `Cpu` (see [`crate::device::MegaDevice`]). Each
//! kernel is tested against its composed reference through the same test body.

pub mod attention_cpu;
pub mod block_attention;
pub mod cema;
pub mod cema_cpu;
