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
//! Matrix products go through the `gemm` crate, one thread each. Blocks run in parallel on rayon
//! when there are at least as many blocks as threads; otherwise the query tiles of each block
//! do (a training sequence of one chunk is one block): in forward each tile owns its rows of O,
//! in backward each thread takes a group of tiles with its own partial dK and dV, summed at the
//! end. Scratch memory is one or two `(TILE, Lk)` buffers per running task (plus the partial
//! dK, dV).
//! Rows without any visible key produce zeros and pass zero gradients.

use super::block_attention::{BlockMask, Blocks};
use super::host::{
    add_into, contiguous, mm, out_buf, recycle, release_grad, restore_grad, scratch, scratch_any,
    take_grad, values,
};
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
            // input gradients are written; an input that is the same tensor as an earlier one
            // gets a scratch buffer that is added when the buffers are put back.
            let go = take_grad!(grads, og, bn * H * lq * dv);
            let mut dq = take_grad!(grads, qg, sizes[0]);
            let mut dk = take_grad!(grads, kg, sizes[1]);
            let mut dvv = take_grad!(grads, vg, sizes[2]);
            backward(
                dims, &qv, &kv, &vv, &go.0, &lse, &mask, &mut dq.0, &mut dk.0, &mut dvv.0,
            );
            release_grad!(dev, go);
            restore_grad!(grads, qg, dq);
            restore_grad!(grads, kg, dk);
            restore_grad!(grads, vg, dvv);
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

/// Whether the `(bn, h)` blocks of a call run in parallel (enough of them for every thread);
/// otherwise the query tiles of each block are spread over the threads.
fn blocks_in_parallel(nblocks: usize) -> bool {
    let threads = rayon::current_num_threads();
    nblocks >= threads || threads == 1
}

/// Query tiles of one block dealt to `groups` groups back and forth (0 1 | 1 0 | 0 1 ...), so
/// that under a causal mask, where later tiles see more keys, every group gets a similar share.
fn tile_group(t: usize, groups: usize) -> usize {
    let (round, pos) = (t / groups, t % groups);
    if round.is_multiple_of(2) {
        pos
    } else {
        groups - 1 - pos
    }
}

/// The read-only inputs of one call, and its sizes.
struct Inputs<'a, E> {
    d: BlockDims,
    q: &'a [E],
    k: &'a [E],
    v: &'a [E],
    mask: &'a BlockMask,
}

impl<E: Float> Inputs<'_, E> {
    /// Q, K and V of block `blk`.
    fn block(&self, blk: usize) -> (&[E], &[E], &[E]) {
        let BlockDims { lq, lk, dz, dv, .. } = self.d;
        (
            &self.q[blk * lq * dz..(blk + 1) * lq * dz],
            &self.k[blk * lk * dz..(blk + 1) * lk * dz],
            &self.v[blk * lk * dv..(blk + 1) * lk * dv],
        )
    }

    /// `S = Q[r0..r0 + rows] K[..kmax]^T` of one block into `s`, `(rows x kmax)` with row
    /// stride `kmax`.
    fn scores(&self, qb: &[E], kb: &[E], r0: usize, rows: usize, kmax: usize, s: &mut [E]) {
        let dz = self.d.dz;
        assert!(
            (r0 + rows) * dz <= qb.len() && kmax * dz <= kb.len() && rows * kmax <= s.len(),
            "block attention: tile out of range"
        );
        // SAFETY: the assertion above keeps every addressed element inside its slice; `s` is
        // borrowed mutably, so it aliases neither input.
        unsafe {
            mm(
                (rows, kmax, dz),
                (s.as_mut_ptr(), kmax, 1),
                false,
                (qb.as_ptr().add(r0 * dz), dz, 1),
                (kb.as_ptr(), 1, dz),
                gemm::Parallelism::None,
            );
        }
    }

    /// Forward of query rows `r0..r1` of block `blk`: writes their output rows `ot` and
    /// log-sum-exps `lt`; `s` is scratch of at least `TILE * lk`.
    fn forward_tile(&self, blk: usize, r0: usize, ot: &mut [E], lt: &mut [E], s: &mut [E]) {
        let BlockDims { h, lk, dv, .. } = self.d;
        let ninf = E::neg_infinity();
        let b = blk / h;
        let rows = lt.len();
        let r1 = r0 + rows;
        let (qb, kb, vb) = self.block(blk);
        let mask = self.mask;
        let lim = key_limits(mask, b, r0, r1, lk);
        let kmax = lim.iter().copied().max().unwrap_or(0);
        if kmax == 0 {
            ot.fill(E::zero());
            lt.fill(ninf);
            return;
        }
        self.scores(qb, kb, r0, rows, kmax, s);
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
                lt[ii] = ninf;
                continue;
            }
            row.iter_mut().for_each(|x| *x -= m);
            exp_in_place(row);
            let sum = row.iter().fold(E::zero(), |s, &x| s + x);
            let inv = sum.recip();
            row.iter_mut().for_each(|x| *x *= inv);
            lt[ii] = m + sum.ln();
        }
        // O[r0..r1] = P V[..kmax]
        unsafe {
            mm(
                (rows, dv, kmax),
                (ot.as_mut_ptr(), dv, 1),
                false,
                (s.as_ptr(), kmax, 1),
                (vb.as_ptr(), dv, 1),
                gemm::Parallelism::None,
            );
        }
    }

    /// Backward of query rows `r0..r0 + dqt.len() / dz` of block `blk`: adds into their rows of
    /// dQ (`dqt`) and into the whole block's dK (`dkb`) and dV (`dvb`); `p` and `ds` are scratch
    /// of at least `TILE * lk`.
    #[allow(clippy::too_many_arguments)]
    fn backward_tile(
        &self,
        blk: usize,
        r0: usize,
        go: &[E],
        lse: &[E],
        dqt: &mut [E],
        dkb: &mut [E],
        dvb: &mut [E],
        p: &mut [E],
        ds: &mut [E],
    ) {
        let BlockDims {
            h, lq, lk, dz, dv, ..
        } = self.d;
        let ninf = E::neg_infinity();
        let b = blk / h;
        let rows = dqt.len() / dz;
        let r1 = r0 + rows;
        let (qb, kb, vb) = self.block(blk);
        let gb = &go[blk * lq * dv..(blk + 1) * lq * dv];
        let lb = &lse[blk * lq..(blk + 1) * lq];
        let mask = self.mask;
        let lim = key_limits(mask, b, r0, r1, lk);
        let kmax = lim.iter().copied().max().unwrap_or(0);
        if kmax == 0 {
            return;
        }
        let par = gemm::Parallelism::None;
        // S = Q K^T (recomputed) into p
        self.scores(qb, kb, r0, rows, kmax, p);
        unsafe {
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
                (dqt.as_mut_ptr(), dz, 1),
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
}

/// Writes `O (Bn, H, Lq, dv)` into `o`; returns the logsumexp `(Bn, H, Lq)`. Blocks run in
/// parallel when there are enough of them, otherwise the query tiles of each block do (each
/// tile's rows of O and of the logsumexp are its own).
fn forward<E: Float>(
    d: BlockDims,
    q: &[E],
    k: &[E],
    v: &[E],
    mask: &BlockMask,
    o: &mut [E],
) -> Vec<E> {
    let BlockDims {
        bn, h, lq, lk, dv, ..
    } = d;
    let nblocks = bn * h;
    let mut lse = vec![E::zero(); nblocks * lq];
    let inp = Inputs { d, q, k, v, mask };
    let scratch_len = TILE.min(lq) * lk;
    if blocks_in_parallel(nblocks) {
        o.par_chunks_mut(lq * dv)
            .zip(lse.par_chunks_mut(lq))
            .enumerate()
            .for_each(|(blk, (ob, lb))| {
                let mut s = scratch_any(scratch_len);
                for (t, (ot, lt)) in ob
                    .chunks_mut(TILE * dv)
                    .zip(lb.chunks_mut(TILE))
                    .enumerate()
                {
                    inp.forward_tile(blk, t * TILE, ot, lt, &mut s);
                }
                recycle(s);
            });
    } else {
        for (blk, (ob, lb)) in o.chunks_mut(lq * dv).zip(lse.chunks_mut(lq)).enumerate() {
            ob.par_chunks_mut(TILE * dv)
                .zip(lb.par_chunks_mut(TILE))
                .enumerate()
                .for_each(|(t, (ot, lt))| {
                    let mut s = scratch_any(scratch_len);
                    inp.forward_tile(blk, t * TILE, ot, lt, &mut s);
                    recycle(s);
                });
        }
    }
    lse
}

/// Adds the gradients of one call into `dq (Bn, H, Lq, dz)`, `dk` and `dvv (Bn, H, Lk, dv)`.
/// Blocks run in parallel when there are enough of them; otherwise the query tiles of each block
/// are split into one group per thread, each adding into its own rows of dQ and its own partial
/// dK and dV, which are summed at the end.
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
    let inp = Inputs { d, q, k, v, mask };
    let scratch_len = TILE.min(lq) * lk;
    if blocks_in_parallel(nblocks) {
        dq.par_chunks_mut(lq * dz)
            .zip(dk.par_chunks_mut(lk * dz))
            .zip(dvv.par_chunks_mut(lk * dv))
            .enumerate()
            .for_each(|(blk, ((dqb, dkb), dvb))| {
                let mut p = scratch_any(scratch_len);
                let mut ds = scratch_any(scratch_len);
                for (t, dqt) in dqb.chunks_mut(TILE * dz).enumerate() {
                    inp.backward_tile(blk, t * TILE, go, lse, dqt, dkb, dvb, &mut p, &mut ds);
                }
                recycle(p);
                recycle(ds);
            });
        return;
    }
    let groups = rayon::current_num_threads();
    for (blk, ((dqb, dkb), dvb)) in dq
        .chunks_mut(lq * dz)
        .zip(dk.chunks_mut(lk * dz))
        .zip(dvv.chunks_mut(lk * dv))
        .enumerate()
    {
        let mut dealt: Vec<Vec<(usize, &mut [E])>> = (0..groups).map(|_| Vec::new()).collect();
        for (t, dqt) in dqb.chunks_mut(TILE * dz).enumerate() {
            dealt[tile_group(t, groups)].push((t, dqt));
        }
        let partials: Vec<(Vec<E>, Vec<E>)> = dealt
            .into_par_iter()
            .filter(|tiles| !tiles.is_empty())
            .map(|tiles| {
                let mut dkp = scratch(lk * dz);
                let mut dvp = scratch(lk * dv);
                let mut p = scratch_any(scratch_len);
                let mut ds = scratch_any(scratch_len);
                for (t, dqt) in tiles {
                    inp.backward_tile(
                        blk,
                        t * TILE,
                        go,
                        lse,
                        dqt,
                        &mut dkp,
                        &mut dvp,
                        &mut p,
                        &mut ds,
                    );
                }
                recycle(p);
                recycle(ds);
                (dkp, dvp)
            })
            .collect();
        for (dkp, dvp) in partials {
            add_into(dkb, &dkp);
            add_into(dvb, &dvp);
            recycle(dkp);
            recycle(dvp);
        }
    }
}
