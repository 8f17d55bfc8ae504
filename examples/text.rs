//! The text language model end to end: train (or fine-tune, or resume) on the bundled Shakespeare
//! corpus or your own text, generate, evaluate at growing context, and compare with a
//! full-attention Transformer.
//!
//! ```text
//! cargo run --release --example text -- train                 # bundled corpus -> runs/text/
//! cargo run --release --example text -- generate --run runs/text --prompt "ROMEO:" --tokens 200
//! cargo run --release --example text -- eval --run runs/text --data FILE --context 512,2048
//! cargo run --release --example text -- compare
//! ```
//! Offline and on the CPU. See `megalodon-text/README.md` for measured figures.

use anyhow::{ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use megalodon::cli::{check_device, Bar, TrainFlags};
use megalodon_core::device::MegaDevice;
use megalodon_core::engine::cuda::Precision;
use megalodon_core::nn::model::Rewindow;
use megalodon_core::plot::{line_plot, Series};
use megalodon_core::presets::{Small, Tiny};
use megalodon_text::baseline::{compare, CompareOptions};
use megalodon_text::{
    bits_per_byte, Corpus, LanguageModel, Preset, Sampling, TextCpu, TextModel, TrainEvent,
    TrainOptions,
};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

type Cpu = dfdx::prelude::Cpu;

/// Runs `$body` with `$T` bound to the model type of `$preset` on device type `$D`.
macro_rules! with_preset {
    ($preset:expr, $D:ty, $T:ident => $body:expr) => {
        match $preset {
            Preset::Cpu => {
                type $T = TextCpu<f32, $D>;
                $body
            }
            Preset::Small => {
                type $T = Small<f32, $D>;
                $body
            }
            Preset::Tiny => {
                type $T = Tiny<f32, $D>;
                $body
            }
        }
    };
}

#[derive(Parser, Debug)]
#[command(about = "Megalodon language model on text: train, generate, eval, compare")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train a tokenizer and a Megalodon LM (defaults: the bundled corpus, runs/text).
    Train(TrainArgs),
    /// Continue a prompt, streaming the tokens as they come.
    Generate(GenerateArgs),
    /// Perplexity and bits per byte of a text at several context lengths (same scored tokens).
    Eval(EvalArgs),
    /// Megalodon vs a same-size full-attention Transformer: same tokens, steps and schedule.
    Compare(CompareArgs),
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    common: TrainFlags,
    /// Corpus: a .txt file or a folder of .txt files (default: the bundled Shakespeare).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Use this tokenizer.json instead of training a BPE.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Vocabulary of the trained BPE tokenizer.
    #[arg(long, default_value_t = 2048)]
    vocab_size: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 260)]
    steps: u64,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Model preset: cpu (default), small, tiny.
    #[arg(long, default_value = "cpu")]
    preset: Preset,
    /// Recompute each layer's activations in backward instead of keeping them: about half the
    /// peak memory for about a quarter more time per step (long sequences).
    #[arg(long)]
    recompute: bool,
    /// Attention chunk size (default: the preset's, 128 for cpu/small).
    #[arg(long)]
    chunk: Option<usize>,
    /// Validation every this many steps.
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Validation tokens scored per evaluation.
    #[arg(long, default_value_t = 16384)]
    val_tokens: usize,
    /// Warmup steps.
    #[arg(long, default_value_t = 50)]
    warmup: u64,
    /// Prompt of the sample printed at the end.
    #[arg(long, default_value = "ROMEO:\n")]
    prompt: String,
    /// Tokens of that sample (0 = none).
    #[arg(long, default_value_t = 120)]
    sample_tokens: usize,
}

#[derive(Args, Debug)]
struct SampleFlags {
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus: keep the most likely tokens up to this probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed of the draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SampleFlags {
    fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_k: (self.top_k > 0).then_some(self.top_k),
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Run directory (or checkpoint directory).
    #[arg(long)]
    run: PathBuf,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    #[command(flatten)]
    sample: SampleFlags,
    /// Run the dfdx model's forward_stream instead of the streaming engine (the reference path).
    #[arg(long)]
    reference: bool,
    /// Where the streaming engine runs: `cpu`, `cuda` or `cuda:N` (any build: CUDA 13 is loaded
    /// at run time).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight-only int8 quantisation of the CPU engine (about 4x less weight memory).
    #[arg(long)]
    int8: bool,
    /// bf16 weights and matrix-product inputs on the CUDA engine (with `--device cuda`).
    #[arg(long)]
    bf16: bool,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// Run directory (or checkpoint directory).
    #[arg(long)]
    run: PathBuf,
    /// Text to evaluate: a .txt file or a folder of .txt files.
    #[arg(long)]
    data: PathBuf,
    /// Context lengths (tokens before each scored span).
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192,32768")]
    context: Vec<usize>,
    /// Tokens scored per span.
    #[arg(long, default_value_t = 1024)]
    scored: usize,
    /// Spans, spread evenly over the text.
    #[arg(long, default_value_t = 4)]
    segments: usize,
    /// PNG plot of perplexity against context (default: RUN/eval_context.png).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Re-windowed TimestepNorm statistics (the official long-context evaluation: a sliding
    /// window of 8 chunks refreshed every 2) instead of cumulative ones.
    #[arg(long)]
    rewindow: bool,
    /// Run the dfdx model's forward_stream instead of the streaming engine (the reference path).
    #[arg(long)]
    reference: bool,
    /// Where the streaming engine runs: `cpu`, `cuda` or `cuda:N` (any build: CUDA 13 is loaded
    /// at run time).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight-only int8 quantisation of the CPU engine (about 4x less weight memory).
    #[arg(long)]
    int8: bool,
    /// bf16 weights and matrix-product inputs on the CUDA engine (with `--device cuda`).
    #[arg(long)]
    bf16: bool,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Corpus (default: the bundled Shakespeare).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Optimizer steps of each model.
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Peak learning rate (both models).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Vocabulary of the BPE tokenizer.
    #[arg(long, default_value_t = 2048)]
    vocab_size: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Validation every this many steps.
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Where to write the validation curves (PNG).
    #[arg(long, default_value = "runs/text-compare.png")]
    plot: PathBuf,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    megalodon::cli::run_distributed(|| run(cli))
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train(a) => train(a),
        Cmd::Generate(a) => {
            let preset = Preset::of_run(&a.run)?;
            with_preset!(preset, Cpu, T => generate::<T>(&a))
        }
        Cmd::Eval(a) => {
            let preset = Preset::of_run(&a.run)?;
            with_preset!(preset, Cpu, T => eval::<T>(&a))
        }
        Cmd::Compare(a) => run_compare(&a),
    }
}

fn train(a: TrainArgs) -> Result<()> {
    a.common.validate()?;
    check_device(&a.common.device)?;
    let out = a
        .common
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/text"));
    let mut o = TrainOptions::new(&out, a.preset.default_chunk());
    o.data = a.data.clone();
    o.tokenizer = a.tokenizer.clone();
    o.vocab_size = a.vocab_size;
    o.init = a.common.init.clone();
    o.resume = a.common.resume;
    o.force = a.common.force;
    o.allow_changed = a.common.allow_changed.clone();
    o.steps = a.steps;
    o.seq_len = a.seq_len;
    o.batch = a.common.batch.unwrap_or(o.batch);
    o.lr = a.common.lr.unwrap_or(o.lr);
    o.warmup = a.warmup;
    o.chunk = a.chunk;
    o.seed = a.common.seed;
    o.eval_every = a.eval_every;
    o.ckpt_every = a.common.ckpt_every.unwrap_or(o.ckpt_every);
    o.val_tokens = a.val_tokens;
    o.recompute = a.recompute;
    megalodon::on_device!(a.common.device.as_str(), D, dev => {
        with_preset!(a.preset, D, T => train_preset::<T, D>(&dev, &a, &o))
    })
}

fn train_preset<P: TextModel<D>, D: MegaDevice<f32>>(
    dev: &D,
    a: &TrainArgs,
    o: &TrainOptions,
) -> Result<()> {
    let mut bar: Option<Bar> = None;
    let t0 = std::time::Instant::now();
    // the other ranks of a data-parallel run train silently
    let lead = megalodon::cli::is_lead();
    let (lm, report) = megalodon_text::train_on::<P, D>(dev, o, |ev| match ev {
        _ if !lead => Ok(()),
        TrainEvent::Ready(info) => {
            println!(
                "corpus {}: {} train bytes -> {} tokens, {} validation bytes -> {} tokens ({} scored per evaluation)",
                info.source.display(),
                info.train_bytes,
                info.train_tokens,
                info.val_bytes,
                info.val_tokens,
                info.val_scored
            );
            println!(
                "tokenizer: {} ids ({}); unigram entropy {:.3} nats/token, unigram validation loss {:.3}",
                info.vocab_size,
                if info.trained_tokenizer { "byte-level BPE trained on the training text" } else { "loaded" },
                info.unigram_entropy,
                info.unigram_val_loss
            );
            println!(
                "model: preset {}, {} parameters; {} steps of {} tokens",
                a.preset.name(),
                info.params,
                o.steps,
                info.tokens_per_step
            );
            bar = Some(Bar::new(o.steps, info.tokens_per_step as u64, "tok"));
            Ok(())
        }
        TrainEvent::Step(log) => {
            if let Some(b) = bar.as_mut() {
                b.step(log);
                if let Some(v) = log.val_loss {
                    let line = format!(
                        "step {:5}  train loss {:.4}  val loss {v:.4}  {:.0}s",
                        log.step,
                        log.loss,
                        t0.elapsed().as_secs_f64()
                    );
                    // the bar is hidden when stderr is not a terminal
                    if std::io::stderr().is_terminal() {
                        b.println(line);
                    } else {
                        println!("{line}");
                    }
                }
            }
            Ok(())
        }
    })?;
    if let Some(b) = &bar {
        b.finish();
    }
    if !lead {
        return Ok(());
    }
    let info = &report.info;
    match report.val_loss {
        Some(v) => println!(
            "done in {:.1}s: validation loss {v:.4} nats/token (perplexity {:.1}); unigram {:.3}",
            report.seconds,
            v.exp(),
            info.unigram_val_loss
        ),
        None => println!("done in {:.1}s", report.seconds),
    }
    println!("run directory: {}", o.out.display());
    if a.sample_tokens > 0 {
        println!("--- sample (temperature 0.8, top-k 40, top-p 0.95, seed 0) ---");
        print!("{}", a.prompt);
        let g = lm.generate(&a.prompt, a.sample_tokens, &Sampling::default(), |t| {
            print!("{}", t.text);
            std::io::stdout().flush().ok();
            Ok(())
        })?;
        println!(
            "\n--- {} tokens, {:.1} tokens/s ---",
            g.ids.len(),
            g.tokens_per_sec()
        );
    }
    Ok(())
}

fn generate<P: TextModel>(a: &GenerateArgs) -> Result<()> {
    ensure!(a.tokens >= 1, "--tokens must be at least 1");
    let sampling = a.sample.sampling();
    sampling.validate()?;
    let mut lm = LanguageModel::<P>::load(&a.run)?;
    engine_flags(&mut lm, a.reference, &a.device, a.int8, a.bf16)?;
    print!("{}", a.prompt);
    std::io::stdout().flush().ok();
    let g = lm.generate(&a.prompt, a.tokens, &sampling, |t| {
        print!("{}", t.text);
        std::io::stdout().flush().ok();
        Ok(())
    })?;
    println!();
    eprintln!(
        "prompt {} tokens in {:.3}s; generated {} tokens in {:.2}s = {:.1} tokens/s; streaming state {} KB (constant); {}",
        g.prompt.len(),
        g.prefill_secs,
        g.ids.len(),
        g.decode_secs,
        g.tokens_per_sec(),
        g.state_bytes / 1024,
        lm.backend_name()
    );
    Ok(())
}

/// `--reference`, `--device`, `--int8`, `--bf16` of `generate` and `eval`.
fn engine_flags<P: TextModel>(
    lm: &mut LanguageModel<P>,
    reference: bool,
    device: &str,
    int8: bool,
    bf16: bool,
) -> Result<()> {
    lm.use_engine(!reference);
    ensure!(
        !reference || (device == "cpu" && !int8 && !bf16),
        "--reference runs the dfdx model on the CPU: drop --device, --int8 and --bf16"
    );
    if int8 {
        lm.quantize_int8()?;
    }
    let precision = if bf16 {
        Precision::Bf16
    } else {
        Precision::F32
    };
    lm.engine_device_with(device, precision)?;
    Ok(())
}

fn eval<P: TextModel>(a: &EvalArgs) -> Result<()> {
    let mut lm = LanguageModel::<P>::load(&a.run)?;
    engine_flags(&mut lm, a.reference, &a.device, a.int8, a.bf16)?;
    if a.rewindow {
        ensure!(
            !a.reference,
            "--rewindow runs on the streaming engine: drop --reference"
        );
        lm.set_rewindow(Some(Rewindow::official()));
    }
    let corpus = Corpus::load(&a.data).context("--data")?;
    let texts = corpus.texts();
    let tok = lm.tokenizer();
    let ids = tok.encode_docs(&texts, tok.end_of_text())?;
    let mut contexts = a.context.clone();
    contexts.sort_unstable();
    contexts.dedup();
    let t0 = std::time::Instant::now();
    let (scores, spans) = lm.context_sweep(&ids, &contexts, a.scored, a.segments)?;
    let mut bytes = 0usize;
    for s in &spans {
        bytes += tok.decode(&ids[s.clone()])?.len();
    }
    println!(
        "{}: {} tokens; {} spans of {} tokens scored ({} tokens, {bytes} bytes) at every context; {} TimestepNorm, {}; {:.1}s",
        a.data.display(),
        ids.len(),
        spans.len(),
        a.scored,
        scores[0].scored,
        if a.rewindow { "re-windowed (8 chunks, every 2)" } else { "cumulative" },
        lm.backend_name(),
        t0.elapsed().as_secs_f64()
    );
    println!("| context | nll (nats/token) | perplexity | bits per byte |");
    println!("|---:|---:|---:|---:|");
    let mut pts = Vec::new();
    for (c, s) in contexts.iter().zip(&scores) {
        let bpb = bits_per_byte(s.mean_nll(), s.scored, bytes)?;
        println!(
            "| {c} | {:.4} | {:.2} | {bpb:.4} |",
            s.mean_nll(),
            s.perplexity()
        );
        pts.push(((*c as f64).log2(), s.perplexity()));
    }
    let plot = a
        .plot
        .clone()
        .unwrap_or_else(|| a.run.join("eval_context.png"));
    line_plot(
        &plot,
        "Perplexity of the same tokens at growing context",
        "context (log2 of tokens)",
        "perplexity",
        &[Series {
            name: "Megalodon",
            points: pts,
        }],
        false,
    )?;
    println!("plot: {}", plot.display());
    Ok(())
}

fn run_compare(a: &CompareArgs) -> Result<()> {
    let o = CompareOptions {
        data: a.data.clone(),
        steps: a.steps,
        seq_len: a.seq_len,
        batch: a.batch,
        lr: a.lr,
        vocab_size: a.vocab_size,
        seed: a.seed,
        eval_every: a.eval_every,
    };
    let r = compare::<TextCpu<f32, Cpu>>(&o, |line| println!("{line}"))?;
    println!(
        "unigram validation loss {:.4}; {} steps of {} x {} tokens each",
        r.unigram_val_loss, a.steps, a.batch, a.seq_len
    );
    println!("| model | parameters | final validation loss | wall time (s) | CPU time (s) |");
    println!("|---|---:|---:|---:|---:|");
    for m in &r.models {
        let cpu = m
            .cpu_seconds
            .map(|c| format!("{c:.1}"))
            .unwrap_or("-".into());
        println!(
            "| {} | {} | {:.4} | {:.1} | {cpu} |",
            m.name, m.params, m.val_loss, m.seconds
        );
    }
    let series: Vec<Series> = r
        .models
        .iter()
        .map(|m| Series {
            name: m.name.as_str(),
            points: m.val_curve.clone(),
        })
        .collect();
    if let Some(dir) = a.plot.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    line_plot(
        &a.plot,
        "Validation loss: Megalodon vs Transformer",
        "step",
        "validation loss (nats/token)",
        &series,
        false,
    )?;
    println!("plot: {}", a.plot.display());
    Ok(())
}
