//! # megalodon
//!
//! Facade over the megalodon-rs workspace: the Megalodon long-context architecture (Ma et al.
//! 2024, arXiv 2404.08801) on dfdx with compile-time model widths.
//!
//! - [`core`]: TimestepNorm, complex EMA, chunked attention, the block, the LM, streaming state,
//!   checkpoints with official key names, the training loop;
//! - [`text`], [`vision`], [`audio`]: the modality crates;
//! - [`cli`]: the flag vocabulary and progress bar the example CLIs share;
//! - [`tasks`]: the synthetic long-range copy task (smoke tests, `train_copy`).

pub use megalodon_audio as audio;
pub use megalodon_core as core;
pub use megalodon_text as text;
pub use megalodon_vision as vision;

pub mod cli;
pub mod tasks;
