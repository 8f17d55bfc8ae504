//! Training an audio classifier on a data folder with the core's loop: what `audio train`
//! runs ([`train`]), usable from tests and other programs.
//!
//! Optimizer step `s` (1-based) takes batch `(s - 1) % batches_per_epoch` of epoch
//! `(s - 1) / batches_per_epoch` ([`StepBatches`]), a pure function of the step (the loader's
//! content depends only on seed, epoch and batch index), so a resumed run sees the batches of
//! the uninterrupted one and reproduces it bit for bit. Validation runs at the end of every
//! epoch; each epoch ends with a summary line (losses, validation accuracy, skipped files).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use megalodon_core::device::MegaDevice;
use megalodon_core::fit::{fit_with, FitConf, Progress, StepLog};
use megalodon_core::optim::{OptimConf, Schedule};

use crate::augment::{Augment, AugmentConfig};
use crate::dataset::AudioSplits;
use crate::eval::{evaluate, EvalReport};
use crate::loader::{Clips, Loader, LoaderConfig};
use crate::model::{load_conf, param_count, AudioModel, AudioPreset};
use crate::wav::ReadOptions;

/// Batches by step number over the audio loader (see [`megalodon_core::data::StepBatches`]).
pub type StepBatches = megalodon_core::data::StepBatches<Clips>;

/// Settings of [`train`] (the `audio train` flags).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Data folder (Speech Commands layout, `train/`+`val/`, or one label tree).
    pub data: PathBuf,
    /// Run directory.
    pub out: PathBuf,
    /// Passes over the training clips.
    pub epochs: u64,
    /// Clips per batch.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup as a fraction of all steps, in `[0, 1)`.
    pub warmup: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed of init, data order and augmentation.
    pub seed: u64,
    /// Fine-tune from this run's weights.
    pub init: Option<PathBuf>,
    /// Continue the run in `out`.
    pub resume: bool,
    /// Start over in a non-empty `out`.
    pub force: bool,
    /// Settings allowed to change on resume.
    pub allow_changed: Vec<String>,
    /// Checkpoint every this many steps (default: every epoch).
    pub ckpt_every: Option<u64>,
    /// Validation fraction of a plain label tree.
    pub val_split: f64,
    /// Training augmentation (time shift, gain, background noise when the data has some).
    pub augment: bool,
    /// Clip length in samples (default: the preset's).
    pub clip_len: Option<usize>,
    /// Attention chunk in tokens (default: the preset's).
    pub chunk: Option<usize>,
    /// Decoding threads (0: rayon's global pool).
    pub workers: usize,
    /// Stop after this many steps although the learning-rate schedule spans all epochs (to
    /// split a run in parts; the next part resumes with `allow_changed` holding `steps`).
    pub stop_after: Option<u64>,
}

impl TrainOptions {
    /// Defaults for `data` and `out`: 8 epochs, batch 16, lr 3e-3, 5 % warmup, weight decay
    /// 0.01, seed 0, validation split 0.1, augmentation on.
    pub fn new(data: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            data: data.into(),
            out: out.into(),
            epochs: 8,
            batch: 16,
            lr: 3e-3,
            warmup: 0.05,
            weight_decay: 0.01,
            seed: 0,
            init: None,
            resume: false,
            force: false,
            allow_changed: Vec::new(),
            ckpt_every: None,
            val_split: 0.1,
            augment: true,
            clip_len: None,
            chunk: None,
            workers: 0,
            stop_after: None,
        }
    }

    /// Checks the values; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.epochs >= 1, "--epochs must be at least 1");
        ensure!(self.batch >= 1, "--batch must be at least 1");
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "--lr must be a positive number, got {}",
            self.lr
        );
        ensure!(
            self.warmup.is_finite() && (0.0..1.0).contains(&self.warmup),
            "--warmup must be a fraction in [0, 1), got {}",
            self.warmup
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay must be >= 0, got {}",
            self.weight_decay
        );
        ensure!(
            self.val_split.is_finite() && (0.0..1.0).contains(&self.val_split),
            "--val-split must be a fraction in [0, 1), got {}",
            self.val_split
        );
        ensure!(
            self.ckpt_every != Some(0),
            "--ckpt-every must be at least 1"
        );
        ensure!(self.clip_len != Some(0), "--clip-len must be at least 1");
        ensure!(self.chunk != Some(0), "--chunk must be at least 1");
        ensure!(
            self.stop_after != Some(0),
            "--stop-after must be at least 1"
        );
        ensure!(
            !(self.resume && self.init.is_some()),
            "--resume continues a run with its own weights: it cannot take --init too"
        );
        Ok(())
    }
}

/// What [`train`] reports while it runs (the CLI's progress bar; tests print or ignore).
pub trait TrainHooks {
    /// Called once before the first step with the step count, clips per batch and a
    /// description of the run.
    fn start(&mut self, _steps: u64, _batch: usize, _about: &str) {}
    /// Called after every step.
    fn on_step(&mut self, _log: &StepLog) {}
    /// A line to show (epoch summaries).
    fn println(&mut self, _line: &str) {}
}

/// [`TrainHooks`] that print lines to stdout and nothing per step.
pub struct PrintLines;

impl TrainHooks for PrintLines {
    fn println(&mut self, line: &str) {
        println!("{line}");
    }
}

/// What [`train`] returns.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// The per-step log of this invocation (a resumed run starts after its checkpoint).
    pub logs: Vec<StepLog>,
    /// Total steps of the run.
    pub steps: u64,
    /// Wall seconds of the steps of this invocation (validation included).
    pub seconds: f64,
    /// Training clips per second (steps only, validation excluded).
    pub train_clips_per_second: f64,
    /// The last validation report, if any ran.
    pub last_eval: Option<EvalReport>,
    /// Files skipped as unreadable during training.
    pub skipped: usize,
}

/// Validation at the end of every epoch, epoch summaries, step timing.
struct EpochProgress<'a, H: TrainHooks, D> {
    device: std::marker::PhantomData<D>,
    hooks: &'a mut H,
    val: Option<Loader>,
    per_epoch: u64,
    epochs: u64,
    losses: (f64, u64),
    start: Instant,
    eval_seconds: f64,
    last_eval: Option<EvalReport>,
    data: std::rc::Rc<std::cell::RefCell<StepBatches>>,
    skipped: usize,
}

impl<H: TrainHooks, M: AudioModel<f32, D>, D: MegaDevice<f32>> Progress<M>
    for EpochProgress<'_, H, D>
{
    fn on_step(&mut self, log: &StepLog) {
        self.losses.0 += log.loss;
        self.losses.1 += 1;
        self.hooks.on_step(log);
        if log.step.is_multiple_of(self.per_epoch) && log.val_loss.is_none() {
            // no validation split: still summarise the epoch
            let skipped = self.data.borrow_mut().take_epoch_skipped();
            self.skipped += skipped.len();
            let line = format!(
                "epoch {}/{}: train loss {:.4}, {} skipped file(s){}, {:.0}s elapsed",
                log.step / self.per_epoch,
                self.epochs,
                self.losses.0 / self.losses.1.max(1) as f64,
                skipped.len(),
                example(&skipped),
                self.start.elapsed().as_secs_f64()
            );
            self.hooks.println(&line);
            self.losses = (0.0, 0);
        }
    }

    fn evaluate(&mut self, model: &M, step: u64) -> Result<Option<f64>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        let t = Instant::now();
        let r = evaluate(val, &model.audio_conf().labels, |s, l, n| {
            model.logits_host(s, l, n)
        })?;
        self.eval_seconds += t.elapsed().as_secs_f64();
        let skipped = self.data.borrow_mut().take_epoch_skipped();
        self.skipped += skipped.len();
        let line = format!(
            "epoch {}/{}: train loss {:.4}, val loss {:.4}, val accuracy {:.2}%, {} skipped \
             file(s){}, {:.0}s elapsed (eval {:.1}s)",
            step.div_ceil(self.per_epoch),
            self.epochs,
            self.losses.0 / self.losses.1.max(1) as f64,
            r.mean_loss(),
            100.0 * r.accuracy(),
            skipped.len() + r.skipped,
            example(&skipped),
            self.start.elapsed().as_secs_f64(),
            r.seconds
        );
        self.hooks.println(&line);
        self.losses = (0.0, 0);
        let loss = r.mean_loss();
        self.last_eval = Some(r);
        Ok(Some(loss))
    }
}

fn example(files: &[PathBuf]) -> String {
    files
        .first()
        .map(|f| format!(" (e.g. {})", f.display()))
        .unwrap_or_default()
}

/// Trains a model of type `M` (preset `preset`) on `opts.data` into `opts.out` (see the
/// module docs): fresh, fine-tuned from `opts.init` (same preset; other labels get a new head)
/// or resumed (`opts.resume`). Writes the core's run files (checkpoints, `config.json`,
/// `run.json`, `metrics.csv` with the validation loss, `loss.png`).
pub fn train<M: AudioModel<f32, D>, D: MegaDevice<f32>>(
    dev: &D,
    preset: &AudioPreset,
    opts: &TrainOptions,
    hooks: &mut impl TrainHooks,
) -> Result<TrainSummary> {
    opts.validate()?;
    let splits = AudioSplits::open(&opts.data, opts.val_split, opts.seed)
        .with_context(|| format!("--data {}", opts.data.display()))?;
    let labels = splits.labels().to_vec();
    let mut conf = M::preset_conf(preset, labels.clone())?;
    if let Some(n) = opts.clip_len {
        conf.clip_len = n;
    }
    if let Some(cs) = opts.chunk {
        conf.encoder.chunk_size = cs;
    }
    M::check_conf(&conf)?;
    let mut model = match &opts.init {
        Some(init) => {
            let ctx = || format!("--init {}", init.display());
            let init_conf = load_conf(init).with_context(ctx)?;
            conf.check_init(&init_conf).with_context(ctx)?;
            // the init run's weights under this run's clip length and chunk
            let mut m = M::build(
                dev,
                crate::model::AudioConf {
                    labels: init_conf.labels.clone(),
                    ..conf.clone()
                },
                opts.seed,
            )?;
            let dir = crate::model::resolve_run(init).with_context(ctx)?;
            megalodon_core::checkpoint::load_run_weights(&dir, &mut m).with_context(ctx)?;
            if init_conf.labels != labels {
                hooks.println(&format!(
                    "--init: labels {:?} there, {:?} here: the head is re-initialised",
                    init_conf.labels, labels
                ));
                m.reset_head(labels.clone(), opts.seed)?;
            }
            m
        }
        None => M::build(dev, conf.clone(), opts.seed)?,
    };
    let conf = model.audio_conf().clone();
    let read = ReadOptions::default();
    let augment = if opts.augment {
        Some(Augment::with_noise_files(
            AugmentConfig::default(),
            &splits.noise,
            &read,
        )?)
    } else {
        None
    };
    let mut lc = LoaderConfig::new(
        Clips {
            clip: conf.train_clip(),
            ..Clips::train(augment)
        },
        opts.batch,
    );
    lc.seed = opts.seed;
    lc.drop_last = splits.train.len() >= opts.batch;
    lc.threads = opts.workers;
    let train_loader = Loader::new(splits.train.clone(), lc)?;
    let val_loader = if splits.val.is_empty() {
        None
    } else {
        let mut vc = LoaderConfig::ordered(
            Clips {
                clip: conf.eval_clip(),
                ..Clips::eval()
            },
            opts.batch.max(32),
        );
        vc.threads = opts.workers;
        Some(Loader::new(splits.val.clone(), vc)?)
    };
    let data = std::rc::Rc::new(std::cell::RefCell::new(StepBatches::new(train_loader)?));
    let per_epoch = data.borrow().per_epoch() as u64;
    let steps = opts
        .epochs
        .checked_mul(per_epoch)
        .context("--epochs times batches per epoch overflows")?;
    let optim = OptimConf {
        lr: opts.lr,
        warmup: (steps as f64 * opts.warmup) as usize,
        weight_decay: opts.weight_decay,
        max_steps: usize::try_from(steps).context("step count")?,
        schedule: Schedule::Cosine,
        ..OptimConf::default()
    };
    let identity = format!(
        "{} ({:?}) train {} clips, val {} clips, labels {:?}, noise files {}, batch {}, clip \
         {} samples, augment {}, val split {}, init {:?}",
        opts.data.display(),
        splits.layout,
        splits.train.len(),
        splits.val.len(),
        labels,
        splits.noise.len(),
        opts.batch,
        conf.clip_len,
        opts.augment,
        opts.val_split,
        opts.init
    );
    let fc = FitConf {
        steps: opts.stop_after.map_or(steps, |s| s.min(steps)),
        ckpt_every: opts.ckpt_every.unwrap_or(per_epoch),
        eval_every: if val_loader.is_some() { per_epoch } else { 0 },
        out: Some(opts.out.clone()),
        resume: opts.resume,
        force: opts.force,
        seed: opts.seed,
        data: identity,
        allow_changed: opts.allow_changed.clone(),
    };
    let about = format!(
        "{}: {} train / {} val{} clips, {} labels, {} noise file(s); preset {} ({} params), {} \
         samples per clip, {} per token -> {} tokens, attention chunk {}; {} epochs x {} \
         batches of {} = {} steps; run dir {}",
        opts.data.display(),
        splits.train.len(),
        splits.val.len(),
        splits
            .test
            .as_ref()
            .map(|t| format!(" / {} test", t.len()))
            .unwrap_or_default(),
        labels.len(),
        splits.noise.len(),
        conf.preset,
        param_count(&conf, labels.len())?,
        conf.clip_len,
        conf.frame_len,
        conf.tokens()?,
        conf.encoder.chunk_size,
        opts.epochs,
        per_epoch,
        opts.batch,
        steps,
        opts.out.display()
    );
    hooks.start(fc.steps, opts.batch, &about);
    let start = Instant::now();
    let mut progress = EpochProgress {
        device: std::marker::PhantomData::<D>,
        hooks,
        val: val_loader,
        per_epoch,
        epochs: opts.epochs,
        losses: (0.0, 0),
        start,
        eval_seconds: 0.0,
        last_eval: None,
        data: std::rc::Rc::clone(&data),
        skipped: 0,
    };
    let logs = fit_with(
        &mut model,
        optim,
        &fc,
        |step| data.borrow_mut().get(step),
        &mut progress,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let train_seconds = (seconds - progress.eval_seconds).max(1e-9);
    let clips = (logs.len() as f64) * opts.batch as f64;
    Ok(TrainSummary {
        steps,
        seconds,
        train_clips_per_second: clips / train_seconds,
        last_eval: progress.last_eval,
        skipped: progress.skipped,
        logs,
    })
}

/// The split `audio eval` scores: the data's test split when it has a non-empty one (the
/// Speech Commands layout's `testing_list.txt`, or `test/`), else its validation split, else
/// (a plain tree with `val_split` 0) every file. A plain tree is cut as [`train`] cuts it with
/// the same `val_split` and `seed`. Returns the folder and the split's name.
pub fn eval_split(
    data: &Path,
    val_split: f64,
    seed: u64,
) -> Result<(crate::dataset::AudioFolder, &'static str)> {
    let splits = AudioSplits::open(data, val_split, seed)
        .with_context(|| format!("--data {}", data.display()))?;
    if let Some(t) = splits.test.filter(|t| !t.is_empty()) {
        return Ok((t, "test"));
    }
    if !splits.val.is_empty() {
        return Ok((splits.val, "validation"));
    }
    if splits.train.is_empty() {
        bail!("--data {}: no WAV file to evaluate", data.display());
    }
    Ok((splits.train, "all files"))
}
