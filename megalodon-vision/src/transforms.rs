//! Image transforms: 8-bit RGB image in, normalized `Vec<f32>` of `size × size × channels` out.
//!
//! * **Eval** ([`Transform::eval`]): resize so the shorter side is `resize` (aspect kept,
//!   bilinear with antialiasing), then center crop `size × size`.
//! * **Train** ([`Transform::train`]): random resized crop (area fraction drawn from `scale`,
//!   log-uniform aspect ratio from `ratio`, 10 tries then a center-crop fallback — the algorithm
//!   and defaults `(0.08, 1.0)`, `(3/4, 4/3)` of torchvision's `RandomResizedCrop`), resized to
//!   `size × size`, then a horizontal flip with probability 1/2. Deterministic in the `seed`
//!   given to [`Transform::apply`].
//! * **Normalisation**: `(x / 255 - mean[c]) / std[c]` per channel, ImageNet's mean/std by
//!   default ([`Normalize::imagenet`]); [`Normalize::fashion_mnist`] for one gray channel.
//! * **Colour**: [`ColorMode::Rgb`] (3 channels) or [`ColorMode::Gray`] (1 channel, luma
//!   `0.299 R + 0.587 G + 0.114 B`).
//! * **Layout** of the output: [`Layout::Hwc`] (default; value `(y, x, c)` at
//!   `(y * size + x) * C + c`, what [`crate::patches::patchify`] takes) or [`Layout::Chw`]
//!   (at `(c * size + y) * size + x`).
//!
//! An input whose width or height is below [`Transform::min_side`] (the loader sets it to the
//! patch size) is an error naming the file.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use image::imageops::{self, FilterType};
use image::RgbImage;

use crate::rng::SplitMix64;

/// ImageNet's per-channel mean (RGB, on `[0, 1]` values).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation (RGB, on `[0, 1]` values).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Fashion-MNIST's pixel mean (one gray channel, on `[0, 1]` values, training set).
pub const FASHION_MNIST_MEAN: f32 = 0.2860;
/// Fashion-MNIST's pixel standard deviation (one gray channel, training set).
pub const FASHION_MNIST_STD: f32 = 0.3530;

/// Memory order of the transformed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// Height, width, channel: `(y, x, c)` at `(y * W + x) * C + c`.
    #[default]
    Hwc,
    /// Channel, height, width: `(y, x, c)` at `(c * H + y) * W + x`.
    Chw,
}

/// Channels of the transformed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColorMode {
    /// Red, green, blue (3 channels).
    #[default]
    Rgb,
    /// One luma channel, `0.299 R + 0.587 G + 0.114 B` (the gray value itself when R = G = B).
    Gray,
}

impl ColorMode {
    /// Number of channels: 3 or 1.
    pub fn channels(self) -> usize {
        match self {
            ColorMode::Rgb => 3,
            ColorMode::Gray => 1,
        }
    }
}

/// Per-channel normalisation `(x / 255 - mean[c]) / std[c]`.
///
/// Holds one value per channel, or a single value used for every channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalize {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Default for Normalize {
    fn default() -> Self {
        Self::imagenet()
    }
}

impl Normalize {
    /// Mean and standard deviation per channel (on `[0, 1]` pixel values); 1 or 3 values each,
    /// the same count for both. Errors on a non-finite value or a standard deviation `<= 0`.
    pub fn new(mean: &[f32], std: &[f32]) -> Result<Self> {
        ensure!(
            matches!(mean.len(), 1 | 3) && mean.len() == std.len(),
            "normalisation needs 1 or 3 means and as many standard deviations, got {} and {}",
            mean.len(),
            std.len()
        );
        ensure!(
            mean.iter().all(|m| m.is_finite()),
            "normalisation mean {mean:?} is not finite"
        );
        ensure!(
            std.iter().all(|s| s.is_finite() && *s > 0.0),
            "normalisation standard deviation {std:?} must be finite and > 0"
        );
        Ok(Self {
            mean: mean.to_vec(),
            std: std.to_vec(),
        })
    }

    /// ImageNet's mean and std ([`IMAGENET_MEAN`], [`IMAGENET_STD`]).
    pub fn imagenet() -> Self {
        Self {
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
        }
    }

    /// Fashion-MNIST's gray mean and std ([`FASHION_MNIST_MEAN`], [`FASHION_MNIST_STD`]).
    pub fn fashion_mnist() -> Self {
        Self {
            mean: vec![FASHION_MNIST_MEAN],
            std: vec![FASHION_MNIST_STD],
        }
    }

    /// No normalisation beyond scaling to `[0, 1]` (mean 0, std 1).
    pub fn unit() -> Self {
        Self {
            mean: vec![0.0],
            std: vec![1.0],
        }
    }

    /// The means (1 or 3 values).
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// The standard deviations (1 or 3 values).
    pub fn std(&self) -> &[f32] {
        &self.std
    }

    /// `(scale, offset)` per channel such that the output is `x * scale - offset` for an 8-bit
    /// value `x`. Errors when 3 values are given for 1 channel.
    fn coefficients(&self, channels: usize) -> Result<Vec<(f32, f32)>> {
        ensure!(
            self.mean.len() == 1 || self.mean.len() == channels,
            "normalisation has {} means for {} channel(s)",
            self.mean.len(),
            channels
        );
        Ok((0..channels)
            .map(|c| {
                let i = if self.mean.len() == 1 { 0 } else { c };
                (1.0 / (255.0 * self.std[i]), self.mean[i] / self.std[i])
            })
            .collect())
    }
}

/// How the image is cropped and resized before normalisation.
#[derive(Debug, Clone, PartialEq)]
pub enum Augment {
    /// Resize the shorter side to `resize` (aspect kept), then center crop `size × size`.
    Eval {
        /// Shorter side after resizing (`>= size`).
        resize: u32,
    },
    /// Random resized crop to `size × size`, then (when `flip`) a horizontal flip with
    /// probability 1/2.
    Train {
        /// Range of the crop's area as a fraction of the image's area.
        scale: (f64, f64),
        /// Range of the crop's aspect ratio (width / height), drawn log-uniformly.
        ratio: (f64, f64),
        /// Whether to flip horizontally half of the time.
        flip: bool,
    },
}

/// A full transform: crop/resize ([`Augment`]), colour, normalisation and layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    /// Side of the square output image, in pixels.
    pub size: u32,
    /// Crop and resize policy.
    pub augment: Augment,
    /// Channel normalisation.
    pub normalize: Normalize,
    /// Output channels.
    pub color: ColorMode,
    /// Output memory order.
    pub layout: Layout,
    /// Inputs narrower or lower than this are rejected (the loader sets the patch size).
    pub min_side: u32,
}

impl Transform {
    /// Eval transform to `size × size`: shorter side resized to `size`, center crop, ImageNet
    /// normalisation, RGB, HWC.
    pub fn eval(size: u32) -> Self {
        Self::eval_resize(size, size)
    }

    /// Eval transform with an explicit resize side (`resize >= size`), e.g. `(224, 256)` for
    /// the usual ImageNet evaluation.
    pub fn eval_resize(size: u32, resize: u32) -> Self {
        Self {
            size,
            augment: Augment::Eval { resize },
            normalize: Normalize::imagenet(),
            color: ColorMode::Rgb,
            layout: Layout::Hwc,
            min_side: 1,
        }
    }

    /// Training transform to `size × size`: random resized crop with torchvision's defaults
    /// (scale `(0.08, 1.0)`, ratio `(3/4, 4/3)`), horizontal flip, ImageNet normalisation, RGB,
    /// HWC.
    pub fn train(size: u32) -> Self {
        Self {
            size,
            augment: Augment::Train {
                scale: (0.08, 1.0),
                ratio: (3.0 / 4.0, 4.0 / 3.0),
                flip: true,
            },
            normalize: Normalize::imagenet(),
            color: ColorMode::Rgb,
            layout: Layout::Hwc,
            min_side: 1,
        }
    }

    /// Replaces the normalisation.
    pub fn with_normalize(mut self, normalize: Normalize) -> Self {
        self.normalize = normalize;
        self
    }

    /// Replaces the colour mode.
    pub fn with_color(mut self, color: ColorMode) -> Self {
        self.color = color;
        self
    }

    /// Replaces the layout.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Replaces the minimum input side.
    pub fn with_min_side(mut self, min_side: u32) -> Self {
        self.min_side = min_side;
        self
    }

    /// Output channels (3 for RGB, 1 for gray).
    pub fn channels(&self) -> usize {
        self.color.channels()
    }

    /// Number of `f32` values of one output image, `size * size * channels`.
    pub fn output_len(&self) -> Result<usize> {
        (self.size as usize)
            .checked_mul(self.size as usize)
            .and_then(|n| n.checked_mul(self.channels()))
            .with_context(|| format!("image size {} overflows", self.size))
    }

    /// Checks the settings: `size > 0`, `resize >= size`, scale and ratio ranges ordered and
    /// positive (scale within `(0, 1]`), normalisation matching the channels.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.size > 0, "transform output size must be > 0");
        self.output_len()?;
        match &self.augment {
            Augment::Eval { resize } => ensure!(
                *resize >= self.size,
                "eval resize side {resize} is smaller than the crop size {}",
                self.size
            ),
            Augment::Train { scale, ratio, .. } => {
                ensure!(
                    scale.0.is_finite() && scale.0 > 0.0 && scale.0 <= scale.1 && scale.1 <= 1.0,
                    "random resized crop scale {scale:?} must satisfy 0 < min <= max <= 1"
                );
                ensure!(
                    ratio.0.is_finite()
                        && ratio.1.is_finite()
                        && ratio.0 > 0.0
                        && ratio.0 <= ratio.1,
                    "random resized crop ratio {ratio:?} must satisfy 0 < min <= max"
                );
            }
        }
        self.normalize.coefficients(self.channels())?;
        Ok(())
    }

    /// Transforms `img` (read from `source`, used in error messages) into `size * size *
    /// channels` normalized values in [`Self::layout`] order. `seed` drives the random crop and
    /// flip of a training transform (ignored by an eval transform): the same seed gives the
    /// same output.
    ///
    /// Errors: the image is narrower or lower than [`Self::min_side`] (naming `source`), or the
    /// settings are invalid ([`Self::validate`]).
    pub fn apply(&self, img: &RgbImage, source: &Path, seed: u64) -> Result<Vec<f32>> {
        self.validate()?;
        let (w, h) = img.dimensions();
        if w < self.min_side || h < self.min_side {
            bail!(
                "image {} is {w}x{h}, smaller than one {m}x{m} patch",
                source.display(),
                m = self.min_side
            );
        }
        let s = self.size;
        let square = match &self.augment {
            Augment::Eval { resize } => {
                let resized = resize_shorter(img, *resize);
                center_crop(&resized, s, s)
                    .with_context(|| format!("center crop of {}", source.display()))?
            }
            Augment::Train { scale, ratio, flip } => {
                let mut rng = SplitMix64::new(seed);
                let (x, y, cw, ch) = random_resized_crop_box(w, h, *scale, *ratio, &mut rng);
                let view = imageops::crop_imm(img, x, y, cw, ch);
                let mut out = if cw == s && ch == s {
                    view.to_image()
                } else {
                    imageops::resize(&*view, s, s, FilterType::Triangle)
                };
                if *flip && rng.next_u64() & 1 == 1 {
                    imageops::flip_horizontal_in_place(&mut out);
                }
                out
            }
        };
        to_tensor(&square, &self.normalize, self.color, self.layout)
    }
}

/// Resizes `img` so that its shorter side is `side` (the longer one is scaled by the same
/// factor and rounded, at least 1), bilinear with antialiasing; a copy when already so.
pub fn resize_shorter(img: &RgbImage, side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let short = w.min(h).max(1);
    if short == side {
        return img.clone();
    }
    let scale = |long: u32| -> u32 {
        ((long as u64 * side as u64 + short as u64 / 2) / short as u64).clamp(1, u32::MAX as u64)
            as u32
    };
    let (nw, nh) = if w <= h {
        (side, scale(h))
    } else {
        (scale(w), side)
    };
    imageops::resize(img, nw, nh, FilterType::Triangle)
}

/// The centered `cw × ch` region of `img` (offsets rounded down). Errors when the image is
/// smaller than the crop.
pub fn center_crop(img: &RgbImage, cw: u32, ch: u32) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    ensure!(
        cw <= w && ch <= h,
        "cannot center crop {cw}x{ch} from a {w}x{h} image"
    );
    Ok(imageops::crop_imm(img, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image())
}

/// The box `(x, y, width, height)` of a random resized crop of a `w × h` image, as torchvision's
/// `RandomResizedCrop.get_params`: up to 10 draws of an area fraction in `scale` and a
/// log-uniform aspect ratio in `ratio`; when none fits, the whole image center-cropped to the
/// nearest allowed ratio. For `w, h >= 1` and ranges that pass [`Transform::validate`], the box
/// is inside the image with width and height `>= 1`.
pub fn random_resized_crop_box(
    w: u32,
    h: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut SplitMix64,
) -> (u32, u32, u32, u32) {
    let (wf, hf) = (w as f64, h as f64);
    let area = wf * hf;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.uniform(scale.0, scale.1);
        let aspect = rng.uniform(log_lo, log_hi).exp();
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw >= 1.0 && ch >= 1.0 && cw <= wf && ch <= hf {
            let (cw, ch) = (cw as u32, ch as u32);
            let x = rng.below(u64::from(w - cw) + 1) as u32;
            let y = rng.below(u64::from(h - ch) + 1) as u32;
            return (x, y, cw, ch);
        }
    }
    let in_ratio = wf / hf;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, ((wf / ratio.0).round() as u32).clamp(1, h))
    } else if in_ratio > ratio.1 {
        (((hf * ratio.1).round() as u32).clamp(1, w), h)
    } else {
        (w, h)
    };
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// Converts `img` to normalized `f32` values in the given colour mode and layout (no resizing).
pub fn to_tensor(
    img: &RgbImage,
    normalize: &Normalize,
    color: ColorMode,
    layout: Layout,
) -> Result<Vec<f32>> {
    let c = color.channels();
    let coef = normalize.coefficients(c)?;
    let (w, h) = img.dimensions();
    let plane = (w as usize)
        .checked_mul(h as usize)
        .with_context(|| format!("image {w}x{h} overflows"))?;
    let len = plane
        .checked_mul(c)
        .with_context(|| format!("image {w}x{h}x{c} overflows"))?;
    let mut out = vec![0.0f32; len];
    for (i, px) in img.pixels().enumerate() {
        let [r, g, b] = px.0;
        let values: [f32; 3] = match color {
            ColorMode::Rgb => [r as f32, g as f32, b as f32],
            ColorMode::Gray if r == g && g == b => [r as f32, 0.0, 0.0],
            ColorMode::Gray => [
                0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32,
                0.0,
                0.0,
            ],
        };
        for (ch, &(scale, offset)) in coef.iter().enumerate() {
            let v = values[ch] * scale - offset;
            match layout {
                Layout::Hwc => out[i * c + ch] = v,
                Layout::Chw => out[ch * plane + i] = v,
            }
        }
    }
    Ok(out)
}
