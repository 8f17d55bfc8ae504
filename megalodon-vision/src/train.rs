//! Feeding the core's training loop: optimizer step `s` (1-based) takes batch
//! `(s - 1) % batches_per_epoch` of epoch `(s - 1) / batches_per_epoch`, a pure function of the
//! step, so a resumed run sees the batches of the uninterrupted one (the loader's content
//! depends only on seed, epoch and batch index).

use anyhow::{ensure, Context, Result};

use crate::loader::{Batch, EpochIter, Loader};

/// Batches by step number over a [`Loader`], keeping one prefetching [`EpochIter`] open while
/// the steps are consecutive (a jump, e.g. on resume, restarts it at the right batch).
pub struct StepBatches {
    loader: Loader,
    per_epoch: usize,
    iter: Option<EpochIter>,
    /// `(epoch, batch index)` the open iterator yields next.
    next: (u64, usize),
}

impl StepBatches {
    /// Errors when the loader has no batch per epoch.
    pub fn new(loader: Loader) -> Result<Self> {
        let per_epoch = loader.batches_per_epoch();
        ensure!(
            per_epoch > 0,
            "{} yields no batch per epoch (fewer images than one batch with drop_last?)",
            loader.folder().root().display()
        );
        Ok(Self {
            loader,
            per_epoch,
            iter: None,
            next: (0, 0),
        })
    }

    /// Batches per epoch.
    pub fn per_epoch(&self) -> usize {
        self.per_epoch
    }

    /// The loader.
    pub fn loader(&self) -> &Loader {
        &self.loader
    }

    /// `(epoch, batch index)` of 1-based step `step` (`step >= 1`).
    pub fn position(&self, step: u64) -> Result<(u64, usize)> {
        ensure!(step >= 1, "steps are numbered from 1");
        let s = step - 1;
        let n = self.per_epoch as u64;
        Ok((s / n, usize::try_from(s % n).context("batch index")?))
    }

    /// The batch of step `step`.
    pub fn get(&mut self, step: u64) -> Result<Batch> {
        let (epoch, index) = self.position(step)?;
        let open_epoch = self.iter.as_ref().map(EpochIter::epoch);
        if open_epoch != Some(epoch) || self.next != (epoch, index) {
            self.iter = Some(self.loader.epoch_from(epoch, index)?);
        }
        let it = self.iter.as_mut().context("epoch iterator")?;
        let b = it
            .next()
            .with_context(|| format!("epoch {epoch} ended before batch {index}"))??;
        ensure!(
            b.epoch == epoch && b.index == index,
            "loader yielded batch {} of epoch {}, expected batch {index} of epoch {epoch}",
            b.index,
            b.epoch
        );
        self.next = if index + 1 == self.per_epoch {
            (epoch + 1, 0)
        } else {
            (epoch, index + 1)
        };
        Ok(b)
    }

    /// Images skipped so far in the epoch being iterated (since its iterator was opened), with
    /// their paths.
    pub fn epoch_skipped(&self) -> (usize, Vec<std::path::PathBuf>) {
        self.iter
            .as_ref()
            .map(|it| (it.skipped(), it.skipped_files().to_vec()))
            .unwrap_or_default()
    }
}

/// Training augmentation strength (`--augment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AugmentLevel {
    /// The evaluation transform (resize + center crop), no randomness.
    None,
    /// Random resized crop of 70–100% of the area, aspect 0.85–1.18, horizontal flip: for small
    /// images and short runs.
    Mild,
    /// torchvision's random resized crop (8–100%, aspect 3/4–4/3) and flip: ImageNet-style.
    Full,
}

impl std::str::FromStr for AugmentLevel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "mild" => Ok(Self::Mild),
            "full" => Ok(Self::Full),
            other => anyhow::bail!("--augment must be none, mild or full, got `{other}`"),
        }
    }
}

/// The training transform of a model config with the given augmentation.
pub fn train_transform(
    conf: &crate::model::VisionConf,
    level: AugmentLevel,
) -> Result<crate::transforms::Transform> {
    use crate::transforms::Augment;
    let mut t = conf.eval_transform()?;
    t.augment = match level {
        AugmentLevel::None => return Ok(t),
        AugmentLevel::Mild => Augment::Train {
            scale: (0.7, 1.0),
            ratio: (0.85, 1.0 / 0.85),
            flip: true,
        },
        AugmentLevel::Full => Augment::Train {
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip: true,
        },
    };
    Ok(t)
}
