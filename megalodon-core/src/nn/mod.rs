//! The Megalodon modules, bottom-up.

pub mod cema;
pub mod scan;
pub mod timestep_norm;
pub mod layers;
pub mod attention;
pub mod nffn;
pub mod block;
pub mod model;
pub mod bidirectional;
