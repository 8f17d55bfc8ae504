//! CEMA (spec section 4): golden vectors from the official code, a plain f64 recurrence,
//! finite differences, state carrying and the anti-causal direction.

use dfdx::prelude::*;
use megalodon_core::golden::{max_abs_diff, Golden};
use megalodon_core::nn::cema::{CemaState, MultiHeadComplexEma};
use megalodon_core::util::to_f64;
use rand::{rngs::StdRng, Rng, SeedableRng};

const GM: usize = 8; // golden model_dim
const GN: usize = 4; // golden cema_ndim

fn golden() -> Golden {
    Golden::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cema.json"
    ))
    .expect("golden file")
}

mod common;
use common::CemaParams as P;

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Plain f64 recurrence of spec 4.3. u (B,T,M); h0 (B,M,N) re/im. Returns y (B,T,M), hT re/im.
#[allow(clippy::too_many_arguments)]
fn reference(
    p: &P,
    m: usize,
    n: usize,
    b: usize,
    t: usize,
    u: &[f64],
    h0: Option<(&[f64], &[f64])>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; b * t * m];
    let (mut hr, mut hi) = match h0 {
        Some((r, i)) => (r.to_vec(), i.to_vec()),
        None => (vec![0.0; b * m * n], vec![0.0; b * m * n]),
    };
    for bi in 0..b {
        for d in 0..m {
            let phi = sig(p.theta[d]) * 2.0 * std::f64::consts::PI / n as f64;
            for k in 0..n {
                let a = sig(p.alpha[d * n + k]);
                let r = 1.0 - a * sig(p.delta[d * n + k]);
                let ang = (k + 1) as f64 * phi;
                let (qr, qi) = (r * ang.cos(), r * ang.sin());
                let s = 1.0 / (n as f64).sqrt();
                let (er, ei) = (
                    p.gamma[(d * n + k) * 2] * s,
                    p.gamma[(d * n + k) * 2 + 1] * s,
                );
                let j = (bi * m + d) * n + k;
                for ti in 0..t {
                    let x = u[(bi * t + ti) * m + d];
                    let nr = a * x + qr * hr[j] - qi * hi[j];
                    let ni = qr * hi[j] + qi * hr[j];
                    hr[j] = nr;
                    hi[j] = ni;
                    y[(bi * t + ti) * m + d] += er * nr - ei * ni;
                }
            }
            for ti in 0..t {
                y[(bi * t + ti) * m + d] += p.omega[d] * u[(bi * t + ti) * m + d];
            }
        }
    }
    (y, hr, hi)
}

/// Time reversal of a (B,T,M) array.
fn reverse(v: &[f64], b: usize, t: usize, m: usize) -> Vec<f64> {
    let mut o = vec![0.0; v.len()];
    for bi in 0..b {
        for ti in 0..t {
            for d in 0..m {
                o[(bi * t + ti) * m + d] = v[(bi * t + (t - 1 - ti)) * m + d];
            }
        }
    }
    o
}

/// (B,D,N,2) interleaved complex -> (re, im) each (B,D,N).
fn split_c(v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    (
        v.iter().step_by(2).copied().collect(),
        v.iter().skip(1).step_by(2).copied().collect(),
    )
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let s = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    max_abs_diff(a, b) / s
}

type U<E> = Tensor<(usize, usize, Const<GM>), E, Cpu>;

#[test]
fn golden_forward_f32() {
    let g = golden();
    let dev = Cpu::default();
    let p = P::from_golden(&g);
    let cema = p.model::<GM, GN, f32, _>(&dev);
    let u = g.tensor(&["u"]).unwrap();
    let (b, t) = (u.shape[0], u.shape[1]);
    let uf: Vec<f32> = u.data.iter().map(|&x| x as f32).collect();
    let ut: U<f32> = dev.tensor_from_vec(uf, (b, t, Const));
    let (h0r, h0i) = split_c(&g.tensor(&["h0"]).unwrap().data);
    let mk = |v: &[f64]| {
        dev.tensor_from_vec(
            v.iter().map(|&x| x as f32).collect(),
            (b, Const::<GM>, Const::<GN>),
        )
    };
    let inter = |s: &CemaState<GM, GN, f32, Cpu>| {
        let (r, i) = (to_f64(&s.re), to_f64(&s.im));
        r.iter()
            .zip(&i)
            .flat_map(|(a, b)| [*a, *b])
            .collect::<Vec<_>>()
    };
    let (y, s) = cema.try_forward(ut.clone(), None, true).unwrap();
    let e1 = max_abs_diff(&to_f64(&y), &g.tensor(&["y_no_h0"]).unwrap().data);
    let e2 = max_abs_diff(&inter(&s.unwrap()), &g.tensor(&["hT_no_h0"]).unwrap().data);
    let h0 = CemaState {
        re: mk(&h0r),
        im: mk(&h0i),
    };
    let (y, s) = cema.try_forward(ut, Some(h0), true).unwrap();
    let e3 = max_abs_diff(&to_f64(&y), &g.tensor(&["y_h0"]).unwrap().data);
    let e4 = max_abs_diff(&inter(&s.unwrap()), &g.tensor(&["hT_h0"]).unwrap().data);
    println!(
        "golden f32 max abs diff: y_no_h0 {e1:.2e} hT_no_h0 {e2:.2e} y_h0 {e3:.2e} hT_h0 {e4:.2e}"
    );
    for e in [e1, e2, e3, e4] {
        assert!(e <= 1e-4, "{e}");
    }
}

/// Gradients of sum(y*g) [+ sum(hT*gh)] for u, params and h0 (flat, in golden layouts).
fn grads_f32(
    g: &Golden,
    with_h0: bool,
    state_loss: bool,
    chunk: Option<(usize, usize)>,
) -> Vec<(String, Vec<f64>)> {
    let dev = Cpu::default();
    let p = P::from_golden(g);
    let cema = p.model::<GM, GN, f32, _>(&dev);
    let u = g.tensor(&["u"]).unwrap();
    let (b, t) = (u.shape[0], u.shape[1]);
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    let ut: U<f32> = dev.tensor_from_vec(f(&u.data), (b, t, Const));
    let gy: U<f32> = dev.tensor_from_vec(f(&g.tensor(&["g"]).unwrap().data), (b, t, Const));
    let (h0r, h0i) = split_c(&g.tensor(&["h0"]).unwrap().data);
    let (ghr, ghi) = split_c(&g.tensor(&["gh"]).unwrap().data);
    let mk = |v: &[f64]| dev.tensor_from_vec(f(v), (b, Const::<GM>, Const::<GN>));
    let (hr, hi) = (mk(&h0r), mk(&h0i));
    let h0 = with_h0.then(|| CemaState {
        re: hr.leaky_trace(),
        im: hi.leaky_trace(),
    });
    let (c1, c2) = chunk.unwrap_or((32, 16));
    let (y, s) = cema
        .try_forward_chunked(ut.leaky_trace(), h0, state_loss, c1, c2)
        .unwrap();
    let mut loss = (y * gy).sum();
    if let Some(s) = s {
        loss = loss + (s.re * mk(&ghr)).sum() + (s.im * mk(&ghi)).sum();
    }
    let gr = loss.backward();
    let v = |x: Vec<f32>| x.into_iter().map(|x| x as f64).collect::<Vec<_>>();
    let mut out = vec![
        ("u".to_string(), v(gr.get(&ut).as_vec())),
        ("alpha".to_string(), v(gr.get(&cema.alpha).as_vec())),
        ("delta".to_string(), v(gr.get(&cema.delta).as_vec())),
        ("theta".to_string(), v(gr.get(&cema.theta).as_vec())),
        ("gamma".to_string(), v(gr.get(&cema.gamma).as_vec())),
        ("omega".to_string(), v(gr.get(&cema.omega).as_vec())),
    ];
    if with_h0 {
        let (r, i) = (gr.get(&hr).as_vec(), gr.get(&hi).as_vec());
        out.push((
            "h0".to_string(),
            r.iter()
                .zip(&i)
                .flat_map(|(a, b)| [*a as f64, *b as f64])
                .collect(),
        ));
    }
    out
}

#[test]
fn golden_gradients_f32() {
    let g = golden();
    let mut worst = 0.0f64;
    for (key, h0, sl) in [
        ("grads_no_h0", false, false),
        ("grads_h0", true, false),
        ("grads_h0_with_state_loss", true, true),
    ] {
        // default chunking (one chunk for T=20) and a forced small chunking (several recursion levels)
        for ch in [None, Some((3, 2))] {
            for (name, got) in grads_f32(&g, h0, sl, ch) {
                let want = g.tensor(&[key, &name]).unwrap().data;
                let r = rel(&got, &want);
                println!("{key}/{name} chunk {ch:?}: max abs diff / max |grad| = {r:.2e}");
                worst = worst.max(r);
                assert!(r <= 1e-4, "{key}/{name} chunk {ch:?}: {r}");
            }
        }
    }
    println!("worst relative gradient error vs golden: {worst:.2e}");
}

#[test]
fn chunked_matches_sequential_f64() {
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(1);
    const M: usize = 8;
    const N: usize = 4;
    let p = P::random(M, N, &mut rng);
    let cema = p.model::<M, N, f64, _>(&dev);
    let b = 2;
    for t in [1usize, 7, 64, 150, 1000] {
        let u: Vec<f64> = (0..b * t * M)
            .map(|_| rng.gen::<f64>() * 2.0 - 1.0)
            .collect();
        let h0r: Vec<f64> = (0..b * M * N).map(|_| rng.gen::<f64>() - 0.5).collect();
        let h0i: Vec<f64> = (0..b * M * N).map(|_| rng.gen::<f64>() - 0.5).collect();
        for with_h0 in [false, true] {
            let (yr, hr, hi) =
                reference(&p, M, N, b, t, &u, with_h0.then_some((&h0r[..], &h0i[..])));
            for ch in [None, Some((5, 3)), Some((64, 2))] {
                let ut: Tensor<(usize, usize, Const<M>), f64, Cpu> =
                    dev.tensor_from_vec(u.clone(), (b, t, Const));
                let h0 = with_h0.then(|| CemaState {
                    re: dev.tensor_from_vec(h0r.clone(), (b, Const, Const)),
                    im: dev.tensor_from_vec(h0i.clone(), (b, Const, Const)),
                });
                let (y, s) = match ch {
                    None => cema.try_forward(ut, h0, true),
                    Some((c1, c2)) => cema.try_forward_chunked(ut, h0, true, c1, c2),
                }
                .unwrap();
                let s = s.unwrap();
                let e = max_abs_diff(&to_f64(&y), &yr)
                    .max(max_abs_diff(&to_f64(&s.re), &hr))
                    .max(max_abs_diff(&to_f64(&s.im), &hi));
                assert!(e < 1e-10, "T={t} h0={with_h0} chunk {ch:?}: {e}");
            }
        }
    }
}

/// f64 loss sum(y*g) + sum(hT*gh) as a function of all inputs, for finite differences.
struct FdCase {
    b: usize,
    t: usize,
    u: Vec<f64>,
    h0r: Vec<f64>,
    h0i: Vec<f64>,
    g: Vec<f64>,
    ghr: Vec<f64>,
    ghi: Vec<f64>,
}

const FM: usize = 8;
const FN: usize = 4;

impl FdCase {
    fn loss(&self, p: &P, u: &[f64], h0r: &[f64], h0i: &[f64], anti: bool) -> f64 {
        let dev = Cpu::default();
        let cema = p.model::<FM, FN, f64, _>(&dev);
        let ut: Tensor<(usize, usize, Const<FM>), f64, Cpu> =
            dev.tensor_from_vec(u.to_vec(), (self.b, self.t, Const));
        if anti {
            let y = cema.try_forward_anticausal_chunked(ut, 4, 3).unwrap();
            return to_f64(&y).iter().zip(&self.g).map(|(a, b)| a * b).sum();
        }
        let h0 = CemaState {
            re: dev.tensor_from_vec(h0r.to_vec(), (self.b, Const, Const)),
            im: dev.tensor_from_vec(h0i.to_vec(), (self.b, Const, Const)),
        };
        let (y, s) = cema.try_forward_chunked(ut, Some(h0), true, 4, 3).unwrap();
        let s = s.unwrap();
        let d = |a: Vec<f64>, b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        d(to_f64(&y), &self.g) + d(to_f64(&s.re), &self.ghr) + d(to_f64(&s.im), &self.ghi)
    }
}

#[test]
fn gradients_vs_finite_differences_f64() {
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(7);
    let p = P::random(FM, FN, &mut rng);
    let (b, t) = (2usize, 150usize); // chunk 4 -> 38 chunks; state chunk 3 -> 3 more levels
    let mut r = |k: usize| {
        (0..k)
            .map(|_| rng.gen::<f64>() * 2.0 - 1.0)
            .collect::<Vec<f64>>()
    };
    let case = FdCase {
        b,
        t,
        u: r(b * t * FM),
        h0r: r(b * FM * FN),
        h0i: r(b * FM * FN),
        g: r(b * t * FM),
        ghr: r(b * FM * FN),
        ghi: r(b * FM * FN),
    };
    for anti in [false, true] {
        // analytic gradients
        let cema = p.model::<FM, FN, f64, _>(&dev);
        let ut: Tensor<(usize, usize, Const<FM>), f64, Cpu> =
            dev.tensor_from_vec(case.u.clone(), (b, t, Const));
        let hr: Tensor<(usize, Const<FM>, Const<FN>), f64, Cpu> =
            dev.tensor_from_vec(case.h0r.clone(), (b, Const, Const));
        let hi: Tensor<(usize, Const<FM>, Const<FN>), f64, Cpu> =
            dev.tensor_from_vec(case.h0i.clone(), (b, Const, Const));
        let gt: Tensor<(usize, usize, Const<FM>), f64, Cpu> =
            dev.tensor_from_vec(case.g.clone(), (b, t, Const));
        let loss = if anti {
            (cema
                .try_forward_anticausal_chunked(ut.leaky_trace(), 4, 3)
                .unwrap()
                * gt)
                .sum()
        } else {
            let h0 = CemaState {
                re: hr.leaky_trace(),
                im: hi.leaky_trace(),
            };
            let (y, s) = cema
                .try_forward_chunked(ut.leaky_trace(), Some(h0), true, 4, 3)
                .unwrap();
            let s = s.unwrap();
            let ghr: Tensor<(usize, Const<FM>, Const<FN>), f64, Cpu> =
                dev.tensor_from_vec(case.ghr.clone(), (b, Const, Const));
            let ghi: Tensor<(usize, Const<FM>, Const<FN>), f64, Cpu> =
                dev.tensor_from_vec(case.ghi.clone(), (b, Const, Const));
            (y * gt).sum() + (s.re * ghr).sum() + (s.im * ghi).sum()
        };
        let gr = loss.backward();
        let mut analytic: Vec<(&str, Vec<f64>)> = vec![
            ("alpha", gr.get(&cema.alpha).as_vec()),
            ("delta", gr.get(&cema.delta).as_vec()),
            ("theta", gr.get(&cema.theta).as_vec()),
            ("gamma", gr.get(&cema.gamma).as_vec()),
            ("omega", gr.get(&cema.omega).as_vec()),
            ("u", gr.get(&ut).as_vec()),
        ];
        if !anti {
            analytic.push(("h0r", gr.get(&hr).as_vec()));
            analytic.push(("h0i", gr.get(&hi).as_vec()));
        }
        let mut worst = 0.0f64;
        for (name, ga) in &analytic {
            for _ in 0..4 {
                let i = rng.gen_range(0..ga.len());
                let h = 1e-5;
                let eval = |delta: f64| {
                    let (mut p2, mut u2, mut hr2, mut hi2) = (
                        p.clone(),
                        case.u.clone(),
                        case.h0r.clone(),
                        case.h0i.clone(),
                    );
                    let v = match *name {
                        "alpha" => &mut p2.alpha,
                        "delta" => &mut p2.delta,
                        "theta" => &mut p2.theta,
                        "gamma" => &mut p2.gamma,
                        "omega" => &mut p2.omega,
                        "u" => &mut u2,
                        "h0r" => &mut hr2,
                        _ => &mut hi2,
                    };
                    v[i] += delta;
                    case.loss(&p2, &u2, &hr2, &hi2, anti)
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                let scale = ga.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
                let err = (fd - ga[i]).abs() / scale;
                worst = worst.max(err);
                assert!(
                    err < 1e-6,
                    "{} anti={anti} {name}[{i}]: fd {fd} analytic {}",
                    if anti { "anticausal" } else { "causal" },
                    ga[i]
                );
            }
        }
        println!("FD check (anticausal={anti}): worst |fd - analytic| / max|grad| = {worst:.2e}");
    }
}

#[test]
fn state_carry_equals_one_call() {
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(3);
    const M: usize = 8;
    const N: usize = 4;
    let p = P::random(M, N, &mut rng);
    let cema = p.model::<M, N, f64, _>(&dev);
    let (b, t, t1) = (2usize, 150usize, 61usize);
    let u: Vec<f64> = (0..b * t * M)
        .map(|_| rng.gen::<f64>() * 2.0 - 1.0)
        .collect();
    let part = |lo: usize, hi: usize| -> Tensor<(usize, usize, Const<M>), f64, Cpu> {
        let v = megalodon_core::util::time_slice(&u, b, t, M, lo, hi);
        dev.tensor_from_vec(v, (b, hi - lo, Const))
    };
    let (y, s) = cema
        .try_forward_chunked(part(0, t), None, true, 8, 3)
        .unwrap();
    let (y1, s1) = cema
        .try_forward_chunked(part(0, t1), None, true, 8, 3)
        .unwrap();
    let (y2, s2) = cema
        .try_forward_chunked(part(t1, t), s1, true, 8, 3)
        .unwrap();
    let (y, y1, y2) = (to_f64(&y), to_f64(&y1), to_f64(&y2));
    let joined: Vec<f64> = (0..b)
        .flat_map(|bi| {
            [
                &y1[bi * t1 * M..(bi + 1) * t1 * M],
                &y2[bi * (t - t1) * M..(bi + 1) * (t - t1) * M],
            ]
            .concat()
        })
        .collect();
    let (s, s2) = (s.unwrap(), s2.unwrap());
    let e = max_abs_diff(&joined, &y)
        .max(max_abs_diff(&to_f64(&s.re), &to_f64(&s2.re)))
        .max(max_abs_diff(&to_f64(&s.im), &to_f64(&s2.im)));
    assert!(e < 1e-11, "{e}");
}

#[test]
fn anticausal_matches_reversed_reference() {
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(5);
    const M: usize = 8;
    const N: usize = 4;
    let p = P::random(M, N, &mut rng);
    let cema = p.model::<M, N, f64, _>(&dev);
    let b = 2;
    for t in [1usize, 9, 150] {
        let u: Vec<f64> = (0..b * t * M)
            .map(|_| rng.gen::<f64>() * 2.0 - 1.0)
            .collect();
        let (yr, _, _) = reference(&p, M, N, b, t, &reverse(&u, b, t, M), None);
        let want = reverse(&yr, b, t, M);
        // direct anti-causal definition at a few points
        let ut: Tensor<(usize, usize, Const<M>), f64, Cpu> =
            dev.tensor_from_vec(u.clone(), (b, t, Const));
        let y = to_f64(&cema.try_forward_anticausal(ut.clone()).unwrap());
        let y2 = to_f64(&cema.try_forward_anticausal_chunked(ut, 4, 2).unwrap());
        let e = max_abs_diff(&y, &want).max(max_abs_diff(&y2, &want));
        assert!(e < 1e-10, "T={t}: {e}");
    }
}

#[test]
fn rejects_bad_h0_batch() {
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(9);
    let cema = MultiHeadComplexEma::<8, 4, f32, Cpu>::new(&dev, &mut rng);
    let u: Tensor<(usize, usize, Const<8>), f32, Cpu> = dev.zeros_like(&(2, 5, Const));
    let h0 = CemaState {
        re: dev.zeros_like(&(3, Const, Const)),
        im: dev.zeros_like(&(3, Const, Const)),
    };
    assert!(cema.try_forward(u, Some(h0), false).is_err());
}

#[test]
fn init_ranges() {
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(11);
    let cema = MultiHeadComplexEma::<64, 16, f32, Cpu>::new(&dev, &mut rng);
    let th: Vec<f64> = to_f64(&cema.theta).iter().map(|&x| sig(x)).collect();
    let mut sorted = th.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    for (k, f) in sorted.iter().rev().enumerate() {
        let want = (64f64).powf(-((k + 1) as f64) / 64.0);
        assert!((f - want).abs() < 1e-5, "{f} vs {want}");
    }
    assert!(to_f64(&cema.omega).iter().all(|x| x.abs() <= 1.0));
    let g = to_f64(&cema.gamma);
    assert!(g.iter().skip(1).step_by(2).all(|&x| x == 0.0));
    let a = to_f64(&cema.alpha);
    let sd = (a.iter().map(|x| x * x).sum::<f64>() / a.len() as f64).sqrt();
    assert!((sd - 0.2).abs() < 0.03, "alpha std {sd}");
}

#[test]
#[ignore]
fn timing() {
    let dev = Cpu::default();
    dev.enable_cache();
    let mut rng = StdRng::seed_from_u64(0);
    let cema = MultiHeadComplexEma::<256, 16, f32, Cpu>::new(&dev, &mut rng);
    for t in [4096usize, 16384] {
        let u: Tensor<(usize, usize, Const<256>), f32, Cpu> =
            dev.sample_normal_like(&(1, t, Const));
        let mut best = f64::INFINITY;
        for _ in 0..4 {
            let st = std::time::Instant::now();
            let (y, _) = cema.try_forward(u.leaky_trace(), None, false).unwrap();
            let g = y.sum().backward();
            std::hint::black_box(g.get(&u));
            best = best.min(st.elapsed().as_secs_f64());
        }
        let st = std::time::Instant::now();
        let _ = cema.try_forward(u.clone(), None, false).unwrap();
        println!(
            "CEMA M=256 N=16 B=1 T={t}: fwd+bwd {:.1} ms, fwd only {:.1} ms",
            best * 1e3,
            st.elapsed().as_secs_f64() * 1e3
        );
    }
}

#[test]
fn state_carry_gradients_equal_one_call() {
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(13);
    const M: usize = 8;
    const N: usize = 4;
    let p = P::random(M, N, &mut rng);
    let cema = p.model::<M, N, f64, _>(&dev);
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
    // one call
    let uf = part(&u, 0, t);
    let (y, _) = cema
        .try_forward_chunked(uf.leaky_trace(), None, false, 8, 3)
        .unwrap();
    let gr = (y * part(&g, 0, t)).sum().backward();
    let full_alpha = gr.get(&cema.alpha).as_vec();
    let full_theta = gr.get(&cema.theta).as_vec();
    let full_u = gr.get(&uf).as_vec();
    // two calls, state carried with its tape
    let (u1, u2) = (part(&u, 0, t1), part(&u, t1, t));
    let (y1, s1) = cema
        .try_forward_chunked(u1.leaky_trace(), None, true, 8, 3)
        .unwrap();
    let (y2, _) = cema
        .try_forward_chunked(u2.leaky_trace(), s1, false, 8, 3)
        .unwrap();
    let gr = ((y1 * part(&g, 0, t1)).sum() + (y2 * part(&g, t1, t)).sum()).backward();
    let e = max_abs_diff(&gr.get(&cema.alpha).as_vec(), &full_alpha)
        .max(max_abs_diff(&gr.get(&cema.theta).as_vec(), &full_theta));
    let (g1, g2) = (gr.get(&u1).as_vec(), gr.get(&u2).as_vec());
    let joined: Vec<f64> = (0..b)
        .flat_map(|bi| {
            [
                &g1[bi * t1 * M..(bi + 1) * t1 * M],
                &g2[bi * (t - t1) * M..(bi + 1) * (t - t1) * M],
            ]
            .concat()
        })
        .collect();
    let e = e.max(max_abs_diff(&joined, &full_u));
    assert!(e < 1e-10, "{e}");
}
