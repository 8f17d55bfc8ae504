//! Streaming state, all in one place: per layer the TimestepNorm statistics ([`NormState`]),
//! the CEMA hidden state ([`CemaState`]) and the current chunk's rotated keys and values
//! ([`KvCache`]); per model one [`LayerState`] per layer plus the final norm's ([`ModelState`]).
//! Every size is constant in the number of tokens processed (`docs/design.md`, "Streaming").

pub use super::cema::CemaState;
use super::chunked_attention::Heads;
pub use super::timestep_norm::NormState;
use crate::device::MegaDevice;
use crate::util::Float;
use anyhow::{ensure, Result};
use dfdx::prelude::*;

/// Rotated keys and values of the current, unfinished chunk: `(B, c, H, dz)` and `(B, c, H, dv)`.
pub struct KvCache<const H: usize, E: Dtype, D: Device<E>> {
    pub k: Heads<H, E, D>,
    pub v: Heads<H, E, D>,
}

impl<const H: usize, E: Dtype, D: Device<E>> Clone for KvCache<H, E, D> {
    fn clone(&self) -> Self {
        Self {
            k: self.k.clone(),
            v: self.v.clone(),
        }
    }
}

impl<const H: usize, E: Dtype, D: Device<E>> KvCache<H, E, D> {
    /// Number of cached positions c.
    pub fn len(&self) -> usize {
        self.k.shape().1
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Streaming state of one layer (official cache `((K, V, count), (n, mean, var), h)`).
pub struct LayerState<
    const M: usize,
    const H: usize,
    const N: usize,
    const G: usize,
    E: Dtype,
    D: Device<E>,
> {
    pub norm: NormState<G, E, D>,
    /// CEMA hidden state; `None` = zeros.
    pub cema: Option<CemaState<M, N, E, D>>,
    /// Keys/values of the current unfinished chunk; `None` = empty.
    pub kv: Option<KvCache<H, E, D>>,
}

impl<
        const M: usize,
        const H: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > LayerState<M, H, N, G, E, D>
{
    pub fn new(dev: &D, batch: usize) -> Self {
        Self {
            norm: NormState::empty(dev, batch),
            cema: None,
            kv: None,
        }
    }

    /// Bytes held by this state (constant in the number of tokens processed).
    pub fn bytes(&self) -> usize {
        let e = std::mem::size_of::<E>();
        let mut n = self.norm.count.len() * 8
            + (self.norm.mean.shape().num_elements() + self.norm.var.shape().num_elements()) * e;
        if let Some(s) = &self.cema {
            n += 2 * s.re.shape().num_elements() * e;
        }
        if let Some(kv) = &self.kv {
            n += (kv.k.shape().num_elements() + kv.v.shape().num_elements()) * e;
        }
        n
    }
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
/// `utils.truncate_cache`; `docs/design.md` §9): once the stream holds at least `window` chunks,
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
    pub(crate) history: Vec<std::collections::VecDeque<usize>>,
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
    /// A fresh state for `batch` rows of a model with `layers` layers (cumulative statistics).
    pub fn new(dev: &D, layers: usize, batch: usize) -> Self {
        Self {
            layers: (0..layers).map(|_| LayerState::new(dev, batch)).collect(),
            final_norm: NormState::empty(dev, batch),
            position: 0,
            rewindow: None,
        }
    }

    /// Turns on TimestepNorm re-windowing (see [`Rewindow`]); only a fresh state may switch.
    pub fn with_rewindow(mut self, rewindow: Rewindow) -> Result<Self> {
        ensure!(
            rewindow.every > 0 && rewindow.every < rewindow.window,
            "re-windowing needs 0 < every ({}) < window ({})",
            rewindow.every,
            rewindow.window
        );
        ensure!(
            self.position == 0,
            "re-windowing must be set on a fresh state"
        );
        let batch = self.batch();
        self.rewindow = Some(Rewindow {
            history: vec![Default::default(); batch],
            ..rewindow
        });
        Ok(self)
    }

    /// Batch rows this state tracks.
    pub fn batch(&self) -> usize {
        self.final_norm.count.len()
    }

    /// Bytes held by the state.
    pub fn bytes(&self) -> usize {
        let e = std::mem::size_of::<E>();
        self.layers.iter().map(|l| l.bytes()).sum::<usize>()
            + self.final_norm.count.len() * 8
            + 2 * self.final_norm.mean.shape().num_elements() * e
    }
}
