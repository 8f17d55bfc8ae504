//! A labelled data set laid out as one sub-folder per label, shared by every classifier head
//! (`docs/design.md` §11).
//!
//! ```text
//! ROOT/
//!   cat/001.png      label names are the sub-folder names, sorted (byte order);
//!   cat/x/002.png    files are found recursively inside each label folder
//!   dog/xyz.png
//! ```
//!
//! * A label's id is its index in the sorted names: prefix folder names with numbers
//!   (`0-shirt`, `1-trouser`) to fix the ids.
//! * What counts as a sample is a [`FileKind`]: its extensions (any case) and the root
//!   sub-folders that are never labels (audio's `_background_noise_`). Other files are listed as
//!   [`LabelFolder::ignored`] and reported once at scan time; hidden entries (`.name`) are skipped
//!   silently.
//! * Scanning only lists files. Decoding happens per batch in the loader
//!   ([`crate::data::loader`]), where an unreadable file is reported, skipped and counted.
//! * Errors name the folder: missing directory, no label folder, a single label, an empty label
//!   folder, a label folder with no file of the kind.

use std::fs;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::rng::SplitMix64;

/// Which files of a label folder are samples, and how messages name them.
pub trait FileKind: Send + Sync + 'static {
    /// The file in messages: `"image"`, `"WAV"`.
    const WHAT: &'static str;
    /// The folder in messages: `"class"`, `"label"`.
    const FOLDER: &'static str;
    /// Extensions taken as samples, compared case-insensitively.
    const EXTENSIONS: &'static [&'static str];
    /// Root sub-folders that are never labels.
    const RESERVED: &'static [&'static str] = &[];

    /// Whether `path` has one of [`Self::EXTENSIONS`].
    fn matches(path: &Path) -> bool {
        path.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| Self::EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
    }
}

/// One labelled file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Path of the file.
    pub path: PathBuf,
    /// Label id: index into [`LabelFolder::labels`].
    pub label: usize,
}

/// A set of labelled files of kind `K` with its label names (a whole tree or one split of it).
pub struct LabelFolder<K> {
    root: PathBuf,
    labels: Vec<String>,
    samples: Vec<Sample>,
    ignored: Vec<PathBuf>,
    kind: PhantomData<K>,
}

impl<K> std::fmt::Debug for LabelFolder<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabelFolder")
            .field("root", &self.root)
            .field("labels", &self.labels)
            .field("files", &self.samples.len())
            .field("ignored", &self.ignored.len())
            .finish()
    }
}

impl<K> Clone for LabelFolder<K> {
    fn clone(&self) -> Self {
        Self {
            root: self.root.clone(),
            labels: self.labels.clone(),
            samples: self.samples.clone(),
            ignored: self.ignored.clone(),
            kind: PhantomData,
        }
    }
}

/// Key that separates the split's random stream from the loaders' streams of the same seed.
const SPLIT_STREAM: u64 = 0x5EED_5B17;
/// Folder nesting below a label folder beyond which scanning stops (guards against link loops).
pub const MAX_DEPTH: usize = 32;

impl<K: FileKind> LabelFolder<K> {
    /// Scans `root`, whose sub-folders (except [`FileKind::RESERVED`] and hidden ones) are the
    /// labels. Errors name the path (see the module docs).
    pub fn scan(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let (what, folder) = (K::WHAT, K::FOLDER);
        ensure!(
            root.is_dir(),
            "{what} folder {} does not exist or is not a directory",
            root.display()
        );
        let mut dirs = Vec::new();
        for entry in sorted_entries(root)? {
            if !entry.is_dir() {
                continue;
            }
            let name = entry
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("{folder} folder name is not UTF-8: {}", entry.display()))?
                .to_string();
            if K::RESERVED.contains(&name.as_str()) {
                continue;
            }
            dirs.push((name, entry));
        }
        match dirs.len() {
            0 => bail!(
                "no {folder} folders in {}: expected one sub-folder of {what} files per {folder}",
                root.display()
            ),
            1 => bail!(
                "only one {folder} folder ({}) in {}: a classifier needs at least two",
                dirs[0].0,
                root.display()
            ),
            _ => {}
        }
        let mut samples = Vec::new();
        let mut ignored = Vec::new();
        for (label, (_, dir)) in dirs.iter().enumerate() {
            let before = samples.len();
            let mut others = 0usize;
            for path in walk_files(dir)? {
                if K::matches(&path) {
                    samples.push(Sample { path, label });
                } else {
                    others += 1;
                    ignored.push(path);
                }
            }
            if samples.len() == before {
                if others == 0 {
                    bail!("empty {folder} folder {}: it holds no files", dir.display());
                }
                bail!(
                    "no {what} file in {folder} folder {}: none of its {others} file(s) has one \
                     of the extensions {:?}",
                    dir.display(),
                    K::EXTENSIONS
                );
            }
        }
        if let Some(first) = ignored.first() {
            eprintln!(
                "warning: {}: ignoring {} file(s) that are not {what} files ({:?}), e.g. {}",
                root.display(),
                ignored.len(),
                K::EXTENSIONS,
                first.display()
            );
        }
        Ok(Self {
            root: root.to_path_buf(),
            labels: dirs.into_iter().map(|(n, _)| n).collect(),
            samples,
            ignored,
            kind: PhantomData,
        })
    }

    /// The files of kind `K` below `dir` (recursively, sorted by path), e.g. a noise folder.
    pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
        let mut files = walk_files(dir)?;
        files.retain(|p| K::matches(p));
        Ok(files)
    }
}

impl<K> LabelFolder<K> {
    /// A set made of the given samples (labels must index `labels`), for callers that build
    /// their own lists. Errors when a label id is out of range.
    pub fn from_samples(
        root: impl Into<PathBuf>,
        labels: Vec<String>,
        samples: Vec<Sample>,
    ) -> Result<Self> {
        let root = root.into();
        if let Some(bad) = samples.iter().find(|s| s.label >= labels.len()) {
            bail!(
                "sample {} has label id {} but {} has only {} labels",
                bad.path.display(),
                bad.label,
                root.display(),
                labels.len()
            );
        }
        Ok(Self {
            root,
            labels,
            samples,
            ignored: Vec::new(),
            kind: PhantomData,
        })
    }

    /// The folder this set was scanned from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Label names, sorted; `labels()[id]` names label id `id`.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Number of labels (at least two for a scanned folder).
    pub fn num_labels(&self) -> usize {
        self.labels.len()
    }

    /// Every file with its label, label by label, files in path order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there is no file (possible for a split, never for a scan).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Files under the label folders that were not taken as samples (wrong extension).
    pub fn ignored(&self) -> &[PathBuf] {
        &self.ignored
    }

    /// Files per label id.
    pub fn label_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.labels.len()];
        for s in &self.samples {
            counts[s.label] += 1;
        }
        counts
    }

    /// The same labels with only the samples at `indices` (in that order). Errors when an index
    /// is out of range.
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let samples = indices
            .iter()
            .map(|&i| {
                self.samples.get(i).cloned().with_context(|| {
                    format!(
                        "sample index {i} out of range: {} has {} files",
                        self.root.display(),
                        self.samples.len()
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_samples(self.root.clone(), self.labels.clone(), samples)
    }

    /// Cuts into `(train, validation)`, stratified: per label, a seeded shuffle of its files
    /// puts `round(n · val_fraction)` of them in validation (at least one when `val_fraction > 0`
    /// and the label has two files or more; never all of a label's files). Both keep folder
    /// order. Deterministic in `(files, val_fraction, seed)`. `val_fraction` must be in `[0, 1)`.
    pub fn split(&self, val_fraction: f64, seed: u64) -> Result<(Self, Self)> {
        ensure!(
            val_fraction.is_finite() && (0.0..1.0).contains(&val_fraction),
            "val_split {val_fraction} must be a fraction in [0, 1)"
        );
        let mut by_label = vec![Vec::new(); self.labels.len()];
        for (i, s) in self.samples.iter().enumerate() {
            by_label[s.label].push(i);
        }
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (label, mut idx) in by_label.into_iter().enumerate() {
            SplitMix64::from_keys(&[seed, SPLIT_STREAM, label as u64]).shuffle(&mut idx);
            let n = idx.len();
            // n · f < n ≤ usize::MAX, so the rounded product fits
            let mut k = (n as f64 * val_fraction).round() as usize;
            if val_fraction > 0.0 && n >= 2 {
                k = k.max(1);
            }
            k = k.min(n.saturating_sub(1));
            let (v, t) = idx.split_at(k);
            val.extend_from_slice(v);
            train.extend_from_slice(t);
        }
        train.sort_unstable();
        val.sort_unstable();
        Ok((self.subset(&train)?, self.subset(&val)?))
    }

    /// Errors, naming both folders and the names that differ, unless `other` has the same
    /// labels (e.g. a `val/` tree beside `train/`).
    pub fn check_same_labels(&self, other: &Self) -> Result<()> {
        if self.labels == other.labels {
            return Ok(());
        }
        let only = |a: &[String], b: &[String]| -> Vec<String> {
            a.iter().filter(|x| !b.contains(x)).cloned().collect()
        };
        bail!(
            "label folders differ between {} and {}: only in the first: {:?}; only in the \
             second: {:?}",
            self.root.display(),
            other.root.display(),
            only(&self.labels, &other.labels),
            only(&other.labels, &self.labels)
        )
    }
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

/// Every non-hidden file below `dir` (recursively, following links, at most [`MAX_DEPTH`]
/// folders deep), sorted by path within each folder.
pub fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
        ensure!(
            depth <= MAX_DEPTH,
            "folders nested more than {MAX_DEPTH} deep at {} (a link loop?)",
            dir.display()
        );
        for path in sorted_entries(dir)? {
            if path.is_dir() {
                walk(&path, depth + 1, out)?;
            } else if path.is_file() {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out)?;
    Ok(out)
}
