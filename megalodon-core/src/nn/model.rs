//! The Megalodon language model (official class `Mega`): token embedding (optionally scaled by
//! sqrt(M)), the causal [`Backbone`], and the (optionally tied) output layer, plus token-level
//! streaming with TimestepNorm re-windowing.

use super::attention::Probe;
use super::backbone::Backbone;
use super::layers::{normal_vec, Seq};
pub use super::state::{ModelState, Rewindow};
use crate::config::{Dims, ModelConf};
use crate::device::MegaDevice;
use crate::params::{join, ParamVisitor, Params};
use crate::util::{c, Float};
use anyhow::{bail, ensure, Result};
use dfdx::prelude::*;
use rand::SeedableRng;

/// Logits `(B, T, vocab)`.
pub type Logits<E, D, T = NoneTape> = Tensor<(usize, usize, usize), E, D, T>;

/// Largest vocabulary accepted from a config (2^31 rows).
pub const MAX_VOCAB: usize = 1 << 31;

/// The Megalodon LM. Generics: `L` num_layers, `M` model_dim, `Z` z_dim, `V` value_dim,
/// `H` num_heads, `F` ffn_hidden_dim, `N` cema_ndim, `G` norm_num_groups. Vocabulary size and
/// chunk size are run-time values held in [`ModelConf`].
pub struct Megalodon<
    const L: usize,
    const M: usize,
    const Z: usize,
    const V: usize,
    const H: usize,
    const F: usize,
    const N: usize,
    const G: usize,
    E: Dtype,
    D: Device<E>,
> {
    /// `embed.weight (vocab, M)`.
    pub embed: Tensor<(usize, Const<M>), E, D>,
    /// `layers.{i}` and `output.final_norm`; holds the run-time config.
    pub backbone: Backbone<L, M, Z, V, H, F, N, G, E, D>,
    /// `output.output.weight (vocab, M)`; `None` when tied to the embedding (`share_emb`).
    pub output: Option<Tensor<(usize, Const<M>), E, D>>,
}

/// Number of parameters of a config (`docs/design.md` §7), without building the model.
pub fn param_count(conf: &ModelConf) -> usize {
    let (d, z, e, f, n) = (
        conf.model_dim,
        conf.z_dim,
        conf.value_dim,
        conf.ffn_hidden_dim,
        conf.cema_ndim,
    );
    let mega = (4 * n + 6) * d + 3 * d * e + d * z + d * d + 2 * e + 5 * z;
    let ffn = 2 * d
        + 2 * d * f
        + if conf.swiglu { d * f } else { 0 }
        + if conf.rescale_nffn { d } else { 0 };
    let head = if conf.share_emb {
        0
    } else {
        conf.vocab_size * d
    };
    conf.num_layers * (mega + ffn) + conf.vocab_size * d + head + 2 * d
}

impl<
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > Megalodon<L, M, Z, V, H, F, N, G, E, D>
{
    /// The compile-time widths of this model type.
    pub const DIMS: Dims = Backbone::<L, M, Z, V, H, F, N, G, E, D>::DIMS;

    /// A config with this type's widths, the official defaults elsewhere, and the given run-time
    /// chunk and vocabulary sizes.
    pub fn default_conf(chunk_size: usize, vocab_size: usize) -> ModelConf {
        ModelConf::from_dims(Self::DIMS, chunk_size, vocab_size)
    }

    /// Checks a config for this LM type: the widths, the run-time fields, and a vocabulary in
    /// `1..=MAX_VOCAB` whose tables fit in memory arithmetic (checked before anything is
    /// allocated).
    pub fn check_conf(conf: &ModelConf) -> Result<()> {
        conf.check_dims(&Self::DIMS)?;
        let v = conf.vocab_size;
        ensure!(
            (1..=MAX_VOCAB).contains(&v),
            "invalid config: vocab_size {v} must be in 1..={MAX_VOCAB} for a language model"
        );
        v.checked_mul(M)
            .and_then(|n| n.checked_mul(std::mem::size_of::<E>()))
            .ok_or_else(|| {
                anyhow::anyhow!("invalid config: vocab_size {v} x model_dim {M} overflows")
            })?;
        Ok(())
    }

    /// Builds a freshly initialised model (official init; deterministic in `seed`). The config
    /// must agree with the type's widths.
    pub fn new(dev: &D, conf: ModelConf, seed: u64) -> Result<Self> {
        Self::check_conf(&conf)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let std = 1.0 / (M as f64).sqrt();
        let vocab = conf.vocab_size;
        let share = conf.share_emb;
        let embed = dev.tensor_from_vec(
            normal_vec::<E>(&mut rng, vocab * M, std, Some(3.0 * std)),
            (vocab, Const::<M>),
        );
        let backbone = Backbone::init(dev, conf, &mut rng)?;
        let output = (!share).then(|| {
            dev.tensor_from_vec(
                normal_vec::<E>(&mut rng, vocab * M, std, Some(3.0 * std)),
                (vocab, Const::<M>),
            )
        });
        Ok(Self {
            embed,
            backbone,
            output,
        })
    }

    /// The run-time configuration.
    pub fn conf(&self) -> &ModelConf {
        &self.backbone.conf
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.embed.shape().0
    }

    /// A fresh streaming state for `batch` rows.
    pub fn new_state(&self, batch: usize) -> ModelState<M, H, N, G, E, D> {
        self.backbone.new_state(batch)
    }

    /// A fresh streaming state that re-windows the TimestepNorm statistics (see [`Rewindow`]).
    pub fn new_state_rewindowed(
        &self,
        batch: usize,
        rewindow: Rewindow,
    ) -> Result<ModelState<M, H, N, G, E, D>> {
        self.backbone.new_state_rewindowed(batch, rewindow)
    }

    fn token_index(
        &self,
        tokens: &[usize],
        b: usize,
        t: usize,
    ) -> Result<Tensor<(usize, usize), usize, D>> {
        ensure!(b > 0 && t > 0, "empty token batch ({b} x {t})");
        let n = b
            .checked_mul(t)
            .ok_or_else(|| anyhow::anyhow!("token batch {b} x {t} overflows"))?;
        ensure!(
            tokens.len() == n,
            "token buffer has {} ids, expected B*T = {b}*{t}",
            tokens.len()
        );
        let vocab = self.vocab_size();
        if let Some((i, &tok)) = tokens.iter().enumerate().find(|(_, &x)| x >= vocab) {
            bail!("token id {tok} at position {i} is outside the vocabulary (size {vocab})");
        }
        Ok(self.embed.device().tensor_from_vec(tokens.to_vec(), (b, t)))
    }

    /// The input embeddings `(B, T, M)` of `tokens` (row-major `B x T`), scaled by sqrt(M) when
    /// `scale_emb` is set: what the backbone sees.
    pub fn embed_tokens<T: Tape<E, D>>(
        &self,
        emb: Tensor<(usize, Const<M>), E, D, T>,
        tokens: &[usize],
        b: usize,
        t: usize,
    ) -> Result<Seq<M, E, D, T>> {
        let idx = self.token_index(tokens, b, t)?;
        let x: Seq<M, E, D, T> = emb.gather(idx);
        Ok(if self.conf().scale_emb {
            x * c::<E>((M as f64).sqrt())
        } else {
            x
        })
    }

    /// Logits `(B, T, vocab)` of hidden states `(B, T, M)` (the output layer or the tied
    /// embedding).
    pub fn head<T: Tape<E, D>>(&self, y: Seq<M, E, D, T>) -> Logits<E, D, T> {
        let w = match &self.output {
            Some(w) => w.retaped::<T>(),
            None => self.embed.retaped::<T>(),
        };
        y.matmul(w.permute::<_, Axes2<1, 0>>())
    }

    /// Embedding -> backbone -> head, from an embedding table that carries the tape (`T`).
    fn run<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        emb: Tensor<(usize, Const<M>), E, D, T>,
        tokens: &[usize],
        b: usize,
        t: usize,
        state: Option<&mut ModelState<M, H, N, G, E, D>>,
        probes: Option<&mut Vec<Probe>>,
    ) -> Result<Logits<E, D, T>> {
        let x = self.embed_tokens(emb, tokens, b, t)?;
        let y = self.backbone.run(x, state, probes)?;
        Ok(self.head(y))
    }

    /// The backbone's output `(B, T, M)` for `tokens` (fresh stream): the hidden states the
    /// output layer turns into logits.
    pub fn forward_hidden(&self, tokens: &[usize], b: usize, t: usize) -> Result<Seq<M, E, D>> {
        let x = self.embed_tokens(self.embed.clone(), tokens, b, t)?;
        self.backbone.forward_hidden(x, None)
    }

    /// Inference forward over `tokens` (row-major `B x T`): one call, fresh stream.
    pub fn forward(&self, tokens: &[usize], b: usize, t: usize) -> Result<Logits<E, D>> {
        self.run(self.embed.clone(), tokens, b, t, None, None)
    }

    /// Like [`forward`](Self::forward) but also returns the per-layer intermediates.
    pub fn forward_probed(
        &self,
        tokens: &[usize],
        b: usize,
        t: usize,
    ) -> Result<(Logits<E, D>, Vec<Probe>)> {
        let mut probes = Vec::new();
        let l = self.run(self.embed.clone(), tokens, b, t, None, Some(&mut probes))?;
        Ok((l, probes))
    }

    /// Streaming forward: continues the stream in `state` (any number of tokens per call,
    /// crossing chunk boundaries freely) and updates it. Feeding a sequence in any split gives
    /// the logits of one full call.
    pub fn forward_stream(
        &self,
        tokens: &[usize],
        b: usize,
        t: usize,
        state: &mut ModelState<M, H, N, G, E, D>,
    ) -> Result<Logits<E, D>> {
        let before = state.position;
        let logits = self.run(self.embed.clone(), tokens, b, t, Some(state), None)?;
        if let Some(rw) = state.rewindow.as_mut() {
            let c = self.conf().chunk_size;
            let keep = (rw.window - rw.every) * c;
            for (bi, h) in rw.history.iter_mut().enumerate() {
                h.extend(&tokens[bi * t..(bi + 1) * t]);
                while h.len() > keep {
                    h.pop_front();
                }
            }
            let step = rw.every * c;
            let after = state.position;
            if after >= rw.window * c && after / step > before / step {
                let window: Vec<usize> =
                    rw.history.iter().flat_map(|h| h.iter().copied()).collect();
                let mut fresh = self.new_state(b);
                self.run(self.embed.clone(), &window, b, keep, Some(&mut fresh), None)?;
                for (l, f) in state.layers.iter_mut().zip(fresh.layers) {
                    l.norm = f.norm;
                }
                state.final_norm = fresh.final_norm;
            }
        }
        Ok(logits)
    }

    /// Feeds `tokens` (row-major `B x T`) to the stream in `state` in calls of the lengths in
    /// `split` (which may sum to less than T) and returns the logits of all calls concatenated
    /// along time, row-major `(B, sum(split), V)`.
    pub fn forward_in_calls(
        &self,
        tokens: &[usize],
        b: usize,
        t: usize,
        split: &[usize],
        state: &mut ModelState<M, H, N, G, E, D>,
    ) -> Result<Vec<E>> {
        let total = split
            .iter()
            .try_fold(0usize, |a, &n| a.checked_add(n))
            .ok_or_else(|| anyhow::anyhow!("call lengths {split:?} overflow"))?;
        ensure!(
            total <= t && !split.contains(&0),
            "call lengths {split:?} must be positive and sum to at most T = {t}"
        );
        ensure!(
            b.checked_mul(t) == Some(tokens.len()),
            "token buffer has {} ids, expected B*T = {b}*{t}",
            tokens.len()
        );
        let v = self.vocab_size();
        let mut out = vec![c::<E>(0.0); b * total * v];
        let mut pos = 0;
        for &n in split {
            let chunk = crate::util::time_slice(tokens, b, t, 1, pos, pos + n);
            let l = self.forward_stream(&chunk, b, n, state)?.as_vec();
            for bi in 0..b {
                let dst = (bi * total + pos) * v;
                out[dst..dst + n * v].copy_from_slice(&l[bi * n * v..(bi + 1) * n * v]);
            }
            pos += n;
        }
        Ok(out)
    }

    /// Training forward: returns logits carrying a tape that accumulates into `grads` (make them
    /// with [`crate::params::alloc_grads`]).
    pub fn forward_train(
        &self,
        tokens: &[usize],
        b: usize,
        t: usize,
        grads: Gradients<E, D>,
    ) -> Result<Logits<E, D, OwnedTape<E, D>>> {
        self.run(self.embed.clone().traced(grads), tokens, b, t, None, None)
    }
}

/// Mean token cross entropy of `logits (B, T, V)` against `targets` (row-major `B x T`);
/// targets equal to `ignore` (the official -100, here any sentinel >= V) are skipped.
pub fn cross_entropy<E: Float, D: MegaDevice<E>, T: Tape<E, D>>(
    logits: Logits<E, D, T>,
    targets: &[Option<usize>],
) -> Result<Tensor<Rank0, E, D, T>> {
    let (b, t, v) = *logits.shape();
    ensure!(
        targets.len() == b * t,
        "targets have {} entries, logits have B*T = {}",
        targets.len(),
        b * t
    );
    let n = targets.iter().filter(|x| x.is_some()).count();
    ensure!(n > 0, "no target to score (all ignored)");
    let mut idx = Vec::with_capacity(b * t);
    let mut w = Vec::with_capacity(b * t);
    for (i, tg) in targets.iter().enumerate() {
        match tg {
            Some(k) => {
                ensure!(
                    *k < v,
                    "target {k} at position {i} is outside the vocabulary (size {v})"
                );
                idx.push(*k);
                w.push(c::<E>(-1.0 / n as f64));
            }
            None => {
                idx.push(0);
                w.push(c::<E>(0.0));
            }
        }
    }
    let dev = logits.device().clone();
    let idx: Tensor<(usize,), usize, D> = dev.tensor_from_vec(idx, (b * t,));
    let w: Tensor<(usize,), E, D> = dev.tensor_from_vec(w, (b * t,));
    let lp = logits.reshape_like(&(b * t, v)).log_softmax::<Axis<1>>();
    Ok((lp.select(idx) * w).sum())
}

impl<
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > Params<E, D> for Megalodon<L, M, Z, V, H, F, N, G, E, D>
{
    fn visit_params<Vis: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut Vis) -> Result<()> {
        v.visit(&join(prefix, "embed.weight"), &mut self.embed)?;
        self.backbone.visit_params(prefix, v)?;
        if let Some(w) = &mut self.output {
            v.visit(&join(prefix, "output.output.weight"), w)?;
        }
        Ok(())
    }
}
