//! Training and validation batches cut from a token stream.
//!
//! [`TrainWindows`] draws `batch` random windows of `seq_len + 1` tokens per step. The draw is a
//! pure function of `(seed, step)` (the core's SplitMix64, `megalodon_core::data`, so the batches
//! do not change with the version of any random-number crate), which is what a resumable training loop
//! needs: a resumed run sees exactly the batches of the uninterrupted one
//! (see `megalodon_core::fit`).
//!
//! [`ValWindows`] cuts the stream into consecutive, non-overlapping windows for evaluation:
//! every token after the first is scored exactly once.
//!
//! Both return [`megalodon_core::fit::Batch`]: row-major `tokens` (`batch * seq_len`) and
//! next-token `targets` of the same length (`targets[r * T + t] = Some(window[t + 1])`).
//!
//! ```
//! use megalodon_text::windows::TrainWindows;
//! let stream: Vec<usize> = (0..100).collect();
//! let w = TrainWindows::new(stream, 4, 8, 42)?;
//! let b = w.batch(7);
//! assert_eq!((b.batch, b.seq_len, b.tokens.len()), (4, 8, 32));
//! assert_eq!(b.targets[0], Some(b.tokens[0] + 1)); // the next token (here ids are positions)
//! assert_eq!(w.batch(7).tokens, b.tokens); // a function of (seed, step)
//! # anyhow::Ok(())
//! ```

use anyhow::{ensure, Context, Result};
use megalodon_core::data::SplitMix64;
use megalodon_core::fit::Batch;

/// Validate sizes and return `(batch * seq_len, seq_len + 1)`, with errors naming the flags.
fn check_sizes(stream_len: usize, batch: usize, seq_len: usize) -> Result<(usize, usize)> {
    ensure!(seq_len > 0, "--seq-len must be at least 1, got 0");
    ensure!(batch > 0, "--batch must be at least 1, got 0");
    let cells = batch
        .checked_mul(seq_len)
        .with_context(|| format!("--batch {batch} x --seq-len {seq_len} overflows"))?;
    let window = seq_len
        .checked_add(1)
        .with_context(|| format!("--seq-len {seq_len} is too large"))?;
    ensure!(
        stream_len >= window,
        "the token stream has {stream_len} tokens, fewer than one window of --seq-len {seq_len} \
         + 1 = {window}; use a smaller --seq-len or more text"
    );
    Ok((cells, window))
}

/// Random training windows over one token stream, a pure function of `(seed, step)`.
#[derive(Debug, Clone)]
pub struct TrainWindows {
    tokens: Vec<usize>,
    batch: usize,
    seq_len: usize,
    seed: u64,
}

impl TrainWindows {
    /// Windows of `seq_len + 1` tokens, `batch` per step. Errors (naming `--seq-len` /
    /// `--batch` and the sizes) when either is 0, when `batch * seq_len` overflows, or when the
    /// stream is shorter than one window.
    pub fn new(tokens: Vec<usize>, batch: usize, seq_len: usize, seed: u64) -> Result<Self> {
        check_sizes(tokens.len(), batch, seq_len)?;
        Ok(TrainWindows {
            tokens,
            batch,
            seq_len,
            seed,
        })
    }

    /// Start offsets of the windows of `step` (each in `0..=len - seq_len - 1`).
    pub fn starts(&self, step: u64) -> Vec<usize> {
        // `new` guarantees len >= seq_len + 1, so this count is >= 1.
        let n_starts = (self.tokens.len() - self.seq_len) as u64;
        let mut rng = SplitMix64::from_keys(&[self.seed, step]);
        (0..self.batch)
            .map(|_| rng.below(n_starts) as usize)
            .collect()
    }

    /// The batch of `step`: the same `(seed, step)` always gives the same batch.
    pub fn batch(&self, step: u64) -> Batch {
        let t = self.seq_len;
        let mut tokens = Vec::with_capacity(self.batch * t);
        let mut targets = Vec::with_capacity(self.batch * t);
        for s in self.starts(step) {
            let w = &self.tokens[s..s + t + 1];
            tokens.extend_from_slice(&w[..t]);
            targets.extend(w[1..].iter().map(|&x| Some(x)));
        }
        Batch {
            tokens,
            targets,
            batch: self.batch,
            seq_len: t,
        }
    }

    /// The token stream.
    pub fn tokens(&self) -> &[usize] {
        &self.tokens
    }

    /// Rows per batch.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Tokens per row.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

/// Consecutive non-overlapping evaluation windows over a token stream.
///
/// Row `k` holds tokens `k*T .. k*T + T` and predicts tokens `k*T + 1 ..= k*T + T`, so every token
/// except the first is a target exactly once. The last row may be partial: its missing positions
/// hold token 0 with target `None` (ignored), and as attention is causal they do not affect the
/// scored positions. Rows are grouped `batch` at a time; the last batch may have fewer rows
/// (its `Batch::batch` says how many).
#[derive(Debug, Clone)]
pub struct ValWindows {
    tokens: Vec<usize>,
    batch: usize,
    seq_len: usize,
}

impl ValWindows {
    /// Same size checks as [`TrainWindows::new`].
    pub fn new(tokens: Vec<usize>, batch: usize, seq_len: usize) -> Result<Self> {
        check_sizes(tokens.len(), batch, seq_len)?;
        Ok(ValWindows {
            tokens,
            batch,
            seq_len,
        })
    }

    /// Number of rows (windows), the last possibly partial.
    pub fn num_rows(&self) -> usize {
        (self.tokens.len() - 1).div_ceil(self.seq_len)
    }

    /// Number of batches.
    pub fn num_batches(&self) -> usize {
        self.num_rows().div_ceil(self.batch)
    }

    /// Number of scored positions over all batches: `tokens.len() - 1`.
    pub fn scored_tokens(&self) -> usize {
        self.tokens.len() - 1
    }

    /// Batch `i` (`0..num_batches()`), or `None` past the end.
    pub fn get(&self, i: usize) -> Option<Batch> {
        let rows = self.num_rows();
        let first = i.checked_mul(self.batch)?;
        if first >= rows {
            return None;
        }
        let last = first.saturating_add(self.batch).min(rows);
        let t = self.seq_len;
        let n = last - first;
        let mut tokens = vec![0usize; n * t];
        let mut targets = vec![None; n * t];
        for (r, row) in (first..last).enumerate() {
            let start = row * t;
            let end = (start + t + 1).min(self.tokens.len());
            let w = &self.tokens[start..end];
            tokens[r * t..r * t + w.len() - 1].copy_from_slice(&w[..w.len() - 1]);
            for (j, &x) in w[1..].iter().enumerate() {
                targets[r * t + j] = Some(x);
            }
        }
        Some(Batch {
            tokens,
            targets,
            batch: n,
            seq_len: t,
        })
    }

    /// All batches in order.
    pub fn iter(&self) -> impl Iterator<Item = Batch> + '_ {
        (0..self.num_batches()).filter_map(move |i| self.get(i))
    }

    /// The token stream.
    pub fn tokens(&self) -> &[usize] {
        &self.tokens
    }
}
