//! Interleaved rotary position embedding restarting at every attention chunk; defined with its
//! composed op in [`crate::ops::rope`] (the CPU kernel is in `ops::gates_cpu`).

pub use crate::ops::rope::Rope;
