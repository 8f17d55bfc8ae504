//! Checkpoints with the official state-dict keys: round trips, loading a file laid out exactly
//! like an official PyTorch export, and clear errors for mismatched configs and weights.

use ::safetensors::tensor::{Dtype as StDtype, TensorView};
use dfdx::prelude::*;
use megalodon_core::checkpoint::{load_run_weights, save_run};
use megalodon_core::golden::{load_params, max_abs_diff, Golden};
use megalodon_core::presets::Tiny;
use megalodon_core::util::to_f64;
use megalodon_core::ModelConf;
use std::collections::BTreeSet;
use std::path::Path;

fn fixture(name: &str) -> Golden {
    Golden::load(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn golden_model(g: &Golden) -> Tiny<f32, Cpu> {
    let conf: ModelConf = serde_json::from_value(g.value(&["config"]).unwrap().clone()).unwrap();
    let mut m = Tiny::<f32, Cpu>::new(&Cpu::default(), conf, 0).unwrap();
    load_params(&mut m, g, &["params"]).unwrap();
    m
}

/// Writes the golden `params` (the official state_dict) as a safetensors file, the way
/// `safetensors.torch.save_file(model.state_dict())` would: f32 tensors and int64 scalars.
fn export_like_torch(g: &Golden, path: &Path) {
    let params = g.value(&["params"]).unwrap().as_object().unwrap();
    let mut bufs: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, v) in params {
        let t = megalodon_core::golden::parse_tensor(v).unwrap();
        let dtype = v["dtype"].as_str().unwrap();
        let (dt, bytes) = if dtype == "int64" {
            (
                StDtype::I64,
                t.data
                    .iter()
                    .flat_map(|&x| (x as i64).to_le_bytes())
                    .collect(),
            )
        } else {
            (
                StDtype::F32,
                t.data
                    .iter()
                    .flat_map(|&x| (x as f32).to_le_bytes())
                    .collect(),
            )
        };
        bufs.push((k.clone(), dt, t.shape.clone(), bytes));
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(k, dt, s, b)| (k.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    ::safetensors::tensor::serialize_to_file(views, &None, path).unwrap();
}

fn file_keys(path: &Path) -> BTreeSet<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.names().into_iter().cloned().collect()
}

fn check_official_layout(file: &str) {
    let g = fixture(file);
    let mut m = golden_model(&g);
    let (tok, b, t) = {
        let tk = g.tensor(&["tokens"]).unwrap();
        (
            tk.data.iter().map(|&x| x as usize).collect::<Vec<_>>(),
            tk.shape[0],
            tk.shape[1],
        )
    };
    let want = to_f64(&m.forward(&tok, b, t).unwrap());
    let dir = tempfile::tempdir().unwrap();

    // our files carry exactly the official key set (params, buffers, tied alias)
    m.save_run(dir.path()).unwrap();
    let official: BTreeSet<String> = g
        .value(&["params"])
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(file_keys(&dir.path().join("model.safetensors")), official);
    let back = Tiny::<f32, Cpu>::load_run(&Cpu::default(), dir.path()).unwrap();
    assert_eq!(
        to_f64(&back.forward(&tok, b, t).unwrap()),
        want,
        "round trip must be bit exact"
    );

    // a torch-style export of the official state_dict loads without renaming
    let exported = dir.path().join("torch_export.safetensors");
    export_like_torch(&g, &exported);
    std::fs::rename(&exported, dir.path().join("model.safetensors")).unwrap();
    let mut fresh = Tiny::<f32, Cpu>::new(&Cpu::default(), m.conf().clone(), 123).unwrap();
    load_run_weights(dir.path(), &mut fresh).unwrap();
    let d = max_abs_diff(
        &to_f64(&fresh.forward(&tok, b, t).unwrap()),
        &g.tensor(&["logits_full"]).unwrap().data,
    );
    assert!(
        d < 1e-4,
        "{file}: logits after loading the export differ by {d}"
    );
}

#[test]
fn official_layout_plain() {
    check_official_layout("megalodon-golden-tiny.json");
}

#[test]
fn official_layout_swiglu_tied() {
    check_official_layout("model_swiglu.json");
}

#[test]
fn config_mismatch_names_the_field() {
    let g = fixture("megalodon-golden-tiny.json");
    let mut m = golden_model(&g);
    let dir = tempfile::tempdir().unwrap();
    m.save_run(dir.path()).unwrap();
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"model_dim\": 32", "\"model_dim\": 64");
    std::fs::write(&p, text).unwrap();
    let err = format!(
        "{:#}",
        Tiny::<f32, Cpu>::load_run(&Cpu::default(), dir.path())
            .err()
            .expect("must fail")
    );
    assert!(
        err.contains("config field `model_dim`: the model type expects 32, the config has 64"),
        "{err}"
    );
}

#[test]
fn wrong_weight_shape_names_key_and_shapes() {
    let g = fixture("megalodon-golden-tiny.json");
    let dir = tempfile::tempdir().unwrap();
    // a state_dict with one transposed weight
    let mut root = g.root.clone();
    root["params"]["layers.1.mega.wz.weight"]["shape"] = serde_json::json!([32, 16]);
    let bad = Golden {
        root,
        path: "bad".into(),
    };
    export_like_torch(&bad, &dir.path().join("model.safetensors"));
    let mut m = golden_model(&g);
    let conf = m.conf().clone();
    save_run(dir.path().join("ok").as_path(), &conf, &mut m).unwrap();
    let err = format!(
        "{:#}",
        load_run_weights(dir.path(), &mut m).expect_err("must fail")
    );
    assert!(
        err.contains("`layers.1.mega.wz.weight`: the model expects [16, 32]")
            && err.contains("has [32, 16]"),
        "{err}"
    );
}

#[test]
fn corrupt_file_names_the_file() {
    let g = fixture("megalodon-golden-tiny.json");
    let mut m = golden_model(&g);
    let dir = tempfile::tempdir().unwrap();
    m.save_run(dir.path()).unwrap();
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!(
        "{:#}",
        load_run_weights(dir.path(), &mut m).expect_err("must fail")
    );
    assert!(err.contains("model.safetensors"), "{err}");
}

/// The same weights always give the same file bytes: `safetensors` takes the metadata as a
/// `HashMap` (random order per map), so before the header was put in key order, saving twice
/// gave two different files about half of the time per pair.
#[test]
fn saving_is_byte_deterministic() {
    let g = fixture("megalodon-golden-tiny.json");
    let mut m = golden_model(&g);
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..8)
        .map(|i| {
            let d = dir.path().join(format!("run{i}"));
            m.save_run(&d).unwrap();
            std::fs::read(d.join("model.safetensors")).unwrap()
        })
        .collect();
    for (i, f) in files.iter().enumerate().skip(1) {
        assert!(f == &files[0], "save {i} differs from save 0");
    }
    // and the file still loads, checksum included
    let d = dir.path().join("run0");
    let mut fresh = golden_model(&g);
    load_run_weights(&d, &mut fresh).unwrap();
}
