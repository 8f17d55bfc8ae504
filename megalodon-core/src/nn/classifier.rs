//! The classification head the classifiers share: a linear layer from pooled features `(B, M)` to
//! a run-time number of classes, and the mean cross entropy of class logits. Vision and audio put
//! their own embedding in front of the [`super::encoder::BidirectionalEncoder`] and this head
//! behind it.

use super::layers::normal_vec;
use crate::device::MegaDevice;
use crate::params::{join, ParamVisitor, Params};
use crate::util::{c, Float};
use anyhow::{ensure, Result};
use dfdx::prelude::*;
use rand::Rng;

/// Largest class count accepted (from data or a config).
pub const MAX_CLASSES: usize = 1 << 24;

/// Class logits `(B, classes)`.
pub type ClassLogits<E, D, T = NoneTape> = Tensor<(usize, usize), E, D, T>;

/// `logits = x W^T + b` with `W (classes, M)` and `b (classes,)`; keys `weight` and `bias`.
pub struct ClassHead<const M: usize, E: Dtype, D: Device<E>> {
    pub weight: Tensor<(usize, Const<M>), E, D>,
    pub bias: Tensor<(usize,), E, D>,
}

impl<const M: usize, E: Float, D: MegaDevice<E>> ClassHead<M, E, D> {
    /// A head for `classes` classes (`2..=MAX_CLASSES`): weights normal with std `1/sqrt(M)`
    /// truncated at 3 std, zero bias.
    pub fn new(dev: &D, rng: &mut impl Rng, classes: usize) -> Result<Self> {
        ensure!(
            (2..=MAX_CLASSES).contains(&classes),
            "a classifier needs 2..={MAX_CLASSES} classes, found {classes}"
        );
        let std = 1.0 / (M as f64).sqrt();
        Ok(Self {
            weight: dev.tensor_from_vec(
                normal_vec::<E>(rng, classes * M, std, Some(3.0 * std)),
                (classes, Const::<M>),
            ),
            bias: dev.zeros_like(&(classes,)),
        })
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.weight.shape().0
    }

    /// `x (B, M) -> (B, classes)`.
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Tensor<(usize, Const<M>), E, D, T>,
    ) -> ClassLogits<E, D, T> {
        let b = x.shape().0;
        let k = self.classes();
        let y = x.matmul(self.weight.retaped::<T>().permute::<_, Axes2<1, 0>>());
        y + self
            .bias
            .retaped::<T>()
            .broadcast_like::<_, Axis<0>>(&(b, k))
    }
}

/// Mean cross entropy of `logits (B, classes)` against `labels` (one per row, each `< classes`).
pub fn class_cross_entropy<E: Float, D: MegaDevice<E>, T: Tape<E, D>>(
    logits: ClassLogits<E, D, T>,
    labels: &[usize],
) -> Result<Tensor<Rank0, E, D, T>> {
    let (b, k) = *logits.shape();
    ensure!(
        labels.len() == b,
        "{} labels for {b} rows of logits",
        labels.len()
    );
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= k) {
        anyhow::bail!("label {l} of row {i} is outside the {k} classes");
    }
    let dev = logits.device().clone();
    let idx: Tensor<(usize,), usize, D> = dev.tensor_from_vec(labels.to_vec(), (b,));
    let lp = logits.log_softmax::<Axis<1>>().select(idx);
    Ok(lp.sum() * c::<E>(-1.0 / b as f64))
}

/// Row-wise softmax probabilities of host logits `(B, classes)`, row-major.
pub fn softmax_rows(logits: &[f32], classes: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(classes.max(1)) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|&x| (x - m).exp()).collect();
        let s: f32 = e.iter().sum();
        out.extend(e.into_iter().map(|x| x / s));
    }
    out
}

impl<const M: usize, E: Float, D: MegaDevice<E>> ClassHead<M, E, D> {
    /// Replaces the weights by a fresh head for `classes` classes on the same device, seeded
    /// by `seed` (fine-tuning a trained encoder on other classes).
    pub fn reinit(&mut self, classes: usize, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        let dev = self.weight.device().clone();
        *self = Self::new(&dev, &mut rand::rngs::StdRng::seed_from_u64(seed), classes)?;
        Ok(())
    }
}

impl<const M: usize, E: Float, D: Device<E>> Params<E, D> for ClassHead<M, E, D> {
    fn visit_params<V: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut V) -> Result<()> {
        v.visit(&join(prefix, "weight"), &mut self.weight)?;
        v.visit(&join(prefix, "bias"), &mut self.bias)
    }
}

/// Index of the largest value (the first on ties; NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |a, (j, &x)| if x > row[a] { j } else { a })
}

/// Evaluation counts of a classifier, shared by every classification head: the confusion matrix
/// (`confusion[true][predicted]`), top-5 hits, summed cross entropy, skipped inputs and time.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassReport {
    /// Class names.
    pub classes: Vec<String>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
    /// Inputs whose label is among the 5 highest logits (all of them with fewer than 5 classes).
    pub top5_hits: u64,
    /// Sum of the per-input cross entropy (natural log).
    pub loss_sum: f64,
    /// Inputs left out because they could not be read.
    pub skipped: usize,
    /// Seconds spent, for the per-second figure (0 = not measured).
    pub seconds: f64,
    /// What one input is called in the summary (`images`, `clips`).
    pub unit: &'static str,
}

impl ClassReport {
    /// Empty counts for `classes`.
    pub fn new(classes: &[String], unit: &'static str) -> Self {
        let k = classes.len();
        Self {
            classes: classes.to_vec(),
            confusion: vec![vec![0; k]; k],
            top5_hits: 0,
            loss_sum: 0.0,
            skipped: 0,
            seconds: 0.0,
            unit,
        }
    }

    /// Counts one batch of host logits (row-major `labels.len() x classes`).
    pub fn add(&mut self, logits: &[f32], labels: &[usize]) -> Result<()> {
        let k = self.classes.len();
        ensure!(
            logits.len() == labels.len() * k,
            "model returned {} logits for {} {} of {k} classes",
            logits.len(),
            labels.len(),
            self.unit
        );
        for (row, &label) in logits.chunks(k).zip(labels) {
            ensure!(label < k, "label {label} is outside the {k} classes");
            self.confusion[label][argmax(row)] += 1;
            if row.iter().filter(|&&v| v > row[label]).count() < 5 {
                self.top5_hits += 1;
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            self.loss_sum += lse - row[label] as f64;
        }
        Ok(())
    }

    /// Inputs counted.
    pub fn total(&self) -> u64 {
        self.confusion.iter().flatten().sum()
    }

    /// Inputs predicted correctly.
    pub fn correct(&self) -> u64 {
        (0..self.confusion.len())
            .map(|i| self.confusion[i][i])
            .sum()
    }

    /// Top-1 accuracy in `[0, 1]` (0 when nothing was counted).
    pub fn top1(&self) -> f64 {
        ratio(self.correct(), self.total())
    }

    /// Same as [`top1`](Self::top1).
    pub fn accuracy(&self) -> f64 {
        self.top1()
    }

    /// Top-5 accuracy in `[0, 1]`.
    pub fn top5(&self) -> f64 {
        ratio(self.top5_hits, self.total())
    }

    /// Mean cross entropy per input.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.total().max(1) as f64
    }

    /// Inputs per second (0 when no time was recorded).
    pub fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.total() as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Accuracy of each class (`None` for a class without inputs).
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

    /// The printed report: per-class accuracy, counts, loss, top-5; the last line is
    /// `accuracy = X%` (top-1, two decimals) for scripts.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let unit = self.unit;
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
                    let _ = writeln!(s, "  {name:width$}  {:6.2}%  ({n} {unit})", 100.0 * a);
                }
                None => {
                    let _ = writeln!(s, "  {name:width$}       -   (none)");
                }
            }
        }
        let rate = if self.seconds > 0.0 {
            format!(", {:.1} {unit}/s", self.per_second())
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "{unit}: {} ({} skipped as unreadable){rate}",
            self.total(),
            self.skipped
        );
        let _ = writeln!(s, "mean loss = {:.4}", self.mean_loss());
        let _ = writeln!(s, "top-5 accuracy = {:.2}%", 100.0 * self.top5());
        let _ = write!(s, "accuracy = {:.2}%", 100.0 * self.top1());
        s
    }

    /// Draws the confusion matrix as a PNG.
    pub fn confusion_png(&self, path: &std::path::Path) -> Result<()> {
        crate::plot::confusion_matrix(path, &self.confusion, &self.classes)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Runs every batch of epoch 0 of `loader` (use an unshuffled, unaugmented loader) through
/// `logits` (a batch to its `batch × classes` host logits) and counts the results, the
/// evaluation every classifier head shares. `classes` are the model's class names; the loader's
/// folder must have the same labels. Errors when no file could be read or the logits have the
/// wrong size. `unit` names one input in the summary (`images`, `clips`).
pub fn evaluate<P: crate::data::Decode>(
    loader: &crate::data::Loader<P>,
    classes: &[String],
    unit: &'static str,
    mut logits: impl FnMut(&crate::data::Batch) -> Result<Vec<f32>>,
) -> Result<ClassReport> {
    let folder = loader.folder();
    ensure!(
        folder.labels() == classes,
        "the data's classes {:?} (in {}) differ from the model's {:?}",
        folder.labels(),
        folder.root().display(),
        classes
    );
    let start = std::time::Instant::now();
    let mut r = ClassReport::new(classes, unit);
    let mut it = loader.epoch(0);
    for b in &mut it {
        let b = b?;
        if b.batch > 0 {
            r.add(&logits(&b)?, &b.labels)?;
        }
    }
    r.skipped = it.skipped();
    r.seconds = start.elapsed().as_secs_f64();
    ensure!(
        r.total() > 0,
        "no readable {} file in {}",
        <P::Kind as crate::data::FileKind>::WHAT,
        folder.root().display()
    );
    Ok(r)
}
