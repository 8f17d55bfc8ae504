//! Scaling benchmark: one training step (forward + next-token cross entropy + backward, batch 1,
//! vocabulary 256, random tokens) of the `Small` Megalodon preset at several sequence lengths,
//! beside a standard pre-norm Transformer of the same width and depth whose attention is full
//! causal softmax attention over the whole sequence (T x T scores, upper-triangular -inf mask).
//!
//! ```text
//! cargo run --release --example bench_scaling -- --lengths 1024,4096,16384,65536 --chunk 1024
//! ```
//!
//! Every (model, length) measurement runs in its own child process (this executable re-run with
//! a hidden `--child model:len` flag) so that the peak resident memory (`VmHWM` from
//! `/proc/self/status`) belongs to that configuration alone. The parent prints a markdown table
//! and, last, `cost per token at Lmax / at Lmin = R` for Megalodon.
//!
//! Transformer baseline: D 256, 4 layers, FFN 688 (GELU), a single attention head of width 256
//! (Megalodon `Small` also has a single head), learned token embedding, no position encoding
//! (it does not change the cost), untied output layer, all built from dfdx's `Linear`,
//! `LayerNorm1D` and `Embedding`.

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use dfdx::nn::{modules, DeviceBuildExt, Module};
use dfdx::prelude::*;
use megalodon_core::device::MegaDevice;
use megalodon_core::nn::model::{cross_entropy, param_count, Logits};
use megalodon_core::params::alloc_grads;
use megalodon_core::presets::{Mega200M, Small};
use rand::{Rng, SeedableRng};
use std::process::Command;
use std::time::Instant;

const VOCAB: usize = 256;
const DM: usize = 256;
const FFN: usize = 688;
const LAYERS: usize = 4;
const TF_HEADS: usize = 1;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Time one forward+backward of Megalodon Small vs a full-attention Transformer at several lengths"
)]
struct Args {
    /// Comma-separated sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384,65536")]
    lengths: Vec<usize>,
    /// Megalodon attention chunk size.
    #[arg(long, default_value_t = 1024)]
    chunk: usize,
    /// Timed repetitions per configuration (the median is reported).
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Longest length the Transformer baseline runs at (default: lengths whose f32 T x T score
    /// matrix would exceed ~4 GB are skipped).
    #[arg(long)]
    max_transformer_len: Option<usize>,
    /// Worker threads for the CPU kernels (sets RAYON_NUM_THREADS in the children; default:
    /// rayon's default, one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Do the untimed warm-up run only for lengths up to this one (default: every length). A
    /// cold first step is much slower (fresh pages, empty dfdx allocation cache: 25.5 s against
    /// 10.9 s for Megalodon at 16384 tokens), which would show up as a false super-linear cost.
    #[arg(long)]
    warmup_max_len: Option<usize>,
    /// Compute device: cpu, or cuda (in a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Megalodon preset: small (4 layers, D 256) or mega200m (12 layers, D 1024).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Recompute each Megalodon layer's activations in backward instead of keeping them
    /// (`Backbone::recompute`): less peak memory for one more forward pass per layer.
    #[arg(long)]
    recompute: bool,
    /// Run with dfdx's allocation cache off (the training loop turns it on): every step's
    /// buffers are then fresh allocations, as in a plain dfdx program.
    #[arg(long)]
    no_cache: bool,
    /// Instead of the table: one step of the Megalodon preset at the first length (after a
    /// warm-up step), with the time split per op class (matrix products, CEMA, attention, norms,
    /// elementwise, copies around attention; the rest is the embedding, head, loss and tape).
    #[arg(long)]
    profile: bool,
    /// Internal: run one measurement, `megalodon:LEN` or `transformer:LEN`.
    #[arg(long, hide = true)]
    child: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Transformer baseline
// ---------------------------------------------------------------------------------------------

type Act<D> = Tensor<(usize, Const<DM>), f32, D, OwnedTape<f32, D>>;

struct TfLayer<D: Device<f32>> {
    ln1: modules::LayerNorm1D<DM, f32, D>,
    q: modules::Linear<DM, DM, f32, D>,
    k: modules::Linear<DM, DM, f32, D>,
    v: modules::Linear<DM, DM, f32, D>,
    o: modules::Linear<DM, DM, f32, D>,
    ln2: modules::LayerNorm1D<DM, f32, D>,
    ff1: modules::Linear<DM, FFN, f32, D>,
    ff2: modules::Linear<FFN, DM, f32, D>,
}

struct Transformer<D: Device<f32>> {
    embed: modules::Embedding<VOCAB, DM, f32, D>,
    layers: Vec<TfLayer<D>>,
    ln_f: modules::LayerNorm1D<DM, f32, D>,
    head: modules::Linear<DM, VOCAB, f32, D>,
}

impl<D: MegaDevice<f32>> Transformer<D>
where
    D: DeviceBuildExt,
{
    fn new(dev: &D) -> Self {
        let layers = (0..LAYERS)
            .map(|_| TfLayer {
                ln1: dev.build_module::<builders::LayerNorm1D<DM>, f32>(),
                q: dev.build_module::<builders::Linear<DM, DM>, f32>(),
                k: dev.build_module::<builders::Linear<DM, DM>, f32>(),
                v: dev.build_module::<builders::Linear<DM, DM>, f32>(),
                o: dev.build_module::<builders::Linear<DM, DM>, f32>(),
                ln2: dev.build_module::<builders::LayerNorm1D<DM>, f32>(),
                ff1: dev.build_module::<builders::Linear<DM, FFN>, f32>(),
                ff2: dev.build_module::<builders::Linear<FFN, DM>, f32>(),
            })
            .collect();
        Self {
            embed: dev.build_module::<builders::Embedding<VOCAB, DM>, f32>(),
            layers,
            ln_f: dev.build_module::<builders::LayerNorm1D<DM>, f32>(),
            head: dev.build_module::<builders::Linear<DM, VOCAB>, f32>(),
        }
    }

    fn num_params() -> usize {
        let lin = |i: usize, o: usize| i * o + o;
        let layer = 4 * lin(DM, DM) + lin(DM, FFN) + lin(FFN, DM) + 2 * 2 * DM;
        VOCAB * DM + LAYERS * layer + 2 * DM + lin(DM, VOCAB)
    }

    /// Logits `(1, T, VOCAB)` with a tape into `grads`.
    fn forward_train(
        &self,
        dev: &D,
        tokens: &[usize],
        grads: Gradients<f32, D>,
    ) -> Result<Logits<f32, D, OwnedTape<f32, D>>> {
        let t = tokens.len();
        let idx: Tensor<(usize,), usize, D> = dev.tensor_from_vec(tokens.to_vec(), (t,));
        let mut x: Act<D> = self.embed.weight.clone().traced(grads).gather(idx);
        // full causal mask: -inf strictly above the diagonal, T x T
        let mut mask = vec![0f32; t * t];
        for i in 0..t {
            mask[i * t + i + 1..(i + 1) * t].fill(f32::NEG_INFINITY);
        }
        let mask: Tensor<(usize, usize), f32, D> = dev.tensor_from_vec(mask, (t, t));
        let scale = 1.0 / ((DM / TF_HEADS) as f32).sqrt();
        for l in &self.layers {
            let h = l.ln1.forward(x.with_empty_tape());
            let q = l.q.forward(h.with_empty_tape()) * scale;
            let k = l.k.forward(h.with_empty_tape());
            let v = l.v.forward(h);
            let s = q.matmul(k.permute::<_, Axes2<1, 0>>()); // (T, T)
            let p = (s + mask.clone()).softmax::<Axis<1>>();
            let a = p.matmul(v); // (T, DM)
                                 // `x` keeps the tape of everything before; the branch merges back here
            x = x + l.o.forward(a);
            let h = l.ln2.forward(x.with_empty_tape());
            x = x + l.ff2.forward(l.ff1.forward(h).fast_gelu());
        }
        let y = self.head.forward(self.ln_f.forward(x));
        Ok(y.reshape_like(&(1usize, t, VOCAB)))
    }
}

// ---------------------------------------------------------------------------------------------
// Child: one measurement
// ---------------------------------------------------------------------------------------------

fn vm_hwm_kb() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix("VmHWM:") {
            let kb = rest.trim().trim_end_matches("kB").trim();
            return kb
                .parse()
                .with_context(|| format!("parsing VmHWM line {line:?}"));
        }
    }
    bail!("no VmHWM in /proc/self/status")
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// Runs `step` (returning forward and backward milliseconds) once untimed if `warmup`, then
/// `repeats` times, and returns the per-run (forward, backward) times.
fn measure(
    mut step: impl FnMut() -> Result<(f64, f64)>,
    warmup: bool,
    repeats: usize,
) -> Result<Vec<(f64, f64)>> {
    if warmup {
        step()?;
    }
    (0..repeats.max(1)).map(|_| step()).collect()
}

fn run_child(args: &Args, spec: &str) -> Result<()> {
    let (model, len) = spec.split_once(':').context("--child expects model:len")?;
    let t: usize = len.parse().context("--child length")?;
    match args.device.as_str() {
        "cpu" => {
            let dev: Cpu = Default::default();
            run_child_on(args, model, t, dev, |_| Ok(None))
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            let dev = megalodon_core::device::cuda_device()?;
            let before = megalodon_core::device::cuda_mem_used()?;
            run_child_on(args, model, t, dev, move |_| {
                Ok(Some(
                    megalodon_core::device::cuda_mem_used()?.saturating_sub(before),
                ))
            })
        }
        #[cfg(not(feature = "cuda"))]
        "cuda" => bail!("--device cuda: this binary was built without the `cuda` feature"),
        other => bail!("--device must be cpu or cuda, got {other:?}"),
    }
}

/// Times `forward` (a loss carrying its tape) and the backward from it, with the device
/// synchronised after each (kernels are asynchronous on CUDA): (forward ms, backward ms).
fn fwd_bwd<D: Device<f32> + Synchronize>(
    dev: &D,
    forward: impl FnOnce() -> Result<Tensor<Rank0, f32, D, OwnedTape<f32, D>>>,
) -> Result<(f64, f64)> {
    let sync = || dev.try_synchronize().map_err(|e| anyhow::anyhow!("{e:?}"));
    let t0 = Instant::now();
    let loss = forward()?;
    sync()?;
    let t1 = Instant::now();
    let g = loss.backward();
    sync()?;
    let t2 = Instant::now();
    drop(g);
    Ok(((t1 - t0).as_secs_f64() * 1e3, (t2 - t1).as_secs_f64() * 1e3))
}

/// One fwd+bwd step of a Megalodon preset `$ty` on `$dev`, timed by `measure`.
macro_rules! megalodon_runs {
    ($ty:ident, $dev:expr, $args:expr, $tokens:expr, $targets:expr, $t:expr, $warmup:expr) => {{
        let conf = $ty::<f32, D>::default_conf($args.chunk, VOCAB);
        let params = param_count(&conf);
        let mut m = $ty::<f32, D>::new($dev, conf, 0)?;
        m.backbone.recompute = $args.recompute;
        let runs = measure(
            || {
                let grads = alloc_grads(&mut m)?;
                fwd_bwd($dev, || {
                    cross_entropy(m.forward_train($tokens, 1, $t, grads)?, $targets)
                })
            },
            $warmup,
            $args.repeats,
        )?;
        (runs, params)
    }};
}

/// The measurement on device `dev`; `device_mem` reports the device memory the run holds
/// (`None` on the CPU, where the peak resident memory is read instead).
fn run_child_on<D: MegaDevice<f32> + Cache + Synchronize + DeviceBuildExt>(
    args: &Args,
    model: &str,
    t: usize,
    dev: D,
    device_mem: impl Fn(&D) -> Result<Option<usize>>,
) -> Result<()> {
    if !args.no_cache {
        dev.enable_cache();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    let seq: Vec<usize> = (0..=t).map(|_| rng.gen_range(0..VOCAB)).collect();
    let tokens = seq[..t].to_vec();
    let targets: Vec<Option<usize>> = seq[1..].iter().map(|&x| Some(x)).collect();
    let warmup = args.warmup_max_len.is_none_or(|m| t <= m);
    let hwm_before = vm_hwm_kb()?;
    let (runs, params) = match (model, args.preset.as_str()) {
        ("megalodon", "small") => megalodon_runs!(Small, &dev, args, &tokens, &targets, t, warmup),
        ("megalodon", "mega200m") => {
            megalodon_runs!(Mega200M, &dev, args, &tokens, &targets, t, warmup)
        }
        ("megalodon", other) => bail!("--preset must be small or mega200m, got {other:?}"),
        ("transformer", _) => {
            let m = Transformer::<D>::new(&dev);
            let runs = measure(
                || {
                    fwd_bwd(&dev, || {
                        cross_entropy(
                            m.forward_train(&dev, &tokens, Gradients::leaky())?,
                            &targets,
                        )
                    })
                },
                warmup,
                args.repeats,
            )?;
            (runs, Transformer::<D>::num_params())
        }
        (other, _) => bail!("unknown model {other:?}"),
    };
    let total: Vec<f64> = runs.iter().map(|(f, b)| f + b).collect();
    let fwd: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let bwd: Vec<f64> = runs.iter().map(|r| r.1).collect();
    // On a GPU the peak is the device memory dfdx holds after the step: its allocation cache
    // keeps every buffer the step freed, so this is the most the step had at once.
    let peak_kb = match device_mem(&dev)? {
        Some(bytes) => (bytes / 1024) as u64,
        None => vm_hwm_kb()?,
    };
    let out = serde_json::json!({
        "model": model,
        "len": t,
        "ms": median(&total),
        "fwd_ms": median(&fwd),
        "bwd_ms": median(&bwd),
        "runs_ms": total,
        "warmup": warmup,
        "peak_kb": peak_kb,
        "hwm_before_kb": hwm_before,
        "params": params,
    });
    println!("{out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parent
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Cell {
    Ok { ms: f64, peak_mb: f64 },
    Skipped,
    Failed(String),
}

fn spawn_child(args: &Args, model: &str, len: usize) -> Cell {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return Cell::Failed(format!("current_exe: {e}")),
    };
    let mut cmd = Command::new(exe);
    cmd.arg("--child")
        .arg(format!("{model}:{len}"))
        .arg("--chunk")
        .arg(args.chunk.to_string())
        .arg("--repeats")
        .arg(args.repeats.to_string())
        .arg("--device")
        .arg(&args.device)
        .arg("--preset")
        .arg(&args.preset);
    if let Some(m) = args.warmup_max_len {
        cmd.arg("--warmup-max-len").arg(m.to_string());
    }
    if args.no_cache {
        cmd.arg("--no-cache");
    }
    if args.recompute {
        cmd.arg("--recompute");
    }
    if let Some(n) = args.threads {
        cmd.env("RAYON_NUM_THREADS", n.to_string());
    }
    let wall = Instant::now();
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => return Cell::Failed(format!("spawn: {e}")),
    };
    let wall = wall.elapsed().as_secs_f64();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            if let Some(sig) = out.status.signal() {
                let why = if sig == 9 {
                    "killed (SIGKILL: out of memory?)".to_string()
                } else {
                    format!("killed by signal {sig}")
                };
                eprintln!("[{model} T={len}] {why} after {wall:.1} s; stderr: {tail}");
                return Cell::Failed(why);
            }
        }
        eprintln!(
            "[{model} T={len}] failed ({}) after {wall:.1} s; stderr: {tail}",
            out.status
        );
        return Cell::Failed(format!("failed ({})", out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(v) = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    else {
        return Cell::Failed("no result from child".into());
    };
    let ms = v["ms"].as_f64().unwrap_or(f64::NAN);
    let peak_mb = v["peak_kb"].as_f64().unwrap_or(f64::NAN) / 1024.0;
    eprintln!(
        "[{model} T={len}] {ms:.1} ms (forward {:.1} + backward {:.1}; runs {}; warm-up {}), peak {peak_mb:.0} MB (at start {:.0} MB), {} params, child wall {wall:.1} s",
        v["fwd_ms"].as_f64().unwrap_or(f64::NAN),
        v["bwd_ms"].as_f64().unwrap_or(f64::NAN),
        v["runs_ms"],
        v["warmup"],
        v["hwm_before_kb"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        v["params"],
    );
    Cell::Ok { ms, peak_mb }
}

/// Lengths whose single f32 T x T score matrix (per head) stays under ~4 GB.
fn transformer_fits(args: &Args, len: usize) -> bool {
    match args.max_transformer_len {
        Some(m) => len <= m,
        None => (TF_HEADS * len * len * 4) as f64 <= 4.0e9,
    }
}

fn cells(c: &Cell, len: usize) -> [String; 3] {
    match c {
        Cell::Ok { ms, peak_mb } => [
            format!("{ms:.1}"),
            format!("{:.0}", len as f64 / (ms / 1e3)),
            format!("{peak_mb:.0}"),
        ],
        Cell::Skipped => ["skipped (T^2 memory)".into(), "-".into(), "-".into()],
        Cell::Failed(why) => [why.clone(), "-".into(), "-".into()],
    }
}

/// Time per token at the largest successful length over that at the smallest.
fn cost_ratio(rows: &[(usize, Cell)]) -> Option<(usize, usize, f64)> {
    let ok: Vec<(usize, f64)> = rows
        .iter()
        .filter_map(|(l, c)| match c {
            Cell::Ok { ms, .. } => Some((*l, *ms)),
            _ => None,
        })
        .collect();
    let lo = ok.iter().min_by_key(|x| x.0)?;
    let hi = ok.iter().max_by_key(|x| x.0)?;
    Some((hi.0, lo.0, (hi.1 / hi.0 as f64) / (lo.1 / lo.0 as f64)))
}

fn run_parent(args: &Args) -> Result<()> {
    if args.lengths.is_empty() {
        bail!("--lengths is empty");
    }
    let start = Instant::now();
    let threads = args.threads.map(|n| n.to_string()).unwrap_or_else(|| {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        format!("default ({n} cores)")
    });
    let (desc, mparams) = match args.preset.as_str() {
        "small" => (
            "Megalodon Small (4 layers, D 256, H 1, Z 64, E 512, F 688, N 16, G 32",
            param_count(&Small::<f32, Cpu>::default_conf(args.chunk, VOCAB)),
        ),
        "mega200m" => (
            "Megalodon Mega200M (12 layers, D 1024, H 1, Z 256, E 2048, F 2560, N 16, G 32",
            param_count(&Mega200M::<f32, Cpu>::default_conf(args.chunk, VOCAB)),
        ),
        other => bail!("--preset must be small or mega200m, got {other:?}"),
    };
    let (device, peak) = match args.device.as_str() {
        "cpu" => (format!("CPU, threads {threads}"), "peak = the process's VmHWM"),
        "cuda" => (
            "CUDA device 0".to_string(),
            "peak MB = device memory held after the step (dfdx's cache keeps what the step freed), less what was in use before the model was built",
        ),
        other => bail!("--device must be cpu or cuda, got {other:?}"),
    };
    println!(
        "{desc}, chunk {}, {mparams} params{}) vs pre-norm Transformer (4 layers, D 256, FFN 688, {} head of width {}, full causal T x T attention, {} params); batch 1, vocabulary {VOCAB}, f32, {device}; one forward + cross entropy + backward, median of {} run(s) after {}; {peak}.",
        args.chunk,
        if args.recompute {
            ", layers recomputed in backward"
        } else {
            ""
        },
        TF_HEADS,
        DM / TF_HEADS,
        Transformer::<Cpu>::num_params(),
        args.repeats.max(1),
        match args.warmup_max_len {
            Some(m) => format!("an untimed warm-up run for T <= {m}"),
            None => "an untimed warm-up run".to_string(),
        },
    );
    println!();
    let mut meg = Vec::new();
    let mut tf = Vec::new();
    for &len in &args.lengths {
        meg.push((len, spawn_child(args, "megalodon", len)));
        let c = if transformer_fits(args, len) {
            spawn_child(args, "transformer", len)
        } else {
            eprintln!("[transformer T={len}] skipped (T^2 memory)");
            Cell::Skipped
        };
        tf.push((len, c));
    }
    println!("| length | Megalodon ms | Megalodon tokens/s | Megalodon peak MB | Transformer ms | Transformer tokens/s | Transformer peak MB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for ((len, m), (_, t)) in meg.iter().zip(&tf) {
        let [a, b, c] = cells(m, *len);
        let [d, e, f] = cells(t, *len);
        println!("| {len} | {a} | {b} | {c} | {d} | {e} | {f} |");
    }
    println!();
    eprintln!("total wall time {:.1} s", start.elapsed().as_secs_f64());
    match cost_ratio(&tf) {
        Some((hi, lo, r)) => {
            println!("Transformer (lengths it ran): cost per token at {hi} / at {lo} = {r:.2}")
        }
        None => println!("Transformer (lengths it ran): no length ran"),
    }
    match cost_ratio(&meg) {
        Some((hi, lo, r)) => println!("cost per token at {hi} / at {lo} = {r:.2}"),
        None => bail!("Megalodon ran at no length"),
    }
    Ok(())
}

/// `--profile`: one step of the preset at `lengths[0]` on the CPU, split per op class.
fn run_profile(args: &Args) -> Result<()> {
    use megalodon_core::profile::{self, OpClass};
    ensure!(
        args.device == "cpu",
        "--profile runs on the CPU (--device cpu)"
    );
    let t = *args.lengths.first().context("--lengths is empty")?;
    let dev: Cpu = Default::default();
    if !args.no_cache {
        dev.enable_cache();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    let seq: Vec<usize> = (0..=t).map(|_| rng.gen_range(0..VOCAB)).collect();
    let (tokens, targets): (Vec<usize>, Vec<Option<usize>>) = (
        seq[..t].to_vec(),
        seq[1..].iter().map(|&x| Some(x)).collect(),
    );
    macro_rules! step {
        ($ty:ident) => {{
            let conf = $ty::<f32, Cpu>::default_conf(args.chunk, VOCAB);
            let mut m = $ty::<f32, Cpu>::new(&dev, conf, 0)?;
            m.backbone.recompute = args.recompute;
            let mut one = || -> Result<(f64, f64)> {
                let grads = alloc_grads(&mut m)?;
                fwd_bwd(&dev, || {
                    cross_entropy(m.forward_train(&tokens, 1, t, grads)?, &targets)
                })
            };
            one()?; // warm-up: fresh pages and an empty allocation cache
            profile::enable(true);
            let r = one();
            profile::enable(false);
            r?
        }};
    }
    let (fwd_ms, bwd_ms) = match args.preset.as_str() {
        "small" => step!(Small),
        "mega200m" => step!(Mega200M),
        other => bail!("--preset must be small or mega200m, got {other:?}"),
    };
    // enable(false) kept the report; read it before anything clears it
    let r = profile::report();
    let total = fwd_ms + bwd_ms;
    println!(
        "one step of {} at {t} tokens (chunk {}{}), CPU, {} threads: forward {fwd_ms:.0} ms, backward {bwd_ms:.0} ms",
        args.preset,
        args.chunk,
        if args.recompute { ", layers recomputed" } else { "" },
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| format!(
            "{} (all cores)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ))
    );
    println!();
    println!("| op class | forward ms | backward ms | total ms | share of the step |");
    println!("|---|---:|---:|---:|---:|");
    let (mut f_sum, mut b_sum) = (0.0, 0.0);
    for c in OpClass::ALL {
        let (f, b) = (r.forward[c as usize] * 1e3, r.backward[c as usize] * 1e3);
        f_sum += f;
        b_sum += b;
        println!(
            "| {} | {f:.0} | {b:.0} | {:.0} | {:.1}% |",
            c.name(),
            f + b,
            100.0 * (f + b) / total
        );
    }
    let rest = (total - f_sum - b_sum).max(0.0);
    if args.recompute {
        // the recomputed forward passes run inside backward: their regions count as forward
        println!(
            "| other (embedding, head, loss, tape bookkeeping) | - | - | {rest:.0} | {:.1}% |",
            100.0 * rest / total
        );
    } else {
        let (fo, bo) = ((fwd_ms - f_sum).max(0.0), (bwd_ms - b_sum).max(0.0));
        println!(
            "| other (embedding, head, loss, tape bookkeeping) | {fo:.0} | {bo:.0} | {:.0} | {:.1}% |",
            fo + bo,
            100.0 * (fo + bo) / total
        );
    }
    println!("| **step** | {fwd_ms:.0} | {bwd_ms:.0} | {total:.0} | 100% |");
    if args.recompute {
        println!();
        println!(
            "(with --recompute the forward column includes the forward passes recomputed during \
             backward; the step's backward time includes them too)"
        );
    }
    println!();
    println!(
        "allocation has no row: dfdx allocates inside its ops, so that time is in the op's class"
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.profile && args.child.is_none() {
        return run_profile(&args);
    }
    match &args.child {
        Some(spec) => run_child(&args, spec),
        None => run_parent(&args),
    }
}
