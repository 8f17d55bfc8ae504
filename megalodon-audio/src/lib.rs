//! # megalodon-audio
//!
//! Raw-waveform speech classification with Megalodon (Mega's SC-Raw recipe: one token per
//! sample): WAV loading, a real-number embedding and a classifier head over the bidirectional
//! block ([`megalodon_core::nn::bidirectional::BidirectionalBlock`]). Skeleton until its issue.

pub use megalodon_core;
