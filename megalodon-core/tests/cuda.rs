//! The same model code on `Cuda`: golden parity (full and incremental) and a training step.
//! Built only with `--features cuda`; skips itself, saying so, when no CUDA device is present.
//! CI type-checks it with `cargo check --all-targets --features cuda,ci-check`.
#![cfg(feature = "cuda")]

use dfdx::prelude::*;
use megalodon_core::fit::{train_step, Batch};
use megalodon_core::golden::{load_params, max_abs_diff, Golden};
use megalodon_core::optim::{AdamW, OptimConf};
use megalodon_core::presets::Tiny;
use megalodon_core::util::to_f64;
use megalodon_core::ModelConf;

#[test]
fn tiny_on_cuda_matches_official_logits_and_trains() {
    let dev = match megalodon_core::device::cuda_device() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping: {e:#}");
            return;
        }
    };
    let fixtures = megalodon_core::device::fixtures_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures"
    ));
    let g = Golden::load(fixtures.join("megalodon-golden-tiny.json")).unwrap();
    let conf: ModelConf = serde_json::from_value(g.value(&["config"]).unwrap().clone()).unwrap();
    let mut m = Tiny::<f32, Cuda>::new(&dev, conf, 0).unwrap();
    load_params(&mut m, &g, &["params"]).unwrap();
    let tk = g.tensor(&["tokens"]).unwrap();
    let (b, t) = (tk.shape[0], tk.shape[1]);
    let tokens = tk.to_ids("tokens").unwrap();
    let full = to_f64(&m.forward(&tokens, b, t).unwrap());
    let d = max_abs_diff(&full, &g.tensor(&["logits_full"]).unwrap().data);
    println!("cuda full max|diff| = {d:.3e}");
    assert!(d < 1e-4);
    let mut state = m.new_state(b);
    let first = megalodon_core::util::time_slice(&tokens, b, t, 1, 0, 11);
    let l = to_f64(&m.forward_stream(&first, b, 11, &mut state).unwrap());
    let want = megalodon_core::util::time_slice(&full, b, t, 50, 0, 11);
    assert!(max_abs_diff(&l, &want) < 1e-4);

    let mut opt = AdamW::<f32, Cuda>::new(OptimConf {
        warmup: 0,
        ..OptimConf::default()
    });
    let targets: Vec<Option<usize>> = tokens
        .iter()
        .skip(1)
        .map(|&x| Some(x))
        .chain(std::iter::once(None))
        .collect();
    let batch = Batch {
        tokens: tokens.clone(),
        targets,
        batch: b,
        seq_len: t,
    };
    let l0 = train_step(&mut m, &mut opt, &batch).unwrap().loss;
    let mut l1 = l0;
    for _ in 0..20 {
        l1 = train_step(&mut m, &mut opt, &batch).unwrap().loss;
    }
    println!("cuda training: loss {l0:.4} -> {l1:.4}");
    assert!(l1 < l0);
}
