//! A minimal, resumable language-model training loop: AdamW with the official defaults,
//! warmup + linear decay, global-norm clipping, periodic checkpoints and `metrics.csv`.
//!
//! Crash safety: each checkpoint is written completely into `out/ckpt-<step>/` and only then
//! published by atomically rewriting `out/latest` (temp file + rename), so a kill at any moment
//! leaves the previous complete checkpoint in place. Batches come from a function of the step
//! number, so a resumed run sees exactly the batches the uninterrupted run would have seen and
//! reproduces it.

use crate::checkpoint::write_atomic;
use crate::device::MegaDevice;
use crate::nn::model::{cross_entropy, Megalodon};
use crate::params::alloc_grads;
use crate::train::{load_checkpoint, save_checkpoint, AdamW, OptimConf, TrainState};
use crate::util::Float;
use anyhow::{ensure, Context, Result};
use dfdx::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One training batch: row-major `tokens (B x T)` and next-token `targets` (`None` = ignored).
pub struct Batch {
    pub tokens: Vec<usize>,
    pub targets: Vec<Option<usize>>,
    pub batch: usize,
    pub seq_len: usize,
}

/// Loop settings.
#[derive(Debug, Clone)]
pub struct FitConf {
    /// Total optimizer steps.
    pub steps: u64,
    /// Checkpoint every this many steps (0 = only at the end) when `out` is set.
    pub ckpt_every: u64,
    /// Run directory for checkpoints and `metrics.csv`.
    pub out: Option<PathBuf>,
    /// Continue from the latest checkpoint in `out` if there is one.
    pub resume: bool,
    /// Seed recorded in the training state.
    pub seed: u64,
}

/// What one step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepLog {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

/// The directory of the latest complete checkpoint in `out`, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let p = out.join("latest");
    if !p.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let dir = out.join(name.trim());
    ensure!(
        dir.is_dir(),
        "{} names {}, which does not exist",
        p.display(),
        dir.display()
    );
    Ok(Some(dir))
}

/// One forward/backward/update on `batch`; returns the loss and the step's statistics.
pub fn train_step<
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
>(
    model: &mut Megalodon<L, M, Z, V, H, F, N, G, E, D>,
    opt: &mut AdamW<E, D>,
    batch: &Batch,
) -> Result<StepLog> {
    let grads = alloc_grads(model)?;
    let logits = model.forward_train(&batch.tokens, batch.batch, batch.seq_len, grads)?;
    let loss = cross_entropy(logits, &batch.targets)?;
    let loss_v = loss.as_vec()[0].to_f64().unwrap_or(f64::NAN);
    ensure!(
        loss_v.is_finite(),
        "training diverged: loss is {loss_v} at step {}",
        opt.step + 1
    );
    let grads = loss.backward();
    let lr = opt.next_lr();
    let info = opt.step(model, &grads, lr)?;
    Ok(StepLog {
        step: opt.step,
        loss: loss_v,
        lr,
        grad_norm: info.grad_norm,
    })
}

/// Trains `model` for `conf.steps` steps on `data(step)` (1-based step numbers). Returns the
/// per-step log of this invocation; `on_step` sees each entry as it happens.
#[allow(clippy::too_many_arguments)]
pub fn fit<
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
>(
    model: &mut Megalodon<L, M, Z, V, H, F, N, G, E, D>,
    optim: OptimConf,
    conf: &FitConf,
    mut data: impl FnMut(u64) -> Result<Batch>,
    mut on_step: impl FnMut(&StepLog),
) -> Result<Vec<StepLog>> {
    let mut opt = AdamW::<E, D>::new(optim);
    let mut state = TrainState {
        seed: conf.seed,
        ..TrainState::default()
    };
    if let (Some(out), true) = (&conf.out, conf.resume) {
        if let Some(dir) = latest_checkpoint(out)? {
            state = load_checkpoint(&dir, model, &mut opt)
                .with_context(|| format!("resuming from {}", dir.display()))?;
        }
    }
    let mut metrics = match &conf.out {
        Some(out) => {
            std::fs::create_dir_all(out)
                .with_context(|| format!("creating run directory {}", out.display()))?;
            let path = out.join("metrics.csv");
            let fresh = !path.exists() || state.step == 0;
            if !fresh {
                truncate_metrics(&path, state.step)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(!fresh)
                .write(true)
                .truncate(fresh)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            if fresh {
                writeln!(f, "step,loss,lr,grad_norm")
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Some((f, path))
        }
        None => None,
    };
    let mut logs = Vec::new();
    while state.step < conf.steps {
        let batch = data(state.step + 1)?;
        let log = train_step(model, &mut opt, &batch)?;
        state.step = log.step;
        state.tokens_seen += (batch.batch * batch.seq_len) as u64;
        state.last_loss = Some(log.loss);
        if let Some((f, path)) = &mut metrics {
            writeln!(f, "{},{},{},{}", log.step, log.loss, log.lr, log.grad_norm)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        on_step(&log);
        logs.push(log);
        let due = conf.ckpt_every > 0 && state.step.is_multiple_of(conf.ckpt_every);
        if let (Some(out), true) = (&conf.out, due || state.step == conf.steps) {
            checkpoint(out, model, &opt, &state)?;
        }
    }
    Ok(logs)
}

/// Writes a complete checkpoint into `out/ckpt-<step>/`, publishes it in `out/latest`, and
/// removes older checkpoint directories.
pub fn checkpoint<
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
>(
    out: &Path,
    model: &mut Megalodon<L, M, Z, V, H, F, N, G, E, D>,
    opt: &AdamW<E, D>,
    state: &TrainState,
) -> Result<()> {
    let name = format!("ckpt-{:08}", state.step);
    let dir = out.join(&name);
    let conf = model.conf.clone();
    save_checkpoint(&dir, &conf, model, opt, state)?;
    write_atomic(&out.join("latest"), name.as_bytes())?;
    for entry in std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))? {
        let entry = entry.with_context(|| format!("listing {}", out.display()))?;
        let fname = entry.file_name().to_string_lossy().to_string();
        if fname.starts_with("ckpt-") && fname != name {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing old checkpoint {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Drops the rows of `metrics.csv` logged after `step` (a resumed run re-logs them).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut kept = String::new();
    for (i, line) in text.lines().enumerate() {
        let keep = i == 0
            || line
                .split(',')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| s <= step);
        if keep {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    write_atomic(path, kept.as_bytes())
}
