//! Evaluation of a classifier over a [`Loader`]: accuracy, per-label accuracy, mean cross
//! entropy and the confusion matrix (with a PNG), as printed by `audio eval`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};

use crate::loader::Loader;

/// Counts gathered by [`evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Label names.
    pub labels: Vec<String>,
    /// `confusion[true][predicted]` clip counts.
    pub confusion: Vec<Vec<u64>>,
    /// Sum of the per-clip cross entropy (natural log).
    pub loss_sum: f64,
    /// Files left out because they could not be read.
    pub skipped: usize,
    /// Seconds spent (decoding and model), for the clips/s figure.
    pub seconds: f64,
}

impl EvalReport {
    /// Clips evaluated.
    pub fn total(&self) -> u64 {
        self.confusion.iter().flatten().sum()
    }

    /// Clips predicted correctly.
    pub fn correct(&self) -> u64 {
        (0..self.confusion.len())
            .map(|i| self.confusion[i][i])
            .sum()
    }

    /// Accuracy in `[0, 1]` (0 for no clip).
    pub fn accuracy(&self) -> f64 {
        let n = self.total();
        if n == 0 {
            0.0
        } else {
            self.correct() as f64 / n as f64
        }
    }

    /// Mean cross entropy per clip.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.total().max(1) as f64
    }

    /// Clips per second of the evaluation (decoding included).
    pub fn clips_per_second(&self) -> f64 {
        self.total() as f64 / self.seconds.max(1e-9)
    }

    /// Accuracy of each label (`None` for a label without clips).
    pub fn per_label(&self) -> Vec<Option<f64>> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let n: u64 = row.iter().sum();
                (n > 0).then(|| row[i] as f64 / n as f64)
            })
            .collect()
    }

    /// The printed report: per-label accuracy, clip and skip counts, loss; the last line is
    /// `accuracy = X%` (two decimals) for scripts.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let width = self.labels.iter().map(|c| c.len()).max().unwrap_or(0);
        let _ = writeln!(s, "per-label accuracy:");
        for ((name, acc), row) in self
            .labels
            .iter()
            .zip(self.per_label())
            .zip(&self.confusion)
        {
            let n: u64 = row.iter().sum();
            match acc {
                Some(a) => {
                    let _ = writeln!(s, "  {name:width$}  {:6.2}%  ({n} clips)", 100.0 * a);
                }
                None => {
                    let _ = writeln!(s, "  {name:width$}       -   (no clip)");
                }
            }
        }
        let _ = writeln!(
            s,
            "clips: {} ({} skipped as unreadable), {:.1} clips/s",
            self.total(),
            self.skipped,
            self.clips_per_second()
        );
        let _ = writeln!(s, "mean loss = {:.4}", self.mean_loss());
        let _ = write!(s, "accuracy = {:.2}%", 100.0 * self.accuracy());
        s
    }

    /// Draws the confusion matrix as a PNG.
    pub fn confusion_png(&self, path: &Path) -> Result<()> {
        megalodon_core::plot::confusion_matrix(path, &self.confusion, &self.labels)
    }
}

/// Runs every batch of epoch 0 of `loader` (an unshuffled, unaugmented loader) through
/// `logits` (`(samples, lengths, clip_len) -> batch × labels` host logits) and counts the
/// results. `labels` are the model's; the loader's folder must have the same. Errors when no
/// clip could be read or the logits have the wrong size.
pub fn evaluate(
    loader: &Loader,
    labels: &[String],
    mut logits: impl FnMut(&[f32], &[usize], usize) -> Result<Vec<f32>>,
) -> Result<EvalReport> {
    let k = labels.len();
    ensure!(
        loader.folder().labels() == labels,
        "the data's labels {:?} (in {}) differ from the model's {:?}",
        loader.folder().labels(),
        loader.folder().root().display(),
        labels
    );
    let start = Instant::now();
    let mut r = EvalReport {
        labels: labels.to_vec(),
        confusion: vec![vec![0; k]; k],
        loss_sum: 0.0,
        skipped: 0,
        seconds: 0.0,
    };
    let mut it = loader.epoch(0);
    for b in &mut it {
        let b = b?;
        if b.batch == 0 {
            continue;
        }
        let z = logits(&b.samples, &b.lengths, b.clip_len)?;
        ensure!(
            z.len() == b.batch * k,
            "model returned {} logits for {} clips of {k} labels",
            z.len(),
            b.batch
        );
        for (row, &label) in z.chunks(k).zip(&b.labels) {
            r.confusion[label][argmax(row)] += 1;
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            r.loss_sum += lse - row[label] as f64;
        }
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

/// Index of the largest value (the first on ties; NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |a, (j, &x)| if x > row[a] { j } else { a })
}
