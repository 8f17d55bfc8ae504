//! Labelled WAV folders: one sub-folder per label, plain or in the Speech Commands layout.
//!
//! ```text
//! plain (split by val_split)     train/val[/test] trees      Speech Commands
//! ROOT/                          ROOT/                       ROOT/
//!   yes/a.wav                      train/yes/a.wav             yes/0a7c2a8d_nohash_0.wav
//!   no/b.wav                       train/no/...                no/...
//!   _background_noise_/*.wav       val/yes/... val/no/...      _background_noise_/*.wav
//!                                  test/... (optional)         validation_list.txt
//!                                                              testing_list.txt
//! ```
//!
//! * **Labels** are the sub-folder names, sorted (byte order); a label's id is its index in
//!   that order. [`NOISE_DIR`] (`_background_noise_`) and hidden entries (`.name`) are never
//!   labels. WAV files (extension `wav`, any case) are found recursively in each label folder;
//!   other files are listed in [`AudioFolder::ignored`] and reported once on stderr.
//! * **Speech Commands** ([`Layout::SpeechCommands`], chosen when `validation_list.txt` or
//!   `testing_list.txt` exists in the root): those files list paths relative to the root
//!   (`label/file.wav`, one per line) that form the validation and test splits; every other
//!   WAV is training data. Listed paths that do not exist are counted and reported once.
//! * **Plain** ([`Layout::Plain`]): one tree, cut into train and validation by a seeded,
//!   stratified fraction ([`split_stratified`]): each label keeps `round(n · val_split)`
//!   files for validation (at least one when `val_split > 0` and the label has two or more).
//! * **Trees** ([`Layout::Trees`]): `train/` and `val/` (or `validation/`), optionally
//!   `test/`, each a plain label tree with the same labels.
//! * **Noise**: the WAVs of `ROOT/_background_noise_/` (any layout) are returned as
//!   [`AudioSplits::noise`], the source for [`crate::augment::NoiseBank`].
//! * Scanning only lists files; decoding happens in the loader ([`crate::loader`]), where an
//!   unreadable file is reported, skipped and counted.
//! * **Errors** name the path: a missing root, no label folder, a single label, an empty label
//!   folder, a label folder without WAV files, mismatched train/val labels.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::rng::SplitMix64;

/// Folder of background-noise WAVs in the Speech Commands layout; never a label.
pub const NOISE_DIR: &str = "_background_noise_";
/// File extensions (case-insensitive) taken as audio.
pub const AUDIO_EXTENSIONS: &[&str] = &["wav"];
/// The Speech Commands validation list, in the root.
pub const VALIDATION_LIST: &str = "validation_list.txt";
/// The Speech Commands test list, in the root.
pub const TESTING_LIST: &str = "testing_list.txt";
/// Deepest folder nesting searched inside a label folder.
const MAX_DEPTH: usize = 16;
/// Key that separates the split's random stream from the loader's streams of the same seed.
const SPLIT_STREAM: u64 = 0x5EED_5B17;

/// One labelled WAV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Path of the WAV file.
    pub path: PathBuf,
    /// Label id: index into [`AudioFolder::labels`].
    pub label: usize,
}

/// A set of labelled WAV files with its label names (a whole tree or one split of it).
#[derive(Debug, Clone)]
pub struct AudioFolder {
    root: PathBuf,
    labels: Vec<String>,
    samples: Vec<Sample>,
    ignored: Vec<PathBuf>,
}

impl AudioFolder {
    /// Scans `root`, whose sub-folders (except [`NOISE_DIR`] and hidden ones) are the labels.
    ///
    /// Errors (naming the path): `root` missing or not a directory, no label folder, a single
    /// label, a label folder with no file or with no WAV file, a non-UTF-8 folder name.
    pub fn scan(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        ensure!(
            root.is_dir(),
            "audio folder {} does not exist or is not a directory",
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
                .ok_or_else(|| anyhow!("label folder name is not UTF-8: {}", entry.display()))?
                .to_string();
            if name == NOISE_DIR {
                continue;
            }
            dirs.push((name, entry));
        }
        match dirs.len() {
            0 => bail!(
                "no label folders in {}: expected one sub-folder of WAV files per label",
                root.display()
            ),
            1 => bail!(
                "only one label folder ({}) in {}: a classifier needs at least two labels",
                dirs[0].0,
                root.display()
            ),
            _ => {}
        }
        let mut samples = Vec::new();
        let mut ignored = Vec::new();
        for (label, (_, dir)) in dirs.iter().enumerate() {
            let mut files = Vec::new();
            walk_files(dir, 0, &mut files)?;
            let before = samples.len();
            let mut others = 0usize;
            for path in files {
                if is_audio(&path) {
                    samples.push(Sample { path, label });
                } else {
                    others += 1;
                    ignored.push(path);
                }
            }
            if samples.len() == before {
                if others == 0 {
                    bail!("empty label folder {}: it holds no files", dir.display());
                }
                bail!(
                    "no WAV file in label folder {}: none of its {others} file(s) ends in .wav",
                    dir.display()
                );
            }
        }
        if let Some(first) = ignored.first() {
            eprintln!(
                "warning: {}: ignoring {} file(s) that are not WAV, e.g. {}",
                root.display(),
                ignored.len(),
                first.display()
            );
        }
        Ok(Self {
            root: root.to_path_buf(),
            labels: dirs.into_iter().map(|(n, _)| n).collect(),
            samples,
            ignored,
        })
    }

    /// A folder made of the given samples (labels must index `labels`). For callers that
    /// build their own lists; errors when a label id is out of range.
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

    /// Number of labels.
    pub fn num_labels(&self) -> usize {
        self.labels.len()
    }

    /// Every WAV file with its label, label by label, files in path order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Number of WAV files.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there is no WAV file (possible for a split, never for a scan).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Files found in label folders that are not WAV files (left out).
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

    /// The samples at `indices` (same labels and root); errors when an index is out of range.
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let samples = indices
            .iter()
            .map(|&i| {
                self.samples.get(i).cloned().with_context(|| {
                    format!("sample index {i} out of range ({} samples)", self.len())
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            root: self.root.clone(),
            labels: self.labels.clone(),
            samples,
            ignored: Vec::new(),
        })
    }
}

/// Which directory layout [`AudioSplits::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One label tree, split by a seeded stratified fraction.
    Plain,
    /// `train/` + `val/` (or `validation/`) [+ `test/`] label trees.
    Trees,
    /// Speech Commands: one label tree plus `validation_list.txt` / `testing_list.txt`.
    SpeechCommands,
}

/// The train / validation / test splits of a data folder, with its noise files.
#[derive(Debug, Clone)]
pub struct AudioSplits {
    /// Training files.
    pub train: AudioFolder,
    /// Validation files (may be empty, e.g. `val_split` 0).
    pub val: AudioFolder,
    /// Test files, when the layout has a test split.
    pub test: Option<AudioFolder>,
    /// The WAV files of `ROOT/_background_noise_/`, sorted (empty when there is none).
    pub noise: Vec<PathBuf>,
    /// The layout found.
    pub layout: Layout,
    /// Speech Commands list entries that name no existing file (reported once on stderr).
    pub missing_listed: usize,
}

impl AudioSplits {
    /// Opens `root` in whichever layout it has (see the module docs). `val_split` (in
    /// `[0, 1)`) and `seed` cut the plain layout; the other layouts ignore them.
    pub fn open(root: impl AsRef<Path>, val_split: f64, seed: u64) -> Result<Self> {
        let root = root.as_ref();
        ensure!(
            root.is_dir(),
            "audio data folder {} does not exist or is not a directory",
            root.display()
        );
        let noise = noise_files(root)?;
        let (vlist, tlist) = (root.join(VALIDATION_LIST), root.join(TESTING_LIST));
        if vlist.is_file() || tlist.is_file() {
            let mut s = Self::speech_commands(root)?;
            s.noise = noise;
            return Ok(s);
        }
        let train_dir = root.join("train");
        let val_dir = ["val", "validation"]
            .iter()
            .map(|d| root.join(d))
            .find(|d| d.is_dir());
        if train_dir.is_dir() {
            let val_dir = val_dir.with_context(|| {
                format!(
                    "{} has a train/ folder but no val/ (or validation/) folder next to it",
                    root.display()
                )
            })?;
            let train = AudioFolder::scan(&train_dir)?;
            let val = AudioFolder::scan(&val_dir)?;
            same_labels(&train, &val)?;
            let test_dir = root.join("test");
            let test = if test_dir.is_dir() {
                let t = AudioFolder::scan(&test_dir)?;
                same_labels(&train, &t)?;
                Some(t)
            } else {
                None
            };
            return Ok(Self {
                train,
                val,
                test,
                noise,
                layout: Layout::Trees,
                missing_listed: 0,
            });
        }
        let all = AudioFolder::scan(root)?;
        let (train, val) = split_stratified(&all, val_split, seed)?;
        Ok(Self {
            train,
            val,
            test: None,
            noise,
            layout: Layout::Plain,
            missing_listed: 0,
        })
    }

    /// Opens `root` in the Speech Commands layout: files listed in `validation_list.txt` are
    /// validation, in `testing_list.txt` test, all others train. A missing list file means an
    /// empty split. Paths in the lists are relative to `root`, with `/` separators.
    pub fn speech_commands(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let all = AudioFolder::scan(root)?;
        let val_set = read_list(&root.join(VALIDATION_LIST))?;
        let test_set = read_list(&root.join(TESTING_LIST))?;
        let (mut tr, mut va, mut te) = (Vec::new(), Vec::new(), Vec::new());
        let mut seen = HashSet::new();
        for (i, s) in all.samples().iter().enumerate() {
            let rel = relative_key(root, &s.path);
            if test_set.contains(&rel) {
                te.push(i);
            } else if val_set.contains(&rel) {
                va.push(i);
            } else {
                tr.push(i);
            }
            seen.insert(rel);
        }
        let missing: Vec<&String> = val_set
            .iter()
            .chain(test_set.iter())
            .filter(|p| !seen.contains(*p))
            .collect();
        if let Some(first) = missing.first() {
            eprintln!(
                "warning: {}: {} path(s) in {VALIDATION_LIST}/{TESTING_LIST} name no WAV file of a \
                 label folder, e.g. {first}",
                root.display(),
                missing.len()
            );
        }
        ensure!(
            !tr.is_empty(),
            "no training file in {}: every WAV is listed in {VALIDATION_LIST} or {TESTING_LIST}",
            root.display()
        );
        Ok(Self {
            train: all.subset(&tr)?,
            val: all.subset(&va)?,
            test: Some(all.subset(&te)?),
            noise: noise_files(root)?,
            layout: Layout::SpeechCommands,
            missing_listed: missing.len(),
        })
    }

    /// Label names (shared by all splits).
    pub fn labels(&self) -> &[String] {
        self.train.labels()
    }
}

/// Cuts `folder` into (train, validation): per label, a seeded random `round(n · val_split)`
/// files go to validation (at least one when `val_split > 0` and the label has two files or
/// more; never all of a label's files). `val_split` must be in `[0, 1)`.
pub fn split_stratified(
    folder: &AudioFolder,
    val_split: f64,
    seed: u64,
) -> Result<(AudioFolder, AudioFolder)> {
    ensure!(
        (0.0..1.0).contains(&val_split),
        "val_split must be in [0, 1), got {val_split}"
    );
    let mut by_label = vec![Vec::new(); folder.num_labels()];
    for (i, s) in folder.samples().iter().enumerate() {
        by_label[s.label].push(i);
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (label, mut idx) in by_label.into_iter().enumerate() {
        SplitMix64::from_keys(&[seed, SPLIT_STREAM, label as u64]).shuffle(&mut idx);
        let n = idx.len();
        let mut k = (n as f64 * val_split).round() as usize;
        if val_split > 0.0 && n >= 2 {
            k = k.max(1);
        }
        k = k.min(n.saturating_sub(1));
        let (v, t) = idx.split_at(k);
        val.extend_from_slice(v);
        train.extend_from_slice(t);
    }
    train.sort_unstable();
    val.sort_unstable();
    Ok((folder.subset(&train)?, folder.subset(&val)?))
}

/// The WAV files of `root/_background_noise_/`, sorted; empty when the folder is absent.
pub fn noise_files(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join(NOISE_DIR);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    walk_files(&dir, 0, &mut files)?;
    files.retain(|p| is_audio(p));
    Ok(files)
}

fn same_labels(a: &AudioFolder, b: &AudioFolder) -> Result<()> {
    ensure!(
        a.labels() == b.labels(),
        "label folders differ between {} ({:?}) and {} ({:?})",
        a.root().display(),
        a.labels(),
        b.root().display(),
        b.labels()
    );
    Ok(())
}

/// The list file's entries as normalised relative paths (`/` separators, no `./`); a missing
/// file gives an empty set.
fn read_list(path: &Path) -> Result<BTreeSet<String>> {
    if !path.exists() {
        return Ok(BTreeSet::new());
    }
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read split list {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| normalise(l.trim()))
        .filter(|l| !l.is_empty())
        .collect())
}

fn normalise(p: &str) -> String {
    let p = p.replace('\\', "/");
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// `path` relative to `root` as a normalised `/`-separated string.
fn relative_key(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    normalise(&parts.join("/"))
}

fn is_audio(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| AUDIO_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The non-hidden entries of `dir`, sorted by path.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        if !is_hidden(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Every non-hidden file under `dir`, recursively (to [`MAX_DEPTH`]), sorted by path.
fn walk_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    ensure!(
        depth <= MAX_DEPTH,
        "folders nested more than {MAX_DEPTH} deep under {} (a symlink loop?)",
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
