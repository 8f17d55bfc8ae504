//! The Megalodon modules, bottom-up.

pub mod cema;
pub mod scan;
pub mod timestep_norm;
