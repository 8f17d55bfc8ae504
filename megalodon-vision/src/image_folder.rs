//! ImageFolder: a labelled image data set laid out as one sub-folder per class.
//!
//! ```text
//! ROOT/                      ROOT/
//!   train/                     cat/001.png
//!     cat/001.png              cat/002.jpg
//!     dog/xyz.jpeg             dog/xyz.jpeg
//!   val/                       ...
//!     cat/...  dog/...       (one tree, split by `val_split`)
//! ```
//!
//! * An [`ImageFolder`] is the core's [`LabelFolder`] of [`Images`]: class names are the
//!   sub-folder names, sorted (byte order), a class's label id is its index in that order, and
//!   image files (extension one of [`IMAGE_EXTENSIONS`], any case) are found recursively inside
//!   each class folder. Scanning, splitting and its errors are the core's, shared with audio.
//! * Scanning only lists files. Decoding ([`load_rgb`]) happens per batch, in the loader
//!   ([`crate::loader`]), where an unreadable file is reported, skipped and counted.
//!
//! [`DatasetSplits::open`] handles both layouts: `train/` + `val/`, or one tree cut by a seeded,
//! per-class (stratified) `val_split` fraction.

use std::path::Path;

use anyhow::{anyhow, ensure, Context, Result};
use image::RgbImage;
use megalodon_core::data::label_folder::{FileKind, LabelFolder};

pub use megalodon_core::data::label_folder::Sample;

/// File extensions (compared case-insensitively) that are taken as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "webp"];

/// The files of an image folder: [`IMAGE_EXTENSIONS`], one sub-folder per class.
#[derive(Debug, Clone, Copy)]
pub struct Images;

impl FileKind for Images {
    const WHAT: &'static str = "image";
    const FOLDER: &'static str = "class";
    const EXTENSIONS: &'static [&'static str] = IMAGE_EXTENSIONS;
}

/// A scanned image folder: the sorted class names (`labels()`) and every image file with its
/// label.
pub type ImageFolder = LabelFolder<Images>;

/// [`ImageFolder::split`] with a validation part that is never empty: `val_fraction` in `(0, 1)`.
fn split_val(
    folder: &ImageFolder,
    val_fraction: f64,
    seed: u64,
) -> Result<(ImageFolder, ImageFolder)> {
    ensure!(
        val_fraction.is_finite() && val_fraction > 0.0 && val_fraction < 1.0,
        "val split {val_fraction} must be a fraction strictly between 0 and 1"
    );
    let (train, val) = folder.split(val_fraction, seed)?;
    ensure!(
        !val.is_empty(),
        "val split {val_fraction} of {} leaves no validation image (every class has fewer than \
         two images)",
        folder.root().display()
    );
    Ok((train, val))
}

/// Training and validation sets with the same classes.
#[derive(Debug, Clone)]
pub struct DatasetSplits {
    /// Training images.
    pub train: ImageFolder,
    /// Validation images (same `labels()` as `train`).
    pub val: ImageFolder,
}

impl DatasetSplits {
    /// Opens `root`:
    /// * if `root/train` exists: `train` is scanned from it; `val` from `root/val` when that
    ///   exists and `val_split` is `None`, else cut from `train` by `val_split`;
    /// * otherwise the whole `root` is one tree and `val_split` (required) cuts it.
    ///
    /// The split is stratified per class and deterministic in `seed` (see
    /// [`LabelFolder::split`]). Errors name the folder: missing `val/` without a split, train
    /// and val class names that differ, and every error of [`ImageFolder::scan`].
    pub fn open(root: impl AsRef<Path>, val_split: Option<f64>, seed: u64) -> Result<Self> {
        let root = root.as_ref();
        ensure!(
            root.is_dir(),
            "data folder {} does not exist or is not a directory",
            root.display()
        );
        let train_dir = root.join("train");
        let val_dir = root.join("val");
        if train_dir.is_dir() {
            let train = ImageFolder::scan(&train_dir)?;
            if let Some(f) = val_split {
                let (train, val) = split_val(&train, f, seed)
                    .with_context(|| format!("splitting {}", train_dir.display()))?;
                return Ok(Self { train, val });
            }
            ensure!(
                val_dir.is_dir(),
                "{} has train/ but no val/ folder: add val/ or give a val split fraction",
                root.display()
            );
            let val = ImageFolder::scan(&val_dir)?;
            train.check_same_labels(&val)?;
            return Ok(Self { train, val });
        }
        let f = val_split.ok_or_else(|| {
            anyhow!(
                "{} has no train/ folder: give a val split fraction to split the tree into \
                 train and val",
                root.display()
            )
        })?;
        let all = ImageFolder::scan(root)?;
        let (train, val) =
            split_val(&all, f, seed).with_context(|| format!("splitting {}", root.display()))?;
        Ok(Self { train, val })
    }
}

/// Decodes the image at `path` (format guessed from its content, not its extension) and
/// converts it to 8-bit RGB (gray is replicated; alpha is dropped). Errors name the file:
/// unreadable, unsupported format, corrupt or truncated data, zero width or height.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let img = reader
        .decode()
        .with_context(|| format!("cannot decode image {}", path.display()))?;
    ensure!(
        img.width() > 0 && img.height() > 0,
        "image {} is empty ({}x{})",
        path.display(),
        img.width(),
        img.height()
    );
    Ok(img.into_rgb8())
}
