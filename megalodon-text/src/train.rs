//! Training a language model end to end: corpus, tokenizer, windows, the core's resumable loop
//! with periodic validation, and the run directory.
//!
//! [`train`] is what `examples/text.rs train` runs; tests call it directly. Nothing is written
//! into a non-empty `out` unless `resume` or `force` is set, and everything is checked (corpus,
//! tokenizer, sizes, the `--init` run) before the first write.

use crate::lm::{resolve_run, LanguageModel, TOKENIZER_FILE};
use crate::preset::TextModel;
use crate::{unigram_cross_entropy, unigram_entropy, Corpus, Tokenizer};
use crate::{TrainWindows, ValWindows};
use anyhow::{bail, ensure, Context, Result};
use dfdx::prelude::*;
use megalodon_core::checkpoint::{load_run_weights, save_run, CONFIG_FILE};
use megalodon_core::device::MegaDevice;
use megalodon_core::fit::{fit_with, latest_checkpoint, FitConf, Progress, StepLog};
use megalodon_core::optim::{OptimConf, Schedule};
use megalodon_core::ModelConf;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Settings of [`train`] (the `train` subcommand's flags).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Corpus: a `.txt` file or a folder (`--data`); `None` = the bundled corpus.
    pub data: Option<PathBuf>,
    /// A `tokenizer.json` to use (`--tokenizer`); `None` = train a byte-level BPE.
    pub tokenizer: Option<PathBuf>,
    /// BPE vocabulary size when training one (`--vocab-size`).
    pub vocab_size: usize,
    /// Fine-tune from this run's weights (`--init`); its tokenizer is used unless `tokenizer`.
    pub init: Option<PathBuf>,
    /// Run directory (`--out`).
    pub out: PathBuf,
    /// Continue the run in `out` (`--resume`).
    pub resume: bool,
    /// Start over in a non-empty `out` (`--force`).
    pub force: bool,
    /// Settings allowed to change on resume (`--allow-change`).
    pub allow_changed: Vec<String>,
    /// Optimizer steps (`--steps`).
    pub steps: u64,
    /// Tokens per training row (`--seq-len`).
    pub seq_len: usize,
    /// Rows per batch (`--batch`).
    pub batch: usize,
    /// Peak learning rate (`--lr`).
    pub lr: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// Attention chunk size (`--chunk`); `None` = the preset's default (or the `--init` run's).
    pub chunk: Option<usize>,
    /// Seed of the initialisation and the batches (`--seed`).
    pub seed: u64,
    /// Validation every this many steps (`--eval-every`, 0 = only at the end).
    pub eval_every: u64,
    /// Checkpoint every this many steps (`--ckpt-every`, 0 = only at the end).
    pub ckpt_every: u64,
    /// Fraction of each document held out for validation.
    pub val_fraction: f64,
    /// At most this many validation tokens are scored (the first ones).
    pub val_tokens: usize,
    /// Default chunk size of the preset.
    pub default_chunk: usize,
    /// Recompute each layer's activations in backward instead of keeping them (`--recompute`):
    /// about half the peak memory for about a quarter more time per step.
    pub recompute: bool,
}

impl TrainOptions {
    /// Defaults for `out` with the given preset chunk.
    pub fn new(out: impl Into<PathBuf>, default_chunk: usize) -> Self {
        TrainOptions {
            data: None,
            tokenizer: None,
            vocab_size: 2048,
            init: None,
            out: out.into(),
            resume: false,
            force: false,
            allow_changed: Vec::new(),
            steps: 260,
            seq_len: 256,
            batch: 8,
            lr: 3e-3,
            warmup: 50,
            chunk: None,
            seed: 0,
            eval_every: 100,
            ckpt_every: 200,
            val_fraction: 0.1,
            val_tokens: 16384,
            default_chunk,
            recompute: false,
        }
    }

    /// Checks the sizes; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.steps >= 1, "--steps must be at least 1");
        ensure!(self.seq_len >= 1, "--seq-len must be at least 1, got 0");
        ensure!(self.batch >= 1, "--batch must be at least 1, got 0");
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "--lr must be a positive number, got {}",
            self.lr
        );
        ensure!(self.chunk != Some(0), "--chunk must be at least 1, got 0");
        ensure!(self.val_tokens >= 2, "--val-tokens must be at least 2");
        ensure!(
            !(self.resume && self.init.is_some()),
            "--resume continues a run with its own weights: it cannot take --init too"
        );
        self.batch.checked_mul(self.seq_len).with_context(|| {
            format!(
                "--batch {} x --seq-len {} overflows",
                self.batch, self.seq_len
            )
        })?;
        Ok(())
    }
}

/// What [`train`] tells its caller as it goes.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    /// Data and model are ready; training starts.
    Ready(&'a DataInfo),
    /// A step finished (with `val_loss` on evaluation steps).
    Step(&'a StepLog),
}

/// Sizes and reference losses of the prepared data.
#[derive(Debug, Clone)]
pub struct DataInfo {
    /// Corpus source.
    pub source: PathBuf,
    /// Training text bytes and tokens.
    pub train_bytes: usize,
    pub train_tokens: usize,
    /// Validation text bytes and tokens (all of it) and tokens scored per evaluation.
    pub val_bytes: usize,
    pub val_tokens: usize,
    pub val_scored: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether the tokenizer was trained here.
    pub trained_tokenizer: bool,
    /// Unigram entropy of the training tokens (nats/token).
    pub unigram_entropy: f64,
    /// Validation loss of a unigram model of the training tokens (nats/token).
    pub unigram_val_loss: f64,
    /// Parameters of the model.
    pub params: usize,
    /// Tokens per step.
    pub tokens_per_step: usize,
    /// The run's data identity (checked on resume).
    pub identity: String,
}

/// The result of [`train`].
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Data sizes and reference losses.
    pub info: DataInfo,
    /// The steps run by this invocation.
    pub logs: Vec<StepLog>,
    /// Last validation loss (nats/token), if any was computed.
    pub val_loss: Option<f64>,
    /// Wall time of the whole call (seconds).
    pub seconds: f64,
}

/// 64-bit FNV-1a.
fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}

const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// Mean validation loss over `val` (all its windows).
pub fn validation_loss<P: TextModel<D>, D: MegaDevice<f32>>(
    model: &P,
    val: &ValWindows,
) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for b in val.iter() {
        let (s, k) = model.loss_sum(&b)?;
        sum += s;
        n += k;
    }
    ensure!(n > 0, "no validation token to score");
    Ok(sum / n as f64)
}

struct Hooks<'a, F, D> {
    device: std::marker::PhantomData<D>,
    val: &'a ValWindows,
    on_event: F,
    /// An error returned by `on_event`, raised before the next step.
    stop: &'a std::cell::RefCell<Option<anyhow::Error>>,
}

impl<P: TextModel<D>, D: MegaDevice<f32>, F: FnMut(TrainEvent) -> Result<()>> Progress<P>
    for Hooks<'_, F, D>
{
    fn on_step(&mut self, log: &StepLog) {
        if let Err(e) = (self.on_event)(TrainEvent::Step(log)) {
            self.stop.borrow_mut().get_or_insert(e);
        }
    }
    fn evaluate(&mut self, model: &P, _step: u64) -> Result<Option<f64>> {
        validation_loss(model, self.val).map(Some)
    }
}

/// Whether `dir` exists and holds anything.
fn non_empty(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => Ok(it.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("listing --out {}", dir.display())),
    }
}

/// Trains (or fine-tunes, or resumes) a language model of preset `P` and returns it with a
/// report. See [`TrainOptions`] for the settings. `on_event` sees the prepared data and every
/// step; an error it returns stops training before the next step (checkpoints already written
/// stay, so the run can be resumed) and is returned.
pub fn train<P: TextModel>(
    opts: &TrainOptions,
    on_event: impl FnMut(TrainEvent) -> Result<()>,
) -> Result<(LanguageModel<P>, TrainReport)> {
    train_on::<P, Cpu>(&Cpu::default(), opts, on_event)
}

/// [`train`] on device `dev` (e.g. a CUDA device in a build with the `cuda` feature).
pub fn train_on<P: TextModel<D>, D: MegaDevice<f32>>(
    dev: &D,
    opts: &TrainOptions,
    mut on_event: impl FnMut(TrainEvent) -> Result<()>,
) -> Result<(LanguageModel<P, D>, TrainReport)> {
    let t0 = Instant::now();
    opts.validate()?;
    let out = &opts.out;
    let resuming = opts.resume && latest_checkpoint(out)?.is_some();
    if non_empty(out)? && !opts.resume && !opts.force {
        bail!(
            "--out {} is not empty: pass --resume to continue that run or --force to start over \
             in it",
            out.display()
        );
    }
    if opts.resume && !resuming && !opts.force && non_empty(out)? {
        bail!(
            "nothing to resume in --out {}: it has no `latest` checkpoint but is not empty; start \
             over with --force, or choose an empty --out",
            out.display()
        );
    }
    // Every rank of a data-parallel run has looked at --out before rank 0 writes to it.
    megalodon_core::distributed::world().barrier()?;
    // Corpus.
    let source = opts
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::BUNDLED_CORPUS));
    let corpus = Corpus::load(&source).with_context(|| "--data".to_string())?;
    let split = corpus.split(opts.val_fraction)?;
    // Tokenizer and (for --init) the starting weights.
    let run_tok = out.join(TOKENIZER_FILE);
    let mut init_model = None;
    let (tokenizer, trained_tokenizer) = if let Some(path) = &opts.tokenizer {
        (Tokenizer::from_file(path)?, false)
    } else if resuming {
        (Tokenizer::from_file(&run_tok)?, false)
    } else if let Some(init) = &opts.init {
        let lm = LanguageModel::<P, D>::load_on(dev, init).context("--init")?;
        let tok = lm.tokenizer().clone();
        init_model = Some(lm);
        (tok, false)
    } else {
        crate::check_vocab_size(opts.vocab_size)?;
        let texts: Vec<&str> = split.train.iter().map(|d| d.text.as_str()).collect();
        (Tokenizer::train_bpe(&texts, opts.vocab_size)?, true)
    };
    let sep = tokenizer.end_of_text();
    let train_texts: Vec<&str> = split.train.iter().map(|d| d.text.as_str()).collect();
    let val_texts: Vec<&str> = split
        .val
        .iter()
        .map(|d| d.text.as_str())
        .filter(|t| !t.is_empty())
        .collect();
    let train_ids = tokenizer.encode_docs(&train_texts, sep)?;
    let val_ids = tokenizer.encode_docs(&val_texts, sep)?;
    let vocab = tokenizer.vocab_size();
    let unigram = unigram_entropy(&train_ids, vocab)?;
    let unigram_val = unigram_cross_entropy(&train_ids, &val_ids, vocab)?;
    let val_all = val_ids.len();
    let val_ids: Vec<usize> = val_ids.into_iter().take(opts.val_tokens).collect();
    let val_scored = val_ids.len().saturating_sub(1);
    let train_len = train_ids.len();
    let windows = TrainWindows::new(train_ids, opts.batch, opts.seq_len, opts.seed)
        .context("training text")?;
    let val = ValWindows::new(val_ids, opts.batch, opts.seq_len.min(val_scored.max(1)))
        .context("validation text")?;
    // Model.
    let chunk = opts.chunk.unwrap_or_else(|| {
        init_model
            .as_ref()
            .map(|m| m.model().model_conf().chunk_size)
            .unwrap_or(opts.default_chunk)
    });
    let mut model = match &opts.init {
        Some(init) => {
            let mut conf = megalodon_core::checkpoint::load_config(&resolve_run(init)?)?;
            ensure!(
                conf.vocab_size >= vocab,
                "--tokenizer has {vocab} ids but the --init run {} has vocab_size {}",
                init.display(),
                conf.vocab_size
            );
            conf.chunk_size = chunk;
            let dir = resolve_run(init)?;
            let mut m = P::build(dev, conf, opts.seed)
                .with_context(|| format!("--init {}", dir.join(CONFIG_FILE).display()))?;
            load_run_weights(&dir, &mut m).context("--init")?;
            m
        }
        None => P::build(
            dev,
            ModelConf::from_dims(P::dims(), chunk, vocab),
            opts.seed,
        )?,
    };
    drop(init_model);
    model.set_recompute(opts.recompute);
    let mut h = FNV_INIT;
    for d in &corpus.docs {
        fnv(&mut h, d.text.as_bytes());
    }
    let mut th = FNV_INIT;
    let tok_json = tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    fnv(&mut th, tok_json.as_bytes());
    let identity = format!(
        "corpus {} ({} docs, {} bytes, fnv {h:016x}); val_fraction {}; tokenizer {vocab} ids \
         (fnv {th:016x}); batch {} x seq_len {}; init {}",
        source.display(),
        corpus.docs.len(),
        corpus.total_bytes(),
        opts.val_fraction,
        opts.batch,
        opts.seq_len,
        opts.init
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into())
    );
    let info = DataInfo {
        source: source.clone(),
        train_bytes: split.train_bytes(),
        train_tokens: train_len,
        val_bytes: split.val_bytes(),
        val_tokens: val_all,
        val_scored,
        vocab_size: vocab,
        trained_tokenizer,
        unigram_entropy: unigram,
        unigram_val_loss: unigram_val,
        params: megalodon_core::nn::model::param_count(model.model_conf()),
        tokens_per_step: opts.batch * opts.seq_len,
        identity: identity.clone(),
    };
    // Only rank 0 of a data-parallel run writes the run directory.
    let lead = megalodon_core::distributed::world().rank() == 0;
    // First write: the tokenizer (a resumed run keeps its own).
    if !resuming && lead {
        std::fs::create_dir_all(out)
            .with_context(|| format!("creating --out {}", out.display()))?;
        tokenizer.save(&run_tok)?;
    }
    on_event(TrainEvent::Ready(&info))?;
    let optim = OptimConf {
        lr: opts.lr,
        warmup: usize::try_from(opts.warmup.min(opts.steps)).context("--warmup")?,
        max_steps: usize::try_from(opts.steps).context("--steps")?,
        weight_decay: 0.1,
        schedule: Schedule::Cosine,
        end_lr_ratio: 0.1,
        ..OptimConf::default()
    };
    let fc = FitConf {
        steps: opts.steps,
        ckpt_every: opts.ckpt_every,
        eval_every: if opts.eval_every == 0 {
            opts.steps
        } else {
            opts.eval_every
        },
        out: Some(out.clone()),
        // Checked above; the only file written since is this run's tokenizer.
        resume: resuming,
        force: !resuming,
        seed: opts.seed,
        data: identity,
        allow_changed: opts.allow_changed.clone(),
    };
    let stop = std::cell::RefCell::new(None);
    let mut hooks = Hooks {
        device: std::marker::PhantomData,
        val: &val,
        on_event: &mut on_event,
        stop: &stop,
    };
    let next_batch = |step| match stop.borrow_mut().take() {
        Some(e) => Err(e),
        None => Ok(windows.batch(step)),
    };
    let logs = fit_with(&mut model, optim, &fc, next_batch, &mut hooks)?;
    if let Some(e) = stop.borrow_mut().take() {
        return Err(e);
    }
    // The finished model, also at the top of the run directory.
    let conf = model.model_conf().clone();
    if lead {
        save_run(out, &conf, &mut model)?;
    }
    let val_loss = logs.iter().rev().find_map(|l| l.val_loss);
    let lm = LanguageModel::new(model, tokenizer)?;
    Ok((
        lm,
        TrainReport {
            info,
            logs,
            val_loss,
            seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}
