//! CEMA scan for `Cpu`: a custom dfdx op with a hand-written backward (`docs/design.md` §4).
//!
//! Same contract as [`MultiHeadComplexEma::try_forward`] / [`MultiHeadComplexEma::try_forward_anticausal`]
//! (the composed reference), computed by the plain recurrence
//! `h_t = p u_t + q h_(t-1)`, `y_t = Re(sum_k eta_k h_(t,k)) + omega u_t`
//! per (batch, channel), in parallel over (batch, block of `DB` channels) on scoped threads.
//!
//! * The coefficients `p, q, eta` are derived on the host in f64 from the (tiny, M x N)
//!   parameter tensors and cast to `E`; the scan runs in `E`.
//! * Forward keeps the state `h` only at checkpoints every `SEG` steps (when taping), so the
//!   memory kept for backward is a copy of `u` plus `B M N 2 T / SEG` values.
//! * Backward runs the adjoint recurrence `lambda_t = conj(eta) gy_t + conj(q) lambda_(t+1)`
//!   in reverse time, recomputing `h` within each checkpoint segment, accumulates the gradients
//!   of `p, q, eta, omega` per (batch, channel) (flushed to f64 every segment) and maps them to
//!   `alpha, delta, theta, gamma` with the chain rule on the host.
//! * Tapes: the tapes of `u` and `h0` are merged onto `y`, which carries the single backward op.
//!   The returned state has an empty tape; y's backward op reads the state's gradient through its
//!   ghost. Ops that consume the state are registered later and so run earlier in backward, so the
//!   state's gradient is complete when y's op runs (as with the composed reference, the loss
//!   must include `y` for any gradient to flow). All gradients are accumulated (`+=`).
//! * The anti-causal variant runs the same recurrence backward in time, without state.

use crate::ops::cema::{CemaState, MultiHeadComplexEma};
use crate::util::Seq;
use crate::util::{c, Float};
use anyhow::{ensure, Result};
use dfdx::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Channels per task (the inner loops run over `DB x N` independent recurrences).
const DB: usize = 8;
/// Checkpoint interval in steps.
const SEG: usize = 64;
/// Below this many `B T M N` scan steps the op runs on the calling thread.
const PAR_MIN_WORK: usize = 1 << 16;

/// The float dtypes of the CPU op: gives host access to `Cpu` gradient buffers (whose
/// concrete type dfdx keeps private).
pub trait CpuFloat: Float
where
    Cpu: Device<Self>,
{
    fn host(v: &mut <Cpu as Storage<Self>>::Vec) -> &mut Vec<Self>;
}
impl CpuFloat for f32 {
    fn host(v: &mut <Cpu as Storage<f32>>::Vec) -> &mut Vec<f32> {
        v
    }
}
impl CpuFloat for f64 {
    fn host(v: &mut <Cpu as Storage<f64>>::Vec) -> &mut Vec<f64> {
        v
    }
}

/// Causal CEMA on the CPU; same contract as [`crate::device::MegaDevice::cema`].
#[allow(clippy::type_complexity)]
pub fn cema<const M: usize, const N: usize, E: CpuFloat, T: Tape<E, Cpu>>(
    ema: &MultiHeadComplexEma<M, N, E, Cpu>,
    u: Seq<M, E, Cpu, T>,
    h0: Option<CemaState<M, N, E, Cpu, T>>,
    want_state: bool,
) -> Result<(Seq<M, E, Cpu, T>, Option<CemaState<M, N, E, Cpu, T>>)>
where
    Cpu: Device<E>,
{
    scan_op(ema, u, h0, want_state, false)
}

/// Anti-causal CEMA on the CPU; same contract as [`crate::device::MegaDevice::cema_anticausal`].
pub fn cema_anticausal<const M: usize, const N: usize, E: CpuFloat, T: Tape<E, Cpu>>(
    ema: &MultiHeadComplexEma<M, N, E, Cpu>,
    u: Seq<M, E, Cpu, T>,
) -> Result<Seq<M, E, Cpu, T>>
where
    Cpu: Device<E>,
{
    Ok(scan_op(ema, u, None, false, true)?.0)
}

/// Host-side coefficients in f64 (for the chain rule) and cast to `E` (for the scan).
struct Coefs<E> {
    /// (M N) sigmoid(alpha), sigmoid(delta), |q|, arg q
    a: Vec<f64>,
    sd: Vec<f64>,
    r: Vec<f64>,
    ang: Vec<f64>,
    /// (M) sigmoid(theta)
    sth: Vec<f64>,
    /// (M N) p, Re q, Im q, Re eta, Im eta in E
    p: Vec<E>,
    qr: Vec<E>,
    qi: Vec<E>,
    er: Vec<E>,
    ei: Vec<E>,
    /// (M) omega in E
    om: Vec<E>,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn f64s<S: Shape, E: Float, T>(t: &Tensor<S, E, Cpu, T>) -> Vec<f64>
where
    Cpu: Device<E>,
{
    t.as_vec()
        .into_iter()
        .map(|x| x.to_f64().unwrap_or(f64::NAN))
        .collect()
}

impl<E: Float> Coefs<E> {
    fn new<const M: usize, const N: usize>(ema: &MultiHeadComplexEma<M, N, E, Cpu>) -> Self
    where
        Cpu: Device<E>,
    {
        let alpha = f64s(&ema.alpha);
        let delta = f64s(&ema.delta);
        let theta = f64s(&ema.theta);
        let gamma = f64s(&ema.gamma);
        let omega = f64s(&ema.omega);
        let a: Vec<f64> = alpha.iter().map(|&x| sigmoid(x)).collect();
        let sd: Vec<f64> = delta.iter().map(|&x| sigmoid(x)).collect();
        let r: Vec<f64> = a.iter().zip(&sd).map(|(a, s)| 1.0 - a * s).collect();
        let sth: Vec<f64> = theta.iter().map(|&x| sigmoid(x)).collect();
        let base = 2.0 * std::f64::consts::PI / N as f64;
        let ang: Vec<f64> = (0..M * N)
            .map(|i| ((i % N) + 1) as f64 * sth[i / N] * base)
            .collect();
        let s = 1.0 / (N as f64).sqrt();
        let e = |v: &mut dyn Iterator<Item = f64>| v.map(c::<E>).collect::<Vec<E>>();
        Self {
            p: e(&mut a.iter().copied()),
            qr: e(&mut r.iter().zip(&ang).map(|(r, a)| r * a.cos())),
            qi: e(&mut r.iter().zip(&ang).map(|(r, a)| r * a.sin())),
            er: e(&mut (0..M * N).map(|i| gamma[2 * i] * s)),
            ei: e(&mut (0..M * N).map(|i| gamma[2 * i + 1] * s)),
            om: e(&mut omega.iter().copied()),
            a,
            sd,
            r,
            ang,
            sth,
        }
    }
}

/// Problem geometry. Channels come in `nblk` blocks of `DB`; global block `g` is batch
/// `g / nblk`, channels `DB (g % nblk) ..`. Task `i` is batch `i / groups` and a contiguous group
/// of its blocks, which it scans segment by segment (all blocks of a segment read the same rows
/// of `u`, which stay in cache).
#[derive(Clone, Copy)]
struct ScanDims {
    b: usize,
    t: usize,
    m: usize,
    nblk: usize,
    groups: usize,
    rev: bool,
}

impl ScanDims {
    fn tasks(&self) -> usize {
        self.b * self.groups
    }
    /// (batch, first global block, end global block) of task `i`.
    fn group(&self, i: usize) -> (usize, usize, usize) {
        let (bi, gi) = (i / self.groups, i % self.groups);
        let lo = gi * self.nblk / self.groups;
        let hi = (gi + 1) * self.nblk / self.groups;
        (bi, bi * self.nblk + lo, bi * self.nblk + hi)
    }
    /// (batch, first channel, channel count) of global block `g`.
    fn block(&self, g: usize) -> (usize, usize, usize) {
        let bi = g / self.nblk;
        let d0 = (g % self.nblk) * DB;
        (bi, d0, DB.min(self.m - d0))
    }
    /// Time index of scan step `i`.
    #[inline(always)]
    fn time(&self, i: usize) -> usize {
        if self.rev {
            self.t - 1 - i
        } else {
            i
        }
    }
    fn nseg(&self) -> usize {
        self.t.div_ceil(SEG)
    }
}

/// A raw pointer shared by tasks that touch disjoint elements.
#[derive(Clone, Copy)]
struct SyncPtr<E>(*mut E);
unsafe impl<E> Send for SyncPtr<E> {}
unsafe impl<E> Sync for SyncPtr<E> {}

/// Worker threads: `RAYON_NUM_THREADS` (as for dfdx's matmuls) or the available parallelism.
fn num_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |x| x.get()))
    })
}

/// Runs `f(0..n)` on up to [`num_threads`] scoped threads; results in task order.
fn par_map<R: Send>(n: usize, parallel: bool, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let threads = if parallel { num_threads().min(n) } else { 1 };
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        let work = || {
            let mut v = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break v;
                }
                v.push((i, f(i)));
            }
        };
        let handles: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        for (i, r) in work() {
            out[i] = Some(r);
        }
        for h in handles {
            for (i, r) in h.join().expect("CEMA worker panicked") {
                out[i] = Some(r);
            }
        }
    });
    out.into_iter()
        .map(|r| r.expect("every task ran"))
        .collect()
}

/// A (k, channel) tile: the inner loops run over the `DB` channels of a task (contiguous in
/// `u`/`y`), so they vectorize without horizontal sums.
type Tile<E, const N: usize> = [[E; DB]; N];

/// Per-task coefficients as tiles (zero for channels past the end of `M`).
struct Local<E, const N: usize> {
    p: Tile<E, N>,
    qr: Tile<E, N>,
    qi: Tile<E, N>,
    er: Tile<E, N>,
    ei: Tile<E, N>,
    om: [E; DB],
}

impl<E: Float, const N: usize> Local<E, N> {
    fn new(co: &Coefs<E>, d0: usize, nb: usize) -> Self {
        let z = [[E::zero(); DB]; N];
        let mut l = Self {
            p: z,
            qr: z,
            qi: z,
            er: z,
            ei: z,
            om: [E::zero(); DB],
        };
        for dd in 0..nb {
            for k in 0..N {
                let o = (d0 + dd) * N + k;
                l.p[k][dd] = co.p[o];
                l.qr[k][dd] = co.qr[o];
                l.qi[k][dd] = co.qi[o];
                l.er[k][dd] = co.er[o];
                l.ei[k][dd] = co.ei[o];
            }
            l.om[dd] = co.om[d0 + dd];
        }
        l
    }
}

/// `DB` values from `v[o..o + nb]` (zero-padded).
#[inline(always)]
fn load<E: Float>(v: &[E], o: usize, nb: usize) -> [E; DB] {
    let mut x = [E::zero(); DB];
    if nb == DB {
        x.copy_from_slice(&v[o..o + DB]);
    } else {
        x[..nb].copy_from_slice(&v[o..o + nb]);
    }
    x
}

/// Reads a (B, M, N) state block of a task into a tile.
fn read_state<E: Float, const N: usize>(
    v: &[E],
    m: usize,
    bi: usize,
    d0: usize,
    nb: usize,
) -> Tile<E, N> {
    let mut x = [[E::zero(); DB]; N];
    for dd in 0..nb {
        for (k, row) in x.iter_mut().enumerate() {
            row[dd] = v[(bi * m + d0 + dd) * N + k];
        }
    }
    x
}

/// One step of the recurrence `h = p x + q h` for a tile.
#[inline(always)]
fn step<E: Float, const N: usize>(
    l: &Local<E, N>,
    x: &[E; DB],
    pr: &Tile<E, N>,
    pi: &Tile<E, N>,
    hr: &mut Tile<E, N>,
    hi: &mut Tile<E, N>,
) {
    for k in 0..N {
        for dd in 0..DB {
            let (a, b) = (pr[k][dd], pi[k][dd]);
            hr[k][dd] = l.p[k][dd] * x[dd] + l.qr[k][dd] * a - l.qi[k][dd] * b;
            hi[k][dd] = l.qr[k][dd] * b + l.qi[k][dd] * a;
        }
    }
}

/// What the forward of one task keeps: final state and checkpoints (one tile pair per segment).
struct FwdTask<E, const N: usize> {
    hr: Tile<E, N>,
    hi: Tile<E, N>,
    ck_r: Vec<Tile<E, N>>,
    ck_i: Vec<Tile<E, N>>,
}

/// Forward scan of the blocks of one task; writes `y`; keeps checkpoints when `save`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fwd_task<E: Float, const N: usize>(
    co: &Coefs<E>,
    dm: &ScanDims,
    task: usize,
    u: &[E],
    h0: Option<(&[E], &[E])>,
    y: SyncPtr<E>,
    save: bool,
) -> Vec<FwdTask<E, N>> {
    let (_, glo, ghi) = dm.group(task);
    let (t, m) = (dm.t, dm.m);
    let nseg = dm.nseg();
    let cap = if save { nseg } else { 0 };
    let mut blocks: Vec<(Local<E, N>, FwdTask<E, N>)> = (glo..ghi)
        .map(|g| {
            let (bi, d0, nb) = dm.block(g);
            let (hr, hi) = match h0 {
                Some((r, i)) => (
                    read_state::<E, N>(r, m, bi, d0, nb),
                    read_state::<E, N>(i, m, bi, d0, nb),
                ),
                None => ([[E::zero(); DB]; N], [[E::zero(); DB]; N]),
            };
            let f = FwdTask {
                hr,
                hi,
                ck_r: Vec::with_capacity(cap),
                ck_i: Vec::with_capacity(cap),
            };
            (Local::<E, N>::new(co, d0, nb), f)
        })
        .collect();
    for s in 0..nseg {
        for (g, (l, f)) in (glo..ghi).zip(blocks.iter_mut()) {
            let (bi, d0, nb) = dm.block(g);
            let l: &Local<E, N> = l;
            // local copies (lets the compiler vectorize without aliasing doubts)
            let (mut hr, mut hi) = (f.hr, f.hi);
            if save {
                f.ck_r.push(hr);
                f.ck_i.push(hi);
            }
            for i in s * SEG..t.min((s + 1) * SEG) {
                let row = (bi * t + dm.time(i)) * m + d0;
                let x = load(u, row, nb);
                let mut acc = [E::zero(); DB];
                for k in 0..N {
                    for dd in 0..DB {
                        let (a, b) = (hr[k][dd], hi[k][dd]);
                        let nr = l.p[k][dd] * x[dd] + l.qr[k][dd] * a - l.qi[k][dd] * b;
                        let ni = l.qr[k][dd] * b + l.qi[k][dd] * a;
                        hr[k][dd] = nr;
                        hi[k][dd] = ni;
                        acc[dd] += l.er[k][dd] * nr - l.ei[k][dd] * ni;
                    }
                }
                for dd in 0..nb {
                    // SAFETY: each task writes only its own (batch, channel) elements.
                    unsafe { *y.0.add(row + dd) = acc[dd] + l.om[dd] * x[dd] };
                }
            }
            (f.hr, f.hi) = (hr, hi);
        }
    }
    blocks.into_iter().map(|(_, f)| f).collect()
}

/// Gradients of one task: coefficient grads (nb N, index dd N + k) in f64, omega (nb),
/// d h0 (nb N).
struct BwdTask {
    dp: Vec<f64>,
    dqr: Vec<f64>,
    dqi: Vec<f64>,
    der: Vec<f64>,
    dei: Vec<f64>,
    dom: Vec<f64>,
    dh0r: Vec<f64>,
    dh0i: Vec<f64>,
}

/// Backward state of one block: coefficients, adjoint (re, im), gradients.
type BwdBlock<E, const N: usize> = (Local<E, N>, Tile<E, N>, Tile<E, N>, BwdTask);

/// Backward of the blocks of one task (`fwd`: their forward records): adds into `gu`, returns
/// the coefficient and h0 gradients per block.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bwd_task<E: Float, const N: usize>(
    co: &Coefs<E>,
    dm: &ScanDims,
    task: usize,
    u: &[E],
    gy: &[E],
    gh: Option<(&[E], &[E])>,
    fwd: &[FwdTask<E, N>],
    gu: SyncPtr<E>,
) -> Vec<BwdTask> {
    let (_, glo, ghi) = dm.group(task);
    let (t, m) = (dm.t, dm.m);
    let z = [[E::zero(); DB]; N];
    let f = |x: E| x.to_f64().unwrap_or(f64::NAN);
    // per block: coefficients, adjoint of the state after the current step
    // (complex: dL/dh_re + i dL/dh_im), gradients
    let mut blocks: Vec<BwdBlock<E, N>> = (glo..ghi)
        .map(|g| {
            let (bi, d0, nb) = dm.block(g);
            let (ar, ai) = match gh {
                Some((r, i)) => (
                    read_state::<E, N>(r, m, bi, d0, nb),
                    read_state::<E, N>(i, m, bi, d0, nb),
                ),
                None => (z, z),
            };
            let out = BwdTask {
                dp: vec![0.0; nb * N],
                dqr: vec![0.0; nb * N],
                dqi: vec![0.0; nb * N],
                der: vec![0.0; nb * N],
                dei: vec![0.0; nb * N],
                dom: vec![0.0; nb],
                dh0r: vec![0.0; nb * N],
                dh0i: vec![0.0; nb * N],
            };
            (Local::<E, N>::new(co, d0, nb), ar, ai, out)
        })
        .collect();
    // states of one segment: buf[j] = state before step i0 + j, j = 0..=len
    #[allow(clippy::useless_vec)] // up to 130 KB: keep it off the (worker thread) stack
    let mut buf_r = vec![z; SEG + 1];
    #[allow(clippy::useless_vec)]
    let mut buf_i = vec![z; SEG + 1];
    for s in (0..dm.nseg()).rev() {
        let i0 = s * SEG;
        let len = SEG.min(t - i0);
        for (g, (l, ar_b, ai_b, out)) in (glo..ghi).zip(blocks.iter_mut()) {
            let (bi, d0, nb) = dm.block(g);
            // work on local copies (lets the compiler vectorize without aliasing doubts)
            let l: &Local<E, N> = l;
            let (mut ar, mut ai) = (*ar_b, *ai_b);
            let fw = &fwd[g - glo];
            buf_r[0] = fw.ck_r[s];
            buf_i[0] = fw.ck_i[s];
            for j in 0..len {
                let row = (bi * t + dm.time(i0 + j)) * m + d0;
                let x = load(u, row, nb);
                let (br0, br1) = buf_r.split_at_mut(j + 1);
                let (bi0, bi1) = buf_i.split_at_mut(j + 1);
                step(l, &x, &br0[j], &bi0[j], &mut br1[0], &mut bi1[0]);
            }
            // segment-local accumulators in E, flushed to f64
            let (mut dp, mut dqr, mut dqi, mut der, mut dei) = (z, z, z, z, z);
            let mut dom = [E::zero(); DB];
            for j in (0..len).rev() {
                let row = (bi * t + dm.time(i0 + j)) * m + d0;
                let x = load(u, row, nb);
                let g = load(gy, row, nb);
                let (hr, hi) = (&buf_r[j + 1], &buf_i[j + 1]);
                let (pr, pi) = (&buf_r[j], &buf_i[j]);
                let mut du = [E::zero(); DB];
                for dd in 0..DB {
                    dom[dd] += g[dd] * x[dd];
                    du[dd] = l.om[dd] * g[dd];
                }
                for k in 0..N {
                    for dd in 0..DB {
                        let gd = g[dd];
                        der[k][dd] += gd * hr[k][dd];
                        dei[k][dd] -= gd * hi[k][dd];
                        let lr = l.er[k][dd] * gd + ar[k][dd];
                        let li = ai[k][dd] - l.ei[k][dd] * gd;
                        du[dd] += l.p[k][dd] * lr;
                        dp[k][dd] += x[dd] * lr;
                        dqr[k][dd] += lr * pr[k][dd] + li * pi[k][dd];
                        dqi[k][dd] += li * pr[k][dd] - lr * pi[k][dd];
                        ar[k][dd] = l.qr[k][dd] * lr + l.qi[k][dd] * li;
                        ai[k][dd] = l.qr[k][dd] * li - l.qi[k][dd] * lr;
                    }
                }
                for (dd, v) in du.iter().enumerate().take(nb) {
                    // SAFETY: each task touches only its own (batch, channel) elements.
                    unsafe {
                        let p = gu.0.add(row + dd);
                        *p += *v;
                    }
                }
            }
            (*ar_b, *ai_b) = (ar, ai);
            for dd in 0..nb {
                out.dom[dd] += f(dom[dd]);
                for k in 0..N {
                    let o = dd * N + k;
                    out.dp[o] += f(dp[k][dd]);
                    out.dqr[o] += f(dqr[k][dd]);
                    out.dqi[o] += f(dqi[k][dd]);
                    out.der[o] += f(der[k][dd]);
                    out.dei[o] += f(dei[k][dd]);
                }
            }
        }
    }
    blocks
        .into_iter()
        .zip(glo..ghi)
        .map(|((_, ar, ai, mut out), g)| {
            let nb = dm.block(g).2;
            for dd in 0..nb {
                for k in 0..N {
                    out.dh0r[dd * N + k] = f(ar[k][dd]);
                    out.dh0i[dd * N + k] = f(ai[k][dd]);
                }
            }
            out
        })
        .collect()
}

/// Whether the AVX2 builds of the kernels can run here (checked once).
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| std::is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`fwd_task`] compiled for AVX2 (8 f32 lanes: one tile row per vector).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn fwd_task_avx2<E: Float, const N: usize>(
    co: &Coefs<E>,
    dm: &ScanDims,
    task: usize,
    u: &[E],
    h0: Option<(&[E], &[E])>,
    y: SyncPtr<E>,
    save: bool,
) -> Vec<FwdTask<E, N>> {
    fwd_task(co, dm, task, u, h0, y, save)
}

/// [`bwd_task`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn bwd_task_avx2<E: Float, const N: usize>(
    co: &Coefs<E>,
    dm: &ScanDims,
    task: usize,
    u: &[E],
    gy: &[E],
    gh: Option<(&[E], &[E])>,
    fwd: &[FwdTask<E, N>],
    gu: SyncPtr<E>,
) -> Vec<BwdTask> {
    bwd_task(co, dm, task, u, gy, gh, fwd, gu)
}

/// Forward of one task with the best kernel build for this CPU.
#[allow(clippy::too_many_arguments)]
fn fwd_dispatch<E: Float, const N: usize>(
    co: &Coefs<E>,
    dm: &ScanDims,
    task: usize,
    u: &[E],
    h0: Option<(&[E], &[E])>,
    y: SyncPtr<E>,
    save: bool,
) -> Vec<FwdTask<E, N>> {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { fwd_task_avx2(co, dm, task, u, h0, y, save) };
    }
    fwd_task(co, dm, task, u, h0, y, save)
}

/// Backward of one task with the best kernel build for this CPU.
#[allow(clippy::too_many_arguments)]
fn bwd_dispatch<E: Float, const N: usize>(
    co: &Coefs<E>,
    dm: &ScanDims,
    task: usize,
    u: &[E],
    gy: &[E],
    gh: Option<(&[E], &[E])>,
    fwd: &[FwdTask<E, N>],
    gu: SyncPtr<E>,
) -> Vec<BwdTask> {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { bwd_task_avx2(co, dm, task, u, gy, gh, fwd, gu) };
    }
    bwd_task(co, dm, task, u, gy, gh, fwd, gu)
}

type StateT<const M: usize, const N: usize, E> = Tensor<(usize, Const<M>, Const<N>), E, Cpu>;

#[allow(clippy::type_complexity)]
fn scan_op<const M: usize, const N: usize, E: CpuFloat, T: Tape<E, Cpu>>(
    ema: &MultiHeadComplexEma<M, N, E, Cpu>,
    u: Seq<M, E, Cpu, T>,
    h0: Option<CemaState<M, N, E, Cpu, T>>,
    want_state: bool,
    rev: bool,
) -> Result<(Seq<M, E, Cpu, T>, Option<CemaState<M, N, E, Cpu, T>>)>
where
    Cpu: Device<E>,
{
    let (b, t, _) = *u.shape();
    ensure!(
        t >= 1 && b >= 1,
        "CEMA: input u has shape {:?}; need B >= 1 and T >= 1",
        u.shape()
    );
    if let Some(h) = &h0 {
        ensure!(
            h.re.shape().0 == b && h.im.shape().0 == b,
            "CEMA: h0 has batch {} / {} but u has batch {b}",
            h.re.shape().0,
            h.im.shape().0
        );
    }
    let dev = u.device().clone();
    let parallel = b * t * M * N >= PAR_MIN_WORK;
    let dm = ScanDims {
        b,
        t,
        m: M,
        nblk: M.div_ceil(DB),
        groups: if parallel {
            num_threads().div_ceil(b).clamp(1, M.div_ceil(DB))
        } else {
            1
        },
        rev,
    };
    let co = Coefs::<E>::new(ema);

    let (u, mut tape) = u.contiguous().split_tape();
    let uv = super::host::values(&u);
    let h0 = match h0 {
        Some(h) => {
            let (hr, tr) = h.re.contiguous().split_tape();
            let (hi, ti) = h.im.contiguous().split_tape();
            tape = tape.merge(tr).merge(ti);
            Some((hr, hi))
        }
        None => None,
    };
    let h0v = h0.as_ref().map(|(r, i)| (r.as_vec(), i.as_vec()));

    let save = T::OWNS_TAPE;
    let mut yv = super::host::out_buf_with(&dev, b * t * M, "CEMA", E::host)?;
    let yp = SyncPtr(yv.as_mut_ptr());
    let fwd = {
        let (co, uv) = (&co, &uv);
        let h0s = h0v.as_ref().map(|(r, i)| (&r[..], &i[..]));
        par_map(dm.tasks(), parallel, move |i| {
            fwd_dispatch::<E, N>(co, &dm, i, uv, h0s, yp, save)
        })
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
    };
    let y = super::host::output(&dev, yv, (b, t, Const::<M>), "CEMA")?;

    let state: Option<Result<(StateT<M, N, E>, StateT<M, N, E>)>> = want_state.then(|| {
        let mut sr = super::host::out_buf_with(&dev, b * M * N, "CEMA state", E::host)?;
        let mut si = super::host::out_buf_with(&dev, b * M * N, "CEMA state", E::host)?;
        for (i, f) in fwd.iter().enumerate() {
            let (bi, d0, nb) = dm.block(i);
            for dd in 0..nb {
                for k in 0..N {
                    let o = (bi * M + d0 + dd) * N + k;
                    sr[o] = f.hr[k][dd];
                    si[o] = f.hi[k][dd];
                }
            }
        }
        Ok::<_, anyhow::Error>((
            super::host::output(&dev, sr, (b, Const, Const), "CEMA state")?,
            super::host::output(&dev, si, (b, Const, Const), "CEMA state")?,
        ))
    });
    let state = state.transpose()?;

    if T::OWNS_TAPE {
        let yg = y.ghost();
        let ug = u.ghost();
        let h0g = h0.as_ref().map(|(r, i)| (r.ghost(), i.ghost()));
        let sg = state.as_ref().map(|(r, i)| (r.ghost(), i.ghost()));
        let pg = (
            ema.alpha.ghost(),
            ema.delta.ghost(),
            ema.theta.ghost(),
            ema.gamma.ghost(),
            ema.omega.ghost(),
        );
        tape.add_backward_op(move |grads| {
            // y's gradient is complete; take its buffer by value (released below).
            let gy = std::mem::take(E::host(grads.get_or_alloc_mut(&yg)?));
            let gh = match &sg {
                Some((r, i)) => Some((
                    E::host(grads.get_or_alloc_mut(r)?).clone(),
                    E::host(grads.get_or_alloc_mut(i)?).clone(),
                )),
                None => None,
            };
            let gu = grads.get_or_alloc_mut(&ug)?;
            let gup = SyncPtr(E::host(gu).as_mut_ptr());
            let res = {
                let (co, uv, gy, fwd) = (&co, &uv, &gy, &fwd);
                let ghs = gh.as_ref().map(|(r, i)| (&r[..], &i[..]));
                par_map(dm.tasks(), parallel, move |i| {
                    let (_, glo, ghi) = dm.group(i);
                    bwd_dispatch::<E, N>(co, &dm, i, uv, gy, ghs, &fwd[glo..ghi], gup)
                })
            };
            // nothing reads y's gradient again: back to dfdx's cache for the gradients below
            super::host::give_to_dfdx(&dev, gy);

            // coefficient gradients summed over the batch, then the chain rule (f64)
            let mn = M * N;
            let mut dp = vec![0.0; mn];
            let mut dqr = vec![0.0; mn];
            let mut dqi = vec![0.0; mn];
            let mut der = vec![0.0; mn];
            let mut dei = vec![0.0; mn];
            let mut dom = vec![0.0; M];
            let mut dh0r = vec![0.0; b * mn];
            let mut dh0i = vec![0.0; b * mn];
            for (i, r) in res.iter().flatten().enumerate() {
                let (bi, d0, nb) = dm.block(i);
                for dd in 0..nb {
                    dom[d0 + dd] += r.dom[dd];
                    for k in 0..N {
                        let (o, lo) = ((d0 + dd) * N + k, dd * N + k);
                        dp[o] += r.dp[lo];
                        dqr[o] += r.dqr[lo];
                        dqi[o] += r.dqi[lo];
                        der[o] += r.der[lo];
                        dei[o] += r.dei[lo];
                        dh0r[bi * mn + o] = r.dh0r[lo];
                        dh0i[bi * mn + o] = r.dh0i[lo];
                    }
                }
            }
            let mut g_alpha = vec![0.0; mn];
            let mut g_delta = vec![0.0; mn];
            let mut g_theta = vec![0.0; M];
            let mut g_gamma = vec![0.0; 2 * mn];
            let tscale = 2.0 * std::f64::consts::PI / N as f64;
            let es = 1.0 / (N as f64).sqrt();
            for o in 0..mn {
                let (a, sd, r, ang) = (co.a[o], co.sd[o], co.r[o], co.ang[o]);
                let (cs, sn) = (ang.cos(), ang.sin());
                let dr = dqr[o] * cs + dqi[o] * sn;
                let dang = r * (dqi[o] * cs - dqr[o] * sn);
                g_alpha[o] = (dp[o] - dr * sd) * a * (1.0 - a);
                g_delta[o] = -dr * a * sd * (1.0 - sd);
                let (d, k) = (o / N, o % N);
                let st = co.sth[d];
                g_theta[d] += dang * (k + 1) as f64 * tscale * st * (1.0 - st);
                g_gamma[2 * o] = der[o] * es;
                g_gamma[2 * o + 1] = dei[o] * es;
            }
            macro_rules! add {
                ($g:expr, $v:expr) => {
                    for (x, d) in E::host(grads.get_or_alloc_mut($g)?).iter_mut().zip($v) {
                        *x += c::<E>(*d);
                    }
                };
            }
            add!(&pg.0, &g_alpha);
            add!(&pg.1, &g_delta);
            add!(&pg.2, &g_theta);
            add!(&pg.3, &g_gamma);
            add!(&pg.4, &dom);
            if let Some((r, i)) = &h0g {
                add!(r, &dh0r);
                add!(i, &dh0i);
            }
            super::host::recycle(uv);
            Ok(())
        });
    } else {
        super::host::recycle(uv);
    }
    let y = y.put_tape(tape);
    let state = state.map(|(re, im)| CemaState {
        re: re.put_tape(T::default()),
        im: im.put_tape(T::default()),
    });
    Ok((y, state))
}
