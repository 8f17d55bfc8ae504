//! CPU kernels that override the composed dfdx ops on `Cpu` (see [`crate::device::MegaDevice`]).
//! Each is tested against the composed reference through the same test body.

pub mod attention_cpu;
pub mod cema_cpu;
