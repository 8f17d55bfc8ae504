//! End-to-end training: the loss really falls on the long-range copy task, and a run killed
//! after a checkpoint and resumed reproduces the uninterrupted run exactly.

use dfdx::prelude::*;
use megalodon::core::fit::{fit, latest_checkpoint, FitConf};
use megalodon::core::optim::OptimConf;
use megalodon::core::presets::{Tiny, TINY_CHUNK};
use megalodon::tasks::CopyTask;

fn model(task: &CopyTask, seed: u64) -> Tiny<f32, Cpu> {
    let dev: Cpu = Default::default();
    dev.enable_cache();
    Tiny::<f32, Cpu>::new(
        &dev,
        Tiny::<f32, Cpu>::default_conf(TINY_CHUNK, task.vocab()),
        seed,
    )
    .unwrap()
}

fn params(m: &mut Tiny<f32, Cpu>) -> Vec<(String, Vec<f32>)> {
    megalodon::core::params::param_values(m).unwrap()
}

#[test]
fn copy_task_loss_falls_below_chance() {
    // 3 chunks of 8: the recalled symbols must cross two chunk boundaries
    let task = CopyTask {
        seq_len: 24,
        k: 2,
        symbols: 4,
        batch: 16,
        seed: 7,
    };
    let mut m = model(&task, 7);
    let optim = OptimConf {
        lr: 5e-3,
        warmup: 20,
        max_steps: 200,
        weight_decay: 0.0,
        ..OptimConf::default()
    };
    let fc = FitConf {
        steps: 200,
        ckpt_every: 0,
        out: None,
        seed: 7,
        ..FitConf::default()
    };
    let logs = fit(&mut m, optim, &fc, |s| task.batch(s), |_| {}).unwrap();
    let first: f64 = logs[..10].iter().map(|l| l.loss).sum::<f64>() / 10.0;
    let last: f64 = logs[logs.len() - 10..].iter().map(|l| l.loss).sum::<f64>() / 10.0;
    let chance = (task.symbols as f64).ln();
    println!(
        "copy task: first-10 mean loss {first:.3}, last-10 mean loss {last:.3}, chance {chance:.3}"
    );
    assert!(
        first > 0.8 * chance,
        "initial loss {first} should be near chance {chance}"
    );
    assert!(
        last < 0.5 * chance,
        "loss did not fall: {first} -> {last} (chance {chance})"
    );
}

#[test]
fn killed_and_resumed_run_reproduces_uninterrupted_run() {
    let task = CopyTask {
        seq_len: 20,
        k: 2,
        symbols: 4,
        batch: 4,
        seed: 3,
    };
    let optim = OptimConf {
        lr: 3e-3,
        warmup: 2,
        max_steps: 7,
        ..OptimConf::default()
    };
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();

    // uninterrupted: 7 steps
    let mut a = model(&task, 1);
    let fa = FitConf {
        steps: 7,
        ckpt_every: 3,
        out: Some(dir_a.path().to_path_buf()),
        seed: 1,
        data: task.identity(),
        ..FitConf::default()
    };
    let la = fit(&mut a, optim.clone(), &fa, |s| task.batch(s), |_| {}).unwrap();

    // "killed" at step 5, after the step-3 checkpoint: run 3 steps, keep a copy of that
    // checkpoint, run on to 5, then put the step-3 checkpoint back as the latest
    let mut b = model(&task, 1);
    let fb = FitConf {
        steps: 3,
        ckpt_every: 3,
        out: Some(dir_b.path().to_path_buf()),
        seed: 1,
        data: task.identity(),
        ..FitConf::default()
    };
    fit(&mut b, optim.clone(), &fb, |s| task.batch(s), |_| {}).unwrap();
    let saved = dir_b.path().join("saved-ckpt-3");
    copy_dir(&dir_b.path().join("ckpt-00000003"), &saved);
    let fb5 = FitConf {
        steps: 5,
        resume: true,
        allow_changed: vec!["steps".into()],
        ..fb.clone()
    };
    fit(&mut b, optim.clone(), &fb5, |s| task.batch(s), |_| {}).unwrap();
    assert!(latest_checkpoint(dir_b.path())
        .unwrap()
        .unwrap()
        .ends_with("ckpt-00000005"));
    assert!(
        !dir_b.path().join("ckpt-00000003").exists(),
        "older checkpoints are removed"
    );
    std::fs::remove_dir_all(dir_b.path().join("ckpt-00000005")).unwrap();
    std::fs::rename(&saved, dir_b.path().join("ckpt-00000003")).unwrap();
    std::fs::write(dir_b.path().join("latest"), "ckpt-00000003").unwrap();

    // resume into a differently initialised model
    let mut c = model(&task, 999);
    let fc = FitConf {
        steps: 7,
        resume: true,
        allow_changed: vec!["steps".into()],
        ..fb
    };
    let lc = fit(&mut c, optim, &fc, |s| task.batch(s), |_| {}).unwrap();
    assert_eq!(
        lc.first().unwrap().step,
        4,
        "resume must continue after the checkpointed step"
    );
    for (x, y) in la[3..].iter().zip(&lc) {
        assert_eq!(x.step, y.step);
        assert_eq!(
            x.loss.to_bits(),
            y.loss.to_bits(),
            "loss at step {} differs",
            x.step
        );
    }
    assert_eq!(
        params(&mut a),
        params(&mut c),
        "resumed weights differ from the uninterrupted run"
    );
    // the whole training state (step, tokens seen, last loss, seed) is the same
    let state = |d: &std::path::Path| {
        std::fs::read_to_string(d.join("ckpt-00000007").join("train_state.json")).unwrap()
    };
    assert_eq!(state(dir_a.path()), state(dir_b.path()));
    assert!(state(dir_a.path()).contains("\"tokens_seen\": 560"));
    for d in [dir_a.path(), dir_b.path()] {
        let text = std::fs::read_to_string(d.join("metrics.csv")).unwrap();
        let steps: Vec<&str> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap())
            .collect();
        assert_eq!(
            steps,
            ["1", "2", "3", "4", "5", "6", "7"],
            "metrics.csv of {}",
            d.display()
        );
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn copy_task_settings_are_checked() {
    let ok = CopyTask {
        seq_len: 8,
        k: 3,
        symbols: 4,
        batch: 2,
        seed: 0,
    };
    ok.validate().unwrap();
    let e = |t: CopyTask| format!("{:#}", t.batch(1).unwrap_err());
    assert!(e(CopyTask { symbols: 0, ..ok }).contains("--symbols"));
    assert!(e(CopyTask { seq_len: 7, ..ok }).contains("--seq-len 7 is too short"));
    assert!(e(CopyTask {
        k: usize::MAX,
        ..ok
    })
    .contains("--k"));
    assert!(e(CopyTask {
        batch: usize::MAX,
        seq_len: 1 << 40,
        ..ok
    })
    .contains("overflows"));
}
