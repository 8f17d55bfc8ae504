//! Epoch iteration over an [`AudioFolder`]: the core's loader
//! ([`megalodon_core::data::loader`]: seeded shuffling, parallel decoding, prefetching, bad
//! files reported and skipped, resumable at a batch index) with [`Clips`] as the decoder.
//!
//! Each file is decoded ([`read_wav`]) and made into a fixed-length clip
//! ([`make_clip_into`]: crop or pad, then augmentation) with the loader's per-file generator,
//! seeded by `(seed, epoch, file index)`. A batch's `values` are `batch × clip_len` samples,
//! its `lengths` each row's real (unpadded) length. Files that cannot be decoded (corrupt,
//! truncated, unsupported, empty, too long, NaN samples) are reported, skipped and counted.
//!
//! [`AudioFolder`]: crate::dataset::AudioFolder

use std::path::Path;

use anyhow::{ensure, Result};
use megalodon_core::data::loader::Decode;
use megalodon_core::data::SplitMix64;

use crate::augment::{make_clip_into, Augment, ClipConfig};
use crate::clip::{frame, frame_lengths, mask, Framed, DEFAULT_CLIP_LEN};
use crate::dataset::Wavs;
use crate::wav::{read_wav, ReadOptions};

pub use megalodon_core::data::loader::{Batch, EpochIter};

/// Batches of fixed-length clips.
pub type Loader = megalodon_core::data::Loader<Clips>;
/// Settings of a [`Loader`]: batching, and [`Clips`] as `decode`.
pub type LoaderConfig = megalodon_core::data::LoaderConfig<Clips>;

/// How a WAV file becomes a row: decoding, clip length and crop, augmentation.
#[derive(Debug, Clone)]
pub struct Clips {
    /// Clip length, crop and normalisation.
    pub clip: ClipConfig,
    /// Training augmentation (`None` for evaluation).
    pub augment: Option<Augment>,
    /// How files are decoded (target rate, duration limit).
    pub read: ReadOptions,
}

impl Clips {
    /// Training clips: a random crop of [`DEFAULT_CLIP_LEN`] samples and the given augmentation.
    pub fn train(augment: Option<Augment>) -> Self {
        Self {
            clip: ClipConfig::train(DEFAULT_CLIP_LEN),
            augment,
            read: ReadOptions::default(),
        }
    }

    /// Evaluation clips: a centre crop of [`DEFAULT_CLIP_LEN`] samples, no augmentation.
    pub fn eval() -> Self {
        Self {
            clip: ClipConfig::eval(DEFAULT_CLIP_LEN),
            ..Self::train(None)
        }
    }
}

impl Decode for Clips {
    type Kind = Wavs;

    fn prepare(&mut self) -> Result<usize> {
        ensure!(self.clip.len > 0, "clip length must be > 0");
        if let Some(a) = &self.augment {
            a.config().validate()?;
        }
        Ok(self.clip.len)
    }

    fn decode(&self, path: &Path, rng: &mut SplitMix64, out: &mut [f32]) -> Result<usize> {
        let raw = read_wav(path, &self.read)?;
        Ok(make_clip_into(
            &raw,
            out,
            &self.clip,
            self.augment.as_ref(),
            rng,
        ))
    }
}

/// What a batch of clips offers beyond the core's [`Batch`].
pub trait ClipBatch {
    /// The padding mask, `batch × clip_len` values: 1 for real samples, 0 for padding.
    fn mask(&self) -> Vec<f32>;

    /// The samples as `batch × tokens × frame_len` frames ([`crate::clip::frame`]) with each
    /// row's real length in frames.
    fn frames(&self, frame_len: usize) -> Result<(Framed, Vec<usize>)>;
}

impl ClipBatch for Batch {
    fn mask(&self) -> Vec<f32> {
        mask(&self.lengths, self.row_len)
    }

    fn frames(&self, frame_len: usize) -> Result<(Framed, Vec<usize>)> {
        let framed = frame(&self.values, self.row_len, frame_len)?;
        Ok((framed, frame_lengths(&self.lengths, frame_len)?))
    }
}
