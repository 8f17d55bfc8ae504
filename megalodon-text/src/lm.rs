//! [`LanguageModel`]: a trained Megalodon preset with its tokenizer, for generation and scoring.
//!
//! Both run through the streaming state (`Megalodon::forward_stream`): a prompt or a context is
//! fed in blocks, then decoding goes one token at a time, so memory stays constant however long
//! the prompt, the context or the output.
//!
//! A run directory (written by [`crate::train::train`]) holds `tokenizer.json`, `run.json`,
//! `metrics.csv`, a `latest` file naming the newest checkpoint `ckpt-NNNNNNNN/`
//! (`config.json`, `model.safetensors` with the official keys, `optim.safetensors`,
//! `train_state.json`) and, once training has finished, a copy of the final `config.json` and
//! `model.safetensors`. [`LanguageModel::load`] takes the run directory or a checkpoint
//! directory.
//!
//! ```
//! use megalodon_core::presets::Tiny;
//! use megalodon_text::{LanguageModel, Sampling, TextModel, Tokenizer};
//! use dfdx::prelude::*;
//!
//! let tok = Tokenizer::train_bpe(&["the cat sat on the mat. ".repeat(20)], 300)?;
//! let conf = Tiny::<f32, Cpu>::default_conf(16, tok.vocab_size());
//! let model = Tiny::<f32, Cpu>::build(&Default::default(), conf, 0)?;
//! let lm = LanguageModel::new(model, tok)?;
//! let mut text = String::new();
//! let out = lm.generate("the cat", 5, &Sampling { seed: 1, ..Sampling::default() }, |t| {
//!     text.push_str(t.text);
//!     Ok(())
//! })?;
//! assert_eq!(out.ids.len(), 5);
//! let ids = lm.tokenizer().encode("the cat sat on the mat.")?;
//! let score = lm.perplexity(&ids, 2)?; // score every token after the first two
//! assert_eq!(score.scored, ids.len() - 2);
//! assert!(score.perplexity() > 1.0);
//! # anyhow::Ok(())
//! ```

use crate::preset::TextModel;
use crate::sampling::{Sampler, Sampling};
use crate::Tokenizer;
use anyhow::{bail, ensure, Context, Result};
use dfdx::prelude::*;
use megalodon_core::checkpoint::CONFIG_FILE;
use megalodon_core::device::MegaDevice;
use megalodon_core::engine::cuda::{CudaEngine, CudaState, Precision};
use megalodon_core::engine::{Engine, EngineState, Want};
use megalodon_core::nn::model::Rewindow;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// File name of the tokenizer in a run directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Tokens fed to the stream per call when prefilling a prompt or a context.
pub const PREFILL_BLOCK: usize = 512;

pub use megalodon_core::fit::resolve_run;

/// The tokenizer file of a run: `tokenizer.json` in `run`, in the checkpoint directory, or in
/// the checkpoint's parent.
fn tokenizer_path(run: &Path, model_dir: &Path) -> Result<PathBuf> {
    let mut places = vec![run.join(TOKENIZER_FILE), model_dir.join(TOKENIZER_FILE)];
    if let Some(p) = model_dir.parent() {
        places.push(p.join(TOKENIZER_FILE));
    }
    match places.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => bail!(
            "{} has no {TOKENIZER_FILE} (looked at {})",
            run.display(),
            places
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// One generated token, as passed to the `on_token` callback of [`LanguageModel::generate`].
#[derive(Debug)]
pub struct GenToken<'a> {
    /// The token id.
    pub id: usize,
    /// Text completed by this token (empty while a multi-byte character is still partial).
    pub text: &'a str,
    /// The logits the token was drawn from (one vocabulary row).
    pub logits: &'a [f32],
}

/// The result of [`LanguageModel::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Prompt token ids.
    pub prompt: Vec<usize>,
    /// Generated token ids.
    pub ids: Vec<usize>,
    /// Generated text.
    pub text: String,
    /// Seconds spent on the prompt (prefill).
    pub prefill_secs: f64,
    /// Seconds spent generating (sampling and one-token forwards).
    pub decode_secs: f64,
    /// Bytes of the streaming state (the same at every step).
    pub state_bytes: usize,
}

impl Generation {
    /// Generated tokens per second of decoding.
    pub fn tokens_per_sec(&self) -> f64 {
        self.ids.len() as f64 / self.decode_secs.max(1e-9)
    }
}

/// The result of [`LanguageModel::perplexity`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Sum of the negative log-likelihoods (nats).
    pub nll_sum: f64,
    /// Tokens scored.
    pub scored: usize,
}

impl Score {
    /// Mean negative log-likelihood per token (nats).
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.scored as f64
    }

    /// Perplexity per token.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// Adds another score.
    pub fn merge(self, other: Score) -> Score {
        Score {
            nll_sum: self.nll_sum + other.nll_sum,
            scored: self.scored + other.scored,
        }
    }
}

/// Negative log-likelihood of `target` under one logit row.
fn nll(row: &[f32], target: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let lse: f64 = row
        .iter()
        .map(|&x| f64::from(x - max).exp())
        .sum::<f64>()
        .ln()
        + f64::from(max);
    lse - f64::from(row[target])
}

/// A language model: a preset model (on device `D`, the CPU unless said otherwise) and its
/// tokenizer.
pub struct LanguageModel<P: TextModel<D>, D: MegaDevice<f32> = Cpu> {
    model: P,
    tokenizer: Tokenizer,
    device: std::marker::PhantomData<D>,
    /// The streaming engine (the model's weights copied once): generation and scoring run on it
    /// unless [`LanguageModel::use_engine`] turned it off.
    engine: Engine,
    /// The engine's CUDA backend, when [`LanguageModel::engine_device`] chose a GPU.
    cuda: Option<CudaEngine>,
    use_engine: bool,
    rewindow: Option<Rewindow>,
}

/// A stream through the dfdx model or through the engine (CPU or CUDA).
enum Stream<S> {
    Model(S),
    Engine(Box<EngineState>),
    Cuda(Box<CudaState>),
}

impl<P: TextModel<D>, D: MegaDevice<f32> + Default> LanguageModel<P, D> {
    /// Loads a run directory (its latest checkpoint) or a checkpoint directory onto the
    /// device's default instance (the CPU); see [`LanguageModel::load_on`].
    pub fn load(run: impl AsRef<Path>) -> Result<Self> {
        Self::load_on(&D::default(), run)
    }
}

impl<P: TextModel<D>, D: MegaDevice<f32>> LanguageModel<P, D> {
    fn assemble(mut model: P, tokenizer: Tokenizer) -> Result<Self> {
        let conf = model.model_conf().clone();
        let engine = Engine::from_model(&mut model, &conf)
            .context("copying the weights into the streaming engine")?;
        Ok(LanguageModel {
            model,
            tokenizer,
            device: std::marker::PhantomData,
            engine,
            cuda: None,
            use_engine: true,
            rewindow: None,
        })
    }

    /// Where the streaming engine runs: `cpu` (the default) or `cuda` / `cuda:N` (GPU N through
    /// the engine's CUDA backend: CUDA 13's driver, NVRTC and cuBLAS loaded at run time, so any
    /// build can use it). An unknown device or a machine without CUDA is an error naming the
    /// `--device` flag.
    pub fn engine_device(&mut self, device: &str) -> Result<&mut Self> {
        self.engine_device_with(device, Precision::F32)
    }

    /// [`Self::engine_device`] with the CUDA engine's matrix products in `precision`
    /// (`Precision::Bf16`: the CLI's `--bf16`, a CUDA option).
    pub fn engine_device_with(&mut self, device: &str, precision: Precision) -> Result<&mut Self> {
        let ordinal = match device {
            "cpu" => {
                ensure!(
                    precision == Precision::F32,
                    "--bf16 is a CUDA option: add --device cuda (the CPU engine has --int8)"
                );
                self.cuda = None;
                return Ok(self);
            }
            "cuda" => 0,
            d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => n,
                _ => bail!("--device must be `cpu`, `cuda` or `cuda:N`, got `{device}`"),
            },
        };
        ensure!(
            !self.engine.is_int8(),
            "--int8 is a CPU option: the CUDA engine runs f32 weights"
        );
        self.cuda = Some(
            CudaEngine::with_precision(&self.engine, ordinal, precision)
                .context("--device cuda")?,
        );
        Ok(self)
    }

    /// Weight-only int8 quantisation of the CPU engine (`--int8`; see
    /// [`Engine::quantize_int8`]).
    pub fn quantize_int8(&mut self) -> Result<&mut Self> {
        ensure!(
            self.cuda.is_none(),
            "--int8 is a CPU option: the CUDA engine runs f32 weights"
        );
        self.engine.quantize_int8();
        Ok(self)
    }

    /// The name of what generation and scoring run on, e.g. "streaming engine (CPU, int8)".
    pub fn backend_name(&self) -> String {
        match (&self.cuda, self.use_engine) {
            (_, false) => "dfdx forward_stream".into(),
            (Some(c), true) => format!(
                "streaming engine ({}, {})",
                c.device_name,
                match c.precision() {
                    Precision::F32 => "f32",
                    Precision::Bf16 => "bf16",
                }
            ),
            (None, true) => format!(
                "streaming engine (CPU, {})",
                if self.engine.is_int8() { "int8" } else { "f32" }
            ),
        }
    }

    /// Whether generation and scoring run on the streaming engine (`true`, the default) or on
    /// the dfdx model's `forward_stream` (the reference; slower).
    pub fn use_engine(&mut self, on: bool) -> &mut Self {
        self.use_engine = on;
        self
    }

    /// TimestepNorm statistics for generation and scoring: `None` (default) cumulative over the
    /// whole stream, or re-windowed as in the official long-context evaluation
    /// (`Rewindow::official()`: 8 chunks, every 2; needs the engine).
    pub fn set_rewindow(&mut self, rewindow: Option<Rewindow>) -> &mut Self {
        self.rewindow = rewindow;
        self
    }

    /// The streaming engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn fresh_stream(&self) -> Result<Stream<P::State>> {
        if let (Some(c), true) = (&self.cuda, self.use_engine) {
            return Ok(Stream::Cuda(Box::new(match &self.rewindow {
                None => c.new_state(PREFILL_BLOCK)?,
                Some(rw) => c.new_state_rewindowed(c.dims.chunk, rw.clone())?,
            })));
        }
        match (&self.rewindow, self.use_engine) {
            (None, false) => Ok(Stream::Model(self.model.fresh_state())),
            (None, true) => Ok(Stream::Engine(Box::new(
                self.engine.new_state(PREFILL_BLOCK)?,
            ))),
            // blocks of one chunk: the statistics are refreshed at the chunk boundaries, as in
            // the official evaluation loop
            (Some(rw), true) => Ok(Stream::Engine(Box::new(
                self.engine
                    .new_state_rewindowed(self.engine.dims.chunk, rw.clone())?,
            ))),
            (Some(_), false) => bail!("re-windowed TimestepNorm needs the streaming engine"),
        }
    }

    fn stream_bytes(&self, st: &Stream<P::State>) -> usize {
        match st {
            Stream::Model(s) => P::state_bytes(s),
            Stream::Engine(s) => Engine::state_bytes(s),
            Stream::Cuda(s) => CudaEngine::state_bytes(s),
        }
    }
    /// Pairs a model with a tokenizer; the tokenizer's ids must fit the model's vocabulary.
    pub fn new(model: P, tokenizer: Tokenizer) -> Result<Self> {
        let v = model.model_conf().vocab_size;
        ensure!(
            tokenizer.vocab_size() <= v,
            "{} has {} ids but the model's vocab_size is {v}",
            tokenizer
                .source()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the tokenizer".into()),
            tokenizer.vocab_size()
        );
        Self::assemble(model, tokenizer)
    }

    /// Loads a run directory (its latest checkpoint) or a checkpoint directory onto `dev`:
    /// `config.json` (checked against this preset's widths; a run of another preset is an error
    /// naming the file and the field), `model.safetensors` and `tokenizer.json`.
    pub fn load_on(dev: &D, run: impl AsRef<Path>) -> Result<Self> {
        let run = run.as_ref();
        let dir = resolve_run(run)?;
        let tok_path = tokenizer_path(run, &dir)?;
        let tokenizer = Tokenizer::from_file(&tok_path)?;
        let model = P::load_dir(dev, &dir)
            .with_context(|| format!("loading the model of {}", run.display()))?;
        let v = model.model_conf().vocab_size;
        ensure!(
            tokenizer.vocab_size() <= v,
            "{} has {} ids but {} says vocab_size {v}: the tokenizer does not belong to this run",
            tok_path.display(),
            tokenizer.vocab_size(),
            dir.join(CONFIG_FILE).display()
        );
        Self::assemble(model, tokenizer)
    }

    /// The model.
    pub fn model(&self) -> &P {
        &self.model
    }

    /// The model, mutably (e.g. to save it).
    pub fn model_mut(&mut self) -> &mut P {
        &mut self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model's vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.model.model_conf().vocab_size
    }

    fn check_ids(&self, ids: &[usize]) -> Result<()> {
        let v = self.vocab_size();
        if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id >= v) {
            bail!("token id {id} at position {pos} is out of range: the model has {v} ids");
        }
        Ok(())
    }

    /// Feeds `ids` to the stream; `on_row(i, logits)` sees the logits of every token `i` of
    /// `ids` (all of them, or only the last with `last_only`). The dfdx path feeds blocks of
    /// [`PREFILL_BLOCK`]; the engine its state's block size.
    fn feed(
        &self,
        ids: &[usize],
        st: &mut Stream<P::State>,
        last_only: bool,
        mut on_row: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        match st {
            Stream::Model(state) => {
                let v = self.vocab_size();
                for (k, block) in ids.chunks(PREFILL_BLOCK).enumerate() {
                    let logits = self.model.stream(block, state)?;
                    for (r, row) in logits.chunks(v).enumerate() {
                        let i = k * PREFILL_BLOCK + r;
                        if !last_only || i + 1 == ids.len() {
                            on_row(i, row);
                        }
                    }
                }
                Ok(())
            }
            Stream::Engine(state) => {
                let want = if last_only { Want::Last } else { Want::All };
                self.engine.feed(state, ids, want, on_row)
            }
            Stream::Cuda(state) => {
                let want = if last_only { Want::Last } else { Want::All };
                let cuda = self
                    .cuda
                    .as_ref()
                    .context("a CUDA stream without the CUDA engine")?;
                cuda.feed(state, ids, want, on_row)
            }
        }
    }

    /// Encodes `prompt` and generates up to `max_tokens` tokens (stopping early at the
    /// end-of-text token), calling `on_token` with each as it comes. The prompt must not be
    /// empty (`--prompt`).
    pub fn generate(
        &self,
        prompt: &str,
        max_tokens: usize,
        sampling: &Sampling,
        on_token: impl FnMut(&GenToken) -> Result<()>,
    ) -> Result<Generation> {
        ensure!(
            !prompt.is_empty(),
            "--prompt is empty: give at least one character to continue"
        );
        let ids = self.tokenizer.encode(prompt)?;
        ensure!(!ids.is_empty(), "--prompt encodes to no token");
        self.generate_ids(&ids, max_tokens, sampling, on_token)
    }

    /// [`generate`](Self::generate) from prompt token ids: prefill through the streaming state,
    /// then one token at a time.
    pub fn generate_ids(
        &self,
        prompt: &[usize],
        max_tokens: usize,
        sampling: &Sampling,
        mut on_token: impl FnMut(&GenToken) -> Result<()>,
    ) -> Result<Generation> {
        ensure!(!prompt.is_empty(), "empty prompt: nothing to continue");
        self.check_ids(prompt)?;
        let mut sampler = Sampler::new(sampling)?;
        let v = self.vocab_size();
        let t0 = Instant::now();
        let mut state = self.fresh_stream()?;
        let mut last = vec![0f32; v];
        self.feed(prompt, &mut state, true, |_, row| last.copy_from_slice(row))?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let stop = self.tokenizer.end_of_text();
        let mut ids = Vec::new();
        let mut text = String::new();
        for i in 0..max_tokens {
            let id = sampler.sample(&last)?;
            ids.push(id);
            // Emit the text completed so far (a byte-level token may end inside a character).
            let decoded = self.tokenizer.decode(&ids)?;
            let piece = if decoded.ends_with('\u{FFFD}') {
                ""
            } else {
                decoded.get(text.len()..).unwrap_or("")
            };
            let piece = piece.to_string();
            on_token(&GenToken {
                id,
                text: &piece,
                logits: &last,
            })?;
            text.push_str(&piece);
            if Some(id) == stop || i + 1 == max_tokens {
                break;
            }
            self.feed(&[id], &mut state, true, |_, row| last.copy_from_slice(row))?;
        }
        let text = self.tokenizer.decode(&ids)?;
        Ok(Generation {
            prompt: prompt.to_vec(),
            ids,
            text,
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
            state_bytes: self.stream_bytes(&state),
        })
    }

    /// Scores `tokens[context..]`, each token given every token before it (at least `context`
    /// tokens), streaming in blocks of [`PREFILL_BLOCK`] with constant memory. Needs
    /// `1 <= context < tokens.len()`.
    pub fn perplexity(&self, tokens: &[usize], context: usize) -> Result<Score> {
        ensure!(
            context >= 1,
            "--context must be at least 1 (the first token has nothing to be predicted from)"
        );
        ensure!(
            context < tokens.len(),
            "--context {context} leaves nothing to score in {} tokens",
            tokens.len()
        );
        self.check_ids(tokens)?;
        let mut state = self.fresh_stream()?;
        let mut score = Score {
            nll_sum: 0.0,
            scored: 0,
        };
        // Input position i predicts token i + 1; score positions context-1 ..= len-2.
        let inputs = &tokens[..tokens.len() - 1];
        self.feed(inputs, &mut state, false, |i, row| {
            if i + 1 >= context {
                score.nll_sum += nll(row, tokens[i + 1]);
                score.scored += 1;
            }
        })?;
        Ok(score)
    }

    /// Perplexity of the same scored tokens at several context lengths: `segments` spans of
    /// `scored` tokens, spread evenly over `tokens` after the longest context; for each context
    /// `c`, each span is scored after exactly the `c` tokens before it (and the span's own
    /// earlier tokens). Returns one [`Score`] per context plus the scored token spans.
    pub fn context_sweep(
        &self,
        tokens: &[usize],
        contexts: &[usize],
        scored: usize,
        segments: usize,
    ) -> Result<(Vec<Score>, Vec<std::ops::Range<usize>>)> {
        ensure!(!contexts.is_empty(), "--context lists no length");
        ensure!(scored >= 1, "--scored must be at least 1");
        ensure!(segments >= 1, "--segments must be at least 1");
        let cmax = *contexts.iter().max().unwrap_or(&1);
        let need = cmax
            .checked_add(scored)
            .context("--context + --scored overflows")?;
        ensure!(
            tokens.len() >= need,
            "the evaluation text has {} tokens, fewer than the longest --context {cmax} + \
             --scored {scored} = {need}",
            tokens.len()
        );
        let room = tokens.len() - need;
        let spans: Vec<_> = (0..segments)
            .map(|k| {
                let s = cmax
                    + if segments > 1 {
                        room * k / (segments - 1)
                    } else {
                        room
                    };
                s..s + scored
            })
            .collect();
        let mut out = Vec::with_capacity(contexts.len());
        for &c in contexts {
            let mut total = Score {
                nll_sum: 0.0,
                scored: 0,
            };
            for span in &spans {
                total = total.merge(self.perplexity(&tokens[span.start - c..span.end], c)?);
            }
            out.push(total);
        }
        Ok((out, spans))
    }
}
