//! Clip preparation and training augmentation: time shift, random gain, background noise.
//!
//! [`make_clip`] turns a decoded waveform into a fixed-length clip, in this order:
//!
//! 1. **fit** to [`ClipConfig::len`] samples ([`crate::clip::fit_into`]: pad, or crop
//!    centred / at random);
//! 2. **time shift** (augmentation): the content moves by a uniform whole number of samples
//!    in `±time_shift_ms` inside the fixed window; zeros come in at the side it leaves (a
//!    delay counts the leading zeros as real, an advance shortens the real length; at least
//!    one real sample is kept);
//! 3. **gain** (augmentation): the clip is scaled by a uniform gain in `gain_db` decibels;
//! 4. **noise** (augmentation, with probability `noise_prob` when the [`NoiseBank`] has clips):
//!    a random segment of a random noise clip (looped if shorter) is added at a uniform
//!    signal-to-noise ratio ([`NoiseLevel::SnrDb`]; silent clips get none) or a uniform
//!    amplitude factor ([`NoiseLevel::Gain`]);
//! 5. **normalise** ([`ClipConfig::normalize`]).
//!
//! Steps 2–4 touch only the real part (`t < length`), so padding stays exactly zero and the
//! mask stays a prefix. Every random draw comes from the `rng` passed in, split into one
//! sub-stream per step, so the result depends only on that generator's seed (the loader
//! derives it from `(seed, epoch, sample)`), and turning one augmentation off leaves the
//! draws of the others unchanged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Result};

use crate::clip::{fit_into, normalize, Crop, Normalize, DEFAULT_CLIP_LEN};
use crate::rng::SplitMix64;
use crate::wav::{read_wav, ReadOptions, TARGET_RATE};

/// Length, crop and normalisation of the clips (see [`make_clip`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipConfig {
    /// Samples per clip (`> 0`); default 16 000 (1 s at 16 kHz).
    pub len: usize,
    /// Where longer waveforms are cropped: [`Crop::Random`] for training, [`Crop::Center`]
    /// for evaluation.
    pub crop: Crop,
    /// Per-clip normalisation after augmentation.
    pub normalize: Normalize,
}

impl ClipConfig {
    /// Evaluation clips: `len` samples, centre crop, no normalisation.
    pub fn eval(len: usize) -> Self {
        Self {
            len,
            crop: Crop::Center,
            normalize: Normalize::None,
        }
    }

    /// Training clips: `len` samples, random crop, no normalisation.
    pub fn train(len: usize) -> Self {
        Self {
            crop: Crop::Random,
            ..Self::eval(len)
        }
    }
}

impl Default for ClipConfig {
    /// [`ClipConfig::eval`] of [`DEFAULT_CLIP_LEN`].
    fn default() -> Self {
        Self::eval(DEFAULT_CLIP_LEN)
    }
}

/// How loud mixed-in background noise is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoiseLevel {
    /// Signal-to-noise ratio uniform in `[min, max)` dB, relative to the clip's real part.
    SnrDb {
        /// Lowest SNR (loudest noise), dB.
        min: f32,
        /// Highest SNR, dB.
        max: f32,
    },
    /// Noise samples scaled by a factor uniform in `[min, max)` (Speech Commands' recipe uses
    /// `0..0.1`), whatever the clip's level.
    Gain {
        /// Smallest factor.
        min: f32,
        /// Largest factor.
        max: f32,
    },
}

/// Training augmentation settings (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentConfig {
    /// Sample rate of the clips, to convert milliseconds to samples.
    pub sample_rate: u32,
    /// Largest time shift either way, in milliseconds (0 disables).
    pub time_shift_ms: f32,
    /// Gain range in dB, `(min, max)`; `(0, 0)` disables.
    pub gain_db: (f32, f32),
    /// Probability of mixing in background noise (0 disables).
    pub noise_prob: f64,
    /// Loudness of the noise.
    pub noise_level: NoiseLevel,
}

impl Default for AugmentConfig {
    /// 16 kHz, ±100 ms shift, ±6 dB gain, noise on 80 % of clips at 5–20 dB SNR.
    fn default() -> Self {
        Self {
            sample_rate: TARGET_RATE,
            time_shift_ms: 100.0,
            gain_db: (-6.0, 6.0),
            noise_prob: 0.8,
            noise_level: NoiseLevel::SnrDb {
                min: 5.0,
                max: 20.0,
            },
        }
    }
}

impl AugmentConfig {
    /// Checks the ranges: finite values, `min <= max`, a probability in `[0, 1]`, a positive
    /// sample rate, a non-negative shift.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.sample_rate > 0, "augmentation sample rate must be > 0");
        ensure!(
            self.time_shift_ms.is_finite() && self.time_shift_ms >= 0.0,
            "time shift must be a finite number of ms >= 0, got {}",
            self.time_shift_ms
        );
        let (g0, g1) = self.gain_db;
        ensure!(
            g0.is_finite() && g1.is_finite() && g0 <= g1,
            "gain range must be finite with min <= max, got {g0}..{g1} dB"
        );
        ensure!(
            (0.0..=1.0).contains(&self.noise_prob),
            "noise probability must be in [0, 1], got {}",
            self.noise_prob
        );
        let (lo, hi) = match self.noise_level {
            NoiseLevel::SnrDb { min, max } => (min, max),
            NoiseLevel::Gain { min, max } => {
                ensure!(min >= 0.0, "noise gain must be >= 0, got {min}");
                (min, max)
            }
        };
        ensure!(
            lo.is_finite() && hi.is_finite() && lo <= hi,
            "noise level range must be finite with min <= max, got {lo}..{hi}"
        );
        Ok(())
    }

    /// Largest shift in samples, `round(time_shift_ms · sample_rate / 1000)`.
    pub fn max_shift(&self) -> usize {
        (f64::from(self.time_shift_ms) * f64::from(self.sample_rate) / 1000.0).round() as usize
    }
}

/// Background-noise waveforms (mono, at the clips' rate) to mix into training clips.
#[derive(Debug, Clone, Default)]
pub struct NoiseBank {
    clips: Vec<Vec<f32>>,
    names: Vec<PathBuf>,
    skipped: Vec<PathBuf>,
}

impl NoiseBank {
    /// Decodes the noise WAVs at `paths` (e.g. [`crate::dataset::AudioSplits::noise`]). A file
    /// that cannot be read, or is silent, is reported on stderr (naming it), skipped and listed
    /// in [`Self::skipped`]; an empty list gives an empty bank (no noise mixing).
    pub fn load(paths: &[PathBuf], opts: &ReadOptions) -> Self {
        let mut bank = Self::default();
        for p in paths {
            match read_wav(p, opts) {
                Ok(s) if s.iter().any(|&v| v != 0.0) => {
                    bank.clips.push(s);
                    bank.names.push(p.clone());
                }
                Ok(_) => {
                    eprintln!("warning: skipping silent noise file {}", p.display());
                    bank.skipped.push(p.clone());
                }
                Err(e) => {
                    eprintln!("warning: skipping noise file: {e:#}");
                    bank.skipped.push(p.clone());
                }
            }
        }
        bank
    }

    /// A bank of the given waveforms (empty ones are dropped); `names` are synthetic.
    pub fn from_clips(clips: Vec<Vec<f32>>) -> Self {
        let clips: Vec<Vec<f32>> = clips.into_iter().filter(|c| !c.is_empty()).collect();
        let names = (0..clips.len())
            .map(|i| PathBuf::from(format!("<noise {i}>")))
            .collect();
        Self {
            clips,
            names,
            skipped: Vec::new(),
        }
    }

    /// Number of usable noise clips.
    pub fn len(&self) -> usize {
        self.clips.len()
    }

    /// Whether there is no usable noise clip.
    pub fn is_empty(&self) -> bool {
        self.clips.is_empty()
    }

    /// The files the clips came from.
    pub fn names(&self) -> &[PathBuf] {
        &self.names
    }

    /// The noise files that were left out.
    pub fn skipped(&self) -> &[PathBuf] {
        &self.skipped
    }

    /// Noise clip `i`.
    pub fn clip(&self, i: usize) -> Option<&[f32]> {
        self.clips.get(i).map(Vec::as_slice)
    }
}

/// Augmentation settings with their noise source; cheap to clone (the bank is shared).
#[derive(Debug, Clone)]
pub struct Augment {
    cfg: AugmentConfig,
    noise: Arc<NoiseBank>,
}

impl Augment {
    /// Checks `cfg` ([`AugmentConfig::validate`]) and pairs it with `noise`.
    pub fn new(cfg: AugmentConfig, noise: NoiseBank) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            noise: Arc::new(noise),
        })
    }

    /// Loads the noise files of `paths` ([`NoiseBank::load`]) and builds the augmentation.
    pub fn with_noise_files(
        cfg: AugmentConfig,
        paths: &[PathBuf],
        opts: &ReadOptions,
    ) -> Result<Self> {
        Self::new(cfg, NoiseBank::load(paths, opts))
    }

    /// The settings.
    pub fn config(&self) -> &AugmentConfig {
        &self.cfg
    }

    /// The noise source.
    pub fn noise(&self) -> &NoiseBank {
        &self.noise
    }

    /// Applies steps 2–4 of the module docs to `clip` (real part `..length`) and returns the
    /// new real length.
    pub fn apply(&self, clip: &mut [f32], length: usize, rng: &mut SplitMix64) -> usize {
        let length = length.min(clip.len());
        let base = rng.next_u64();
        let mut r_shift = SplitMix64::from_keys(&[base, 1]);
        let mut r_gain = SplitMix64::from_keys(&[base, 2]);
        let mut r_noise = SplitMix64::from_keys(&[base, 3]);
        let length = self.shift(clip, length, &mut r_shift);
        self.gain(&mut clip[..length], &mut r_gain);
        self.mix_noise(&mut clip[..length], &mut r_noise);
        length
    }

    fn shift(&self, clip: &mut [f32], length: usize, rng: &mut SplitMix64) -> usize {
        let max = self.cfg.max_shift().min(clip.len()) as i64;
        if max == 0 || length == 0 {
            return length;
        }
        let s = rng.range_i64(-max, max);
        if s > 0 {
            let s = s as usize;
            let new_len = (length + s).min(clip.len());
            clip.copy_within(0..new_len - s, s);
            clip[..s].fill(0.0);
            new_len
        } else if s < 0 {
            let s = (s.unsigned_abs() as usize).min(length - 1);
            clip.copy_within(s..length, 0);
            clip[length - s..length].fill(0.0);
            length - s
        } else {
            length
        }
    }

    fn gain(&self, real: &mut [f32], rng: &mut SplitMix64) {
        let (lo, hi) = self.cfg.gain_db;
        let db = rng.range_f64(f64::from(lo), f64::from(hi));
        if db != 0.0 {
            let g = 10f64.powf(db / 20.0) as f32;
            real.iter_mut().for_each(|v| *v *= g);
        }
    }

    fn mix_noise(&self, real: &mut [f32], rng: &mut SplitMix64) {
        let happens = rng.chance(self.cfg.noise_prob);
        if !happens || self.noise.is_empty() || real.is_empty() {
            return;
        }
        let which = rng.below(self.noise.len() as u64) as usize;
        let noise = &self.noise.clips[which];
        let start = rng.below(noise.len() as u64) as usize;
        let seg = |t: usize| noise[(start + t) % noise.len()];
        let scale = match self.cfg.noise_level {
            NoiseLevel::Gain { min, max } => rng.range_f64(f64::from(min), f64::from(max)),
            NoiseLevel::SnrDb { min, max } => {
                let snr = rng.range_f64(f64::from(min), f64::from(max));
                let p_sig = mean_square(real.iter().copied());
                let p_noise = mean_square((0..real.len()).map(seg));
                if p_sig <= 0.0 || p_noise <= 0.0 {
                    return;
                }
                (p_sig / (p_noise * 10f64.powf(snr / 10.0))).sqrt()
            }
        } as f32;
        for (t, v) in real.iter_mut().enumerate() {
            *v += scale * seg(t);
        }
    }
}

fn mean_square(it: impl Iterator<Item = f32>) -> f64 {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for v in it {
        sum += f64::from(v) * f64::from(v);
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Turns a decoded waveform into a clip of `cfg.len` samples (steps 1–5 of the module docs;
/// `augment` `None` skips 2–4) and returns `(clip, real length)`.
pub fn make_clip(
    raw: &[f32],
    cfg: &ClipConfig,
    augment: Option<&Augment>,
    rng: &mut SplitMix64,
) -> (Vec<f32>, usize) {
    let mut out = vec![0.0; cfg.len];
    let length = make_clip_into(raw, &mut out, cfg, augment, rng);
    (out, length)
}

/// [`make_clip`] into a caller's buffer of `cfg.len` samples (`out.len()` is used as the
/// length); returns the real length.
pub fn make_clip_into(
    raw: &[f32],
    out: &mut [f32],
    cfg: &ClipConfig,
    augment: Option<&Augment>,
    rng: &mut SplitMix64,
) -> usize {
    let base = rng.next_u64();
    let mut r_crop = SplitMix64::from_keys(&[base, 10]);
    let mut r_aug = SplitMix64::from_keys(&[base, 11]);
    let mut length = fit_into(raw, out, cfg.crop, &mut r_crop);
    if let Some(a) = augment {
        length = a.apply(out, length, &mut r_aug);
    }
    normalize(out, length, cfg.normalize);
    length
}

/// Reads the WAV at `path` and makes its evaluation clip (centre crop, no augmentation):
/// what a classifier's `predict` feeds the model. Returns `(clip, real length)`.
pub fn load_eval_clip(
    path: impl AsRef<Path>,
    cfg: &ClipConfig,
    opts: &ReadOptions,
) -> Result<(Vec<f32>, usize)> {
    let raw = read_wav(path, opts)?;
    let eval = ClipConfig {
        crop: Crop::Center,
        ..*cfg
    };
    Ok(make_clip(&raw, &eval, None, &mut SplitMix64::new(0)))
}
