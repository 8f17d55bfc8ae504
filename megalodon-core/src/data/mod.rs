//! The bottom of the data path shared by every head (`docs/design.md` §11): a seeded generator
//! whose streams do not depend on dependency versions or thread timing.

pub mod rng;
pub use rng::{permutation, SplitMix64};
