//! WAV reading: any PCM or float WAV to mono `f32` samples in `[-1, 1]` at 16 kHz.
//!
//! * **Encodings** (read with `hound`): integer PCM of 8, 16, 24 or 32 bits (also 24-bit in a
//!   4-byte container, and `WAVE_FORMAT_EXTENSIBLE` headers), and 32-bit IEEE float. Integer
//!   samples are divided by `2^(bits-1)`, so they land in `[-1, 1)`; float samples are taken
//!   as they are and must be finite (a NaN or infinite sample is an error). Compressed
//!   encodings (A-law, µ-law, ADPCM, ...) and 64-bit float are "unsupported format" errors.
//! * **Channels**: several channels are down-mixed to mono by averaging each frame.
//! * **Sample rate**: a rate other than [`ReadOptions::target_rate`] (16 kHz by default) is
//!   resampled with `rubato`'s synchronous FFT resampler ([`resample`]), whose anti-aliasing
//!   filter removes what lies above the new Nyquist frequency. The output has
//!   `ceil(frames · target / source)` samples, aligned with the input (the resampler's delay
//!   is trimmed).
//! * **Bad input**: every error names the file (or the stream name given to
//!   [`decode_wav`]): not a RIFF/WAVE file, a truncated file (the header declares more sample
//!   bytes than the file holds), an unsupported encoding, zero channels or zero frames, a
//!   sample rate outside [`MIN_SAMPLE_RATE`]`..=`[`MAX_SAMPLE_RATE`], a clip longer than
//!   [`ReadOptions::max_seconds`]. Sizes read from the header are checked before anything is
//!   allocated from them: the sample buffer grows as samples are actually read, starting from
//!   a capacity bounded by the duration limit.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

/// Sample rate every clip is brought to by default (Speech Commands' rate).
pub const TARGET_RATE: u32 = 16_000;
/// Lowest sample rate accepted from a file.
pub const MIN_SAMPLE_RATE: u32 = 1_000;
/// Highest sample rate accepted from a file.
pub const MAX_SAMPLE_RATE: u32 = 768_000;

/// Most frames preallocated from a header's declared length (1 M frames, about 4 MiB).
const INITIAL_CAPACITY: usize = 1 << 20;

/// How [`read_wav`] and [`decode_wav`] decode a file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadOptions {
    /// Rate of the returned samples, in Hz; other rates are resampled to it.
    pub target_rate: u32,
    /// Longest accepted clip, in seconds of audio; longer files are an error (a guard against
    /// huge files or absurd header sizes, checked before decoding).
    pub max_seconds: u32,
}

impl Default for ReadOptions {
    /// 16 kHz, at most 10 minutes.
    fn default() -> Self {
        Self {
            target_rate: TARGET_RATE,
            max_seconds: 600,
        }
    }
}

/// What a WAV header says (see [`wav_info`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavInfo {
    /// Sample rate in Hz.
    pub sample_rate: u32,
    /// Number of interleaved channels.
    pub channels: u16,
    /// Bits per sample (the valid bits for `WAVE_FORMAT_EXTENSIBLE`).
    pub bits_per_sample: u16,
    /// Whether the samples are IEEE floats (else integer PCM).
    pub float: bool,
    /// Frames (samples per channel) the header declares.
    pub frames: u32,
}

impl WavInfo {
    /// Duration in seconds the header declares.
    pub fn seconds(&self) -> f64 {
        f64::from(self.frames) / f64::from(self.sample_rate.max(1))
    }
}

/// Mono audio at a known sample rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    /// Mono samples in `[-1, 1]` (float sources may exceed it slightly; they are not clipped).
    pub samples: Vec<f32>,
    /// Sample rate of `samples`, in Hz.
    pub sample_rate: u32,
}

/// Reads the WAV file at `path` as mono samples at `opts.target_rate` (see the module docs).
pub fn read_wav(path: impl AsRef<Path>, opts: &ReadOptions) -> Result<Vec<f32>> {
    let path = path.as_ref();
    let file = File::open(path).with_context(|| format!("cannot open WAV {}", path.display()))?;
    let file_len = file
        .metadata()
        .with_context(|| format!("cannot stat WAV {}", path.display()))?
        .len();
    decode_inner(
        BufReader::new(file),
        Some(file_len),
        &path.display().to_string(),
        opts,
    )
    .map(|a| a.samples)
}

/// Decodes a WAV stream (e.g. an in-memory file); `name` is used in error messages. Same
/// checks as [`read_wav`] except the declared-size-versus-file-size one (a short stream is
/// still caught when its samples run out).
pub fn decode_wav(reader: impl Read, name: &str, opts: &ReadOptions) -> Result<Vec<f32>> {
    decode_inner(reader, None, name, opts).map(|a| a.samples)
}

/// Decodes a WAV stream to mono at its own sample rate (no resampling). Same checks as
/// [`decode_wav`], with the duration limit in seconds of the file's own rate.
pub fn decode_wav_native(reader: impl Read, name: &str, opts: &ReadOptions) -> Result<Audio> {
    let mut opts = *opts;
    opts.target_rate = 0; // 0: keep the native rate
    decode_inner(reader, None, name, &opts)
}

/// Reads only the header of the WAV file at `path`.
pub fn wav_info(path: impl AsRef<Path>) -> Result<WavInfo> {
    let path = path.as_ref();
    let reader =
        hound::WavReader::open(path).map_err(|e| describe(e, &path.display().to_string()))?;
    Ok(info_of(&reader))
}

fn info_of<R: Read>(reader: &hound::WavReader<R>) -> WavInfo {
    let spec = reader.spec();
    WavInfo {
        sample_rate: spec.sample_rate,
        channels: spec.channels,
        bits_per_sample: spec.bits_per_sample,
        float: spec.sample_format == hound::SampleFormat::Float,
        frames: reader.duration(),
    }
}

/// Turns a `hound` error into one that names the file and says what is wrong in plain words.
fn describe(e: hound::Error, name: &str) -> anyhow::Error {
    match e {
        // hound reports a short read as `Other("Failed to read enough bytes.")`.
        hound::Error::IoError(io)
            if io.kind() == std::io::ErrorKind::UnexpectedEof
                || io.to_string().contains("enough bytes") =>
        {
            anyhow::anyhow!("truncated or corrupt WAV {name}: the file ends early ({io})")
        }
        hound::Error::IoError(io) => anyhow::anyhow!("cannot read WAV {name}: {io}"),
        hound::Error::FormatError(msg) if msg.starts_with("bits per sample") => anyhow::anyhow!(
            "unsupported WAV format in {name}: {msg} (read: PCM 8/16/24/32-bit integer, 32-bit \
             float)"
        ),
        hound::Error::FormatError(msg) => {
            anyhow::anyhow!("corrupt or non-WAV file {name}: {msg}")
        }
        hound::Error::Unsupported => anyhow::anyhow!(
            "unsupported WAV format in {name}: only PCM 8/16/24/32-bit integer and 32-bit float \
             are read (not A-law, µ-law, ADPCM or 64-bit float)"
        ),
        other => anyhow::anyhow!("cannot decode WAV {name}: {other}"),
    }
}

/// [`decode_unguarded`] with a panic in the decoder or resampler turned into an error naming
/// the file: a malformed file must never bring down a training run.
fn decode_inner(
    reader: impl Read,
    file_len: Option<u64>,
    name: &str,
    opts: &ReadOptions,
) -> Result<Audio> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_unguarded(reader, file_len, name, opts)
    })) {
        Ok(r) => r,
        Err(_) => bail!("the WAV decoder panicked on {name} (a malformed file)"),
    }
}

fn decode_unguarded(
    reader: impl Read,
    file_len: Option<u64>,
    name: &str,
    opts: &ReadOptions,
) -> Result<Audio> {
    let mut wav = hound::WavReader::new(reader).map_err(|e| describe(e, name))?;
    let info = info_of(&wav);
    ensure!(info.channels > 0, "corrupt WAV {name}: zero channels");
    ensure!(
        (MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&info.sample_rate),
        "unsupported sample rate {} Hz in WAV {name} (accepted: {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE})",
        info.sample_rate
    );
    ensure!(
        (1..=32).contains(&info.bits_per_sample),
        "unsupported WAV format in {name}: {} bits per sample",
        info.bits_per_sample
    );
    ensure!(
        info.frames > 0,
        "zero-length audio in WAV {name}: no samples"
    );
    let max_frames = u64::from(opts.max_seconds) * u64::from(info.sample_rate);
    ensure!(
        u64::from(info.frames) <= max_frames,
        "WAV {name} is too long: {:.1} s declared ({} frames at {} Hz), the limit is {} s",
        info.seconds(),
        info.frames,
        info.sample_rate,
        opts.max_seconds
    );
    let channels = usize::from(info.channels);
    let total = wav.len() as usize; // u32 always fits in usize on supported targets
    if let Some(file_len) = file_len {
        // Each sample takes at least ceil(bits / 8) bytes of the data chunk.
        let min_bytes = u64::from(wav.len()) * u64::from(info.bits_per_sample.div_ceil(8));
        ensure!(
            min_bytes <= file_len,
            "truncated or corrupt WAV {name}: the header declares {} samples (at least \
             {min_bytes} bytes) but the file has only {file_len} bytes",
            wav.len()
        );
    }
    // The initial capacity trusts the header only up to a modest bound; beyond it the buffer
    // grows with the samples actually read.
    let mut mono = Vec::with_capacity((total / channels).min(INITIAL_CAPACITY));
    let mut acc = 0.0f32;
    let mut in_frame = 0usize;
    let inv_channels = 1.0 / channels as f32;
    let mut push = |v: f32| {
        acc += v;
        in_frame += 1;
        if in_frame == channels {
            mono.push(acc * inv_channels);
            acc = 0.0;
            in_frame = 0;
        }
    };
    if info.float {
        ensure!(
            info.bits_per_sample == 32,
            "unsupported WAV format in {name}: {}-bit float (only 32-bit float is read)",
            info.bits_per_sample
        );
        for (i, s) in wav.samples::<f32>().enumerate() {
            let v = s.map_err(|e| describe(e, name))?;
            if !v.is_finite() {
                bail!("WAV {name} holds a non-finite sample ({v}) at sample {i}");
            }
            push(v);
        }
    } else {
        let scale = 1.0 / (1u64 << (info.bits_per_sample - 1)) as f64;
        for s in wav.samples::<i32>() {
            let v = s.map_err(|e| describe(e, name))?;
            push((f64::from(v) * scale) as f32);
        }
    }
    ensure!(
        in_frame == 0,
        "truncated or corrupt WAV {name}: the last frame is incomplete"
    );
    ensure!(
        !mono.is_empty(),
        "zero-length audio in WAV {name}: no samples"
    );
    if opts.target_rate == 0 || opts.target_rate == info.sample_rate {
        return Ok(Audio {
            samples: mono,
            sample_rate: info.sample_rate,
        });
    }
    let samples = resample(&mono, info.sample_rate, opts.target_rate)
        .with_context(|| format!("resampling WAV {name}"))?;
    Ok(Audio {
        samples,
        sample_rate: opts.target_rate,
    })
}

thread_local! {
    /// One FFT resampler per (from, to) rate pair and thread: planning the FFTs costs more
    /// than resampling a one-second clip.
    static RESAMPLERS: RefCell<HashMap<(u32, u32), Fft<f32>>> = RefCell::new(HashMap::new());
}

/// Resamples mono `samples` from `from` Hz to `to` Hz with `rubato`'s FFT resampler.
///
/// Returns `ceil(len · to / from)` samples aligned with the input (the filter delay is
/// trimmed). Equal rates return a copy. Errors: a rate of 0 or above [`MAX_SAMPLE_RATE`], an
/// output length that overflows, a resampler failure.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    ensure!(
        from > 0 && to > 0 && from <= MAX_SAMPLE_RATE && to <= MAX_SAMPLE_RATE,
        "cannot resample from {from} Hz to {to} Hz: rates must be in 1..={MAX_SAMPLE_RATE}"
    );
    if from == to || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let want = (samples.len() as u64)
        .checked_mul(u64::from(to))
        .map(|n| n.div_ceil(u64::from(from)))
        .and_then(|n| usize::try_from(n).ok())
        .with_context(|| format!("resampling {} samples overflows", samples.len()))?;
    let input = InterleavedSlice::new(samples, 1, samples.len())
        .map_err(|e| anyhow::anyhow!("resampler input buffer: {e}"))?;
    let out = RESAMPLERS.with(|cell| -> Result<Vec<f32>> {
        let mut map = cell.borrow_mut();
        let resampler = match map.entry((from, to)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(
                Fft::<f32>::new(from as usize, to as usize, 1024, 1, FixedSync::Input).map_err(
                    |e| anyhow::anyhow!("cannot build a {from} -> {to} Hz resampler: {e}"),
                )?,
            ),
        };
        let out = resampler
            .process_all(&input, samples.len(), None)
            .map_err(|e| anyhow::anyhow!("resampling {from} -> {to} Hz failed: {e}"))?;
        Ok(out.take_data())
    })?;
    let mut out = out;
    out.resize(want, 0.0);
    Ok(out)
}
