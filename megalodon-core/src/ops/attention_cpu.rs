//! Fused block attention for `Cpu` with a hand-written, flash-attention style backward.
//!
//! Forward, per block `bn` and head `h`, in tiles of query rows: `S = Q K^T` (only the key prefix
//! some row of the tile may see), masked by [`BlockMask::allows`], row softmax `P`, `O = P V`.
//! Kept for backward: host copies of q, k, v (the contiguous copies a permuted input needs anyway)
//! and the per-row logsumexp, O(Bn H Lq) extra, instead of the composed op's several
//! `(Bn, H, Lq, Lk)` tensors.
//!
//! Backward recomputes `S` and `P` tile by tile from q, k and the logsumexp: `dV = P^T dO`,
//! `dP = dO V^T`, `D_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i)` (so O is not needed),
//! `dS = P * (dP - D)`, `dQ = dS K`, `dK = dS^T Q`, *added* into the gradients of q, k and v
//! (they may have other consumers), in place in the gradient buffers.
//!
//! Matrix products go through the `gemm` crate (the one dfdx's CPU matmul uses). Blocks run in
//! parallel on rayon when there are at least as many blocks as threads, otherwise each product
//! is parallelised by gemm. Scratch memory is two `(TILE, Lk)` buffers per running block.
//! Rows without any visible key produce zeros and pass zero gradients.

use super::block_attention::{BlockMask, Blocks};
use super::host::{contiguous, mm, out_buf, recycle, scratch, values};
use super::simd::exp_in_place;
use crate::util::Float;
use anyhow::{ensure, Result};
use dfdx::prelude::*;
use rayon::prelude::*;

/// Query rows per tile.
const TILE: usize = 128;

/// Sizes of one call.
#[derive(Debug, Clone, Copy)]
struct BlockDims {
    bn: usize,
    h: usize,
    lq: usize,
    lk: usize,
    dz: usize,
    dv: usize,
}

/// Block attention on the CPU; same contract as [`crate::device::MegaDevice::block_attention`].
pub fn block_attention<const H: usize, E: Float, T: Tape<E, Cpu>>(
    q: Blocks<H, E, Cpu, T>,
    k: Blocks<H, E, Cpu, T>,
    v: Blocks<H, E, Cpu, T>,
    mask: &BlockMask,
) -> Result<Blocks<H, E, Cpu, T>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    let (bn, _, lq, dz) = *q.shape();
    let (kbn, _, lk, kdz) = *k.shape();
    let (vbn, _, vlk, dv) = *v.shape();
    ensure!(
        kbn == bn && vbn == bn && vlk == lk && kdz == dz,
        "block attention: q {:?}, k {:?}, v {:?} shapes disagree",
        q.shape(),
        k.shape(),
        v.shape()
    );
    if let Some(vk) = &mask.valid_keys {
        ensure!(
            vk.len() == bn,
            "block attention: {} valid-key counts for {bn} blocks",
            vk.len()
        );
    }
    ensure!(
        lq > 0 && lk > 0 && dz > 0 && dv > 0,
        "block attention: empty dimension in q {:?}, k {:?}, v {:?}",
        q.shape(),
        k.shape(),
        v.shape()
    );
    let dims = BlockDims {
        bn,
        h: H,
        lq,
        lk,
        dz,
        dv,
    };
    // Permuted inputs are stride views; `contiguous` copies them (recording its own backward op
    // on their tapes) so that host data and gradient buffers are in logical row-major order.
    const WHAT: &str = "block attention";
    let (q, tq) = contiguous(q, WHAT)?.split_tape();
    let (k, tk) = contiguous(k, WHAT)?.split_tape();
    let (v, tv) = contiguous(v, WHAT)?.split_tape();
    let mut tape = tq.merge(tk).merge(tv);

    // host copies in logical order; with a tape they are the only state kept for backward
    let (qv, kv, vv) = (values(&q), values(&k), values(&v));
    let dev = q.device().clone();
    let mut ov = out_buf(&dev, bn * H * lq * dv, WHAT)?;
    let lse = forward(dims, &qv, &kv, &vv, mask, &mut ov);
    let out = super::host::output(&dev, ov, (bn, Const::<H>, lq, dv), WHAT)?;

    if T::OWNS_TAPE {
        let (qg, kg, vg, og) = (q.ghost(), k.ghost(), v.ghost(), out.ghost());
        drop((q, k, v));
        let mask = mask.clone();
        let sizes = [qv.len(), kv.len(), vv.len()];
        tape.add_backward_op(move |grads| {
            // Move the buffers out of `grads` (no copies) so that dO can be read while the three
            // input gradients are written. An input whose gradient entry is already taken is the
            // same tensor as an earlier one: it gets a scratch buffer that is added afterwards.
            let go = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            assert_eq!(
                go.len(),
                bn * H * lq * dv,
                "block attention: output gradient length"
            );
            let mut bufs = Vec::with_capacity(3);
            for (g, n) in [(&qg, sizes[0]), (&kg, sizes[1]), (&vg, sizes[2])] {
                let b = std::mem::take(&mut **grads.get_or_alloc_mut(g)?);
                bufs.push(if b.len() == n {
                    (b, true)
                } else {
                    assert!(b.is_empty(), "block attention: input gradient length");
                    (scratch(n), false)
                });
            }
            let [(mut dq, oq), (mut dk, ok), (mut dvv, ov)]: [(Vec<E>, bool); 3] =
                bufs.try_into().expect("three buffers");
            backward(
                dims, &qv, &kv, &vv, &go, &lse, &mask, &mut dq, &mut dk, &mut dvv,
            );
            // nothing reads dO again: back to dfdx's cache for the gradients below
            super::host::give_to_dfdx(&dev, go);
            let mut later = Vec::new();
            for (g, b, owned) in [(&qg, dq, oq), (&kg, dk, ok), (&vg, dvv, ov)] {
                if owned {
                    **grads.get_or_alloc_mut(g)? = b;
                } else {
                    later.push((g, b));
                }
            }
            for (g, b) in later {
                let buf = grads.get_or_alloc_mut(g)?;
                assert_eq!(buf.len(), b.len(), "block attention: input gradient length");
                buf.iter_mut().zip(&b).for_each(|(x, y)| *x += *y);
                recycle(b);
            }
            for v in [qv, kv, vv] {
                recycle(v);
            }
            Ok(())
        });
    } else {
        for v in [qv, kv, vv] {
            recycle(v);
        }
    }
    Ok(out.put_tape(tape))
}

/// For rows `r0..r1` of block `b`: one past the last visible key of each row (0 = none).
fn key_limits(mask: &BlockMask, b: usize, r0: usize, r1: usize, lk: usize) -> Vec<usize> {
    (r0..r1)
        .map(|i| {
            (0..lk)
                .rev()
                .find(|&j| mask.allows(b, i, j))
                .map_or(0, |j| j + 1)
        })
        .collect()
}

/// Runs `f(block index, per-block chunks...)` over all `(bn, h)` blocks: in parallel over blocks
/// when there are enough of them, otherwise sequentially with gemm-level parallelism.
fn for_blocks<E: Float, F>(nblocks: usize, bufs: Vec<(&mut [E], usize)>, f: F)
where
    F: Fn(usize, &mut [&mut [E]], gemm::Parallelism) + Sync,
{
    let threads = rayon::current_num_threads();
    // split each buffer into per-block chunks, then transpose to per-block lists
    let mut per_block: Vec<Vec<&mut [E]>> = (0..nblocks).map(|_| Vec::new()).collect();
    for (buf, len) in bufs {
        for (i, c) in buf.chunks_mut(len.max(1)).take(nblocks).enumerate() {
            per_block[i].push(c);
        }
    }
    if nblocks >= threads || threads == 1 {
        per_block
            .into_par_iter()
            .enumerate()
            .for_each(|(i, mut c)| f(i, &mut c, gemm::Parallelism::None));
    } else {
        for (i, mut c) in per_block.into_iter().enumerate() {
            f(i, &mut c, gemm::Parallelism::Rayon(threads));
        }
    }
}

/// Writes `O (Bn, H, Lq, dv)` into `o`; returns the logsumexp `(Bn, H, Lq)`.
fn forward<E: Float>(
    d: BlockDims,
    q: &[E],
    k: &[E],
    v: &[E],
    mask: &BlockMask,
    o: &mut [E],
) -> Vec<E> {
    let BlockDims {
        bn,
        h,
        lq,
        lk,
        dz,
        dv,
    } = d;
    let nblocks = bn * h;
    let mut lse = vec![E::zero(); nblocks * lq];
    let ninf = E::neg_infinity();
    for_blocks(
        nblocks,
        vec![(o, lq * dv), (&mut lse, lq)],
        |blk, bufs, par| {
            let b = blk / h;
            let qb = &q[blk * lq * dz..(blk + 1) * lq * dz];
            let kb = &k[blk * lk * dz..(blk + 1) * lk * dz];
            let vb = &v[blk * lk * dv..(blk + 1) * lk * dv];
            let (ob, rest) = bufs.split_at_mut(1);
            let (ob, lb) = (&mut *ob[0], &mut *rest[0]);
            let mut s = vec![E::zero(); TILE.min(lq) * lk];
            for r0 in (0..lq).step_by(TILE) {
                let r1 = (r0 + TILE).min(lq);
                let rows = r1 - r0;
                let lim = key_limits(mask, b, r0, r1, lk);
                let kmax = lim.iter().copied().max().unwrap_or(0);
                if kmax == 0 {
                    ob[r0 * dv..r1 * dv].fill(E::zero());
                    lb[r0..r1].fill(ninf);
                    continue;
                }
                // S = Q[r0..r1] K[..kmax]^T, (rows x kmax) with row stride kmax
                unsafe {
                    mm(
                        (rows, kmax, dz),
                        (s.as_mut_ptr(), kmax, 1),
                        false,
                        (qb.as_ptr().add(r0 * dz), dz, 1),
                        (kb.as_ptr(), 1, dz),
                        par,
                    );
                }
                for (ii, i) in (r0..r1).enumerate() {
                    let row = &mut s[ii * kmax..(ii + 1) * kmax];
                    let mut m = ninf;
                    for (j, x) in row.iter_mut().enumerate() {
                        if j < lim[ii] && mask.allows(b, i, j) {
                            m = m.max(*x);
                        } else {
                            *x = ninf;
                        }
                    }
                    if m == ninf {
                        row.fill(E::zero());
                        lb[i] = ninf;
                        continue;
                    }
                    row.iter_mut().for_each(|x| *x -= m);
                    exp_in_place(row);
                    let sum = row.iter().fold(E::zero(), |s, &x| s + x);
                    let inv = sum.recip();
                    row.iter_mut().for_each(|x| *x *= inv);
                    lb[i] = m + sum.ln();
                }
                // O[r0..r1] = P V[..kmax]
                unsafe {
                    mm(
                        (rows, dv, kmax),
                        (ob.as_mut_ptr().add(r0 * dv), dv, 1),
                        false,
                        (s.as_ptr(), kmax, 1),
                        (vb.as_ptr(), dv, 1),
                        par,
                    );
                }
            }
        },
    );
    lse
}

/// Adds the gradients of one call into `dq (Bn, H, Lq, dz)`, `dk` and `dvv (Bn, H, Lk, dv)`.
#[allow(clippy::too_many_arguments)]
fn backward<E: Float>(
    d: BlockDims,
    q: &[E],
    k: &[E],
    v: &[E],
    go: &[E],
    lse: &[E],
    mask: &BlockMask,
    dq: &mut [E],
    dk: &mut [E],
    dvv: &mut [E],
) {
    let BlockDims {
        bn,
        h,
        lq,
        lk,
        dz,
        dv,
    } = d;
    let nblocks = bn * h;
    let ninf = E::neg_infinity();
    for_blocks(
        nblocks,
        vec![(dq, lq * dz), (dk, lk * dz), (dvv, lk * dv)],
        |blk, bufs, par| {
            let b = blk / h;
            let qb = &q[blk * lq * dz..(blk + 1) * lq * dz];
            let kb = &k[blk * lk * dz..(blk + 1) * lk * dz];
            let vb = &v[blk * lk * dv..(blk + 1) * lk * dv];
            let gb = &go[blk * lq * dv..(blk + 1) * lq * dv];
            let lb = &lse[blk * lq..(blk + 1) * lq];
            let (dqb, rest) = bufs.split_at_mut(1);
            let (dkb, dvb) = rest.split_at_mut(1);
            let (dqb, dkb, dvb) = (&mut *dqb[0], &mut *dkb[0], &mut *dvb[0]);
            let mut p = vec![E::zero(); TILE.min(lq) * lk];
            let mut ds = vec![E::zero(); TILE.min(lq) * lk];
            for r0 in (0..lq).step_by(TILE) {
                let r1 = (r0 + TILE).min(lq);
                let rows = r1 - r0;
                let lim = key_limits(mask, b, r0, r1, lk);
                let kmax = lim.iter().copied().max().unwrap_or(0);
                if kmax == 0 {
                    continue;
                }
                unsafe {
                    // S = Q K^T (recomputed) into p
                    mm(
                        (rows, kmax, dz),
                        (p.as_mut_ptr(), kmax, 1),
                        false,
                        (qb.as_ptr().add(r0 * dz), dz, 1),
                        (kb.as_ptr(), 1, dz),
                        par,
                    );
                    // dP = dO V^T into ds
                    mm(
                        (rows, kmax, dv),
                        (ds.as_mut_ptr(), kmax, 1),
                        false,
                        (gb.as_ptr().add(r0 * dv), dv, 1),
                        (vb.as_ptr(), 1, dv),
                        par,
                    );
                }
                for (ii, i) in (r0..r1).enumerate() {
                    let prow = &mut p[ii * kmax..(ii + 1) * kmax];
                    let dsrow = &mut ds[ii * kmax..(ii + 1) * kmax];
                    let l = lb[i];
                    if l == ninf {
                        prow.fill(E::zero());
                        dsrow.fill(E::zero());
                        continue;
                    }
                    // D_i = dO_i . O_i = sum_j P_ij dP_ij
                    for (j, x) in prow.iter_mut().enumerate() {
                        // masked entries become e^-inf = 0
                        *x = if j < lim[ii] && mask.allows(b, i, j) {
                            *x - l
                        } else {
                            ninf
                        };
                    }
                    exp_in_place(prow);
                    let di = prow
                        .iter()
                        .zip(dsrow.iter())
                        .fold(E::zero(), |s, (x, g)| s + *x * *g);
                    for (x, g) in prow.iter().zip(dsrow.iter_mut()) {
                        *g = *x * (*g - di);
                    }
                }
                unsafe {
                    // dV[..kmax] += P^T dO
                    mm(
                        (kmax, dv, rows),
                        (dvb.as_mut_ptr(), dv, 1),
                        true,
                        (p.as_ptr(), 1, kmax),
                        (gb.as_ptr().add(r0 * dv), dv, 1),
                        par,
                    );
                    // dQ[r0..r1] += dS K[..kmax]
                    mm(
                        (rows, dz, kmax),
                        (dqb.as_mut_ptr().add(r0 * dz), dz, 1),
                        true,
                        (ds.as_ptr(), kmax, 1),
                        (kb.as_ptr(), dz, 1),
                        par,
                    );
                    // dK[..kmax] += dS^T Q[r0..r1]
                    mm(
                        (kmax, dz, rows),
                        (dkb.as_mut_ptr(), dz, 1),
                        true,
                        (ds.as_ptr(), 1, kmax),
                        (qb.as_ptr().add(r0 * dz), dz, 1),
                        par,
                    );
                }
            }
        },
    );
}
