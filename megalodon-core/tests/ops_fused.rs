//! The fused CPU kernels of `ops::gates_cpu` and `ops::norms_cpu` against their composed dfdx
//! references, through one test body per op: outputs and the gradients of every input and
//! parameter (f64), with inputs that also feed another part of the loss (gradients must
//! accumulate), a permuted (non-contiguous) input, and finite differences on the kernel.

use dfdx::prelude::*;
use megalodon_core::ops::rope::Rope;
use megalodon_core::ops::timestep_norm::NormState;
use megalodon_core::ops::{gates, gates_cpu, norms, norms_cpu, timestep_norm};
use rand::{rngs::StdRng, Rng, SeedableRng};

type Tp = OwnedTape<f64, Cpu>;
type X<const K: usize, T = NoneTape> = Tensor<(usize, usize, Const<K>), f64, Cpu, T>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Imp {
    Composed,
    Fused,
}

const B: usize = 2;
const T: usize = 5;

fn dev() -> Cpu {
    Cpu::default()
}

fn rand_vec(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| scale * (rng.gen::<f64>() * 2.0 - 1.0))
        .collect()
}

fn seq<const K: usize>(seed: u64) -> X<K> {
    dev().tensor_from_vec(rand_vec(seed, B * T * K, 1.5), (B, T, Const))
}

fn param<S: Shape>(seed: u64, shape: S) -> Tensor<S, f64, Cpu> {
    dev().tensor_from_vec(rand_vec(seed, shape.num_elements(), 0.5), shape)
}

/// `sum(out * r)` with a fixed random `r`, plus `sum(x * r2)` so that `x`'s gradient has a
/// second consumer.
fn loss<const K: usize, const KX: usize>(
    out: X<K, Tp>,
    x: X<KX, Tp>,
) -> Tensor<Rank0, f64, Cpu, Tp> {
    let r: X<K> = seq(901);
    let r2: X<KX> = seq(902);
    (out * r).sum() + (x * r2).sum()
}

/// Output and gradients (of x and each parameter), flattened.
struct Res {
    out: Vec<f64>,
    grads: Vec<Vec<f64>>,
}

/// Fails on NaN as well as on a difference above `tol` (relative to the largest reference value).
fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs() / scale;
        assert!(
            d <= tol,
            "{what}[{i}]: fused {x} vs composed {y} (rel {d:e})"
        );
    }
}

/// The shared test body: runs `f` both ways and compares everything.
fn same(what: &str, f: impl Fn(Imp) -> Res) {
    let (c, k) = (f(Imp::Composed), f(Imp::Fused));
    assert!(
        c.out.iter().all(|v| v.is_finite()),
        "{what}: composed output not finite"
    );
    assert_close(&format!("{what} output"), &k.out, &c.out, 1e-12);
    assert_eq!(k.grads.len(), c.grads.len());
    for (i, (gk, gc)) in k.grads.iter().zip(&c.grads).enumerate() {
        assert!(
            gc.iter().any(|v| *v != 0.0),
            "{what}: composed gradient {i} is all zero"
        );
        assert_close(&format!("{what} gradient {i}"), gk, gc, 1e-10);
    }
}

fn linear_case(imp: Imp, bias: bool) -> Res {
    let x: X<6> = seq(1);
    let w = param(2, Rank2::<4, 6>::default());
    let b = param(3, Rank1::<4>::default());
    let xt = x.leaky_trace();
    let bo = bias.then_some(&b);
    let y = match imp {
        Imp::Composed => gates::composed_linear(xt.retaped::<Tp>(), &w, bo),
        Imp::Fused => gates_cpu::linear(xt.retaped::<Tp>(), &w, bo).unwrap(),
    };
    let out = y.as_vec();
    let g = loss(y, xt).backward();
    let mut grads = vec![g.get(&x).as_vec(), g.get(&w).as_vec()];
    if bias {
        grads.push(g.get(&b).as_vec());
    }
    Res { out, grads }
}

#[test]
fn linear_matches_composed() {
    same("linear with bias", |imp| linear_case(imp, true));
    same("linear without bias", |imp| linear_case(imp, false));
}

#[test]
fn linear_with_residual_matches_composed() {
    for bias in [true, false] {
        same(&format!("linear + residual (bias: {bias})"), |imp| {
            let x: X<6> = seq(1);
            let r: X<4> = seq(31);
            let w = param(2, Rank2::<4, 6>::default());
            let b = param(3, Rank1::<4>::default());
            let (xt, rt): (X<6, Tp>, X<4, Tp>) = (x.leaky_trace(), r.leaky_trace());
            let bo = bias.then_some(&b);
            let y = match imp {
                Imp::Composed => {
                    gates::composed_linear_add(xt.retaped::<Tp>(), &w, bo, rt.retaped::<Tp>())
                }
                Imp::Fused => {
                    gates_cpu::linear_add(xt.retaped::<Tp>(), &w, bo, rt.retaped::<Tp>()).unwrap()
                }
            };
            let out = y.as_vec();
            // r also feeds the second term: its gradient accumulates
            let g = loss(y, rt).backward();
            let mut grads = vec![g.get(&x).as_vec(), g.get(&r).as_vec(), g.get(&w).as_vec()];
            if bias {
                grads.push(g.get(&b).as_vec());
            }
            Res { out, grads }
        });
    }
}

#[test]
fn silu_and_gate_match_composed() {
    same("silu", |imp| {
        let x: X<7> = seq(4);
        let xt = x.leaky_trace();
        let y = match imp {
            Imp::Composed => gates::composed_silu(xt.retaped::<Tp>()),
            Imp::Fused => gates_cpu::silu(xt.retaped::<Tp>()).unwrap(),
        };
        let out = y.as_vec();
        let g = loss(y, xt).backward();
        Res {
            out,
            grads: vec![g.get(&x).as_vec()],
        }
    });
    same("silu gate", |imp| {
        let (gx, a): (X<7>, X<7>) = (seq(5), seq(6));
        let (gt, at): (X<7, Tp>, X<7, Tp>) = (gx.leaky_trace(), a.leaky_trace());
        let y = match imp {
            Imp::Composed => gates::composed_silu_gate(gt.retaped::<Tp>(), at.retaped::<Tp>()),
            Imp::Fused => gates_cpu::silu_gate(gt.retaped::<Tp>(), at.retaped::<Tp>()).unwrap(),
        };
        let out = y.as_vec();
        let g = loss(y, gt).backward();
        Res {
            out,
            grads: vec![g.get(&gx).as_vec(), g.get(&a).as_vec()],
        }
    });
    // the same tensor as gate and input: both gradient paths land in one buffer
    same("silu gate of x with itself", |imp| {
        let x: X<7> = seq(7);
        let xt = x.leaky_trace();
        let y = match imp {
            Imp::Composed => gates::composed_silu_gate(xt.retaped::<Tp>(), xt.retaped::<Tp>()),
            Imp::Fused => gates_cpu::silu_gate(xt.retaped::<Tp>(), xt.retaped::<Tp>()).unwrap(),
        };
        let out = y.as_vec();
        let g = loss(y, xt).backward();
        Res {
            out,
            grads: vec![g.get(&x).as_vec()],
        }
    });
}

#[test]
fn qk_norm_matches_composed() {
    same("Q/K norm", |imp| {
        let z: X<8> = seq(8);
        let gamma = param(9, Rank2::<2, 8>::default());
        let beta = param(10, Rank2::<2, 8>::default());
        let zt = z.leaky_trace();
        let (q, k) = match imp {
            Imp::Composed => gates::composed_qk_norm::<8, 2, f64, Cpu, Tp>(
                zt.retaped::<Tp>(),
                &gamma,
                &beta,
                1e-5,
            ),
            Imp::Fused => {
                gates_cpu::qk_norm::<8, 2, f64, Tp>(zt.retaped::<Tp>(), &gamma, &beta, 1e-5)
                    .unwrap()
            }
        };
        let mut out = q.as_vec();
        out.extend(k.as_vec());
        let r: X<8> = seq(903);
        let g = (loss(q, zt) + (k * r).sum()).backward();
        Res {
            out,
            grads: vec![
                g.get(&z).as_vec(),
                g.get(&gamma).as_vec(),
                g.get(&beta).as_vec(),
            ],
        }
    });
}

#[test]
fn rope_matches_composed_also_on_a_permuted_input() {
    let rope = Rope::new(4, 10000.0);
    let positions = [3usize, 4, 5, 0, 1];
    for permuted in [false, true] {
        same(&format!("RoPE (permuted input: {permuted})"), |imp| {
            // leaf (B, H, T, dz) permuted to (B, T, H, dz) when `permuted`
            let v = rand_vec(11, B * T * 2 * 4, 1.0);
            let leaf: Tensor<(usize, Const<2>, usize, usize), f64, Cpu> =
                dev().tensor_from_vec(v.clone(), (B, Const, T, 4));
            let flat: Tensor<(usize, usize, Const<2>, usize), f64, Cpu> =
                dev().tensor_from_vec(v, (B, T, Const, 4));
            let (x, grad_of) = if permuted {
                let lt = leaf.leaky_trace();
                (lt.permute::<_, Axes4<0, 2, 1, 3>>(), 0)
            } else {
                (flat.leaky_trace(), 1)
            };
            let y = match imp {
                Imp::Composed => rope.apply(x, &positions),
                Imp::Fused => gates_cpu::rope(&rope, x, &positions).unwrap(),
            };
            let out = y.as_vec();
            let r: Tensor<(usize, usize, Const<2>, usize), f64, Cpu> =
                dev().tensor_from_vec(rand_vec(904, B * T * 8, 1.0), (B, T, Const, 4));
            let g = (y * r).sum().backward();
            let gx = if grad_of == 0 {
                g.get(&leaf).as_vec()
            } else {
                g.get(&flat).as_vec()
            };
            Res {
                out,
                grads: vec![gx],
            }
        });
    }
}

#[test]
fn rms_and_layer_norm_match_composed() {
    for weighted in [true, false] {
        same(&format!("RMSNorm (weight: {weighted})"), |imp| {
            let x: X<6> = seq(12);
            let w = param(13, Rank1::<6>::default());
            let xt = x.leaky_trace();
            let wo = weighted.then_some(&w);
            let y = match imp {
                Imp::Composed => norms::composed_rms_norm(xt.retaped::<Tp>(), wo, 1e-5),
                Imp::Fused => norms_cpu::rms_norm(xt.retaped::<Tp>(), wo, 1e-5).unwrap(),
            };
            let out = y.as_vec();
            let g = loss(y, xt).backward();
            let mut grads = vec![g.get(&x).as_vec()];
            if weighted {
                grads.push(g.get(&w).as_vec());
            }
            Res { out, grads }
        });
    }
    same("LayerNorm", |imp| {
        let x: X<6> = seq(14);
        let w = param(15, Rank1::<6>::default());
        let b = param(16, Rank1::<6>::default());
        let xt = x.leaky_trace();
        let y = match imp {
            Imp::Composed => norms::composed_layer_norm(xt.retaped::<Tp>(), &w, &b, 1e-5),
            Imp::Fused => norms_cpu::layer_norm(xt.retaped::<Tp>(), &w, &b, 1e-5).unwrap(),
        };
        let out = y.as_vec();
        let g = loss(y, xt).backward();
        Res {
            out,
            grads: vec![g.get(&x).as_vec(), g.get(&w).as_vec(), g.get(&b).as_vec()],
        }
    });
}

/// TimestepNorm of `x (2, 5, 8)` in 2 groups, fresh or continuing a carried state with these
/// per-row counts (equal counts take the composed op's scalar path, unequal ones its table).
fn timestep_case(imp: Imp, carried: Option<[usize; 2]>) -> Res {
    let x: X<8> = seq(17);
    let w = param(18, Rank1::<8>::default());
    let b = param(19, Rank1::<8>::default());
    let state = carried.map(|count| NormState::<2, f64, Cpu, Tp> {
        count: count.to_vec(),
        mean: param(20, (B, Const::<2>)).retaped(),
        var: param(21, (B, Const::<2>)).retaped::<Tp>().abs() + 0.5,
    });
    let xt = x.leaky_trace();
    let (y, s) = match imp {
        Imp::Composed => {
            timestep_norm::composed_timestep_norm(xt.retaped::<Tp>(), &w, &b, 1e-5, state, None)
                .unwrap()
        }
        Imp::Fused => norms_cpu::timestep_norm(xt.retaped::<Tp>(), &w, &b, 1e-5, state).unwrap(),
    };
    let mut out = y.as_vec();
    out.extend(s.mean.as_vec());
    out.extend(s.var.as_vec());
    out.extend(s.count.iter().map(|&n| n as f64));
    let g = loss(y, xt).backward();
    Res {
        out,
        grads: vec![g.get(&x).as_vec(), g.get(&w).as_vec(), g.get(&b).as_vec()],
    }
}

#[test]
fn timestep_norm_matches_composed() {
    same("TimestepNorm", |imp| timestep_case(imp, None));
    same("TimestepNorm with a carried state", |imp| {
        timestep_case(imp, Some([3, 7]))
    });
    same("TimestepNorm with a carried state, equal counts", |imp| {
        timestep_case(imp, Some([4, 4]))
    });
}

/// Central finite differences of the fused TimestepNorm's loss against its gradient of x.
#[test]
fn timestep_norm_kernel_gradient_matches_finite_differences() {
    let w = param(18, Rank1::<8>::default());
    let b = param(19, Rank1::<8>::default());
    let base = rand_vec(17, B * T * 8, 1.5);
    let f = |v: &[f64]| -> f64 {
        let x: X<8> = dev().tensor_from_vec(v.to_vec(), (B, T, Const));
        let (y, _) =
            norms_cpu::timestep_norm::<8, 2, f64, NoneTape>(x, &w, &b, 1e-5, None).unwrap();
        let r: X<8> = seq(901);
        (y * r).sum::<Rank0, _>().array()
    };
    let x: X<8> = dev().tensor_from_vec(base.clone(), (B, T, Const));
    let (y, _) =
        norms_cpu::timestep_norm::<8, 2, f64, Tp>(x.leaky_trace(), &w, &b, 1e-5, None).unwrap();
    let r: X<8> = seq(901);
    let g = (y * r).sum().backward().get(&x).as_vec();
    let h = 1e-6;
    for i in 0..base.len() {
        let (mut p, mut m) = (base.clone(), base.clone());
        p[i] += h;
        m[i] -= h;
        let fd = (f(&p) - f(&m)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "x[{i}]: finite difference {fd} vs kernel gradient {}",
            g[i]
        );
    }
}
