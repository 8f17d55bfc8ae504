//! Data-parallel throughput on MPI: training tokens/s of the `Small` LM (fwd+bwd+AdamW) and the
//! time of the gradient all-reduce per step. Build with `--features mpi`, then compare, on the
//! same machine, one rank with all the threads against several ranks with fewer:
//!
//! ```sh
//! cargo build --release -p megalodon-core --features mpi --example bench_mpi
//! RAYON_NUM_THREADS=2 mpirun --allow-run-as-root -np 1 target/release/examples/bench_mpi
//! RAYON_NUM_THREADS=1 mpirun --allow-run-as-root -np 2 -x RAYON_NUM_THREADS target/release/examples/bench_mpi
//! ```
//!
//! Flags: `--seq-len T` (default 1024), `--batch B` (global rows per step, default 2),
//! `--steps S` (timed steps after one warm-up, default 5). Rank 0 prints one table row.

use std::time::Instant;

use anyhow::{Context, Result};
use dfdx::prelude::*;
use megalodon_core::distributed::world;
use megalodon_core::fit::{data_parallel_step, train_step, Batch};
use megalodon_core::optim::{AdamW, OptimConf};
use megalodon_core::params::{ParamVisitor, Params};
use megalodon_core::presets::Small;

fn flag(name: &str, default: usize) -> Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a whole number")),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let guard = megalodon_core::distributed::init_mpi()?;
    let result = run();
    guard.finish(result)
}

fn run() -> Result<()> {
    let (seq, batch, steps) = (
        flag("--seq-len", 1024)?,
        flag("--batch", 2)?,
        flag("--steps", 5)?,
    );
    let w = world();
    anyhow::ensure!(
        batch.is_multiple_of(w.size()),
        "--batch {batch} must be a multiple of the {} ranks",
        w.size()
    );
    let dev: Cpu = Default::default();
    let vocab = 256;
    let mut model = Small::<f32, Cpu>::new(&dev, Small::<f32, Cpu>::default_conf(256, vocab), 0)?;
    let mut opt = AdamW::<f32, Cpu>::new(OptimConf::default());
    let mut rng = megalodon_core::data::SplitMix64::new(7);
    let n = batch * seq;
    let tokens: Vec<usize> = (0..n).map(|_| rng.below(vocab as u64) as usize).collect();
    let b = Batch {
        targets: (0..n)
            .map(|i| (i % seq + 1 < seq).then(|| tokens[i + 1]))
            .collect(),
        tokens,
        batch,
        seq_len: seq,
    };
    let step = |m: &mut Small<f32, Cpu>, o: &mut AdamW<f32, Cpu>| {
        if w.size() > 1 {
            data_parallel_step(&*w, m, o, &b)
        } else {
            train_step(m, o, &b)
        }
    };
    step(&mut model, &mut opt)?; // warm-up
    let t = Instant::now();
    for _ in 0..steps {
        step(&mut model, &mut opt)?;
    }
    let per_step = t.elapsed().as_secs_f64() / steps as f64;
    // the communication of one step alone: an all-reduce of one f64 per parameter (+2)
    struct Count(usize);
    impl ParamVisitor<f32, Cpu> for Count {
        fn visit<S: Shape>(&mut self, _: &str, t: &mut Tensor<S, f32, Cpu>) -> Result<()> {
            self.0 += t.shape().num_elements();
            Ok(())
        }
    }
    let mut c = Count(0);
    model.visit_params("", &mut c)?;
    let mut buf = vec![1.0f64; c.0 + 2];
    let t = Instant::now();
    for _ in 0..steps {
        w.all_reduce_sum(&mut buf)?;
    }
    let reduce = t.elapsed().as_secs_f64() / steps as f64;
    if w.rank() == 0 {
        let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
        println!("| ranks | threads/rank | tokens/step | s/step | tokens/s | all-reduce ms/step ({} params) |", c.0);
        println!("|---|---|---|---|---|---|");
        println!(
            "| {} | {threads} | {n} | {per_step:.3} | {:.0} | {:.1} |",
            w.size(),
            n as f64 / per_step,
            reduce * 1e3
        );
    }
    Ok(())
}
