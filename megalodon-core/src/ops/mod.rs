//! Ops below the modules: the composed references (CEMA with its parameters, block attention,
//! TimestepNorm, the norms, gates, RoPE and the linear layer, all built from dfdx ops) and the
//! CPU kernels that override them on `Cpu` (see [`crate::device::MegaDevice`]). Each kernel is
//! tested against its composed reference through the same test body.

pub mod attention_cpu;
pub mod block_attention;
pub mod cema;
pub mod cema_cpu;
pub mod consts;
pub mod gates;
pub mod gates_cpu;
pub(crate) mod host;
pub mod norms;
pub mod norms_cpu;
pub mod rope;
pub mod scan;
pub mod simd;
pub mod timestep_norm;

/// Empties the CPU kernels' scratch pool (host buffers kept between training steps) and this
/// thread's cache of composed-op constants ([`consts`]); `fit` calls it when training ends. A
/// custom training loop may call it when it is done.
pub fn release_pool() {
    host::release_pool();
    consts::clear();
}
