//! The Megalodon modules, bottom-up.

pub mod cema;
