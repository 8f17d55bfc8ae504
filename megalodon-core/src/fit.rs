//! One resumable training loop for every head: AdamW with the official defaults, warmup + decay,
//! global-norm clipping, periodic validation, checkpoints, `run.json`, `metrics.csv` and the
//! `loss.png` curves.
//!
//! A head takes part by implementing [`Trainable`]: its parameters ([`Params`]), its buffers and
//! tied keys ([`HasBuffers`]), the config written as `config.json`, and the loss of a batch of
//! its own type. The language model ([`Megalodon`]) implements it here; the classifiers do in
//! their crates.
//!
//! Crash safety: each checkpoint is written completely into `out/ckpt-<step>/` and only then
//! published by atomically rewriting `out/latest` (temp file + rename), so a kill at any moment
//! leaves the previous complete checkpoint in place; only the checkpoint just superseded is then
//! deleted. Batches come from a function of the step number, so a resumed run sees exactly the
//! batches the uninterrupted run would have seen and reproduces it bit for bit. A run directory
//! is never started over unless asked (`force`), and a resumed run must have the settings it was
//! started with (`run.json`), unless a changed setting is named in `allow_changed`.

use crate::checkpoint::{load_checkpoint, save_checkpoint, write_atomic, HasBuffers, TrainState};
use crate::device::MegaDevice;
use crate::nn::model::{cross_entropy, Megalodon};
use crate::optim::{AdamW, OptimConf};
use crate::params::{alloc_grads, Params};
use crate::util::{c, Float};
use anyhow::{bail, ensure, Context, Result};
use dfdx::prelude::*;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the recorded run settings inside a run directory.
pub const RUN_FILE: &str = "run.json";
/// File name of the per-step metrics inside a run directory.
pub const METRICS_FILE: &str = "metrics.csv";
const METRICS_HEADER: &str = "step,loss,lr,grad_norm,val_loss";

/// A model that [`fit`] can train.
pub trait Trainable<E: Float, D: MegaDevice<E>>: Params<E, D> + HasBuffers {
    /// What one training step consumes.
    type Batch;
    /// The model's configuration, written as `config.json` in every checkpoint.
    type Config: Serialize;

    /// The configuration to record.
    fn config(&self) -> Self::Config;

    /// The mean loss of `batch`, carrying a tape that accumulates into `grads` (allocated for
    /// every parameter with [`alloc_grads`]).
    fn loss(
        &self,
        batch: &Self::Batch,
        grads: Gradients<E, D>,
    ) -> Result<Tensor<Rank0, E, D, OwnedTape<E, D>>>;

    /// How many tokens (or examples) `batch` holds, added to `TrainState::tokens_seen`; also a
    /// shard's weight when the ranks of a data-parallel run average their gradients.
    fn batch_len(batch: &Self::Batch) -> u64;

    /// Rank `part`'s shard (of `parts`) of a global batch, for data-parallel training
    /// ([`crate::distributed`]): contiguous rows, see [`crate::distributed::shard_range`]. The
    /// default refuses, so a head that does not implement it trains on one rank only.
    fn shard(batch: &Self::Batch, part: usize, parts: usize) -> Result<Self::Batch> {
        let _ = batch;
        bail!("this model's batches cannot be split across ranks (rank {part} of {parts})")
    }
}

/// One language-model batch: row-major `tokens (B x T)` and next-token `targets` (`None` =
/// ignored).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub tokens: Vec<usize>,
    pub targets: Vec<Option<usize>>,
    pub batch: usize,
    pub seq_len: usize,
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
        E: Float,
        D: MegaDevice<E>,
    > Trainable<E, D> for Megalodon<L, M, Z, V, H, F, N, G, E, D>
{
    type Batch = Batch;
    type Config = crate::config::ModelConf;

    fn config(&self) -> Self::Config {
        self.conf().clone()
    }

    fn loss(
        &self,
        batch: &Batch,
        grads: Gradients<E, D>,
    ) -> Result<Tensor<Rank0, E, D, OwnedTape<E, D>>> {
        let logits = self.forward_train(&batch.tokens, batch.batch, batch.seq_len, grads)?;
        cross_entropy(logits, &batch.targets)
    }

    fn batch_len(batch: &Batch) -> u64 {
        (batch.batch as u64).saturating_mul(batch.seq_len as u64)
    }

    /// Whole rows; the global batch must split evenly (every rank the same number of rows).
    fn shard(b: &Batch, part: usize, parts: usize) -> Result<Batch> {
        ensure!(
            parts > 0 && b.batch.is_multiple_of(parts),
            "a global batch of {} rows cannot be split evenly across {parts} ranks: give a batch \
             size that is a multiple of the rank count",
            b.batch
        );
        let (lo, hi) = crate::distributed::shard_range(b.batch, part, parts)?;
        let t = b.seq_len;
        Ok(Batch {
            tokens: b.tokens[lo * t..hi * t].to_vec(),
            targets: b.targets[lo * t..hi * t].to_vec(),
            batch: hi - lo,
            seq_len: t,
        })
    }
}

/// Loop settings.
#[derive(Debug, Clone, Default)]
pub struct FitConf {
    /// Total optimizer steps.
    pub steps: u64,
    /// Checkpoint every this many steps (0 = only at the end) when `out` is set.
    pub ckpt_every: u64,
    /// Call [`Progress::evaluate`] every this many steps and at the end (0 = never).
    pub eval_every: u64,
    /// Run directory for checkpoints, `run.json` and `metrics.csv`.
    pub out: Option<PathBuf>,
    /// Continue from the latest checkpoint in `out` (a missing or empty `out` starts afresh).
    pub resume: bool,
    /// Start over in a non-empty `out` without resuming (its metrics are replaced).
    pub force: bool,
    /// Seed of the run, recorded and checked on resume.
    pub seed: u64,
    /// Identity of the data and its batching (e.g. file names, sizes and a hash, batch size,
    /// sequence length), recorded and checked on resume.
    pub data: String,
    /// Settings allowed to differ from `run.json` on resume (names as in the mismatch error,
    /// e.g. `steps`, `optim.max_steps`); the new values are recorded.
    pub allow_changed: Vec<String>,
}

/// What one step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLog {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Validation loss, on the steps where [`Progress::evaluate`] ran and returned one.
    pub val_loss: Option<f64>,
}

/// What the loop reports to its caller: every step, and validation on `eval_every` steps (see
/// [`fit_with`]; [`fit`] takes a plain per-step closure).
pub trait Progress<M> {
    /// Called after every step (after its evaluation, if any).
    fn on_step(&mut self, _log: &StepLog) {}
    /// Called every `eval_every` steps and at the last step: the validation loss, if any.
    fn evaluate(&mut self, _model: &M, _step: u64) -> Result<Option<f64>> {
        Ok(None)
    }
}

/// A [`Progress`] that only forwards each step to a closure.
pub struct OnStep<F>(pub F);

impl<M, F: FnMut(&StepLog)> Progress<M> for OnStep<F> {
    fn on_step(&mut self, log: &StepLog) {
        (self.0)(log)
    }
}

/// The settings a run is started with (`run.json`); a resumed run must match them.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct RunSettings {
    pub seed: u64,
    pub steps: u64,
    pub optim: OptimConf,
    pub data: String,
    pub config: serde_json::Value,
}

impl RunSettings {
    /// The names and values of every setting, flattened (`optim.lr`, `config.chunk_size`, ...).
    fn flatten(&self) -> Result<Vec<(String, serde_json::Value)>> {
        let mut out = vec![
            ("seed".to_string(), self.seed.into()),
            ("steps".to_string(), self.steps.into()),
            ("data".to_string(), self.data.clone().into()),
        ];
        let optim = serde_json::to_value(&self.optim).context("serializing the optimizer")?;
        for (prefix, v) in [("optim", &optim), ("config", &self.config)] {
            match v {
                serde_json::Value::Object(m) => {
                    out.extend(m.iter().map(|(k, v)| (format!("{prefix}.{k}"), v.clone())))
                }
                other => out.push((prefix.to_string(), other.clone())),
            }
        }
        Ok(out)
    }

    /// The settings that differ from `old` and are not allowed to, as one message each.
    fn differences(&self, old: &RunSettings, allowed: &[String]) -> Result<Vec<String>> {
        let old: std::collections::BTreeMap<String, serde_json::Value> =
            old.flatten()?.into_iter().collect();
        let mut out = Vec::new();
        for (k, v) in self.flatten()? {
            let before = old.get(&k).cloned().unwrap_or(serde_json::Value::Null);
            if before != v && !allowed.contains(&k) {
                out.push(format!("`{k}`: the run has {before}, now {v}"));
            }
        }
        Ok(out)
    }
}

/// The directory of the latest complete checkpoint in `out`, if `out/latest` exists. `latest`
/// must name a `ckpt-*` directory directly inside `out`.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let p = out.join("latest");
    if !p.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let name = name.trim();
    ensure!(
        !name.is_empty(),
        "{} is empty: it should name the latest checkpoint directory (ckpt-NNNNNNNN); the run \
         directory is damaged",
        p.display()
    );
    ensure!(
        name.starts_with("ckpt-")
            && !name.contains(['/', '\\'])
            && name != "."
            && !name.contains(".."),
        "{} names `{name}`, which is not a checkpoint directory inside {} (expected ckpt-NNNNNNNN)",
        p.display(),
        out.display()
    );
    let dir = out.join(name);
    ensure!(
        dir.is_dir(),
        "{} names {}, which does not exist",
        p.display(),
        dir.display()
    );
    Ok(Some(dir))
}

/// The folder holding `config.json` and `model.safetensors` for `run`: its latest checkpoint
/// when `run` is a training output folder, else `run` itself (a checkpoint or exported run).
pub fn resolve_run(run: &Path) -> Result<PathBuf> {
    ensure!(
        run.is_dir(),
        "run directory {} does not exist or is not a directory",
        run.display()
    );
    if let Some(dir) = latest_checkpoint(run)? {
        return Ok(dir);
    }
    ensure!(
        run.join(crate::checkpoint::CONFIG_FILE).is_file(),
        "{} holds neither a `latest` checkpoint nor a config.json: not a run directory",
        run.display()
    );
    Ok(run.to_path_buf())
}

/// The head config (`config.json`) of a run folder or checkpoint folder (see [`resolve_run`]);
/// `what` names the kind of run in the error when it does not parse (`"an audio run"`).
pub fn load_run_config<C: serde::de::DeserializeOwned>(run: &Path, what: &str) -> Result<C> {
    config_of(run, &resolve_run(run)?, what)
}

/// The config in `dir`, the resolved folder of `run`; errors name `run` and `what`.
fn config_of<C: serde::de::DeserializeOwned>(run: &Path, dir: &Path, what: &str) -> Result<C> {
    crate::checkpoint::load_json(dir).with_context(|| format!("{} is not {what}", run.display()))
}

/// Builds the model of a run from its `config.json` (with `build`) and loads its weights: `run`
/// is a training output folder (its latest checkpoint is used) or a checkpoint folder. `what`
/// names the kind of run in the error when the config does not parse (`"a vision run"`).
pub fn load_trained<C, M, E, D>(
    run: &Path,
    what: &str,
    build: impl FnOnce(C) -> Result<M>,
) -> Result<M>
where
    C: serde::de::DeserializeOwned,
    E: Float,
    D: Device<E>,
    M: Params<E, D> + HasBuffers,
{
    let dir = resolve_run(run)?;
    let conf: C = config_of(run, &dir, what)?;
    let mut model =
        build(conf).with_context(|| format!("building the model of {}", dir.display()))?;
    crate::checkpoint::load_run_weights(&dir, &mut model)
        .with_context(|| format!("loading the weights of {}", dir.display()))?;
    Ok(model)
}

/// One forward/backward/update on `batch`; returns the loss and the step's statistics.
pub fn train_step<E: Float, D: MegaDevice<E>, M: Trainable<E, D>>(
    model: &mut M,
    opt: &mut AdamW<E, D>,
    batch: &M::Batch,
) -> Result<StepLog> {
    let grads = alloc_grads(model)?;
    let loss = model.loss(batch, grads)?;
    let loss_v = loss.as_vec()[0].to_f64().unwrap_or(f64::NAN);
    ensure!(
        loss_v.is_finite(),
        "training diverged: loss is {loss_v} at step {}",
        opt.step + 1
    );
    let mut grads = loss.backward();
    let lr = opt.next_lr();
    let info = opt.step(model, &mut grads, lr)?;
    Ok(StepLog {
        step: opt.step,
        loss: loss_v,
        lr,
        grad_norm: info.grad_norm,
        val_loss: None,
    })
}

/// Whether `dir` exists and holds anything.
fn non_empty(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => Ok(it.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("listing run directory {}", dir.display())),
    }
}

/// Prepares the run directory: resumes (restoring `model`, `opt` and the training state) or
/// starts afresh, checking and recording the run settings.
fn open_run<E: Float, D: MegaDevice<E>, M: Trainable<E, D>>(
    out: &Path,
    conf: &FitConf,
    settings: &RunSettings,
    model: &mut M,
    opt: &mut AdamW<E, D>,
) -> Result<Option<TrainState>> {
    let run_file = out.join(RUN_FILE);
    let latest = latest_checkpoint(out)?;
    if conf.resume {
        if let Some(dir) = latest {
            if run_file.exists() {
                let text = std::fs::read_to_string(&run_file)
                    .with_context(|| format!("reading {}", run_file.display()))?;
                let old: RunSettings = serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", run_file.display()))?;
                let diff = settings.differences(&old, &conf.allow_changed)?;
                if !diff.is_empty() {
                    bail!(
                        "cannot resume {}: settings differ from {} ({}); resume with the \
                         original settings, or allow the change explicitly",
                        out.display(),
                        run_file.display(),
                        diff.join("; ")
                    );
                }
            }
            let state = load_checkpoint(&dir, model, opt)
                .with_context(|| format!("resuming from {}", dir.display()))?;
            ensure!(
                state.seed == conf.seed || conf.allow_changed.iter().any(|s| s == "seed"),
                "cannot resume {}: checkpoint seed {} differs from --seed {}",
                dir.display(),
                state.seed,
                conf.seed
            );
            write_json(&run_file, settings)?;
            return Ok(Some(state));
        }
        ensure!(
            !non_empty(out)?,
            "nothing to resume in {}: it has no `latest` checkpoint but is not empty; start over \
             with --force, or choose an empty --out",
            out.display()
        );
    } else if non_empty(out)? && !conf.force {
        bail!(
            "run directory {} is not empty: pass --resume to continue it or --force to start \
             over in it",
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating run directory {}", out.display()))?;
    write_json(&run_file, settings)?;
    Ok(None)
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).context("serializing run settings")?;
    write_atomic(path, text.as_bytes())
}

/// Trains `model` for `conf.steps` steps on `data(step)` (1-based step numbers). Returns the
/// per-step log of this invocation; `on_step` sees each entry as it happens. No validation: see
/// [`fit_with`].
pub fn fit<E: Float, D: MegaDevice<E>, M: Trainable<E, D>>(
    model: &mut M,
    optim: OptimConf,
    conf: &FitConf,
    data: impl FnMut(u64) -> Result<M::Batch>,
    on_step: impl FnMut(&StepLog),
) -> Result<Vec<StepLog>> {
    fit_with(model, optim, conf, data, &mut OnStep(on_step))
}

/// [`fit`] with a [`Progress`] that sees every step and is asked for the validation loss every
/// `conf.eval_every` steps and at the last step (recorded in `metrics.csv` and the training
/// state's best validation loss).
///
/// **Data-parallel.** When the calling thread's [`crate::distributed::world`] has more than one
/// rank (e.g. under `mpirun -np N` with the `mpi` feature), every rank runs this same call with
/// the same model, seed and data: `data(step)` gives the *global* batch, each rank trains on its
/// shard ([`Trainable::shard`]), and gradients and losses are averaged over the ranks (weighted
/// by [`Trainable::batch_len`]) before the one AdamW step every rank applies, so parameters stay
/// identical (checked every [`SYNC_CHECK_EVERY`] steps and at the end by a checksum). The ranks
/// must have been started with the same settings (checked at the start). Rank 0 alone writes
/// the run directory, reports progress and runs validation; the other ranks read its
/// checkpoint on resume, so the run directory must be on a file system every rank sees.
pub fn fit_with<E: Float, D: MegaDevice<E>, M: Trainable<E, D>>(
    model: &mut M,
    optim: OptimConf,
    conf: &FitConf,
    mut data: impl FnMut(u64) -> Result<M::Batch>,
    progress: &mut impl Progress<M>,
) -> Result<Vec<StepLog>> {
    optim.validate()?;
    let world = crate::distributed::world();
    let (rank, ranks) = (world.rank(), world.size());
    let lead = rank == 0;
    let mut opt = AdamW::<E, D>::new(optim.clone());
    let mut state = TrainState {
        seed: conf.seed,
        ..TrainState::default()
    };
    let settings = RunSettings {
        seed: conf.seed,
        steps: conf.steps,
        optim,
        data: conf.data.clone(),
        config: serde_json::to_value(model.config()).context("serializing the model config")?,
    };
    if ranks > 1 {
        check_same_everywhere(
            &*world,
            &settings,
            "settings (model config, data, seed, steps or optimizer)",
        )?;
    }
    let mut metrics = match (&conf.out, lead) {
        (Some(out), true) => {
            let resumed = open_run(out, conf, &settings, model, &mut opt)?;
            let path = out.join(METRICS_FILE);
            if let Some(s) = resumed {
                state = s;
                truncate_metrics(&path, state.step)?;
            } else {
                write_atomic(&path, format!("{METRICS_HEADER}\n").as_bytes())?;
            }
            let f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            Some((f, path))
        }
        _ => None,
    };
    if ranks > 1 {
        // rank 0 has opened the run directory: the others take the step it resumed from
        let mut step = [state.step as f64];
        world.all_reduce_max(&mut step)?;
        if !lead && step[0] > 0.0 {
            let out = conf
                .out
                .as_deref()
                .context("a resumed run has a run directory")?;
            let dir = latest_checkpoint(out)?.with_context(|| {
                format!(
                    "rank 0 resumed {}, which has no checkpoint here",
                    out.display()
                )
            })?;
            state = load_checkpoint(&dir, model, &mut opt)
                .with_context(|| format!("rank {rank}: resuming from {}", dir.display()))?;
        }
        ensure!(
            state.step as f64 == step[0],
            "rank {rank} resumed at step {} but rank 0 at step {}: is the run directory on a file \
             system every rank sees?",
            state.step,
            step[0]
        );
        check_params_agree(&*world, model, state.step)?;
    }
    // dfdx's allocation cache hands every step the buffers the previous step freed: without it
    // each step's activations are fresh allocations whose pages fault in one by one (a CPU step
    // at 16K tokens took 14.8 s instead of 8.5 s). A step asks for the same sizes every time, so
    // the cache stays the size of one step; it is emptied when training ends.
    let cache_dev = crate::params::device_of(model)?;
    if let Some(dev) = &cache_dev {
        dev.try_enable_cache()
            .map_err(|e| anyhow::anyhow!("enabling the device's allocation cache: {e:?}"))?;
    }
    let mut logs = Vec::new();
    while state.step < conf.steps {
        let batch = data(state.step + 1)?;
        let mut log = if ranks > 1 {
            data_parallel_step(&*world, model, &mut opt, &batch)?
        } else {
            train_step(model, &mut opt, &batch)?
        };
        if let Some(dev) = &cache_dev {
            dev.end_step();
        }
        state.step = log.step;
        state.tokens_seen = state.tokens_seen.saturating_add(M::batch_len(&batch));
        state.last_loss = Some(log.loss);
        if ranks > 1 && (state.step.is_multiple_of(SYNC_CHECK_EVERY) || state.step == conf.steps) {
            check_params_agree(&*world, model, state.step)?;
        }
        if !lead {
            logs.push(log);
            continue;
        }
        let eval_due = conf.eval_every > 0
            && (state.step.is_multiple_of(conf.eval_every) || state.step == conf.steps);
        if eval_due {
            log.val_loss = progress.evaluate(model, state.step)?;
            if let Some(v) = log.val_loss {
                if state.best_val_loss.is_none_or(|b| v < b) {
                    state.best_val_loss = Some(v);
                }
            }
        }
        if let Some((f, path)) = &mut metrics {
            let val = log.val_loss.map(|v| v.to_string()).unwrap_or_default();
            let row = format!(
                "{},{},{},{},{val}\n",
                log.step, log.loss, log.lr, log.grad_norm
            );
            // one write per row, so a kill leaves whole rows (a torn last row is dropped on
            // resume)
            f.write_all(row.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        progress.on_step(&log);
        logs.push(log);
        let due = conf.ckpt_every > 0 && state.step.is_multiple_of(conf.ckpt_every);
        if let (Some(out), true) = (&conf.out, due || state.step == conf.steps) {
            checkpoint(out, model, &opt, &state)?;
            // the curves are a convenience: failing to draw them never stops training
            if let Err(e) = crate::plot::training_curves(out) {
                eprintln!("warning: could not draw the training curves: {e:#}");
            }
        }
    }
    if let Some(dev) = &cache_dev {
        // the buffers of the last step go back to the allocator
        dev.try_empty_cache()
            .map_err(|e| anyhow::anyhow!("emptying the device's allocation cache: {e:?}"))?;
    }
    crate::ops::release_pool();
    Ok(logs)
}

/// How often (in steps) a data-parallel run checks that every rank holds the same parameters.
pub const SYNC_CHECK_EVERY: u64 = 10;

/// One data-parallel step on this rank's shard of the global `batch`: gradients and loss are
/// summed over the ranks weighted by [`Trainable::batch_len`] of each shard, divided by the
/// total weight, and applied by the same AdamW step on every rank.
pub fn data_parallel_step<E: Float, D: MegaDevice<E>, M: Trainable<E, D>>(
    world: &dyn crate::distributed::Collective,
    model: &mut M,
    opt: &mut AdamW<E, D>,
    batch: &M::Batch,
) -> Result<StepLog> {
    let shard = M::shard(batch, world.rank(), world.size())?;
    let w = M::batch_len(&shard) as f64;
    let (loss_v, host) = if w > 0.0 {
        let grads = alloc_grads(model)?;
        let loss = model.loss(&shard, grads)?;
        let loss_v = loss.as_vec()[0].to_f64().unwrap_or(f64::NAN);
        let mut grads = loss.backward();
        (loss_v, crate::optim::grads_to_host(model, &mut grads)?)
    } else {
        // an empty shard contributes nothing but must still take part in the reduction
        let mut grads = alloc_grads(model)?;
        (0.0, crate::optim::grads_to_host(model, &mut grads)?)
    };
    let total: usize = host.iter().map(|(_, g)| g.len()).sum();
    let mut buf = Vec::with_capacity(total + 2);
    buf.push(loss_v * w);
    buf.push(w);
    for (_, g) in &host {
        buf.extend(g.iter().map(|x| x.to_f64().unwrap_or(f64::NAN) * w));
    }
    world.all_reduce_sum(&mut buf)?;
    let weight = buf[1];
    ensure!(
        weight > 0.0,
        "no rank had any data at step {}",
        opt.step + 1
    );
    let loss = buf[0] / weight;
    ensure!(
        loss.is_finite(),
        "training diverged: loss is {loss} at step {}",
        opt.step + 1
    );
    let mut avg = crate::optim::HostGrads::default();
    let mut at = 2;
    for (name, g) in host {
        let n = g.len();
        avg.map.insert(
            name,
            buf[at..at + n]
                .iter()
                .map(|&x| c::<E>(x / weight))
                .collect(),
        );
        at += n;
    }
    let lr = opt.next_lr();
    let info = opt.step(model, &mut avg, lr)?;
    Ok(StepLog {
        step: opt.step,
        loss,
        lr,
        grad_norm: info.grad_norm,
        val_loss: None,
    })
}

/// Errors on every rank unless all ranks hold the same `value` (compared by a CRC-32 of its
/// JSON); `what` names it in the message.
fn check_same_everywhere(
    world: &dyn crate::distributed::Collective,
    value: &impl Serialize,
    what: &str,
) -> Result<()> {
    let text = serde_json::to_string(value).context("serializing the run settings")?;
    let h = f64::from(crc32fast::hash(text.as_bytes()));
    let (lo, hi) = range_over_ranks(world, h)?;
    ensure!(
        lo == hi,
        "the ranks were started with different {what}: rank {} has checksum {h}, another {}; \
         start every rank with the same flags and data",
        world.rank(),
        if hi != h { hi } else { lo }
    );
    Ok(())
}

/// The smallest and largest of every rank's `x` (one all-reduce).
fn range_over_ranks(world: &dyn crate::distributed::Collective, x: f64) -> Result<(f64, f64)> {
    let mut m = [-x, x];
    world.all_reduce_max(&mut m)?;
    Ok((-m[0], m[1]))
}

/// Errors on every rank unless all ranks hold bit-identical parameters (CRC-32 of their values).
fn check_params_agree<E: Float, D: MegaDevice<E>, M: Params<E, D>>(
    world: &dyn crate::distributed::Collective,
    model: &mut M,
    step: u64,
) -> Result<()> {
    struct Sum(crc32fast::Hasher);
    impl<E: Float, D: Device<E>> crate::params::ParamVisitor<E, D> for Sum {
        fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> Result<()> {
            self.0.update(name.as_bytes());
            for x in t.as_vec() {
                self.0.update(&x.to_f64().unwrap_or(f64::NAN).to_le_bytes());
            }
            Ok(())
        }
    }
    let mut v = Sum(crc32fast::Hasher::new());
    model.visit_params("", &mut v)?;
    let h = f64::from(v.0.finalize());
    let (lo, hi) = range_over_ranks(world, h)?;
    ensure!(
        lo == hi,
        "parameters differ between ranks at step {step} (rank {} checksum {h:08}): the ranks \
         no longer train the same model",
        world.rank()
    );
    Ok(())
}

/// Writes a complete checkpoint into `out/ckpt-<step>/`, publishes it in `out/latest`, and then
/// removes the checkpoint that `latest` named before (the one just superseded; nothing else).
/// Failing to remove it is a warning: the new checkpoint is already published.
pub fn checkpoint<E: Float, D: MegaDevice<E>, M: Trainable<E, D>>(
    out: &Path,
    model: &mut M,
    opt: &AdamW<E, D>,
    state: &TrainState,
) -> Result<()> {
    let name = format!("ckpt-{:08}", state.step);
    let dir = out.join(&name);
    let previous = latest_checkpoint(out).ok().flatten();
    let conf = model.config();
    save_checkpoint(&dir, &conf, model, opt, state)?;
    write_atomic(&out.join("latest"), name.as_bytes())?;
    if let Some(prev) = previous {
        if prev != dir {
            if let Err(e) = std::fs::remove_dir_all(&prev) {
                eprintln!(
                    "warning: could not remove the superseded checkpoint {}: {e}",
                    prev.display()
                );
            }
        }
    }
    Ok(())
}

/// Keeps the header and the whole rows of `metrics.csv` logged up to `step` (a resumed run
/// re-logs the later ones; a row torn by a kill is dropped).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let cols = METRICS_HEADER.split(',').count();
    let mut kept = format!("{METRICS_HEADER}\n");
    for line in text.split_inclusive('\n').skip(1) {
        let whole = line.ends_with('\n') && line.trim_end().split(',').count() == cols;
        let keep = whole
            && line
                .split(',')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| s <= step);
        if keep {
            kept.push_str(line);
        }
    }
    write_atomic(path, kept.as_bytes())
}
