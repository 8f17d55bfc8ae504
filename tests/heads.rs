//! The core as a backbone for heads: the causal backbone under the LM, the bidirectional encoder
//! with padding, finite differences through encoder + pooling + class head, and the shared
//! training loop on a classifier (bit-exact resume).

use dfdx::prelude::*;
use megalodon::core::checkpoint::HasBuffers;
use megalodon::core::device::MegaDevice;
use megalodon::core::fit::{fit, latest_checkpoint, FitConf, Trainable};
use megalodon::core::nn::classifier::{class_cross_entropy, ClassHead};
use megalodon::core::nn::encoder::masked_mean_pool;
use megalodon::core::nn::layers::Linear;
use megalodon::core::optim::OptimConf;
use megalodon::core::params::{alloc_grads, join, ParamVisitor};
use megalodon::core::presets::{Tiny, TINY_CHUNK};
use megalodon::core::util::Float;
use megalodon::core::{Backbone, BidirectionalEncoder, ModelConf, Params};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

mod common;
use common::{fd_all, max_diff, Grab, Randomize};

/// Two layers, M 16, Z 8, V 16, H 2, F 24, N 4, G 2 (the widths of the block gradient test).
type Enc<E> = BidirectionalEncoder<2, 16, 8, 16, 2, 24, 4, 2, E, Cpu>;
const CHUNK: usize = 8;

fn encoder(seed: u64) -> Enc<f64> {
    let dev: Cpu = Default::default();
    let mut e = Enc::<f64>::new(&dev, Enc::<f64>::default_conf(CHUNK), seed).unwrap();
    e.visit_params(
        "",
        &mut Randomize(rand::rngs::StdRng::seed_from_u64(seed + 1)),
    )
    .unwrap();
    e
}

#[test]
fn backbone_has_no_vocabulary_and_the_lm_is_embedding_backbone_head() {
    let dev: Cpu = Default::default();
    // a backbone config without vocabulary validates; an LM needs one
    let bconf = Backbone::<2, 32, 16, 32, 2, 48, 4, 4, f32, Cpu>::default_conf(TINY_CHUNK);
    assert_eq!(bconf.vocab_size, 0);
    Backbone::<2, 32, 16, 32, 2, 48, 4, 4, f32, Cpu>::new(&dev, bconf.clone(), 0).unwrap();
    let e = Tiny::<f32, Cpu>::new(&dev, bconf, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("vocab_size 0"), "{e}");

    let conf = ModelConf {
        scale_emb: true,
        ..Tiny::<f32, Cpu>::default_conf(TINY_CHUNK, 23)
    };
    let m = Tiny::<f32, Cpu>::new(&dev, conf, 3).unwrap();
    let (b, t) = (2, 21);
    let tokens: Vec<usize> = (0..b * t).map(|i| (i * 7 + 3) % 23).collect();
    let logits = m.forward(&tokens, b, t).unwrap().as_vec();
    // hidden states from the backbone, then the output layer on the host
    let hidden = m.forward_hidden(&tokens, b, t).unwrap().as_vec();
    let w = m.output.as_ref().unwrap().as_vec();
    let mut worst = 0.0f64;
    for r in 0..b * t {
        for v in 0..23 {
            let z: f64 = (0..32)
                .map(|k| hidden[r * 32 + k] as f64 * w[v * 32 + k] as f64)
                .sum();
            worst = worst.max((z - logits[r * 23 + v] as f64).abs());
        }
    }
    assert!(worst < 1e-4, "logits != hidden . W^T: {worst}");

    // the backbone streams hidden states: two calls give the one-call output
    let x = m
        .embed_tokens(m.embed.clone(), &tokens, b, t)
        .unwrap()
        .as_vec();
    let seq = |v: Vec<f32>, n: usize| dev.tensor_from_vec(v, (b, n, Const::<32>));
    let slice = |lo: usize, hi: usize| megalodon::core::util::time_slice(&x, b, t, 32, lo, hi);
    let mut st = m.backbone.new_state(b);
    let h1 = m
        .backbone
        .forward_hidden(seq(slice(0, 13), 13), Some(&mut st))
        .unwrap()
        .as_vec();
    let h2 = m
        .backbone
        .forward_hidden(seq(slice(13, t), t - 13), Some(&mut st))
        .unwrap()
        .as_vec();
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let full = to64(&hidden);
    let a = megalodon::core::util::time_slice(&full, b, t, 32, 0, 13);
    let c = megalodon::core::util::time_slice(&full, b, t, 32, 13, t);
    let d = max_diff(&a, &to64(&h1)).max(max_diff(&c, &to64(&h2)));
    assert!(d < 1e-4, "streamed hidden states differ by {d}");
    assert_eq!(st.position, t);
}

#[test]
fn encoder_ignores_padding_and_pads_get_zero_gradient() {
    let dev: Cpu = Default::default();
    let enc = encoder(7);
    let (b, t) = (2, 20); // chunks 8 + 8 + 4; row 0 has 13 real steps (a partial chunk)
    let lengths = [13usize, 20];
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let xv: Vec<f64> = (0..b * t * 16).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut xv2 = xv.clone();
    for s in 13..t {
        for k in 0..16 {
            xv2[s * 16 + k] = rng.gen_range(-5.0..5.0); // other garbage in row 0's padding
        }
    }
    let run = |v: &[f64]| {
        enc.forward(
            dev.tensor_from_vec(v.to_vec(), (b, t, Const::<16>)),
            Some(&lengths),
        )
        .unwrap()
        .as_vec()
    };
    let (y1, y2) = (run(&xv), run(&xv2));
    let real = |y: &[f64]| -> Vec<f64> {
        (0..b * t)
            .filter(|i| i % t < lengths[i / t])
            .flat_map(|i| y[i * 16..(i + 1) * 16].to_vec())
            .collect()
    };
    let d = max_diff(&real(&y1), &real(&y2));
    assert!(d < 1e-12, "padding changed real outputs by {d}");
    assert!(
        y1[13 * 16..t * 16].iter().all(|&v| v == 0.0),
        "outputs at padded steps must be zero"
    );
    // the same row alone, unpadded: equal up to the chunked scans' rounding
    let alone = enc
        .forward(
            dev.tensor_from_vec(xv[..13 * 16].to_vec(), (1, 13, Const::<16>)),
            None,
        )
        .unwrap()
        .as_vec();
    let d = max_diff(&alone, &y1[..13 * 16]);
    assert!(d < 1e-10, "padded row differs from the unpadded row by {d}");
    // without the mask the padding does change row 0 (the check above can fail)
    let unmasked = enc
        .forward(dev.tensor_from_vec(xv.clone(), (b, t, Const::<16>)), None)
        .unwrap()
        .as_vec();
    assert!(max_diff(&unmasked[..13 * 16], &alone) > 1e-3);

    // zero gradient at padded inputs, non-zero at real ones
    let x: Tensor<(usize, usize, Const<16>), f64, Cpu> =
        dev.tensor_from_vec(xv.clone(), (b, t, Const));
    let w: Tensor<(usize, usize, Const<16>), f64, Cpu> = dev.sample_normal_like(&(b, t, Const));
    let y = enc.forward(x.leaky_trace(), Some(&lengths)).unwrap();
    let g = (y * w).sum().backward().get(&x).as_vec();
    for (i, gi) in g.chunks(16).enumerate() {
        let padded = i % t >= lengths[i / t];
        let norm: f64 = gi.iter().map(|v| v * v).sum::<f64>().sqrt();
        if padded {
            assert_eq!(norm, 0.0, "step {i} is padding but has gradient {norm}");
        } else {
            assert!(norm > 1e-8, "real step {i} has no gradient");
        }
    }
}

/// A toy classifier over 4-feature sequences: linear embedding, the encoder, masked mean
/// pooling, the class head.
struct Toy<E: Dtype, D: Device<E>> {
    embed: Linear<4, 16, E, D>,
    encoder: BidirectionalEncoder<2, 16, 8, 16, 2, 24, 4, 2, E, D>,
    head: ClassHead<16, E, D>,
}

struct ToyBatch<E> {
    x: Vec<E>,
    lengths: Vec<usize>,
    labels: Vec<usize>,
    t: usize,
}

impl<E: Float, D: MegaDevice<E>> Toy<E, D> {
    fn new(dev: &D, seed: u64, classes: usize) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let conf = BidirectionalEncoder::<2, 16, 8, 16, 2, 24, 4, 2, E, D>::default_conf(CHUNK);
        Self {
            embed: Linear::new(dev, &mut rng, true),
            encoder: BidirectionalEncoder::init(dev, conf, &mut rng).unwrap(),
            head: ClassHead::new(dev, &mut rng, classes).unwrap(),
        }
    }

    fn logits<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        x: Tensor<(usize, usize, Const<4>), E, D, T>,
        lengths: &[usize],
    ) -> Tensor<(usize, usize), E, D, T> {
        let h = self
            .encoder
            .forward(self.embed.forward(x).unwrap(), Some(lengths))
            .unwrap();
        self.head
            .forward(masked_mean_pool(h, Some(lengths)).unwrap())
    }
}

impl<E: Float, D: MegaDevice<E>> Params<E, D> for Toy<E, D> {
    fn visit_params<V: ParamVisitor<E, D>>(&mut self, p: &str, v: &mut V) -> anyhow::Result<()> {
        self.embed.visit_params(&join(p, "embed"), v)?;
        self.encoder.visit_params(&join(p, "encoder"), v)?;
        self.head.visit_params(&join(p, "head"), v)
    }
}
impl<E: Dtype, D: Device<E>> HasBuffers for Toy<E, D> {}

impl<E: Float, D: MegaDevice<E>> Trainable<E, D> for Toy<E, D> {
    type Batch = ToyBatch<E>;
    type Config = ModelConf;
    fn config(&self) -> ModelConf {
        self.encoder.conf.clone()
    }
    fn loss(
        &self,
        b: &ToyBatch<E>,
        grads: Gradients<E, D>,
    ) -> anyhow::Result<Tensor<Rank0, E, D, OwnedTape<E, D>>> {
        let dev = self.head.weight.device().clone();
        let n = b.labels.len();
        let x = dev
            .tensor_from_vec(b.x.clone(), (n, b.t, Const::<4>))
            .traced(grads);
        class_cross_entropy(self.logits(x, &b.lengths), &b.labels)
    }
    fn batch_len(b: &ToyBatch<E>) -> u64 {
        b.labels.len() as u64
    }
}

/// Sequences whose class is the sign of the mean of feature 0 over the real steps.
fn toy_batch(step: u64) -> ToyBatch<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(step);
    let (n, t) = (4, 12);
    let lengths: Vec<usize> = (0..n).map(|_| rng.gen_range(5..=t)).collect();
    let labels: Vec<usize> = (0..n).map(|_| rng.gen_range(0..2)).collect();
    let mut x = Vec::with_capacity(n * t * 4);
    for r in 0..n {
        for s in 0..t {
            for k in 0..4 {
                let sign = if labels[r] == 1 { 1.0 } else { -1.0 };
                let v: f32 = rng.gen_range(-1.0..1.0);
                x.push(if k == 0 && s < lengths[r] {
                    v + 0.5 * sign
                } else {
                    v
                });
            }
        }
    }
    ToyBatch {
        x,
        lengths,
        labels,
        t,
    }
}

#[test]
fn encoder_pooling_and_head_gradients_match_finite_differences() {
    let dev: Cpu = Default::default();
    let mut m = Toy::<f64, Cpu>::new(&dev, 5, 3);
    m.visit_params("", &mut Randomize(rand::rngs::StdRng::seed_from_u64(6)))
        .unwrap();
    let (n, t) = (2, 19);
    let lengths = [11usize, 19];
    let labels = [2usize, 0];
    let xv: Vec<f64> = {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        (0..n * t * 4).map(|_| rng.gen_range(-1.0..1.0)).collect()
    };
    let x = || dev.tensor_from_vec(xv.clone(), (n, t, Const::<4>));
    let grads = alloc_grads(&mut m).unwrap();
    let l = class_cross_entropy(m.logits(x().traced(grads), &lengths), &labels).unwrap();
    let g = l.backward();
    let mut grab = Grab(&g, BTreeMap::new());
    m.visit_params("", &mut grab).unwrap();
    let analytic = grab.1;
    assert_eq!(analytic.len(), m.param_names().len());
    // measured worst 7.3e-9 (f64, h = 1e-5); the tolerance is about 10x that
    let worst = fd_all(&mut m, &analytic, 6, 8e-8, |m| {
        class_cross_entropy(m.logits(x(), &lengths), &labels)
            .unwrap()
            .as_vec()[0]
    });
    println!(
        "encoder + pooling + head: worst relative error {worst:.2e} over {} tensors",
        analytic.len()
    );
}

fn params_of(m: &mut Toy<f32, Cpu>) -> Vec<(String, Vec<f32>)> {
    megalodon::core::params::param_values(m).unwrap()
}

#[test]
fn classifier_run_resumes_bit_exactly() {
    let optim = OptimConf {
        lr: 1e-2,
        warmup: 2,
        max_steps: 8,
        weight_decay: 0.01,
        ..OptimConf::default()
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let conf = |dir: &std::path::Path, steps: u64| FitConf {
        steps,
        ckpt_every: 3,
        out: Some(dir.to_path_buf()),
        seed: 4,
        data: "toy sign task".into(),
        ..FitConf::default()
    };
    let dev: Cpu = Default::default();
    let mut a = Toy::<f32, Cpu>::new(&dev, 4, 2);
    let la = fit(
        &mut a,
        optim.clone(),
        &conf(da.path(), 8),
        |s| Ok(toy_batch(s)),
        |_| {},
    )
    .unwrap();

    // killed after the step-6 checkpoint: resume from it into a differently initialised model
    let mut b = Toy::<f32, Cpu>::new(&dev, 4, 2);
    fit(
        &mut b,
        optim.clone(),
        &conf(db.path(), 6),
        |s| Ok(toy_batch(s)),
        |_| {},
    )
    .unwrap();
    assert!(latest_checkpoint(db.path())
        .unwrap()
        .unwrap()
        .ends_with("ckpt-00000006"));
    let mut c = Toy::<f32, Cpu>::new(&dev, 99, 2);
    let resume = FitConf {
        resume: true,
        allow_changed: vec!["steps".into()],
        ..conf(db.path(), 8)
    };
    let lc = fit(&mut c, optim, &resume, |s| Ok(toy_batch(s)), |_| {}).unwrap();
    assert_eq!(lc.first().unwrap().step, 7);
    for (x, y) in la[6..].iter().zip(&lc) {
        assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "step {}", x.step);
    }
    assert_eq!(params_of(&mut a), params_of(&mut c));
    let state = |d: &std::path::Path| {
        std::fs::read_to_string(d.join("ckpt-00000008/train_state.json")).unwrap()
    };
    assert_eq!(state(da.path()), state(db.path()));
    assert!(state(da.path()).contains("\"tokens_seen\": 32"));
}
