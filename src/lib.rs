pub use megalodon_core as core;
