//! The text language model end to end on the `Tiny` preset: training on real text (a slice of
//! the bundled corpus), generation through the streaming state, sampling, resume, bad input.

use dfdx::prelude::*;
use megalodon_core::golden::max_abs_diff;
use megalodon_core::presets::Tiny;
use megalodon_text::{
    LanguageModel, Sampling, TextCpu, TextModel, Tokenizer, TrainEvent, TrainOptions,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type T = Tiny<f32, Cpu>;

/// The first `bytes` bytes (cut at a line) of Hamlet, written to `dir/hamlet.txt`.
fn slice(dir: &Path, bytes: usize) -> PathBuf {
    let text =
        std::fs::read_to_string(Path::new(megalodon_text::BUNDLED_CORPUS).join("hamlet.txt"))
            .unwrap();
    let cut = text[..bytes].rfind('\n').unwrap() + 1;
    let p = dir.join("hamlet.txt");
    std::fs::write(&p, &text[..cut]).unwrap();
    p
}

/// Small, fast settings on `data`.
fn opts(out: &Path, data: &Path) -> TrainOptions {
    let mut o = TrainOptions::new(out, 16);
    o.data = Some(data.to_path_buf());
    o.vocab_size = 320;
    o.steps = 12;
    o.batch = 4;
    o.seq_len = 32;
    o.warmup = 2;
    o.eval_every = 4;
    o.ckpt_every = 4;
    o.val_tokens = 512;
    o.lr = 5e-3;
    o
}

fn quiet(_: TrainEvent) -> anyhow::Result<()> {
    Ok(())
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn short_training_on_real_text_beats_the_unigram_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = slice(tmp.path(), 60_000);
    let out = tmp.path().join("run");
    let mut o = opts(&out, &data);
    o.steps = 150;
    o.batch = 8;
    o.seq_len = 64;
    o.warmup = 15;
    o.eval_every = 50;
    o.ckpt_every = 150;
    o.val_tokens = 2048;
    o.lr = 1e-2;
    let (lm, report) = megalodon_text::train::<T>(&o, quiet).unwrap();
    let val = report.val_loss.unwrap();
    let unigram = report.info.unigram_val_loss;
    assert!(
        val < unigram - 0.5,
        "validation loss {val} is not well below the unigram loss {unigram}"
    );
    // the run directory has what the README promises
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "run.json",
        "metrics.csv",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(metrics
        .lines()
        .nth(50)
        .unwrap()
        .split(',')
        .nth(4)
        .unwrap()
        .parse::<f64>()
        .is_ok());
    // the saved run loads and scores like the returned model
    let loaded = LanguageModel::<T>::load(&out).unwrap();
    let ids = lm
        .tokenizer()
        .encode("HAMLET. To be, or not to be, that is the question.")
        .unwrap();
    let a = lm.perplexity(&ids, 1).unwrap();
    let b = loaded.perplexity(&ids, 1).unwrap();
    assert_eq!(a, b);
}

fn tiny_lm(seed: u64) -> LanguageModel<T> {
    let text =
        std::fs::read_to_string(Path::new(megalodon_text::BUNDLED_CORPUS).join("tempest.txt"))
            .unwrap();
    let tok = Tokenizer::train_bpe(&[&text[..20_000]], 300).unwrap();
    let conf = T::default_conf(16, tok.vocab_size());
    let model = T::build(&Default::default(), conf, seed).unwrap();
    LanguageModel::new(model, tok).unwrap()
}

#[test]
fn generated_logits_equal_a_full_forward() {
    let lm = tiny_lm(3);
    let v = lm.vocab_size();
    // a prompt longer than one prefill block, so prefill crosses blocks and chunks
    let prompt: Vec<usize> = (0..530).map(|i| (i * 37 + 11) % v).collect();
    let mut rows = Vec::new();
    let s = Sampling {
        temperature: 1.0,
        top_k: None,
        top_p: 1.0,
        seed: 5,
    };
    let g = lm
        .generate_ids(&prompt, 12, &s, |t| {
            rows.push(t.logits.to_vec());
            Ok(())
        })
        .unwrap();
    assert_eq!(g.ids.len(), 12);
    let mut all = prompt.clone();
    all.extend_from_slice(&g.ids[..11]);
    let full = lm.model().logits(&all, 1, all.len()).unwrap();
    let mut worst = 0f32;
    for (i, row) in rows.iter().enumerate() {
        let p = prompt.len() - 1 + i;
        let want = &full[p * v..(p + 1) * v];
        for (a, b) in row.iter().zip(want) {
            let d = (a - b).abs() / (1.0 + b.abs());
            assert!(d <= 1e-4, "step {i}: streamed {a} vs full {b}");
            worst = worst.max(d);
        }
    }
    assert!(worst.is_finite());
}

#[test]
fn seeded_generation_is_reproducible() {
    let lm = tiny_lm(4);
    let s = Sampling {
        temperature: 1.0,
        top_k: None,
        top_p: 1.0,
        seed: 9,
    };
    let a = lm.generate("To be", 30, &s, |_| Ok(())).unwrap();
    let b = lm.generate("To be", 30, &s, |_| Ok(())).unwrap();
    assert_eq!(a.ids, b.ids);
    assert_eq!(a.text, b.text);
    let c = lm
        .generate("To be", 30, &Sampling { seed: 10, ..s }, |_| Ok(()))
        .unwrap();
    assert_ne!(a.ids, c.ids);
    // the streamed text pieces add up to the decoded text
    let mut streamed = String::new();
    let d = lm
        .generate("To be", 30, &s, |t| {
            streamed.push_str(t.text);
            Ok(())
        })
        .unwrap();
    assert_eq!(streamed, d.text);
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = slice(tmp.path(), 20_000);
    let a_dir = tmp.path().join("a");
    let b_dir = tmp.path().join("b");
    let (_, a) = megalodon_text::train::<T>(&opts(&a_dir, &data), quiet).unwrap();
    // interrupted after step 6 (the last checkpoint is step 4)
    let err = megalodon_text::train::<T>(&opts(&b_dir, &data), |ev| match ev {
        TrainEvent::Step(l) if l.step == 6 => anyhow::bail!("interrupted"),
        _ => Ok(()),
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("interrupted"));
    assert_eq!(
        std::fs::read_to_string(b_dir.join("latest")).unwrap(),
        "ckpt-00000004"
    );
    let mut o = opts(&b_dir, &data);
    o.resume = true;
    let (_, b) = megalodon_text::train::<T>(&o, quiet).unwrap();
    assert_eq!(b.logs.first().unwrap().step, 5);
    let tail: Vec<_> = a.logs.iter().filter(|l| l.step >= 5).cloned().collect();
    assert_eq!(tail, b.logs);
    assert_eq!(
        std::fs::read(a_dir.join("metrics.csv")).unwrap(),
        std::fs::read(b_dir.join("metrics.csv")).unwrap()
    );
    assert_eq!(
        std::fs::read(a_dir.join("model.safetensors")).unwrap(),
        std::fs::read(b_dir.join("model.safetensors")).unwrap()
    );
}

fn err_of<X>(r: anyhow::Result<X>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_input_is_an_error_naming_the_file_or_flag_and_damages_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = slice(tmp.path(), 20_000);
    let out = tmp.path().join("run");
    let mut o = opts(&out, &data);
    o.steps = 4;
    let (lm, _) = megalodon_text::train::<T>(&o, quiet).unwrap();
    let before = snapshot(&out);

    // corpus problems
    let missing = tmp.path().join("nope.txt");
    let e = err_of(megalodon_text::train::<T>(
        &opts(&tmp.path().join("x"), &missing),
        quiet,
    ));
    assert!(e.contains("nope.txt") && e.contains("--data"), "{e}");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = err_of(megalodon_text::train::<T>(
        &opts(&tmp.path().join("x"), &empty),
        quiet,
    ));
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let latin1 = tmp.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait\n").unwrap();
    let e = err_of(megalodon_text::train::<T>(
        &opts(&tmp.path().join("x"), &latin1),
        quiet,
    ));
    assert!(e.contains("latin1.txt") && e.contains("UTF-8"), "{e}");

    // into the existing run: refused without --resume/--force
    let e = err_of(megalodon_text::train::<T>(&opts(&out, &data), quiet));
    assert!(e.contains("--out") && e.contains("--resume"), "{e}");
    // a corrupt tokenizer, even with --force
    let bad_tok = tmp.path().join("tokenizer.json");
    std::fs::write(&bad_tok, "{ not json").unwrap();
    let mut f = opts(&out, &data);
    f.force = true;
    f.tokenizer = Some(bad_tok.clone());
    let e = err_of(megalodon_text::train::<T>(&f, quiet));
    assert!(e.contains(&bad_tok.display().to_string()), "{e}");
    // --seq-len 0, even with --force
    let mut f = opts(&out, &data);
    f.force = true;
    f.seq_len = 0;
    assert!(err_of(megalodon_text::train::<T>(&f, quiet)).contains("--seq-len"));
    // resuming with other settings
    let mut f = opts(&out, &data);
    f.resume = true;
    f.seq_len = 16;
    let e = err_of(megalodon_text::train::<T>(&f, quiet));
    assert!(e.contains("run.json"), "{e}");
    assert_eq!(before, snapshot(&out), "the run directory changed");

    // a run of another preset
    let e = err_of(LanguageModel::<TextCpu<f32, Cpu>>::load(&out));
    assert!(e.contains("config.json") && e.contains("num_layers"), "{e}");
    // a tokenizer that does not fit the run
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(out.join(f), other.join(f)).unwrap();
    }
    let big = Tokenizer::train_bpe(&[std::fs::read_to_string(&data).unwrap()], 600).unwrap();
    big.save(other.join("tokenizer.json")).unwrap();
    let e = err_of(LanguageModel::<T>::load(&other));
    assert!(
        e.contains("tokenizer.json") && e.contains("vocab_size"),
        "{e}"
    );
    std::fs::write(other.join("tokenizer.json"), "[]").unwrap();
    let e = err_of(LanguageModel::<T>::load(&other));
    assert!(e.contains("tokenizer.json"), "{e}");

    // token ids out of range, empty prompt, bad sampling flags
    let v = lm.vocab_size();
    let e = err_of(lm.perplexity(&[1, 2, v + 3], 1));
    assert!(e.contains(&format!("{}", v + 3)), "{e}");
    let e = err_of(lm.generate_ids(&[v], 3, &Sampling::default(), |_| Ok(())));
    assert!(e.contains("out of range"), "{e}");
    let e = err_of(lm.generate("", 3, &Sampling::default(), |_| Ok(())));
    assert!(e.contains("--prompt"), "{e}");
    let bad = Sampling {
        top_p: 0.0,
        ..Sampling::default()
    };
    assert!(err_of(lm.generate("a", 3, &bad, |_| Ok(()))).contains("--top-p"));
    assert!(err_of(lm.perplexity(&[1, 2, 3], 3)).contains("--context"));
    assert_eq!(before, snapshot(&out), "the run directory changed");
}

/// All parameters of a language model, in visiting order.
fn params_of(lm: &mut LanguageModel<T>) -> Vec<f64> {
    megalodon_core::params::param_values(lm.model_mut())
        .unwrap()
        .into_iter()
        .flat_map(|(_, v)| v.into_iter().map(f64::from))
        .collect()
}

#[test]
fn init_fine_tunes_from_another_runs_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = slice(tmp.path(), 20_000);
    let mut o = opts(&tmp.path().join("a"), &data);
    o.steps = 4;
    let (mut a, _) = megalodon_text::train::<T>(&o, quiet).unwrap();
    // a step with a negligible learning rate leaves the starting weights visible
    let mut o = opts(&tmp.path().join("b"), &data);
    o.steps = 1;
    o.warmup = 0;
    o.lr = 1e-12;
    o.init = Some(tmp.path().join("a"));
    let (mut b, _) = megalodon_text::train::<T>(&o, quiet).unwrap();
    o.init = None;
    o.out = tmp.path().join("c");
    let (mut c, _) = megalodon_text::train::<T>(&o, quiet).unwrap();
    let pa = params_of(&mut a);
    let (db, dc) = (
        max_abs_diff(&params_of(&mut b), &pa),
        max_abs_diff(&params_of(&mut c), &pa),
    );
    assert!(
        db < 1e-6,
        "the --init run starts from run a's weights ({db})"
    );
    assert!(dc > 1e-2, "a fresh run does not ({dc})");
}

#[test]
fn int8_and_device_switches_of_the_engine() {
    let mut lm = tiny_lm(6);
    let ids = lm
        .tokenizer()
        .encode("Full fathom five thy father lies; of his bones are coral made.")
        .unwrap();
    let f32_score = lm.perplexity(&ids, 1).unwrap();
    assert!(
        lm.backend_name().contains("CPU, f32"),
        "{}",
        lm.backend_name()
    );
    lm.quantize_int8().unwrap();
    assert!(lm.backend_name().contains("int8"), "{}", lm.backend_name());
    let q = lm.perplexity(&ids, 1).unwrap();
    let rel = (q.mean_nll() - f32_score.mean_nll()).abs() / f32_score.mean_nll();
    println!(
        "tiny LM: nll f32 {:.5}, int8 {:.5} ({rel:.2e} relative)",
        f32_score.mean_nll(),
        q.mean_nll()
    );
    assert!(
        q.mean_nll().is_finite() && rel < 0.02,
        "int8 nll off by {rel}"
    );
    // the CUDA engine takes f32 weights; unknown devices name the flag
    let err = err_of(lm.engine_device("cuda").map(|_| ()));
    assert!(err.contains("--int8"), "{err}");
    let mut lm = tiny_lm(6);
    let err = err_of(lm.engine_device("gpu").map(|_| ()));
    assert!(err.contains("--device"), "{err}");
    // on a machine without CUDA, --device cuda is an error naming the flag (with one, it works)
    match lm.engine_device("cuda") {
        Err(e) => assert!(format!("{e:#}").contains("--device cuda"), "{e:#}"),
        Ok(_) => {
            let g = lm.perplexity(&ids, 1).unwrap();
            let d = (g.mean_nll() - f32_score.mean_nll()).abs();
            assert!(d < 1e-4, "CUDA engine nll differs by {d}");
        }
    }
}

/// The CUDA engine (f32, and bf16 within its tolerance) serves the text model as the CPU engine
/// does: the same perplexity and the same seeded continuation. Skips without a GPU unless
/// `MEGALODON_REQUIRE_CUDA` is set; [`cuda_engine_serves_the_lm_on_the_cpu_emulator`] runs it on
/// the CPU emulator of CUDA.
#[test]
fn cuda_engine_scores_and_generates_like_the_cpu_engine() {
    use megalodon_core::engine::cuda::Precision;
    let mut lm = tiny_lm(8);
    let ids = lm
        .tokenizer()
        .encode("Where should this music be? i' the air or the earth?")
        .unwrap();
    // seeded sampling: the logits agree to ~1e-6, so the same draws pick the same tokens
    let sampling = Sampling {
        temperature: 1.0,
        top_k: None,
        top_p: 1.0,
        seed: 1,
    };
    let cpu = lm.perplexity(&ids, 1).unwrap();
    let cpu_gen = lm
        .generate("Full fathom", 40, &sampling, |_| Ok(()))
        .unwrap();
    if let Err(err) = lm.engine_device("cuda") {
        assert!(
            std::env::var_os("MEGALODON_REQUIRE_CUDA").is_none(),
            "MEGALODON_REQUIRE_CUDA is set: {err:#}"
        );
        println!("SKIPPED: no CUDA engine here ({err:#})");
        return;
    }
    let name = lm.backend_name();
    assert!(!name.contains("engine (CPU"), "{name}");
    let gpu = lm.perplexity(&ids, 1).unwrap();
    let d = (gpu.mean_nll() - cpu.mean_nll()).abs();
    let gpu_gen = lm
        .generate("Full fathom", 40, &sampling, |_| Ok(()))
        .unwrap();
    println!(
        "{}: nll {:.6} (CPU {:.6}, |diff| {d:.2e}); sampled text {:?}",
        lm.backend_name(),
        gpu.mean_nll(),
        cpu.mean_nll(),
        gpu_gen.text
    );
    assert!(d < 1e-4, "CUDA engine nll differs by {d}");
    assert_eq!(gpu_gen.ids, cpu_gen.ids, "seeded continuations differ");
    lm.engine_device_with("cuda", Precision::Bf16).unwrap();
    let bf = lm.perplexity(&ids, 1).unwrap();
    let rel = (bf.mean_nll() - cpu.mean_nll()).abs() / cpu.mean_nll();
    println!("bf16: nll {:.6} ({rel:.2e} relative)", bf.mean_nll());
    assert!(rel < 0.02, "bf16 nll off by {rel}");
}

/// [`cuda_engine_scores_and_generates_like_the_cpu_engine`] on the CPU emulator of CUDA
/// (`kernels/emu/`): the text model's `--device cuda` path end to end without a GPU.
#[test]
fn cuda_engine_serves_the_lm_on_the_cpu_emulator() {
    use megalodon_core::engine::emulator;
    if emulator::is_child() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emulator");
    let args = [
        "--exact",
        "cuda_engine_scores_and_generates_like_the_cpu_engine",
    ];
    if let Some(passed) = emulator::rerun_tests(&dir, &args).unwrap() {
        assert_eq!(passed, 1);
    }
}
