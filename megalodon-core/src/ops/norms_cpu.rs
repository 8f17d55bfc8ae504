//! Fused CPU kernels for the norms (composed references: [`super::norms`] and
//! [`super::timestep_norm`]): RMSNorm, LayerNorm and TimestepNorm, each one pass forward and one
//! hand-written pass backward, in row blocks on rayon (`docs/design.md` §15).
//!
//! TimestepNorm backward, per batch row and group (`n_t` steps seen at step t, `r_t =
//! 1/sqrt(V_t + eps)`, `dn = dy (1 + w)`): `A_t = sum_i dn_i (x_i - M_t)`, `B_t = sum_i dn_i`,
//! `gV_t = -r_t^3 A_t / 2`, `gM_t = -r_t B_t - 2 M_t gV_t`; the running sums get `gS1_t = gM_t /
//! n_t`, `gS2_t = gV_t / n_t`, their per-step terms the reverse cumulative sums of those, and
//! `dx_i = dn_i r_t + (sum_{u>=t} gS1_u) / gs + 2 x_i (sum_{u>=t} gS2_u) / gs` (group size gs).
//! The statistics and their sums are carried in f64.

use super::host::{
    input, out_buf, output, par_rows, par_rows_sum, recycle, release_grad, restore_grad, scratch,
    take_grad,
};
use super::timestep_norm::NormState;
use crate::util::{c, Float, Seq};
use anyhow::{ensure, Result};
use dfdx::prelude::*;

fn f64s<E: Float>(v: &[E]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64().unwrap_or(f64::NAN)).collect()
}

/// RMSNorm over the last axis, weight `1 + w` when given; see
/// [`super::norms::composed_rms_norm`].
pub fn rms_norm<const K: usize, E: Float, T: Tape<E, Cpu>>(
    x: Seq<K, E, Cpu, T>,
    w: Option<&Tensor<Rank1<K>, E, Cpu>>,
    eps: f64,
) -> Result<Seq<K, E, Cpu, T>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    norm_rows::<K, E, T>(x, w, None, eps)
}

/// LayerNorm over the last axis, weight `1 + w` and bias; see
/// [`super::norms::composed_layer_norm`].
pub fn layer_norm<const K: usize, E: Float, T: Tape<E, Cpu>>(
    x: Seq<K, E, Cpu, T>,
    w: &Tensor<Rank1<K>, E, Cpu>,
    b: &Tensor<Rank1<K>, E, Cpu>,
    eps: f64,
) -> Result<Seq<K, E, Cpu, T>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    norm_rows::<K, E, T>(x, Some(w), Some(b), eps)
}

/// Row norm: LayerNorm when `b` is given (centred, then the bias), else RMSNorm.
/// `xh = (x - mu) r`, `y = xh (1 + w) + b`; backward `dxh = dy (1 + w)`,
/// `dx = r (dxh - mean(dxh) [LayerNorm only] - xh mean(dxh xh))`.
fn norm_rows<const K: usize, E: Float, T: Tape<E, Cpu>>(
    x: Seq<K, E, Cpu, T>,
    w: Option<&Tensor<Rank1<K>, E, Cpu>>,
    b: Option<&Tensor<Rank1<K>, E, Cpu>>,
    eps: f64,
) -> Result<Seq<K, E, Cpu, T>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    let what = if b.is_some() { "LayerNorm" } else { "RMSNorm" };
    let centre = b.is_some();
    let shape = *x.shape();
    let rows = shape.0 * shape.1;
    let dev = x.device().clone();
    let (xv, xt, mut tape) = input(x, what)?;
    let w1: Vec<E> = match w {
        Some(w) => w.as_vec().into_iter().map(|v| v + E::one()).collect(),
        None => vec![E::one(); K],
    };
    let bv = b.map(|b| b.as_vec());
    // normalised rows (kept for backward) and their inverse scales
    let mut xh = xv;
    let mut rinv = vec![E::zero(); rows];
    {
        let rinv_ptr = SyncPtr(rinv.as_mut_ptr());
        par_rows(&mut xh, K, |r0, xs| {
            for (j, row) in xs.chunks_mut(K).enumerate() {
                let kf = c::<E>(K as f64);
                let mu = if centre {
                    row.iter().fold(E::zero(), |s, &v| s + v) / kf
                } else {
                    E::zero()
                };
                let ms = row.iter().fold(E::zero(), |s, &v| s + (v - mu) * (v - mu)) / kf;
                let r = E::one() / (ms + c(eps)).sqrt();
                row.iter_mut().for_each(|v| *v = (*v - mu) * r);
                // SAFETY: each row index is written by exactly one task
                unsafe { *rinv_ptr.get().add(r0 + j) = r };
            }
        });
    }
    let mut y = out_buf(&dev, rows * K, what)?;
    par_rows(&mut y, K, |r0, ys| {
        for (j, row) in ys.chunks_mut(K).enumerate() {
            let src = &xh[(r0 + j) * K..(r0 + j + 1) * K];
            for i in 0..K {
                row[i] = src[i] * w1[i] + bv.as_ref().map_or(E::zero(), |b| b[i]);
            }
        }
    });
    let out = output(&dev, y, shape, what)?;
    if T::OWNS_TAPE {
        let (xg, og) = (xt.ghost(), out.ghost());
        let wg = w.map(|w| w.ghost());
        let bg = b.map(|b| b.ghost());
        drop(xt);
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, og, rows * K);
            let mut dx = take_grad!(grads, xg, rows * K);
            let dyv = &dy.0;
            // [dw | db]
            let sums = par_rows_sum(
                &mut dx.0,
                K,
                || vec![E::zero(); 2 * K],
                |r0, dxs, acc| {
                    let mut dxh = vec![E::zero(); K];
                    let kf = c::<E>(K as f64);
                    for (j, dxr) in dxs.chunks_mut(K).enumerate() {
                        let o = (r0 + j) * K;
                        let (mut m1, mut m2) = (E::zero(), E::zero());
                        for i in 0..K {
                            let g = dyv[o + i];
                            acc[i] += g * xh[o + i];
                            acc[K + i] += g;
                            dxh[i] = g * w1[i];
                            m1 += dxh[i];
                            m2 += dxh[i] * xh[o + i];
                        }
                        let (m1, m2) = (if centre { m1 / kf } else { E::zero() }, m2 / kf);
                        let r = rinv[r0 + j];
                        for i in 0..K {
                            dxr[i] += r * (dxh[i] - m1 - xh[o + i] * m2);
                        }
                    }
                },
                |a, b| super::host::add_into(a, &b),
            );
            restore_grad!(grads, xg, dx);
            if let Some(wg) = wg {
                let mut dw = take_grad!(grads, wg, K);
                super::host::add_into(&mut dw.0, &sums[..K]);
                restore_grad!(grads, wg, dw);
            }
            if let Some(bg) = bg {
                let mut db = take_grad!(grads, bg, K);
                super::host::add_into(&mut db.0, &sums[K..]);
                restore_grad!(grads, bg, db);
            }
            release_grad!(dev, dy);
            recycle(xh);
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// A raw pointer that rayon tasks may share; every task writes disjoint elements.
#[derive(Clone, Copy)]
struct SyncPtr<E>(*mut E);
// SAFETY: only used for writes to disjoint elements from different tasks.
unsafe impl<E> Send for SyncPtr<E> {}
unsafe impl<E> Sync for SyncPtr<E> {}
impl<E> SyncPtr<E> {
    fn get(self) -> *mut E {
        self.0
    }
}

/// TimestepNorm of `x (B, T, M)` over `G` groups without padding, continuing from `state` whose
/// statistics get no gradient (the device hook sends taped states to the composed op); see
/// [`super::timestep_norm::composed_timestep_norm`]. The returned state carries no gradient.
#[allow(clippy::type_complexity)]
pub fn timestep_norm<const M: usize, const G: usize, E: Float, T: Tape<E, Cpu>>(
    x: Seq<M, E, Cpu, T>,
    weight: &Tensor<Rank1<M>, E, Cpu>,
    bias: &Tensor<Rank1<M>, E, Cpu>,
    eps: f64,
    state: Option<NormState<G, E, Cpu, T>>,
) -> Result<(Seq<M, E, Cpu, T>, NormState<G, E, Cpu, T>)>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    const WHAT: &str = "TimestepNorm";
    let shape = *x.shape();
    let (b, t, _) = shape;
    ensure!(t > 0, "{WHAT}: empty sequence");
    let gs = M / G;
    let (count0, mean0, var0) = match state {
        Some(s) => {
            ensure!(
                s.count.len() == b && s.mean.shape().0 == b && s.var.shape().0 == b,
                "{WHAT} state has batch {}, input has batch {b}",
                s.count.len()
            );
            (s.count, f64s(&s.mean.as_vec()), f64s(&s.var.as_vec()))
        }
        None => (vec![0; b], vec![0.0; b * G], vec![1.0; b * G]),
    };
    let dev = x.device().clone();
    let (xv, xt, mut tape) = input(x, WHAT)?;
    let rows = b * t;

    // pass 1, rows in parallel: per-step group moments, stored as (row, group)
    let mut mom = scratch::<f64>(rows * 2 * G);
    par_rows(&mut mom, 2 * G, |r0, ms| {
        for (j, m) in ms.chunks_mut(2 * G).enumerate() {
            let row = &xv[(r0 + j) * M..(r0 + j + 1) * M];
            for g in 0..G {
                let (mut s1, mut s2) = (0.0f64, 0.0f64);
                for &v in &row[g * gs..(g + 1) * gs] {
                    let v = v.to_f64().unwrap_or(f64::NAN);
                    s1 += v;
                    s2 += v * v;
                }
                m[2 * g] = s1 / gs as f64;
                m[2 * g + 1] = s2 / gs as f64;
            }
        }
    });
    // pass 2, along time per batch row: running mean and 1/sqrt(var + eps) per (row, group)
    // (stored over the moments), and the state after the last step
    let mut final_count = count0.clone();
    let mut mean_last = out_buf(&dev, b * G, WHAT)?;
    let mut var_last = out_buf(&dev, b * G, WHAT)?;
    for bi in 0..b {
        let n0 = count0[bi] as f64;
        let mut s1: Vec<f64> = (0..G).map(|g| n0 * mean0[bi * G + g]).collect();
        let mut s2: Vec<f64> = (0..G)
            .map(|g| n0 * (var0[bi * G + g] + mean0[bi * G + g] * mean0[bi * G + g]))
            .collect();
        for ti in 0..t {
            let n = (count0[bi] + ti + 1) as f64;
            let m = &mut mom[(bi * t + ti) * 2 * G..(bi * t + ti + 1) * 2 * G];
            for g in 0..G {
                s1[g] += m[2 * g];
                s2[g] += m[2 * g + 1];
                let mean = s1[g] / n;
                let var = s2[g] / n - mean * mean;
                m[2 * g] = mean;
                m[2 * g + 1] = 1.0 / (var + eps).sqrt();
                if ti + 1 == t {
                    mean_last[bi * G + g] = c(mean);
                    var_last[bi * G + g] = c(var);
                }
            }
        }
        final_count[bi] = count0[bi] + t;
    }
    let stats = mom;
    let w1: Vec<E> = weight.as_vec().into_iter().map(|v| v + E::one()).collect();
    let bv = bias.as_vec();
    // pass 3, rows in parallel: the output
    let mut y = out_buf(&dev, rows * M, WHAT)?;
    par_rows(&mut y, M, |r0, ys| {
        for (j, yr) in ys.chunks_mut(M).enumerate() {
            let o = (r0 + j) * M;
            let st = &stats[(r0 + j) * 2 * G..(r0 + j + 1) * 2 * G];
            for g in 0..G {
                let (mean, r) = (c::<E>(st[2 * g]), c::<E>(st[2 * g + 1]));
                for i in g * gs..(g + 1) * gs {
                    yr[i] = (xv[o + i] - mean) * r * w1[i] + bv[i];
                }
            }
        }
    });
    let out = output(&dev, y, shape, WHAT)?;
    let state = NormState {
        count: final_count,
        mean: output(&dev, mean_last, (b, Const::<G>), WHAT)?.retaped::<T>(),
        var: output(&dev, var_last, (b, Const::<G>), WHAT)?.retaped::<T>(),
    };
    if T::OWNS_TAPE {
        let (xg, og, wg, bg) = (xt.ghost(), out.ghost(), weight.ghost(), bias.ghost());
        drop(xt);
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, og, rows * M);
            let dyv = &dy.0;
            // pass A, rows in parallel: gS1_t, gS2_t per (row, group) and [dw | db]
            let mut gs12 = scratch::<f64>(rows * 2 * G);
            let sums = par_rows_sum(
                &mut gs12,
                2 * G,
                || vec![E::zero(); 2 * M],
                |r0, gsr, acc| {
                    for (j, gr) in gsr.chunks_mut(2 * G).enumerate() {
                        let row = r0 + j;
                        let n = (count0[row / t] + row % t + 1) as f64;
                        let o = row * M;
                        let st = &stats[row * 2 * G..(row + 1) * 2 * G];
                        for g in 0..G {
                            let (mean, r) = (st[2 * g], st[2 * g + 1]);
                            let (me, re) = (c::<E>(mean), c::<E>(r));
                            let (mut a, mut bsum) = (0.0f64, 0.0f64);
                            for i in g * gs..(g + 1) * gs {
                                let d = dyv[o + i];
                                let xc = xv[o + i] - me;
                                acc[i] += d * xc * re;
                                acc[M + i] += d;
                                let dn = (d * w1[i]).to_f64().unwrap_or(f64::NAN);
                                a += dn * xc.to_f64().unwrap_or(f64::NAN);
                                bsum += dn;
                            }
                            let gv = -0.5 * r * r * r * a;
                            let gm = -r * bsum - 2.0 * mean * gv;
                            gr[2 * g] = gm / n;
                            gr[2 * g + 1] = gv / n;
                        }
                    }
                },
                |a, b| super::host::add_into(a, &b),
            );
            // pass B, along time backwards per batch row: reverse cumulative sums
            for bi in 0..b {
                let mut acc = vec![0.0f64; 2 * G];
                for ti in (0..t).rev() {
                    let gr = &mut gs12[(bi * t + ti) * 2 * G..(bi * t + ti + 1) * 2 * G];
                    for (a, v) in acc.iter_mut().zip(gr.iter_mut()) {
                        *a += *v;
                        *v = *a;
                    }
                }
            }
            // pass C, rows in parallel: dx
            let mut dx = take_grad!(grads, xg, rows * M);
            par_rows(&mut dx.0, M, |r0, dxs| {
                for (j, dxr) in dxs.chunks_mut(M).enumerate() {
                    let row = r0 + j;
                    let o = row * M;
                    let st = &stats[row * 2 * G..(row + 1) * 2 * G];
                    let gr = &gs12[row * 2 * G..(row + 1) * 2 * G];
                    for g in 0..G {
                        let r = c::<E>(st[2 * g + 1]);
                        let g1 = c::<E>(gr[2 * g] / gs as f64);
                        let g2 = c::<E>(2.0 * gr[2 * g + 1] / gs as f64);
                        for i in g * gs..(g + 1) * gs {
                            dxr[i] += dyv[o + i] * w1[i] * r + g1 + g2 * xv[o + i];
                        }
                    }
                }
            });
            restore_grad!(grads, xg, dx);
            let mut dw = take_grad!(grads, wg, M);
            super::host::add_into(&mut dw.0, &sums[..M]);
            restore_grad!(grads, wg, dw);
            let mut db = take_grad!(grads, bg, M);
            super::host::add_into(&mut db.0, &sums[M..]);
            restore_grad!(grads, bg, db);
            release_grad!(dev, dy);
            recycle(gs12);
            recycle(stats);
            recycle(xv);
            Ok(())
        });
    }
    Ok((out.put_tape(tape), state))
}
