//! Fixed-length clips, masks, framing, normalisation and deterministic augmentation.

mod common;

use common::*;
use megalodon_audio::augment::{
    make_clip, Augment, AugmentConfig, ClipConfig, NoiseBank, NoiseLevel,
};
use megalodon_audio::clip::{fit, frame, frame_lengths, mask, normalize, Crop, Normalize};
use megalodon_audio::rng::SplitMix64;

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i + 1) as f32).collect()
}

#[test]
fn pad_and_crop() {
    let mut rng = SplitMix64::new(1);
    let (c, n) = fit(&ramp(3), 5, Crop::Random, &mut rng);
    assert_eq!((c, n), (vec![1.0, 2.0, 3.0, 0.0, 0.0], 3));
    let (c, n) = fit(&ramp(10), 4, Crop::Center, &mut rng);
    assert_eq!((c, n), (vec![4.0, 5.0, 6.0, 7.0], 4));
    let (c, _) = fit(&ramp(10), 4, Crop::Start, &mut rng);
    assert_eq!(c, vec![1.0, 2.0, 3.0, 4.0]);
    // Random crops: contiguous windows at every offset 0..=6, reproducible per seed.
    let mut starts = std::collections::BTreeSet::new();
    for seed in 0..200 {
        let (c, n) = fit(&ramp(10), 4, Crop::Random, &mut SplitMix64::new(seed));
        assert_eq!(n, 4);
        assert!(c.windows(2).all(|w| w[1] == w[0] + 1.0), "{c:?}");
        starts.insert(c[0] as usize - 1);
        assert_eq!(
            fit(&ramp(10), 4, Crop::Random, &mut SplitMix64::new(seed)).0,
            c
        );
    }
    assert_eq!(
        starts.into_iter().collect::<Vec<_>>(),
        (0..=6).collect::<Vec<_>>()
    );
}

#[test]
fn mask_and_frames() {
    assert_eq!(
        mask(&[2, 0, 3], 3),
        vec![1., 1., 0., 0., 0., 0., 1., 1., 1.]
    );
    let x: Vec<f32> = (0..20).map(|v| v as f32).collect(); // 2 rows of 10
    let f = frame(&x, 10, 4).unwrap();
    assert_eq!((f.batch, f.tokens, f.frame_len), (2, 3, 4));
    assert_eq!(
        &f.data[..12],
        &[0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 0., 0.]
    );
    assert_eq!(&f.data[12..16], &[10., 11., 12., 13.]);
    let g = frame(&x, 10, 5).unwrap();
    assert_eq!((g.tokens, g.data.clone()), (2, x.clone()));
    assert_eq!(frame_lengths(&[10, 9, 1, 0], 4).unwrap(), vec![3, 3, 1, 0]);
    assert!(frame(&x, 10, 0).is_err());
    assert!(frame(&x, 7, 2).is_err());
    assert!(frame(&x, 0, 2).is_err());
    // 16 samples per token on 1 s clips: 1000 tokens.
    let one = vec![0.5f32; 3 * 16_000];
    let f = frame(&one, 16_000, 16).unwrap();
    assert_eq!((f.batch, f.tokens, f.data.len()), (3, 1000, 48_000));
}

#[test]
fn normalisation_leaves_padding() {
    let mut c = vec![0.5, -0.25, 0.1, 0.0, 0.0];
    normalize(&mut c, 3, Normalize::Peak);
    assert_eq!(c, vec![1.0, -0.5, 0.2, 0.0, 0.0]);
    let mut c = vec![1.0, 2.0, 3.0, 4.0, 0.0, 0.0];
    normalize(&mut c, 4, Normalize::Standardize);
    let mean: f32 = c[..4].iter().sum::<f32>() / 4.0;
    let var: f32 = c[..4].iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
    assert_close(f64::from(mean), 0.0, 1e-6);
    assert_close(f64::from(var), 1.0, 1e-4);
    assert_eq!(&c[4..], &[0.0, 0.0]);
}

fn only(cfg: AugmentConfig, noise: NoiseBank) -> Augment {
    Augment::new(cfg, noise).unwrap()
}

fn off() -> AugmentConfig {
    AugmentConfig {
        time_shift_ms: 0.0,
        gain_db: (0.0, 0.0),
        noise_prob: 0.0,
        ..AugmentConfig::default()
    }
}

#[test]
fn gain_only_scales() {
    let x = sine(300.0, 0.2, 16_000, 8_000);
    let a = only(
        AugmentConfig {
            gain_db: (6.0, 6.0),
            ..off()
        },
        NoiseBank::default(),
    );
    let cfg = ClipConfig::eval(10_000);
    let (c, n) = make_clip(&x, &cfg, Some(&a), &mut SplitMix64::new(3));
    assert_eq!(n, 8_000);
    let g = 10f32.powf(6.0 / 20.0);
    for (o, i) in c.iter().zip(&x) {
        assert_close(f64::from(*o), f64::from(i * g), 1e-6);
    }
    assert!(c[8_000..].iter().all(|&v| v == 0.0));
}

#[test]
fn time_shift_moves_content() {
    let x = ramp(1_000);
    let a = only(
        AugmentConfig {
            time_shift_ms: 10.0,
            ..off()
        },
        NoiseBank::default(),
    ); // ±160
    let cfg = ClipConfig::eval(1_200);
    let mut shifts = std::collections::BTreeSet::new();
    for seed in 0..100 {
        let (c, n) = make_clip(&x, &cfg, Some(&a), &mut SplitMix64::new(seed));
        let first = c.iter().position(|&v| v != 0.0).unwrap();
        let s = first as i64 - (c[first] as i64 - 1);
        assert!((-160..=160).contains(&s), "shift {s}");
        // Content is the ramp moved by s; the real length follows it; padding is zero.
        assert_eq!(n as i64, 1_000 + s);
        for (t, &v) in c.iter().enumerate() {
            let src = t as i64 - s;
            let want = if (0..1_000).contains(&src) {
                (src + 1) as f32
            } else {
                0.0
            };
            assert_eq!(v, want, "seed {seed} t {t}");
        }
        shifts.insert(s);
    }
    assert!(shifts.len() > 50 && shifts.iter().any(|&s| s < 0) && shifts.iter().any(|&s| s > 0));
}

#[test]
fn noise_mixing_hits_the_snr() {
    let x = sine(440.0, 0.3, 16_000, 16_000);
    let noise: Vec<f32> = {
        let mut r = SplitMix64::new(9);
        (0..5_000).map(|_| r.range_f64(-0.5, 0.5) as f32).collect()
    };
    let a = only(
        AugmentConfig {
            noise_prob: 1.0,
            noise_level: NoiseLevel::SnrDb {
                min: 10.0,
                max: 10.0,
            },
            ..off()
        },
        NoiseBank::from_clips(vec![noise]),
    );
    let (c, n) = make_clip(
        &x,
        &ClipConfig::eval(16_000),
        Some(&a),
        &mut SplitMix64::new(4),
    );
    assert_eq!(n, 16_000);
    let p_sig: f64 = x.iter().map(|&v| f64::from(v).powi(2)).sum();
    let p_noise: f64 = c
        .iter()
        .zip(&x)
        .map(|(&o, &i)| f64::from(o - i).powi(2))
        .sum();
    let snr = 10.0 * (p_sig / p_noise).log10();
    assert_close(snr, 10.0, 0.05);
    // Probability 0: untouched.
    let b = only(
        AugmentConfig {
            noise_prob: 0.0,
            ..*a.config()
        },
        a.noise().clone(),
    );
    let (c0, _) = make_clip(
        &x,
        &ClipConfig::eval(16_000),
        Some(&b),
        &mut SplitMix64::new(4),
    );
    assert_eq!(c0, x);
}

#[test]
fn augmentation_is_deterministic_and_keeps_padding_zero() {
    let noise = NoiseBank::from_clips(vec![
        sine(97.0, 0.4, 16_000, 3_000),
        sine(1234.0, 0.2, 16_000, 7_000),
    ]);
    let a = only(AugmentConfig::default(), noise);
    let x = sine(300.0, 0.3, 16_000, 12_000);
    let cfg = ClipConfig {
        normalize: Normalize::Peak,
        ..ClipConfig::train(16_000)
    };
    let (c1, n1) = make_clip(&x, &cfg, Some(&a), &mut SplitMix64::from_keys(&[5, 0, 17]));
    let (c2, n2) = make_clip(&x, &cfg, Some(&a), &mut SplitMix64::from_keys(&[5, 0, 17]));
    assert_eq!((&c1, n1), (&c2, n2));
    let (c3, _) = make_clip(&x, &cfg, Some(&a), &mut SplitMix64::from_keys(&[5, 1, 17]));
    assert_ne!(c1, c3);
    assert!(c1.iter().all(|v| v.is_finite()));
    assert!(c1[n1..].iter().all(|&v| v == 0.0));
    // Longer clips are randomly cropped; all outputs have the configured length.
    let long = sine(300.0, 0.3, 16_000, 40_000);
    let (c4, n4) = make_clip(&long, &cfg, Some(&a), &mut SplitMix64::new(1));
    assert_eq!(c4.len(), 16_000);
    assert!((16_000 - 1_600..=16_000).contains(&n4));
    // Bad settings are refused.
    assert!(Augment::new(
        AugmentConfig {
            noise_prob: 1.5,
            ..off()
        },
        NoiseBank::default()
    )
    .is_err());
    assert!(Augment::new(
        AugmentConfig {
            gain_db: (3.0, -3.0),
            ..off()
        },
        NoiseBank::default()
    )
    .is_err());
    assert!(Augment::new(
        AugmentConfig {
            time_shift_ms: f32::NAN,
            ..off()
        },
        NoiseBank::default()
    )
    .is_err());
}

#[test]
fn noise_bank_skips_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("white.wav");
    write_mono16(&good, 8_000, &sine(100.0, 0.3, 8_000, 4_000));
    let bad = dir.path().join("broken.wav");
    std::fs::write(&bad, b"RIFF....garbage").unwrap();
    let silent = dir.path().join("silent.wav");
    write_mono16(&silent, 16_000, &[0.0; 100]);
    let bank = NoiseBank::load(
        &[good.clone(), bad.clone(), silent.clone()],
        &Default::default(),
    );
    assert_eq!(bank.len(), 1);
    assert_eq!(bank.names(), [good]);
    assert_eq!(bank.skipped(), [bad, silent]);
    assert_eq!(bank.clip(0).unwrap().len(), 8_000); // resampled to 16 kHz
}
