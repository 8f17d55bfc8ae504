//! Data-parallel training on MPI (`--features mpi`; needs `mpirun`, e.g. Debian's openmpi-bin).
//!
//! The tests launch `mpirun -np 2` on this test binary itself: the ignored test `rank` is the
//! program every rank runs (it trains the tiny LM through `fit` under `init_mpi`, with its
//! settings in `MEGALODON_MPI_JOB`), and the other tests compare what the ranks wrote with a
//! single-process run computed here.
//!
//! Tolerance of "2 ranks = 1 rank": the two runs differ only in how the batch's gradient is
//! summed (two half-batch means in f32, combined in f64, against one mean over the whole batch in
//! f32), a few float32 roundings per step; AdamW divides by `sqrt(v)`, so those relative
//! differences of ~1e-7 stay relative. Measured over 20 steps: losses within 2.0e-7 (relative),
//! parameters within 9.9e-7 (absolute); asserted at 2e-6 and 1e-5 (10x).
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dfdx::prelude::*;
use megalodon_core::distributed::init_mpi;
use megalodon_core::fit::{fit, Batch, FitConf};
use megalodon_core::golden::max_abs_diff;
use megalodon_core::optim::OptimConf;
use megalodon_core::params::param_values;
use megalodon_core::presets::{Tiny, TINY_CHUNK};
use serde::{Deserialize, Serialize};

const VOCAB: usize = 16;
const SEQ: usize = 12;

/// What one launch trains (the same on every rank unless `seed_per_rank`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    steps: u64,
    batch: usize,
    out: Option<PathBuf>,
    resume: bool,
    ckpt_every: u64,
    /// Where rank 0 writes its losses and parameters (JSON).
    result: PathBuf,
    /// Folder where every rank writes `pid-<rank>` when it starts.
    pids: PathBuf,
    /// Milliseconds each step sleeps (to leave time to kill a rank).
    sleep_ms: u64,
    /// Start rank `r` with seed `r` (a misconfigured launch).
    seed_per_rank: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Trained {
    losses: Vec<f64>,
    params: Vec<f64>,
}

/// A batch of a copy-like task: the second half of each row repeats the first; step and row
/// seed the tokens.
fn batch_for(step: u64, batch: usize) -> Batch {
    let mut rng = megalodon_core::data::SplitMix64::from_keys(&[step, 99]);
    let mut tokens = Vec::new();
    let mut targets = Vec::new();
    for _ in 0..batch {
        let half: Vec<usize> = (0..SEQ / 2)
            .map(|_| rng.below(VOCAB as u64) as usize)
            .collect();
        let row: Vec<usize> = half.iter().chain(half.iter()).copied().collect();
        for t in 0..SEQ {
            tokens.push(row[t]);
            targets.push(row.get(t + 1).copied());
        }
    }
    Batch {
        tokens,
        targets,
        batch,
        seq_len: SEQ,
    }
}

fn params_of(m: &mut Tiny<f32, Cpu>) -> Vec<f64> {
    param_values(m)
        .unwrap()
        .into_iter()
        .flat_map(|(_, v)| v.into_iter().map(f64::from))
        .collect()
}

/// Trains the tiny LM as `job` says on the calling thread's collective.
fn train(job: &Job, seed: u64) -> Result<Trained> {
    let dev: Cpu = Default::default();
    let conf = Tiny::<f32, Cpu>::default_conf(TINY_CHUNK, VOCAB);
    let mut model = Tiny::<f32, Cpu>::new(&dev, conf, seed)?;
    let optim = OptimConf {
        lr: 3e-3,
        warmup: 2,
        max_steps: job.steps as usize,
        ..OptimConf::default()
    };
    let fc = FitConf {
        steps: job.steps,
        ckpt_every: job.ckpt_every,
        out: job.out.clone(),
        resume: job.resume,
        seed,
        data: format!("copy task, batch {}", job.batch),
        ..FitConf::default()
    };
    let sleep = Duration::from_millis(job.sleep_ms);
    let logs = fit(
        &mut model,
        optim,
        &fc,
        |s| {
            std::thread::sleep(sleep);
            Ok(batch_for(s, job.batch))
        },
        |_| {},
    )?;
    Ok(Trained {
        losses: logs.iter().map(|l| l.loss).collect(),
        params: params_of(&mut model),
    })
}

/// The program of one rank (run by `mpirun` through [`mpirun`]; skipped otherwise).
#[test]
#[ignore = "one MPI rank: started by the other tests through mpirun"]
fn rank() {
    let job: Job = serde_json::from_str(&std::env::var("MEGALODON_MPI_JOB").unwrap()).unwrap();
    let guard = init_mpi().unwrap();
    let r = guard.rank();
    std::fs::write(
        job.pids.join(format!("pid-{r}")),
        std::process::id().to_string(),
    )
    .unwrap();
    let seed = if job.seed_per_rank { r as u64 } else { 0 };
    let res = train(&job, seed).and_then(|t| {
        if r == 0 {
            std::fs::write(&job.result, serde_json::to_string(&t)?)
                .with_context(|| format!("writing {}", job.result.display()))?;
        }
        Ok(())
    });
    // an error aborts every rank (prints "error on rank r of n: ..."); success finalises MPI
    guard.finish(res).unwrap();
}

fn job(dir: &Path, steps: u64, batch: usize) -> Job {
    let pids = dir.join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    Job {
        steps,
        batch,
        out: None,
        resume: false,
        ckpt_every: 0,
        result: dir.join("result.json"),
        pids,
        sleep_ms: 0,
        seed_per_rank: false,
    }
}

fn mpirun_command(np: usize, job: &Job) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(np.to_string())
        .args(["-x", "MEGALODON_MPI_JOB", "-x", "RAYON_NUM_THREADS"])
        .arg(exe)
        .args([
            "--ignored",
            "--exact",
            "rank",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MEGALODON_MPI_JOB", serde_json::to_string(job).unwrap())
        .env("RAYON_NUM_THREADS", "1");
    c
}

fn mpirun(np: usize, job: &Job) -> Output {
    mpirun_command(np, job)
        .output()
        .expect("mpirun (Debian: openmpi-bin) must be installed for --features mpi tests")
}

fn read_result(job: &Job) -> Trained {
    serde_json::from_str(&std::fs::read_to_string(&job.result).unwrap()).unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Largest relative difference (`|a - b| / max(|b|, 1e-3)`); NaN anywhere counts as infinite.
fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs() / y.abs().max(1e-3);
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_train_like_one() {
    let dir = tempfile::tempdir().unwrap();
    let j = job(dir.path(), 20, 4);
    let single = train(&j, 0).unwrap();
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    assert!(
        mean(&single.losses[15..]) < mean(&single.losses[..5]) - 0.1,
        "the reference run learns: {:?}",
        single.losses
    );
    let o = mpirun(2, &j);
    assert!(o.status.success(), "{}", text(&o));
    let two = read_result(&j);
    let (dl, dp) = (
        max_rel(&two.losses, &single.losses),
        max_abs_diff(&two.params, &single.params),
    );
    eprintln!("2 ranks against 1: losses within {dl:.2e} (relative), parameters within {dp:.2e}");
    assert_eq!(two.losses.len(), 20);
    assert!(dl < 2e-6, "losses differ by {dl:e}");
    assert!(dp < 1e-5, "parameters differ by {dp:e}");
    // and the batch really was split: a global batch of 3 rows cannot be
    let o = mpirun(2, &job(&dir.path().join("odd"), 2, 3));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("cannot be split evenly across 2 ranks"), "{t}");
}

#[test]
fn ranks_started_differently_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = job(dir.path(), 3, 4);
    j.seed_per_rank = true;
    let o = mpirun(2, &j);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("started with different settings"), "{t}");
}

#[test]
fn killing_a_rank_stops_the_run_and_the_last_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut j = job(dir.path(), 40, 4);
    j.out = Some(out.clone());
    j.ckpt_every = 5;
    j.sleep_ms = 100;
    let mut child = mpirun_command(2, &j)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait for the second checkpoint, then kill rank 1
    let start = Instant::now();
    while std::fs::read_to_string(out.join("latest")).unwrap_or_default() < "ckpt-00000010".into() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        assert!(child.try_wait().unwrap().is_none(), "mpirun ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = std::fs::read_to_string(j.pids.join("pid-1")).unwrap();
    let killed = Instant::now();
    let k = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(k.success());
    let o = child.wait_with_output().unwrap();
    let waited = killed.elapsed();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        waited < Duration::from_secs(15),
        "the other rank took {waited:?} to stop"
    );
    eprintln!("after killing rank 1, mpirun ended in {waited:?}");
    let latest = std::fs::read_to_string(out.join("latest")).unwrap();
    assert!(latest.as_str() >= "ckpt-00000010" && latest.as_str() < "ckpt-00000040");

    // resume on 2 ranks: the same result as an uninterrupted 2-rank run
    j.resume = true;
    j.sleep_ms = 0;
    let o = mpirun(2, &j);
    assert!(o.status.success(), "{}", text(&o));
    let resumed = read_result(&j);
    let mut whole = job(&dir.path().join("whole"), 40, 4);
    whole.out = Some(dir.path().join("whole/run"));
    whole.ckpt_every = 5;
    let o = mpirun(2, &whole);
    assert!(o.status.success(), "{}", text(&o));
    let whole = read_result(&whole);
    assert_eq!(resumed.params, whole.params, "resume reproduces the run");
    let k = 40 - resumed.losses.len();
    assert_eq!(resumed.losses, whole.losses[k..]);
}
