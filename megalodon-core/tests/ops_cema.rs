//! The CPU CEMA op (`ops::cema_cpu`, the `Cpu` implementation of `MegaDevice::cema` /
//! `cema_anticausal`) against the composed dfdx reference (`MultiHeadComplexEma::try_forward*`):
//! one test body run through both on the same inputs (outputs, final state, and gradients of u,
//! all five parameters and h0), the golden vectors of the official code, state carrying across
//! calls, and non-contiguous inputs.

use dfdx::prelude::*;
use megalodon_core::device::MegaDevice;
use megalodon_core::golden::{max_abs_diff, Golden};
use megalodon_core::nn::cema::{CemaState, MultiHeadComplexEma};
use megalodon_core::util::{to_f64, Float};
use rand::{rngs::StdRng, Rng, SeedableRng};

const M: usize = 8;
const N: usize = 4;

mod common;
use common::CemaParams as P;

fn cv<E: Float>(v: &[f64]) -> Vec<E> {
    v.iter().map(|&x| E::from(x).unwrap()).collect()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Case {
    /// causal, no h0, state returned, loss on y only
    NoH0,
    /// causal with h0 and want_state, loss on y and h_T
    H0StateLoss,
    /// anti-causal
    Anti,
}

/// Inputs of one run (all f64, cast to E).
struct Inputs {
    b: usize,
    t: usize,
    u: Vec<f64>,
    h0r: Vec<f64>,
    h0i: Vec<f64>,
    g: Vec<f64>,
    ghr: Vec<f64>,
    ghi: Vec<f64>,
}

impl Inputs {
    fn random(b: usize, t: usize, rng: &mut StdRng) -> Self {
        let mut r = |k: usize| {
            (0..k)
                .map(|_| rng.gen::<f64>() * 2.0 - 1.0)
                .collect::<Vec<f64>>()
        };
        Inputs {
            b,
            t,
            u: r(b * t * M),
            h0r: r(b * M * N),
            h0i: r(b * M * N),
            g: r(b * t * M),
            ghr: r(b * M * N),
            ghi: r(b * M * N),
        }
    }
}

/// Named output vectors: y, hT re/im (when returned), and the gradients.
type Out = Vec<(&'static str, Vec<f64>)>;

/// The test body: forward + backward of `case` through the op (`op`) or the composed reference.
fn run<E: Float>(p: &P, x: &Inputs, case: Case, op: bool) -> Out
where
    Cpu: MegaDevice<E>,
{
    let dev = Cpu::default();
    let ema = p.model::<M, N, E, _>(&dev);
    let (b, t) = (x.b, x.t);
    let seq = |v: &[f64]| -> Tensor<(usize, usize, Const<M>), E, Cpu> {
        dev.tensor_from_vec(cv(v), (b, t, Const))
    };
    let st = |v: &[f64]| -> Tensor<(usize, Const<M>, Const<N>), E, Cpu> {
        dev.tensor_from_vec(cv(v), (b, Const, Const))
    };
    let u = seq(&x.u);
    let (hr, hi) = (st(&x.h0r), st(&x.h0i));
    let mut out: Out = Vec::new();
    let loss = match case {
        Case::Anti => {
            let y = if op {
                <Cpu as MegaDevice<E>>::cema_anticausal(&ema, u.leaky_trace())
            } else {
                ema.try_forward_anticausal(u.leaky_trace())
            }
            .unwrap();
            out.push(("y", to_f64(&y)));
            (y * seq(&x.g)).sum()
        }
        Case::NoH0 | Case::H0StateLoss => {
            let h0 = (case == Case::H0StateLoss).then(|| CemaState {
                re: hr.leaky_trace(),
                im: hi.leaky_trace(),
            });
            let (y, s) = if op {
                <Cpu as MegaDevice<E>>::cema(&ema, u.leaky_trace(), h0, true)
            } else {
                ema.try_forward(u.leaky_trace(), h0, true)
            }
            .unwrap();
            let s = s.expect("state requested");
            out.push(("y", to_f64(&y)));
            out.push(("hT_re", to_f64(&s.re)));
            out.push(("hT_im", to_f64(&s.im)));
            let loss = (y * seq(&x.g)).sum();
            if case == Case::H0StateLoss {
                loss + (s.re * st(&x.ghr)).sum() + (s.im * st(&x.ghi)).sum()
            } else {
                loss
            }
        }
    };
    let gr = loss.backward();
    out.push(("grad u", to_f64(&gr.get(&u))));
    out.push(("grad alpha", to_f64(&gr.get(&ema.alpha))));
    out.push(("grad delta", to_f64(&gr.get(&ema.delta))));
    out.push(("grad theta", to_f64(&gr.get(&ema.theta))));
    out.push(("grad gamma", to_f64(&gr.get(&ema.gamma))));
    out.push(("grad omega", to_f64(&gr.get(&ema.omega))));
    if case == Case::H0StateLoss {
        out.push(("grad h0_re", to_f64(&gr.get(&hr))));
        out.push(("grad h0_im", to_f64(&gr.get(&hi))));
    }
    out
}

/// max |a - b| / max |b| (with a floor of 1 on the scale).
fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let s = b.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    max_abs_diff(a, b) / s
}

fn op_matches_composed<E: Float>(tol: f64, seed: u64)
where
    Cpu: MegaDevice<E>,
{
    let mut rng = StdRng::seed_from_u64(seed);
    let p = P::random(M, N, &mut rng);
    let mut worst = 0.0f64;
    for t in [1usize, 5, 100, 300] {
        let x = Inputs::random(2, t, &mut rng);
        for case in [Case::NoH0, Case::H0StateLoss, Case::Anti] {
            let want = run::<E>(&p, &x, case, false);
            let got = run::<E>(&p, &x, case, true);
            assert_eq!(want.len(), got.len());
            for ((name, w), (name2, g)) in want.iter().zip(&got) {
                assert_eq!(name, name2);
                let e = rel(g, w);
                worst = worst.max(e);
                assert!(
                    e <= tol,
                    "{case:?} T={t} {name}: rel err {e:.3e} > {tol:.0e}"
                );
            }
        }
    }
    println!(
        "{}: op vs composed, worst rel err {worst:.2e}",
        std::any::type_name::<E>()
    );
}

#[test]
fn op_matches_composed_f64() {
    op_matches_composed::<f64>(1e-10, 21);
}

#[test]
fn op_matches_composed_f32() {
    op_matches_composed::<f32>(1e-5, 22);
}

fn golden() -> Golden {
    Golden::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cema.json"
    ))
    .expect("golden file")
}

/// (B,D,N,2) interleaved complex -> (re, im) each (B,D,N).
fn split_c(v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    (
        v.iter().step_by(2).copied().collect(),
        v.iter().skip(1).step_by(2).copied().collect(),
    )
}

fn interleave(r: &[f64], i: &[f64]) -> Vec<f64> {
    r.iter().zip(i).flat_map(|(a, b)| [*a, *b]).collect()
}

fn golden_through_op<E: Float>(tol: f64)
where
    Cpu: MegaDevice<E>,
{
    let g = golden();
    let p = P::from_golden(&g);
    let u = g.tensor(&["u"]).unwrap();
    let (b, t) = (u.shape[0], u.shape[1]);
    let (h0r, h0i) = split_c(&g.tensor(&["h0"]).unwrap().data);
    let (ghr, ghi) = split_c(&g.tensor(&["gh"]).unwrap().data);
    let x = Inputs {
        b,
        t,
        u: u.data,
        h0r,
        h0i,
        g: g.tensor(&["g"]).unwrap().data,
        ghr,
        ghi,
    };
    let mut worst = 0.0f64;
    let mut check = |what: String, got: &[f64], want: &[f64]| {
        let e = rel(got, want);
        worst = worst.max(e);
        assert!(e <= tol, "{what}: rel err {e:.3e}");
    };
    // forward: y and h_T without / with h0
    let out = run::<E>(&p, &x, Case::NoH0, true);
    check(
        "y_no_h0".into(),
        &out[0].1,
        &g.tensor(&["y_no_h0"]).unwrap().data,
    );
    check(
        "hT_no_h0".into(),
        &interleave(&out[1].1, &out[2].1),
        &g.tensor(&["hT_no_h0"]).unwrap().data,
    );
    let with = run::<E>(&p, &x, Case::H0StateLoss, true);
    check(
        "y_h0".into(),
        &with[0].1,
        &g.tensor(&["y_h0"]).unwrap().data,
    );
    check(
        "hT_h0".into(),
        &interleave(&with[1].1, &with[2].1),
        &g.tensor(&["hT_h0"]).unwrap().data,
    );
    // gradients: no h0 (loss on y), h0 (loss on y), h0 with a loss on h_T too
    let dev = Cpu::default();
    for (key, with_h0, state_loss) in [
        ("grads_no_h0", false, false),
        ("grads_h0", true, false),
        ("grads_h0_with_state_loss", true, true),
    ] {
        let ema = p.model::<M, N, E, _>(&dev);
        let seq = |v: &[f64]| -> Tensor<(usize, usize, Const<M>), E, Cpu> {
            dev.tensor_from_vec(cv(v), (b, t, Const))
        };
        let st = |v: &[f64]| -> Tensor<(usize, Const<M>, Const<N>), E, Cpu> {
            dev.tensor_from_vec(cv(v), (b, Const, Const))
        };
        let ut = seq(&x.u);
        let (hr, hi) = (st(&x.h0r), st(&x.h0i));
        let h0 = with_h0.then(|| CemaState {
            re: hr.leaky_trace(),
            im: hi.leaky_trace(),
        });
        let (y, s) = <Cpu as MegaDevice<E>>::cema(&ema, ut.leaky_trace(), h0, state_loss).unwrap();
        let mut loss = (y * seq(&x.g)).sum();
        if let Some(s) = s {
            loss = loss + (s.re * st(&x.ghr)).sum() + (s.im * st(&x.ghi)).sum();
        }
        let gr = loss.backward();
        let mut got = vec![
            ("u", to_f64(&gr.get(&ut))),
            ("alpha", to_f64(&gr.get(&ema.alpha))),
            ("delta", to_f64(&gr.get(&ema.delta))),
            ("theta", to_f64(&gr.get(&ema.theta))),
            ("gamma", to_f64(&gr.get(&ema.gamma))),
            ("omega", to_f64(&gr.get(&ema.omega))),
        ];
        if with_h0 {
            got.push((
                "h0",
                interleave(&to_f64(&gr.get(&hr)), &to_f64(&gr.get(&hi))),
            ));
        }
        for (name, v) in got {
            check(
                format!("{key}/{name}"),
                &v,
                &g.tensor(&[key, name]).unwrap().data,
            );
        }
    }
    println!(
        "golden through the op ({}): worst rel err {worst:.2e}",
        std::any::type_name::<E>()
    );
}

#[test]
fn golden_through_op_f32() {
    golden_through_op::<f32>(1e-4);
}

#[test]
fn golden_through_op_f64() {
    golden_through_op::<f64>(1e-4);
}

/// Two op calls with the state carried (and its gradient flowing back through it) equal one call.
#[test]
fn op_state_carry_equals_one_call() {
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(13);
    let p = P::random(M, N, &mut rng);
    let ema = p.model::<M, N, f64, _>(&dev);
    let (b, t, t1) = (2usize, 150usize, 61usize);
    let u: Vec<f64> = (0..b * t * M)
        .map(|_| rng.gen::<f64>() * 2.0 - 1.0)
        .collect();
    let g: Vec<f64> = (0..b * t * M)
        .map(|_| rng.gen::<f64>() * 2.0 - 1.0)
        .collect();
    let part = |v: &[f64], lo: usize, hi: usize| -> Tensor<(usize, usize, Const<M>), f64, Cpu> {
        let w = megalodon_core::util::time_slice(v, b, t, M, lo, hi);
        dev.tensor_from_vec(w, (b, hi - lo, Const))
    };
    let uf = part(&u, 0, t);
    let (y, sf) = Cpu::cema(&ema, uf.leaky_trace(), None, true).unwrap();
    let yf = to_f64(&y);
    let sf = sf.unwrap();
    let (sf_re, sf_im) = (to_f64(&sf.re), to_f64(&sf.im));
    let gr = (y * part(&g, 0, t)).sum().backward();
    let full: Vec<Vec<f64>> = vec![
        gr.get(&ema.alpha).as_vec(),
        gr.get(&ema.delta).as_vec(),
        gr.get(&ema.theta).as_vec(),
        gr.get(&ema.gamma).as_vec(),
        gr.get(&ema.omega).as_vec(),
    ];
    let full_u = gr.get(&uf).as_vec();

    let (u1, u2) = (part(&u, 0, t1), part(&u, t1, t));
    let (y1, s1) = Cpu::cema(&ema, u1.leaky_trace(), None, true).unwrap();
    let (y2, s2) = Cpu::cema(&ema, u2.leaky_trace(), s1, true).unwrap();
    let s2 = s2.unwrap();
    let (v1, v2) = (to_f64(&y1), to_f64(&y2));
    let join = |a: &[f64], c: &[f64]| -> Vec<f64> {
        (0..b)
            .flat_map(|bi| {
                [
                    &a[bi * t1 * M..(bi + 1) * t1 * M],
                    &c[bi * (t - t1) * M..(bi + 1) * (t - t1) * M],
                ]
                .concat()
            })
            .collect()
    };
    let mut e = max_abs_diff(&join(&v1, &v2), &yf)
        .max(max_abs_diff(&to_f64(&s2.re), &sf_re))
        .max(max_abs_diff(&to_f64(&s2.im), &sf_im));
    let gr = ((y1 * part(&g, 0, t1)).sum() + (y2 * part(&g, t1, t)).sum()).backward();
    let split: Vec<Vec<f64>> = vec![
        gr.get(&ema.alpha).as_vec(),
        gr.get(&ema.delta).as_vec(),
        gr.get(&ema.theta).as_vec(),
        gr.get(&ema.gamma).as_vec(),
        gr.get(&ema.omega).as_vec(),
    ];
    for (a, c) in split.iter().zip(&full) {
        e = e.max(max_abs_diff(a, c));
    }
    let (g1, g2) = (gr.get(&u1).as_vec(), gr.get(&u2).as_vec());
    e = e.max(max_abs_diff(&join(&g1, &g2), &full_u));
    assert!(e < 1e-10, "{e}");
}

/// A permuted (non-contiguous) input and a second consumer of `u` (gradients must accumulate).
#[test]
fn op_noncontiguous_input_and_accumulation() {
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(17);
    let p = P::random(M, N, &mut rng);
    let (b, t) = (3usize, 70usize);
    let x = Inputs::random(b, t, &mut rng);
    // u stored time-major (T, B, M), viewed as (B, T, M)
    let ut: Vec<f64> = (0..t)
        .flat_map(|ti| (0..b).flat_map(move |bi| (0..M).map(move |d| (bi, ti, d))))
        .map(|(bi, ti, d)| x.u[(bi * t + ti) * M + d])
        .collect();
    let mut res = Vec::new();
    for op in [false, true] {
        let ema = p.model::<M, N, f64, _>(&dev);
        let base: Tensor<(usize, usize, Const<M>), f64, Cpu> =
            dev.tensor_from_vec(ut.clone(), (t, b, Const));
        let gt: Tensor<(usize, usize, Const<M>), f64, Cpu> =
            dev.tensor_from_vec(x.g.clone(), (b, t, Const));
        let traced = base.leaky_trace();
        let (u1, tape) = traced.split_tape();
        let u2 = u1.clone();
        let u1 = u1.put_tape(tape).permute::<_, Axes3<1, 0, 2>>();
        let u2 = u2
            .retaped::<OwnedTape<f64, Cpu>>()
            .permute::<_, Axes3<1, 0, 2>>();
        let (y, _) = if op {
            Cpu::cema(&ema, u1, None, false)
        } else {
            ema.try_forward(u1, None, false)
        }
        .unwrap();
        let loss = (y * gt).sum() + u2.square().sum();
        let gr = loss.backward();
        res.push((gr.get(&base).as_vec(), gr.get(&ema.theta).as_vec()));
    }
    let e = max_abs_diff(&res[0].0, &res[1].0).max(max_abs_diff(&res[0].1, &res[1].1));
    assert!(e < 1e-10, "{e}");
}

#[test]
fn op_rejects_bad_shapes() {
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(9);
    let ema = MultiHeadComplexEma::<8, 4, f32, Cpu>::new(&dev, &mut rng);
    let u: Tensor<(usize, usize, Const<8>), f32, Cpu> = dev.zeros_like(&(2, 5, Const));
    let h0 = CemaState {
        re: dev.zeros_like(&(3, Const, Const)),
        im: dev.zeros_like(&(3, Const, Const)),
    };
    assert!(Cpu::cema(&ema, u, Some(h0), false).is_err());
    let u0: Tensor<(usize, usize, Const<8>), f32, Cpu> = dev.zeros_like(&(2, 0, Const));
    assert!(Cpu::cema_anticausal(&ema, u0).is_err());
}

/// Release-mode timing of composed vs op (fwd+bwd, loss = sum(y)); run with
/// `cargo test --release -p megalodon-core --test ops_cema -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_op_vs_composed() {
    let dev = Cpu::default();
    dev.enable_cache();
    let mut rng = StdRng::seed_from_u64(0);
    let ema = MultiHeadComplexEma::<256, 16, f32, Cpu>::new(&dev, &mut rng);
    let ts: Vec<usize> = std::env::var("CEMA_T")
        .map(|s| s.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![1024, 4096, 16384, 65536]);
    let which = std::env::var("CEMA_WHICH").unwrap_or_else(|_| "both".into());
    for t in ts {
        let u: Tensor<(usize, usize, Const<256>), f32, Cpu> =
            dev.sample_normal_like(&(1, t, Const));
        for op in [false, true] {
            if (op && which == "composed") || (!op && which == "op") {
                continue;
            }
            let reps = if t >= 65536 { 3 } else { 5 };
            let mut times = Vec::new();
            let mut fwd = f64::INFINITY;
            for _ in 0..reps {
                let st = std::time::Instant::now();
                let (y, _) = if op {
                    Cpu::cema(&ema, u.leaky_trace(), None, false)
                } else {
                    ema.try_forward(u.leaky_trace(), None, false)
                }
                .unwrap();
                let g = y.sum().backward();
                std::hint::black_box(g.get(&u));
                times.push(st.elapsed().as_secs_f64());
                let st = std::time::Instant::now();
                let (y, _) = if op {
                    Cpu::cema(&ema, u.clone(), None, false)
                } else {
                    ema.try_forward(u.clone(), None, false)
                }
                .unwrap();
                std::hint::black_box(y);
                fwd = fwd.min(st.elapsed().as_secs_f64());
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "{} M=256 N=16 B=1 T={t}: fwd+bwd median {:.1} ms (min {:.1}), fwd {:.1} ms",
                if op { "op      " } else { "composed" },
                times[times.len() / 2] * 1e3,
                times[0] * 1e3,
                fwd * 1e3
            );
        }
    }
}

/// Several channel blocks (M = 20: blocks of 8, 8, 4), B = 1 and 2, long enough for the
/// threaded path (several tasks, block groups), causal with h0 + state loss and anti-causal.
#[test]
fn op_matches_composed_multiblock_f64() {
    const M2: usize = 20;
    const N2: usize = 4;
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(31);
    let mut r = |k: usize, s: f64| -> Vec<f64> {
        (0..k).map(|_| s * (rng.gen::<f64>() * 2.0 - 1.0)).collect()
    };
    let ema = MultiHeadComplexEma::<M2, N2, f64, Cpu> {
        alpha: dev.tensor_from_vec(r(M2 * N2, 1.5), Rank3::<M2, N2, 1>::default()),
        delta: dev.tensor_from_vec(r(M2 * N2, 1.5), Rank3::<M2, N2, 1>::default()),
        theta: dev.tensor_from_vec(r(M2, 2.0), Rank3::<M2, 1, 1>::default()),
        gamma: dev.tensor_from_vec(r(M2 * N2 * 2, 1.0), Rank3::<M2, N2, 2>::default()),
        omega: dev.tensor_from_vec(r(M2, 0.5), Rank2::<M2, 1>::default()),
    };
    for (b, t) in [(1usize, 1100usize), (2, 530)] {
        let (u, g) = (r(b * t * M2, 1.0), r(b * t * M2, 1.0));
        let (h0r, h0i, ghr, ghi) = (
            r(b * M2 * N2, 1.0),
            r(b * M2 * N2, 1.0),
            r(b * M2 * N2, 1.0),
            r(b * M2 * N2, 1.0),
        );
        for anti in [false, true] {
            let mut res = Vec::new();
            for op in [false, true] {
                let ut: Tensor<(usize, usize, Const<M2>), f64, Cpu> =
                    dev.tensor_from_vec(u.clone(), (b, t, Const));
                let gt: Tensor<(usize, usize, Const<M2>), f64, Cpu> =
                    dev.tensor_from_vec(g.clone(), (b, t, Const));
                let st = |v: &[f64]| -> Tensor<(usize, Const<M2>, Const<N2>), f64, Cpu> {
                    dev.tensor_from_vec(v.to_vec(), (b, Const, Const))
                };
                let (hr, hi) = (st(&h0r), st(&h0i));
                let mut vals = Vec::new();
                let loss = if anti {
                    let y = if op {
                        Cpu::cema_anticausal(&ema, ut.leaky_trace())
                    } else {
                        ema.try_forward_anticausal(ut.leaky_trace())
                    }
                    .unwrap();
                    vals.push(to_f64(&y));
                    (y * gt).sum()
                } else {
                    let h0 = Some(CemaState {
                        re: hr.leaky_trace(),
                        im: hi.leaky_trace(),
                    });
                    let (y, s) = if op {
                        Cpu::cema(&ema, ut.leaky_trace(), h0, true)
                    } else {
                        ema.try_forward(ut.leaky_trace(), h0, true)
                    }
                    .unwrap();
                    let s = s.unwrap();
                    vals.push(to_f64(&y));
                    vals.push(to_f64(&s.re));
                    vals.push(to_f64(&s.im));
                    (y * gt).sum() + (s.re * st(&ghr)).sum() + (s.im * st(&ghi)).sum()
                };
                let gr = loss.backward();
                vals.push(gr.get(&ut).as_vec());
                vals.push(gr.get(&ema.alpha).as_vec());
                vals.push(gr.get(&ema.delta).as_vec());
                vals.push(gr.get(&ema.theta).as_vec());
                vals.push(gr.get(&ema.gamma).as_vec());
                vals.push(gr.get(&ema.omega).as_vec());
                if !anti {
                    vals.push(gr.get(&hr).as_vec());
                    vals.push(gr.get(&hi).as_vec());
                }
                res.push(vals);
            }
            for (i, (w, got)) in res[0].iter().zip(&res[1]).enumerate() {
                let e = rel(got, w);
                assert!(e < 1e-10, "B={b} T={t} anti={anti} output {i}: {e:.3e}");
            }
        }
    }
}
