//! # megalodon-core
//!
//! The Megalodon architecture (Ma et al. 2024, arXiv 2404.08801; official code
//! `XuezheMax/megalodon`) on dfdx 0.13 with compile-time model widths: TimestepNorm, complex EMA,
//! normalized chunked attention with RoPE, normalized FFN, two-hop residual, the backbone, its
//! streaming state and checkpoints with the official state-dict key names.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod fit;
pub mod golden;
pub mod nn;
pub mod ops;
pub mod params;
pub mod presets;
pub mod tasks;
pub mod train;
pub mod util;

pub use config::ModelConf;
pub use params::{ParamVisitor, Params};
