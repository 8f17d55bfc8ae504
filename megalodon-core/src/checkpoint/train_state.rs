//! Training checkpoints: the training state (`train_state.json`) and the complete checkpoint
//! directory (config, weights, optimizer state, training state) that [`crate::fit`] writes and
//! resumes from.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{save_run, write_atomic, HasBuffers};
use crate::optim::{AdamW, OPTIM_FILE};
use crate::params::Params;
use crate::util::Float;
use dfdx::prelude::*;

/// File name of the training state inside a run directory.
pub const TRAIN_STATE_FILE: &str = "train_state.json";

/// Training progress saved next to the checkpoint (`train_state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct TrainState {
    /// Completed optimizer steps.
    pub step: u64,
    /// Seed of the run (data order and init).
    pub seed: u64,
    /// Tokens (or examples) consumed so far.
    pub tokens_seen: u64,
    /// Position of the data loader (opaque to this module).
    pub data_position: u64,
    /// Last training loss.
    pub last_loss: Option<f64>,
    /// Best validation loss so far.
    pub best_val_loss: Option<f64>,
}

impl TrainState {
    /// Writes `dir/train_state.json` (pretty JSON) atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("serializing the training state")?;
        write_atomic(&dir.join(TRAIN_STATE_FILE), text.as_bytes())
    }

    /// Reads `dir/train_state.json`; the error names the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(TRAIN_STATE_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading training state {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing training state {}", path.display()))
    }
}

/// Writes a full training checkpoint into `dir`: `config.json`, `model.safetensors`,
/// `optim.safetensors` and, last, `train_state.json` (each atomic; the training state is written
/// last so that its presence marks a complete checkpoint).
pub fn save_checkpoint<E, D, M>(
    dir: &Path,
    conf: &impl Serialize,
    model: &mut M,
    opt: &AdamW<E, D>,
    state: &TrainState,
) -> Result<()>
where
    E: Float,
    D: Device<E>,
    M: Params<E, D> + HasBuffers,
{
    save_run(dir, conf, model)?;
    opt.save(&dir.join(OPTIM_FILE))?;
    state.save(dir)
}

/// Loads the weights, the optimizer state and the training state written by
/// [`save_checkpoint`] (the config is read separately with [`super::load_config`]).
pub fn load_checkpoint<E, D, M>(
    dir: &Path,
    model: &mut M,
    opt: &mut AdamW<E, D>,
) -> Result<TrainState>
where
    E: Float,
    D: Device<E>,
    M: Params<E, D> + HasBuffers,
{
    let state = TrainState::load(dir)?;
    super::load_run_weights(dir, model)?;
    opt.load(model, &dir.join(OPTIM_FILE))?;
    if opt.step != state.step {
        bail!(
            "checkpoint {}: optimizer step {} != training state step {}",
            dir.display(),
            opt.step,
            state.step
        );
    }
    Ok(state)
}
