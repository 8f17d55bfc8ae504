//! Tokenizers: train a byte-level BPE on a corpus, or load any Hugging Face `tokenizer.json`.
//!
//! [`Tokenizer`] wraps [`tokenizers::Tokenizer`] with the few operations a language model needs,
//! `usize` token ids, and errors that name the file. The vocabulary size is read at run time
//! ([`Tokenizer::vocab_size`]), so a model sized from it needs no recompilation.
//!
//! A tokenizer from [`Tokenizer::train_bpe`] is byte-level (GPT-2 style: ByteLevel pre-tokenizer
//! without an added prefix space, ByteLevel decoder, all 256 byte symbols in the vocabulary, no
//! normalizer), so `decode(encode(s)) == s` holds exactly for every UTF-8 string, including text
//! with characters never seen in training. Its id 0 is the special document separator
//! [`END_OF_TEXT`].
//!
//! ```
//! use megalodon_text::Tokenizer;
//! let text = "To be, or not to be, that is the question:\n";
//! let tok = Tokenizer::train_bpe(&[text.repeat(20)], 300)?;
//! let ids = tok.encode("To be, or not to be?")?;
//! assert!(ids.iter().all(|&id| id < tok.vocab_size()));
//! assert_eq!(tok.decode(&ids)?, "To be, or not to be?");
//! // Characters that never occurred in training still round-trip (as byte tokens).
//! assert_eq!(tok.decode(&tok.encode("naïve 🐋")?)?, "naïve 🐋");
//! # anyhow::Ok(())
//! ```

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// The document separator that [`Tokenizer::train_bpe`] puts at id 0.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Smallest vocabulary a model may be built for.
pub const MIN_VOCAB: usize = 2;
/// Largest vocabulary accepted (`1 << 24`), a guard against corrupt sizes.
pub const MAX_VOCAB: usize = 1 << 24;
/// Smallest `vocab_size` for [`Tokenizer::train_bpe`]: 256 byte tokens plus [`END_OF_TEXT`].
pub const MIN_BPE_VOCAB: usize = 257;

/// Check a vocabulary size against [`MIN_VOCAB`]..=[`MAX_VOCAB`]; the error names
/// `--vocab-size`.
pub fn check_vocab_size(vocab_size: usize) -> Result<()> {
    ensure!(
        (MIN_VOCAB..=MAX_VOCAB).contains(&vocab_size),
        "--vocab-size {vocab_size} is out of range: it must be between {MIN_VOCAB} and {MAX_VOCAB}"
    );
    Ok(())
}

/// A text tokenizer with `usize` ids in `0..vocab_size()`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    source: Option<PathBuf>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Train a byte-level BPE with at most `vocab_size` entries (including the 256 byte tokens
    /// and [`END_OF_TEXT`]) on `texts` (typically one string per document).
    ///
    /// The result may be smaller than `vocab_size` when the text allows fewer merges; read
    /// [`Tokenizer::vocab_size`]. Errors name `--vocab-size` when it is below
    /// [`MIN_BPE_VOCAB`] or above [`MAX_VOCAB`], and fail on empty input.
    pub fn train_bpe<S: AsRef<str> + Sync>(texts: &[S], vocab_size: usize) -> Result<Tokenizer> {
        ensure!(
            vocab_size >= MIN_BPE_VOCAB,
            "--vocab-size {vocab_size} is too small for a byte-level BPE: it needs at least \
             {MIN_BPE_VOCAB} (256 byte tokens + {END_OF_TEXT})"
        );
        check_vocab_size(vocab_size)?;
        ensure!(
            texts.iter().any(|t| !t.as_ref().is_empty()),
            "cannot train a tokenizer on empty text"
        );
        let byte_level = ByteLevel::new(false, true, true);
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = TrainerWrapper::from(trainer);
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner
            .with_pre_tokenizer(Some(byte_level))
            .with_decoder(Some(byte_level));
        inner
            .train(&mut trainer, texts.iter().map(|t| t.as_ref()))
            .map_err(|e| anyhow!("training the BPE tokenizer: {e}"))?;
        Self::wrap(inner, None)
    }

    /// Load a Hugging Face `tokenizer.json` (for example Llama-2's, or one saved by
    /// [`Tokenizer::save`]). Truncation and padding stored in the file are switched off, so
    /// [`Tokenizer::encode`] always returns the whole text.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        ensure!(path.exists(), "tokenizer file {} not found", path.display());
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("reading tokenizer file {}", path.display()))?;
        let inner = tokenizers::Tokenizer::from_str(&json)
            .map_err(|e| anyhow!("{} is not a valid tokenizer.json: {e}", path.display()))?;
        Self::wrap(inner, Some(path.to_path_buf()))
            .with_context(|| format!("tokenizer file {}", path.display()))
    }

    /// Parse a `tokenizer.json` held in memory (see [`Tokenizer::from_file`]).
    pub fn from_json(json: &str) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_str(json)
            .map_err(|e| anyhow!("not a valid tokenizer.json: {e}"))?;
        Self::wrap(inner, None)
    }

    fn wrap(mut inner: tokenizers::Tokenizer, source: Option<PathBuf>) -> Result<Tokenizer> {
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("disabling truncation: {e}"))?;
        inner.with_padding(None);
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0);
        ensure!(
            (MIN_VOCAB..=MAX_VOCAB).contains(&vocab_size),
            "the tokenizer's vocabulary has {vocab_size} ids; {MIN_VOCAB} to {MAX_VOCAB} are supported"
        );
        Ok(Tokenizer {
            inner,
            vocab_size,
            source,
        })
    }

    /// Write the tokenizer as a `tokenizer.json` (pretty-printed). The file is written to a
    /// temporary name next to `path` and renamed into place, so an existing file is never left
    /// half-written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow!("serializing tokenizer for {}: {e}", path.display()))?;
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("tokenizer path {} has no file name", path.display()))?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    /// Token ids of `text`, without added special tokens (no BOS/EOS).
    pub fn encode(&self, text: &str) -> Result<Vec<usize>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("encoding with {}: {e}", self.describe()))?;
        Ok(enc.get_ids().iter().map(|&id| id as usize).collect())
    }

    /// Encode several documents (in parallel) into one stream, with `separator` (e.g.
    /// [`Tokenizer::end_of_text`]) between consecutive documents when given.
    pub fn encode_docs<S: AsRef<str> + Sync>(
        &self,
        docs: &[S],
        separator: Option<usize>,
    ) -> Result<Vec<usize>> {
        if let Some(sep) = separator {
            self.check_ids(&[sep])?;
        }
        let inputs: Vec<&str> = docs.iter().map(|d| d.as_ref()).collect();
        let encs = self
            .inner
            .encode_batch_fast(inputs, false)
            .map_err(|e| anyhow!("encoding with {}: {e}", self.describe()))?;
        let mut out = Vec::with_capacity(encs.iter().map(|e| e.len() + 1).sum());
        for (i, e) in encs.iter().enumerate() {
            if i > 0 {
                if let Some(sep) = separator {
                    out.push(sep);
                }
            }
            out.extend(e.get_ids().iter().map(|&id| id as usize));
        }
        Ok(out)
    }

    /// Text of `ids`; special tokens are kept. Ids `>= vocab_size()` are an error naming the id
    /// (ids inside the range that the vocabulary does not use decode to nothing).
    pub fn decode(&self, ids: &[usize]) -> Result<String> {
        self.check_ids(ids)?;
        // In range of u32: check_ids bounds every id by vocab_size <= MAX_VOCAB.
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.inner
            .decode(&ids, false)
            .map_err(|e| anyhow!("decoding with {}: {e}", self.describe()))
    }

    /// Fail with the first id that is not below [`Tokenizer::vocab_size`].
    pub fn check_ids(&self, ids: &[usize]) -> Result<()> {
        if let Some((pos, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id >= self.vocab_size)
        {
            bail!(
                "token id {id} (at position {pos}) is out of range: {} has {} ids",
                self.describe(),
                self.vocab_size
            );
        }
        Ok(())
    }

    /// One more than the largest token id (added/special tokens included): the size of a model's
    /// embedding and output layer.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Id of a token string (e.g. `"<s>"`), if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<usize> {
        self.inner.token_to_id(token).map(|id| id as usize)
    }

    /// Id of a document separator: [`END_OF_TEXT`] if present, else `</s>` (Llama-style).
    pub fn end_of_text(&self) -> Option<usize> {
        self.token_id(END_OF_TEXT).or_else(|| self.token_id("</s>"))
    }

    /// The file the tokenizer was loaded from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn describe(&self) -> String {
        match &self.source {
            Some(p) => format!("tokenizer {}", p.display()),
            None => "the tokenizer".to_string(),
        }
    }
}
