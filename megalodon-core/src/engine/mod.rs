//! Streaming inference engine (`docs/engine.md`): a trained language model's weights copied once
//! into plain row-major buffers, and prefill / token-by-token decoding over an explicit
//! constant-size state, with every scratch buffer allocated when the state is made.
//!
//! The dfdx model ([`crate::nn::model::Megalodon`]) stays the reference: the engine computes the
//! same function (`docs/design.md` §1–§9, per step instead of per call) and is tested against its
//! logits and the official incremental golden logits (`tests/engine.rs`).
//!
//! Layout: a block of `T` tokens is a row-major `(T, width)` matrix. The linear layers are
//! matrix products through `gemm` (`(T, in) x W^T`); TimestepNorm, CEMA and attention walk the
//! block one step at a time with the carried statistics, complex states and the current chunk's
//! rotated keys and values. Prefill feeds blocks of up to [`EngineState::block`] tokens, decode
//! blocks of one.

mod cpu;
pub mod cuda;
pub mod emulator;
mod team;

use crate::config::ModelConf;
use crate::nn::state::Rewindow;
use crate::params::{param_values, Params};
use anyhow::{bail, ensure, Context, Result};
use dfdx::prelude::*;
use std::collections::HashMap;

/// The widths and run-time settings the engine runs with (from the model's [`ModelConf`]).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineDims {
    pub layers: usize,
    pub m: usize,
    pub z: usize,
    pub v: usize,
    pub h: usize,
    pub f: usize,
    pub n: usize,
    pub g: usize,
    pub vocab: usize,
    pub chunk: usize,
    pub eps: f32,
}

/// A linear layer `y = x W^T + b`, `W` row-major `(out, in)` (PyTorch layout), in f32 or, after
/// [`Engine::quantize_int8`], as int8 with one f32 scale per output row (`w` is then empty).
#[derive(Debug, Clone)]
pub(crate) struct Lin {
    pub w: Vec<f32>,
    pub q8: Option<Q8>,
    pub b: Option<Vec<f32>>,
    pub out: usize,
    pub inp: usize,
}

/// Weight-only int8: `W[o, i] ~ scale[o] * q[o, i]`, symmetric, `scale[o] = max_i |W[o, i]| / 127`.
#[derive(Debug, Clone)]
pub(crate) struct Q8 {
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
}

impl Lin {
    fn new(w: Vec<f32>, b: Option<Vec<f32>>, out: usize, inp: usize) -> Self {
        Self {
            w,
            q8: None,
            b,
            out,
            inp,
        }
    }

    /// Replaces the f32 weights by int8 with per-row scales.
    fn quantize(&mut self) {
        if self.q8.is_some() || self.inp == 0 {
            return;
        }
        let mut q = Vec::with_capacity(self.w.len());
        let mut scale = Vec::with_capacity(self.out);
        for row in self.w.chunks_exact(self.inp) {
            let amax = row.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            let inv = 1.0 / s;
            q.extend(
                row.iter()
                    .map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8),
            );
            scale.push(s);
        }
        self.q8 = Some(Q8 { q, scale });
        self.w = Vec::new();
    }

    /// Row `o` of `W` (dequantised when int8) into `dst` (`inp` values).
    pub(crate) fn row_into(&self, o: usize, dst: &mut [f32]) {
        let r = o * self.inp..(o + 1) * self.inp;
        match &self.q8 {
            Some(q8) => {
                let s = q8.scale[o];
                for (d, &v) in dst.iter_mut().zip(&q8.q[r]) {
                    *d = v as f32 * s;
                }
            }
            None => dst.copy_from_slice(&self.w[r]),
        }
    }

    /// Bytes of weights and bias.
    fn bytes(&self) -> usize {
        let w = match &self.q8 {
            Some(q8) => q8.q.len() + 4 * q8.scale.len(),
            None => 4 * self.w.len(),
        };
        w + 4 * self.b.as_ref().map_or(0, |b| b.len())
    }
}

/// One layer's weights, with the `1 + w` norm weights and the CEMA coefficients precomputed.
#[derive(Debug, Clone)]
pub(crate) struct LayerWeights {
    /// TimestepNorm `1 + weight`, bias (M).
    pub tn_w: Vec<f32>,
    pub tn_b: Vec<f32>,
    /// CEMA `p`, `q = re + i im`, `eta = re + i im` (M x N, channel-major), `omega` (M).
    pub p: Vec<f32>,
    pub q_re: Vec<f32>,
    pub q_im: Vec<f32>,
    pub eta_re: Vec<f32>,
    pub eta_im: Vec<f32>,
    pub omega: Vec<f32>,
    /// RMSNorm `1 + weight` (M).
    pub rms_w: Vec<f32>,
    pub wz: Lin,
    pub wv: Lin,
    pub wr: Lin,
    pub wh1: Lin,
    pub wh2: Lin,
    /// `(1 + gamma_i) / sqrt(dz)` and `beta_i` for queries (0) and keys (1), Z each.
    pub q_scale: Vec<f32>,
    pub q_off: Vec<f32>,
    pub k_scale: Vec<f32>,
    pub k_off: Vec<f32>,
    /// FFN LayerNorm `1 + weight`, bias (M).
    pub ln_w: Vec<f32>,
    pub ln_b: Vec<f32>,
    pub fc1: Lin,
    pub fc2: Lin,
    pub fc3: Option<Lin>,
    pub alpha: Option<Vec<f32>>,
}

/// A language model ready for streaming inference on the CPU.
#[derive(Debug, Clone)]
pub struct Engine {
    pub dims: EngineDims,
    /// The embedding `(vocab, M)`, also the output projection when tied.
    pub(crate) embed: Lin,
    /// The output projection `(vocab, M)`; `None` when tied to the embedding.
    pub(crate) head: Option<Lin>,
    pub(crate) emb_scale: f32,
    pub(crate) layers: Vec<LayerWeights>,
    pub(crate) final_w: Vec<f32>,
    pub(crate) final_b: Vec<f32>,
    /// RoPE frequencies (dz / 2), as the dfdx model's `rope.freqs`.
    pub(crate) freqs: Vec<f32>,
    /// A fingerprint of the weights' shapes and config: a state remembers the engine it was made
    /// for and refuses another.
    pub(crate) id: u64,
}

/// TimestepNorm statistics of one row: step count and per-group mean and variance.
#[derive(Debug, Clone)]
pub(crate) struct NormStats {
    pub count: usize,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

impl NormStats {
    fn new(g: usize) -> Self {
        Self {
            count: 0,
            mean: vec![0.0; g],
            var: vec![1.0; g],
        }
    }
    fn reset(&mut self) {
        self.count = 0;
        self.mean.fill(0.0);
        self.var.fill(1.0);
    }
}

/// One layer's carried state.
#[derive(Debug, Clone)]
pub(crate) struct LayerCarry {
    pub norm: NormStats,
    /// Complex CEMA state (M x N).
    pub h_re: Vec<f32>,
    pub h_im: Vec<f32>,
    /// Rotated keys `(C, Z)` and values `(C, V)` of the current chunk; `kv_len` are filled.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Scratch for one block of up to `block` tokens (allocated once).
#[derive(Debug, Clone)]
pub(crate) struct Scratch {
    pub x: Vec<f32>,
    pub xn: Vec<f32>,
    pub mx: Vec<f32>,
    pub zq: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub vv: Vec<f32>,
    pub r: Vec<f32>,
    pub att: Vec<f32>,
    pub y: Vec<f32>,
    pub yn: Vec<f32>,
    pub u: Vec<f32>,
    pub u3: Vec<f32>,
    pub scores: Vec<f32>,
    pub logits: Vec<f32>,
    /// Rows of an int8 matrix dequantised for a multi-row product (empty for f32 engines).
    pub deq: Vec<f32>,
}

/// The streaming state of one sequence: per-layer TimestepNorm statistics, complex CEMA states
/// and the current chunk's keys and values, the final norm's statistics, the position, and the
/// scratch buffers. Its size is fixed when it is made; nothing grows with the tokens processed.
#[derive(Debug, Clone)]
pub struct EngineState {
    pub(crate) engine_id: u64,
    pub(crate) layers: Vec<LayerCarry>,
    pub(crate) final_norm: NormStats,
    /// Tokens processed so far.
    pub position: u64,
    /// Largest block a single internal step processes (prefill splits longer inputs).
    pub block: usize,
    pub(crate) scratch: Scratch,
    /// Re-windowed TimestepNorm (the official long-context evaluation): the settings, the last
    /// `(window - every) C` tokens (a ring buffer) and a second state to recompute them.
    pub(crate) rewindow: Option<RewindowCarry<EngineState>>,
}

/// The re-windowed TimestepNorm's bookkeeping (any backend's state `S`): the settings, the last
/// `(window - every) C` token ids (a ring buffer) and a second state that re-runs them.
#[derive(Debug, Clone)]
pub(crate) struct RewindowCarry<S> {
    pub settings: Rewindow,
    pub history: std::collections::VecDeque<usize>,
    pub fresh: Box<S>,
}

impl<S> RewindowCarry<S> {
    /// Checks the settings and makes the (empty) ring buffer for a model of chunk size `chunk`.
    pub(crate) fn new(settings: Rewindow, chunk: usize, fresh: S) -> Result<Self> {
        ensure!(
            settings.every >= 1 && settings.window > settings.every,
            "engine: re-windowing needs window > every >= 1, got window {} every {}",
            settings.window,
            settings.every
        );
        let keep = (settings.window - settings.every)
            .checked_mul(chunk)
            .context("engine: re-window length overflows")?;
        Ok(Self {
            settings,
            history: std::collections::VecDeque::with_capacity(keep),
            fresh: Box::new(fresh),
        })
    }

    /// Records the tokens of a block that moved the stream from position `before` to `after`;
    /// true when the TimestepNorm statistics are due to be recomputed over `history`.
    pub(crate) fn record(
        &mut self,
        tokens: &[usize],
        before: u64,
        after: u64,
        chunk: usize,
    ) -> bool {
        let c = chunk as u64;
        let (window, every) = (self.settings.window as u64, self.settings.every as u64);
        let keep = ((window - every) * c) as usize;
        for &t in tokens {
            if self.history.len() == keep {
                self.history.pop_front();
            }
            self.history.push_back(t);
        }
        let step = every * c;
        after >= window * c && after / step > before / step
    }
}

/// Checks a feed call (state of this engine, ids in the vocabulary, not empty) and runs
/// `step(piece, offset, want)` over pieces of at most `block` tokens; with `chunk`, pieces also
/// never cross a chunk boundary of the stream at `position`. The last piece gets `Want::Last`.
pub(crate) fn drive(
    (engine_id, state_id): (u64, u64),
    tokens: &[usize],
    vocab: usize,
    (block, position, chunk): (usize, u64, Option<usize>),
    want: Want,
    mut step: impl FnMut(&[usize], usize, Want) -> Result<()>,
) -> Result<()> {
    ensure!(
        !tokens.is_empty(),
        "engine: no tokens to feed (empty prompt?)"
    );
    ensure!(
        state_id == engine_id,
        "engine: this state belongs to another model (different weights or configuration)"
    );
    if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, &t)| t >= vocab) {
        bail!("engine: token id {t} at position {i} is outside the vocabulary (size {vocab})");
    }
    let mut off = 0;
    while off < tokens.len() {
        let mut len = block.min(tokens.len() - off);
        if let Some(c) = chunk {
            let pos = ((position + off as u64) % c as u64) as usize;
            len = len.min(c - pos);
        }
        let end = off + len;
        let w = match want {
            Want::All => Want::All,
            Want::Last if end == tokens.len() => Want::Last,
            _ => Want::None,
        };
        step(&tokens[off..end], off, w)?;
        off = end;
    }
    Ok(())
}

/// Which logits a call computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Every token's logits (perplexity).
    All,
    /// Only the last token's (prefill before generation).
    Last,
    /// None (advance the state only).
    None,
}

/// What every engine backend offers: the CPU [`Engine`] and the CUDA [`cuda::CudaEngine`] run
/// the same tests through this trait (`tests/engine.rs`), and callers can pick one at run time.
pub trait StreamBackend {
    /// The per-sequence streaming state.
    type State;
    /// The model's widths.
    fn dims(&self) -> &EngineDims;
    /// A fresh state (cumulative TimestepNorm) processing at most `block` tokens at a time.
    fn new_state(&self, block: usize) -> Result<Self::State>;
    /// A fresh state with the official re-windowed TimestepNorm evaluation.
    fn new_state_rewindowed(&self, block: usize, rewindow: Rewindow) -> Result<Self::State>;
    /// Feeds `tokens` through `state`, calling `on_logits(i, row)` for the rows `want` asks for.
    fn feed(
        &self,
        state: &mut Self::State,
        tokens: &[usize],
        want: Want,
        on_logits: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<()>;
    /// Tokens processed by `state` so far.
    fn position(state: &Self::State) -> u64;
    /// Bytes `state` holds (host and device): constant for its life.
    fn state_bytes(state: &Self::State) -> usize;
}

impl StreamBackend for Engine {
    type State = EngineState;
    fn dims(&self) -> &EngineDims {
        &self.dims
    }
    fn new_state(&self, block: usize) -> Result<EngineState> {
        Engine::new_state(self, block)
    }
    fn new_state_rewindowed(&self, block: usize, rewindow: Rewindow) -> Result<EngineState> {
        Engine::new_state_rewindowed(self, block, rewindow)
    }
    fn feed(
        &self,
        state: &mut EngineState,
        tokens: &[usize],
        want: Want,
        on_logits: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<()> {
        Engine::feed(self, state, tokens, want, on_logits)
    }
    fn position(state: &EngineState) -> u64 {
        state.position
    }
    fn state_bytes(state: &EngineState) -> usize {
        Engine::state_bytes(state)
    }
}

fn fingerprint(d: &EngineDims, values: &[(String, Vec<f32>)]) -> u64 {
    let mut h = crc32fast::Hasher::new();
    h.update(format!("{d:?}").as_bytes());
    for (n, v) in values {
        h.update(n.as_bytes());
        h.update(&(v.len() as u64).to_le_bytes());
        // a sample of the values: states of two engines with the same shapes but other weights
        // are refused too
        for x in v.iter().step_by((v.len() / 16).max(1)) {
            h.update(&x.to_le_bytes());
        }
    }
    u64::from(h.finalize())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl Engine {
    /// Copies the weights of a language model (any [`Params`] with the official key names, e.g. a
    /// [`crate::nn::model::Megalodon`] on any device) whose config is `conf`.
    pub fn from_model<D: Device<f32>, P: Params<f32, D>>(
        model: &mut P,
        conf: &ModelConf,
    ) -> Result<Self> {
        let values = param_values(model).context("reading the model's weights")?;
        Self::from_values(conf, values)
    }

    /// Builds the engine from `(official key, values)` pairs.
    pub fn from_values(conf: &ModelConf, values: Vec<(String, Vec<f32>)>) -> Result<Self> {
        conf.validate()?;
        let d = EngineDims {
            layers: conf.num_layers,
            m: conf.model_dim,
            z: conf.z_dim,
            v: conf.value_dim,
            h: conf.num_heads,
            f: conf.ffn_hidden_dim,
            n: conf.cema_ndim,
            g: conf.norm_num_groups,
            vocab: conf.vocab_size,
            chunk: conf.chunk_size,
            eps: conf.norm_eps as f32,
        };
        ensure!(
            d.vocab > 0
                && d.chunk > 0
                && d.h > 0
                && d.z.is_multiple_of(d.h)
                && d.v.is_multiple_of(d.h),
            "engine: vocab_size, chunk_size and num_heads must be positive and num_heads must \
             divide z_dim and value_dim ({d:?})"
        );
        ensure!(
            (d.z / d.h).is_multiple_of(2) && d.g > 0 && d.m.is_multiple_of(d.g),
            "engine: z_dim / num_heads must be even and norm_num_groups must divide model_dim \
             ({d:?})"
        );
        let id = fingerprint(&d, &values);
        let mut map: HashMap<String, Vec<f32>> = values.into_iter().collect();
        let mut take = |key: &str, len: usize| -> Result<Vec<f32>> {
            let v = map
                .remove(key)
                .with_context(|| format!("engine: the model has no weight `{key}`"))?;
            ensure!(
                v.len() == len,
                "engine: weight `{key}` has {} values, expected {len}",
                v.len()
            );
            Ok(v)
        };
        let plus1 = |v: Vec<f32>| v.into_iter().map(|x| 1.0 + x).collect::<Vec<f32>>();
        let (m, z, vd, f, n) = (d.m, d.z, d.v, d.f, d.n);
        let embed = Lin::new(take("embed.weight", d.vocab * m)?, None, d.vocab, m);
        let head = if conf.share_emb {
            None
        } else {
            Some(Lin::new(
                take("output.output.weight", d.vocab * m)?,
                None,
                d.vocab,
                m,
            ))
        };
        let dz = z / d.h;
        let mut layers = Vec::with_capacity(d.layers);
        for i in 0..d.layers {
            let p = |s: &str| format!("layers.{i}.{s}");
            let mut lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Lin> {
                let w = take(&p(&format!("{name}.weight")), out * inp)?;
                let b = if bias {
                    Some(take(&p(&format!("{name}.bias")), out)?)
                } else {
                    None
                };
                Ok(Lin::new(w, b, out, inp))
            };
            let wz = lin("mega.wz", z, m, true)?;
            let wv = lin("mega.wv", vd, m, true)?;
            let wr = lin("mega.wr", vd, m, true)?;
            let wh1 = lin("mega.wh1", m, m, true)?;
            let wh2 = lin("mega.wh2", m, vd, false)?;
            let fc1 = lin("nffn.fc1", f, m, false)?;
            let fc2 = lin("nffn.fc2", m, f, false)?;
            let fc3 = if conf.swiglu {
                Some(lin("nffn.fc3", f, m, false)?)
            } else {
                None
            };
            // CEMA coefficients (docs/design.md §4), in f64 then stored as f32
            let alpha = take(&p("mega.cema.alpha"), m * n)?;
            let delta = take(&p("mega.cema.delta"), m * n)?;
            let theta = take(&p("mega.cema.theta"), m)?;
            let gamma = take(&p("mega.cema.gamma"), m * n * 2)?;
            let omega = take(&p("mega.cema.omega"), m)?;
            let (mut pp, mut qr, mut qi, mut er, mut ei) = (
                vec![0f32; m * n],
                vec![0f32; m * n],
                vec![0f32; m * n],
                vec![0f32; m * n],
                vec![0f32; m * n],
            );
            let s = 1.0 / (n as f64).sqrt();
            for (c, &th) in theta.iter().enumerate() {
                let phi = sigmoid(th as f64) * 2.0 * std::f64::consts::PI / n as f64;
                for k in 0..n {
                    let j = c * n + k;
                    let a = sigmoid(alpha[j] as f64);
                    let r = 1.0 - a * sigmoid(delta[j] as f64);
                    let ang = (k + 1) as f64 * phi;
                    pp[j] = a as f32;
                    qr[j] = (r * ang.cos()) as f32;
                    qi[j] = (r * ang.sin()) as f32;
                    er[j] = (gamma[2 * j] as f64 * s) as f32;
                    ei[j] = (gamma[2 * j + 1] as f64 * s) as f32;
                }
            }
            let qk = take(&p("mega.gamma"), 2 * z)?;
            let beta = take(&p("mega.beta"), 2 * z)?;
            let sc = 1.0 / (dz as f64).sqrt();
            let scale = |g: &[f32]| g.iter().map(|&x| ((1.0 + x as f64) * sc) as f32).collect();
            layers.push(LayerWeights {
                tn_w: plus1(take(&p("mega.timenorm.weight"), m)?),
                tn_b: take(&p("mega.timenorm.bias"), m)?,
                p: pp,
                q_re: qr,
                q_im: qi,
                eta_re: er,
                eta_im: ei,
                omega,
                rms_w: plus1(take(&p("mega.rmsnorm.weight"), m)?),
                wz,
                wv,
                wr,
                wh1,
                wh2,
                q_scale: scale(&qk[..z]),
                q_off: beta[..z].to_vec(),
                k_scale: scale(&qk[z..]),
                k_off: beta[z..].to_vec(),
                ln_w: plus1(take(&p("nffn.norm.weight"), m)?),
                ln_b: take(&p("nffn.norm.bias"), m)?,
                fc1,
                fc2,
                fc3,
                alpha: if conf.rescale_nffn {
                    Some(take(&p("nffn.alpha"), m)?)
                } else {
                    None
                },
            });
        }
        let final_w = plus1(take("output.final_norm.weight", m)?);
        let final_b = take("output.final_norm.bias", m)?;
        let freqs = crate::nn::rope::Rope::new(dz, conf.rope_base()).freqs;
        if let Some(k) = map.keys().next() {
            bail!("engine: unexpected weight `{k}` (a model of another configuration?)");
        }
        Ok(Self {
            emb_scale: if conf.scale_emb {
                (m as f64).sqrt() as f32
            } else {
                1.0
            },
            dims: d,
            embed,
            head,
            layers,
            final_w,
            final_b,
            freqs,
            id,
        })
    }

    /// Every linear layer (the embedding and head included).
    fn lins_mut(&mut self) -> impl Iterator<Item = &mut Lin> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    Some(&mut l.wz),
                    Some(&mut l.wv),
                    Some(&mut l.wr),
                    Some(&mut l.wh1),
                    Some(&mut l.wh2),
                    Some(&mut l.fc1),
                    Some(&mut l.fc2),
                    l.fc3.as_mut(),
                ]
            })
            .chain([Some(&mut self.embed), self.head.as_mut()])
            .flatten()
    }

    /// Bytes of the matrices and biases held (the small per-channel vectors aside).
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &Lin| l.bytes();
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                lin(&l.wz)
                    + lin(&l.wv)
                    + lin(&l.wr)
                    + lin(&l.wh1)
                    + lin(&l.wh2)
                    + lin(&l.fc1)
                    + lin(&l.fc2)
                    + l.fc3.as_ref().map_or(0, lin)
            })
            .sum();
        per_layer + lin(&self.embed) + self.head.as_ref().map_or(0, lin)
    }

    /// Weight-only int8 quantisation (`docs/engine.md`): every matrix (the linear layers, the
    /// embedding and the output projection) becomes int8 with one f32 scale per output row;
    /// activations, norms, CEMA and attention stay f32. About 4x less weight memory and traffic
    /// for a small perplexity cost (measured in `megalodon-text/README.md`). States made before
    /// quantising belong to the f32 engine and are refused.
    pub fn quantize_int8(&mut self) {
        if self.is_int8() {
            return;
        }
        self.lins_mut().for_each(Lin::quantize);
        self.id = self.id.rotate_left(17) ^ 0x1_0008;
    }

    /// Whether the matrices are int8 ([`Engine::quantize_int8`]).
    pub fn is_int8(&self) -> bool {
        self.embed.q8.is_some()
    }

    /// A fresh state for one sequence whose calls process at most `block` tokens at a time
    /// internally (longer inputs are split; 1 is enough for decoding, larger blocks make prefill
    /// faster). Cumulative TimestepNorm statistics.
    pub fn new_state(&self, block: usize) -> Result<EngineState> {
        ensure!(block >= 1, "engine: block must be at least 1");
        let d = &self.dims;
        let rows = |w: usize| -> Result<Vec<f32>> {
            let n = block
                .checked_mul(w)
                .with_context(|| format!("engine: block {block} x {w} overflows"))?;
            Ok(vec![0.0; n])
        };
        let fw = d.f.max(1);
        let scratch = Scratch {
            x: rows(d.m)?,
            xn: rows(d.m)?,
            mx: rows(d.m)?,
            zq: rows(d.z)?,
            q: rows(d.z)?,
            k: rows(d.z)?,
            vv: rows(d.v)?,
            r: rows(d.v)?,
            att: rows(d.v)?,
            y: rows(d.m)?,
            yn: rows(d.m)?,
            u: rows(fw)?,
            u3: rows(if self.layers.iter().any(|l| l.fc3.is_some()) {
                fw
            } else {
                0
            })?,
            scores: vec![0.0; d.chunk],
            logits: rows(d.vocab)?,
            deq: if self.is_int8() && block > 1 {
                vec![0.0; cpu::DEQ_ROWS * d.m.max(d.v).max(d.f)]
            } else {
                Vec::new()
            },
        };
        let layers = (0..d.layers)
            .map(|_| LayerCarry {
                norm: NormStats::new(d.g),
                h_re: vec![0.0; d.m * d.n],
                h_im: vec![0.0; d.m * d.n],
                k: vec![0.0; d.chunk * d.z],
                v: vec![0.0; d.chunk * d.v],
            })
            .collect();
        Ok(EngineState {
            engine_id: self.id,
            layers,
            final_norm: NormStats::new(d.g),
            position: 0,
            block,
            scratch,
            rewindow: None,
        })
    }

    /// A fresh state with the official re-windowed TimestepNorm evaluation (`docs/design.md` §9):
    /// every `every` chunks once `window` chunks have been seen, the TimestepNorm statistics are
    /// replaced by those of a fresh run over the last `window - every` chunks of tokens.
    pub fn new_state_rewindowed(&self, block: usize, rewindow: Rewindow) -> Result<EngineState> {
        let fresh = self.new_state(block)?;
        let mut s = self.new_state(block)?;
        s.rewindow = Some(RewindowCarry::new(rewindow, self.dims.chunk, fresh)?);
        Ok(s)
    }

    /// Bytes of a state (carried values and scratch): constant for the life of the state.
    pub fn state_bytes(state: &EngineState) -> usize {
        let s = &state.scratch;
        let scratch = [
            &s.x, &s.xn, &s.mx, &s.zq, &s.q, &s.k, &s.vv, &s.r, &s.att, &s.y, &s.yn, &s.u, &s.u3,
            &s.scores, &s.logits, &s.deq,
        ]
        .iter()
        .map(|v| v.capacity() * 4)
        .sum::<usize>();
        let carry: usize = state
            .layers
            .iter()
            .map(|l| {
                16 * l.norm.mean.capacity()
                    + 4 * (l.h_re.capacity() + l.h_im.capacity() + l.k.capacity() + l.v.capacity())
            })
            .sum();
        let rw = state.rewindow.as_ref().map_or(0, |r| {
            r.history.capacity() * 8 + Self::state_bytes(&r.fresh)
        });
        scratch + carry + 16 * state.final_norm.mean.capacity() + rw
    }

    /// Seconds per token of the decode step's matrix-vector products alone (every linear layer
    /// and the head, `reps` repetitions on `state`'s scratch; the state's stream is untouched
    /// but its scratch values are overwritten): the bound a decode step can approach.
    pub fn time_matvecs(&self, state: &mut EngineState, reps: usize) -> f64 {
        let t0 = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            cpu::matvecs_only(self, state);
        }
        t0.elapsed().as_secs_f64() / reps.max(1) as f64
    }

    /// Feeds `tokens` (one sequence) through the stream `state` and calls `on_logits(i, row)`
    /// with the logits of token `i` of this call for the tokens `want` asks for. Any split of a
    /// sequence into calls gives the same logits.
    pub fn feed(
        &self,
        state: &mut EngineState,
        tokens: &[usize],
        want: Want,
        mut on_logits: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        let at = (state.block, state.position, None);
        drive(
            (self.id, state.engine_id),
            tokens,
            self.dims.vocab,
            at,
            want,
            |piece, off, w| {
                self.step_block(state, piece, w, |i, row| on_logits(off + i, row));
                Ok(())
            },
        )
    }

    /// One block through the layers, then the re-window bookkeeping.
    fn step_block(
        &self,
        state: &mut EngineState,
        tokens: &[usize],
        want: Want,
        mut on_logits: impl FnMut(usize, &[f32]),
    ) {
        let before = state.position;
        let (r0, rows) = cpu::forward_block(self, state, tokens, want);
        let v = self.dims.vocab;
        for (i, row) in state.scratch.logits[..rows * v].chunks_exact(v).enumerate() {
            on_logits(r0 + i, row);
        }
        state.position += tokens.len() as u64;
        let after = state.position;
        let Some(rw) = state.rewindow.as_mut() else {
            return;
        };
        if rw.record(tokens, before, after, self.dims.chunk) {
            // a fresh run over the kept tokens; only its TimestepNorm statistics are used
            let fresh = &mut rw.fresh;
            fresh.position = 0;
            for l in &mut fresh.layers {
                l.norm.reset();
                l.h_re.fill(0.0);
                l.h_im.fill(0.0);
            }
            fresh.final_norm.reset();
            let (a, b) = rw.history.as_slices();
            for part in [a, b] {
                for blk in part.chunks(fresh.block) {
                    cpu::forward_block(self, fresh, blk, Want::None);
                    fresh.position += blk.len() as u64;
                }
            }
            for (l, f) in state.layers.iter_mut().zip(&fresh.layers) {
                l.norm.clone_from(&f.norm);
            }
            state.final_norm.clone_from(&fresh.final_norm);
        }
    }
}
