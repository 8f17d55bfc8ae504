//! Synthetic tasks for smoke tests and the `train_copy` example.

use megalodon_core::fit::Batch;
use rand::{Rng, SeedableRng};

/// Long-range copy (recall across chunk boundaries).
///
/// Each sequence is `k` random symbols, filler up to a separator, then the same `k` symbols
/// again; only the recalled symbols are scored. With `seq_len` several chunks long the recall
/// must travel through the CEMA state and the TimestepNorm statistics, because attention never
/// crosses a chunk boundary. Token ids: 0 filler, 1 separator, `2..2+symbols` symbols.
#[derive(Debug, Clone, Copy)]
pub struct CopyTask {
    pub seq_len: usize,
    pub k: usize,
    pub symbols: usize,
    pub batch: usize,
    pub seed: u64,
}

impl CopyTask {
    /// Checks the settings; errors name the example's flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.symbols > 0, "--symbols must be at least 1");
        anyhow::ensure!(self.k > 0, "--k must be at least 1");
        anyhow::ensure!(self.batch > 0, "--batch must be at least 1");
        let min = self
            .k
            .checked_mul(2)
            .and_then(|x| x.checked_add(2))
            .ok_or_else(|| anyhow::anyhow!("--k {} is too large", self.k))?;
        anyhow::ensure!(
            self.seq_len >= min,
            "--seq-len {} is too short: recalling --k {} symbols needs at least 2k + 2 = {min}",
            self.seq_len,
            self.k
        );
        self.batch
            .checked_mul(self.seq_len)
            .ok_or_else(|| anyhow::anyhow!("--batch x --seq-len overflows"))?;
        Ok(())
    }

    /// Vocabulary size the task needs.
    pub fn vocab(&self) -> usize {
        self.symbols + 2
    }

    /// The batch for `step` (deterministic in seed and step); the settings must pass
    /// [`validate`](Self::validate).
    pub fn batch(&self, step: u64) -> anyhow::Result<Batch> {
        self.validate()?;
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(self.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (t, k) = (self.seq_len, self.k);
        let mut tokens = Vec::with_capacity(self.batch * t);
        let mut targets = Vec::with_capacity(self.batch * t);
        for _ in 0..self.batch {
            let sym: Vec<usize> = (0..k).map(|_| 2 + rng.gen_range(0..self.symbols)).collect();
            let sep = t - k - 1;
            let mut row = vec![0usize; t];
            row[..k].copy_from_slice(&sym);
            row[sep] = 1;
            row[sep + 1..].copy_from_slice(&sym[..k]);
            // next-token targets: position sep predicts sym[0], ..., sep+k-1 predicts sym[k-1]
            let mut tg = vec![None; t];
            for i in 0..k {
                tg[sep + i] = Some(sym[i]);
            }
            tokens.extend(row);
            targets.extend(tg);
        }
        Ok(Batch {
            tokens,
            targets,
            batch: self.batch,
            seq_len: t,
        })
    }

    /// A short description of the data, recorded in the run settings (`run.json`).
    pub fn identity(&self) -> String {
        format!(
            "copy-task seq_len={} k={} symbols={} batch={} seed={}",
            self.seq_len, self.k, self.symbols, self.batch, self.seed
        )
    }
}
