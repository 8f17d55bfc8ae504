//! Next-token sampling: temperature, top-k and top-p (nucleus), seeded.
//!
//! [`Sampler::candidates`] is the set a draw may come from: the `top_k` most likely tokens (ties
//! broken by the lower id), then the smallest prefix of those, by decreasing probability, whose
//! probability reaches `top_p`. A draw never returns a token outside it. Temperature 0 is greedy
//! decoding (the most likely token, lowest id on ties). The draw is a pure function of the seed
//! and the number of draws made, so the same seed gives the same text.
//!
//! ```
//! use megalodon_text::sampling::{Sampler, Sampling};
//! let logits = [0.0f32, 5.0, 4.0, -1.0];
//! let mut s = Sampler::new(&Sampling { temperature: 1.0, top_k: Some(2), top_p: 1.0, seed: 7 })?;
//! for _ in 0..100 {
//!     let id = s.sample(&logits)?;
//!     assert!(id == 1 || id == 2); // never outside the top 2
//! }
//! # anyhow::Ok(())
//! ```

use anyhow::{ensure, Result};

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature (`--temperature`): 0 = greedy, 1 = the model's distribution.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`--top-k`); `None` = all.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`
    /// (`--top-p`, in `(0, 1]`; 1 = all).
    pub top_p: f32,
    /// Seed of the draws (`--seed`).
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.8,
            top_k: Some(40),
            top_p: 0.95,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Checks the settings; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "--temperature must be a finite number >= 0, got {}",
            self.temperature
        );
        ensure!(
            self.top_k != Some(0),
            "--top-k must be at least 1 (leave it out to keep every token)"
        );
        ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "--top-p must be in (0, 1], got {}",
            self.top_p
        );
        Ok(())
    }
}

/// A seeded sampler (SplitMix64 draws).
#[derive(Debug, Clone)]
pub struct Sampler {
    conf: Sampling,
    state: u64,
}

impl Sampler {
    /// A sampler for validated settings.
    pub fn new(conf: &Sampling) -> Result<Self> {
        conf.validate()?;
        Ok(Sampler {
            conf: *conf,
            state: conf.seed ^ 0x5DEE_CE66_D1CE_4E5B,
        })
    }

    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random bits in [0, 1)
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The tokens a draw may return with their renormalised probabilities, most likely first.
    /// Errors on empty or non-finite logits.
    pub fn candidates(&self, logits: &[f32]) -> Result<Vec<(usize, f64)>> {
        ensure!(!logits.is_empty(), "sampling from an empty logit vector");
        if let Some((i, x)) = logits.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            anyhow::bail!("logit {i} is {x}: the model produced a non-finite value");
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        // descending logit, ascending id on ties
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.conf.temperature == 0.0 {
            return Ok(vec![(order[0], 1.0)]);
        }
        if let Some(k) = self.conf.top_k {
            order.truncate(k.min(order.len()));
        }
        let t = f64::from(self.conf.temperature);
        let max = f64::from(logits[order[0]]);
        let weights: Vec<f64> = order
            .iter()
            .map(|&i| ((f64::from(logits[i]) - max) / t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut out = Vec::with_capacity(order.len());
        let mut cum = 0.0;
        for (&i, w) in order.iter().zip(&weights) {
            let p = w / total;
            out.push((i, p));
            cum += p;
            if cum >= f64::from(self.conf.top_p) {
                break;
            }
        }
        let kept: f64 = out.iter().map(|(_, p)| p).sum();
        for (_, p) in &mut out {
            *p /= kept;
        }
        Ok(out)
    }

    /// Draws the next token from `logits` (one row of the vocabulary).
    pub fn sample(&mut self, logits: &[f32]) -> Result<usize> {
        let cands = self.candidates(logits)?;
        // one draw per call, also when greedy, so draws stay aligned with the seed
        let u = self.next_f64();
        let mut cum = 0.0;
        for &(i, p) in &cands {
            cum += p;
            if u < cum {
                return Ok(i);
            }
        }
        // rounding left `u` above the last cumulative sum: the last candidate
        Ok(cands[cands.len() - 1].0)
    }
}
