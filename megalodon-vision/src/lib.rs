//! # megalodon-vision
//!
//! Image classification with Megalodon: image loading and patching, a patch embedding and a
//! classifier head over the bidirectional block
//! ([`megalodon_core::nn::bidirectional::BidirectionalBlock`]). Skeleton until its issue.

pub use megalodon_core;
