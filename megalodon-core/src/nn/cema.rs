//! The multi-head complex EMA (`docs/design.md` §4). Its parameters and composed reference live
//! with the other composed references below the device layer (`crate::ops::cema`), so that the
//! device dispatch and the CPU kernel never import from the modules above them.

pub use crate::ops::cema::*;
