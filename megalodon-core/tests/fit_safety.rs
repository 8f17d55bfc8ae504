//! The training loop never loses a run: it refuses to start over a run directory unless told,
//! checks the run's settings on resume, only deletes the checkpoint it just superseded, keeps
//! whole metrics rows, and refuses damaged checkpoints (`latest` outside the run, empty `latest`,
//! flipped bytes, absurd configs) with errors instead of panics or aborts.

use dfdx::prelude::*;
use megalodon_core::fit::{fit, latest_checkpoint, Batch, FitConf};
use megalodon_core::optim::OptimConf;
use megalodon_core::presets::{Tiny, TINY_CHUNK};
use std::path::Path;

const VOCAB: usize = 11;

fn model(seed: u64) -> Tiny<f32, Cpu> {
    let dev: Cpu = Default::default();
    Tiny::<f32, Cpu>::new(
        &dev,
        Tiny::<f32, Cpu>::default_conf(TINY_CHUNK, VOCAB),
        seed,
    )
    .unwrap()
}

fn batch(step: u64) -> anyhow::Result<Batch> {
    let (b, t) = (2, 12);
    let tokens: Vec<usize> = (0..b * t)
        .map(|i| (i * 7 + step as usize * 3) % VOCAB)
        .collect();
    let targets = tokens.iter().map(|&x| Some((x + 1) % VOCAB)).collect();
    Ok(Batch {
        tokens,
        targets,
        batch: b,
        seq_len: t,
    })
}

fn optim() -> OptimConf {
    OptimConf {
        lr: 1e-3,
        warmup: 1,
        max_steps: 10,
        ..OptimConf::default()
    }
}

fn conf(out: &Path, steps: u64) -> FitConf {
    FitConf {
        steps,
        ckpt_every: 2,
        out: Some(out.to_path_buf()),
        seed: 1,
        data: "synthetic".into(),
        ..FitConf::default()
    }
}

fn run(_out: &Path, fc: &FitConf) -> anyhow::Result<usize> {
    let mut m = model(1);
    Ok(fit(&mut m, optim(), fc, batch, |_| {})?.len())
}

fn err(r: anyhow::Result<usize>) -> String {
    format!("{:#}", r.expect_err("must fail"))
}

#[test]
fn a_run_directory_is_never_started_over_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run(&out, &conf(&out, 4)).unwrap();
    let before = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    // without --resume or --force: refused, nothing touched
    let e = err(run(&out, &conf(&out, 4)));
    assert!(e.contains("is not empty") && e.contains("--resume"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.csv")).unwrap(),
        before
    );
    assert!(latest_checkpoint(&out)
        .unwrap()
        .unwrap()
        .ends_with("ckpt-00000004"));
    // --resume with nothing to resume in a non-empty directory: refused
    let stray = dir.path().join("stray");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("notes.txt"), "mine").unwrap();
    let e = err(run(
        &stray,
        &FitConf {
            resume: true,
            ..conf(&stray, 4)
        },
    ));
    assert!(e.contains("nothing to resume"), "{e}");
    // --resume on a directory that does not exist yet starts afresh
    let fresh = dir.path().join("fresh");
    let n = run(
        &fresh,
        &FitConf {
            resume: true,
            ..conf(&fresh, 2)
        },
    )
    .unwrap();
    assert_eq!(n, 2);
    // --force starts over; a checkpoint the new run did not supersede is kept
    let keep = out.join("ckpt-00000099");
    std::fs::create_dir_all(&keep).unwrap();
    run(
        &out,
        &FitConf {
            force: true,
            ..conf(&out, 2)
        },
    )
    .unwrap();
    assert!(
        keep.exists(),
        "a checkpoint that was not superseded was deleted"
    );
    assert!(
        !out.join("ckpt-00000004").exists(),
        "the superseded checkpoint stays"
    );
    let rows = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(rows.lines().count(), 3, "{rows}");
}

#[test]
fn resume_checks_the_run_settings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    run(out, &conf(out, 2)).unwrap();
    let resume = |fc: FitConf, o: OptimConf| {
        let mut m = model(1);
        fit(&mut m, o, &FitConf { resume: true, ..fc }, batch, |_| {}).map(|l| l.len())
    };
    let e = err(resume(
        conf(out, 4),
        OptimConf {
            lr: 2e-3,
            ..optim()
        },
    ));
    assert!(e.contains("`optim.lr`") && e.contains("`steps`"), "{e}");
    let e = err(resume(
        FitConf {
            data: "other data".into(),
            ..conf(out, 2)
        },
        optim(),
    ));
    assert!(e.contains("`data`"), "{e}");
    let e = err(resume(
        FitConf {
            seed: 9,
            ..conf(out, 2)
        },
        optim(),
    ));
    assert!(e.contains("`seed`"), "{e}");
    // an explicitly allowed change goes through and is recorded
    let n = resume(
        FitConf {
            allow_changed: vec!["steps".into()],
            ..conf(out, 4)
        },
        optim(),
    )
    .unwrap();
    assert_eq!(n, 2);
    let run_json = std::fs::read_to_string(out.join("run.json")).unwrap();
    assert!(run_json.contains("\"steps\": 4"), "{run_json}");
}

#[test]
fn latest_must_name_a_checkpoint_inside_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run(&out, &conf(&out, 2)).unwrap();
    for (content, expect) in [
        ("", "is empty"),
        ("../elsewhere", "not a checkpoint directory inside"),
        ("/etc", "not a checkpoint directory inside"),
        ("ckpt-00000077", "does not exist"),
    ] {
        std::fs::write(out.join("latest"), content).unwrap();
        let e = format!("{:#}", latest_checkpoint(&out).unwrap_err());
        assert!(e.contains(expect), "latest = {content:?}: {e}");
        let e = err(run(
            &out,
            &FitConf {
                resume: true,
                ..conf(&out, 4)
            },
        ));
        assert!(e.contains(expect), "{e}");
    }
}

#[test]
fn flipped_bytes_and_absurd_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = model(2);
    m.save_run(dir.path()).unwrap();
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x10; // a data byte near the end
    std::fs::write(&path, &bytes).unwrap();
    let dev: Cpu = Default::default();
    let e = format!(
        "{:#}",
        Tiny::<f32, Cpu>::load_run(&dev, dir.path()).err().unwrap()
    );
    assert!(e.contains("corrupt") && e.contains("checksum"), "{e}");
    bytes[n - 5] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    Tiny::<f32, Cpu>::load_run(&dev, dir.path()).unwrap();

    // a vocabulary of 1e11 is an error before anything is allocated, not an abort
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let huge = text.replace(
        &format!("\"vocab_size\": {VOCAB}"),
        "\"vocab_size\": 100000000000",
    );
    assert_ne!(huge, text);
    std::fs::write(&cfg, &huge).unwrap();
    let e = format!(
        "{:#}",
        Tiny::<f32, Cpu>::load_run(&dev, dir.path()).err().unwrap()
    );
    assert!(e.contains("vocab_size 100000000000"), "{e}");
    // a plausible but wrong vocabulary is caught from the weights' header
    std::fs::write(
        &cfg,
        text.replace(&format!("\"vocab_size\": {VOCAB}"), "\"vocab_size\": 5000"),
    )
    .unwrap();
    let e = format!(
        "{:#}",
        Tiny::<f32, Cpu>::load_run(&dev, dir.path()).err().unwrap()
    );
    assert!(
        e.contains("embed.weight") && e.contains("[5000, 32]"),
        "{e}"
    );
    // a missing field is reported as missing; a non-finite number names its field
    std::fs::write(&cfg, text.replace("\"z_dim\": 16,", "")).unwrap();
    let e = format!(
        "{:#}",
        Tiny::<f32, Cpu>::load_run(&dev, dir.path()).err().unwrap()
    );
    assert!(e.contains("config field `z_dim` is missing"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["norm_eps"] = serde_json::json!(12345.5);
    let inf = serde_json::to_string(&v)
        .unwrap()
        .replace("12345.5", "1e400");
    assert!(inf.contains("1e400"));
    std::fs::write(&cfg, inf).unwrap();
    let e = format!(
        "{:#}",
        Tiny::<f32, Cpu>::load_run(&dev, dir.path()).err().unwrap()
    );
    assert!(
        e.contains("config.json") && e.contains("field `norm_eps`"),
        "{e}"
    );
    std::fs::write(&cfg, text.replace("\"swiglu\": false", "\"swiglu\": NaN")).unwrap();
    let e = format!(
        "{:#}",
        Tiny::<f32, Cpu>::load_run(&dev, dir.path()).err().unwrap()
    );
    assert!(e.contains("field `swiglu`"), "{e}");
}

#[test]
fn a_torn_metrics_row_is_dropped_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    run(out, &conf(out, 2)).unwrap();
    // a kill mid-write leaves half a row
    let path = out.join("metrics.csv");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("3,2.3");
    std::fs::write(&path, text).unwrap();
    let mut m = model(1);
    fit(
        &mut m,
        optim(),
        &FitConf {
            resume: true,
            allow_changed: vec!["steps".into()],
            ..conf(out, 4)
        },
        batch,
        |_| {},
    )
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let steps: Vec<&str> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(steps, ["1", "2", "3", "4"], "{text}");
    assert!(
        text.lines().skip(1).all(|l| l.split(',').count() == 5),
        "{text}"
    );
}

#[test]
fn sizes_from_users_overflow_into_errors_not_panics() {
    let m = model(3);
    let toks = vec![1usize; 8];
    let mut st = m.new_state(1);
    let e = format!(
        "{:#}",
        m.forward_in_calls(&toks, 1, 8, &[usize::MAX, 2], &mut st)
            .unwrap_err()
    );
    assert!(e.contains("overflow"), "{e}");
    let e = format!("{:#}", m.forward(&toks, usize::MAX, 2).unwrap_err());
    assert!(e.contains("overflows"), "{e}");
    let e = format!("{:#}", m.forward(&toks, 2, 3).unwrap_err());
    assert!(e.contains("expected B*T = 2*3"), "{e}");
    let e = format!("{:#}", m.forward(&[VOCAB], 1, 1).unwrap_err());
    assert!(e.contains("outside the vocabulary"), "{e}");
}
