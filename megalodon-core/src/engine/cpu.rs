//! The engine's CPU backend: one block of tokens through every layer (`docs/engine.md`). Plain
//! Rust over the state's preallocated buffers. Several rows (prefill) go through `gemm`, threaded
//! by rayon when a product is large enough; one row (decode) through our matrix-vector loops,
//! split over the engine's spinning [`Team`] of threads, as is attention's weighted value sum.

use super::team::Team;
use super::{Engine, EngineState, Lin, NormStats, Want, Q8};
use crate::ops::simd::simd_dispatch;

/// Multi-row (prefill) products with at least this many multiply-adds run `gemm` on rayon's
/// threads (below it, measured on 2 cores with `bench_stream`, the hand-offs cost more than they
/// save).
const PARALLEL_MACS: usize = 1 << 20;

/// Decode products (and attention value sums) with at least this many multiply-adds are split
/// over the engine's [`Team`] (below it the split costs more than it saves; `bench_stream`).
const TEAM_MACS: usize = 1 << 15;

/// `*mut f32` that may cross to the team's threads: each part writes a disjoint range.
#[derive(Clone, Copy)]
struct PartPtr(*mut f32);
// SAFETY: only used to hand disjoint ranges of one live `&mut [f32]` to the parts of one job,
// which all end before that borrow does (`Team::run` returns after every part).
unsafe impl Send for PartPtr {}
unsafe impl Sync for PartPtr {}

impl PartPtr {
    /// The pointer `i` elements on (a method, so closures capture the `Sync` wrapper).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Runs `f(range, rows_of_dst)` over `dst` in ranges of a few multiples of 8 rows, which the
/// team's threads take in turn (so a thread that starts late or runs slower takes fewer).
fn split_rows(
    team: &Team,
    dst: &mut [f32],
    f: &(dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync),
) {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let n = dst.len();
    let step = n.div_ceil(team.parts() * 4).next_multiple_of(8);
    let next = AtomicUsize::new(0);
    let ptr = PartPtr(dst.as_mut_ptr());
    team.run(&|_| loop {
        let r0 = next.fetch_add(step, Relaxed);
        if r0 >= n {
            break;
        }
        let r1 = (r0 + step).min(n);
        // SAFETY: every range is taken once (the atomic counter), so the parts write disjoint
        // ranges of `dst`, which outlives the job (see PartPtr).
        let d = unsafe { std::slice::from_raw_parts_mut(ptr.at(r0), r1 - r0) };
        f(r0..r1, d);
    });
}

/// Rows of an int8 matrix dequantised at a time for a multi-row (prefill) product.
pub(crate) const DEQ_ROWS: usize = 64;

/// Dot product with 32 independent lanes (vectorised by the compiler).
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..32 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

simd_dispatch! {
    /// `dst[o] (+)= W[o, :] . x` for the rows of `w` (row-major `(dst.len(), x.len())`).
    fn gemv_rows(dst: &mut [f32], w: &[f32], x: &[f32], accumulate: bool) => gemv_rows_generic
}

#[inline(always)]
fn gemv_rows_generic(dst: &mut [f32], w: &[f32], x: &[f32], accumulate: bool) {
    for (y, row) in dst.iter_mut().zip(w.chunks_exact(x.len())) {
        let v = dot_lanes(row, x);
        *y = if accumulate { *y + v } else { v };
    }
}

/// Dot product of int8 weights with f32 activations, 32 lanes.
#[inline(always)]
fn dot_lanes_i8(a: &[i8], b: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..32 {
            acc[i] = (x[i] as f32).mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += *x as f32 * y;
    }
    s
}

simd_dispatch! {
    /// `dst[o] (+)= scale[o] (Q[o, :] . x)` for int8 rows `q` with per-row scales.
    fn gemv_rows_i8(dst: &mut [f32], q: &[i8], scale: &[f32], x: &[f32], accumulate: bool)
        => gemv_rows_i8_generic
}

#[inline(always)]
fn gemv_rows_i8_generic(dst: &mut [f32], q: &[i8], scale: &[f32], x: &[f32], accumulate: bool) {
    for ((y, row), &sc) in dst.iter_mut().zip(q.chunks_exact(x.len())).zip(scale) {
        let v = sc * dot_lanes_i8(row, x);
        *y = if accumulate { *y + v } else { v };
    }
}

/// One row through int8 weights: `dst (out) (+)= W x`, split like [`gemv`].
fn gemv_i8(dst: &mut [f32], w: &Q8, x: &[f32], accumulate: bool) {
    let (out, inp) = (dst.len(), x.len());
    match Team::get() {
        Some(team) if out * inp >= TEAM_MACS => split_rows(team, dst, &|r, d| {
            gemv_rows_i8(
                d,
                &w.q[r.start * inp..r.end * inp],
                &w.scale[r.clone()],
                x,
                accumulate,
            )
        }),
        _ => gemv_rows_i8(dst, &w.q, &w.scale, x, accumulate),
    }
}

/// One row: `dst (out) (+)= W x`, split by rows over the engine's [`Team`] when the matrix is
/// large enough.
fn gemv(dst: &mut [f32], w: &[f32], x: &[f32], accumulate: bool) {
    let (out, inp) = (dst.len(), x.len());
    match Team::get() {
        Some(team) if out * inp >= TEAM_MACS => split_rows(team, dst, &|r, d| {
            gemv_rows(d, &w[r.start * inp..r.end * inp], x, accumulate)
        }),
        _ => gemv_rows(dst, w, x, accumulate),
    }
}

/// `dst (t, out) (+)= x (t, inp) W^T` for `W` row-major `(out, inp)`: one row through [`gemv`],
/// more through `gemm`.
fn matmul_bt(
    dst: &mut [f32],
    x: &[f32],
    w: &[f32],
    (t, out, inp): (usize, usize, usize),
    accumulate: bool,
) {
    if t == 1 && out > 0 {
        assert!(
            dst.len() >= out && x.len() >= inp && w.len() == out * inp,
            "engine: matrix product of mismatched buffers"
        );
        gemv(&mut dst[..out], w, &x[..inp], accumulate);
        return;
    }
    gemm_bt(dst, out, x, w, (t, out, inp), accumulate);
}

/// `dst (t, cols) (+)= x (t, inp) W^T` through `gemm`, `W` row-major `(cols, inp)` and `dst`'s
/// rows `ldd` apart (a column block of a wider matrix).
fn gemm_bt(
    dst: &mut [f32],
    ldd: usize,
    x: &[f32],
    w: &[f32],
    (t, out, inp): (usize, usize, usize),
    accumulate: bool,
) {
    if t == 0 || out == 0 {
        return;
    }
    assert!(
        ldd >= out
            && dst.len() >= (t - 1) * ldd + out
            && x.len() >= t * inp
            && w.len() >= out * inp,
        "engine: matrix product of mismatched buffers"
    );
    let par = if t * out * inp >= PARALLEL_MACS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices hold at least the addressed elements (asserted above), `dst` does not
    // alias `x` or `w` (distinct borrows), and nothing else touches `dst` meanwhile.
    unsafe {
        gemm::gemm(
            t,
            out,
            inp,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            x.as_ptr(),
            1,
            inp as isize,
            w.as_ptr(),
            inp as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `dst (t, out) = x (t, inp) W^T (+ b)`, or `dst += ...` when `accumulate`; int8 layers run
/// one row through [`gemv_i8`] and more as `gemm` over [`DEQ_ROWS`] dequantised rows at a time
/// (in `deq`).
fn linear(dst: &mut [f32], x: &[f32], l: &Lin, t: usize, accumulate: bool, deq: &mut [f32]) {
    let (out, inp) = (l.out, l.inp);
    match &l.q8 {
        None => matmul_bt(dst, x, &l.w, (t, out, inp), accumulate),
        Some(q8) if t == 1 => gemv_i8(&mut dst[..out], q8, &x[..inp], accumulate),
        Some(_) => {
            assert!(
                deq.len() >= DEQ_ROWS * inp,
                "engine: int8 product without a dequantisation buffer"
            );
            for o0 in (0..out).step_by(DEQ_ROWS) {
                let rows = DEQ_ROWS.min(out - o0);
                for (i, buf) in deq.chunks_exact_mut(inp).take(rows).enumerate() {
                    l.row_into(o0 + i, buf);
                }
                gemm_bt(&mut dst[o0..], out, x, deq, (t, rows, inp), accumulate);
            }
        }
    }
    if let Some(b) = &l.b {
        for row in dst[..t * l.out].chunks_exact_mut(l.out) {
            for (y, &bb) in row.iter_mut().zip(b) {
                *y += bb;
            }
        }
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// TimestepNorm of `t` rows of `x` into `out`, advancing `st` one step per row.
fn timestep_norm(
    out: &mut [f32],
    x: &[f32],
    st: &mut NormStats,
    w: &[f32],
    b: &[f32],
    (t, m, g): (usize, usize, usize),
    eps: f32,
) {
    let gs = m / g;
    for r in 0..t {
        let n0 = st.count as f64;
        let n1 = n0 + 1.0;
        st.count += 1;
        let xr = &x[r * m..(r + 1) * m];
        let or = &mut out[r * m..(r + 1) * m];
        for gi in 0..g {
            let seg = &xr[gi * gs..(gi + 1) * gs];
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            for &v in seg {
                s1 += v as f64;
                s2 += (v as f64) * (v as f64);
            }
            let mu = s1 / gs as f64;
            let m2 = s2 / gs as f64;
            let (mean0, var0) = (st.mean[gi], st.var[gi]);
            let mean = (n0 * mean0 + mu) / n1;
            let var = (n0 * (var0 + mean0 * mean0) + m2) / n1 - mean * mean;
            st.mean[gi] = mean;
            st.var[gi] = var;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            for j in gi * gs..(gi + 1) * gs {
                or[j] = (((xr[j] as f64 - mean) * rstd) as f32) * w[j] + b[j];
            }
        }
    }
}

/// Normalises each `width` slice of `x` in place by its root mean square (times `w` if given).
fn rms_rows(x: &mut [f32], width: usize, w: Option<&[f32]>, eps: f32) {
    for row in x.chunks_exact_mut(width) {
        let ms = row.iter().map(|&v| v * v).sum::<f32>() / width as f32;
        let r = 1.0 / (ms + eps).sqrt();
        match w {
            Some(w) => row.iter_mut().zip(w).for_each(|(v, &ww)| *v = *v * r * ww),
            None => row.iter_mut().for_each(|v| *v *= r),
        }
    }
}

/// Interleaved RoPE of one `dz` head vector at within-chunk position `pos`.
fn rope(v: &mut [f32], pos: usize, freqs: &[f32]) {
    for (j, &f) in freqs.iter().enumerate() {
        let ang = (pos as f32 * f) as f64;
        let (s, c) = ang.sin_cos();
        let (s, c) = (s as f32, c as f32);
        let (a, b) = (v[2 * j], v[2 * j + 1]);
        v[2 * j] = a * c - b * s;
        v[2 * j + 1] = b * c + a * s;
    }
}

/// One head's view of the current chunk's cache: keys `(C, z)` at column `kz`, values `(C, vd)`
/// at column `kv`.
struct Head<'a> {
    k: &'a [f32],
    v: &'a [f32],
    z: usize,
    vd: usize,
    kz: usize,
    kv: usize,
}

simd_dispatch! {
    /// Softmax attention of one query over cache rows `0..scores.len()` into `out` (dv values);
    /// `decode`: the block is one row (the value sum may use the team, see below).
    fn attend(q: &[f32], hd: &Head, scores: &mut [f32], out: &mut [f32], decode: bool)
        => attend_generic
}

#[inline(always)]
fn attend_generic(q: &[f32], hd: &Head, scores: &mut [f32], out: &mut [f32], decode: bool) {
    let dz = q.len();
    let dv = out.len();
    let mut mx = f32::NEG_INFINITY;
    for (j, sj) in scores.iter_mut().enumerate() {
        let kj = &hd.k[j * hd.z + hd.kz..j * hd.z + hd.kz + dz];
        *sj = dot_lanes(q, kj);
        mx = mx.max(*sj);
    }
    let mut sum = 0.0f32;
    for sj in scores.iter_mut() {
        *sj = (*sj - mx).exp();
        sum += *sj;
    }
    let inv = 1.0 / sum;
    for sj in scores.iter_mut() {
        *sj *= inv;
    }
    // the weighted sum of values, split over the value columns: in decode over the team; in
    // prefill (where rayon runs the products, and a spinning team would compete with it) over
    // rayon when large
    let scores = &*scores;
    let macs = scores.len() * dv;
    let threads = rayon::current_num_threads();
    match Team::get() {
        Some(team) if decode && macs >= TEAM_MACS && dv >= 64 => {
            split_rows(team, out, &|r, o| weighted_values(scores, hd, r.start, o))
        }
        _ if !decode && macs >= PARALLEL_MACS && threads > 1 && dv >= 64 => {
            use rayon::prelude::*;
            let cols = dv.div_ceil(threads).next_multiple_of(16);
            out.par_chunks_mut(cols)
                .enumerate()
                .for_each(|(i, o)| weighted_values(scores, hd, i * cols, o));
        }
        _ => weighted_values(scores, hd, 0, out),
    }
}

simd_dispatch! {
    /// `out = sum_j p_j v_j[c0..c0 + out.len()]` over the cache rows.
    fn weighted_values(p: &[f32], hd: &Head, c0: usize, out: &mut [f32]) => weighted_values_generic
}

#[inline(always)]
fn weighted_values_generic(p: &[f32], hd: &Head, c0: usize, out: &mut [f32]) {
    out.fill(0.0);
    let n = out.len();
    for (j, &pj) in p.iter().enumerate() {
        let base = j * hd.vd + hd.kv + c0;
        let vj = &hd.v[base..base + n];
        for (o, &vv) in out.iter_mut().zip(vj) {
            *o = pj.mul_add(vv, *o);
        }
    }
}

/// One block of tokens (at most `state.block`) through the model. Returns `(r0, rows)`: the
/// logits of block rows `r0..r0 + rows` are in `state.scratch.logits`, one row of `vocab` each.
/// Does not advance `state.position` (the caller does).
pub(crate) fn forward_block(
    e: &Engine,
    state: &mut EngineState,
    tokens: &[usize],
    want: Want,
) -> (usize, usize) {
    let d = &e.dims;
    let t = tokens.len();
    debug_assert!(t >= 1 && t <= state.block);
    let (m, z, vd, h, n, g, c) = (d.m, d.z, d.v, d.h, d.n, d.g, d.chunk);
    let (dz, dv) = (z / h, vd / h);
    let eps = d.eps;
    let s = &mut state.scratch;
    for (r, &tok) in tokens.iter().enumerate() {
        let row = &mut s.x[r * m..(r + 1) * m];
        e.embed.row_into(tok, row);
        row.iter_mut().for_each(|v| *v *= e.emb_scale);
    }
    for (lw, lc) in e.layers.iter().zip(state.layers.iter_mut()) {
        // TimestepNorm -> xn
        timestep_norm(
            &mut s.xn,
            &s.x,
            &mut lc.norm,
            &lw.tn_w,
            &lw.tn_b,
            (t, m, g),
            eps,
        );
        // CEMA -> mx (then RMSNorm in place)
        for r in 0..t {
            for ch in 0..m {
                let u = s.xn[r * m + ch];
                let mut acc = 0.0f32;
                for k in ch * n..(ch + 1) * n {
                    let (hr, hi) = (lc.h_re[k], lc.h_im[k]);
                    let nr = lw.p[k] * u + lw.q_re[k] * hr - lw.q_im[k] * hi;
                    let ni = lw.q_im[k] * hr + lw.q_re[k] * hi;
                    lc.h_re[k] = nr;
                    lc.h_im[k] = ni;
                    acc += lw.eta_re[k] * nr - lw.eta_im[k] * ni;
                }
                s.mx[r * m + ch] = acc + lw.omega[ch] * u;
            }
        }
        rms_rows(&mut s.mx[..t * m], m, Some(&lw.rms_w), eps);
        // shared Z -> Q, K
        linear(&mut s.zq, &s.mx, &lw.wz, t, false, &mut s.deq);
        rms_rows(&mut s.zq[..t * z], dz, None, eps);
        for r in 0..t {
            for j in 0..z {
                let zn = s.zq[r * z + j];
                s.q[r * z + j] = zn * lw.q_scale[j] + lw.q_off[j];
                s.k[r * z + j] = zn * lw.k_scale[j] + lw.k_off[j];
            }
        }
        // values from the TimestepNorm output, gate from MX
        linear(&mut s.vv, &s.xn, &lw.wv, t, false, &mut s.deq);
        s.vv[..t * vd].iter_mut().for_each(|v| *v = silu(*v));
        linear(&mut s.r, &s.mx, &lw.wr, t, false, &mut s.deq);
        s.r[..t * vd].iter_mut().for_each(|v| *v = silu(*v));
        // chunk attention with RoPE restarting at every chunk
        for r in 0..t {
            let pos = ((state.position + r as u64) % c as u64) as usize;
            for hd in 0..h {
                let hz = hd * dz;
                rope(&mut s.q[r * z + hz..r * z + hz + dz], pos, &e.freqs);
                rope(&mut s.k[r * z + hz..r * z + hz + dz], pos, &e.freqs);
            }
            lc.k[pos * z..(pos + 1) * z].copy_from_slice(&s.k[r * z..(r + 1) * z]);
            lc.v[pos * vd..(pos + 1) * vd].copy_from_slice(&s.vv[r * vd..(r + 1) * vd]);
            for hd in 0..h {
                let q = &s.q[r * z + hd * dz..r * z + (hd + 1) * dz];
                let out = &mut s.att[r * vd + hd * dv..r * vd + (hd + 1) * dv];
                let head = Head {
                    k: &lc.k,
                    v: &lc.v,
                    z,
                    vd,
                    kz: hd * dz,
                    kv: hd * dv,
                };
                attend(q, &head, &mut s.scores[..=pos], out, t == 1);
            }
        }
        // Y = X + MX Wh1^T + bh1 + (A * R) Wh2^T
        s.y[..t * m].copy_from_slice(&s.x[..t * m]);
        linear(&mut s.y, &s.mx, &lw.wh1, t, true, &mut s.deq);
        for (a, &rr) in s.att[..t * vd].iter_mut().zip(&s.r[..t * vd]) {
            *a *= rr;
        }
        linear(&mut s.y, &s.att, &lw.wh2, t, true, &mut s.deq);
        // normalized FFN; residual from the layer input X
        for r in 0..t {
            let yr = &s.y[r * m..(r + 1) * m];
            let mean = yr.iter().sum::<f32>() / m as f32;
            let var = yr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / m as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            let out = &mut s.yn[r * m..(r + 1) * m];
            for (j, o) in out.iter_mut().enumerate() {
                *o = (yr[j] - mean) * rstd * lw.ln_w[j] + lw.ln_b[j];
            }
        }
        let f = lw.fc1.out;
        linear(&mut s.u, &s.yn, &lw.fc1, t, false, &mut s.deq);
        s.u[..t * f].iter_mut().for_each(|v| *v = silu(*v));
        if let Some(fc3) = &lw.fc3 {
            linear(&mut s.u3, &s.yn, fc3, t, false, &mut s.deq);
            for (a, &b) in s.u[..t * f].iter_mut().zip(&s.u3[..t * f]) {
                *a *= b;
            }
        }
        // FFN output into xn (free now), then x += alpha * o
        linear(&mut s.xn, &s.u, &lw.fc2, t, false, &mut s.deq);
        for r in 0..t {
            for j in 0..m {
                let o = s.xn[r * m + j];
                s.x[r * m + j] += match &lw.alpha {
                    Some(a) => a[j] * o,
                    None => o,
                };
            }
        }
    }
    // final TimestepNorm and the head
    timestep_norm(
        &mut s.xn,
        &s.x,
        &mut state.final_norm,
        &e.final_w,
        &e.final_b,
        (t, m, g),
        eps,
    );
    let (r0, rows) = match want {
        Want::All => (0, t),
        Want::Last => (t - 1, 1),
        Want::None => return (0, 0),
    };
    let head = e.head.as_ref().unwrap_or(&e.embed);
    let x = &s.xn[r0 * m..(r0 + rows) * m];
    linear(&mut s.logits, x, head, rows, false, &mut s.deq);
    (r0, rows)
}

/// The matrix-vector products of one decoded token and nothing else (every linear layer of every
/// layer and the head, on the state's scratch rows): the bound `bench_stream` compares with.
pub(crate) fn matvecs_only(e: &Engine, state: &mut EngineState) {
    let s = &mut state.scratch;
    for lw in &e.layers {
        linear(&mut s.zq, &s.mx, &lw.wz, 1, false, &mut s.deq);
        linear(&mut s.vv, &s.xn, &lw.wv, 1, false, &mut s.deq);
        linear(&mut s.r, &s.mx, &lw.wr, 1, false, &mut s.deq);
        linear(&mut s.y, &s.mx, &lw.wh1, 1, true, &mut s.deq);
        linear(&mut s.y, &s.att, &lw.wh2, 1, true, &mut s.deq);
        linear(&mut s.u, &s.yn, &lw.fc1, 1, false, &mut s.deq);
        if let Some(fc3) = &lw.fc3 {
            linear(&mut s.u3, &s.yn, fc3, 1, false, &mut s.deq);
        }
        linear(&mut s.xn, &s.u, &lw.fc2, 1, false, &mut s.deq);
    }
    let head = e.head.as_ref().unwrap_or(&e.embed);
    linear(&mut s.logits, &s.xn, head, 1, false, &mut s.deq);
}
