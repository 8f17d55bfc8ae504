//! Measures the data layer on a real folder: scan, decode throughput of the evaluation and the
//! augmented training loader, and the per-split counts.
//!
//! `cargo run --release -p megalodon-audio --example audio_data_bench -- DATA_DIR [BATCH] [THREADS]`
//! (make `DATA_DIR` with `scripts/synth_keywords.sh`).

use std::time::Instant;

use anyhow::{Context, Result};
use megalodon_audio::augment::{Augment, AugmentConfig};
use megalodon_audio::dataset::AudioSplits;
use megalodon_audio::loader::{Clips, Loader, LoaderConfig};
use megalodon_audio::wav::ReadOptions;

fn run(name: &str, loader: &Loader) -> Result<()> {
    let t = Instant::now();
    let mut it = loader.epoch(0);
    for b in it.by_ref() {
        b?;
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{name}: {} clips in {} batches, {} skipped, {s:.2} s = {:.0} clips/s",
        it.rows(),
        it.batches(),
        it.skipped(),
        it.rows() as f64 / s
    );
    Ok(())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .context("usage: audio_data_bench DATA_DIR [BATCH] [THREADS]")?;
    let batch: usize = args.next().map_or(Ok(32), |a| a.parse()).context("BATCH")?;
    let threads: usize = args
        .next()
        .map_or(Ok(0), |a| a.parse())
        .context("THREADS")?;
    let t = Instant::now();
    let splits = AudioSplits::open(&dir, 0.1, 0)?;
    println!(
        "{dir}: layout {:?}, {} labels {:?}; train {}, val {}, test {}, noise files {} (scan {:.2} s)",
        splits.layout,
        splits.labels().len(),
        splits.labels(),
        splits.train.len(),
        splits.val.len(),
        splits.test.as_ref().map_or(0, |t| t.len()),
        splits.noise.len(),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let aug = Augment::with_noise_files(
        AugmentConfig::default(),
        &splits.noise,
        &ReadOptions::default(),
    )?;
    println!(
        "noise bank: {} clips ({:.2} s)",
        aug.noise().len(),
        t.elapsed().as_secs_f64()
    );
    let mut eval = LoaderConfig::ordered(Clips::eval(), batch);
    eval.threads = threads;
    run(
        "eval  (decode + centre crop)",
        &Loader::new(splits.train.clone(), eval)?,
    )?;
    let mut train = LoaderConfig::new(Clips::train(Some(aug)), batch);
    train.threads = threads;
    run(
        "train (decode + shift/gain/noise)",
        &Loader::new(splits.train.clone(), train)?,
    )?;
    Ok(())
}
