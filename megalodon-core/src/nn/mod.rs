//! The Megalodon modules, bottom-up.

pub mod attention;
pub mod bidirectional;
pub mod block;
pub mod cema;
pub mod layers;
pub mod model;
pub mod nffn;
pub mod scan;
pub mod timestep_norm;
