//! Evaluation of a classifier over a [`Loader`]: top-1 and top-5 accuracy, per-class accuracy,
//! mean cross entropy and the confusion matrix (with a PNG), as printed by `vision eval`. The
//! counting is the core's, shared with the audio head.

use anyhow::Result;
pub use megalodon_core::nn::classifier::{argmax, ClassReport};

use crate::loader::Loader;

/// Counts gathered by [`evaluate`]: the core's classification report.
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
    megalodon_core::nn::classifier::evaluate(loader, classes, "images", |b| {
        logits(&b.values, b.batch)
    })
}
