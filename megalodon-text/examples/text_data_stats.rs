//! Measure the data layer on a corpus: bytes, BPE training time, tokens, unigram entropy.
//!
//! ```sh
//! cargo run -p megalodon-text --example text_data_stats -- [DATA] [VOCAB_SIZE] [VAL_FRACTION]
//! ```
//! `DATA` defaults to the bundled Shakespeare corpus, `VOCAB_SIZE` to 4096, `VAL_FRACTION` to
//! 0.05. With `DATA` a folder such as `data/kjv` (see `scripts/kjv-export.sh`) it reports that
//! corpus instead.

use anyhow::{Context, Result};
use megalodon_text::{
    bits_per_byte, unigram_cross_entropy, unigram_entropy, Corpus, Tokenizer, BUNDLED_CORPUS,
};
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let data = args.first().map_or(BUNDLED_CORPUS, String::as_str);
    let vocab: usize = match args.get(1) {
        Some(v) => v
            .parse()
            .with_context(|| format!("--vocab-size: not a number: {v}"))?,
        None => 4096,
    };
    let val_fraction: f64 = match args.get(2) {
        Some(v) => v
            .parse()
            .with_context(|| format!("--val-fraction: not a number: {v}"))?,
        None => 0.05,
    };

    let t = Instant::now();
    let corpus = Corpus::load(data)?;
    let split = corpus.split(val_fraction)?;
    println!(
        "corpus {}: {} documents, {} bytes (train {}, validation {}), loaded in {:.2}s",
        corpus.source.display(),
        corpus.docs.len(),
        corpus.total_bytes(),
        split.train_bytes(),
        split.val_bytes(),
        t.elapsed().as_secs_f64()
    );
    for p in &corpus.skipped_empty {
        println!("  skipped empty file {}", p.display());
    }

    let train_texts: Vec<&str> = split.train.iter().map(|d| d.text.as_str()).collect();
    let val_texts: Vec<&str> = split.val.iter().map(|d| d.text.as_str()).collect();
    let t = Instant::now();
    let tok = Tokenizer::train_bpe(&train_texts, vocab)?;
    println!(
        "byte-level BPE: requested {vocab}, got {} ids, trained in {:.2}s on the training split",
        tok.vocab_size(),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let all = tok.encode_docs(&corpus.texts(), tok.end_of_text())?;
    let train = tok.encode_docs(&train_texts, tok.end_of_text())?;
    let val = tok.encode_docs(&val_texts, tok.end_of_text())?;
    println!(
        "tokens: whole corpus {} ({:.2} bytes/token), train {}, validation {} (encoded in {:.2}s)",
        all.len(),
        corpus.total_bytes() as f64 / all.len() as f64,
        train.len(),
        val.len(),
        t.elapsed().as_secs_f64()
    );
    let h = unigram_entropy(&train, tok.vocab_size())?;
    let ce = unigram_cross_entropy(&train, &val, tok.vocab_size())?;
    println!(
        "unigram entropy of train: {h:.3} nats/token; unigram validation loss: {ce:.3} nats/token \
         = {:.3} bits/byte",
        bits_per_byte(ce, val.len(), split.val_bytes())?
    );
    Ok(())
}
