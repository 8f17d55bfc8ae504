//! Evaluation of a classifier over a [`Loader`]: top-1 and top-5 accuracy, per-class accuracy,
//! mean cross entropy and the confusion matrix (with a PNG), as printed by `vision eval`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{ensure, Result};

use crate::loader::Loader;

/// Counts gathered by [`evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Class names.
    pub classes: Vec<String>,
    /// `confusion[true][predicted]` image counts.
    pub confusion: Vec<Vec<u64>>,
    /// Images whose label is among the 5 highest logits (all, with fewer than 5 classes).
    pub top5_hits: u64,
    /// Sum of the per-image cross entropy (natural log).
    pub loss_sum: f64,
    /// Images left out because they could not be read.
    pub skipped: usize,
}

impl EvalReport {
    /// Images evaluated.
    pub fn total(&self) -> u64 {
        self.confusion.iter().flatten().sum()
    }

    /// Images predicted correctly.
    pub fn correct(&self) -> u64 {
        (0..self.confusion.len())
            .map(|i| self.confusion[i][i])
            .sum()
    }

    /// Top-1 accuracy in `[0, 1]` (0 for no image).
    pub fn top1(&self) -> f64 {
        ratio(self.correct(), self.total())
    }

    /// Top-5 accuracy in `[0, 1]`.
    pub fn top5(&self) -> f64 {
        ratio(self.top5_hits, self.total())
    }

    /// Mean cross entropy per image.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.total().max(1) as f64
    }

    /// Accuracy of each class (`None` for a class without images).
    pub fn per_class(&self) -> Vec<Option<f64>> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let n: u64 = row.iter().sum();
                (n > 0).then(|| row[i] as f64 / n as f64)
            })
            .collect()
    }

    /// The printed report: per-class accuracy, top-5, loss, skipped files; the last line is
    /// `accuracy = X%` (top-1, two decimals) for scripts.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let width = self.classes.iter().map(|c| c.len()).max().unwrap_or(0);
        let _ = writeln!(s, "per-class accuracy:");
        for ((name, acc), row) in self
            .classes
            .iter()
            .zip(self.per_class())
            .zip(&self.confusion)
        {
            let n: u64 = row.iter().sum();
            match acc {
                Some(a) => {
                    let _ = writeln!(s, "  {name:width$}  {:6.2}%  ({n} images)", 100.0 * a);
                }
                None => {
                    let _ = writeln!(s, "  {name:width$}       -   (no image)");
                }
            }
        }
        let _ = writeln!(
            s,
            "images: {} ({} skipped as unreadable)",
            self.total(),
            self.skipped
        );
        let _ = writeln!(s, "mean loss = {:.4}", self.mean_loss());
        let _ = writeln!(s, "top-5 accuracy = {:.2}%", 100.0 * self.top5());
        let _ = write!(s, "accuracy = {:.2}%", 100.0 * self.top1());
        s
    }

    /// Draws the confusion matrix as a PNG.
    pub fn confusion_png(&self, path: &Path) -> Result<()> {
        megalodon_core::plot::confusion_matrix(path, &self.confusion, &self.classes)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Runs every batch of epoch 0 of `loader` (use an unshuffled eval loader) through `logits`
/// (`(patches, batch) -> batch × classes` host logits) and counts the results. `classes` are
/// the model's class names; the loader's folder must have the same. Errors when no image could
/// be read or the logits have the wrong size.
pub fn evaluate(
    loader: &Loader,
    classes: &[String],
    mut logits: impl FnMut(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<EvalReport> {
    let k = classes.len();
    ensure!(
        loader.folder().classes() == classes,
        "the data's classes {:?} (in {}) differ from the model's {:?}",
        loader.folder().classes(),
        loader.folder().root().display(),
        classes
    );
    let mut r = EvalReport {
        classes: classes.to_vec(),
        confusion: vec![vec![0; k]; k],
        top5_hits: 0,
        loss_sum: 0.0,
        skipped: 0,
    };
    let mut it = loader.epoch(0);
    for b in &mut it {
        let b = b?;
        if b.batch == 0 {
            continue;
        }
        let z = logits(&b.patches, b.batch)?;
        ensure!(
            z.len() == b.batch * k,
            "model returned {} logits for {} images of {k} classes",
            z.len(),
            b.batch
        );
        for (row, &label) in z.chunks(k).zip(&b.labels) {
            let pred = argmax(row);
            r.confusion[label][pred] += 1;
            let above = row.iter().filter(|&&v| v > row[label]).count();
            if above < 5 {
                r.top5_hits += 1;
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            r.loss_sum += lse - row[label] as f64;
        }
    }
    r.skipped = it.skipped();
    ensure!(
        r.total() > 0,
        "no readable image in {}",
        loader.folder().root().display()
    );
    Ok(r)
}

/// Index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |a, (j, &x)| if x > row[a] { j } else { a })
}
