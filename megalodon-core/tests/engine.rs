//! The streaming inference engine's backends (CPU and CUDA, one test body each through
//! `StreamBackend`) against the dfdx model and the official golden logits: full and incremental
//! (the golden files' call splits), any block size, crossing chunks, re-windowed TimestepNorm,
//! constant state over 100K tokens, bad input; and the CPU's int8 weights against its f32 ones.
//! Tolerance: 1e-4 in f32. The CUDA tests skip with a message where no GPU is present.

use dfdx::prelude::*;
use megalodon_core::engine::cuda::{bf16_bits, round_bf16, CudaEngine, Precision};
use megalodon_core::engine::{Engine, StreamBackend, Want};
use megalodon_core::golden::{load_params, max_abs_diff, Golden};
use megalodon_core::nn::model::Rewindow;
use megalodon_core::params::{ParamVisitor, Params};
use megalodon_core::presets::Tiny;
use megalodon_core::util::time_slice;
use megalodon_core::ModelConf;
use rand::{Rng, SeedableRng};

/// The CPU backend: the engine itself.
fn cpu(e: Engine) -> Option<Engine> {
    Some(e)
}

/// Set (to anything) to make the CUDA tests fail instead of skipping when no CUDA engine can be
/// made: on the GPU machine, and in the emulator's child process.
const REQUIRE_CUDA: &str = "MEGALODON_REQUIRE_CUDA";

/// The CUDA backend on GPU 0, or `None` (with the reason printed) where there is none.
fn cuda(e: Engine) -> Option<CudaEngine> {
    made(CudaEngine::new(&e, 0))
}

/// The CUDA engine, or `None` (with the reason printed) where none could be made; a panic then
/// when [`REQUIRE_CUDA`] is set.
fn made(r: anyhow::Result<CudaEngine>) -> Option<CudaEngine> {
    match r {
        Ok(c) => Some(c),
        Err(err) if std::env::var_os(REQUIRE_CUDA).is_some() => {
            panic!("{REQUIRE_CUDA} is set but no CUDA engine could be made: {err:#}")
        }
        Err(err) => {
            println!("SKIPPED: no CUDA engine here ({err:#})");
            None
        }
    }
}

/// One `#[test]` per backend for a generic test body.
macro_rules! on_backends {
    ($body:ident: $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $body(cpu);
        }
        #[test]
        fn $cuda() {
            $body(cuda);
        }
    };
}

const TOL: f64 = 1e-4;

fn fixture(name: &str) -> Golden {
    let dir = megalodon_core::device::fixtures_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures"
    ));
    Golden::load(dir.join(name)).unwrap()
}

fn golden_model(g: &Golden) -> (Tiny<f32, Cpu>, ModelConf) {
    let conf: ModelConf = serde_json::from_value(g.value(&["config"]).unwrap().clone()).unwrap();
    let mut m = Tiny::<f32, Cpu>::new(&Cpu::default(), conf.clone(), 0).unwrap();
    load_params(&mut m, g, &["params"]).unwrap();
    (m, conf)
}

/// Feeds one row of `tokens` in calls of the given lengths; returns all logits `(len, vocab)`.
fn stream<B: StreamBackend>(
    engine: &B,
    state: &mut B::State,
    tokens: &[usize],
    calls: &[usize],
) -> Vec<f64> {
    let v = engine.dims().vocab;
    let mut out = Vec::with_capacity(tokens.len() * v);
    let mut pos = 0;
    for &n in calls {
        let mut rows = vec![0f32; n * v];
        engine
            .feed(state, &tokens[pos..pos + n], Want::All, &mut |i, row| {
                rows[i * v..(i + 1) * v].copy_from_slice(row)
            })
            .unwrap();
        out.extend(rows.iter().map(|&x| x as f64));
        pos += n;
    }
    out
}

/// The shared body: the engine's logits of every row of `tokens (b, t)`, fed in `calls`, with
/// blocks of `block`, must equal `want (b, t', vocab)` (t' = sum of calls) within `TOL`.
#[allow(clippy::too_many_arguments)]
fn check<B: StreamBackend>(
    engine: &B,
    tokens: &[usize],
    b: usize,
    t: usize,
    calls: &[usize],
    block: usize,
    want: &[f64],
    what: &str,
) {
    let total: usize = calls.iter().sum();
    let mut got = Vec::new();
    for r in 0..b {
        let row = time_slice(tokens, b, t, 1, 0, t);
        let row = &row[r * t..r * t + total];
        let mut s = engine.new_state(block).unwrap();
        got.extend(stream(engine, &mut s, row, calls));
    }
    let d = max_abs_diff(&got, want);
    println!("{what}: max|diff| = {d:.3e}");
    assert!(d < TOL, "{what}: engine logits differ by {d}");
}

on_backends!(golden_body: cpu_matches_the_golden_logits, cuda_matches_the_golden_logits);

fn golden_body<B: StreamBackend>(make: fn(Engine) -> Option<B>) {
    for file in ["megalodon-golden-tiny.json", "model_swiglu.json"] {
        let g = fixture(file);
        let (mut m, conf) = golden_model(&g);
        let Some(e) = make(Engine::from_model(&mut m, &conf).unwrap()) else {
            return;
        };
        let tk = g.tensor(&["tokens"]).unwrap();
        let (b, t) = (tk.shape[0], tk.shape[1]);
        let toks: Vec<usize> = tk.data.iter().map(|&x| x as usize).collect();
        let full = g.tensor(&["logits_full"]).unwrap().data;
        for block in [1, 3, t] {
            check(
                &e,
                &toks,
                b,
                t,
                &[t],
                block,
                &full,
                &format!("{file} full, block {block}"),
            );
        }
        let split = g.usizes(&["incremental_split"]).unwrap();
        let inc = g.tensor(&["logits_incremental"]).unwrap().data;
        check(
            &e,
            &toks,
            b,
            t,
            &split,
            4,
            &inc,
            &format!("{file} incremental"),
        );
    }
}

fn random_tiny(chunk: usize, vocab: usize, seed: u64) -> (Tiny<f32, Cpu>, ModelConf) {
    let conf = Tiny::<f32, Cpu>::default_conf(chunk, vocab);
    (
        Tiny::<f32, Cpu>::new(&Cpu::default(), conf.clone(), seed).unwrap(),
        conf,
    )
}

/// `t` random token ids (seeded by `seed`) and the dfdx model's logits for them in one forward.
fn random_stream(
    m: &Tiny<f32, Cpu>,
    conf: &ModelConf,
    t: usize,
    seed: u64,
) -> (Vec<usize>, Vec<f64>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let toks: Vec<usize> = (0..t).map(|_| rng.gen_range(0..conf.vocab_size)).collect();
    let want = m
        .forward(&toks, 1, t)
        .unwrap()
        .as_vec()
        .iter()
        .map(|&x| x as f64)
        .collect();
    (toks, want)
}

on_backends!(dfdx_body: cpu_matches_the_dfdx_model, cuda_matches_the_dfdx_model);

/// Across chunks and calls, any block size, only the last row, no rows.
fn dfdx_body<B: StreamBackend>(make: fn(Engine) -> Option<B>) {
    let (mut m, conf) = random_tiny(16, 97, 5);
    let Some(e) = make(Engine::from_model(&mut m, &conf).unwrap()) else {
        return;
    };
    let t = 150;
    let (toks, want) = random_stream(&m, &conf, t, 1);
    check(&e, &toks, 1, t, &[t], 1, &want, "150 tokens, block 1");
    check(&e, &toks, 1, t, &[t], 64, &want, "150 tokens, block 64");
    check(
        &e,
        &toks,
        1,
        t,
        &[7, 1, 40, 16, 86],
        5,
        &want,
        "150 tokens in 5 calls",
    );
    // only the last row, and no rows
    let mut s = e.new_state(32).unwrap();
    let mut last = Vec::new();
    e.feed(&mut s, &toks, Want::Last, &mut |i, row| {
        assert_eq!(i, t - 1);
        last = row.to_vec();
    })
    .unwrap();
    let d = max_abs_diff(
        &last.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        &want[(t - 1) * 97..],
    );
    assert!(d < TOL, "last-row logits differ by {d}");
    let mut s2 = e.new_state(32).unwrap();
    e.feed(&mut s2, &toks, Want::None, &mut |_, _| {
        panic!("no logits asked")
    })
    .unwrap();
    assert_eq!(B::position(&s2), t as u64);
}

on_backends!(long_prefill_body: cpu_long_prefill_matches_the_dfdx_model,
    cuda_long_prefill_matches_the_dfdx_model);

/// Prefill blocks long enough for the CUDA engine's chunked CEMA scan (`CEMA_SEGMENT` rows per
/// segment, from `2 * CEMA_SEGMENT` rows up), with a carried state entering it, a last segment
/// shorter than the others, and blocks clipped at chunk boundaries.
fn long_prefill_body<B: StreamBackend>(make: fn(Engine) -> Option<B>) {
    use megalodon_core::engine::cuda::CEMA_SEGMENT;
    let (mut m, conf) = random_tiny(128, 61, 9);
    let Some(e) = make(Engine::from_model(&mut m, &conf).unwrap()) else {
        return;
    };
    let t = 300;
    let (toks, want) = random_stream(&m, &conf, t, 3);
    for block in [128, 2 * CEMA_SEGMENT + 8] {
        let what = format!("300 tokens, block {block}");
        check(&e, &toks, 1, t, &[t], block, &want, &what);
    }
    check(
        &e,
        &toks,
        1,
        t,
        &[5, 250, 45],
        128,
        &want,
        "300 tokens in 3 calls",
    );
}

on_backends!(rewindow_body: cpu_rewindowed_matches_dfdx, cuda_rewindowed_matches_dfdx);

fn rewindow_body<B: StreamBackend>(make: fn(Engine) -> Option<B>) {
    let chunk = 8;
    let (mut m, conf) = random_tiny(chunk, 61, 9);
    let Some(e) = make(Engine::from_model(&mut m, &conf).unwrap()) else {
        return;
    };
    let rw = Rewindow::new(4, 2);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let t = 12 * chunk;
    let toks: Vec<usize> = (0..t).map(|_| rng.gen_range(0..61)).collect();
    let calls = vec![chunk; t / chunk];
    let mut ds = m.new_state_rewindowed(1, rw.clone()).unwrap();
    let want: Vec<f64> = m
        .forward_in_calls(&toks, 1, t, &calls, &mut ds)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let mut es = e.new_state_rewindowed(chunk, rw).unwrap();
    let got = stream(&e, &mut es, &toks, &calls);
    let d = max_abs_diff(&got, &want);
    println!("re-windowed: max|diff| = {d:.3e}");
    assert!(d < TOL, "re-windowed logits differ by {d}");
    // and it is not the cumulative stream (the re-windowing did something)
    let mut cs = e.new_state(chunk).unwrap();
    let cum = stream(&e, &mut cs, &toks, &calls);
    assert!(max_abs_diff(&cum, &want) > 1e-3);
}

on_backends!(constant_body: cpu_state_stays_constant_over_100k_tokens,
    cuda_state_stays_constant_over_100k_tokens);

fn constant_body<B: StreamBackend>(make: fn(Engine) -> Option<B>) {
    let (mut m, conf) = random_tiny(16, 50, 2);
    let Some(e) = make(Engine::from_model(&mut m, &conf).unwrap()) else {
        return;
    };
    let mut s = e.new_state(64).unwrap();
    let bytes0 = B::state_bytes(&s);
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let block: Vec<usize> = (0..1000).map(|_| rng.gen_range(0..50)).collect();
    let mut last = 0f32;
    for _ in 0..100 {
        e.feed(&mut s, &block, Want::Last, &mut |_, row| last = row[0])
            .unwrap();
        assert_eq!(B::state_bytes(&s), bytes0, "a buffer grew");
    }
    assert_eq!(B::position(&s), 100_000);
    assert!(last.is_finite());
    println!("state: {bytes0} bytes after 0 and 100000 tokens");
}

on_backends!(bad_input_body: cpu_rejects_bad_input, cuda_rejects_bad_input);

fn bad_input_body<B: StreamBackend>(make: fn(Engine) -> Option<B>) {
    let (mut m, conf) = random_tiny(8, 20, 1);
    let Some(e) = make(Engine::from_model(&mut m, &conf).unwrap()) else {
        return;
    };
    let mut s = e.new_state(4).unwrap();
    let err = e
        .feed(&mut s, &[1, 20], Want::All, &mut |_, _| {})
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("token id 20 at position 1"),
        "{err:#}"
    );
    let err = e.feed(&mut s, &[], Want::All, &mut |_, _| {}).unwrap_err();
    assert!(format!("{err:#}").contains("empty prompt"), "{err:#}");
    let (mut m2, conf2) = random_tiny(8, 20, 2);
    let e2 = make(Engine::from_model(&mut m2, &conf2).unwrap()).unwrap();
    let err = e2
        .feed(&mut s, &[1], Want::All, &mut |_, _| {})
        .unwrap_err();
    assert!(format!("{err:#}").contains("another model"), "{err:#}");
    assert!(e.new_state(0).is_err());
    // weights of another preset
    let mut other = conf.clone();
    other.ffn_hidden_dim = 64;
    let err = Engine::from_model(&mut m, &other).unwrap_err();
    assert!(format!("{err:#}").contains("nffn.fc1.weight"), "{err:#}");
}

/// The reduced-precision tests' common ground: a random `Tiny` (chunk 16, vocabulary 97), its f32
/// engine, 100 random tokens, the f32 engine's logits of them, and their largest |logit| (the
/// logits asserted finite, so that bounds relative to it mean something).
struct Reduced {
    model: Tiny<f32, Cpu>,
    conf: ModelConf,
    engine: Engine,
    toks: Vec<usize>,
    want: Vec<f64>,
    spread: f64,
}

fn reduced_case() -> Reduced {
    let (mut model, conf) = random_tiny(16, 97, 5);
    let engine = Engine::from_model(&mut model, &conf).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let t = 100;
    let toks: Vec<usize> = (0..t).map(|_| rng.gen_range(0..97)).collect();
    let want = stream(&engine, &mut engine.new_state(t).unwrap(), &toks, &[t]);
    // the largest |logit|, NaN-propagating (f64::max would skip a NaN), then checked finite
    let spread = want.iter().fold(0.0f64, |m, x| {
        if m.is_nan() || x.is_nan() {
            f64::NAN
        } else {
            m.max(x.abs())
        }
    });
    assert!(
        spread.is_finite(),
        "non-finite f32 logits (max |logit| {spread})"
    );
    Reduced {
        model,
        conf,
        engine,
        toks,
        want,
        spread,
    }
}

#[test]
fn int8_weights_track_the_f32_engine() {
    let Reduced {
        engine: e,
        toks,
        want,
        spread,
        ..
    } = reduced_case();
    let t = toks.len();
    let mut q = e.clone();
    q.quantize_int8();
    assert!(q.is_int8() && !e.is_int8());
    let ratio = q.weight_bytes() as f64 / e.weight_bytes() as f64;
    println!(
        "int8 weights: {} of {} bytes ({ratio:.3})",
        q.weight_bytes(),
        e.weight_bytes()
    );
    assert!(ratio < 0.3, "int8 weights take {ratio} of the f32 bytes");
    let mut sf = e.new_state(t).unwrap();
    // prefill (dequantised tiles through gemm) and decode (int8 mat-vec) are the same function
    let mut sq = q.new_state(t).unwrap();
    let prefill = stream(&q, &mut sq, &toks, &[t]);
    check(
        &q,
        &toks,
        1,
        t,
        &[t],
        1,
        &prefill,
        "int8 decode vs int8 prefill",
    );
    // close to f32, but not equal (the weights really are int8)
    let d = max_abs_diff(&prefill, &want);
    println!("int8 vs f32: max|diff| = {d:.3e} (max|logit| {spread:.3})");
    assert!(
        d > 1e-6 && d < 0.05 * spread,
        "int8 logits differ from f32 by {d}"
    );
    // a state of the f32 engine is refused
    let err = q.feed(&mut sf, &[1], Want::All, |_, _| {}).unwrap_err();
    assert!(format!("{err:#}").contains("another model"), "{err:#}");
}

/// Logits of a bf16 engine may differ from the f32 engine's by this fraction of the largest
/// |logit| (`docs/engine.md`, bf16).
const BF16_TOL: f64 = 0.03;

#[test]
fn bf16_rounding_is_round_to_nearest_even() {
    assert_eq!(bf16_bits(1.0), 0x3f80);
    assert_eq!(bf16_bits(-2.0), 0xc000);
    // exactly halfway: to the even neighbour, down from 1 + 2^-8 and up from 1 + 3 * 2^-8
    assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
    assert_eq!(bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
    // above halfway rounds up
    assert_eq!(bf16_bits(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
    assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
    assert!(round_bf16(f32::NAN).is_nan());
    // the largest finite f32 rounds to infinity, as in IEEE round-to-nearest
    assert_eq!(bf16_bits(f32::MAX), 0x7f80);
    for x in [0.1f32, -3.7, 1e-20, 6.5e4] {
        let r = round_bf16(x);
        assert!(((r - x) / x).abs() <= 2f32.powi(-9), "{x} -> {r}");
    }
}

/// What rounding to bf16 alone does to the logits, measured on the CPU: every parameter of a
/// random `Tiny` rounded to bf16 (more than the bf16 engine rounds: it keeps the norms and CEMA
/// in f32) must move the logits, by well under the bf16 tolerance, which also has to cover the
/// rounding of the products' inputs.
#[test]
fn bf16_weights_stay_within_the_bf16_tolerance_on_the_cpu() {
    struct Round;
    impl ParamVisitor<f32, Cpu> for Round {
        fn visit<S: Shape>(&mut self, _: &str, t: &mut Tensor<S, f32, Cpu>) -> anyhow::Result<()> {
            let v: Vec<f32> = t.as_vec().into_iter().map(round_bf16).collect();
            t.copy_from(&v);
            Ok(())
        }
    }
    let Reduced {
        mut model,
        conf,
        toks,
        want,
        spread,
        ..
    } = reduced_case();
    let t = toks.len();
    model.visit_params("", &mut Round).unwrap();
    let r = Engine::from_model(&mut model, &conf).unwrap();
    let got = stream(&r, &mut r.new_state(t).unwrap(), &toks, &[t]);
    let d = max_abs_diff(&got, &want);
    println!(
        "bf16-rounded weights vs f32 (CPU): max|diff| = {d:.3e} = {:.4} of max|logit| {spread:.3}",
        d / spread
    );
    assert!(d > 1e-6 && d < 0.5 * BF16_TOL * spread, "{d} vs {spread}");
}

/// The bf16 CUDA engine against the f32 CPU engine: close (within `BF16_TOL` of the largest
/// |logit|) but not equal, its decode equal to its own prefill, about half the weight bytes of
/// the f32 CUDA engine. Skips without a GPU.
#[test]
fn cuda_bf16_tracks_the_f32_engine() {
    let Reduced {
        engine: e,
        toks,
        want,
        spread,
        ..
    } = reduced_case();
    let t = toks.len();
    let Some(b) = made(CudaEngine::with_precision(&e, 0, Precision::Bf16)) else {
        return;
    };
    let f = CudaEngine::new(&e, 0).unwrap();
    assert_eq!(
        (b.precision(), f.precision()),
        (Precision::Bf16, Precision::F32)
    );
    let ratio = b.weight_bytes() as f64 / f.weight_bytes() as f64;
    println!(
        "bf16 CUDA weights: {} of {} bytes ({ratio:.3})",
        b.weight_bytes(),
        f.weight_bytes()
    );
    assert!(ratio < 0.75, "bf16 weights take {ratio} of the f32 bytes");
    let prefill = stream(&b, &mut b.new_state(t).unwrap(), &toks, &[t]);
    let ones = vec![1; t];
    let decode = stream(&b, &mut b.new_state(1).unwrap(), &toks, &ones);
    let dd = max_abs_diff(&decode, &prefill);
    let d = max_abs_diff(&prefill, &want);
    println!(
        "bf16 CUDA vs f32 CPU: max|diff| = {d:.3e} = {:.4} of max|logit| {spread:.3}; \
         bf16 decode vs prefill {dd:.3e}",
        d / spread
    );
    assert!(
        dd < 1e-3 * spread,
        "bf16 decode differs from prefill by {dd}"
    );
    assert!(
        d > 1e-6 && d < BF16_TOL * spread,
        "bf16 logits differ from f32 by {d}"
    );
}

/// The CUDA tests above (every one but the 100K-token stream, too slow emulated) run again in a
/// child process whose `LD_LIBRARY_PATH` starts with the CPU emulator of CUDA
/// (`megalodon_core::engine::emulator`, `kernels/emu/`): the CUDA backend's host code and the
/// project's kernels execute for real and must pass the same bodies (1e-4). Skips without a C++
/// compiler unless `MEGALODON_REQUIRE_EMULATOR` is set (CI sets it).
#[test]
fn cuda_backend_runs_on_the_cpu_emulator() {
    use megalodon_core::engine::emulator;
    if emulator::is_child() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emulator");
    let args = [
        "cuda_",
        "--skip",
        "cuda_state_stays_constant_over_100k_tokens",
        "--skip",
        "cuda_backend_runs_on_the_cpu_emulator",
    ];
    if let Some(passed) = emulator::rerun_tests(&dir, &args).unwrap() {
        assert!(passed >= 6, "only {passed} CUDA tests ran on the emulator");
    }
}
