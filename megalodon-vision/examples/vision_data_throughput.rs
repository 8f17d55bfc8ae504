//! Measures the data layer on an ImageFolder tree: scan time, then decode + transform +
//! patchify throughput of one epoch (images/s), with the loader's prefetch thread.
//!
//! ```text
//! scripts/fashion-mnist-export.sh
//! cargo run --release -p megalodon-vision --example vision_data_throughput -- \
//!     data/fashion-mnist [SIZE] [PATCH] [BATCH] [MAX_BATCHES] [THREADS]
//! ```
//!
//! Defaults: 28, 4, 256, all batches, 0 (rayon's global pool). Gray images use the
//! Fashion-MNIST normalisation when SIZE is 28, else RGB with ImageNet's.

use std::time::Instant;

use anyhow::{Context, Result};
use megalodon_vision::{
    ColorMode, DatasetSplits, Loader, LoaderConfig, Normalize, Patches, Transform,
};

fn arg(i: usize, default: usize) -> Result<usize> {
    match std::env::args().nth(i) {
        Some(s) => s
            .parse()
            .with_context(|| format!("argument {i} ({s}) is not a number")),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "data/fashion-mnist".to_string());
    let size = arg(2, 28)?;
    let patch = arg(3, 4)?;
    let batch = arg(4, 256)?;
    let max_batches = arg(5, usize::MAX)?;
    let threads = arg(6, 0)?;

    let t0 = Instant::now();
    let data = DatasetSplits::open(&dir, None, 0)?;
    println!(
        "scanned {dir}: {} train / {} val images, {} classes in {:.2}s",
        data.train.len(),
        data.val.len(),
        data.train.num_labels(),
        t0.elapsed().as_secs_f64()
    );

    let mut transform = Transform::train(u32::try_from(size)?);
    if size == 28 {
        transform = transform
            .with_color(ColorMode::Gray)
            .with_normalize(Normalize::fashion_mnist());
    }
    let mut cfg = LoaderConfig::new(Patches::new(transform, patch), batch);
    cfg.threads = threads;
    let loader = Loader::new(data.train, cfg)?;
    let t1 = Instant::now();
    let mut it = loader.epoch(0);
    let mut values = 0usize;
    for b in (&mut it).take(max_batches) {
        values += b?.values.len();
    }
    let secs = t1.elapsed().as_secs_f64();
    println!(
        "epoch 0: {} batches, {} images ({} skipped), {} values in {secs:.2}s = {:.0} images/s",
        it.batches(),
        it.rows(),
        it.skipped(),
        values,
        it.rows() as f64 / secs
    );
    Ok(())
}
