//! # megalodon-core
//!
//! The Megalodon architecture (Ma et al. 2024, arXiv 2404.08801; official code
//! `XuezheMax/megalodon`) on dfdx 0.13 with compile-time model widths: TimestepNorm, complex EMA,
//! normalized chunked attention with RoPE, normalized FFN, two-hop residual, the backbone, its
//! streaming state and checkpoints with the official state-dict key names.
//!
//! ```
//! use dfdx::prelude::*;
//! use megalodon_core::presets::{Tiny, TINY_CHUNK};
//!
//! let dev: Cpu = Default::default();
//! let model = Tiny::<f32, Cpu>::new(&dev, Tiny::<f32, Cpu>::default_conf(TINY_CHUNK, 50), 0)?;
//! let tokens: Vec<usize> = (0..20).map(|i| (i * 7) % 50).collect();
//! let full = model.forward(&tokens, 1, 20)?.as_vec(); // (1, 20, 50) logits
//!
//! // streaming in any split gives the same logits, with constant-size state
//! let mut state = model.new_state(1);
//! model.forward_stream(&tokens[..7], 1, 7, &mut state)?;
//! let rest = model.forward_stream(&tokens[7..], 1, 13, &mut state)?.as_vec();
//! assert!((full[7 * 50] - rest[0]).abs() < 1e-4);
//! # Ok::<(), anyhow::Error>(())
//! ```

//! Layers, bottom-up (each imports only what lies below it): `util`, `config`, `params`, `data`,
//! `plot` -> `ops` (the composed references of CEMA and block attention, and the CPU kernels) ->
//! `device` (the per-device dispatch) -> `nn` (the modules, the backbone, the LM, the encoder) ->
//! `optim` -> `checkpoint` -> `fit` (the training loop). The design and its math are in
//! `docs/design.md`.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod fit;
#[cfg(feature = "golden")]
pub mod golden;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod params;
pub mod plot;
pub mod presets;
pub mod profile;
pub mod util;

pub use config::ModelConf;
pub use error::ConfigError;
pub use fit::{fit, fit_with, FitConf, Progress, Trainable};
pub use nn::backbone::Backbone;
pub use nn::encoder::{masked_mean_pool, BidirectionalEncoder};
pub use nn::model::Megalodon;
pub use params::{ParamVisitor, Params};
