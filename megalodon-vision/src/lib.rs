//! # megalodon-vision
//!
//! Image classification with Megalodon: [`model::ImageClassifier`] puts a patch embedding and an
//! optional learned position embedding in front of the core's
//! [`megalodon_core::BidirectionalEncoder`], and masked mean pooling plus the shared
//! [`megalodon_core::nn::classifier::ClassHead`] behind it; it trains with the core's
//! [`megalodon_core::fit`] loop ([`train::StepBatches`] maps steps to batches) and is evaluated
//! by [`eval::evaluate`]. Presets: [`FashionSmall`] (CPU) and [`ImageNetMegalodon`]. The command
//! line is `examples/vision.rs` in the repository root.
//!
//! The data layer (no model needed):
//! * [`image_folder`]: an ImageFolder reader (one sub-folder per class, `train/` + `val/` or a
//!   seeded stratified split), decoding PNG, JPEG, BMP and WebP to RGB.
//! * [`transforms`]: resize + center crop (eval), random resized crop + flip (training),
//!   per-channel normalisation, HWC or CHW output.
//! * [`patches`]: square images to raster-ordered `P·P·C` patches.
//! * [`loader`]: seeded epochs of patchified batches, decoded in parallel and prefetched,
//!   resumable at a batch index; unreadable images reported, skipped and counted.
//! * [`rng`]: the core's seeded generator behind the shuffles and augmentations.
//!
//! ```no_run
//! use megalodon_vision::{
//!     ColorMode, DatasetSplits, Loader, LoaderConfig, Normalize, Patches, Transform,
//! };
//! # fn main() -> anyhow::Result<()> {
//! let data = DatasetSplits::open("data/fashion-mnist", None, 0)?;
//! let transform = Transform::train(28)
//!     .with_color(ColorMode::Gray)
//!     .with_normalize(Normalize::fashion_mnist());
//! let mut cfg = LoaderConfig::new(Patches::new(transform, 4), 64); // patch 4, batch 64
//! cfg.seed = 1;
//! let loader = Loader::new(data.train, cfg)?;
//! let mut batches = loader.epoch(0);
//! for batch in &mut batches {
//!     let batch = batch?; // batch.values: batch.batch x tokens() x patch_dim() of loader.decode()
//! #   let _ = batch;
//! }
//! println!("skipped {} unreadable images", batches.skipped());
//! # Ok(()) }
//! ```

pub use image;
pub use megalodon_core;

pub mod eval;
pub mod image_folder;
pub mod loader;
pub mod model;
pub mod patches;
pub mod rng;
pub mod train;
pub mod transforms;

pub use eval::{evaluate, EvalReport};
pub use image_folder::{load_rgb, DatasetSplits, ImageFolder, Images, Sample, IMAGE_EXTENSIONS};
pub use loader::{Batch, EpochIter, Loader, LoaderConfig, Patches};
pub use model::{
    load_conf, param_count, FashionSmall, ImageClassifier, ImageNetMegalodon, VisionConf,
    VisionModel, VisionPreset, FASHION_SMALL, IMAGENET,
};
pub use patches::{num_patches, patch_dim, patchify, patchify_const, patchify_into, unpatchify};
pub use train::{train_transform, AugmentLevel, StepBatches};
pub use transforms::{Augment, ColorMode, Layout, Normalize, Transform};
