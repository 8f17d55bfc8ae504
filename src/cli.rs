//! What the example CLIs share: one flag vocabulary (`--data`, `--out`, `--run`, `--init`,
//! `--resume`, `--force`, `--steps`/`--epochs`, `--batch`, `--lr`, `--preset`, `--seed`,
//! `--device`) and a progress bar that is a [`Progress`] of the core's training loop.

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use megalodon_core::fit::{Progress, StepLog};
use std::path::PathBuf;
use std::time::Instant;

/// Flags of every `train` subcommand.
#[derive(Args, Debug, Clone)]
pub struct TrainFlags {
    /// Run directory: config, weights, optimizer state, run.json, metrics.csv, loss.png.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Fine-tune from the weights of this run directory (a checkpoint or a finished run).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue the interrupted run in --out from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start over in a non-empty --out (its checkpoints are replaced as the new run saves).
    #[arg(long)]
    pub force: bool,
    /// Settings allowed to differ from the run's run.json on --resume (e.g. steps).
    #[arg(long = "allow-change", value_delimiter = ',')]
    pub allow_changed: Vec<String>,
    /// Examples (or sequences) per batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Random seed (init, data order, augmentation).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint every this many steps.
    #[arg(long)]
    pub ckpt_every: Option<u64>,
    /// Compute device: `cpu` (or `cuda` in a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl TrainFlags {
    /// Checks the flag values that clap cannot; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        if self.batch == Some(0) {
            bail!("--batch must be at least 1");
        }
        if let Some(b) = self.batch {
            check_global_batch(b)?;
        }
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr > 0.0) {
                bail!("--lr must be a positive number, got {lr}");
            }
        }
        if self.ckpt_every == Some(0) {
            bail!("--ckpt-every must be at least 1");
        }
        check_device(&self.device)?;
        if self.resume && self.init.is_some() {
            bail!("--resume continues a run with its own weights: it cannot take --init too");
        }
        Ok(())
    }
}

/// Runs a CLI's work as one rank of a data-parallel run when `mpirun` started this process and
/// the binary has the `mpi` feature (MPI is initialised, and an error on any rank aborts them
/// all), else alone. A binary without the feature refuses to run under `mpirun -np N > 1`.
pub fn run_distributed<T>(body: impl FnOnce() -> Result<T>) -> Result<T> {
    megalodon_core::distributed::check_not_launched_without_mpi()?;
    #[cfg(feature = "mpi")]
    if megalodon_core::distributed::launched_by_mpirun() {
        let guard = megalodon_core::distributed::init_mpi()?;
        let result = body();
        return guard.finish(result);
    }
    body()
}

/// Whether this process is rank 0 (the one that prints and writes) of its run.
pub fn is_lead() -> bool {
    megalodon_core::distributed::world().rank() == 0
}

/// Checks that the global batch `batch` (`--batch`) splits evenly across the ranks of the run.
pub fn check_global_batch(batch: usize) -> Result<()> {
    let ranks = megalodon_core::distributed::world().size();
    if !batch.is_multiple_of(ranks) {
        bail!(
            "--batch {batch} is the global batch: it must be a multiple of the {ranks} ranks \
             (each takes batch / ranks rows)"
        );
    }
    Ok(())
}

/// Accepts `cpu`, and `cuda` in a build with the `cuda` feature (without it, an error says so).
pub fn check_device(device: &str) -> Result<()> {
    match device {
        "cpu" => Ok(()),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(()),
        #[cfg(not(feature = "cuda"))]
        "cuda" => bail!(
            "--device cuda: this binary was built without CUDA; build it with `--features cuda` \
             (see docs/cuda.md)"
        ),
        other => bail!("--device must be `cpu` or `cuda`, got `{other}`"),
    }
}

/// Runs `$body` with `$D` naming the device type of the `--device` value `$device` and `$dev`
/// bound to that device (`cpu`: dfdx's `Cpu`; `cuda`: CUDA device 0, in a build with the `cuda`
/// feature). An unknown or unavailable device is an error naming the flag.
#[macro_export]
macro_rules! on_device {
    ($device:expr, $D:ident, $dev:ident => $body:expr) => {
        match $device {
            "cpu" => {
                type $D = dfdx::prelude::Cpu;
                let $dev = <$D as Default>::default();
                $body
            }
            #[cfg(feature = "cuda")]
            "cuda" => {
                type $D = dfdx::prelude::Cuda;
                let $dev = $crate::core::device::cuda_device()
                    .map_err(|e| anyhow::anyhow!("--device cuda: {e:#}"))?;
                $body
            }
            other => {
                $crate::cli::check_device(other)?;
                unreachable!("check_device accepted {other}")
            }
        }
    };
}

/// A terminal progress bar over the training steps (step, loss, validation loss, examples or
/// tokens per second, ETA), fed by the core's training loop.
pub struct Bar {
    bar: ProgressBar,
    unit: &'static str,
    per_step: u64,
    start: Instant,
    first_step: Option<u64>,
    smooth: Option<f64>,
    val: Option<f64>,
}

impl Bar {
    /// A bar for `steps` steps of `per_step` `unit`s each (e.g. tokens or clips).
    pub fn new(steps: u64, per_step: u64, unit: &'static str) -> Self {
        let bar = ProgressBar::new(steps);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Self {
            bar,
            unit,
            per_step,
            start: Instant::now(),
            first_step: None,
            smooth: None,
            val: None,
        }
    }

    /// Prints a line above the bar.
    pub fn println(&self, msg: impl AsRef<str>) {
        self.bar.println(msg.as_ref());
    }

    /// Ends the bar, leaving it on screen.
    pub fn finish(&self) {
        self.bar.finish();
    }

    /// Records one step.
    pub fn step(&mut self, log: &StepLog) {
        let first = *self.first_step.get_or_insert(log.step.saturating_sub(1));
        self.bar.set_position(log.step);
        let s = match self.smooth {
            Some(s) => 0.95 * s + 0.05 * log.loss,
            None => log.loss,
        };
        self.smooth = Some(s);
        if log.val_loss.is_some() {
            self.val = log.val_loss;
        }
        let done = (log.step - first) as f64;
        let rate = done * self.per_step as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let val = self.val.map(|v| format!(" val {v:.4}")).unwrap_or_default();
        self.bar.set_message(format!(
            "loss {:.4} (avg {s:.4}){val} lr {:.1e} {rate:.0} {}/s",
            log.loss, log.lr, self.unit
        ));
    }
}

impl<M> Progress<M> for Bar {
    fn on_step(&mut self, log: &StepLog) {
        self.step(log)
    }
}
