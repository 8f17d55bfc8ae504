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

impl<const M: usize, E: Float, D: Device<E>> Params<E, D> for ClassHead<M, E, D> {
    fn visit_params<V: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut V) -> Result<()> {
        v.visit(&join(prefix, "weight"), &mut self.weight)?;
        v.visit(&join(prefix, "bias"), &mut self.bias)
    }
}
