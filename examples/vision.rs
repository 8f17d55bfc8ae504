//! Image classification with a Megalodon encoder on any ImageFolder tree (one sub-folder per
//! class; `train/` + `val/`, or `--val-split F` of one tree).
//!
//! ```text
//! cargo run --release --example vision -- train --data data/fashion-mnist --epochs 6 --out runs/fmnist
//! cargo run --release --example vision -- eval --run runs/fmnist --data data/fashion-mnist
//! cargo run --release --example vision -- predict --run runs/fmnist img1.png img2.jpg
//! ```
//! `train` fine-tunes with `--init RUN` (same preset and image size; other classes get a new
//! head), continues with `--resume`, and writes checkpoints, `metrics.csv`, `loss.png`,
//! `accuracy.csv` and `accuracy.png` into `--out`. `eval` prints top-1, top-5 and per-class
//! accuracy, draws the confusion matrix, and ends with `accuracy = X%`. `predict` prints the
//! top-5 labels of each image with their probabilities. See `megalodon-vision/README.md`.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use dfdx::prelude::*;
use megalodon::cli::{Bar, TrainFlags};
use megalodon_core::device::MegaDevice;
use megalodon_core::fit::{fit_with, FitConf, Progress, StepLog};
use megalodon_core::optim::{OptimConf, Schedule};
use megalodon_core::plot::{line_plot, Series};
use megalodon_vision::image_folder::{load_rgb, DatasetSplits, ImageFolder};
use megalodon_vision::{
    evaluate, load_conf, train_transform, AugmentLevel, FashionSmall, ImageNetMegalodon, Loader,
    LoaderConfig, Patches, StepBatches, VisionModel, VisionPreset, FASHION_SMALL, IMAGENET,
};

#[derive(Parser, Debug)]
#[command(about = "Megalodon image classifier: train, eval, predict")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PresetArg {
    /// 28x28 gray, patch 4, 2 layers, D 64 (trains on 2 CPU cores).
    FashionSmall,
    /// 224x224 RGB, patch 16, 12 layers, D 768 (~83M parameters).
    Imagenet,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum OnOff {
    On,
    Off,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train (or fine-tune with --init, or continue with --resume) on an ImageFolder tree.
    Train {
        /// ImageFolder root: `train/` + `val/`, or one tree with --val-split.
        #[arg(long)]
        data: PathBuf,
        /// Passes over the training images.
        #[arg(long, default_value_t = 6)]
        epochs: u64,
        /// Hold out this fraction of each class for validation (instead of `val/`).
        #[arg(long)]
        val_split: Option<f64>,
        /// Model preset.
        #[arg(long, value_enum, default_value = "fashion-small")]
        preset: PresetArg,
        /// Learned position embedding added to the patch embeddings.
        #[arg(long, value_enum, default_value = "on")]
        pos_embed: OnOff,
        /// Input side in pixels (default: the preset's; at most its position table).
        #[arg(long)]
        image_size: Option<usize>,
        /// Training augmentation: none, mild, full.
        #[arg(long, default_value = "mild")]
        augment: AugmentLevel,
        /// Peak-LR warmup as a fraction of all steps.
        #[arg(long, default_value_t = 0.05)]
        warmup: f64,
        /// AdamW weight decay.
        #[arg(long, default_value_t = 0.05)]
        weight_decay: f64,
        /// Image decoding threads (0: rayon's default pool).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        #[command(flatten)]
        flags: TrainFlags,
    },
    /// Evaluate a run on an ImageFolder tree (its `val/` when present).
    Eval {
        /// Run directory (training --out, or a checkpoint folder).
        #[arg(long)]
        run: PathBuf,
        /// ImageFolder root (`DIR/val` is used when it exists).
        #[arg(long)]
        data: PathBuf,
        /// Images per batch.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Confusion-matrix PNG (default: RUN/confusion.png).
        #[arg(long)]
        confusion: Option<PathBuf>,
    },
    /// Print the top-5 classes of images.
    Predict {
        /// Run directory.
        #[arg(long)]
        run: PathBuf,
        /// Image files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Classes to print per image.
        #[arg(long, default_value_t = 5)]
        top: usize,
    },
}

type Small = FashionSmall<f32, Cpu>;
type Big = ImageNetMegalodon<f32, Cpu>;

fn main() -> Result<()> {
    let cli = Cli::parse();
    megalodon::cli::run_distributed(|| run(cli))
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train {
            preset, ref flags, ..
        } => megalodon::on_device!(flags.device.as_str(), D, dev => match preset {
            PresetArg::FashionSmall => {
                train::<FashionSmall<f32, D>, D>(&dev, &cli.cmd, &FASHION_SMALL)
            }
            PresetArg::Imagenet => {
                train::<ImageNetMegalodon<f32, D>, D>(&dev, &cli.cmd, &IMAGENET)
            }
        }),
        Cmd::Eval { ref run, .. } | Cmd::Predict { ref run, .. } => {
            let conf = load_conf(run).with_context(|| format!("--run {}", run.display()))?;
            match conf.preset.as_str() {
                "fashion-small" => use_run::<Small>(&cli.cmd),
                "imagenet" => use_run::<Big>(&cli.cmd),
                other => bail!(
                    "--run {}: unknown preset `{other}` (this build knows fashion-small, imagenet)",
                    run.display()
                ),
            }
        }
    }
}

/// Validation at the end of every epoch, epoch summaries, the progress bar.
struct EpochProgress<D> {
    device: std::marker::PhantomData<D>,
    bar: Bar,
    val: Loader,
    data: Rc<RefCell<StepBatches>>,
    per_epoch: u64,
    epochs: u64,
    out: PathBuf,
    losses: (f64, u64),
    start: Instant,
    accuracy_rows: Vec<(u64, f64, f64, f64)>,
    last_acc: Option<f64>,
    /// Whether the bar is drawn (stderr is a terminal); else lines are printed instead.
    tty: bool,
    log_every: u64,
}

impl<D> EpochProgress<D> {
    /// A line above the bar, or on stdout when the bar is hidden (not a terminal).
    fn say(&self, line: String) {
        if self.tty {
            self.bar.println(line);
        } else {
            println!("{line}");
        }
    }

    fn write_accuracy(&self) -> Result<()> {
        let mut csv = String::from("step,epoch,val_loss,val_accuracy,val_top5\n");
        for (step, loss, acc, top5) in &self.accuracy_rows {
            csv.push_str(&format!(
                "{step},{:.4},{loss},{acc},{top5}\n",
                *step as f64 / self.per_epoch as f64
            ));
        }
        megalodon_core::checkpoint::write_atomic(&self.out.join("accuracy.csv"), csv.as_bytes())?;
        let pts = |f: fn(&(u64, f64, f64, f64)) -> f64| -> Vec<(f64, f64)> {
            self.accuracy_rows
                .iter()
                .map(|r| (r.0 as f64 / self.per_epoch as f64, f(r)))
                .collect()
        };
        line_plot(
            &self.out.join("accuracy.png"),
            "Validation accuracy",
            "epoch",
            "accuracy",
            &[
                Series {
                    name: "top-1",
                    points: pts(|r| r.2),
                },
                Series {
                    name: "top-5",
                    points: pts(|r| r.3),
                },
            ],
            false,
        )
    }
}

impl<M: VisionModel<f32, D>, D: MegaDevice<f32>> Progress<M> for EpochProgress<D> {
    fn on_step(&mut self, log: &StepLog) {
        self.losses.0 += log.loss;
        self.losses.1 += 1;
        self.bar.step(log);
        if !self.tty && log.step.is_multiple_of(self.log_every) {
            println!(
                "step {}: loss {:.4} (epoch mean {:.4}), lr {:.2e}, {:.0}s",
                log.step,
                log.loss,
                self.losses.0 / self.losses.1 as f64,
                log.lr,
                self.start.elapsed().as_secs_f64()
            );
        }
    }

    fn evaluate(&mut self, model: &M, step: u64) -> Result<Option<f64>> {
        let t = Instant::now();
        let r = evaluate(&self.val, &model.vision_conf().classes, |p, b| {
            model.logits_host(p, b)
        })?;
        let epoch = step.div_ceil(self.per_epoch);
        let files = self.data.borrow_mut().take_epoch_skipped();
        let skipped = files.len();
        let mut line = format!(
            "epoch {epoch}/{}: train loss {:.4}, val loss {:.4}, val accuracy {:.2}% (top-5 \
             {:.2}%), {} skipped file(s), {:.0}s elapsed (eval {:.1}s)",
            self.epochs,
            self.losses.0 / self.losses.1.max(1) as f64,
            r.mean_loss(),
            100.0 * r.top1(),
            100.0 * r.top5(),
            skipped + r.skipped,
            self.start.elapsed().as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
        if let Some(f) = files.first() {
            line.push_str(&format!(" e.g. {}", f.display()));
        }
        self.say(line);
        self.losses = (0.0, 0);
        // a resumed run re-evaluates the steps after its checkpoint: drop their old rows
        self.accuracy_rows.retain(|row| row.0 < step);
        self.accuracy_rows
            .push((step, r.mean_loss(), r.top1(), r.top5()));
        if let Err(e) = self.write_accuracy() {
            self.say(format!("warning: could not write accuracy.csv/png: {e:#}"));
        }
        self.last_acc = Some(r.top1());
        Ok(Some(r.mean_loss()))
    }
}

fn train<M: VisionModel<f32, D>, D: MegaDevice<f32>>(
    dev: &D,
    cmd: &Cmd,
    preset: &VisionPreset,
) -> Result<()> {
    let Cmd::Train {
        data,
        epochs,
        val_split,
        pos_embed,
        image_size,
        augment,
        warmup,
        weight_decay,
        workers,
        flags,
        ..
    } = cmd
    else {
        bail!("not a train command");
    };
    flags.validate()?;
    ensure!(*epochs >= 1, "--epochs must be at least 1");
    ensure!(
        warmup.is_finite() && (0.0..1.0).contains(warmup),
        "--warmup must be a fraction in [0, 1), got {warmup}"
    );
    ensure!(
        weight_decay.is_finite() && *weight_decay >= 0.0,
        "--weight-decay must be >= 0, got {weight_decay}"
    );
    let splits = DatasetSplits::open(data, *val_split, flags.seed)
        .with_context(|| format!("--data {}", data.display()))?;
    let classes = splits.train.labels().to_vec();
    let mut conf = M::preset_conf(preset, classes.clone(), *pos_embed == OnOff::On)?;
    if let Some(s) = image_size {
        conf.image_size = *s;
        M::check_conf(&conf).with_context(|| format!("--image-size {s}"))?;
    }
    let mut model = match &flags.init {
        Some(init) => {
            let ctx = || format!("--init {}", init.display());
            let init_conf = load_conf(init).with_context(ctx)?;
            conf.check_init(&init_conf).with_context(ctx)?;
            let mut m = M::load_on(dev, init).with_context(ctx)?;
            if m.vision_conf().classes != classes {
                println!(
                    "--init: {} classes there, {} here: the head is re-initialised",
                    m.vision_conf().classes.len(),
                    classes.len()
                );
                m.reset_head(classes.clone(), flags.seed)?;
            }
            m
        }
        None => M::build(dev, conf.clone(), flags.seed)?,
    };
    let conf = model.vision_conf().clone();
    let batch = flags.batch.unwrap_or(128);
    let mut lc = LoaderConfig::new(
        Patches::new(train_transform(&conf, *augment)?, conf.patch),
        batch,
    );
    lc.seed = flags.seed;
    lc.drop_last = splits.train.len() >= batch;
    lc.threads = *workers;
    let train_loader = Loader::new(splits.train.clone(), lc)?;
    let mut vc = LoaderConfig::new(Patches::new(conf.eval_transform()?, conf.patch), 500);
    vc.shuffle = false;
    vc.threads = *workers;
    let val_loader = Loader::new(splits.val.clone(), vc)?;
    let data_state = Rc::new(RefCell::new(StepBatches::new(train_loader)?));
    let per_epoch = data_state.borrow().per_epoch() as u64;
    let steps = epochs
        .checked_mul(per_epoch)
        .context("--epochs times batches per epoch overflows")?;
    let optim = OptimConf {
        lr: flags.lr.unwrap_or(2e-3),
        warmup: (steps as f64 * warmup) as usize,
        weight_decay: *weight_decay,
        max_steps: usize::try_from(steps).context("step count")?,
        schedule: Schedule::Cosine,
        ..OptimConf::default()
    };
    let out = flags
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/vision"));
    let identity = format!(
        "{} train {} images, val {} images, classes {:?}, batch {batch}, image {}, augment \
         {augment:?}, val split {val_split:?}, init {:?}",
        data.display(),
        splits.train.len(),
        splits.val.len(),
        classes,
        conf.image_size,
        flags.init
    );
    let fc = FitConf {
        steps,
        ckpt_every: flags.ckpt_every.unwrap_or(per_epoch),
        eval_every: per_epoch,
        out: Some(out.clone()),
        resume: flags.resume,
        force: flags.force,
        seed: flags.seed,
        data: identity,
        allow_changed: flags.allow_changed.clone(),
    };
    // the other ranks of a data-parallel run train silently
    let lead = megalodon::cli::is_lead();
    if lead {
        println!(
            "{}: {} train / {} val images, {} classes; preset {} ({} params, pos embed {}), image \
         {}x{}, patch {} -> {} tokens; {epochs} epochs x {per_epoch} batches of {batch} = {steps} \
         steps; run dir {}",
            data.display(),
            splits.train.len(),
            splits.val.len(),
            classes.len(),
            conf.preset,
            model.num_params(),
            conf.pos_embed,
            conf.image_size,
            conf.image_size,
            conf.patch,
            conf.tokens()?,
            out.display()
        );
    }
    let mut progress = EpochProgress {
        device: std::marker::PhantomData,
        bar: Bar::new(steps, batch as u64, "img"),
        val: val_loader,
        data: Rc::clone(&data_state),
        per_epoch,
        epochs: *epochs,
        out: out.clone(),
        losses: (0.0, 0),
        start: Instant::now(),
        accuracy_rows: Vec::new(),
        last_acc: None,
        tty: std::io::stderr().is_terminal(),
        log_every: (per_epoch / 10).max(1),
    };
    if flags.resume {
        // keep the accuracy rows of the epochs already done
        if let Ok(text) = std::fs::read_to_string(out.join("accuracy.csv")) {
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split(',').collect();
                if let [s, _, l, a, t] = f[..] {
                    if let (Ok(s), Ok(l), Ok(a), Ok(t)) =
                        (s.parse(), l.parse(), a.parse(), t.parse())
                    {
                        progress.accuracy_rows.push((s, l, a, t));
                    }
                }
            }
        }
    }
    let start = Instant::now();
    let ds = Rc::clone(&data_state);
    let logs = fit_with(
        &mut model,
        optim,
        &fc,
        |step| ds.borrow_mut().get(step),
        &mut progress,
    )?;
    progress.bar.finish();
    if !lead {
        return Ok(());
    }
    println!(
        "trained {} steps in {:.1}s; run saved in {}",
        logs.len(),
        start.elapsed().as_secs_f64(),
        out.display()
    );
    if let Some(a) = progress.last_acc {
        println!("val accuracy = {:.2}%", 100.0 * a);
    }
    Ok(())
}

fn use_run<M: VisionModel<f32, Cpu>>(cmd: &Cmd) -> Result<()> {
    let dev: Cpu = Default::default();
    match cmd {
        Cmd::Eval {
            run,
            data,
            batch,
            confusion,
        } => {
            ensure!(*batch > 0, "--batch must be at least 1");
            let model =
                M::load_on(&dev, run).with_context(|| format!("--run {}", run.display()))?;
            let conf = model.vision_conf();
            let dir = if data.join("val").is_dir() {
                data.join("val")
            } else {
                data.clone()
            };
            let folder =
                ImageFolder::scan(&dir).with_context(|| format!("--data {}", data.display()))?;
            let mut lc =
                LoaderConfig::new(Patches::new(conf.eval_transform()?, conf.patch), *batch);
            lc.shuffle = false;
            let loader = Loader::new(folder, lc)?;
            let t = Instant::now();
            let r = evaluate(&loader, &conf.classes, |p, b| model.logits_host(p, b))
                .with_context(|| format!("evaluating on {}", dir.display()))?;
            let png = confusion
                .clone()
                .unwrap_or_else(|| run.join("confusion.png"));
            r.confusion_png(&png)?;
            println!(
                "evaluated {} images of {} in {:.1}s; confusion matrix: {}",
                r.total(),
                dir.display(),
                t.elapsed().as_secs_f64(),
                png.display()
            );
            println!("{}", r.summary());
            Ok(())
        }
        Cmd::Predict { run, images, top } => {
            ensure!(*top > 0, "--top must be at least 1");
            let model =
                M::load_on(&dev, run).with_context(|| format!("--run {}", run.display()))?;
            for path in images {
                let ranked = classify_file(&model, path)?;
                println!("{}:", path.display());
                for (label, p) in ranked.iter().take(*top) {
                    println!("  {:6.2}%  {label}", 100.0 * p);
                }
            }
            Ok(())
        }
        Cmd::Train { .. } => bail!("not an eval or predict command"),
    }
}

fn classify_file<M: VisionModel<f32, Cpu>>(model: &M, path: &Path) -> Result<Vec<(String, f32)>> {
    let img = load_rgb(path)?;
    model
        .classify(&megalodon_vision::image::DynamicImage::ImageRgb8(img))
        .with_context(|| format!("classifying {}", path.display()))
}
