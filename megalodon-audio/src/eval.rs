//! Evaluation of a classifier over a [`Loader`]: accuracy, per-label accuracy, mean cross
//! entropy and the confusion matrix (with a PNG), as printed by `audio eval`.

use std::time::Instant;

use anyhow::{ensure, Result};
pub use megalodon_core::nn::classifier::{argmax, ClassReport};

use crate::loader::Loader;

/// Counts gathered by [`evaluate`]: the core's classification report (shared with the vision
/// head).
pub type EvalReport = ClassReport;

/// Runs every batch of epoch 0 of `loader` (an unshuffled, unaugmented loader) through
/// `logits` (`(samples, lengths, clip_len) -> batch × labels` host logits) and counts the
/// results. `labels` are the model's; the loader's folder must have the same. Errors when no
/// clip could be read or the logits have the wrong size.
pub fn evaluate(
    loader: &Loader,
    labels: &[String],
    mut logits: impl FnMut(&[f32], &[usize], usize) -> Result<Vec<f32>>,
) -> Result<EvalReport> {
    ensure!(
        loader.folder().labels() == labels,
        "the data's labels {:?} (in {}) differ from the model's {:?}",
        loader.folder().labels(),
        loader.folder().root().display(),
        labels
    );
    let start = Instant::now();
    let mut r = EvalReport::new(labels, "clips");
    let mut it = loader.epoch(0);
    for b in &mut it {
        let b = b?;
        if b.batch == 0 {
            continue;
        }
        let z = logits(&b.samples, &b.lengths, b.clip_len)?;
        r.add(&z, &b.labels)?;
    }
    r.skipped = it.skipped();
    r.seconds = start.elapsed().as_secs_f64();
    ensure!(
        r.total() > 0,
        "no readable WAV in {}",
        loader.folder().root().display()
    );
    Ok(r)
}
