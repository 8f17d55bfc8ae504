//! The fused CPU block attention (`ops::attention_cpu`) against the composed dfdx reference
//! (`device::composed_block_attention`): outputs and the gradients of q, k and v, for every mask
//! kind, several blocks and heads, permuted (non-contiguous) inputs and inputs with other
//! consumers (gradients must accumulate).

use dfdx::prelude::*;
use megalodon_core::device::{composed_block_attention, BlockMask, Blocks};
use megalodon_core::ops::attention_cpu::block_attention;
use megalodon_core::util::Float;
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Imp {
    Composed,
    Fused,
}

type Tp<E> = OwnedTape<E, Cpu>;

fn attend<const H: usize, E: Float>(
    imp: Imp,
    q: Blocks<H, E, Cpu, Tp<E>>,
    k: Blocks<H, E, Cpu, Tp<E>>,
    v: Blocks<H, E, Cpu, Tp<E>>,
    mask: &BlockMask,
) -> anyhow::Result<Blocks<H, E, Cpu, Tp<E>>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    match imp {
        Imp::Composed => composed_block_attention(q, k, v, mask),
        Imp::Fused => block_attention(q, k, v, mask),
    }
}

/// One problem: sizes, mask, data (leaf layout) and options.
struct Case {
    bn: usize,
    lq: usize,
    lk: usize,
    dz: usize,
    dv: usize,
    mask: BlockMask,
    /// Leaves are `(Bn, L, H, d)` and reach the op permuted to `(Bn, H, L, d)`, as in
    /// `chunked_attention`.
    permuted: bool,
    /// q, k and v also feed `sum(x * w)` (recorded after the attention).
    other_consumer: bool,
    seed: u64,
}

/// Output and leaf gradients of q, k, v (flattened, leaf layout).
struct Res {
    out: Vec<f64>,
    gq: Vec<f64>,
    gk: Vec<f64>,
    gv: Vec<f64>,
}

fn rand_vec(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| scale * (rng.gen::<f64>() * 2.0 - 1.0))
        .collect()
}

fn to_e<E: Float>(v: &[f64]) -> Vec<E> {
    v.iter().map(|&x| E::from(x).unwrap()).collect()
}

fn f64s<E: Float>(v: Vec<E>) -> Vec<f64> {
    v.into_iter().map(|x| x.to_f64().unwrap()).collect()
}

fn run<const H: usize, E: Float>(imp: Imp, c: &Case) -> Res
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    let dev: Cpu = Default::default();
    let mut rng = StdRng::seed_from_u64(c.seed);
    let (bn, lq, lk, dz, dv) = (c.bn, c.lq, c.lk, c.dz, c.dv);
    // scale 1.5 on q and k gives O(1..10) scores: softmax neither flat nor one-hot
    let qd = rand_vec(&mut rng, bn * H * lq * dz, 1.5);
    let kd = rand_vec(&mut rng, bn * H * lk * dz, 1.5);
    let vd = rand_vec(&mut rng, bn * H * lk * dv, 1.0);
    let gd = rand_vec(&mut rng, bn * H * lq * dv, 1.0);
    let wq = rand_vec(&mut rng, qd.len(), 1.0);
    let wk = rand_vec(&mut rng, kd.len(), 1.0);
    let wv = rand_vec(&mut rng, vd.len(), 1.0);
    let g: Blocks<H, E, Cpu> = dev.tensor_from_vec(to_e(&gd), (bn, Const::<H>, lq, dv));

    if c.permuted {
        let leaf =
            |d: &[f64], l: usize, w: usize| -> Tensor<(usize, usize, Const<H>, usize), E, Cpu> {
                dev.tensor_from_vec(to_e(d), (bn, l, Const::<H>, w))
            };
        let (ql, kl, vl) = (leaf(&qd, lq, dz), leaf(&kd, lk, dz), leaf(&vd, lk, dv));
        let qt = ql.leaky_trace();
        let kt = kl.retaped::<Tp<E>>();
        let vt = vl.retaped::<Tp<E>>();
        let p = |t: Tensor<(usize, usize, Const<H>, usize), E, Cpu, Tp<E>>| {
            t.permute::<_, Axes4<0, 2, 1, 3>>()
        };
        let (q2, k2, v2) = (
            qt.retaped::<Tp<E>>(),
            kt.retaped::<Tp<E>>(),
            vt.retaped::<Tp<E>>(),
        );
        let out = attend(imp, p(qt), p(kt), p(vt), &c.mask).unwrap();
        let outv = f64s(out.as_vec());
        let mut loss = (out * g).sum();
        if c.other_consumer {
            let w = |d: &[f64], l: usize, x: usize| leaf(d, l, x);
            loss = loss
                + (q2 * w(&wq, lq, dz)).sum()
                + (k2 * w(&wk, lk, dz)).sum()
                + (v2 * w(&wv, lk, dv)).sum();
        }
        let grads = loss.backward();
        Res {
            out: outv,
            gq: f64s(grads.get(&ql).as_vec()),
            gk: f64s(grads.get(&kl).as_vec()),
            gv: f64s(grads.get(&vl).as_vec()),
        }
    } else {
        let leaf = |d: &[f64], l: usize, w: usize| -> Blocks<H, E, Cpu> {
            dev.tensor_from_vec(to_e(d), (bn, Const::<H>, l, w))
        };
        let (ql, kl, vl) = (leaf(&qd, lq, dz), leaf(&kd, lk, dz), leaf(&vd, lk, dv));
        let qt = ql.leaky_trace();
        let kt = kl.retaped::<Tp<E>>();
        let vt = vl.retaped::<Tp<E>>();
        let (q2, k2, v2) = (
            qt.retaped::<Tp<E>>(),
            kt.retaped::<Tp<E>>(),
            vt.retaped::<Tp<E>>(),
        );
        let out = attend(imp, qt, kt, vt, &c.mask).unwrap();
        let outv = f64s(out.as_vec());
        let mut loss = (out * g).sum();
        if c.other_consumer {
            loss = loss
                + (q2 * leaf(&wq, lq, dz)).sum()
                + (k2 * leaf(&wk, lk, dz)).sum()
                + (v2 * leaf(&wv, lk, dv)).sum();
        }
        let grads = loss.backward();
        Res {
            out: outv,
            gq: f64s(grads.get(&ql).as_vec()),
            gk: f64s(grads.get(&kl).as_vec()),
            gv: f64s(grads.get(&vl).as_vec()),
        }
    }
}

/// max |a - b| / (1 + max |b|)
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = 1.0 + b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert!(
                x.is_finite() && y.is_finite(),
                "non-finite value {x} vs {y}"
            );
            (x - y).abs()
        })
        .fold(0.0, f64::max)
        / scale
}

/// Runs both implementations on the same case and compares output and gradients.
fn check<const H: usize, E: Float>(name: &str, c: &Case, tol: f64)
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    let a = run::<H, E>(Imp::Fused, c);
    let b = run::<H, E>(Imp::Composed, c);
    for (what, x, y) in [
        ("out", &a.out, &b.out),
        ("dq", &a.gq, &b.gq),
        ("dk", &a.gk, &b.gk),
        ("dv", &a.gv, &b.gv),
    ] {
        let e = rel_err(x, y);
        assert!(
            e < tol,
            "{name} ({}): {what} differs by {e:e} (tol {tol:e})",
            std::any::type_name::<E>()
        );
        assert!(
            y.iter().any(|v| v.abs() > 1e-3),
            "{name}: {what} is trivially zero"
        );
    }
}

fn causal(o: usize) -> BlockMask {
    BlockMask {
        causal_offset: Some(o),
        valid_keys: None,
    }
}

/// All mask kinds, `Bn, H > 1`, contiguous and permuted inputs.
fn all_cases<E: Float>(tol: f64)
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    let mk = |bn, lq, lk, mask: BlockMask, permuted, seed| Case {
        bn,
        lq,
        lk,
        dz: 8,
        dv: 12,
        mask,
        permuted,
        other_consumer: false,
        seed,
    };
    for permuted in [false, true] {
        let p = if permuted { "permuted" } else { "contiguous" };
        // causal, Lq = Lk (training); 150 rows cross the 128-row tile boundary
        check::<3, E>(
            &format!("causal0 {p}"),
            &mk(3, 150, 150, causal(0), permuted, 1),
            tol,
        );
        check::<1, E>(
            &format!("causal0 small {p}"),
            &mk(2, 5, 5, causal(0), permuted, 2),
            tol,
        );
        // causal with offset: Lq < Lk (decoding with a KV cache)
        check::<2, E>(
            &format!("causal3 {p}"),
            &mk(2, 7, 10, causal(3), permuted, 3),
            tol,
        );
        check::<2, E>(
            &format!("causal1 {p}"),
            &mk(1, 1, 2, causal(1), permuted, 4),
            tol,
        );
        check::<1, E>(
            &format!("causal offset tiles {p}"),
            &mk(2, 140, 200, causal(60), permuted, 5),
            tol,
        );
        // bidirectional with a padded last block
        let vk = BlockMask {
            causal_offset: None,
            valid_keys: Some(vec![9, 9, 4]),
        };
        check::<2, E>(
            &format!("valid_keys {p}"),
            &mk(3, 9, 9, vk, permuted, 6),
            tol,
        );
        let vk = BlockMask {
            causal_offset: Some(0),
            valid_keys: Some(vec![130, 70]),
        };
        check::<2, E>(
            &format!("causal+valid_keys {p}"),
            &mk(2, 130, 130, vk, permuted, 7),
            tol,
        );
        // no mask
        check::<2, E>(
            &format!("nomask {p}"),
            &mk(2, 6, 11, BlockMask::default(), permuted, 8),
            tol,
        );
        // one causal block of three tiles: with more than one thread the tiles run in parallel
        // (backward: per-thread partial dK, dV)
        check::<1, E>(
            &format!("causal one block {p}"),
            &mk(1, 300, 300, causal(0), permuted, 10),
            tol,
        );
        check::<1, E>(
            &format!("nomask tall {p}"),
            &mk(1, 260, 33, BlockMask::default(), permuted, 9),
            tol,
        );
    }
}

#[test]
fn fused_matches_composed_f64() {
    all_cases::<f64>(1e-10);
}

#[test]
fn fused_matches_composed_f32() {
    all_cases::<f32>(1e-5);
}

/// q, k and v also used elsewhere: the op must add to their gradients, not overwrite them.
#[test]
fn gradients_accumulate_with_other_consumers() {
    for permuted in [false, true] {
        let c = Case {
            bn: 2,
            lq: 6,
            lk: 6,
            dz: 4,
            dv: 5,
            mask: causal(0),
            permuted,
            other_consumer: true,
            seed: 11,
        };
        check::<2, f64>("other consumers", &c, 1e-10);
        // and the extra terms are really there: gradients differ from the single-use run
        let with = run::<2, f64>(Imp::Fused, &c);
        let without = run::<2, f64>(
            Imp::Fused,
            &Case {
                other_consumer: false,
                ..c
            },
        );
        assert!(rel_err(&with.gq, &without.gq) > 1e-3);
        assert!(rel_err(&with.gv, &without.gv) > 1e-3);
    }
}

/// q, k and v all the same tensor (one gradient entry): every contribution must land in it.
#[test]
fn aliased_inputs_accumulate() {
    let dev: Cpu = Default::default();
    let mut rng = StdRng::seed_from_u64(31);
    let (bn, l, d) = (2, 6, 4);
    let x: Blocks<2, f64, Cpu> =
        dev.tensor_from_vec(rand_vec(&mut rng, bn * 2 * l * d, 1.0), (bn, Const, l, d));
    let g: Blocks<2, f64, Cpu> =
        dev.tensor_from_vec(rand_vec(&mut rng, bn * 2 * l * d, 1.0), (bn, Const, l, d));
    let xt = x.leaky_trace();
    let (a, b) = (xt.retaped::<Tp<f64>>(), xt.retaped::<Tp<f64>>());
    let out = block_attention(xt, a, b, &causal(0)).unwrap();
    let gf = (out * g.clone()).sum().backward().get(&x).as_vec();
    // the reference needs distinct ids: x * 1
    let xt = x.leaky_trace();
    let (a, b) = (xt.retaped::<Tp<f64>>() * 1.0, xt.retaped::<Tp<f64>>() * 1.0);
    let out = composed_block_attention(xt * 1.0, a, b, &causal(0)).unwrap();
    let gc = (out * g).sum().backward().get(&x).as_vec();
    assert!(rel_err(&gf, &gc) < 1e-12, "{}", rel_err(&gf, &gc));
}

/// A block whose rows see no key gives zero output and zero gradients, and leaves the other
/// blocks untouched.
#[test]
fn fully_masked_rows_are_zero() {
    let (lq, dz, dv) = (4, 3, 5);
    let mask = BlockMask {
        causal_offset: None,
        valid_keys: Some(vec![0, 4]),
    };
    let c = Case {
        bn: 2,
        lq,
        lk: lq,
        dz,
        dv,
        mask,
        permuted: false,
        other_consumer: false,
        seed: 21,
    };
    let r = run::<1, f64>(Imp::Fused, &c);
    let half = |v: &[f64]| (v[..v.len() / 2].to_vec(), v[v.len() / 2..].to_vec());
    let all_finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
    for v in [&r.out, &r.gq, &r.gk, &r.gv] {
        assert!(all_finite(v));
        assert!(half(v).0.iter().all(|&x| x == 0.0), "masked block not zero");
    }
    // block 1 alone (full mask) through the reference: regenerate the same data layout
    let full = run::<1, f64>(
        Imp::Composed,
        &Case {
            mask: BlockMask::default(),
            ..c
        },
    );
    for (x, y) in [
        (&r.out, &full.out),
        (&r.gq, &full.gq),
        (&r.gk, &full.gk),
        (&r.gv, &full.gv),
    ] {
        assert!(rel_err(&half(x).1, &half(y).1) < 1e-12);
    }
}

#[test]
fn shape_mismatch_is_an_error() {
    let dev: Cpu = Default::default();
    let q: Blocks<1, f32, Cpu> = dev.zeros_like(&(2, Const, 4, 8));
    let k: Blocks<1, f32, Cpu> = dev.zeros_like(&(2, Const, 4, 7));
    let v: Blocks<1, f32, Cpu> = dev.zeros_like(&(2, Const, 4, 8));
    block_attention(q, k, v, &BlockMask::default()).expect_err("dz mismatch");
    let q: Blocks<1, f32, Cpu> = dev.zeros_like(&(2, Const, 4, 8));
    let k: Blocks<1, f32, Cpu> = dev.zeros_like(&(2, Const, 4, 8));
    let v: Blocks<1, f32, Cpu> = dev.zeros_like(&(2, Const, 4, 8));
    let bad = BlockMask {
        causal_offset: None,
        valid_keys: Some(vec![4]),
    };
    block_attention(q, k, v, &bad).expect_err("valid_keys length");
}

/// Without a tape the op is a plain forward with the same values.
#[test]
fn no_tape_forward_matches() {
    let dev: Cpu = Default::default();
    let mut rng = StdRng::seed_from_u64(5);
    let mk = |rng: &mut StdRng, l: usize, d: usize| -> Blocks<2, f64, Cpu> {
        dev.tensor_from_vec(rand_vec(rng, 3 * 2 * l * d, 1.0), (3, Const, l, d))
    };
    let (q, k, v) = (mk(&mut rng, 5, 4), mk(&mut rng, 7, 4), mk(&mut rng, 7, 6));
    let a = block_attention(q.clone(), k.clone(), v.clone(), &causal(2)).unwrap();
    let b = composed_block_attention(q, k, v, &causal(2)).unwrap();
    assert!(rel_err(&f64s(a.as_vec()), &f64s(b.as_vec())) < 1e-12);
}

/// Manual benchmark (run in release, one implementation per process so that peak RSS is
/// per implementation): `ATTN_IMPL=fused|composed cargo test --release -p megalodon-core
/// --test ops_attention -- --ignored --exact bench_block_attention --nocapture`. Sizes:
/// `ATTN_BN` blocks (default 16) of 1024, H = 1, dz = 64, dv = 512, f32, causal (or
/// `ATTN_MASK=none`), permuted inputs as in `chunked_attention`.
#[test]
#[ignore]
fn bench_block_attention() {
    let imp = match std::env::var("ATTN_IMPL").as_deref() {
        Ok("composed") => Imp::Composed,
        _ => Imp::Fused,
    };
    let bn: usize = std::env::var("ATTN_BN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let mask = match std::env::var("ATTN_MASK").as_deref() {
        Ok("none") => BlockMask::default(),
        _ => causal(0),
    };
    let (l, dz, dv) = (1024, 64, 512);
    let dev: Cpu = Default::default();
    let mut rng = StdRng::seed_from_u64(0);
    type Leaf = Tensor<(usize, usize, Const<1>, usize), f32, Cpu>;
    let mut leaf = |w: usize, s: f64| -> Leaf {
        dev.tensor_from_vec(to_e(&rand_vec(&mut rng, bn * l * w, s)), (bn, l, Const, w))
    };
    let (ql, kl, vl) = (leaf(dz, 0.5), leaf(dz, 0.5), leaf(dv, 1.0));
    let g: Blocks<1, f32, Cpu> = dev.tensor_from_vec(
        to_e(&rand_vec(&mut rng, bn * l * dv, 1.0)),
        (bn, Const, l, dv),
    );
    let p = |t: Tensor<(usize, usize, Const<1>, usize), f32, Cpu, Tp<f32>>| {
        t.permute::<_, Axes4<0, 2, 1, 3>>()
    };
    let status = |key: &str| -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find(|s| s.starts_with(key))
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    let (mut tf, mut tb, mut kept) = (Vec::new(), Vec::new(), 0.0);
    for it in 0..4 {
        let rss0 = status("VmRSS");
        let t0 = std::time::Instant::now();
        let out = attend(
            imp,
            p(ql.leaky_trace()),
            p(kl.retaped()),
            p(vl.retaped()),
            &mask,
        )
        .unwrap();
        let t1 = std::time::Instant::now();
        if it == 0 {
            // first iteration: allocator not yet holding freed memory
            kept = status("VmRSS") - rss0;
        }
        let grads = (out * g.clone()).sum().backward();
        let t2 = std::time::Instant::now();
        assert!(grads.get(&ql).as_vec()[0].is_finite());
        if it > 0 {
            tf.push((t1 - t0).as_secs_f64());
            tb.push((t2 - t1).as_secs_f64());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    eprintln!(
        "{imp:?} Bn={bn} L={l} dz={dz} dv={dv} f32 {mask:?}: forward {:.3} s, backward {:.3} s \
         (median of 3); RSS growth over the first forward {kept:.0} MiB, \
         peak RSS {:.0} MiB",
        med(&mut tf),
        med(&mut tb),
        status("VmHWM")
    );
}
