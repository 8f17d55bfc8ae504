//! The classifier: preset parameter counts, a short training run on generated tones and
//! chirps (accuracy well above chance), classify after a save/load round trip, bit-exact
//! resume through [`train`], and bad input. One model type (`SpeechCpu<f32, Cpu>`) is
//! instantiated, on short clips.

#![allow(dead_code)]

mod common;

use std::path::Path;

use common::write_mono16;
use dfdx::prelude::Cpu;
use megalodon_audio::megalodon_core::checkpoint::save_run;
use megalodon_audio::megalodon_core::params::Params;
use megalodon_audio::train::{eval_split, TrainHooks};
use megalodon_audio::{
    evaluate, param_count, train, Clips, Loader, LoaderConfig, SpeechCommands, SpeechCpu,
    SplitMix64, TrainOptions, SPEECH_COMMANDS, SPEECH_CPU,
};

type Model = SpeechCpu<f32, Cpu>;

/// 0.1 s clips: 50 tokens of 32 samples, attention in chunks of 20 tokens (partial last).
const CLIP: usize = 1600;
const CHUNK: usize = 20;

struct Quiet;
impl TrainHooks for Quiet {}

/// Class `k` of the generated set: 0 a low tone, 1 a high tone, 2 a rising chirp, 3 a
/// falling chirp; random amplitude, phase, length (60–100 % of a clip) and a little noise.
fn signal(k: usize, rng: &mut SplitMix64) -> Vec<f32> {
    let n = (CLIP as f64 * rng.range_f64(0.6, 1.0)) as usize;
    let amp = rng.range_f64(0.2, 0.8);
    let phase = rng.range_f64(0.0, std::f64::consts::TAU);
    let (f0, f1) = match k {
        0 => (300.0, 300.0),
        1 => (2000.0, 2000.0),
        2 => (300.0, 2500.0),
        _ => (2500.0, 300.0),
    };
    let jitter = rng.range_f64(0.9, 1.1);
    let mut ph = phase;
    (0..n)
        .map(|i| {
            let f = jitter * (f0 + (f1 - f0) * i as f64 / n as f64);
            ph += 2.0 * std::f64::consts::PI * f / 16_000.0;
            (amp * ph.sin() + 0.02 * rng.range_f64(-1.0, 1.0)) as f32
        })
        .collect()
}

/// A plain label tree of `per` clips for each of the first `classes` signals.
fn make_set(root: &Path, classes: usize, per: usize, seed: u64) -> Vec<String> {
    let names = ["chirp_down", "chirp_up", "high", "low"];
    let kinds = [3usize, 2, 1, 0];
    let mut rng = SplitMix64::new(seed);
    let mut labels = Vec::new();
    for (name, &k) in names.iter().zip(&kinds).filter(|(_, &k)| k < classes) {
        for i in 0..per {
            write_mono16(
                &root.join(name).join(format!("{i:03}.wav")),
                16_000,
                &signal(k, &mut rng),
            );
        }
        labels.push(name.to_string());
    }
    labels.sort();
    labels
}

fn opts(data: &Path, out: &Path) -> TrainOptions {
    TrainOptions {
        epochs: 4,
        batch: 8,
        lr: 5e-3,
        val_split: 0.25,
        clip_len: Some(CLIP),
        chunk: Some(CHUNK),
        workers: 1,
        ..TrainOptions::new(data, out)
    }
}

#[test]
fn preset_parameter_counts() {
    let labels = |n: usize| (0..n).map(|i| format!("w{i}")).collect::<Vec<_>>();
    // SC-Raw dims: ~300K parameters, counted from the config (nothing allocated)
    let sc = SpeechCommands::<f32, Cpu>::preset_conf(&SPEECH_COMMANDS, labels(10)).unwrap();
    assert_eq!((sc.frame_len, sc.tokens().unwrap()), (1, 16_000));
    assert_eq!(sc.encoder.chunk_size, 1000);
    let n = param_count(&sc, 10).unwrap();
    assert_eq!(n, 301_270, "SpeechCommands parameters");
    assert!((290_000..=310_000).contains(&n));
    // the count formula against the allocated CPU preset
    let conf = Model::preset_conf(&SPEECH_CPU, labels(7)).unwrap();
    let mut m = Model::new(&Cpu::default(), conf.clone(), 0).unwrap();
    assert_eq!(param_count(&conf, 7).unwrap(), m.num_params());
    // a preset conf for the wrong type is refused
    let e = Model::check_conf(&sc).unwrap_err().to_string();
    assert!(e.contains("frame length 1"), "{e}");
}

#[test]
fn trains_on_tones_and_chirps_and_classifies_after_reload() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let labels = make_set(data.path(), 4, 28, 1);
    let dev = Cpu::default();
    let o = TrainOptions {
        epochs: 5,
        ..opts(data.path(), out.path())
    };
    let s = train::<Model, Cpu>(&dev, &SPEECH_CPU, &o, &mut Quiet).unwrap();
    let r = s.last_eval.expect("validation ran");
    println!(
        "{} steps in {:.1}s ({:.1} clips/s); val accuracy {:.1}%, loss {:.3}",
        s.logs.len(),
        s.seconds,
        s.train_clips_per_second,
        100.0 * r.accuracy(),
        r.mean_loss()
    );
    assert_eq!(r.total(), 28); // 7 per label
    assert!(
        r.accuracy() >= 0.75,
        "accuracy {} not well above chance (0.25)",
        r.accuracy()
    );
    for f in ["metrics.csv", "run.json", "loss.png", "latest"] {
        assert!(out.path().join(f).exists(), "{f} missing");
    }

    // reload: eval on the same split gives the same accuracy; classify agrees with the logits
    let m = Model::load(out.path()).unwrap();
    assert_eq!(m.labels(), labels.as_slice());
    let (folder, split) = eval_split(data.path(), 0.25, 0).unwrap();
    assert_eq!(split, "validation");
    let mut lc = LoaderConfig::ordered(Clips::eval(), 16);
    lc.decode.clip = m.conf.eval_clip();
    let loader = Loader::new(folder.clone(), lc).unwrap();
    let r2 = evaluate(&loader, m.labels(), |x, l, n| m.logits_host(x, l, n)).unwrap();
    assert_eq!(r2.confusion, r.confusion);
    let mut rng = SplitMix64::new(99);
    let mut right = 0;
    for k in 0..4 {
        let wave = signal(k, &mut rng);
        let ranked = m.classify(&wave, 16_000).unwrap();
        let total: f32 = ranked.iter().map(|x| x.1).sum();
        assert!((total - 1.0).abs() < 1e-4);
        let want = ["low", "high", "chirp_up", "chirp_down"][k];
        right += usize::from(ranked[0].0 == want);
    }
    assert!(right >= 3, "classify got {right}/4 fresh signals right");
    // the same clip at 8 kHz (resampled to 16 kHz by classify) gets the same top label
    let wave = signal(1, &mut rng);
    let half: Vec<f32> = wave.iter().step_by(2).copied().collect();
    let a = m.classify(&wave, 16_000).unwrap();
    let b = m.classify(&half, 8_000).unwrap();
    assert_eq!(a[0].0, b[0].0);
}

#[test]
fn classify_after_save_and_load_is_identical() {
    let dev = Cpu::default();
    let labels = vec!["a".to_string(), "b".to_string(), "c".to_string()];
    let mut conf = Model::preset_conf(&SPEECH_CPU, labels).unwrap();
    conf.clip_len = CLIP;
    conf.encoder.chunk_size = CHUNK;
    let mut m = Model::new(&dev, conf.clone(), 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_run(dir.path(), &conf, &mut m).unwrap();
    let back = Model::load(dir.path()).unwrap();
    assert_eq!(back.conf, conf);
    let wave = signal(2, &mut SplitMix64::new(3));
    let (x, y) = (
        m.classify(&wave, 16_000).unwrap(),
        back.classify(&wave, 16_000).unwrap(),
    );
    assert_eq!(x, y);
    // a different seed gives different probabilities (the comparison can fail)
    let other = Model::new(&dev, conf, 6).unwrap();
    assert_ne!(other.classify(&wave, 16_000).unwrap(), x);
}

/// Every parameter's values by name.
fn params(m: &mut Model) -> Vec<(String, Vec<f32>)> {
    megalodon_audio::megalodon_core::params::param_values(m).unwrap()
}

#[test]
fn resume_through_train_is_bit_exact() {
    let data = tempfile::tempdir().unwrap();
    make_set(data.path(), 2, 10, 2);
    let dev = Cpu::default();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let base = |out: &Path| TrainOptions {
        epochs: 2,
        batch: 4,
        clip_len: Some(800),
        ckpt_every: Some(1),
        ..opts(data.path(), out)
    };
    let full = train::<Model, Cpu>(&dev, &SPEECH_CPU, &base(a.path()), &mut Quiet).unwrap();
    let per_epoch = full.steps / 2;
    assert!(per_epoch >= 2);
    // interrupted in the middle of epoch 2, then resumed
    let first = TrainOptions {
        stop_after: Some(per_epoch + 1),
        ..base(b.path())
    };
    train::<Model, Cpu>(&dev, &SPEECH_CPU, &first, &mut Quiet).unwrap();
    // a resume with other settings is refused, naming them
    let bad = TrainOptions {
        resume: true,
        lr: 1e-3,
        ..base(b.path())
    };
    let e = format!(
        "{:#}",
        train::<Model, Cpu>(&dev, &SPEECH_CPU, &bad, &mut Quiet).unwrap_err()
    );
    assert!(e.contains("steps") || e.contains("lr"), "{e}");
    let rest = TrainOptions {
        resume: true,
        allow_changed: vec!["steps".into()],
        ..base(b.path())
    };
    let second = train::<Model, Cpu>(&dev, &SPEECH_CPU, &rest, &mut Quiet).unwrap();
    assert_eq!(second.logs.first().unwrap().step, per_epoch + 2);
    let tail = &full.logs[full.logs.len() - second.logs.len()..];
    for (x, y) in tail.iter().zip(&second.logs) {
        assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "step {}", x.step);
    }
    let (mut ma, mut mb) = (
        Model::load(a.path()).unwrap(),
        Model::load(b.path()).unwrap(),
    );
    let (pa, pb) = (params(&mut ma), params(&mut mb));
    assert_eq!(pa.len(), pb.len());
    for ((na, va), (nb, vb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        let same = va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "parameter {na} differs after the resumed run");
    }
    let state = |d: &Path| {
        let latest = std::fs::read_to_string(d.join("latest")).unwrap();
        std::fs::read_to_string(d.join(latest.trim()).join("train_state.json")).unwrap()
    };
    assert_eq!(state(a.path()), state(b.path()));
    // a non-empty --out without --resume/--force is refused
    let e = format!(
        "{:#}",
        train::<Model, Cpu>(&dev, &SPEECH_CPU, &base(a.path()), &mut Quiet).unwrap_err()
    );
    assert!(e.contains(&a.path().display().to_string()), "{e}");
}

#[test]
fn bad_input_errors_name_the_problem() {
    let dev = Cpu::default();
    let labels = vec!["a".to_string(), "b".to_string()];
    let mut conf = Model::preset_conf(&SPEECH_CPU, labels).unwrap();
    conf.clip_len = CLIP;
    let m = Model::new(&dev, conf.clone(), 0).unwrap();
    let err = |r: anyhow::Result<Vec<(String, f32)>>| format!("{:#}", r.unwrap_err());
    assert!(err(m.classify(&[], 16_000)).contains("empty"));
    assert!(err(m.classify(&[0.1, f32::NAN], 16_000)).contains("sample 1 is NaN"));
    assert!(err(m.classify(&[0.1; 10], 0)).contains("sample rate 0"));
    // wrong sizes to the host logits
    let e = format!("{:#}", m.logits_host(&[0.0; 100], &[5], 64).unwrap_err());
    assert!(e.contains("do not form clips"), "{e}");
    let e = format!("{:#}", m.logits_host(&[0.0; 64], &[0], 64).unwrap_err());
    assert!(e.contains("real length 0"), "{e}");
    // a run directory that is not one
    let empty = tempfile::tempdir().unwrap();
    let e = format!("{:#}", Model::load(empty.path()).err().unwrap());
    assert!(e.contains("not a run directory"), "{e}");
    // --init from a run of another frame length is refused, naming --init and the field
    let mut other = conf.clone();
    other.frame_len = 1;
    let e = conf.check_init(&other).unwrap_err().to_string();
    assert!(e.contains("--init") && e.contains("frame_len"), "{e}");

    // a data set with one corrupt and one truncated WAV: reported, skipped, counted
    let data = tempfile::tempdir().unwrap();
    make_set(data.path(), 2, 6, 4);
    std::fs::write(data.path().join("low/bad.wav"), b"not a RIFF file at all").unwrap();
    let good = std::fs::read(data.path().join("high/000.wav")).unwrap();
    std::fs::write(data.path().join("high/cut.wav"), &good[..60]).unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = TrainOptions {
        epochs: 1,
        batch: 7,
        val_split: 0.0,
        clip_len: Some(800),
        ..opts(data.path(), out.path())
    };
    let s = train::<Model, Cpu>(&dev, &SPEECH_CPU, &o, &mut Quiet).unwrap();
    assert_eq!(s.skipped, 2, "both bad files are counted");
    // flags
    let bad = TrainOptions {
        epochs: 0,
        ..o.clone()
    };
    let e = format!(
        "{:#}",
        train::<Model, Cpu>(&dev, &SPEECH_CPU, &bad, &mut Quiet).unwrap_err()
    );
    assert!(e.contains("--epochs"), "{e}");
    let missing = TrainOptions::new(data.path().join("nope"), out.path());
    let e = format!(
        "{:#}",
        train::<Model, Cpu>(&dev, &SPEECH_CPU, &missing, &mut Quiet).unwrap_err()
    );
    assert!(e.contains("--data") && e.contains("nope"), "{e}");
    // a folder whose WAVs are all unreadable is an error that says so
    let junk = tempfile::tempdir().unwrap();
    for l in ["x", "y"] {
        for i in 0..3 {
            let p = junk.path().join(l).join(format!("{i}.wav"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"RIFF\0\0").unwrap();
        }
    }
    let o = TrainOptions {
        val_split: 0.0,
        force: true,
        ..o
    };
    let o = TrainOptions {
        data: junk.path().to_path_buf(),
        ..o
    };
    let e = format!(
        "{:#}",
        train::<Model, Cpu>(&dev, &SPEECH_CPU, &o, &mut Quiet).unwrap_err()
    );
    assert!(e.contains("no readable WAV"), "{e}");
}
