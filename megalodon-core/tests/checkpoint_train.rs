//! Checkpoint and training infrastructure on a toy module with a run-time-sized embedding.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ::safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use dfdx::prelude::*;
use megalodon_core::checkpoint::{
    self, load_checkpoint, load_config, load_safetensors, save_checkpoint, save_run,
    save_safetensors, Buffer, HasBuffers, TrainState,
};
use megalodon_core::optim::{clip_grad_norm, clip_scale, grad_norm, AdamW, OptimConf, Schedule};
use megalodon_core::params::{alloc_grads, join, ParamVisitor, Params};
use megalodon_core::util::Float;
use megalodon_core::ModelConf;

// ------------------------------------------------------------------------------------------
// Toy module
// ------------------------------------------------------------------------------------------

struct Toy<E: Dtype, D: Device<E>> {
    embed: Tensor<(usize, Const<4>), E, D>,
    w: Tensor<Rank2<3, 4>, E, D>,
    b: Tensor<Rank1<3>, E, D>,
    freqs: Vec<f32>,
    tied: bool,
}

impl<E: Float, D: Device<E>> Toy<E, D>
where
    rand_distr::StandardNormal: rand_distr::Distribution<E>,
{
    fn new(dev: &D, rows: usize) -> Self {
        Self {
            embed: dev.sample_normal_like(&(rows, Const::<4>)),
            w: dev.sample_normal(),
            b: dev.sample_normal(),
            freqs: vec![1.0, 0.01],
            tied: false,
        }
    }
}

impl<E: Dtype, D: Device<E>> Params<E, D> for Toy<E, D> {
    fn visit_params<V: ParamVisitor<E, D>>(
        &mut self,
        prefix: &str,
        v: &mut V,
    ) -> anyhow::Result<()> {
        v.visit(&join(prefix, "embed.weight"), &mut self.embed)?;
        v.visit(&join(prefix, "w"), &mut self.w)?;
        v.visit(&join(prefix, "b"), &mut self.b)
    }
}

impl<E: Dtype, D: Device<E>> HasBuffers for Toy<E, D> {
    fn buffers(&self) -> Vec<(String, Buffer)> {
        vec![
            (
                "rope.freqs".into(),
                Buffer::F32 {
                    shape: vec![2],
                    data: self.freqs.clone(),
                },
            ),
            (
                "norm.prior_count".into(),
                Buffer::I64 {
                    shape: vec![],
                    data: vec![0],
                },
            ),
            (
                "norm.prior_mean".into(),
                Buffer::F32 {
                    shape: vec![2],
                    data: vec![0.0; 2],
                },
            ),
            (
                "norm.prior_logv".into(),
                Buffer::F32 {
                    shape: vec![2],
                    data: vec![0.0; 2],
                },
            ),
        ]
    }
    fn aliases(&self) -> Vec<(String, String)> {
        if self.tied {
            vec![("head.weight".into(), "embed.weight".into())]
        } else {
            vec![]
        }
    }
}

/// All parameter values, by name.
fn values<E: Float, D: Device<E>, M: Params<E, D>>(m: &mut M) -> BTreeMap<String, Vec<E>> {
    struct V<E>(BTreeMap<String, Vec<E>>);
    impl<E: Float, D: Device<E>> ParamVisitor<E, D> for V<E> {
        fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> anyhow::Result<()> {
            self.0.insert(name.into(), t.as_vec());
            Ok(())
        }
    }
    let mut v = V(BTreeMap::new());
    m.visit_params("", &mut v).unwrap();
    v.0
}

fn bits(v: &BTreeMap<String, Vec<f32>>) -> BTreeMap<String, Vec<u32>> {
    v.iter()
        .map(|(k, x)| (k.clone(), x.iter().map(|f| f.to_bits()).collect()))
        .collect()
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("megalodon-ckpt-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

type RawMap = BTreeMap<String, (StDtype, Vec<usize>, Vec<u8>)>;

/// Reads a safetensors file, lets `f` edit its tensors and writes the result to `dst`.
fn rewrite(src: &Path, dst: &Path, f: impl FnOnce(&mut RawMap)) {
    let bytes = std::fs::read(src).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut map: RawMap = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    f(&mut map);
    let views: Vec<(String, TensorView<'_>)> = map
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    ::safetensors::tensor::serialize_to_file(views, &None, dst).unwrap();
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn err_of(r: anyhow::Result<()>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

/// A saved toy model (5 embedding rows) and the path of its file.
fn saved(dir: &Path) -> (Toy<f32, Cpu>, PathBuf) {
    let dev = Cpu::seed_from_u64(1);
    let mut m = Toy::<f32, Cpu>::new(&dev, 5);
    let p = dir.join("model.safetensors");
    save_safetensors(&mut m, &p).unwrap();
    (m, p)
}

// ------------------------------------------------------------------------------------------
// Checkpoints
// ------------------------------------------------------------------------------------------

#[test]
fn round_trip_is_bit_exact_and_atomic() {
    let dir = tmp_dir("roundtrip");
    let (mut a, p) = saved(&dir);
    assert!(
        !checkpoint::tmp_path(&p).exists(),
        "the temporary file must be renamed away"
    );
    let bytes = std::fs::read(&p).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "b",
            "embed.weight",
            "norm.prior_count",
            "norm.prior_logv",
            "norm.prior_mean",
            "rope.freqs",
            "w"
        ]
    );
    assert_eq!(st.tensor("norm.prior_count").unwrap().dtype(), StDtype::I64);
    assert_eq!(
        st.tensor("norm.prior_count").unwrap().shape(),
        &[] as &[usize]
    );
    assert_eq!(st.tensor("embed.weight").unwrap().shape(), &[5, 4]);

    let dev = Cpu::seed_from_u64(2);
    let mut b = Toy::<f32, Cpu>::new(&dev, 5);
    assert_ne!(bits(&values(&mut a)), bits(&values(&mut b)));
    load_safetensors(&mut b, &p).unwrap();
    assert_eq!(bits(&values(&mut a)), bits(&values(&mut b)));

    // f32 file into an f64 model: exact widening.
    let dev64: Cpu = Default::default();
    let mut c = Toy::<f64, Cpu>::new(&dev64, 5);
    load_safetensors(&mut c, &p).unwrap();
    let (va, vc) = (values(&mut a), values(&mut c));
    for (k, x) in &va {
        let y: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        assert_eq!(&y, &vc[k]);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_key_names_key_and_shape() {
    let dir = tmp_dir("missing");
    let (_, p) = saved(&dir);
    let q = dir.join("bad.safetensors");
    rewrite(&p, &q, |m| {
        m.remove("w");
    });
    let mut b = Toy::<f32, Cpu>::new(&Cpu::default(), 5);
    let e = err_of(load_safetensors(&mut b, &q));
    assert!(
        e.contains("`w`") && e.contains("[3, 4]") && e.contains("missing"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn extra_key_is_listed() {
    let dir = tmp_dir("extra");
    let (_, p) = saved(&dir);
    let q = dir.join("bad.safetensors");
    rewrite(&p, &q, |m| {
        m.insert(
            "bogus.weight".into(),
            (StDtype::F32, vec![2], f32_bytes(&[1.0, 2.0])),
        );
    });
    let mut b = Toy::<f32, Cpu>::new(&Cpu::default(), 5);
    let e = err_of(load_safetensors(&mut b, &q));
    assert!(
        e.contains("bogus.weight") && e.contains("unexpected"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let dir = tmp_dir("shape");
    let (_, p) = saved(&dir);
    let q = dir.join("bad.safetensors");
    rewrite(&p, &q, |m| {
        m.insert("b".into(), (StDtype::F32, vec![4], f32_bytes(&[1.0; 4])));
    });
    let mut b = Toy::<f32, Cpu>::new(&Cpu::default(), 5);
    let e = err_of(load_safetensors(&mut b, &q));
    assert!(
        e.contains("`b`") && e.contains("[3]") && e.contains("[4]"),
        "{e}"
    );

    // Run-time vocabulary: a 5-row file does not load into a 6-row model.
    let mut c = Toy::<f32, Cpu>::new(&Cpu::default(), 6);
    let e = err_of(load_safetensors(&mut c, &p));
    assert!(
        e.contains("embed.weight") && e.contains("[6, 4]") && e.contains("[5, 4]"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn buffers_are_validated() {
    let dir = tmp_dir("buffers");
    let (_, p) = saved(&dir);
    let mut b = Toy::<f32, Cpu>::new(&Cpu::default(), 5);

    let q = dir.join("count.safetensors");
    rewrite(&p, &q, |m| {
        m.insert(
            "norm.prior_count".into(),
            (StDtype::I64, vec![], 7i64.to_le_bytes().to_vec()),
        );
    });
    let e = err_of(load_safetensors(&mut b, &q));
    assert!(
        e.contains("prior_count != 0 is not supported") && e.contains("norm.prior_count"),
        "{e}"
    );

    let q = dir.join("mean.safetensors");
    rewrite(&p, &q, |m| {
        m.insert(
            "norm.prior_mean".into(),
            (StDtype::F32, vec![3], f32_bytes(&[0.0; 3])),
        );
    });
    let e = err_of(load_safetensors(&mut b, &q));
    assert!(
        e.contains("norm.prior_mean") && e.contains("[2]") && e.contains("[3]"),
        "{e}"
    );

    let q = dir.join("freqs.safetensors");
    rewrite(&p, &q, |m| {
        m.insert(
            "rope.freqs".into(),
            (StDtype::F32, vec![2], f32_bytes(&[1.0, 0.02])),
        );
    });
    let e = err_of(load_safetensors(&mut b, &q));
    assert!(e.contains("rope.freqs"), "{e}");

    // Nonzero prior mean/logv are ignored (count 0); missing buffers are fine.
    let q = dir.join("ok.safetensors");
    rewrite(&p, &q, |m| {
        m.insert(
            "norm.prior_logv".into(),
            (StDtype::F32, vec![2], f32_bytes(&[3.0, 4.0])),
        );
        m.remove("norm.prior_mean");
        m.remove("norm.prior_count");
        m.remove("rope.freqs");
    });
    load_safetensors(&mut b, &q).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tied_aliases() {
    let dir = tmp_dir("alias");
    let dev = Cpu::seed_from_u64(3);
    let mut a = Toy::<f32, Cpu>::new(&dev, 5);
    a.tied = true;
    let p = dir.join("tied.safetensors");
    save_safetensors(&mut a, &p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("head.weight").unwrap().data(),
        st.tensor("embed.weight").unwrap().data()
    );

    let mut b = Toy::<f32, Cpu>::new(&dev, 5);
    b.tied = true;
    load_safetensors(&mut b, &p).unwrap();
    assert_eq!(bits(&values(&mut a)), bits(&values(&mut b)));

    // An untied model does not accept the alias key.
    let mut u = Toy::<f32, Cpu>::new(&dev, 5);
    let e = err_of(load_safetensors(&mut u, &p));
    assert!(e.contains("head.weight"), "{e}");

    // A differing alias is an error.
    let q = dir.join("diff.safetensors");
    rewrite(&p, &q, |m| {
        m.get_mut("head.weight").unwrap().2[0] ^= 1;
    });
    let e = err_of(load_safetensors(&mut b, &q));
    assert!(
        e.contains("head.weight") && e.contains("embed.weight"),
        "{e}"
    );

    // The alias alone supplies the parameter.
    let q = dir.join("alias_only.safetensors");
    rewrite(&p, &q, |m| {
        m.remove("embed.weight");
    });
    let mut c = Toy::<f32, Cpu>::new(&dev, 5);
    c.tied = true;
    load_safetensors(&mut c, &q).unwrap();
    assert_eq!(bits(&values(&mut a)), bits(&values(&mut c)));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_and_missing_files_name_the_file() {
    let dir = tmp_dir("trunc");
    let (_, p) = saved(&dir);
    let bytes = std::fs::read(&p).unwrap();
    let q = dir.join("truncated.safetensors");
    std::fs::write(&q, &bytes[..bytes.len() - 10]).unwrap();
    let mut b = Toy::<f32, Cpu>::new(&Cpu::default(), 5);
    let e = err_of(load_safetensors(&mut b, &q));
    assert!(e.contains("truncated.safetensors"), "{e}");

    let q = dir.join("garbage.safetensors");
    std::fs::write(&q, b"not a safetensors file at all").unwrap();
    let e = err_of(load_safetensors(&mut b, &q));
    assert!(e.contains("garbage.safetensors"), "{e}");

    let q = dir.join("does-not-exist.safetensors");
    let e = err_of(load_safetensors(&mut b, &q));
    assert!(e.contains("does-not-exist.safetensors"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bf16_and_f16_files_load() {
    let dir = tmp_dir("bf16");
    let (mut a, p) = saved(&dir);
    for (name, dt) in [
        ("bf16.safetensors", StDtype::BF16),
        ("f16.safetensors", StDtype::F16),
    ] {
        let q = dir.join(name);
        rewrite(&p, &q, |m| {
            for (d, _, b) in m.values_mut() {
                if *d == StDtype::F32 {
                    let xs: Vec<f32> = b
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    *b = xs
                        .iter()
                        .flat_map(|&x| match dt {
                            StDtype::BF16 => half::bf16::from_f32(x).to_le_bytes(),
                            _ => half::f16::from_f32(x).to_le_bytes(),
                        })
                        .collect();
                    *d = dt;
                }
            }
        });
        let mut b = Toy::<f32, Cpu>::new(&Cpu::default(), 5);
        load_safetensors(&mut b, &q).unwrap();
        let (va, vb) = (values(&mut a), values(&mut b));
        for (k, x) in &va {
            let want: Vec<f32> = x
                .iter()
                .map(|&v| match dt {
                    StDtype::BF16 => half::bf16::from_f32(v).to_f32(),
                    _ => half::f16::from_f32(v).to_f32(),
                })
                .collect();
            assert_eq!(want, vb[k], "{name} {k}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn run_directory_round_trip() {
    let dir = tmp_dir("run");
    let dev = Cpu::seed_from_u64(4);
    let mut a = Toy::<f32, Cpu>::new(&dev, 7);
    let conf = ModelConf {
        vocab_size: 7,
        num_layers: 2,
        ..ModelConf::default()
    };
    save_run(&dir, &conf, &mut a).unwrap();
    assert!(dir.join("config.json").exists() && dir.join("model.safetensors").exists());
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(
        text.contains("\n  \"num_layers\": 2"),
        "pretty JSON expected: {text}"
    );
    assert_eq!(load_config(&dir).unwrap(), conf);
    let mut b = Toy::<f32, Cpu>::new(&dev, 7);
    checkpoint::load_run_weights(&dir, &mut b).unwrap();
    assert_eq!(bits(&values(&mut a)), bits(&values(&mut b)));
    let e = format!("{:#}", load_config(&dir.join("nope")).unwrap_err());
    assert!(e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

// ------------------------------------------------------------------------------------------
// Optimizer
// ------------------------------------------------------------------------------------------

/// A module with one 3-element parameter `p`.
struct One<E: Dtype, D: Device<E>> {
    p: Tensor<Rank1<3>, E, D>,
}
impl<E: Dtype, D: Device<E>> Params<E, D> for One<E, D> {
    fn visit_params<V: ParamVisitor<E, D>>(
        &mut self,
        prefix: &str,
        v: &mut V,
    ) -> anyhow::Result<()> {
        v.visit(&join(prefix, "p"), &mut self.p)
    }
}

/// Gradients of `sum(p * g)` with respect to `p`, i.e. exactly `g`.
fn grads_equal_to(m: &mut One<f64, Cpu>, g: [f64; 3]) -> Gradients<f64, Cpu> {
    let dev = m.p.device().clone();
    let grads = alloc_grads(m).unwrap();
    let gt = dev.tensor(g);
    let loss = (m.p.clone().traced(grads) * gt).sum();
    loss.backward()
}

#[test]
fn adamw_matches_torch_formula() {
    let dev: Cpu = Default::default();
    let mut m = One {
        p: dev.tensor([1.0f64, -2.0, 0.5]),
    };
    let conf = OptimConf {
        clip: 0.0,
        ..OptimConf::default()
    };
    let (lr, wd, b1, b2, eps) = (0.01, conf.weight_decay, conf.beta1, conf.beta2, conf.eps);
    let mut opt = AdamW::<f64, Cpu>::new(conf);

    // Step 1: m_hat = g, v_hat = g^2, so p1 = p0 (1 - lr wd) - lr g / (|g| + eps).
    let g1 = [0.5, -1.0, 2.0];
    let mut grads = grads_equal_to(&mut m, g1);
    opt.step(&mut m, &mut grads, lr).unwrap();
    let p1 = m.p.array();
    let want1 = [0.989, -1.988, 0.4895];
    for i in 0..3 {
        assert!(
            (p1[i] - want1[i]).abs() < 1e-9,
            "step 1 [{i}]: {} vs {}",
            p1[i],
            want1[i]
        );
    }

    // Step 2 with another gradient, against torch's AdamW formula written out in f64.
    let g2 = [-1.0, 0.25, 3.0];
    let mut grads = grads_equal_to(&mut m, g2);
    opt.step(&mut m, &mut grads, lr).unwrap();
    let p2 = m.p.array();
    let p0 = [1.0, -2.0, 0.5];
    for i in 0..3 {
        let mut p = p0[i];
        let (mut mm, mut vv) = (0.0, 0.0);
        for (t, g) in [(1, g1[i]), (2, g2[i])] {
            p *= 1.0 - lr * wd;
            mm = b1 * mm + (1.0 - b1) * g;
            vv = b2 * vv + (1.0 - b2) * g * g;
            let bc1 = 1.0 - f64::powi(b1, t);
            let bc2 = 1.0 - f64::powi(b2, t);
            p -= lr / bc1 * mm / (vv.sqrt() / bc2.sqrt() + eps);
        }
        assert!((p2[i] - p).abs() < 1e-12, "step 2 [{i}]: {} vs {p}", p2[i]);
    }
    assert_eq!(opt.step, 2);
}

#[test]
fn adamw_treats_a_missing_gradient_as_zero() {
    // no panic: a parameter the loss did not reach only decays
    let dev: Cpu = Default::default();
    let mut m = One {
        p: dev.tensor([1.0f64, 2.0, 3.0]),
    };
    let mut grads: Gradients<f64, Cpu> = Gradients::leaky();
    let conf = OptimConf::default();
    let wd = conf.weight_decay;
    let mut opt = AdamW::<f64, Cpu>::new(conf);
    let info = opt.step(&mut m, &mut grads, 1e-3).unwrap();
    assert_eq!(info.grad_norm, 0.0);
    let p = m.p.as_vec();
    for (i, &x) in [1.0f64, 2.0, 3.0].iter().enumerate() {
        assert_eq!(p[i], x * (1.0 - 1e-3 * wd), "entry {i}");
    }
}

#[test]
fn schedule_values() {
    let c = OptimConf {
        max_steps: 10_000,
        ..OptimConf::default()
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-15 + 1e-12 * b.abs();
    assert!(close(c.lr_at(0), 1e-7), "{}", c.lr_at(0));
    assert!(close(c.lr_at(1000), 1e-3 * (1e-4 + (1.0 - 1e-4) * 0.5)));
    assert!(close(c.lr_at(2000), 1e-3));
    assert!(close(c.lr_at(6000), 1e-3 * (1.0 - 0.99 * 0.5)));
    assert!(close(c.lr_at(10_000), 1e-5));
    assert!(close(c.lr_at(50_000), 1e-5));
    let cos = OptimConf {
        schedule: Schedule::Cosine,
        ..c.clone()
    };
    assert!(close(cos.lr_at(2000), 1e-3));
    assert!(close(
        cos.lr_at(4000),
        1e-5 + (1e-3 - 1e-5) * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())
    ));
    assert!(close(cos.lr_at(10_000), 1e-5));
    let k = OptimConf {
        schedule: Schedule::Constant,
        ..c.clone()
    };
    assert!(close(k.lr_at(0), 1e-7) && close(k.lr_at(2000), 1e-3) && close(k.lr_at(20_000), 1e-3));

    // Serde: official defaults fill missing fields, schedule names are lowercase.
    let j: OptimConf = serde_json::from_str(r#"{"lr": 0.002, "schedule": "cosine"}"#).unwrap();
    assert_eq!(
        j,
        OptimConf {
            lr: 0.002,
            schedule: Schedule::Cosine,
            ..OptimConf::default()
        }
    );
    let d = OptimConf::default();
    assert_eq!(
        (d.lr, d.warmup, d.weight_decay, d.beta1, d.beta2),
        (1e-3, 2000, 0.1, 0.9, 0.98)
    );
    assert_eq!(
        (d.eps, d.clip, d.init_lr_ratio, d.end_lr_ratio),
        (1e-8, 1.0, 1e-4, 0.01)
    );
}

#[test]
fn clipping() {
    let dev: Cpu = Default::default();
    let mut m = One {
        p: dev.tensor([1.0f64, -2.0, 0.5]),
    };
    let mut grads = grads_equal_to(&mut m, [3.0, 4.0, 0.0]);
    assert!((grad_norm(&mut m, &mut grads).unwrap() - 5.0).abs() < 1e-12);
    let (n, s) = clip_grad_norm(&mut m, &mut grads, 1.0).unwrap();
    assert!((n - 5.0).abs() < 1e-12 && (s - 1.0 / (5.0 + 1e-6)).abs() < 1e-15);
    assert_eq!(clip_scale(0.5, 1.0), 1.0);
    assert_eq!(clip_scale(5.0, 0.0), 1.0);

    // step() clips: identical to step_scaled with the clip factor, different from no clipping.
    let run = |clip: f64, scale: Option<f64>| {
        let mut m = One {
            p: dev.tensor([1.0f64, -2.0, 0.5]),
        };
        let mut opt = AdamW::<f64, Cpu>::new(OptimConf {
            clip,
            weight_decay: 0.0,
            ..OptimConf::default()
        });
        for _ in 0..2 {
            let mut grads = grads_equal_to(&mut m, [3.0, 4.0, 0.0]);
            match scale {
                Some(s) => opt.step_scaled(&mut m, &mut grads, 0.1, s).unwrap(),
                None => {
                    let info = opt.step(&mut m, &mut grads, 0.1).unwrap();
                    assert!((info.grad_norm - 5.0).abs() < 1e-12);
                }
            }
        }
        // One more step with a tiny gradient exposes the moment scale.
        let mut grads = grads_equal_to(&mut m, [1e-3, 0.0, 0.0]);
        opt.step_scaled(&mut m, &mut grads, 0.1, 1.0).unwrap();
        m.p.array()
    };
    let clipped = run(1.0, None);
    assert_eq!(clipped, run(0.0, Some(1.0 / (5.0 + 1e-6))));
    assert_ne!(clipped, run(0.0, None));
}

// ------------------------------------------------------------------------------------------
// Training and resuming
// ------------------------------------------------------------------------------------------

/// Token ids and regression targets.
type Batch = (
    Tensor<(usize,), usize, Cpu>,
    Tensor<(usize, Const<3>), f32, Cpu>,
);

/// Deterministic batch for step `i`.
fn batch(dev: &Cpu, i: usize, rows: usize) -> Batch {
    let n = 6;
    let ids: Vec<usize> = (0..n).map(|j| (i * 7 + j * 3) % rows).collect();
    let y: Vec<f32> = ids
        .iter()
        .flat_map(|&t| [t as f32 * 0.5 - 1.0, (t % 2) as f32, 1.0 - t as f32 * 0.25])
        .collect();
    (
        dev.tensor_from_vec(ids, (n,)),
        dev.tensor_from_vec(y, (n, Const::<3>)),
    )
}

/// One training step; returns the loss.
fn train_step(m: &mut Toy<f32, Cpu>, opt: &mut AdamW<f32, Cpu>, i: usize, fixed_data: bool) -> f32 {
    let dev = m.w.device().clone();
    let (ids, y) = batch(&dev, if fixed_data { 0 } else { i }, m.embed.shape().0);
    let grads = alloc_grads(m).unwrap();
    let e = m.embed.clone().traced(grads).gather(ids);
    let h = e.matmul(m.w.clone().permute::<Rank2<4, 3>, _>());
    let shape = *h.shape();
    let h = h + m.b.clone().broadcast_like(&shape);
    let loss = mse_loss(h, y);
    let l = loss.array();
    let mut grads = loss.backward();
    let lr = opt.next_lr();
    opt.step(m, &mut grads, lr).unwrap();
    l
}

fn toy_opt() -> AdamW<f32, Cpu> {
    AdamW::new(OptimConf {
        lr: 0.05,
        warmup: 2,
        max_steps: 6,
        clip: 1.0,
        ..OptimConf::default()
    })
}

#[test]
fn resume_reproduces_continuous_run_bit_for_bit() {
    let rows = 5;
    // Continuous 6 steps.
    let mut a = Toy::<f32, Cpu>::new(&Cpu::seed_from_u64(10), rows);
    let mut oa = toy_opt();
    let losses_a: Vec<f32> = (0..6)
        .map(|i| train_step(&mut a, &mut oa, i, false))
        .collect();

    // 3 steps, checkpoint, fresh model and optimizer, resume, 3 steps.
    let dir = tmp_dir("resume");
    let mut b = Toy::<f32, Cpu>::new(&Cpu::seed_from_u64(10), rows);
    let mut ob = toy_opt();
    let mut losses_b: Vec<f32> = (0..3)
        .map(|i| train_step(&mut b, &mut ob, i, false))
        .collect();
    let state = TrainState {
        step: ob.step,
        seed: 10,
        tokens_seen: 18,
        ..Default::default()
    };
    let conf = ModelConf {
        vocab_size: rows,
        ..ModelConf::default()
    };
    save_checkpoint(&dir, &conf, &mut b, &ob, &state).unwrap();
    drop((b, ob));

    let mut c = Toy::<f32, Cpu>::new(&Cpu::seed_from_u64(99), rows);
    let mut oc = toy_opt();
    let st = load_checkpoint(&dir, &mut c, &mut oc).unwrap();
    assert_eq!(st, state);
    assert_eq!(oc.step, 3);
    for i in st.step as usize..6 {
        losses_b.push(train_step(&mut c, &mut oc, i, false));
    }
    assert_eq!(
        losses_a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        losses_b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(bits(&values(&mut a)), bits(&values(&mut c)));

    // The optimizer state file round-trips and rejects a model it does not belong to.
    let mut other = Toy::<f32, Cpu>::new(&Cpu::default(), rows + 1);
    let mut oo = toy_opt();
    let e = format!(
        "{:#}",
        oo.load(&mut other, &dir.join("optim.safetensors"))
            .unwrap_err()
    );
    assert!(e.contains("m.embed.weight"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn training_decreases_the_loss() {
    let mut m = Toy::<f32, Cpu>::new(&Cpu::seed_from_u64(5), 5);
    let mut opt = AdamW::new(OptimConf {
        lr: 0.05,
        warmup: 5,
        max_steps: 200,
        weight_decay: 0.0,
        ..OptimConf::default()
    });
    let losses: Vec<f32> = (0..150)
        .map(|i| train_step(&mut m, &mut opt, i, true))
        .collect();
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.05 * first && last < 0.05, "loss {first} -> {last}");
}
