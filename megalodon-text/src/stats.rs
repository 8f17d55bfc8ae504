//! Reference numbers for judging a language model: unigram entropy and bits per byte.
//!
//! A model that has learned nothing beyond token frequencies reaches a loss equal to the unigram
//! entropy of the text; a validation loss well below it shows that context is being used.
//!
//! ```
//! use megalodon_text::stats::unigram_entropy;
//! // Four equally frequent tokens: ln 4 nats per token.
//! let h = unigram_entropy(&[0, 1, 2, 3, 3, 2, 1, 0], 4)?;
//! assert!((h - 4f64.ln()).abs() < 1e-12);
//! # anyhow::Ok(())
//! ```

use anyhow::{bail, ensure, Result};

fn counts(tokens: &[usize], vocab: usize, what: &str) -> Result<Vec<u64>> {
    ensure!(vocab > 0, "vocabulary size must be positive");
    let mut c = vec![0u64; vocab];
    for (pos, &t) in tokens.iter().enumerate() {
        match c.get_mut(t) {
            Some(n) => *n += 1,
            None => bail!(
                "{what}: token id {t} at position {pos} is out of range for a vocabulary of {vocab}"
            ),
        }
    }
    Ok(c)
}

/// Entropy of the empirical unigram distribution of `tokens`, in nats per token.
///
/// Errors on an empty stream or on an id `>= vocab`.
pub fn unigram_entropy(tokens: &[usize], vocab: usize) -> Result<f64> {
    ensure!(
        !tokens.is_empty(),
        "unigram entropy of an empty token stream"
    );
    let c = counts(tokens, vocab, "unigram entropy")?;
    let n = tokens.len() as f64;
    Ok(c.iter()
        .filter(|&&k| k > 0)
        .map(|&k| {
            let p = k as f64 / n;
            -p * p.ln()
        })
        .sum())
}

/// Cross-entropy (nats per token) of `eval` under the unigram distribution of `train` with
/// add-one (Laplace) smoothing over `vocab` ids: the validation loss of a model that predicts
/// only training-set token frequencies.
pub fn unigram_cross_entropy(train: &[usize], eval: &[usize], vocab: usize) -> Result<f64> {
    ensure!(
        !eval.is_empty(),
        "unigram cross-entropy of an empty evaluation stream"
    );
    let ct = counts(train, vocab, "unigram cross-entropy (train)")?;
    let ce = counts(eval, vocab, "unigram cross-entropy (eval)")?;
    let denom = train.len() as f64 + vocab as f64;
    let total: f64 = ct
        .iter()
        .zip(&ce)
        .filter(|(_, &e)| e > 0)
        .map(|(&t, &e)| -(e as f64) * ((t as f64 + 1.0) / denom).ln())
        .sum();
    Ok(total / eval.len() as f64)
}

/// Convert a mean loss in nats per token over `tokens` tokens that encode `bytes` bytes of text
/// into bits per byte.
pub fn bits_per_byte(nats_per_token: f64, tokens: usize, bytes: usize) -> Result<f64> {
    ensure!(bytes > 0, "bits per byte of empty text");
    Ok(nats_per_token * tokens as f64 / (bytes as f64 * std::f64::consts::LN_2))
}
