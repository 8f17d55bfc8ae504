//! The core's typed errors (`thiserror`). Everything else returns `anyhow::Result` with context;
//! these are the errors callers may want to match on.

use thiserror::Error;

/// A config that does not fit the model type or cannot be run.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    /// A width differs from the compile-time width of the model type.
    #[error("config field `{field}`: the model type expects {expected}, the config has {found}")]
    Width {
        field: &'static str,
        expected: usize,
        found: usize,
    },
    /// A field the model needs is absent from `config.json`.
    #[error("config field `{0}` is missing")]
    Missing(String),
    /// A run-time value the model cannot run with.
    #[error("invalid config: {0}")]
    Invalid(String),
}
