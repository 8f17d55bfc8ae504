//! Epoch iteration over an [`ImageFolder`]: the core's loader
//! ([`megalodon_core::data::loader`]: seeded shuffling, parallel decoding, prefetching, bad
//! files reported and skipped, resumable at a batch index) with [`Patches`] as the decoder.
//!
//! Each image is decoded ([`load_rgb`]), transformed with a seed drawn from the loader's
//! per-sample generator (seeded by `(seed, epoch, sample index)`) and cut into patches
//! ([`crate::patches`]): a batch's `values` are `batch × tokens × patch_dim`, image-major, then
//! patch, then value in patch. An image smaller than one patch is skipped like an unreadable one.
//!
//! [`ImageFolder`]: crate::image_folder::ImageFolder

use std::path::Path;

use anyhow::{ensure, Context, Result};
use megalodon_core::data::loader::Decode;
use megalodon_core::data::SplitMix64;

use crate::image_folder::{load_rgb, Images};
use crate::patches::{num_patches, patch_dim, patchify_into};
use crate::transforms::{Layout, Transform};

pub use megalodon_core::data::loader::{Batch, EpochIter};

/// Batches of patchified images.
pub type Loader = megalodon_core::data::Loader<Patches>;
/// Settings of a [`Loader`]: batching, and [`Patches`] as `decode`.
pub type LoaderConfig = megalodon_core::data::LoaderConfig<Patches>;

/// How an image becomes a row: a [`Transform`] (its `size`, colour, augmentation and
/// normalisation; HWC layout) and square patches of side `patch`.
#[derive(Debug, Clone)]
pub struct Patches {
    /// Patch side `P`; the transform's output size must be a multiple of it.
    pub patch: usize,
    /// Transform applied to every image. Its `min_side` is raised to `patch` by the loader.
    pub transform: Transform,
    tokens: usize,
    patch_dim: usize,
}

impl Patches {
    /// Patches of side `patch` of images transformed by `transform`.
    pub fn new(transform: Transform, patch: usize) -> Self {
        Self {
            patch,
            transform,
            tokens: 0,
            patch_dim: 0,
        }
    }

    /// Patches per image, `T = (S / P)²` (set when a loader is built).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Values per patch, `P · P · C` (set when a loader is built).
    pub fn patch_dim(&self) -> usize {
        self.patch_dim
    }
}

impl Decode for Patches {
    type Kind = Images;

    fn prepare(&mut self) -> Result<usize> {
        ensure!(
            self.transform.layout == Layout::Hwc,
            "the loader patchifies HWC images: set the transform layout to Hwc"
        );
        let size = self.transform.size as usize;
        self.tokens = num_patches(size, self.patch).context("loader image and patch sizes")?;
        self.patch_dim = patch_dim(self.patch, self.transform.channels())?;
        let min_side = u32::try_from(self.patch)
            .with_context(|| format!("patch size {} too large", self.patch))?;
        self.transform.min_side = self.transform.min_side.max(min_side);
        self.transform.validate()?;
        self.transform.output_len()
    }

    fn decode(&self, path: &Path, rng: &mut SplitMix64, out: &mut [f32]) -> Result<usize> {
        let img = load_rgb(path)?;
        let pixels = self.transform.apply(&img, path, rng.next_u64())?;
        patchify_into(
            &pixels,
            self.transform.size as usize,
            self.patch,
            self.transform.channels(),
            out,
        )?;
        Ok(out.len())
    }
}
