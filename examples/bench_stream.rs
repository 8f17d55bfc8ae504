//! Streaming benchmark: decodes a long input one token at a time through the streaming engine
//! (`megalodon_core::engine`) with `Small` (batch 1, vocabulary 256, f32, random weights and
//! tokens), computing every token's logits as generation does, and prints at 1K, 10K, 100K and
//! 1M tokens the tokens/s of the last interval and the resident memory; then the dfdx
//! `forward_stream` path at 1K and 10K tokens and the matrix-vector products alone, and last
//! `cost per token at N / at 1K = R, memory growth = M MiB`.
//!
//! ```text
//! cargo run --release --example bench_stream -- --tokens 1000000
//! ```

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use dfdx::prelude::*;
use megalodon_core::engine::{Engine, Want};
use megalodon_core::presets::Small;
use rand::{Rng, SeedableRng};
use std::time::Instant;

const VOCAB: usize = 256;

#[derive(Parser, Debug)]
#[command(
    about = "Tokens/s and memory of the streaming engine over a long stream, beside the dfdx path"
)]
struct Args {
    /// Tokens to stream (checkpoints at 1K, 10K, 100K, 1M, ... up to this).
    #[arg(long, default_value_t = 1_000_000)]
    tokens: u64,
    /// Attention chunk size.
    #[arg(long, default_value_t = 1024)]
    chunk: usize,
    /// Tokens of the dfdx forward_stream reference (checkpoints 1K and 10K; 0 skips it).
    #[arg(long, default_value_t = 10_000)]
    dfdx_tokens: u64,
    /// Compute device: cpu (the CUDA engine is not built yet).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Random seed (weights and tokens).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn rss_mib() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kb: f64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("parsing {line:?}"))?;
            return Ok(kb / 1024.0);
        }
    }
    bail!("no VmRSS in /proc/self/status")
}

fn checkpoints(total: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let mut c = 1000u64;
    while c < total {
        v.push(c);
        c = c.saturating_mul(10);
    }
    v.push(total);
    v
}

fn main() -> Result<()> {
    let a = Args::parse();
    match a.device.as_str() {
        "cpu" => {}
        "cuda" => bail!(
            "--device cuda: the streaming engine's CUDA backend is not built yet (see the \
             README's streaming section); the CPU engine is"
        ),
        other => bail!("--device must be cpu or cuda, got {other:?}"),
    }
    ensure!(a.tokens >= 1000, "--tokens must be at least 1000");
    let dev = Cpu::default();
    let conf = Small::<f32, Cpu>::default_conf(a.chunk, VOCAB);
    let mut model = Small::<f32, Cpu>::new(&dev, conf.clone(), a.seed)?;
    let engine = Engine::from_model(&mut model, &conf)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed ^ 0x5eed);
    let mut state = engine.new_state(1)?;
    let state_kib = Engine::state_bytes(&state) as f64 / 1024.0;
    println!(
        "Small (4 layers, D 256, Z 64, V 512, F 688, N 16, chunk {}), vocabulary {VOCAB}, f32, batch 1, CPU, {} cores; \
         engine weights {:.1} MiB, stream state {state_kib:.0} KiB; one token per step, every token's logits computed",
        a.chunk,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        engine.weight_bytes() as f64 / 1048576.0
    );
    println!();
    println!("| tokens processed | engine tokens/s (last interval) | resident MiB |");
    println!("|---:|---:|---:|");
    let rss0 = rss_mib()?;
    let mut sink = 0f32;
    let mut done = 0u64;
    let mut rows = Vec::new();
    let mut first_rss = None;
    let t_all = Instant::now();
    for cp in checkpoints(a.tokens) {
        let t0 = Instant::now();
        while done < cp {
            let tok = rng.gen_range(0..VOCAB);
            engine.feed(&mut state, &[tok], Want::Last, |_, row| sink += row[tok])?;
            done += 1;
        }
        let secs = t0.elapsed().as_secs_f64();
        let n = cp - rows.last().map_or(0, |r: &(u64, f64, f64)| r.0);
        let rss = rss_mib()?;
        first_rss.get_or_insert(rss);
        let tps = n as f64 / secs;
        println!("| {cp} | {tps:.0} | {rss:.1} |");
        rows.push((cp, tps, rss));
        ensure!(sink.is_finite(), "non-finite logits");
    }
    eprintln!(
        "engine: {} tokens in {:.1} s; memory before the stream {rss0:.1} MiB",
        done,
        t_all.elapsed().as_secs_f64()
    );
    println!();
    // the matrix-vector products alone
    let per_tok = engine.time_matvecs(&mut state, 2000);
    let bound = 1.0 / per_tok;
    // the dfdx reference path
    let mut dfdx_rows = Vec::new();
    if a.dfdx_tokens > 0 {
        let mut ds = model.new_state(1);
        let mut done = 0u64;
        for cp in [1000u64, 10_000]
            .into_iter()
            .filter(|&c| c <= a.dfdx_tokens)
        {
            let t0 = Instant::now();
            while done < cp {
                let tok = rng.gen_range(0..VOCAB);
                let l = model.forward_stream(&[tok], 1, 1, &mut ds)?;
                sink += l.as_vec()[tok];
                ensure!(sink.is_finite(), "non-finite dfdx logits");
                done += 1;
            }
            let n = cp - dfdx_rows.last().map_or(0, |r: &(u64, f64)| r.0);
            dfdx_rows.push((cp, n as f64 / t0.elapsed().as_secs_f64()));
        }
    }
    let engine_1k = rows[0].1;
    println!("| path | tokens/s |");
    println!("|---|---:|");
    println!("| matrix-vector products alone (bound) | {bound:.0} |");
    println!("| engine, first 1K tokens | {engine_1k:.0} |");
    let steady = rows.last().map_or(engine_1k, |r| r.1);
    println!("| engine, last interval | {steady:.0} |");
    for (cp, tps) in &dfdx_rows {
        println!("| dfdx forward_stream, up to {cp} tokens | {tps:.0} |");
    }
    println!();
    println!(
        "engine decode = {:.0}% of the matrix-vector bound",
        100.0 * steady / bound
    );
    if let Some((_, d)) = dfdx_rows.last() {
        println!("engine / dfdx forward_stream = {:.1}x", steady / d);
    }
    let last = rows.last().expect("at least one checkpoint");
    let growth = last.2 - first_rss.unwrap_or(last.2);
    println!(
        "cost per token at {} / at 1K = {:.2}, memory growth = {:.1} MiB",
        last.0,
        engine_1k / last.1,
        growth
    );
    Ok(())
}
