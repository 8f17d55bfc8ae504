//! # megalodon-text
//!
//! Text side of megalodon-rs, built on [`megalodon_core`]: the data layer of the Megalodon
//! language model.
//!
//! - [`corpus`]: load a `.txt` file or a folder of them ([`Corpus::load`]) and split off
//!   validation text deterministically ([`Corpus::split`]).
//! - [`tokenizer`]: train a byte-level BPE ([`Tokenizer::train_bpe`]) or load any Hugging Face
//!   `tokenizer.json` ([`Tokenizer::from_file`]); vocabulary size read at run time.
//! - [`windows`]: training batches as a pure function of `(seed, step)` ([`TrainWindows`]) and
//!   sequential evaluation windows ([`ValWindows`]), as [`megalodon_core::fit::Batch`].
//! - [`stats`]: unigram entropy and bits per byte, reference points for the loss.
//!
//! The bundled corpus (eight Shakespeare plays, about 1 MB) is in `data/shakespeare/` at the
//! repository root; [`BUNDLED_CORPUS`] is its path.
//!
//! ```
//! use megalodon_text::{Corpus, Tokenizer, TrainWindows, ValWindows};
//! let corpus = Corpus::from_texts([
//!     ("a.txt", "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"),
//!     ("b.txt", "Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar.\n"),
//! ]);
//! let split = corpus.split(0.5)?;
//! let tok = Tokenizer::train_bpe(&corpus.texts(), 300)?;
//! let sep = tok.end_of_text();
//! let train = tok.encode_docs(&split.train.iter().map(|d| &d.text).collect::<Vec<_>>(), sep)?;
//! let val = tok.encode_docs(&split.val.iter().map(|d| &d.text).collect::<Vec<_>>(), sep)?;
//! let batches = TrainWindows::new(train, 2, 8, 0)?;
//! assert_eq!(batches.batch(0).tokens.len(), 16);
//! let eval = ValWindows::new(val, 2, 8)?;
//! assert_eq!(eval.iter().map(|b| b.targets.iter().flatten().count()).sum::<usize>(),
//!            eval.scored_tokens());
//! # anyhow::Ok(())
//! ```

pub mod baseline;
pub mod corpus;
pub mod lm;
pub mod preset;
pub mod sampling;
pub mod stats;
pub mod tokenizer;
pub mod train;
pub mod windows;

pub use corpus::{Corpus, Document, Split};
pub use lm::{GenToken, Generation, LanguageModel, Score};
pub use megalodon_core;
pub use megalodon_core::fit::Batch;
pub use preset::{Preset, TextCpu, TextModel};
pub use sampling::{Sampler, Sampling};
pub use stats::{bits_per_byte, unigram_cross_entropy, unigram_entropy};
pub use tokenizer::{check_vocab_size, Tokenizer, END_OF_TEXT};
pub use train::{train, train_on, DataInfo, TrainEvent, TrainOptions, TrainReport};
pub use windows::{TrainWindows, ValWindows};

/// Path of the bundled Shakespeare corpus (`data/shakespeare/` at the repository root), resolved
/// at compile time from this crate's location.
pub const BUNDLED_CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/shakespeare");
