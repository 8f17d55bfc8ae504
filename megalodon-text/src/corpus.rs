//! Plain-text corpora: one `.txt` file or a folder of them, and a deterministic train/validation
//! split.
//!
//! [`Corpus::load`] accepts a UTF-8 `.txt` file (any name) or a folder, which is searched
//! recursively for `*.txt` files (case-insensitive extension; entries whose name starts with `.`
//! are skipped). Documents are kept in sorted path order, so the same folder always gives the same
//! corpus. A leading UTF-8 byte-order mark is dropped; nothing else in the text is changed.
//!
//! Errors name the file: a missing path, a folder without `.txt` files, an empty corpus, bytes
//! that are not UTF-8 (with the byte offset and line of the first bad byte).
//!
//! [`Corpus::split`] holds out the last `val_fraction` of **each** document as validation text,
//! cut at a line boundary, so train and validation never share a line and every document
//! contributes to both.
//!
//! ```
//! use megalodon_text::corpus::Corpus;
//! let corpus = Corpus::from_texts([("a.txt", "one\ntwo\nthree\nfour\n")]);
//! let split = corpus.split(0.25).unwrap();
//! assert_eq!(split.train[0].text, "one\ntwo\nthree\n");
//! assert_eq!(split.val[0].text, "four\n");
//! ```

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// One document of a corpus: where it came from and its full text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The file the text was read from (or a label for in-memory text).
    pub path: PathBuf,
    /// The text, exactly as in the file (minus a leading byte-order mark).
    pub text: String,
}

/// A loaded corpus: non-empty documents in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corpus {
    /// The path given to [`Corpus::load`] (a file or a folder).
    pub source: PathBuf,
    /// The non-empty documents, sorted by path.
    pub docs: Vec<Document>,
    /// `.txt` files of a folder that were empty and therefore left out (a caller may warn).
    pub skipped_empty: Vec<PathBuf>,
}

/// The result of [`Corpus::split`]: for each document, its training head and validation tail.
///
/// `train[i]` and `val[i]` come from the same document `i`; either part may be empty when the
/// document is too short to split (see [`Corpus::split`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Training parts (the head of each document).
    pub train: Vec<Document>,
    /// Validation parts (the tail of each document).
    pub val: Vec<Document>,
}

impl Split {
    /// Total bytes of training text.
    pub fn train_bytes(&self) -> usize {
        self.train.iter().map(|d| d.text.len()).sum()
    }

    /// Total bytes of validation text.
    pub fn val_bytes(&self) -> usize {
        self.val.iter().map(|d| d.text.len()).sum()
    }
}

impl Corpus {
    /// Load a `.txt` file or a folder of `.txt` files (recursively, in sorted path order).
    pub fn load(path: impl AsRef<Path>) -> Result<Corpus> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path)
            .with_context(|| format!("corpus {}: no such file or folder", path.display()))?;
        let mut docs = Vec::new();
        let mut skipped_empty = Vec::new();
        if meta.is_dir() {
            let mut files = Vec::new();
            collect_txt(path, &mut files)?;
            files.sort();
            if files.is_empty() {
                bail!(
                    "corpus folder {} contains no .txt files (give a .txt file or a folder of them)",
                    path.display()
                );
            }
            let n = files.len();
            for f in files {
                let text = read_utf8(&f)?;
                if text.is_empty() {
                    skipped_empty.push(f);
                } else {
                    docs.push(Document { path: f, text });
                }
            }
            ensure!(
                !docs.is_empty(),
                "corpus folder {} is empty: all {n} .txt files in it are empty",
                path.display()
            );
        } else {
            let text = read_utf8(path)?;
            ensure!(!text.is_empty(), "corpus file {} is empty", path.display());
            docs.push(Document {
                path: path.to_path_buf(),
                text,
            });
        }
        Ok(Corpus {
            source: path.to_path_buf(),
            docs,
            skipped_empty,
        })
    }

    /// A corpus from in-memory `(label, text)` pairs, in the given order (empty texts are
    /// skipped and listed in `skipped_empty`). Useful for tests and for text that is not on disk.
    pub fn from_texts<P, S, I>(texts: I) -> Corpus
    where
        P: Into<PathBuf>,
        S: Into<String>,
        I: IntoIterator<Item = (P, S)>,
    {
        let mut docs = Vec::new();
        let mut skipped_empty = Vec::new();
        for (p, s) in texts {
            let (path, text) = (p.into(), s.into());
            if text.is_empty() {
                skipped_empty.push(path);
            } else {
                docs.push(Document { path, text });
            }
        }
        Corpus {
            source: PathBuf::from("<memory>"),
            docs,
            skipped_empty,
        }
    }

    /// Total bytes of text.
    pub fn total_bytes(&self) -> usize {
        self.docs.iter().map(|d| d.text.len()).sum()
    }

    /// The document texts, in order.
    pub fn texts(&self) -> Vec<&str> {
        self.docs.iter().map(|d| d.text.as_str()).collect()
    }

    /// Deterministic train/validation split: the last `val_fraction` of each document (by bytes)
    /// becomes validation text.
    ///
    /// The cut is moved forward to just after the next newline (or, if the tail has no newline,
    /// back to just after the previous one), so no line is shared; a document without any usable
    /// line boundary is cut at the nearest character boundary. `val_fraction` must lie in
    /// `[0, 1)`; with `0.0` every validation part is empty. For a positive fraction the split
    /// fails if the validation text or the training text comes out empty (a corpus too small
    /// for the fraction).
    pub fn split(&self, val_fraction: f64) -> Result<Split> {
        ensure!(
            (0.0..1.0).contains(&val_fraction),
            "--val-fraction must be in [0, 1), got {val_fraction}"
        );
        let mut train = Vec::with_capacity(self.docs.len());
        let mut val = Vec::with_capacity(self.docs.len());
        for d in &self.docs {
            let cut = if val_fraction == 0.0 {
                d.text.len()
            } else {
                cut_point(&d.text, val_fraction)
            };
            train.push(Document {
                path: d.path.clone(),
                text: d.text[..cut].to_string(),
            });
            val.push(Document {
                path: d.path.clone(),
                text: d.text[cut..].to_string(),
            });
        }
        let split = Split { train, val };
        if val_fraction > 0.0 {
            ensure!(
                split.val_bytes() > 0 && split.train_bytes() > 0,
                "corpus {} ({} bytes) is too small to hold out --val-fraction {val_fraction}: \
                 train {} bytes, validation {} bytes",
                self.source.display(),
                self.total_bytes(),
                split.train_bytes(),
                split.val_bytes()
            );
        }
        Ok(split)
    }
}

/// Byte index where the validation tail of `text` starts (see [`Corpus::split`]).
fn cut_point(text: &str, val_fraction: f64) -> usize {
    let len = text.len();
    // Truncation is intended: a byte position inside the text.
    let mut target = ((len as f64) * (1.0 - val_fraction)).floor() as usize;
    target = target.min(len);
    while !text.is_char_boundary(target) {
        target -= 1;
    }
    // Forward to just after the next newline, if that leaves a non-empty tail.
    if let Some(i) = text[target..].find('\n') {
        let cut = target + i + 1;
        if cut < len {
            return cut;
        }
    }
    // Otherwise back to just after the previous newline, if that leaves a non-empty head.
    if let Some(i) = text[..target].rfind('\n') {
        if i + 1 < len {
            return i + 1;
        }
    }
    target
}

/// Recursively collect `*.txt` files under `dir`, skipping hidden entries.
fn collect_txt(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("reading folder {}", dir.display()))?;
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = std::fs::metadata(&p).with_context(|| format!("reading {}", p.display()))?;
        if meta.is_dir() {
            collect_txt(&p, out)?;
        } else if p
            .extension()
            .is_some_and(|x| x.to_string_lossy().eq_ignore_ascii_case("txt"))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Read a file as UTF-8, naming the file and the first bad byte on failure.
fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let off = e.utf8_error().valid_up_to();
            let bytes = e.as_bytes();
            let line = 1 + bytes[..off].iter().filter(|&&b| b == b'\n').count();
            bail!(
                "{}: not valid UTF-8: byte 0x{:02x} at byte offset {off} (line {line}); \
                 convert the file to UTF-8 first",
                path.display(),
                bytes[off]
            );
        }
    };
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}
