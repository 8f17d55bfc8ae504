//! Raw-waveform keyword classification with a Megalodon encoder on any folder of WAVs (one
//! sub-folder per label; the Speech Commands layout with `validation_list.txt` /
//! `testing_list.txt` and `_background_noise_/`; `train/` + `val/`; or one tree cut by
//! `--val-split`).
//!
//! ```text
//! scripts/synth_keywords.sh data/speech
//! cargo run --release --example audio -- train --data data/speech --out runs/speech
//! cargo run --release --example audio -- eval --run runs/speech --data data/speech
//! cargo run --release --example audio -- predict --run runs/speech clip1.wav clip2.wav
//! cargo run --release --example audio -- bench --preset speech-cpu --chunk 1000
//! ```
//! `train` fine-tunes with `--init RUN` (same preset; other labels get a new head), continues
//! with `--resume`, and writes checkpoints, `metrics.csv` (with the validation loss) and
//! `loss.png` into `--out`. `eval` scores the data's test split (held-out voices for the
//! synthesised set), prints per-label accuracy, draws the confusion matrix, and ends with
//! `accuracy = X%`. `predict` prints the top labels of each WAV. `bench` times training and
//! inference on random clips. See `megalodon-audio/README.md`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use dfdx::prelude::*;
use megalodon::cli::{check_device, Bar, TrainFlags};
use megalodon_audio::loader::{Clips, Loader, LoaderConfig};
use megalodon_audio::megalodon_core::device::MegaDevice;
use megalodon_audio::megalodon_core::fit::StepLog;
use megalodon_audio::megalodon_core::optim::{AdamW, OptimConf};
use megalodon_audio::train::{eval_split, TrainHooks};
use megalodon_audio::wav::{read_wav, ReadOptions};
use megalodon_audio::{
    evaluate, load_conf, param_count, train, AudioModel, AudioPreset, Batch, SpeechCommands,
    SpeechCpu, TrainOptions, SPEECH_COMMANDS, SPEECH_CPU,
};

#[derive(Parser, Debug)]
#[command(about = "Megalodon raw-waveform speech classifier: train, eval, predict, bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PresetArg {
    /// 32 raw samples per token (500 tokens per second), 4 layers, D 32: trains on 2 CPU cores.
    SpeechCpu,
    /// One token per sample (16,000 per second), 6 layers, D 60, chunk 1000 (~300K params): GPUs.
    SpeechCommands,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train (or fine-tune with --init, or continue with --resume) on a WAV folder.
    Train {
        /// Data folder: label sub-folders (Speech Commands layout, train/ + val/, or one tree).
        #[arg(long)]
        data: PathBuf,
        /// Passes over the training clips (8: about 18 min for 2,400 clips on 2 CPU cores).
        #[arg(long, default_value_t = 8)]
        epochs: u64,
        /// Model preset.
        #[arg(long, value_enum, default_value = "speech-cpu")]
        preset: PresetArg,
        /// Hold out this fraction of each label for validation (plain label tree only).
        #[arg(long, default_value_t = 0.1)]
        val_split: f64,
        /// Peak-LR warmup as a fraction of all steps.
        #[arg(long, default_value_t = 0.05)]
        warmup: f64,
        /// AdamW weight decay.
        #[arg(long, default_value_t = 0.01)]
        weight_decay: f64,
        /// Turn off augmentation (time shift, gain, background noise).
        #[arg(long)]
        no_augment: bool,
        /// Samples per clip (default: the preset's, 16000 = 1 s).
        #[arg(long)]
        clip_len: Option<usize>,
        /// Attention chunk in tokens (default: the preset's).
        #[arg(long)]
        chunk: Option<usize>,
        /// WAV decoding threads (0: rayon's default pool).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Stop after this many steps (the schedule still spans all epochs); continue later
        /// with --resume --allow-change steps.
        #[arg(long)]
        stop_after: Option<u64>,
        #[command(flatten)]
        flags: TrainFlags,
    },
    /// Evaluate a run on a WAV folder (its test split when it has one, else validation).
    Eval {
        /// Run directory (training --out, or a checkpoint folder).
        #[arg(long)]
        run: PathBuf,
        /// Data folder.
        #[arg(long)]
        data: PathBuf,
        /// Clips per batch.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Validation fraction of a plain label tree (as in training).
        #[arg(long, default_value_t = 0.1)]
        val_split: f64,
        /// Seed of the plain tree's split (as in training).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Confusion-matrix PNG (default: RUN/confusion.png).
        #[arg(long)]
        confusion: Option<PathBuf>,
    },
    /// Print the top labels of WAV files.
    Predict {
        /// Run directory.
        #[arg(long)]
        run: PathBuf,
        /// WAV files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Labels to print per file.
        #[arg(long, default_value_t = 3)]
        top: usize,
    },
    /// Time training steps and inference on random clips (no data needed).
    Bench {
        #[arg(long, value_enum, default_value = "speech-cpu")]
        preset: PresetArg,
        /// Attention chunk in tokens (default: the preset's; the token count = full attention).
        #[arg(long)]
        chunk: Option<usize>,
        /// Clips per batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Samples per clip.
        #[arg(long, default_value_t = 16_000)]
        clip_len: usize,
        /// Timed training steps (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Labels of the head.
        #[arg(long, default_value_t = 10)]
        labels: usize,
    },
}

type Cpu16 = SpeechCpu<f32, Cpu>;
type Sc = SpeechCommands<f32, Cpu>;

fn preset_of(p: PresetArg) -> &'static AudioPreset {
    match p {
        PresetArg::SpeechCpu => &SPEECH_CPU,
        PresetArg::SpeechCommands => &SPEECH_COMMANDS,
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    megalodon::cli::run_distributed(|| run(cli))
}

fn run(cli: Cli) -> Result<()> {
    match &cli.cmd {
        Cmd::Train { preset, flags, .. } => {
            megalodon::on_device!(flags.device.as_str(), D, dev => match preset {
                PresetArg::SpeechCpu => run_train::<SpeechCpu<f32, D>, D>(&dev, &cli.cmd),
                PresetArg::SpeechCommands => {
                    run_train::<SpeechCommands<f32, D>, D>(&dev, &cli.cmd)
                }
            })
        }
        Cmd::Bench { preset, .. } => match preset {
            PresetArg::SpeechCpu => bench::<Cpu16>(&cli.cmd),
            PresetArg::SpeechCommands => bench::<Sc>(&cli.cmd),
        },
        Cmd::Eval { run, .. } | Cmd::Predict { run, .. } => {
            let conf = load_conf(run).with_context(|| format!("--run {}", run.display()))?;
            match conf.preset.as_str() {
                "speech-cpu" => use_run::<Cpu16>(&cli.cmd),
                "speech-commands" => use_run::<Sc>(&cli.cmd),
                other => bail!(
                    "--run {}: unknown preset `{other}` (this build knows speech-cpu, \
                     speech-commands)",
                    run.display()
                ),
            }
        }
    }
}

/// No output (ranks other than 0 of a data-parallel run).
struct Silent;

impl TrainHooks for Silent {}

/// The progress bar, created when the run's step count is known; without a terminal (output
/// to a file) a plain line every 25 steps instead, since the bar is then hidden.
struct BarHooks(Option<Bar>, u64);

impl TrainHooks for BarHooks {
    fn start(&mut self, steps: u64, batch: usize, about: &str) {
        println!("{about}");
        self.1 = steps;
        if std::io::stderr().is_terminal() {
            self.0 = Some(Bar::new(steps, batch as u64, "clips"));
        }
    }
    fn on_step(&mut self, log: &StepLog) {
        match &mut self.0 {
            Some(b) => b.step(log),
            None if log.step.is_multiple_of(25) || log.step == self.1 => println!(
                "step {}/{}: loss {:.4}, lr {:.2e}",
                log.step, self.1, log.loss, log.lr
            ),
            None => {}
        }
    }
    fn println(&mut self, line: &str) {
        match &self.0 {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    }
}

fn run_train<M: AudioModel<f32, D>, D: MegaDevice<f32>>(dev: &D, cmd: &Cmd) -> Result<()> {
    let Cmd::Train {
        data,
        epochs,
        preset,
        val_split,
        warmup,
        weight_decay,
        no_augment,
        clip_len,
        chunk,
        workers,
        stop_after,
        flags,
    } = cmd
    else {
        bail!("not a train command");
    };
    flags.validate()?;
    let out = flags
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/audio"));
    let opts = TrainOptions {
        epochs: *epochs,
        batch: flags.batch.unwrap_or(16),
        lr: flags.lr.unwrap_or(3e-3),
        warmup: *warmup,
        weight_decay: *weight_decay,
        seed: flags.seed,
        init: flags.init.clone(),
        resume: flags.resume,
        force: flags.force,
        allow_changed: flags.allow_changed.clone(),
        ckpt_every: flags.ckpt_every,
        val_split: *val_split,
        augment: !no_augment,
        clip_len: *clip_len,
        chunk: *chunk,
        workers: *workers,
        stop_after: *stop_after,
        ..TrainOptions::new(data, &out)
    };
    if !megalodon::cli::is_lead() {
        // the other ranks of a data-parallel run train silently
        train::<M, D>(dev, preset_of(*preset), &opts, &mut Silent)?;
        return Ok(());
    }
    let mut hooks = BarHooks(None, 0);
    let s = train::<M, D>(dev, preset_of(*preset), &opts, &mut hooks)?;
    if let Some(b) = &hooks.0 {
        b.finish();
    }
    println!(
        "trained {} steps in {:.1}s ({:.2} training clips/s, validation excluded; {} file(s) \
         skipped); run saved in {}",
        s.logs.len(),
        s.seconds,
        s.train_clips_per_second,
        s.skipped,
        out.display()
    );
    if let Some(r) = &s.last_eval {
        println!("val accuracy = {:.2}%", 100.0 * r.accuracy());
    }
    Ok(())
}

fn use_run<M: AudioModel<f32, Cpu>>(cmd: &Cmd) -> Result<()> {
    let dev: Cpu = Default::default();
    match cmd {
        Cmd::Eval {
            run,
            data,
            batch,
            val_split,
            seed,
            confusion,
        } => {
            ensure!(*batch > 0, "--batch must be at least 1");
            ensure!(
                val_split.is_finite() && (0.0..1.0).contains(val_split),
                "--val-split must be a fraction in [0, 1), got {val_split}"
            );
            let model =
                M::load_on(&dev, run).with_context(|| format!("--run {}", run.display()))?;
            let conf = model.audio_conf();
            let (folder, split) = eval_split(data, *val_split, *seed)?;
            let mut lc = LoaderConfig::ordered(Clips::eval(), *batch);
            lc.decode.clip = conf.eval_clip();
            let loader = Loader::new(folder, lc)?;
            let r = evaluate(&loader, &conf.labels, |s, l, n| model.logits_host(s, l, n))
                .with_context(|| format!("evaluating on {}", data.display()))?;
            let png = confusion
                .clone()
                .unwrap_or_else(|| run.join("confusion.png"));
            r.confusion_png(&png)?;
            println!(
                "evaluated {} clips of the {split} split of {} in {:.1}s; confusion matrix: {}",
                r.total(),
                data.display(),
                r.seconds,
                png.display()
            );
            println!("{}", r.summary());
            Ok(())
        }
        Cmd::Predict { run, files, top } => {
            ensure!(*top > 0, "--top must be at least 1");
            let model =
                M::load_on(&dev, run).with_context(|| format!("--run {}", run.display()))?;
            let read = ReadOptions {
                target_rate: model.audio_conf().sample_rate,
                ..ReadOptions::default()
            };
            for path in files {
                let wave = read_wav(path, &read)?;
                let ranked = model
                    .classify(&wave, read.target_rate)
                    .with_context(|| format!("classifying {}", path.display()))?;
                println!("{}:", path.display());
                for (label, p) in ranked.iter().take(*top) {
                    println!("  {:6.2}%  {label}", 100.0 * p);
                }
            }
            Ok(())
        }
        _ => bail!("not an eval or predict command"),
    }
}

fn bench<M: AudioModel<f32, Cpu>>(cmd: &Cmd) -> Result<()> {
    let Cmd::Bench {
        preset,
        chunk,
        batch,
        clip_len,
        steps,
        labels,
    } = cmd
    else {
        bail!("not a bench command");
    };
    ensure!(*batch > 0 && *steps > 0, "--batch and --steps must be >= 1");
    ensure!(*clip_len > 0, "--clip-len must be >= 1");
    check_device("cpu")?;
    let dev: Cpu = Default::default();
    let names: Vec<String> = (0..*labels).map(|i| format!("w{i}")).collect();
    let mut conf = M::preset_conf(preset_of(*preset), names)?;
    conf.clip_len = *clip_len;
    if let Some(c) = chunk {
        conf.encoder.chunk_size = *c;
    }
    let mut model = M::build(&dev, conf.clone(), 0)?;
    let n = batch
        .checked_mul(*clip_len)
        .context("--batch times --clip-len overflows")?;
    let mut rng = megalodon_audio::SplitMix64::new(1);
    let b = Batch {
        values: (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect(),
        lengths: vec![*clip_len; *batch],
        labels: (0..*batch).map(|i| i % labels).collect(),
        batch: *batch,
        skipped: 0,
        row_len: *clip_len,
        epoch: 0,
        index: 0,
        ids: (0..*batch).collect(),
        skipped_files: Vec::new(),
    };
    let mut opt = AdamW::<f32, Cpu>::new(OptimConf::default());
    let mut step = |m: &mut M| megalodon_audio::megalodon_core::fit::train_step(m, &mut opt, &b);
    step(&mut model)?; // warm-up
    let t = Instant::now();
    for _ in 0..*steps {
        step(&mut model)?;
    }
    let train_s = t.elapsed().as_secs_f64() / *steps as f64;
    let t = Instant::now();
    for _ in 0..*steps {
        model.logits_host(&b.values, &b.lengths, b.row_len)?;
    }
    let infer_s = t.elapsed().as_secs_f64() / *steps as f64;
    println!(
        "{} ({} params): batch {batch} x {clip_len} samples = {} tokens per clip, chunk {}: \
         train step {train_s:.3}s ({:.2} clips/s), inference {infer_s:.3}s ({:.2} clips/s)",
        conf.preset,
        param_count(&conf, *labels)?,
        conf.tokens()?,
        conf.encoder.chunk_size,
        *batch as f64 / train_s,
        *batch as f64 / infer_s
    );
    Ok(())
}
