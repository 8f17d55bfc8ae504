//! The seeded generator of the data layer: the core's SplitMix64 (`megalodon_core::data`), shared
//! by every data layer so that batches depend only on `(seed, epoch, sample)`.

pub use megalodon_core::data::rng::{permutation, SplitMix64};
