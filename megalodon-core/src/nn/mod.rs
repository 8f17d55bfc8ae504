//! The Megalodon modules, bottom-up: norms and linears, CEMA, RoPE and chunked attention, the
//! attention unit, the FFN, one layer, the causal backbone and the language model on top of it,
//! and the bidirectional block and encoder that the classifiers share.

pub mod attention;
pub mod backbone;
pub mod bidirectional;
pub mod block;
pub mod cema;
pub mod chunked_attention;
pub mod classifier;
pub mod encoder;
pub mod layers;
pub mod model;
pub mod nffn;
pub mod probe;
pub mod recompute;
pub mod rope;
pub use crate::ops::scan;
pub mod state;
pub mod timestep_norm;
