//! Fused CPU kernels for the per-position ops ([`super::gates`] has their composed references):
//! the linear layer with its bias, SiLU, the SiLU gate, the per-head normalised Q/K affine and
//! the chunk-restarting RoPE. Each reads its inputs once, runs on rayon in row blocks, and records
//! one hand-written backward op (`docs/design.md` §15). dfdx runs each elementwise op single
//! threaded and allocates every intermediate and its gradient; these do one pass each way.

use super::host::{
    contiguous, input, mm, out_buf, output, par_rows, par_rows_sum, recycle, release_grad,
    restore_grad, scratch_any, take_grad, GRAIN,
};
use super::rope::Rope;
use super::simd::sigmoid;
use crate::util::{c, Float, Heads, Seq};
use anyhow::Result;
use dfdx::prelude::*;
use rayon::prelude::*;

fn par() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(rayon::current_num_threads())
}

/// `x (B, T, I) W^T + b` with `W (O, I)`; one `gemm` each way, the bias folded into the output
/// before the product and its gradient a column sum.
pub fn linear<const I: usize, const O: usize, E: Float, T: Tape<E, Cpu>>(
    x: Seq<I, E, Cpu, T>,
    w: &Tensor<Rank2<O, I>, E, Cpu>,
    b: Option<&Tensor<Rank1<O>, E, Cpu>>,
) -> Result<Seq<O, E, Cpu, T>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    linear_impl(x, w, b, None)
}

/// `x W^T + b + r`: the linear layer with a residual added in the same pass (the product
/// accumulates onto `r`; `r`'s gradient is the output's).
pub fn linear_add<const I: usize, const O: usize, E: Float, T: Tape<E, Cpu>>(
    x: Seq<I, E, Cpu, T>,
    w: &Tensor<Rank2<O, I>, E, Cpu>,
    b: Option<&Tensor<Rank1<O>, E, Cpu>>,
    r: Seq<O, E, Cpu, T>,
) -> Result<Seq<O, E, Cpu, T>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    linear_impl(x, w, b, Some(r))
}

fn linear_impl<const I: usize, const O: usize, E: Float, T: Tape<E, Cpu>>(
    x: Seq<I, E, Cpu, T>,
    w: &Tensor<Rank2<O, I>, E, Cpu>,
    b: Option<&Tensor<Rank1<O>, E, Cpu>>,
    r: Option<Seq<O, E, Cpu, T>>,
) -> Result<Seq<O, E, Cpu, T>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    const WHAT: &str = "linear";
    let (bs, t, _) = *x.shape();
    if let Some(r) = &r {
        anyhow::ensure!(
            r.shape().0 == bs && r.shape().1 == t,
            "{WHAT}: residual {:?} for input {:?}",
            r.shape(),
            x.shape()
        );
    }
    let rows = bs * t;
    let dev = x.device().clone();
    let (xv, xt, mut tape) = input(x, WHAT)?;
    let wv = super::host::param(w, WHAT)?;
    let bv = b.map(|b| b.as_vec());
    // the output starts as the residual (its host copy) or zeros, plus the bias
    let (mut y, rt) = match r {
        Some(r) => {
            let r = contiguous(r, WHAT)?;
            let mut y = out_buf(&dev, rows * O, WHAT)?;
            r.copy_into(&mut y);
            let (rt, tr) = r.split_tape();
            tape = tape.merge(tr);
            (y, Some(rt))
        }
        None => (out_buf(&dev, rows * O, WHAT)?, None),
    };
    let accumulate = bv.is_some() || rt.is_some();
    if let Some(bv) = &bv {
        par_rows(&mut y, O, |_, ys| {
            ys.chunks_mut(O)
                .for_each(|row| super::host::add_into(row, bv))
        });
    }
    // SAFETY: y (rows x O), x (rows x I), W^T read from W (O x I) with strides (1, I); all
    // in bounds, y aliases neither.
    unsafe {
        mm(
            (rows, O, I),
            (y.as_mut_ptr(), O, 1),
            accumulate,
            (xv.as_ptr(), I, 1),
            (wv.as_ptr(), 1, I),
            par(),
        );
    }
    let out = output(&dev, y, (bs, t, Const::<O>), WHAT)?;
    if T::OWNS_TAPE {
        let (xg, wg, og) = (xt.ghost(), w.ghost(), out.ghost());
        let bg = b.map(|b| b.ghost());
        let rg = rt.map(|r| r.ghost());
        drop(xt);
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, og, rows * O);
            let mut dx = take_grad!(grads, xg, rows * I);
            let mut dw = take_grad!(grads, wg, O * I);
            // SAFETY: as in forward; dx (rows x I) += dy (rows x O) W (O x I),
            // dW (O x I) += dy^T (O x rows, strides (1, O)) x (rows x I).
            unsafe {
                mm(
                    (rows, I, O),
                    (dx.0.as_mut_ptr(), I, 1),
                    true,
                    (dy.0.as_ptr(), O, 1),
                    (wv.as_ptr(), I, 1),
                    par(),
                );
                mm(
                    (O, I, rows),
                    (dw.0.as_mut_ptr(), I, 1),
                    true,
                    (dy.0.as_ptr(), 1, O),
                    (xv.as_ptr(), I, 1),
                    par(),
                );
            }
            restore_grad!(grads, xg, dx);
            restore_grad!(grads, wg, dw);
            if let Some(rg) = rg {
                let mut dr = take_grad!(grads, rg, rows * O);
                let dyv = &dy.0;
                par_rows(&mut dr.0, O, |r0, drs| {
                    super::host::add_into(drs, &dyv[r0 * O..r0 * O + drs.len()])
                });
                restore_grad!(grads, rg, dr);
            }
            if let Some(bg) = bg {
                let mut db = take_grad!(grads, bg, O);
                let sums =
                    dy.0.par_chunks((GRAIN / O).max(1) * O)
                        .fold(
                            || vec![E::zero(); O],
                            |mut acc, blk| {
                                for r in blk.chunks(O) {
                                    super::host::add_into(&mut acc, r);
                                }
                                acc
                            },
                        )
                        .reduce(
                            || vec![E::zero(); O],
                            |mut a, b| {
                                super::host::add_into(&mut a, &b);
                                a
                            },
                        );
                super::host::add_into(&mut db.0, &sums);
                restore_grad!(grads, bg, db);
            }
            release_grad!(dev, dy);
            recycle(xv);
            recycle(wv);
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// `silu(x) = x sigmoid(x)`.
pub fn silu<S: Shape, E: Float, T: Tape<E, Cpu>>(
    x: Tensor<S, E, Cpu, T>,
) -> Result<Tensor<S, E, Cpu, T>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    const WHAT: &str = "silu";
    let shape = *x.shape();
    let dev = x.device().clone();
    let (xv, xt, mut tape) = input(x, WHAT)?;
    let n = xv.len();
    let mut y = out_buf(&dev, n, WHAT)?;
    par_rows(&mut y, 1, |r0, ys| {
        let xs = &xv[r0..r0 + ys.len()];
        sigmoid(xs, ys);
        for (yi, &xi) in ys.iter_mut().zip(xs) {
            *yi *= xi;
        }
    });
    let out = output(&dev, y, shape, WHAT)?;
    if T::OWNS_TAPE {
        let (xg, og) = (xt.ghost(), out.ghost());
        drop(xt);
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, og, n);
            let mut dx = take_grad!(grads, xg, n);
            let dyv = &dy.0;
            par_rows(&mut dx.0, 1, |r0, dxs| {
                let xs = &xv[r0..r0 + dxs.len()];
                let mut s = vec![E::zero(); xs.len()];
                sigmoid(xs, &mut s);
                for (((d, &xi), &g), &si) in dxs.iter_mut().zip(xs).zip(&dyv[r0..]).zip(&s) {
                    *d += g * si * (E::one() + xi * (E::one() - si));
                }
            });
            restore_grad!(grads, xg, dx);
            release_grad!(dev, dy);
            recycle(xv);
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// The gate `a * silu(g)`.
pub fn silu_gate<S: Shape, E: Float, T: Tape<E, Cpu>>(
    g: Tensor<S, E, Cpu, T>,
    a: Tensor<S, E, Cpu, T>,
) -> Result<Tensor<S, E, Cpu, T>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    const WHAT: &str = "silu gate";
    let shape = *g.shape();
    anyhow::ensure!(
        a.shape().concrete() == shape.concrete(),
        "{WHAT}: gate {:?} and input {:?} shapes differ",
        shape.concrete(),
        a.shape().concrete()
    );
    let dev = g.device().clone();
    let (gv, gt, tg) = input(g, WHAT)?;
    let (av, at, ta) = input(a, WHAT)?;
    let mut tape = tg.merge(ta);
    let n = gv.len();
    let mut y = out_buf(&dev, n, WHAT)?;
    par_rows(&mut y, 1, |r0, ys| {
        let gs = &gv[r0..r0 + ys.len()];
        sigmoid(gs, ys);
        for ((yi, &gi), &ai) in ys.iter_mut().zip(gs).zip(&av[r0..]) {
            *yi *= ai * gi;
        }
    });
    let out = output(&dev, y, shape, WHAT)?;
    if T::OWNS_TAPE {
        let (gg, ag, og) = (gt.ghost(), at.ghost(), out.ghost());
        drop((gt, at));
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, og, n);
            let mut dg = take_grad!(grads, gg, n);
            let mut da = take_grad!(grads, ag, n);
            let dyv = &dy.0;
            dg.0.par_chunks_mut(GRAIN)
                .zip(da.0.par_chunks_mut(GRAIN))
                .enumerate()
                .for_each(|(i, (dgs, das))| {
                    let r0 = i * GRAIN;
                    let mut sg = vec![E::zero(); dgs.len()];
                    sigmoid(&gv[r0..r0 + dgs.len()], &mut sg);
                    for (j, (dgi, dai)) in dgs.iter_mut().zip(das.iter_mut()).enumerate() {
                        let (gi, ai, d) = (gv[r0 + j], av[r0 + j], dyv[r0 + j]);
                        let s = sg[j];
                        *dai += d * gi * s;
                        *dgi += d * ai * s * (E::one() + gi * (E::one() - s));
                    }
                });
            restore_grad!(grads, gg, dg);
            restore_grad!(grads, ag, da);
            release_grad!(dev, dy);
            recycle(gv);
            recycle(av);
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// Queries and keys from the shared Z, see [`super::gates::composed_qk_norm`].
#[allow(clippy::type_complexity)]
pub fn qk_norm<const ZW: usize, const H: usize, E: Float, T: Tape<E, Cpu>>(
    z: Seq<ZW, E, Cpu, T>,
    gamma: &Tensor<Rank2<2, ZW>, E, Cpu>,
    beta: &Tensor<Rank2<2, ZW>, E, Cpu>,
    eps: f64,
) -> Result<(Seq<ZW, E, Cpu, T>, Seq<ZW, E, Cpu, T>)>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    const WHAT: &str = "Q/K norm";
    let (bs, t, _) = *z.shape();
    let rows = bs * t;
    let dz = ZW / H;
    let dev = z.device().clone();
    let (zv, zt, mut tape) = input(z, WHAT)?;
    let scale = 1.0 / (dz as f64).sqrt();
    let gv = gamma.as_vec();
    let bv = beta.as_vec();
    // per-feature factors (1 + gamma_i) / sqrt(dz)
    let f: Vec<E> = gv.iter().map(|&g| (g + E::one()) * c::<E>(scale)).collect();
    // normalised Z (kept for backward) and the per-(row, head) inverse RMS
    let mut zn = scratch_any(rows * ZW);
    let mut rinv = vec![E::zero(); rows * H];
    zn.par_chunks_mut(GRAIN.div_ceil(ZW) * ZW)
        .zip(rinv.par_chunks_mut(GRAIN.div_ceil(ZW) * H))
        .enumerate()
        .for_each(|(i, (zns, rs))| {
            let r0 = i * GRAIN.div_ceil(ZW);
            for (j, (znr, rr)) in zns.chunks_mut(ZW).zip(rs.chunks_mut(H)).enumerate() {
                let zr = &zv[(r0 + j) * ZW..(r0 + j + 1) * ZW];
                for h in 0..H {
                    let seg = &zr[h * dz..(h + 1) * dz];
                    let ms = seg.iter().fold(E::zero(), |s, &x| s + x * x) / c(dz as f64);
                    let r = E::one() / (ms + c(eps)).sqrt();
                    rr[h] = r;
                    for (o, &x) in znr[h * dz..(h + 1) * dz].iter_mut().zip(seg) {
                        *o = x * r;
                    }
                }
            }
        });
    recycle(zv);
    let mut q = out_buf(&dev, rows * ZW, WHAT)?;
    let mut k = out_buf(&dev, rows * ZW, WHAT)?;
    q.par_chunks_mut(GRAIN.div_ceil(ZW) * ZW)
        .zip(k.par_chunks_mut(GRAIN.div_ceil(ZW) * ZW))
        .enumerate()
        .for_each(|(i, (qs, ks))| {
            let o0 = i * GRAIN.div_ceil(ZW) * ZW;
            for (j, (qi, ki)) in qs.iter_mut().zip(ks.iter_mut()).enumerate() {
                let col = (o0 + j) % ZW;
                let x = zn[o0 + j];
                *qi = x * f[col] + bv[col];
                *ki = x * f[ZW + col] + bv[ZW + col];
            }
        });
    let qo = output(&dev, q, (bs, t, Const::<ZW>), WHAT)?;
    let ko = output(&dev, k, (bs, t, Const::<ZW>), WHAT)?;
    if T::OWNS_TAPE {
        let (zg, gg, bg, qg, kg) = (
            zt.ghost(),
            gamma.ghost(),
            beta.ghost(),
            qo.ghost(),
            ko.ghost(),
        );
        drop(zt);
        tape.add_backward_op(move |grads| {
            let dq = take_grad!(grads, qg, rows * ZW);
            let dk = take_grad!(grads, kg, rows * ZW);
            let mut dzb = take_grad!(grads, zg, rows * ZW);
            let (dqv, dkv) = (&dq.0, &dk.0);
            // parameter gradients: [dgamma_0 | dgamma_1 | dbeta_0 | dbeta_1]
            let sums = par_rows_sum(
                &mut dzb.0,
                ZW,
                || vec![E::zero(); 4 * ZW],
                |r0, dzs, acc| {
                    let mut dn = vec![E::zero(); ZW];
                    for (j, dzr) in dzs.chunks_mut(ZW).enumerate() {
                        let row = r0 + j;
                        let o = row * ZW;
                        for i in 0..ZW {
                            let (a, b, x) = (dqv[o + i], dkv[o + i], zn[o + i]);
                            dn[i] = a * f[i] + b * f[ZW + i];
                            acc[i] += a * x * c(scale);
                            acc[ZW + i] += b * x * c(scale);
                            acc[2 * ZW + i] += a;
                            acc[3 * ZW + i] += b;
                        }
                        for h in 0..H {
                            let r = rinv[row * H + h];
                            let seg = h * dz..(h + 1) * dz;
                            let dot = seg.clone().fold(E::zero(), |s, i| s + dn[i] * zn[o + i])
                                / c(dz as f64);
                            for i in seg {
                                dzr[i] += r * (dn[i] - zn[o + i] * dot);
                            }
                        }
                    }
                },
                |a, b| super::host::add_into(a, &b),
            );
            let mut dgam = take_grad!(grads, gg, 2 * ZW);
            super::host::add_into(&mut dgam.0, &sums[..2 * ZW]);
            let mut dbet = take_grad!(grads, bg, 2 * ZW);
            super::host::add_into(&mut dbet.0, &sums[2 * ZW..]);
            release_grad!(dev, dq);
            release_grad!(dev, dk);
            restore_grad!(grads, zg, dzb);
            restore_grad!(grads, gg, dgam);
            restore_grad!(grads, bg, dbet);
            recycle(zn);
            Ok(())
        });
    }
    Ok((qo.put_tape(tape), ko.put_tape(T::default())))
}

/// RoPE of `x (B, T, H, dz)` at the within-chunk `positions` (length T), see [`Rope::apply`].
pub fn rope<const H: usize, E: Float, T: Tape<E, Cpu>>(
    rope: &Rope,
    x: Heads<H, E, Cpu, T>,
    positions: &[usize],
) -> Result<Heads<H, E, Cpu, T>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    const WHAT: &str = "RoPE";
    let shape = *x.shape();
    let (bs, t, _, dz) = shape;
    anyhow::ensure!(
        positions.len() == t && dz == 2 * rope.freqs.len(),
        "{WHAT}: {} positions and width {dz} for {t} steps of width {}",
        positions.len(),
        2 * rope.freqs.len()
    );
    let dev = x.device().clone();
    let (xv, xt, mut tape) = input(x, WHAT)?;
    let half = dz / 2;
    // (cos, sin) per (step, pair), as the composed tables
    let (cs, sn) = rope.cos_sin::<E>(positions);
    let row = H * dz;
    let rotate = move |src: &[E], dst: &mut [E], r0: usize, sign: E| {
        for (j, (d, s)) in dst
            .chunks_mut(row)
            .zip(src[r0 * row..].chunks(row))
            .enumerate()
        {
            let ti = (r0 + j) % t;
            let (cr, sr) = (
                &cs[ti * half..(ti + 1) * half],
                &sn[ti * half..(ti + 1) * half],
            );
            for h in 0..H {
                let (dh, sh) = (&mut d[h * dz..(h + 1) * dz], &s[h * dz..(h + 1) * dz]);
                for p in 0..half {
                    let (a, b) = (sh[2 * p], sh[2 * p + 1]);
                    let (co, si) = (cr[p], sign * sr[p]);
                    dh[2 * p] += a * co - b * si;
                    dh[2 * p + 1] += b * co + a * si;
                }
            }
        }
    };
    let mut y = out_buf(&dev, bs * t * row, WHAT)?;
    par_rows(&mut y, row, |r0, ys| rotate(&xv, ys, r0, E::one()));
    recycle(xv);
    let out = output(&dev, y, shape, WHAT)?;
    if T::OWNS_TAPE {
        let (xg, og) = (xt.ghost(), out.ghost());
        drop(xt);
        let n = bs * t * row;
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, og, n);
            let mut dx = take_grad!(grads, xg, n);
            // the transpose of a rotation is the rotation by the opposite angle
            par_rows(&mut dx.0, row, |r0, dxs| rotate(&dy.0, dxs, r0, -E::one()));
            restore_grad!(grads, xg, dx);
            release_grad!(dev, dy);
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}
