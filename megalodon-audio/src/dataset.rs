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
//!   stratified fraction ([`LabelFolder::split`]): each label keeps `round(n · val_split)`
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

use anyhow::{ensure, Context, Result};
use megalodon_core::data::label_folder::{FileKind, LabelFolder};

pub use megalodon_core::data::label_folder::Sample;

/// Folder of background-noise WAVs in the Speech Commands layout; never a label.
pub const NOISE_DIR: &str = "_background_noise_";
/// File extensions (case-insensitive) taken as audio.
pub const AUDIO_EXTENSIONS: &[&str] = &["wav"];
/// The Speech Commands validation list, in the root.
pub const VALIDATION_LIST: &str = "validation_list.txt";
/// The Speech Commands test list, in the root.
pub const TESTING_LIST: &str = "testing_list.txt";

/// The files of an audio folder: WAVs, one sub-folder per label, [`NOISE_DIR`] never a label.
#[derive(Debug, Clone, Copy)]
pub struct Wavs;

impl FileKind for Wavs {
    const WHAT: &'static str = "WAV";
    const FOLDER: &'static str = "label";
    const EXTENSIONS: &'static [&'static str] = AUDIO_EXTENSIONS;
    const RESERVED: &'static [&'static str] = &[NOISE_DIR];
}

/// A set of labelled WAV files with its label names (a whole tree or one split of it): the
/// core's [`LabelFolder`] of [`Wavs`].
pub type AudioFolder = LabelFolder<Wavs>;

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
            train.check_same_labels(&val)?;
            let test_dir = root.join("test");
            let test = if test_dir.is_dir() {
                let t = AudioFolder::scan(&test_dir)?;
                train.check_same_labels(&t)?;
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
        let (train, val) = all.split(val_split, seed)?;
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

/// The WAV files of `root/_background_noise_/`, sorted; empty when the folder is absent.
pub fn noise_files(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join(NOISE_DIR);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    AudioFolder::files_in(&dir)
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
