//! Every head on `Cuda` against the same head on `Cpu`: gradients of the language model, then a
//! short training run of the text LM, the image classifier and the raw-speech classifier from
//! identical weights on identical batches, whose losses and final weights must agree.
//!
//! Built only with `--features cuda` (scripts/cuda-build.sh bundles it for scripts/gpu-check.sh);
//! skips itself, saying why, when no CUDA device is present. CI type-checks it with
//! `cargo check --all-targets --features cuda,ci-check`.
//!
//! Tolerances: both devices run the composed dfdx ops in f32 but sum in different orders (cuBLAS
//! vs gemm, parallel reductions), and on `Cpu` the CEMA and attention run as hand-written
//! kernels; a training step amplifies those ~1e-6 differences through AdamW's normalisation.
//! Gradients: max |diff| ≤ 1e-3 · max |grad| per parameter. Losses over 8 steps: relative
//! difference ≤ 1e-3. Final weights: max |diff| ≤ 1e-3 (lr 1e-3 bounds each update).
#![cfg(feature = "cuda")]

use dfdx::prelude::*;
use megalodon_audio::{AudioModel, SpeechCpu, SPEECH_CPU};
use megalodon_core::data::Batch as RowBatch;
use megalodon_core::fit::{train_step, Batch as LmBatch, Trainable};
use megalodon_core::golden::max_abs_diff;
use megalodon_core::optim::{grads_to_host, AdamW, OptimConf};
use megalodon_core::params::{alloc_grads, param_values, Params};
use megalodon_core::ModelConf;
use megalodon_text::TextCpu;
use megalodon_vision::{FashionSmall, VisionModel, FASHION_SMALL};
use rand::{Rng, SeedableRng};

fn gpu() -> Option<Cuda> {
    match megalodon_core::device::cuda_device() {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipping: {e:#}");
            None
        }
    }
}

/// Copies `from`'s weights into `to` (any devices) through a safetensors file.
fn copy_weights<A, B, Da, Db>(from: &mut A, to: &mut B)
where
    Da: Device<f32>,
    Db: Device<f32>,
    A: Params<f32, Da> + megalodon_core::checkpoint::HasBuffers,
    B: Params<f32, Db> + megalodon_core::checkpoint::HasBuffers,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    megalodon_core::checkpoint::save_safetensors(from, &path).unwrap();
    megalodon_core::checkpoint::load_safetensors(to, &path).unwrap();
}

fn opt() -> OptimConf {
    OptimConf {
        lr: 1e-3,
        warmup: 0,
        ..OptimConf::default()
    }
}

/// The shared body: `steps` AdamW steps of the same batches on both devices, from the same
/// weights; asserts the per-step losses and the final weights agree.
fn train_both<Mc, Mg, B>(name: &str, cpu: &mut Mc, gpu: &mut Mg, batches: &[B])
where
    Mc: Trainable<f32, Cpu, Batch = B>,
    Mg: Trainable<f32, Cuda, Batch = B>,
{
    copy_weights(cpu, gpu);
    let mut oc = AdamW::<f32, Cpu>::new(opt());
    let mut og = AdamW::<f32, Cuda>::new(opt());
    let mut worst = 0.0f64;
    for (i, b) in batches.iter().enumerate() {
        let lc = train_step(cpu, &mut oc, b).unwrap().loss;
        let lg = train_step(gpu, &mut og, b).unwrap().loss;
        let rel = (lc - lg).abs() / lc.abs().max(1e-6);
        println!("{name} step {i}: cpu loss {lc:.6}, cuda loss {lg:.6}, rel diff {rel:.2e}");
        assert!(lc.is_finite() && lg.is_finite());
        assert!(
            rel <= 1e-3,
            "{name}: losses differ at step {i}: {lc} vs {lg}"
        );
        worst = worst.max(rel);
    }
    let wc = param_values(cpu).unwrap();
    let wg = param_values(gpu).unwrap();
    assert_eq!(wc.len(), wg.len());
    let mut wd = 0.0f64;
    for ((n, a), (_, b)) in wc.iter().zip(&wg) {
        let d = max_abs_diff(
            &a.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            &b.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        );
        assert!(
            d <= 1e-3,
            "{name}: weight {n} differs by {d:.3e} after training"
        );
        wd = wd.max(d);
    }
    println!("{name}: worst loss rel diff {worst:.2e}, worst weight diff {wd:.2e}");
}

fn lm_batches(vocab: usize, b: usize, t: usize, n: usize, seed: u64) -> Vec<LmBatch> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let tokens: Vec<usize> = (0..b * t).map(|_| rng.gen_range(0..vocab)).collect();
            let targets = (0..b * t)
                .map(|i| (i % t + 1 < t).then(|| tokens[i + 1]))
                .collect();
            LmBatch {
                tokens,
                targets,
                batch: b,
                seq_len: t,
            }
        })
        .collect()
}

fn row_batches(
    b: usize,
    row_len: usize,
    classes: usize,
    n: usize,
    seed: u64,
    ragged: bool,
) -> Vec<RowBatch> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let lengths: Vec<usize> = (0..b)
                .map(|r| {
                    if ragged && r % 2 == 1 {
                        row_len / 2
                    } else {
                        row_len
                    }
                })
                .collect();
            let mut values = vec![0.0f32; b * row_len];
            for (r, &len) in lengths.iter().enumerate() {
                for v in &mut values[r * row_len..r * row_len + len] {
                    *v = rng.gen_range(-1.0..1.0);
                }
            }
            RowBatch {
                values,
                lengths,
                labels: (0..b).map(|_| rng.gen_range(0..classes)).collect(),
                batch: b,
                skipped: 0,
                row_len,
                epoch: 0,
                index: i,
                ids: (0..b).collect(),
                skipped_files: Vec::new(),
            }
        })
        .collect()
}

#[test]
fn lm_gradients_on_cuda_match_cpu() {
    let Some(dev) = gpu() else { return };
    let cpu = Cpu::default();
    let conf = ModelConf::from_dims(TextCpu::<f32, Cpu>::DIMS, 64, 512);
    let mut mc = TextCpu::<f32, Cpu>::new(&cpu, conf.clone(), 3).unwrap();
    let mut mg = TextCpu::<f32, Cuda>::new(&dev, conf, 99).unwrap();
    copy_weights(&mut mc, &mut mg);
    let batch = &lm_batches(512, 2, 200, 1, 5)[0];
    let mut gc = alloc_grads(&mut mc).unwrap();
    let lc = mc.loss(batch, gc.clone()).unwrap();
    let vc = lc.as_vec()[0] as f64;
    gc = lc.backward();
    let mut gg = alloc_grads(&mut mg).unwrap();
    let lg = mg.loss(batch, gg.clone()).unwrap();
    let vg = lg.as_vec()[0] as f64;
    gg = lg.backward();
    println!("loss cpu {vc:.7} cuda {vg:.7}");
    assert!((vc - vg).abs() <= 1e-5 * vc.abs());
    let hc = grads_to_host(&mut mc, &mut gc).unwrap();
    let hg = grads_to_host(&mut mg, &mut gg).unwrap();
    assert_eq!(hc.len(), hg.len());
    for ((n, a), (_, b)) in hc.iter().zip(&hg) {
        let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
        let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-8);
        let d = max_abs_diff(&a, &b);
        println!("grad {n}: max|diff| {d:.3e} (max|grad| {scale:.3e})");
        assert!(
            d <= 1e-3 * scale,
            "gradient of {n} differs: {d:.3e} vs scale {scale:.3e}"
        );
    }
}

#[test]
fn text_lm_trains_the_same_on_cuda() {
    let Some(dev) = gpu() else { return };
    let cpu = Cpu::default();
    let conf = ModelConf::from_dims(TextCpu::<f32, Cpu>::DIMS, 64, 512);
    let mut mc = TextCpu::<f32, Cpu>::new(&cpu, conf.clone(), 1).unwrap();
    let mut mg = TextCpu::<f32, Cuda>::new(&dev, conf, 2).unwrap();
    train_both("text", &mut mc, &mut mg, &lm_batches(512, 4, 256, 8, 7));
}

#[test]
fn image_classifier_trains_the_same_on_cuda() {
    let Some(dev) = gpu() else { return };
    let cpu = Cpu::default();
    let classes: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let conf = FashionSmall::<f32, Cpu>::preset_conf(&FASHION_SMALL, classes, true).unwrap();
    let mut mc =
        <FashionSmall<f32, Cpu> as VisionModel<f32, Cpu>>::build(&cpu, conf.clone(), 1).unwrap();
    let mut mg = <FashionSmall<f32, Cuda> as VisionModel<f32, Cuda>>::build(&dev, conf, 2).unwrap();
    // 49 patches of 4x4 gray values per image
    let batches = row_batches(32, 49 * 16, 10, 8, 11, false);
    train_both("vision", &mut mc, &mut mg, &batches);
}

#[test]
fn speech_classifier_trains_the_same_on_cuda() {
    let Some(dev) = gpu() else { return };
    let cpu = Cpu::default();
    let labels: Vec<String> = (0..6).map(|i| format!("w{i}")).collect();
    let conf = SpeechCpu::<f32, Cpu>::preset_conf(&SPEECH_CPU, labels).unwrap();
    let mut mc =
        <SpeechCpu<f32, Cpu> as AudioModel<f32, Cpu>>::build(&cpu, conf.clone(), 1).unwrap();
    let mut mg = <SpeechCpu<f32, Cuda> as AudioModel<f32, Cuda>>::build(&dev, conf, 2).unwrap();
    // one-second clips, every other one half as long (padding mask)
    let batches = row_batches(8, 16_000, 6, 8, 13, true);
    train_both("audio", &mut mc, &mut mg, &batches);
}
