//! # megalodon-text
//!
//! Text side of megalodon-rs: tokenizers (byte-level and Hugging Face `tokenizer.json`) and the
//! Megalodon language model head, built on [`megalodon_core`]. The LM itself
//! ([`megalodon_core::nn::model::Megalodon`]) already carries the embedding and output layer; this
//! crate will add tokenization, text datasets, generation and the LM training/fine-tuning driver
//! (see the project's issues).

pub use megalodon_core;
