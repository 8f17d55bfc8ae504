//! Helpers shared by the integration tests: writing small WAV files with `hound` and raw
//! headers by hand.
#![allow(dead_code)]

use std::f64::consts::PI;
use std::path::Path;

/// Writes integer PCM samples (`bits` 8, 16, 24 or 32; interleaved channels).
pub fn write_int(path: &Path, rate: u32, channels: u16, bits: u16, samples: &[i32]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &s in samples {
        match bits {
            8 => w.write_sample(s as i8).unwrap(),
            16 => w.write_sample(s as i16).unwrap(),
            _ => w.write_sample(s).unwrap(),
        }
    }
    w.finalize().unwrap();
}

/// Writes 32-bit float samples (interleaved channels).
pub fn write_float(path: &Path, rate: u32, channels: u16, samples: &[f32]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &s in samples {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
}

/// Writes mono 16-bit samples given as floats in [-1, 1].
pub fn write_mono16(path: &Path, rate: u32, samples: &[f32]) {
    let ints: Vec<i32> = samples
        .iter()
        .map(|&v| (v * 32767.0).round().clamp(-32768.0, 32767.0) as i32)
        .collect();
    write_int(path, rate, 1, 16, &ints);
}

/// `n` samples of `amp · sin(2π f t)` at `rate`.
pub fn sine(freq: f64, amp: f64, rate: u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|t| (amp * (2.0 * PI * freq * t as f64 / f64::from(rate)).sin()) as f32)
        .collect()
}

/// A RIFF/WAVE file by hand: a `fmt ` chunk with `format_tag`, then a `data` chunk whose
/// declared size is `declared_len` (may differ from `data.len()`).
pub fn raw_wav(
    format_tag: u16,
    channels: u16,
    rate: u32,
    bits: u16,
    data: &[u8],
    declared_len: u32,
) -> Vec<u8> {
    let block_align = channels * bits.div_ceil(8);
    let mut v = Vec::new();
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    v.extend_from_slice(b"WAVE");
    v.extend_from_slice(b"fmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&format_tag.to_le_bytes());
    v.extend_from_slice(&channels.to_le_bytes());
    v.extend_from_slice(&rate.to_le_bytes());
    v.extend_from_slice(&(rate * u32::from(block_align)).to_le_bytes());
    v.extend_from_slice(&block_align.to_le_bytes());
    v.extend_from_slice(&bits.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&declared_len.to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// Amplitude and phase-free fit of a sinusoid of `freq` Hz to `x` (rate `rate`):
/// returns `(amplitude, residual RMS)`.
pub fn fit_sine(x: &[f32], freq: f64, rate: u32) -> (f64, f64) {
    let n = x.len() as f64;
    let w = 2.0 * PI * freq / f64::from(rate);
    let (mut s, mut c) = (0.0, 0.0);
    for (t, &v) in x.iter().enumerate() {
        s += f64::from(v) * (w * t as f64).sin();
        c += f64::from(v) * (w * t as f64).cos();
    }
    let (a, b) = (2.0 * s / n, 2.0 * c / n);
    let mut res = 0.0;
    for (t, &v) in x.iter().enumerate() {
        let fit = a * (w * t as f64).sin() + b * (w * t as f64).cos();
        res += (f64::from(v) - fit).powi(2);
    }
    ((a * a + b * b).sqrt(), (res / n).sqrt())
}

/// Asserts `|a - b| <= tol` (fails on NaN).
#[track_caller]
pub fn assert_close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() <= tol, "{a} vs {b} (tolerance {tol})");
}

/// Writes `n` one-second-ish 16 kHz clips per label under `root/<label>/`: each clip is a
/// tone whose frequency encodes (label, index) so contents can be told apart.
pub fn make_label_tree(root: &Path, labels: &[&str], n: usize, len: usize) {
    for (li, l) in labels.iter().enumerate() {
        for i in 0..n {
            let f = 200.0 + 100.0 * li as f64 + 3.0 * i as f64;
            let x = sine(f, 0.3, 16_000, len);
            write_mono16(&root.join(l).join(format!("{l}_{i:03}.wav")), 16_000, &x);
        }
    }
}
