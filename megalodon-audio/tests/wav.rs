//! WAV decoding: every supported encoding, down-mixing, resampling accuracy, bad files.

mod common;

use common::*;
use megalodon_audio::wav::{decode_wav, read_wav, resample, wav_info, ReadOptions};

fn opts() -> ReadOptions {
    ReadOptions::default()
}

fn assert_samples(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "length");
    for (g, w) in got.iter().zip(want) {
        assert_close(f64::from(*g), *w, tol);
    }
}

#[test]
fn pcm16_mono_values() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.wav");
    write_int(&p, 16_000, 1, 16, &[0, 16384, -16384, 32767, -32768]);
    let x = read_wav(&p, &opts()).unwrap();
    assert_samples(&x, &[0.0, 0.5, -0.5, 32767.0 / 32768.0, -1.0], 1e-7);
}

#[test]
fn pcm8_values() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.wav");
    write_int(&p, 16_000, 1, 8, &[0, 64, -64, 127, -128]);
    let info = wav_info(&p).unwrap();
    assert_eq!(
        (info.bits_per_sample, info.channels, info.frames),
        (8, 1, 5)
    );
    let x = read_wav(&p, &opts()).unwrap();
    assert_samples(&x, &[0.0, 0.5, -0.5, 127.0 / 128.0, -1.0], 1e-7);
}

#[test]
fn pcm24_values() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.wav");
    let full = 1 << 23;
    write_int(
        &p,
        16_000,
        1,
        24,
        &[0, full / 2, -full / 4, full - 1, -full],
    );
    let x = read_wav(&p, &opts()).unwrap();
    assert_samples(
        &x,
        &[0.0, 0.5, -0.25, (full - 1) as f64 / full as f64, -1.0],
        1e-7,
    );
}

#[test]
fn pcm32_values() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.wav");
    write_int(&p, 16_000, 1, 32, &[0, 1 << 30, -(1 << 29), i32::MIN]);
    let x = read_wav(&p, &opts()).unwrap();
    assert_samples(&x, &[0.0, 0.5, -0.25, -1.0], 1e-7);
}

#[test]
fn float32_values() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.wav");
    write_float(&p, 16_000, 1, &[0.0, 0.25, -0.75, 1.0]);
    let x = read_wav(&p, &opts()).unwrap();
    assert_samples(&x, &[0.0, 0.25, -0.75, 1.0], 0.0);
}

#[test]
fn stereo_is_averaged() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s16.wav");
    // frames (L, R): (0.5, -0.25), (1/4, 1/4), (-1, 0)
    write_int(&p, 16_000, 2, 16, &[16384, -8192, 8192, 8192, -32768, 0]);
    let x = read_wav(&p, &opts()).unwrap();
    assert_samples(&x, &[0.125, 0.25, -0.5], 1e-7);
    let p = dir.path().join("f3.wav");
    write_float(&p, 16_000, 3, &[0.3, 0.6, 0.9, -0.3, 0.0, 0.0]);
    let x = read_wav(&p, &opts()).unwrap();
    assert_samples(&x, &[0.6, -0.1], 1e-6);
}

#[test]
fn sine_from_8khz_keeps_amplitude_and_frequency() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s8k.wav");
    write_float(&p, 8_000, 1, &sine(440.0, 0.5, 8_000, 8_000));
    let x = read_wav(&p, &opts()).unwrap();
    assert_eq!(x.len(), 16_000, "1 s at 8 kHz is 16000 samples at 16 kHz");
    // Away from the edges (filter ramp), the output is the same 440 Hz sine at 16 kHz.
    let mid = &x[2_000..14_000];
    let (amp, res) = fit_sine(mid, 440.0, 16_000);
    assert_close(amp, 0.5, 0.005);
    assert!(res < 0.005, "residual RMS {res}: not a clean 440 Hz sine");
    // Aligned with the input: the phase is that of sin(2π·440·t/16000) at sample 0.
    let ideal = sine(440.0, 0.5, 16_000, 16_000);
    let err = x[2_000..14_000]
        .iter()
        .zip(&ideal[2_000..14_000])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(err < 0.01, "max deviation from the ideal 16 kHz sine {err}");
}

#[test]
fn sine_from_44k1_stereo_pcm16_and_aliasing_removed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s44.wav");
    // Left: 1 kHz at 0.6, right: same tone plus a 10 kHz tone above the new Nyquist (8 kHz).
    let n = 22_050; // 0.5 s
    let a = sine(1_000.0, 0.6, 44_100, n);
    let hi = sine(10_000.0, 0.3, 44_100, n);
    let mut inter = Vec::with_capacity(2 * n);
    for t in 0..n {
        inter.push((a[t] * 32767.0).round() as i32);
        inter.push(((a[t] + hi[t]) * 32767.0).round() as i32);
    }
    write_int(&p, 44_100, 2, 16, &inter);
    let x = read_wav(&p, &opts()).unwrap();
    assert_eq!(x.len(), 8_000, "ceil(22050 · 16000 / 44100)");
    let mid = &x[1_000..7_000];
    let (amp, res) = fit_sine(mid, 1_000.0, 16_000);
    assert_close(amp, 0.6, 0.006);
    // The 10 kHz part (0.15 after down-mix) must be filtered out, not folded to 6 kHz.
    let (alias, _) = fit_sine(mid, 6_000.0, 16_000);
    assert!(
        alias < 0.003,
        "aliased 10 kHz tone at 6 kHz with amplitude {alias}"
    );
    assert!(res < 0.005, "residual RMS {res}");
}

#[test]
fn resample_lengths_and_identity() {
    let x = sine(300.0, 0.5, 22_050, 1_000);
    assert_eq!(resample(&x, 22_050, 22_050).unwrap(), x);
    assert_eq!(resample(&x, 22_050, 16_000).unwrap().len(), 726); // ceil(1000·16000/22050)
    assert_eq!(resample(&x, 11_025, 16_000).unwrap().len(), 1452);
    assert!(resample(&x, 0, 16_000).is_err());
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, bytes: &[u8], needle: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = format!("{:#}", read_wav(&p, &opts()).unwrap_err());
        assert!(
            e.contains(name),
            "{name}: error does not name the file: {e}"
        );
        assert!(
            e.to_lowercase().contains(needle),
            "{name}: expected '{needle}' in: {e}"
        );
    };
    check(
        "text.wav",
        b"this is not a wav file at all, just text",
        "corrupt or non-wav",
    );
    check("empty.wav", b"", "truncated");
    // A valid header declaring 1000 samples, then only 10 bytes of data.
    check(
        "trunc.wav",
        &raw_wav(1, 1, 16_000, 16, &[0u8; 10], 2_000),
        "truncated",
    );
    // Absurd data size (4 GB declared) in a tiny file: rejected before any allocation.
    check(
        "huge.wav",
        &raw_wav(1, 1, 16_000, 16, &[0u8; 8], 0xFFFF_FFF0),
        "too long",
    );
    check(
        "zero.wav",
        &raw_wav(1, 1, 16_000, 16, &[], 0),
        "zero-length",
    );
    check(
        "alaw.wav",
        &raw_wav(6, 1, 8_000, 8, &[0u8; 100], 100),
        "unsupported",
    );
    check(
        "f64.wav",
        &raw_wav(3, 1, 16_000, 64, &[0u8; 80], 80),
        "unsupported",
    );
    check(
        "rate.wav",
        &raw_wav(1, 1, 10, 16, &[0u8; 20], 20),
        "sample rate",
    );
    let nan: Vec<u8> = [0.1f32, f32::NAN, 0.2]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    check(
        "nan.wav",
        &raw_wav(3, 1, 16_000, 32, &nan, 12),
        "non-finite",
    );
    let e = format!(
        "{:#}",
        read_wav(dir.path().join("missing.wav"), &opts()).unwrap_err()
    );
    assert!(e.contains("missing.wav"), "{e}");
}

#[test]
fn truncated_stream_and_duration_limit() {
    // Through a stream (no file size known) a short data chunk still fails at its end.
    let bytes = raw_wav(1, 1, 16_000, 16, &[0u8; 10], 2_000);
    let e = format!(
        "{:#}",
        decode_wav(&bytes[..], "mem.wav", &opts()).unwrap_err()
    );
    assert!(e.contains("mem.wav") && e.contains("truncated"), "{e}");
    // A 3 s clip with a 2 s limit.
    let data = vec![0u8; 16_000 * 2 * 3];
    let bytes = raw_wav(1, 1, 16_000, 16, &data, data.len() as u32);
    let short = ReadOptions {
        max_seconds: 2,
        ..opts()
    };
    let e = format!(
        "{:#}",
        decode_wav(&bytes[..], "long.wav", &short).unwrap_err()
    );
    assert!(e.contains("long.wav") && e.contains("too long"), "{e}");
    assert_eq!(
        decode_wav(&bytes[..], "ok.wav", &opts()).unwrap().len(),
        48_000
    );
}

#[test]
fn mutated_files_never_panic() {
    use megalodon_audio::rng::SplitMix64;
    // Valid files of several formats, then random byte flips, truncations and header edits:
    // every outcome must be Ok (finite samples) or an error naming the stream.
    let mut bases = Vec::new();
    let ints: Vec<u8> = (0..400u32)
        .flat_map(|i| ((i * 97) as i16).to_le_bytes())
        .collect();
    bases.push(raw_wav(1, 2, 44_100, 16, &ints, ints.len() as u32));
    bases.push(raw_wav(1, 1, 8_000, 8, &ints[..300], 300));
    bases.push(raw_wav(1, 1, 16_000, 24, &ints[..600], 600));
    let floats: Vec<u8> = (0..200)
        .flat_map(|i| (i as f32 / 400.0).to_le_bytes())
        .collect();
    bases.push(raw_wav(3, 1, 22_050, 32, &floats, floats.len() as u32));
    let mut rng = SplitMix64::new(2024);
    let opts = ReadOptions {
        max_seconds: 5,
        ..ReadOptions::default()
    };
    let (mut ok, mut err) = (0, 0);
    for round in 0..3_000 {
        let mut b = bases[round % bases.len()].clone();
        match rng.below(3) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] = rng.next_u64() as u8;
                }
            }
            1 => b.truncate(rng.below(b.len() as u64) as usize),
            _ => {
                // Edit a header byte (the first 44 bytes hold every size field).
                let i = rng.below(44) as usize;
                b[i] = rng.next_u64() as u8;
            }
        }
        match decode_wav(&b[..], "fuzz.wav", &opts) {
            Ok(x) => {
                assert!(x.iter().all(|v| v.is_finite()));
                ok += 1;
            }
            Err(e) => {
                assert!(format!("{e:#}").contains("fuzz.wav"), "{e:#}");
                err += 1;
            }
        }
    }
    assert!(
        ok > 100 && err > 100,
        "ok {ok}, err {err}: mutations too weak or too strong"
    );
}
