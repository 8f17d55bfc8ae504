//! Streaming benchmark: decodes a long input one token at a time through the streaming engine
//! (`megalodon_core::engine`) with `Small` (batch 1, vocabulary 256, f32, random weights and
//! tokens), computing every token's logits as generation does, and prints at 1K, 10K, 100K and
//! 1M tokens the tokens/s of the last interval and the resident memory; then the dfdx
//! `forward_stream` path at 1K and 10K tokens and the matrix-vector products alone, and last
//! `cost per token at N / at 1K = R, memory growth = M MiB`.
//!
//! ```text
//! cargo run --release --example bench_stream -- --tokens 1000000 [--device cpu|cuda] [--int8]
//! ```
//!
//! With `--device cuda` the engine's CUDA backend streams (any build: CUDA 13 is loaded at run
//! time) and the memory column is the device memory in use; `--int8` runs the CPU engine on int8
//! weights.

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use dfdx::prelude::*;
use megalodon_core::engine::cuda::{CudaEngine, Precision};
use megalodon_core::engine::{Engine, StreamBackend, Want};
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
    /// Where the engine runs: cpu or cuda (GPU 0).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight-only int8 quantisation of the CPU engine.
    #[arg(long)]
    int8: bool,
    /// bf16 weights and matrix-product inputs on the CUDA engine (with `--device cuda`).
    #[arg(long)]
    bf16: bool,
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

/// Streams `a.tokens` random tokens one at a time through `engine`; a row `(tokens, tokens/s of
/// the last interval, memory MiB)` per checkpoint, memory read by `mem`.
fn stream_rows<B: StreamBackend>(
    engine: &B,
    state: &mut B::State,
    a: &Args,
    rng: &mut rand::rngs::StdRng,
    mem: impl Fn() -> Result<f64>,
) -> Result<Vec<(u64, f64, f64)>> {
    let mut sink = 0f32;
    let mut done = 0u64;
    let mut rows = Vec::new();
    let t_all = Instant::now();
    for cp in checkpoints(a.tokens) {
        let t0 = Instant::now();
        while done < cp {
            let tok = rng.gen_range(0..VOCAB);
            engine.feed(state, &[tok], Want::Last, &mut |_, row| sink += row[tok])?;
            done += 1;
        }
        let secs = t0.elapsed().as_secs_f64();
        let n = cp - rows.last().map_or(0, |r: &(u64, f64, f64)| r.0);
        let m = mem()?;
        let tps = n as f64 / secs;
        println!("| {cp} | {tps:.0} | {m:.1} |");
        rows.push((cp, tps, m));
        ensure!(sink.is_finite(), "non-finite logits");
    }
    eprintln!(
        "engine: {done} tokens in {:.1} s",
        t_all.elapsed().as_secs_f64()
    );
    Ok(rows)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let cuda = match a.device.as_str() {
        "cpu" => false,
        "cuda" => true,
        other => bail!("--device must be cpu or cuda, got {other:?}"),
    };
    ensure!(
        !(cuda && a.int8),
        "--int8 is a CPU option: the CUDA engine runs f32 weights"
    );
    ensure!(
        !a.bf16 || cuda,
        "--bf16 is a CUDA option: add --device cuda (the CPU engine has --int8)"
    );
    ensure!(a.tokens >= 1000, "--tokens must be at least 1000");
    let dev = Cpu::default();
    let conf = Small::<f32, Cpu>::default_conf(a.chunk, VOCAB);
    let mut model = Small::<f32, Cpu>::new(&dev, conf.clone(), a.seed)?;
    let mut engine = Engine::from_model(&mut model, &conf)?;
    if a.int8 {
        engine.quantize_int8();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed ^ 0x5eed);
    let gpu = if cuda {
        let precision = if a.bf16 {
            Precision::Bf16
        } else {
            Precision::F32
        };
        Some(CudaEngine::with_precision(&engine, 0, precision).context("--device cuda")?)
    } else {
        None
    };
    let (where_, state_kib) = match &gpu {
        Some(g) => (
            g.device_name.clone(),
            CudaEngine::state_bytes(&g.new_state(1)?) as f64 / 1024.0,
        ),
        None => (
            format!(
                "CPU, {} cores",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
            Engine::state_bytes(&engine.new_state(1)?) as f64 / 1024.0,
        ),
    };
    println!(
        "Small (4 layers, D 256, Z 64, V 512, F 688, N 16, chunk {}), vocabulary {VOCAB}, {}, batch 1, {where_}; \
         engine weights {:.1} MiB, stream state {state_kib:.0} KiB; one token per step, every token's logits computed",
        a.chunk,
        if a.int8 {
            "int8 weights"
        } else if a.bf16 {
            "bf16 products"
        } else {
            "f32"
        },
        gpu.as_ref().map_or(engine.weight_bytes(), |g| g.weight_bytes()) as f64 / 1048576.0
    );
    println!();
    let (rows, bound) = match &gpu {
        Some(g) => {
            println!("| tokens processed | engine tokens/s (last interval) | device MiB in use |");
            println!("|---:|---:|---:|");
            let mut state = g.new_state(1)?;
            let mem = || Ok(g.device_mem_used()? as f64 / 1048576.0);
            let rows = stream_rows(g, &mut state, &a, &mut rng, mem)?;
            (rows, 1.0 / g.time_matvecs(&mut state, 2000)?)
        }
        None => {
            println!("| tokens processed | engine tokens/s (last interval) | resident MiB |");
            println!("|---:|---:|---:|");
            let mut state = engine.new_state(1)?;
            let rows = stream_rows(&engine, &mut state, &a, &mut rng, rss_mib)?;
            (rows, 1.0 / engine.time_matvecs(&mut state, 2000))
        }
    };
    println!();
    let mut sink = 0f32;
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
        println!("| dfdx forward_stream (CPU), up to {cp} tokens | {tps:.0} |");
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
    let growth = last.2 - rows[0].2;
    println!(
        "cost per token at {} / at 1K = {:.2}, memory growth = {:.1} MiB",
        last.0,
        engine_1k / last.1,
        growth
    );
    Ok(())
}
