//! Evaluation of a classifier over a [`Loader`]: accuracy, per-label accuracy, mean cross
//! entropy and the confusion matrix (with a PNG), as printed by `audio eval`. The counting is
//! the core's, shared with the vision head.

use anyhow::Result;
pub use megalodon_core::nn::classifier::{argmax, ClassReport};

use crate::loader::Loader;

/// Counts gathered by [`evaluate`]: the core's classification report.
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
    megalodon_core::nn::classifier::evaluate(loader, labels, "clips", |b| {
        logits(&b.values, &b.lengths, b.row_len)
    })
}
