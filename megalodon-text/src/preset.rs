//! Model presets for text and the small interface ([`TextModel`]) the language-model code needs
//! from a preset: build, load, stream, score.
//!
//! Presets are type aliases of [`Megalodon`] (widths fixed at compile time; chunk and vocabulary
//! sizes are run-time values). [`Preset`] names them at run time (`--preset`) and recognises the
//! preset of a `config.json` by its widths.

use crate::Batch;
use anyhow::{bail, Context, Result};
use dfdx::prelude::*;
use megalodon_core::config::{Dims, ModelConf};
use megalodon_core::device::MegaDevice;
use megalodon_core::fit::Trainable;
use megalodon_core::nn::model::{cross_entropy, Megalodon, ModelState};
use megalodon_core::presets::{Small, Tiny};
use std::path::Path;

/// CPU-sized text preset: 4 layers, D 128, H 1, Z 32, E 256, F 256, N 8, G 8 (about 0.8 M
/// parameters besides the embedding and output tables). Trains on the bundled corpus in a few
/// minutes on 2 cores.
pub type TextCpu<E, D> = Megalodon<4, 128, 32, 256, 1, 256, 8, 8, E, D>;

/// The presets the text tools accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// [`TextCpu`] (`--preset cpu`, the default).
    Cpu,
    /// Core `Small` (`--preset small`): 4 layers, D 256.
    Small,
    /// Core `Tiny` (`--preset tiny`): 2 layers, D 32 (tests, smoke runs).
    Tiny,
}

impl Preset {
    /// Every preset, in `--preset` order.
    pub const ALL: [Preset; 3] = [Preset::Cpu, Preset::Small, Preset::Tiny];

    /// The `--preset` name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Cpu => "cpu",
            Preset::Small => "small",
            Preset::Tiny => "tiny",
        }
    }

    /// The compile-time widths.
    pub fn dims(self) -> Dims {
        match self {
            Preset::Cpu => TextCpu::<f32, Cpu>::DIMS,
            Preset::Small => Small::<f32, Cpu>::DIMS,
            Preset::Tiny => Tiny::<f32, Cpu>::DIMS,
        }
    }

    /// Default attention chunk size.
    pub fn default_chunk(self) -> usize {
        match self {
            Preset::Cpu | Preset::Small => 128,
            Preset::Tiny => 16,
        }
    }

    /// Parses a `--preset` value.
    pub fn parse(name: &str) -> Result<Preset> {
        match Preset::ALL.iter().find(|p| p.name() == name) {
            Some(p) => Ok(*p),
            None => bail!(
                "--preset must be one of {}, got `{name}`",
                Preset::ALL.map(|p| p.name()).join(", ")
            ),
        }
    }

    /// The preset whose widths a run's `config.json` has (a checkpoint directory or a run
    /// directory with a `latest` checkpoint). The error names the file.
    pub fn of_run(run: &Path) -> Result<Preset> {
        let dir = crate::lm::resolve_run(run)?;
        let path = dir.join(megalodon_core::checkpoint::CONFIG_FILE);
        let conf = ModelConf::load(&path)?;
        let dims = conf.dims();
        match Preset::ALL.iter().find(|p| p.dims() == dims) {
            Some(p) => Ok(*p),
            None => bail!(
                "{}: widths {dims:?} match no text preset ({})",
                path.display(),
                Preset::ALL.map(|p| p.name()).join(", ")
            ),
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Preset::parse(s)
    }
}

/// What the language-model code needs from a preset model (f32, on device `D`: the CPU unless
/// said otherwise). Implemented for every [`Megalodon`] type.
pub trait TextModel<D: MegaDevice<f32> = Cpu>:
    Trainable<f32, D, Batch = Batch, Config = ModelConf> + Sized
{
    /// Streaming state (constant size in the number of tokens processed).
    type State;
    /// The compile-time widths.
    fn dims() -> Dims;
    /// A fresh model (deterministic in `seed`); the config must match the widths.
    fn build(dev: &D, conf: ModelConf, seed: u64) -> Result<Self>;
    /// Loads `config.json` + `model.safetensors` from a checkpoint directory.
    fn load_dir(dev: &D, dir: &Path) -> Result<Self>;
    /// The run-time config.
    fn model_conf(&self) -> &ModelConf;
    /// A fresh streaming state for one row.
    fn fresh_state(&self) -> Self::State;
    /// Bytes held by a streaming state.
    fn state_bytes(state: &Self::State) -> usize;
    /// Continues the stream (one row) with `tokens`: logits row-major `(tokens.len(), vocab)`.
    fn stream(&self, tokens: &[usize], state: &mut Self::State) -> Result<Vec<f32>>;
    /// A full forward over a fresh stream, row-major `(b, t, vocab)` logits.
    fn logits(&self, tokens: &[usize], b: usize, t: usize) -> Result<Vec<f32>>;
    /// Sum of the next-token losses of `batch` and how many targets were scored.
    fn loss_sum(&self, batch: &Batch) -> Result<(f64, usize)>;
    /// Whether training recomputes each layer's activations in backward (less memory).
    fn set_recompute(&mut self, on: bool);
}

impl<
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        D: MegaDevice<f32>,
    > TextModel<D> for Megalodon<L, M, Z, V, H, F, N, G, f32, D>
{
    type State = ModelState<M, H, N, G, f32, D>;

    fn dims() -> Dims {
        Self::DIMS
    }

    fn build(dev: &D, conf: ModelConf, seed: u64) -> Result<Self> {
        Self::new(dev, conf, seed)
    }

    fn load_dir(dev: &D, dir: &Path) -> Result<Self> {
        Self::load_run(dev, dir)
    }

    fn model_conf(&self) -> &ModelConf {
        self.conf()
    }

    fn fresh_state(&self) -> Self::State {
        self.new_state(1)
    }

    fn state_bytes(state: &Self::State) -> usize {
        state.bytes()
    }

    fn stream(&self, tokens: &[usize], state: &mut Self::State) -> Result<Vec<f32>> {
        Ok(self
            .forward_stream(tokens, 1, tokens.len(), state)?
            .as_vec())
    }

    fn logits(&self, tokens: &[usize], b: usize, t: usize) -> Result<Vec<f32>> {
        Ok(self.forward(tokens, b, t)?.as_vec())
    }

    fn loss_sum(&self, batch: &Batch) -> Result<(f64, usize)> {
        let n = batch.targets.iter().filter(|t| t.is_some()).count();
        let logits = self
            .forward(&batch.tokens, batch.batch, batch.seq_len)
            .context("validation forward")?;
        let loss = cross_entropy(logits, &batch.targets)?.as_vec()[0];
        Ok((f64::from(loss) * n as f64, n))
    }

    fn set_recompute(&mut self, on: bool) {
        self.backbone.recompute = on;
    }
}
