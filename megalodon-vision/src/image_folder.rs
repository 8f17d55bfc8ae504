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
//! * Class names are the sub-folder names, sorted (byte order); a class's label id is its index
//!   in that order. Prefix folder names with numbers (`0-shirt`, `1-trouser`) to fix the ids.
//! * Image files are found recursively inside each class folder; files whose extension is one of
//!   [`IMAGE_EXTENSIONS`] (any case) are samples. Other files are listed as
//!   [`ImageFolder::ignored`] and reported once at scan time; hidden entries (`.name`) are skipped
//!   silently.
//! * Scanning only lists files. Decoding ([`load_rgb`]) happens per batch, in the loader
//!   ([`crate::loader`]), where an unreadable file is reported, skipped and counted.
//! * Errors name the folder or file: missing directory, no class folders, a single class, an
//!   empty class folder, a folder with no image file at all, train/val class mismatch.
//!
//! [`DatasetSplits::open`] handles both layouts: `train/` + `val/`, or one tree cut by a seeded,
//! per-class (stratified) `val_split` fraction.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use image::RgbImage;

use crate::rng::SplitMix64;

/// File extensions (compared case-insensitively) that are taken as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "webp"];

/// One labelled image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Path of the image file.
    pub path: PathBuf,
    /// Label id: index of the class in [`ImageFolder::classes`].
    pub label: usize,
}

/// A scanned image folder: the sorted class names and every image file with its label.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<Sample>,
    ignored: Vec<PathBuf>,
}

impl ImageFolder {
    /// Scans `root`, whose sub-folders are the classes (see the module docs).
    ///
    /// Errors (each naming the path): `root` missing or not a directory, fewer than two class
    /// folders, a class folder without any image file, a non-UTF-8 folder name.
    pub fn scan(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        ensure!(
            root.is_dir(),
            "image folder {} does not exist or is not a directory",
            root.display()
        );
        let mut classes = Vec::new();
        for entry in sorted_entries(root)? {
            if entry.is_dir() {
                let name = entry
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| anyhow!("class folder name is not UTF-8: {}", entry.display()))?
                    .to_string();
                classes.push((name, entry));
            }
        }
        match classes.len() {
            0 => bail!(
                "no class folders in {}: expected one sub-folder of images per class",
                root.display()
            ),
            1 => bail!(
                "only one class folder ({}) in {}: a classifier needs at least two classes",
                classes[0].0,
                root.display()
            ),
            _ => {}
        }
        let mut samples = Vec::new();
        let mut ignored = Vec::new();
        for (label, (_, dir)) in classes.iter().enumerate() {
            let mut files = Vec::new();
            walk_files(dir, 0, &mut files)?;
            let before = samples.len();
            let mut others = 0usize;
            for path in files {
                if has_image_extension(&path) {
                    samples.push(Sample { path, label });
                } else {
                    others += 1;
                    ignored.push(path);
                }
            }
            if samples.len() == before {
                if others == 0 {
                    bail!("empty class folder {}: it holds no files", dir.display());
                }
                bail!(
                    "no readable image in class folder {}: its {} file(s) have none of the \
                     extensions {:?}",
                    dir.display(),
                    others,
                    IMAGE_EXTENSIONS
                );
            }
        }
        if let Some(first) = ignored.first() {
            eprintln!(
                "warning: {}: ignoring {} file(s) that are not {:?} images, e.g. {}",
                root.display(),
                ignored.len(),
                IMAGE_EXTENSIONS,
                first.display()
            );
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes: classes.into_iter().map(|(n, _)| n).collect(),
            samples,
            ignored,
        })
    }

    /// The scanned root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names, sorted; `classes()[label]` is the name of label id `label`.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Number of classes (at least two).
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Every image file with its label, in class order then path order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Number of image files.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there is no image file (never true for a folder returned by [`Self::scan`]).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Files under the class folders that were not taken as images (wrong extension).
    pub fn ignored(&self) -> &[PathBuf] {
        &self.ignored
    }

    /// Number of samples per label id.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for s in &self.samples {
            counts[s.label] += 1;
        }
        counts
    }

    /// The same classes with only the samples at `indices` (in that order). Errors when an index
    /// is out of range.
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let samples = indices
            .iter()
            .map(|&i| {
                self.samples.get(i).cloned().ok_or_else(|| {
                    anyhow!(
                        "sample index {i} out of range: {} has {} images",
                        self.root.display(),
                        self.samples.len()
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            root: self.root.clone(),
            classes: self.classes.clone(),
            samples,
            ignored: Vec::new(),
        })
    }

    /// Splits into `(train, val)`: in each class, a seeded shuffle of its files puts
    /// `round(count * val_fraction)` of them in val (at least one when the class has two or more
    /// files, and never all of them). Deterministic in `(files, val_fraction, seed)`.
    ///
    /// Errors when `val_fraction` is not in `(0, 1)` or when val would be empty.
    pub fn split(&self, val_fraction: f64, seed: u64) -> Result<(Self, Self)> {
        ensure!(
            val_fraction.is_finite() && val_fraction > 0.0 && val_fraction < 1.0,
            "val split {val_fraction} must be a fraction strictly between 0 and 1"
        );
        let mut by_class = vec![Vec::new(); self.classes.len()];
        for (i, s) in self.samples.iter().enumerate() {
            by_class[s.label].push(i);
        }
        let mut train = Vec::new();
        let mut val = Vec::new();
        for (label, mut idx) in by_class.into_iter().enumerate() {
            let n = idx.len();
            let mut n_val = (n as f64 * val_fraction).round() as usize;
            if n >= 2 {
                n_val = n_val.clamp(1, n - 1);
            } else {
                n_val = 0;
            }
            SplitMix64::derive(&[seed, 0x5B11_7000, label as u64]).shuffle(&mut idx);
            let (v, t) = idx.split_at(n_val);
            let (mut v, mut t) = (v.to_vec(), t.to_vec());
            v.sort_unstable();
            t.sort_unstable();
            val.extend(v);
            train.extend(t);
        }
        ensure!(
            !val.is_empty(),
            "val split {val_fraction} of {} leaves no validation image (every class has fewer \
             than two images)",
            self.root.display()
        );
        Ok((self.subset(&train)?, self.subset(&val)?))
    }
}

/// Training and validation sets with the same classes.
#[derive(Debug, Clone)]
pub struct DatasetSplits {
    /// Training images.
    pub train: ImageFolder,
    /// Validation images (same `classes()` as `train`).
    pub val: ImageFolder,
}

impl DatasetSplits {
    /// Opens `root`:
    /// * if `root/train` exists: `train` is scanned from it; `val` from `root/val` when that
    ///   exists and `val_split` is `None`, else cut from `train` by `val_split`;
    /// * otherwise the whole `root` is one tree and `val_split` (required) cuts it.
    ///
    /// The split is stratified per class and deterministic in `seed` (see
    /// [`ImageFolder::split`]). Errors name the folder: missing `val/` without a split, train
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
                let (train, val) = train
                    .split(f, seed)
                    .with_context(|| format!("splitting {}", train_dir.display()))?;
                return Ok(Self { train, val });
            }
            ensure!(
                val_dir.is_dir(),
                "{} has train/ but no val/ folder: add val/ or give a val split fraction",
                root.display()
            );
            let val = ImageFolder::scan(&val_dir)?;
            if train.classes() != val.classes() {
                let t: BTreeSet<_> = train.classes().iter().collect();
                let v: BTreeSet<_> = val.classes().iter().collect();
                bail!(
                    "class folders differ between {} and {}: only in train: {:?}; only in val: {:?}",
                    train_dir.display(),
                    val_dir.display(),
                    t.difference(&v).collect::<Vec<_>>(),
                    v.difference(&t).collect::<Vec<_>>()
                );
            }
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
        let (train, val) = all
            .split(f, seed)
            .with_context(|| format!("splitting {}", root.display()))?;
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

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Non-hidden entries of `dir`, sorted by path.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if !is_hidden(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Folder nesting below a class folder beyond which scanning stops (guards against link loops).
const MAX_DEPTH: usize = 32;

/// Every file below `dir` (recursively, following links), sorted by path within each folder.
fn walk_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    ensure!(
        depth <= MAX_DEPTH,
        "folders nested more than {MAX_DEPTH} deep at {} (a link loop?)",
        dir.display()
    );
    for path in sorted_entries(dir)? {
        if path.is_dir() {
            walk_files(&path, depth + 1, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}
