//! The whole Megalodon language model (spec section 1, class `Mega`): embedding, L layers,
//! final TimestepNorm and the (optionally tied) output layer, plus its streaming state.

use super::attention::{LayerState, Probe, Rope};
use super::block::MegaBlock;
use super::layers::{normal_vec, Seq};
use super::timestep_norm::{NormState, TimestepNorm};
use crate::config::{Dims, ModelConf};
use crate::device::MegaDevice;
use crate::params::{join, ParamVisitor, Params};
use crate::util::{c, Float};
use anyhow::{bail, ensure, Result};
use dfdx::prelude::*;
use rand::SeedableRng;

/// Logits `(B, T, vocab)`.
pub type Logits<E, D, T = NoneTape> = Tensor<(usize, usize, usize), E, D, T>;

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
    /// `layers.{i}`.
    pub layers: Vec<MegaBlock<M, Z, V, H, F, N, G, E, D>>,
    /// `output.final_norm`.
    pub final_norm: TimestepNorm<M, G, E, D>,
    /// `output.output.weight (vocab, M)`; `None` when tied to the embedding (`share_emb`).
    pub output: Option<Tensor<(usize, Const<M>), E, D>>,
    /// The run-time configuration (official `ModelConf`).
    pub conf: ModelConf,
}

/// Streaming state of the whole model: one [`LayerState`] per layer plus the final norm's.
/// Its size is constant in the number of tokens processed.
pub struct ModelState<
    const M: usize,
    const H: usize,
    const N: usize,
    const G: usize,
    E: Dtype,
    D: Device<E>,
> {
    pub layers: Vec<LayerState<M, H, N, G, E, D>>,
    pub final_norm: NormState<G, E, D>,
    /// Tokens processed per batch row so far.
    pub position: usize,
    /// TimestepNorm re-windowing (official long-context evaluation); `None` = cumulative.
    pub rewindow: Option<Rewindow>,
}

/// TimestepNorm re-windowing, as in the official evaluation loop (`megalodon/inference.py`,
/// `utils.truncate_cache`, spec section 10.3): once the stream holds at least `window` chunks,
/// every time it crosses a multiple of `every` chunks the model is re-run from an empty state on
/// the last `window - every` chunks of tokens and *only* the TimestepNorm states (every layer and
/// the final norm) are replaced by that run's; CEMA and KV states are kept. The normalisation
/// statistics then cover a sliding window of `window - every` to `window` chunks. Memory stays
/// constant: the last `window - every` chunks of token ids are kept.
#[derive(Debug, Clone)]
pub struct Rewindow {
    /// Official `TRUNCATE_CHUNKS` (8).
    pub window: usize,
    /// Official `MAX_CHUNKS_PER_BATCH` (2).
    pub every: usize,
    /// Last `(window - every) * chunk` token ids per batch row.
    history: Vec<std::collections::VecDeque<usize>>,
}

impl Rewindow {
    /// The official setting: window 8 chunks, refreshed every 2 chunks.
    pub fn official() -> Self {
        Self::new(8, 2)
    }

    /// A window of `window` chunks refreshed every `every` chunks (`0 < every < window`).
    pub fn new(window: usize, every: usize) -> Self {
        Self {
            window,
            every,
            history: Vec::new(),
        }
    }
}

impl<
        const M: usize,
        const H: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > ModelState<M, H, N, G, E, D>
{
    /// Bytes held by the state.
    pub fn bytes(&self) -> usize {
        let e = std::mem::size_of::<E>();
        self.layers.iter().map(|l| l.bytes()).sum::<usize>()
            + self.final_norm.count.len() * 8
            + 2 * self.final_norm.mean.shape().num_elements() * e
    }
}

/// Number of parameters of a config (spec section 8), without building the model.
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
    pub const DIMS: Dims = Dims {
        num_layers: L,
        model_dim: M,
        z_dim: Z,
        value_dim: V,
        num_heads: H,
        ffn_hidden_dim: F,
        cema_ndim: N,
        norm_num_groups: G,
    };

    /// A config with this type's widths, the official defaults elsewhere, and the given run-time
    /// chunk and vocabulary sizes.
    pub fn default_conf(chunk_size: usize, vocab_size: usize) -> ModelConf {
        ModelConf::from_dims(Self::DIMS, chunk_size, vocab_size)
    }

    /// Builds a freshly initialised model (official init; deterministic in `seed`). The config
    /// must agree with the type's widths.
    pub fn new(dev: &D, conf: ModelConf, seed: u64) -> Result<Self> {
        conf.check_dims(&Self::DIMS)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let std = 1.0 / (M as f64).sqrt();
        let vocab = conf.vocab_size;
        let embed = dev.tensor_from_vec(
            normal_vec::<E>(&mut rng, vocab * M, std, Some(3.0 * std)),
            (vocab, Const::<M>),
        );
        let layers = (0..L)
            .map(|i| MegaBlock::new(dev, &mut rng, &conf, i))
            .collect();
        let output = (!conf.share_emb).then(|| {
            dev.tensor_from_vec(
                normal_vec::<E>(&mut rng, vocab * M, std, Some(3.0 * std)),
                (vocab, Const::<M>),
            )
        });
        Ok(Self {
            embed,
            layers,
            final_norm: TimestepNorm::new(dev, conf.norm_eps),
            output,
            conf,
        })
    }

    /// Vocabulary size V.
    pub fn vocab_size(&self) -> usize {
        self.embed.shape().0
    }

    /// A fresh streaming state for `batch` rows.
    pub fn new_state(&self, batch: usize) -> ModelState<M, H, N, G, E, D> {
        let dev = self.embed.device();
        ModelState {
            layers: (0..L).map(|_| LayerState::new(dev, batch)).collect(),
            final_norm: NormState::empty(dev, batch),
            position: 0,
            rewindow: None,
        }
    }

    /// A fresh streaming state that re-windows the TimestepNorm statistics (see [`Rewindow`]).
    pub fn new_state_rewindowed(
        &self,
        batch: usize,
        rewindow: Rewindow,
    ) -> Result<ModelState<M, H, N, G, E, D>> {
        ensure!(
            rewindow.every > 0 && rewindow.every < rewindow.window,
            "re-windowing needs 0 < every ({}) < window ({})",
            rewindow.every,
            rewindow.window
        );
        let mut st = self.new_state(batch);
        st.rewindow = Some(Rewindow {
            history: vec![Default::default(); batch],
            ..rewindow
        });
        Ok(st)
    }

    fn token_index(
        &self,
        tokens: &[usize],
        b: usize,
        t: usize,
    ) -> Result<Tensor<(usize, usize), usize, D>> {
        ensure!(b > 0 && t > 0, "empty token batch ({b} x {t})");
        ensure!(
            tokens.len() == b * t,
            "token buffer has {} ids, expected B*T = {b}*{t}",
            tokens.len()
        );
        let vocab = self.vocab_size();
        if let Some((i, &tok)) = tokens.iter().enumerate().find(|(_, &x)| x >= vocab) {
            bail!("token id {tok} at position {i} is outside the vocabulary (size {vocab})");
        }
        Ok(self.embed.device().tensor_from_vec(tokens.to_vec(), (b, t)))
    }

    /// Core forward from an embedding table that carries the tape (`T`) to logits.
    fn run<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        emb: Tensor<(usize, Const<M>), E, D, T>,
        tokens: &[usize],
        b: usize,
        t: usize,
        mut state: Option<&mut ModelState<M, H, N, G, E, D>>,
        mut probes: Option<&mut Vec<Probe>>,
    ) -> Result<Logits<E, D, T>> {
        let idx = self.token_index(tokens, b, t)?;
        if let Some(s) = &state {
            ensure!(
                s.final_norm.count.len() == b,
                "streaming state has batch {}, input has batch {b}",
                s.final_norm.count.len()
            );
        }
        let mut x: Seq<M, E, D, T> = emb.gather(idx);
        if self.conf.scale_emb {
            x = x * c::<E>((M as f64).sqrt());
        }
        let chunk = self.conf.chunk_size;
        for (i, layer) in self.layers.iter().enumerate() {
            let ls = state.as_deref_mut().map(|s| &mut s.layers[i]);
            let probe = probes.as_deref_mut().map(|p| {
                p.push(Probe::default());
                p.last_mut().expect("just pushed")
            });
            x = layer.forward(x, chunk, ls, probe)?;
        }
        let norm0 = state.as_ref().map(|s| NormState {
            count: s.final_norm.count.clone(),
            mean: s.final_norm.mean.retaped::<T>(),
            var: s.final_norm.var.retaped::<T>(),
        });
        let (y, norm1) = self.final_norm.try_forward(x, norm0, None)?;
        if let Some(s) = state {
            s.final_norm = NormState {
                count: norm1.count,
                mean: norm1.mean.retaped(),
                var: norm1.var.retaped(),
            };
            s.position += t;
        }
        let w = match &self.output {
            Some(w) => w.retaped::<T>(),
            None => self.embed.retaped::<T>(),
        };
        Ok(y.matmul(w.permute::<_, Axes2<1, 0>>()))
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
            let c = self.conf.chunk_size;
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
        let total: usize = split.iter().sum();
        ensure!(
            total <= t && !split.contains(&0),
            "call lengths {split:?} must be positive and sum to at most T = {t}"
        );
        ensure!(
            tokens.len() == b * t,
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
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.visit_params(&join(prefix, &format!("layers.{i}")), v)?;
        }
        self.final_norm
            .visit_params(&join(prefix, "output.final_norm"), v)?;
        if let Some(w) = &mut self.output {
            v.visit(&join(prefix, "output.output.weight"), w)?;
        }
        Ok(())
    }
}

fn timenorm_buffers(
    prefix: &str,
    groups: usize,
    out: &mut Vec<(String, crate::checkpoint::Buffer)>,
) {
    use crate::checkpoint::Buffer;
    out.push((
        format!("{prefix}.prior_count"),
        Buffer::I64 {
            shape: vec![],
            data: vec![0],
        },
    ));
    out.push((
        format!("{prefix}.prior_mean"),
        Buffer::F32 {
            shape: vec![groups],
            data: vec![0.0; groups],
        },
    ));
    out.push((
        format!("{prefix}.prior_logv"),
        Buffer::F32 {
            shape: vec![groups],
            data: vec![0.0; groups],
        },
    ));
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
    > crate::checkpoint::HasBuffers for Megalodon<L, M, Z, V, H, F, N, G, E, D>
{
    /// The official buffers: `rope.freqs`, and the (zero, unused) TimestepNorm priors.
    fn buffers(&self) -> Vec<(String, crate::checkpoint::Buffer)> {
        let rope = Rope::new(Z / H, self.conf.rope_base());
        let mut out = vec![(
            "rope.freqs".to_string(),
            crate::checkpoint::Buffer::F32 {
                shape: vec![rope.freqs.len()],
                data: rope.freqs,
            },
        )];
        for i in 0..L {
            timenorm_buffers(&format!("layers.{i}.mega.timenorm"), G, &mut out);
        }
        timenorm_buffers("output.final_norm", G, &mut out);
        out
    }

    /// With `share_emb`, `output.output.weight` is written as a copy of `embed.weight`.
    fn aliases(&self) -> Vec<(String, String)> {
        if self.output.is_none() {
            vec![(
                "output.output.weight".to_string(),
                "embed.weight".to_string(),
            )]
        } else {
            Vec::new()
        }
    }
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
    /// Writes `config.json` and `model.safetensors` (official key names) into `dir`, atomically.
    pub fn save_run(&mut self, dir: &std::path::Path) -> Result<()> {
        let conf = self.conf.clone();
        crate::checkpoint::save_run(dir, &conf, self)
    }

    /// Loads a run directory written by [`save_run`](Self::save_run) or exported from the
    /// official model: the config is checked against this type's widths (error names the field),
    /// then every weight is loaded by its official key (errors name key and shapes).
    pub fn load_run(dev: &D, dir: &std::path::Path) -> Result<Self> {
        let conf = crate::checkpoint::load_config(dir)?;
        conf.check_dims(&Self::DIMS).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}",
                dir.join(crate::checkpoint::CONFIG_FILE).display()
            )
        })?;
        let mut model = Self::new(dev, conf, 0)?;
        crate::checkpoint::load_run_weights(dir, &mut model)?;
        Ok(model)
    }
}
