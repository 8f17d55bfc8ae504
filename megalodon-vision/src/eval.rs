//! Evaluation of a classifier over a [`Loader`]: top-1 and top-5 accuracy, per-class accuracy,
//! mean cross entropy and the confusion matrix (with a PNG), as printed by `vision eval`.

use anyhow::{ensure, Result};
pub use megalodon_core::nn::classifier::{argmax, ClassReport};

use crate::loader::Loader;

/// Counts gathered by [`evaluate`]: the core's classification report (shared with the audio
/// head).
pub type EvalReport = ClassReport;

/// Runs every batch of epoch 0 of `loader` (use an unshuffled eval loader) through `logits`
/// (`(patches, batch) -> batch × classes` host logits) and counts the results. `classes` are
/// the model's class names; the loader's folder must have the same. Errors when no image could
/// be read or the logits have the wrong size.
pub fn evaluate(
    loader: &Loader,
    classes: &[String],
    mut logits: impl FnMut(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<EvalReport> {
    ensure!(
        loader.folder().classes() == classes,
        "the data's classes {:?} (in {}) differ from the model's {:?}",
        loader.folder().classes(),
        loader.folder().root().display(),
        classes
    );
    let mut r = EvalReport::new(classes, "images");
    let mut it = loader.epoch(0);
    for b in &mut it {
        let b = b?;
        if b.batch == 0 {
            continue;
        }
        let z = logits(&b.patches, b.batch)?;
        r.add(&z, &b.labels)?;
    }
    r.skipped = it.skipped();
    ensure!(
        r.total() > 0,
        "no readable image in {}",
        loader.folder().root().display()
    );
    Ok(r)
}
