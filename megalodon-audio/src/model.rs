//! The raw-waveform speech classifier: a learned embedding of raw samples, the core's
//! [`BidirectionalEncoder`] with chunked attention, masked mean pooling and the shared
//! [`ClassHead`].
//!
//! ```text
//! clip of L samples (16 kHz) -> T = ceil(L / FL) frames of FL raw samples (crate::clip::frame)
//!      -> embed: Linear(FL -> M)               `embed.weight`, `embed.bias`
//!      -> encoder (bidirectional layers,        `encoder.layers.{i}.…`, `encoder.output.…`
//!         attention within chunks of C tokens)
//!      -> mean over each clip's real frames     (padding after a short file is masked)
//!      -> head: Linear(M -> labels)             `head.weight`, `head.bias`
//! ```
//!
//! With `FL = 1` the embedding is Mega's SC-Raw one, `e_t = x_t w + b` (one token per sample);
//! with `FL > 1` it is a strided learned embedding of `FL` raw samples per token (no
//! spectrogram). The frame length and encoder widths are compile-time; the clip length, chunk
//! size and label count are run-time ([`AudioConf`]).
//!
//! Presets ([`AudioPreset`] + a type alias each):
//!
//! | preset | type | FL | tokens / 1 s | layers | M | Z | V | F | N | G | chunk | for |
//! |---|---|---|---|---|---|---|---|---|---|---|---|---|
//! | `speech-commands` | [`SpeechCommands`] | 1 | 16,000 | 6 | 60 | 30 | 120 | 120 | 16 | 4 | 1000 | GPUs (≈300K params) |
//! | `speech-cpu` | [`SpeechCpu`] | 32 | 500 | 4 | 32 | 16 | 64 | 64 | 8 | 4 | 125 | 2 CPU cores |

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use dfdx::prelude::*;
use megalodon_core::checkpoint::{self, Buffer, HasBuffers};
use megalodon_core::config::ModelConf;
use megalodon_core::device::MegaDevice;
use megalodon_core::fit::{load_trained, Trainable};
use megalodon_core::nn::classifier::{class_cross_entropy, softmax_rows, ClassHead, ClassLogits};
use megalodon_core::nn::layers::Linear;
use megalodon_core::params::{join, ParamVisitor, Params};
use megalodon_core::util::{c, Float};
use megalodon_core::{masked_mean_pool, BidirectionalEncoder};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::augment::{make_clip, ClipConfig};
use crate::clip::{frame, frame_lengths};
use crate::loader::Batch;
use crate::rng::SplitMix64;
use crate::wav::{resample, MAX_SAMPLE_RATE, TARGET_RATE};

/// Longest waveform [`SpeechClassifier::classify`] accepts, in seconds (it is cropped to the
/// model's clip length anyway; this only bounds the resampling work).
pub const MAX_CLASSIFY_SECONDS: usize = 600;

/// Everything that defines an audio model besides its compile-time type: written as
/// `config.json` in every checkpoint and checked when a run is loaded or used as `--init`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioConf {
    /// Preset name (`speech-cpu`, `speech-commands`).
    pub preset: String,
    /// The encoder's widths and (run-time) chunk size in tokens.
    pub encoder: ModelConf,
    /// Raw samples per token, `FL` (1 = one token per sample).
    pub frame_len: usize,
    /// Samples per clip (shorter files are zero-padded and masked, longer ones cropped).
    pub clip_len: usize,
    /// Sample rate of the clips, Hz.
    pub sample_rate: u32,
    /// Label names; index = label id.
    pub labels: Vec<String>,
}

impl AudioConf {
    /// Tokens per clip, `ceil(clip_len / frame_len)`.
    pub fn tokens(&self) -> Result<usize> {
        ensure!(self.frame_len > 0, "frame length must be > 0");
        ensure!(self.clip_len > 0, "clip length must be > 0");
        Ok(self.clip_len.div_ceil(self.frame_len))
    }

    /// The evaluation clip settings (centre crop, no normalisation).
    pub fn eval_clip(&self) -> ClipConfig {
        ClipConfig::eval(self.clip_len)
    }

    /// The training clip settings (random crop, no normalisation).
    pub fn train_clip(&self) -> ClipConfig {
        ClipConfig::train(self.clip_len)
    }

    /// Checks that a run initialised from `init` (the config of an earlier run) can take its
    /// weights: same preset, widths and frame length. Clip length, chunk and labels may differ
    /// (other labels get a new head). Errors name `--init` and the field.
    pub fn check_init(&self, init: &AudioConf) -> Result<()> {
        let pairs: [(&str, String, String); 4] = [
            ("preset", init.preset.clone(), self.preset.clone()),
            (
                "frame_len",
                init.frame_len.to_string(),
                self.frame_len.to_string(),
            ),
            (
                "sample_rate",
                init.sample_rate.to_string(),
                self.sample_rate.to_string(),
            ),
            (
                "encoder widths",
                format!("{:?}", init.encoder.dims()),
                format!("{:?}", self.encoder.dims()),
            ),
        ];
        for (field, theirs, ours) in pairs {
            ensure!(
                theirs == ours,
                "--init run has {field} {theirs}, but this run needs {ours}: initialise from a run \
                 of the same preset"
            );
        }
        Ok(())
    }
}

/// Run-time defaults of a preset (its type fixes the widths and the frame length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioPreset {
    /// Name recorded in the config.
    pub name: &'static str,
    /// Raw samples per token (must equal the type's `FL`).
    pub frame_len: usize,
    /// Samples per clip.
    pub clip_len: usize,
    /// Attention chunk, tokens.
    pub chunk: usize,
}

/// Mega's SC-Raw base dims on Megalodon's block: one token per sample, 16,000 tokens per 1 s
/// clip, attention in chunks of 1000 tokens. For GPUs: on 2 CPU cores it trains at well under
/// one clip per second (see the README).
pub const SPEECH_COMMANDS: AudioPreset = AudioPreset {
    name: "speech-commands",
    frame_len: 1,
    clip_len: 16_000,
    chunk: 1000,
};

/// The CPU preset: 32 raw samples (2 ms) per token, 500 tokens per 1 s clip, 4 layers of
/// width 32, attention in chunks of 125 tokens.
pub const SPEECH_CPU: AudioPreset = AudioPreset {
    name: "speech-cpu",
    frame_len: 32,
    clip_len: 16_000,
    chunk: 125,
};

/// The SC-Raw preset's type (see [`SPEECH_COMMANDS`]): 6 layers, M 60, Z 30, V 120, H 1,
/// F 120, N 16, G 4; ≈300K parameters ([`param_count`]).
pub type SpeechCommands<E, D> = SpeechClassifier<1, 6, 60, 30, 120, 1, 120, 16, 4, E, D>;

/// The CPU preset's type (see [`SPEECH_CPU`]): 32 samples per token, 4 layers, M 32, Z 16,
/// V 64, H 1, F 64, N 8, G 4.
pub type SpeechCpu<E, D> = SpeechClassifier<32, 4, 32, 16, 64, 1, 64, 8, 4, E, D>;

/// Number of parameters of an audio model with config `conf` and `classes` labels, from the
/// config alone (nothing is allocated). The encoder layer is the causal layer
/// ([`megalodon_core::nn::model::param_count`]) plus the backward CEMA (`cema_rev`:
/// `alpha`, `delta`, `gamma` of `4·N·M` values, `theta` and `omega` of `M` each). Errors on
/// overflow.
pub fn param_count(conf: &AudioConf, classes: usize) -> Result<usize> {
    let e = &conf.encoder;
    let (d, n, l) = (e.model_dim, e.cema_ndim, e.num_layers);
    let ovf = || anyhow::anyhow!("parameter count of {} overflows", conf.preset);
    // guard the core formula's unchecked arithmetic: every width product below fits
    let widest = [e.value_dim, e.ffn_hidden_dim, e.z_dim, d, n]
        .into_iter()
        .max()
        .unwrap_or(0);
    widest
        .checked_mul(widest)
        .and_then(|x| x.checked_mul(16))
        .and_then(|x| x.checked_mul(l.max(1)))
        .ok_or_else(ovf)?;
    let backbone = megalodon_core::nn::model::param_count(&ModelConf {
        vocab_size: 0,
        share_emb: true,
        ..e.clone()
    });
    let cema_rev = n
        .checked_mul(4)
        .and_then(|x| x.checked_add(2))
        .and_then(|x| x.checked_mul(d))
        .and_then(|x| x.checked_mul(l))
        .ok_or_else(ovf)?;
    let embed = conf
        .frame_len
        .checked_add(1)
        .and_then(|x| x.checked_mul(d))
        .ok_or_else(ovf)?;
    let head = d
        .checked_add(1)
        .and_then(|x| x.checked_mul(classes))
        .ok_or_else(ovf)?;
    [cema_rev, embed, head]
        .into_iter()
        .try_fold(backbone, |s, x| s.checked_add(x))
        .ok_or_else(ovf)
}

/// Framed clips `(B, T, FL)`: the embedding's input.
pub type Frames<const FL: usize, E, D, T = NoneTape> = Tensor<(usize, usize, Const<FL>), E, D, T>;

/// A raw-waveform classifier (see the module docs). Generics: `FL` raw samples per token, then
/// the encoder's `L, M, Z, V, H, F, N, G`, dtype and device.
pub struct SpeechClassifier<
    const FL: usize,
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
    /// `embed`: `FL -> M`.
    pub embed: Linear<FL, M, E, D>,
    /// `encoder`.
    pub encoder: BidirectionalEncoder<L, M, Z, V, H, F, N, G, E, D>,
    /// `head`: `M -> labels`.
    pub head: ClassHead<M, E, D>,
    /// The configuration (`config.json`).
    pub conf: AudioConf,
}

impl<
        const FL: usize,
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
    > SpeechClassifier<FL, L, M, Z, V, H, F, N, G, E, D>
{
    /// The config of `preset` for this type with the given labels. Errors when the preset's
    /// frame length differs from the type's or there are fewer than two labels.
    pub fn preset_conf(preset: &AudioPreset, labels: Vec<String>) -> Result<AudioConf> {
        let conf = AudioConf {
            preset: preset.name.to_string(),
            encoder: BidirectionalEncoder::<L, M, Z, V, H, F, N, G, E, D>::default_conf(
                preset.chunk,
            ),
            frame_len: preset.frame_len,
            clip_len: preset.clip_len,
            sample_rate: TARGET_RATE,
            labels,
        };
        Self::check_conf(&conf)?;
        Ok(conf)
    }

    /// Checks `conf` against this type and for sizes the model cannot run with.
    pub fn check_conf(conf: &AudioConf) -> Result<()> {
        ensure!(
            conf.frame_len == FL,
            "config {} has frame length {}, but this model type takes {FL} samples per token",
            conf.preset,
            conf.frame_len
        );
        conf.encoder
            .check_dims(&BidirectionalEncoder::<L, M, Z, V, H, F, N, G, E, D>::DIMS)
            .with_context(|| format!("encoder config of preset {}", conf.preset))?;
        conf.tokens()?;
        ensure!(
            (1..=MAX_SAMPLE_RATE).contains(&conf.sample_rate),
            "sample rate {} Hz is outside 1..={MAX_SAMPLE_RATE}",
            conf.sample_rate
        );
        ensure!(
            conf.labels.len() >= 2,
            "a classifier needs at least two labels, found {} ({:?})",
            conf.labels.len(),
            conf.labels
        );
        Ok(())
    }

    /// A freshly initialised model, deterministic in `seed`.
    pub fn new(dev: &D, conf: AudioConf, seed: u64) -> Result<Self> {
        Self::check_conf(&conf)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let embed = Linear::new(dev, &mut rng, true);
        let encoder = BidirectionalEncoder::init(dev, conf.encoder.clone(), &mut rng)?;
        let head = ClassHead::new(dev, &mut rng, conf.labels.len())?;
        Ok(Self {
            embed,
            encoder,
            head,
            conf,
        })
    }

    /// Replaces the head by a freshly initialised one for `labels` (fine-tuning on other
    /// words).
    pub fn reset_head(&mut self, labels: Vec<String>, seed: u64) -> Result<()> {
        self.head.reinit(labels.len(), seed)?;
        self.conf.labels = labels;
        Ok(())
    }

    /// Loads a run directory on `dev`: a training `--out` folder (its latest checkpoint is
    /// used) or a checkpoint folder holding `config.json` and `model.safetensors`.
    pub fn load_on(dev: &D, run: impl AsRef<Path>) -> Result<Self> {
        load_trained(run.as_ref(), "an audio run", |conf| Self::new(dev, conf, 0))
    }

    /// Label names.
    pub fn labels(&self) -> &[String] {
        &self.conf.labels
    }

    /// Class logits of framed clips `x (B, T, FL)` whose real lengths are `lengths` frames.
    pub fn logits<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        x: Tensor<(usize, usize, Const<FL>), E, D, T>,
        lengths: &[usize],
    ) -> Result<ClassLogits<E, D, T>> {
        let (b, t, _) = *x.shape();
        ensure!(
            b > 0 && t > 0,
            "empty audio batch ({b} clips of {t} tokens)"
        );
        ensure!(
            lengths.len() == b,
            "{} lengths for {b} clips",
            lengths.len()
        );
        if let Some((i, &l)) = lengths.iter().enumerate().find(|(_, &l)| l == 0 || l > t) {
            bail!("clip {i} has real length {l} tokens, outside 1..={t}");
        }
        let h = self
            .encoder
            .forward(self.embed.forward(x)?, Some(lengths))?;
        Ok(self.head.forward(masked_mean_pool(h, Some(lengths))?))
    }

    /// The input tensor and token lengths of `batch` clips of `clip_len` samples (`samples`
    /// row-major, `lengths` in samples).
    fn framed(
        &self,
        samples: &[f32],
        lengths: &[usize],
        clip_len: usize,
    ) -> Result<(Frames<FL, E, D>, Vec<usize>)> {
        ensure!(
            clip_len > 0 && samples.len().is_multiple_of(clip_len),
            "{} samples do not form clips of {clip_len}",
            samples.len()
        );
        let batch = samples.len() / clip_len;
        ensure!(
            lengths.len() == batch,
            "{} lengths for {batch} clips",
            lengths.len()
        );
        if let Some((i, &l)) = lengths
            .iter()
            .enumerate()
            .find(|(_, &l)| l == 0 || l > clip_len)
        {
            bail!("clip {i} has real length {l} samples, outside 1..={clip_len}");
        }
        let f = frame(samples, clip_len, FL)?;
        let tl = frame_lengths(lengths, FL)?;
        let dev = self.head.weight.device().clone();
        let x = dev.tensor_from_vec(
            f.data.iter().map(|&v| c::<E>(v as f64)).collect(),
            (f.batch, f.tokens, Const::<FL>),
        );
        Ok((x, tl))
    }

    /// Host class logits `(batch, labels)` of `batch` clips of `clip_len` samples each
    /// (`samples` row-major, real lengths in samples; as [`Batch`] holds them).
    pub fn logits_host(
        &self,
        samples: &[f32],
        lengths: &[usize],
        clip_len: usize,
    ) -> Result<Vec<f32>> {
        let (x, tl) = self.framed(samples, lengths, clip_len)?;
        Ok(self
            .logits(x, &tl)?
            .as_vec()
            .into_iter()
            .map(|v| v.to_f32().unwrap_or(f32::NAN))
            .collect())
    }

    /// Label probabilities of a mono waveform at `sample_rate` Hz, most likely first. The
    /// waveform is resampled to the model's rate and centre-cropped or zero-padded to its clip
    /// length, as at evaluation. Errors: an empty waveform, NaN or infinite samples, a rate of
    /// 0 or above the resampler's range, a waveform longer than [`MAX_CLASSIFY_SECONDS`].
    ///
    /// ```
    /// use megalodon_audio::model::{SpeechCpu, SPEECH_CPU};
    /// use megalodon_audio::megalodon_core::checkpoint::save_run;
    /// use dfdx::prelude::Cpu;
    /// # fn main() -> anyhow::Result<()> {
    /// // a (random) model saved as a run directory, as `audio train` leaves one
    /// let dev = Cpu::default();
    /// let labels = vec!["no".to_string(), "yes".to_string()];
    /// let mut conf = SpeechCpu::<f32, Cpu>::preset_conf(&SPEECH_CPU, labels)?;
    /// conf.clip_len = 1600; // 0.1 s clips keep the example quick
    /// let mut model = SpeechCpu::<f32, Cpu>::new(&dev, conf.clone(), 0)?;
    /// let run = tempfile::tempdir()?;
    /// save_run(run.path(), &conf, &mut model)?;
    ///
    /// let model = SpeechCpu::<f32, Cpu>::load(run.path())?;
    /// let tone: Vec<f32> = (0..800).map(|i| (i as f32 * 0.1).sin() * 0.5).collect();
    /// let ranked = model.classify(&tone, 8_000)?; // [(label, probability)], most likely first
    /// assert_eq!(ranked.len(), 2);
    /// assert!((ranked.iter().map(|(_, p)| p).sum::<f32>() - 1.0).abs() < 1e-5);
    /// assert!(ranked[0].1 >= ranked[1].1);
    /// assert!(model.classify(&[f32::NAN; 100], 16_000).is_err());
    /// # Ok(()) }
    /// ```
    pub fn classify(&self, samples: &[f32], sample_rate: u32) -> Result<Vec<(String, f32)>> {
        let clip = self.prepare(samples, sample_rate)?;
        let probs = self.classify_clips(&clip.0, &[clip.1])?;
        probs
            .into_iter()
            .next()
            .context("the model returned no row for one clip")
    }

    /// The evaluation clip (samples, real length) of a waveform at `sample_rate` Hz (see
    /// [`Self::classify`] for the checks).
    pub fn prepare(&self, samples: &[f32], sample_rate: u32) -> Result<(Vec<f32>, usize)> {
        ensure!(!samples.is_empty(), "cannot classify an empty waveform");
        ensure!(
            (1..=MAX_SAMPLE_RATE).contains(&sample_rate),
            "sample rate {sample_rate} Hz is outside 1..={MAX_SAMPLE_RATE}"
        );
        let limit = (sample_rate as usize).saturating_mul(MAX_CLASSIFY_SECONDS);
        ensure!(
            samples.len() <= limit,
            "waveform of {} samples at {sample_rate} Hz is longer than {MAX_CLASSIFY_SECONDS} s",
            samples.len()
        );
        if let Some(i) = samples.iter().position(|v| !v.is_finite()) {
            bail!(
                "waveform sample {i} is {} (not a finite number)",
                samples[i]
            );
        }
        let raw = resample(samples, sample_rate, self.conf.sample_rate)?;
        let (clip, length) = make_clip(&raw, &self.conf.eval_clip(), None, &mut SplitMix64::new(0));
        ensure!(length > 0, "the waveform resampled to no sample");
        Ok((clip, length))
    }

    /// Probabilities `(label, p)`, most likely first, of each prepared clip (`clips` holds
    /// rows of the model's clip length, `lengths` their real lengths in samples).
    pub fn classify_clips(
        &self,
        clips: &[f32],
        lengths: &[usize],
    ) -> Result<Vec<Vec<(String, f32)>>> {
        let logits = self.logits_host(clips, lengths, self.conf.clip_len)?;
        let probs = softmax_rows(&logits, self.labels().len());
        Ok(probs
            .chunks(self.labels().len())
            .map(|row| {
                let mut ranked: Vec<(String, f32)> = self
                    .labels()
                    .iter()
                    .cloned()
                    .zip(row.iter().copied())
                    .collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
                ranked
            })
            .collect())
    }
}

impl<
        const FL: usize,
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E> + Default,
    > SpeechClassifier<FL, L, M, Z, V, H, F, N, G, E, D>
{
    /// [`Self::load_on`] a default device (the CPU).
    pub fn load(run: impl AsRef<Path>) -> Result<Self> {
        Self::load_on(&D::default(), run)
    }
}

pub use megalodon_core::fit::resolve_run;

/// Reads the [`AudioConf`] of a run directory (see [`resolve_run`]).
pub fn load_conf(run: &Path) -> Result<AudioConf> {
    megalodon_core::fit::load_run_config(run, "an audio run")
}

impl<
        const FL: usize,
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
    > Params<E, D> for SpeechClassifier<FL, L, M, Z, V, H, F, N, G, E, D>
{
    fn visit_params<Vis: ParamVisitor<E, D>>(&mut self, p: &str, v: &mut Vis) -> Result<()> {
        self.embed.visit_params(&join(p, "embed"), v)?;
        self.encoder.visit_params(&join(p, "encoder"), v)?;
        self.head.visit_params(&join(p, "head"), v)
    }
}

impl<
        const FL: usize,
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
    > HasBuffers for SpeechClassifier<FL, L, M, Z, V, H, F, N, G, E, D>
{
    fn buffers(&self) -> Vec<(String, Buffer)> {
        checkpoint::nested_buffers("encoder", &self.encoder)
    }

    fn aliases(&self) -> Vec<(String, String)> {
        checkpoint::nested_aliases("encoder", &self.encoder)
    }
}

impl<
        const FL: usize,
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
    > Trainable<E, D> for SpeechClassifier<FL, L, M, Z, V, H, F, N, G, E, D>
{
    type Batch = Batch;
    type Config = AudioConf;

    fn config(&self) -> AudioConf {
        self.conf.clone()
    }

    fn loss(
        &self,
        b: &Batch,
        grads: Gradients<E, D>,
    ) -> Result<Tensor<Rank0, E, D, OwnedTape<E, D>>> {
        ensure!(
            b.batch > 0,
            "batch {} of epoch {} has no readable clip (all {} skipped)",
            b.index,
            b.epoch,
            b.skipped
        );
        let (x, tl) = self.framed(&b.values, &b.lengths, b.row_len)?;
        let x = x.traced(grads);
        class_cross_entropy(self.logits(x, &tl)?, &b.labels)
    }

    fn batch_len(b: &Batch) -> u64 {
        b.batch as u64
    }

    fn shard(b: &Batch, part: usize, parts: usize) -> Result<Batch> {
        b.shard(part, parts)
    }
}

/// What the CLI and the tests need of any audio model type, so that code can be generic over
/// the presets (implemented for every [`SpeechClassifier`]; see its inherent methods).
pub trait AudioModel<E: Float, D: MegaDevice<E>>:
    Trainable<E, D, Batch = Batch, Config = AudioConf> + Sized
{
    /// [`SpeechClassifier::preset_conf`].
    fn preset_conf(preset: &AudioPreset, labels: Vec<String>) -> Result<AudioConf>;
    /// [`SpeechClassifier::check_conf`].
    fn check_conf(conf: &AudioConf) -> Result<()>;
    /// [`SpeechClassifier::new`].
    fn build(dev: &D, conf: AudioConf, seed: u64) -> Result<Self>;
    /// [`SpeechClassifier::load_on`].
    fn load_on(dev: &D, run: &Path) -> Result<Self>;
    /// The model's config.
    fn audio_conf(&self) -> &AudioConf;
    /// [`SpeechClassifier::reset_head`].
    fn reset_head(&mut self, labels: Vec<String>, seed: u64) -> Result<()>;
    /// [`SpeechClassifier::logits_host`].
    fn logits_host(&self, samples: &[f32], lengths: &[usize], clip_len: usize) -> Result<Vec<f32>>;
    /// [`SpeechClassifier::classify`].
    fn classify(&self, samples: &[f32], sample_rate: u32) -> Result<Vec<(String, f32)>>;
}

impl<
        const FL: usize,
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
    > AudioModel<E, D> for SpeechClassifier<FL, L, M, Z, V, H, F, N, G, E, D>
{
    fn preset_conf(preset: &AudioPreset, labels: Vec<String>) -> Result<AudioConf> {
        Self::preset_conf(preset, labels)
    }
    fn check_conf(conf: &AudioConf) -> Result<()> {
        Self::check_conf(conf)
    }
    fn build(dev: &D, conf: AudioConf, seed: u64) -> Result<Self> {
        Self::new(dev, conf, seed)
    }
    fn load_on(dev: &D, run: &Path) -> Result<Self> {
        Self::load_on(dev, run)
    }
    fn audio_conf(&self) -> &AudioConf {
        &self.conf
    }
    fn reset_head(&mut self, labels: Vec<String>, seed: u64) -> Result<()> {
        Self::reset_head(self, labels, seed)
    }
    fn logits_host(&self, samples: &[f32], lengths: &[usize], clip_len: usize) -> Result<Vec<f32>> {
        Self::logits_host(self, samples, lengths, clip_len)
    }
    fn classify(&self, samples: &[f32], sample_rate: u32) -> Result<Vec<(String, f32)>> {
        Self::classify(self, samples, sample_rate)
    }
}
