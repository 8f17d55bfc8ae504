//! Feeding the core's training loop: [`StepBatches`] (the core's, over the image [`Loader`])
//! maps optimizer steps to batches as a pure function of the step, so a resumed run sees the
//! batches of the uninterrupted one; [`train_transform`] is the training augmentation.
//!
//! [`Loader`]: crate::loader::Loader

use anyhow::Result;

/// Batches by step number over the image loader (see [`megalodon_core::data::StepBatches`]).
pub type StepBatches = megalodon_core::data::StepBatches<crate::loader::Patches>;

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
