//! Fixed-length clips: padding, cropping, the real-length mask, normalisation and framing.
//!
//! * [`fit`] brings a waveform to exactly `len` samples: a shorter one is copied to the start
//!   and padded with zeros at the end, a longer one is cropped (centred for evaluation,
//!   at a seeded random offset for training). It returns the clip's **real length**, the
//!   number of leading samples that come from the file (`min(source, len)`); the rest is
//!   padding, so a padding mask is `t < length` ([`mask`]).
//! * [`normalize`] optionally rescales a clip over its real part (padding stays zero).
//! * [`frame`] reshapes `B × L` samples into `B × T × F` frames (`T = ceil(L / F)`) for a
//!   strided embedding that consumes `F` raw samples per token; [`frame_lengths`] gives each
//!   row's real length in frames.

use anyhow::{ensure, Context, Result};

use crate::rng::SplitMix64;

/// Default clip length: one second at 16 kHz.
pub const DEFAULT_CLIP_LEN: usize = 16_000;

/// Where a longer waveform is cropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Crop {
    /// The middle `len` samples (evaluation; deterministic).
    #[default]
    Center,
    /// A uniformly random window (training; drawn from the clip's seeded stream).
    Random,
    /// The first `len` samples.
    Start,
}

/// Optional per-clip normalisation, computed over the real (unpadded) part.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Normalize {
    /// Leave the samples as decoded.
    #[default]
    None,
    /// Divide by the peak absolute value (silent clips are left as they are).
    Peak,
    /// Subtract the mean and divide by the standard deviation (plus `1e-5`).
    Standardize,
}

/// Writes `src` fitted to `out.len()` samples into `out` (see the module docs) and returns
/// the real length. `rng` is drawn from only for [`Crop::Random`] with a longer source.
pub fn fit_into(src: &[f32], out: &mut [f32], crop: Crop, rng: &mut SplitMix64) -> usize {
    let len = out.len();
    if src.len() <= len {
        out[..src.len()].copy_from_slice(src);
        out[src.len()..].fill(0.0);
        return src.len();
    }
    let extra = src.len() - len;
    let start = match crop {
        Crop::Center => extra / 2,
        Crop::Random => rng.below(extra as u64 + 1) as usize,
        Crop::Start => 0,
    };
    out.copy_from_slice(&src[start..start + len]);
    len
}

/// `src` fitted to `len` samples (see [`fit_into`]): `(clip, real length)`.
pub fn fit(src: &[f32], len: usize, crop: Crop, rng: &mut SplitMix64) -> (Vec<f32>, usize) {
    let mut out = vec![0.0; len];
    let n = fit_into(src, &mut out, crop, rng);
    (out, n)
}

/// Normalises `clip[..length]` in place; samples past `length` are left untouched.
pub fn normalize(clip: &mut [f32], length: usize, how: Normalize) {
    let n = length.min(clip.len());
    let real = &mut clip[..n];
    if real.is_empty() {
        return;
    }
    match how {
        Normalize::None => {}
        Normalize::Peak => {
            let peak = real.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if peak > 0.0 {
                let inv = 1.0 / peak;
                real.iter_mut().for_each(|v| *v *= inv);
            }
        }
        Normalize::Standardize => {
            let n = real.len() as f64;
            let mean = real.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = real
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            let inv = 1.0 / (var.sqrt() + 1e-5);
            real.iter_mut()
                .for_each(|v| *v = ((f64::from(*v) - mean) * inv) as f32);
        }
    }
}

/// The padding mask of rows of `len` samples with real lengths `lengths`: `1.0` where
/// `t < length`, else `0.0` (`lengths.len() × len` values).
pub fn mask(lengths: &[usize], len: usize) -> Vec<f32> {
    let mut m = Vec::with_capacity(lengths.len().saturating_mul(len));
    for &l in lengths {
        let l = l.min(len);
        m.extend(std::iter::repeat_n(1.0, l));
        m.extend(std::iter::repeat_n(0.0, len - l));
    }
    m
}

/// Samples framed for a strided embedding (see [`frame`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Framed {
    /// `batch × tokens × frame_len` values, row-major.
    pub data: Vec<f32>,
    /// Rows.
    pub batch: usize,
    /// Frames per row, `ceil(len / frame_len)`.
    pub tokens: usize,
    /// Samples per frame.
    pub frame_len: usize,
}

/// Reshapes `samples` (`B × len`, row-major) into `B × ceil(len / frame_len) × frame_len`;
/// a row whose length is not a multiple of `frame_len` gets its last frame zero-padded.
/// Errors: `len` or `frame_len` zero, `samples.len()` not a multiple of `len`, a size that
/// overflows.
pub fn frame(samples: &[f32], len: usize, frame_len: usize) -> Result<Framed> {
    ensure!(len > 0, "cannot frame rows of length 0");
    ensure!(frame_len > 0, "frame length must be > 0");
    ensure!(
        samples.len().is_multiple_of(len),
        "{} samples do not form rows of {len}",
        samples.len()
    );
    let batch = samples.len() / len;
    let tokens = len.div_ceil(frame_len);
    let row = tokens
        .checked_mul(frame_len)
        .context("framed row length overflows")?;
    let total = row
        .checked_mul(batch)
        .context("framed batch size overflows")?;
    let data = if row == len {
        samples.to_vec()
    } else {
        let mut data = vec![0.0; total];
        for (dst, src) in data.chunks_exact_mut(row).zip(samples.chunks_exact(len)) {
            dst[..len].copy_from_slice(src);
        }
        data
    };
    Ok(Framed {
        data,
        batch,
        tokens,
        frame_len,
    })
}

/// Each row's real length in frames: `ceil(length / frame_len)` (a frame with any real
/// sample counts). `frame_len` must be `> 0`.
pub fn frame_lengths(lengths: &[usize], frame_len: usize) -> Result<Vec<usize>> {
    ensure!(frame_len > 0, "frame length must be > 0");
    Ok(lengths.iter().map(|l| l.div_ceil(frame_len)).collect())
}
