//! Plumbing shared by the fused CPU kernels (`norms_cpu`, `gates_cpu`): host copies of dfdx
//! tensors, their gradient buffers, and row-parallel loops on rayon.
//!
//! A fused op reads its inputs once into host vectors (a `memcpy` of a contiguous tensor), runs
//! its forward kernel, wraps the output vector as a tensor without copying, and records one
//! backward op that reads the output's gradient and *adds* into the inputs' gradients (they may
//! have other consumers) in place, in the buffers dfdx owns.

use crate::util::Float;
use anyhow::{anyhow, Result};
use dfdx::prelude::*;
use rayon::prelude::*;
use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Most bytes the scratch pool keeps between uses. A step gives back, by the end of its
/// backward pass, the host copies it kept for backward (at 16K tokens with `Small` more than
/// 1 GiB); a smaller cap dropped some of them every step, and each was a fresh `mmap` again in the
/// next step (125K page faults a step at 16K with a 1 GiB cap, 6K with this one). What the pool
/// holds was in use a moment earlier, so it does not raise the peak; [`release_pool`] empties it.
const POOL_BYTES: usize = 4 << 30;
/// Smaller buffers are left to the allocator, whose free lists serve them without page faults.
const POOL_MIN_BYTES: usize = 256 << 10;

/// Host buffers the kernels are done with (their inputs' host copies, kept for backward), kept for
/// the next request of the same length: a fresh allocation of megabytes is a fresh `mmap` whose
/// pages fault in one by one (and are unmapped again on free), which cost ~12% of a step at 16K
/// tokens. Exact lengths only, so that a training step, which asks for the same lengths every
/// step, takes back what the previous step gave; at most [`POOL_BYTES`], the least recently
/// given back dropped first, so lengths nobody asks for again cannot pile up.
struct Pool {
    bufs: VecDeque<(usize, Box<dyn Any + Send>)>,
    bytes: usize,
}

impl Pool {
    const fn new() -> Self {
        Pool {
            bufs: VecDeque::new(),
            bytes: 0,
        }
    }

    /// A pooled vector of exactly `n` elements (stale contents), if the pool has one.
    fn take<E: Float + Send>(&mut self, n: usize) -> Option<Vec<E>> {
        let i = self.bufs.iter().rposition(|(_, b)| {
            b.downcast_ref::<Vec<E>>()
                .is_some_and(|v| v.capacity() == n && v.len() == n)
        })?;
        let (bytes, b) = self.bufs.remove(i)?;
        self.bytes -= bytes;
        b.downcast::<Vec<E>>().ok().map(|v| *v)
    }

    /// Keeps `v` (small ones, and ones larger than `budget`, are dropped), dropping the least
    /// recently given back buffers while the pool would hold more than `budget` bytes.
    fn give<E: Float + Send>(&mut self, mut v: Vec<E>, budget: usize) {
        let bytes = v.capacity() * std::mem::size_of::<E>();
        if !(POOL_MIN_BYTES..=budget).contains(&bytes) {
            return;
        }
        // every element stays initialised: a later `scratch_any` may hand them out as they are
        v.resize(v.capacity(), E::zero());
        while self.bytes + bytes > budget {
            match self.bufs.pop_front() {
                Some((b, _)) => self.bytes -= b,
                None => break,
            }
        }
        self.bytes += bytes;
        self.bufs.push_back((bytes, Box::new(v)));
    }
}

static POOL: Mutex<Pool> = Mutex::new(Pool::new());

fn take_pooled<E: Float + Send>(n: usize) -> Option<Vec<E>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).take(n)
}

/// A zero-filled host buffer of `n` elements, from the pool when it has one of that length.
pub(crate) fn scratch<E: Float + Send>(n: usize) -> Vec<E> {
    match take_pooled(n) {
        Some(mut v) => {
            v.fill(E::zero());
            v
        }
        None => vec![E::zero(); n],
    }
}

/// A host buffer of `n` elements whose contents are unspecified (stale values of an earlier
/// use): for a caller that overwrites every element.
pub(crate) fn scratch_any<E: Float + Send>(n: usize) -> Vec<E> {
    take_pooled(n).unwrap_or_else(|| vec![E::zero(); n])
}

/// Drops every buffer the scratch pool holds (the training loop calls it when training ends).
pub(crate) fn release_pool() {
    let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
    p.bufs.clear();
    p.bytes = 0;
}

/// Gives a buffer back to the pool (small ones, and ones larger than the pool, are dropped).
pub(crate) fn recycle<E: Float + Send>(v: Vec<E>) {
    POOL.lock()
        .unwrap_or_else(|e| e.into_inner())
        .give(v, POOL_BYTES);
}

/// An output buffer of a fused kernel: storage allocated by dfdx (from its allocation cache when
/// that is on), zero-filled, which [`output`] adopts as a tensor without copying.
///
/// Allocating the output where dfdx would keeps its cache balanced: a tensor's storage goes to
/// that cache when dropped, so adopting buffers allocated anywhere else would pile them up
/// there, step after step.
pub(crate) struct OutBuf<E>(Vec<E>);

// Slices, not vectors: a kernel writes the elements but cannot change the length or capacity
// dfdx allocated (its cache files storage by size).
impl<E> std::ops::Deref for OutBuf<E> {
    type Target = [E];
    fn deref(&self) -> &[E] {
        &self.0
    }
}

impl<E> std::ops::DerefMut for OutBuf<E> {
    fn deref_mut(&mut self) -> &mut [E] {
        &mut self.0
    }
}

/// A zeroed [`OutBuf`] of `n` elements.
pub(crate) fn out_buf<E: Float>(dev: &Cpu, n: usize, what: &str) -> Result<OutBuf<E>>
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    out_buf_with(dev, n, what, |s| &mut **s)
}

/// [`out_buf`] where the storage's vector is reached through `host`.
pub(crate) fn out_buf_with<E: Float>(
    dev: &Cpu,
    n: usize,
    what: &str,
    host: impl FnOnce(&mut <Cpu as Storage<E>>::Vec) -> &mut Vec<E>,
) -> Result<OutBuf<E>>
where
    Cpu: Device<E>,
{
    let mut storage = <Cpu as Storage<E>>::try_alloc_len(dev, n)
        .map_err(|e| anyhow!("{what}: allocating {n} output elements failed: {e:?}"))?;
    let v = std::mem::take(host(&mut storage));
    // Dropping the now empty storage would file it in dfdx's cache as a zero-length allocation
    // (one more entry per call); forgetting it only leaves its handle on the cache counted, so
    // that cache is never freed: a device's cached buffers outlive it unless it is emptied
    // (`Cache::empty_cache`, which `fit` does when it ends) before it is dropped.
    std::mem::forget(storage);
    Ok(OutBuf(v))
}

/// Elements per rayon task in the row loops (below this, one thread does the whole call).
pub(crate) const GRAIN: usize = 16 * 1024;

/// Splits `x` off its tape and copies its values to the host; returns the values, the tensor
/// with no tape (whose `ghost()` names its gradient buffer) and the tape. A permuted or broadcast
/// view is made contiguous first (dfdx records that copy's backward on the tape it returns).
#[allow(clippy::type_complexity)]
pub(crate) fn input<S: Shape, E: Float, T: Tape<E, Cpu>>(
    x: Tensor<S, E, Cpu, T>,
    what: &str,
) -> Result<(Vec<E>, Tensor<S, E, Cpu>, T)>
where
    Cpu: Device<E>,
{
    let x = contiguous(x, what)?;
    let data = values(&x);
    let (x, tape) = x.split_tape();
    Ok((data, x, tape))
}

/// `x` with its elements in logical row-major order: a permuted or broadcast view is copied
/// (dfdx records that copy's backward on the tape), a contiguous tensor passes as it is.
pub(crate) fn contiguous<S: Shape, E: Float, T: Tape<E, Cpu>>(
    x: Tensor<S, E, Cpu, T>,
    what: &str,
) -> Result<Tensor<S, E, Cpu, T>>
where
    Cpu: Device<E>,
{
    x.try_contiguous()
        .map_err(|e| anyhow!("{what}: contiguous copy failed: {e:?}"))
}

/// The values of a contiguous tensor (from [`contiguous`]) on the host, by `memcpy`: a
/// contiguous tensor's storage holds exactly its elements, in logical order.
pub(crate) fn values<S: Shape, E: Float + Send, T>(x: &Tensor<S, E, Cpu, T>) -> Vec<E>
where
    Cpu: Device<E>,
{
    let mut data = scratch_any(x.shape().num_elements());
    x.copy_into(&mut data);
    data
}

/// A parameter's values on the host (a `memcpy`; `as_vec` walks the strides element by element).
pub(crate) fn param<S: Shape, E: Float + Send>(p: &Tensor<S, E, Cpu>, what: &str) -> Result<Vec<E>>
where
    Cpu: Device<E>,
{
    Ok(values(&contiguous(p.clone(), what)?))
}

/// A tensor of `shape` adopting `data` (no copy).
pub(crate) fn output<S: Shape, E: Float>(
    dev: &Cpu,
    data: OutBuf<E>,
    shape: S,
    what: &str,
) -> Result<Tensor<S, E, Cpu>>
where
    Cpu: Device<E>,
{
    let n = data.len();
    dev.try_tensor_from_vec(data.0, shape)
        .map_err(|e| anyhow!("{what}: {n} output elements for shape {shape:?}: {e:?}"))
}

/// Inside a backward op: moves the gradient buffer of a ghost out of the gradient store
/// (allocated as zeros if it has none yet) as `(buffer, owned)`. If the entry was already taken
/// (the same tensor is two inputs of one op), a zeroed scratch buffer stands in (`owned` false)
/// and [`restore_grad!`] adds it to the real one: restore buffers in the order they were
/// taken, so that the real buffer is back before a scratch one is added to it. (A macro because dfdx does not export the
/// ghost's type.)
macro_rules! take_grad {
    ($grads:expr, $ghost:expr, $n:expr) => {{
        let b = std::mem::take(&mut **$grads.get_or_alloc_mut(&$ghost)?);
        if b.len() == $n {
            (b, true)
        } else {
            assert!(
                b.is_empty(),
                "fused op: gradient buffer of the wrong length"
            );
            ($crate::ops::host::scratch($n), false)
        }
    }};
}

/// Puts a buffer taken by [`take_grad!`] back (or adds a scratch buffer into the real one).
macro_rules! restore_grad {
    ($grads:expr, $ghost:expr, $taken:expr) => {{
        let (buf, owned) = $taken;
        let slot = &mut **$grads.get_or_alloc_mut(&$ghost)?;
        if owned {
            *slot = buf;
        } else {
            $crate::ops::host::add_into(slot, &buf);
            $crate::ops::host::recycle(buf);
        }
    }};
}

/// Inside a backward op: done with the gradient of the op's *output* (taken by [`take_grad!`]).
/// Nothing reads it again (every consumer of the output ran its backward before this op), so the
/// buffer goes back to dfdx's allocation cache at once instead of living until backward ends,
/// and the gradients of the layers below reuse it.
macro_rules! release_grad {
    ($dev:expr, $taken:expr) => {{
        let (buf, owned) = $taken;
        if owned {
            $crate::ops::host::give_to_dfdx(&$dev, buf);
        } else {
            $crate::ops::host::recycle(buf);
        }
    }};
}
pub(crate) use {release_grad, restore_grad, take_grad};

/// Drops `v` as dfdx storage: into dfdx's allocation cache when that is on (so a later dfdx
/// allocation of the same length reuses it), else back to the allocator.
pub(crate) fn give_to_dfdx<E: Float>(dev: &Cpu, v: Vec<E>)
where
    Cpu: Device<E>,
{
    let n = v.len();
    released(std::mem::size_of::<E>()).fetch_add(1, Ordering::Relaxed);
    // adopting a vector allocates nothing; it fails only on a length/shape mismatch, impossible
    // for the shape (n,)
    drop(dev.try_tensor_from_vec(v, (n,)));
}

/// Gradient buffers released by [`give_to_dfdx`] since the last [`drain_released`], per element
/// size (f32, f64).
static RELEASED: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

fn released(elem_bytes: usize) -> &'static AtomicUsize {
    &RELEASED[usize::from(elem_bytes > 4)]
}

/// A released gradient leaves an empty vector in its gradient slot, which dfdx files in its
/// allocation cache under length 0 when the gradients are dropped (with the cache on); nothing
/// ever asks for length 0, so they would pile up, one pointer each, step after step. This takes
/// out as many as were released (asking for one when there is none allocates nothing).
#[cfg_attr(feature = "composed-ops", allow(dead_code))]
pub(crate) fn drain_released<E: Float>(dev: &Cpu)
where
    Cpu: Device<E>,
{
    let k = released(std::mem::size_of::<E>()).swap(0, Ordering::Relaxed);
    for _ in 0..k {
        match <Cpu as Storage<E>>::try_alloc_len(dev, 0) {
            // the handle would file the (empty) vector under length 0 again when dropped
            Ok(v) => std::mem::forget(v),
            Err(_) => break,
        }
    }
}

/// Runs `f(first_row, rows_out)` over the rows of `out` (row length `width`) in parallel tasks
/// of about [`GRAIN`] elements.
pub(crate) fn par_rows<E: Send>(
    out: &mut [E],
    width: usize,
    f: impl Fn(usize, &mut [E]) + Sync + Send,
) {
    let rows = (GRAIN / width.max(1)).max(1);
    out.par_chunks_mut(rows * width)
        .enumerate()
        .for_each(|(i, chunk)| f(i * rows, chunk));
}

/// Like [`par_rows`], but each task also returns a partial sum (`init()`-shaped, e.g. a weight
/// gradient) that is added up over the tasks.
pub(crate) fn par_rows_sum<E: Send, A: Send>(
    out: &mut [E],
    width: usize,
    init: impl Fn() -> A + Sync + Send,
    f: impl Fn(usize, &mut [E], &mut A) + Sync + Send,
    add: impl Fn(&mut A, A) + Sync + Send,
) -> A {
    let rows = (GRAIN / width.max(1)).max(1);
    out.par_chunks_mut(rows * width)
        .enumerate()
        .fold(&init, |mut acc, (i, chunk)| {
            f(i * rows, chunk, &mut acc);
            acc
        })
        .reduce(&init, |mut a, b| {
            add(&mut a, b);
            a
        })
}

/// Adds `src` into `dst` element by element.
pub(crate) fn add_into<E: Float>(dst: &mut [E], src: &[E]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// `dst (m x n) (+)= lhs (m x k) * rhs (k x n)`; every matrix is given as pointer, row stride,
/// column stride (in elements).
///
/// # Safety
/// Every addressed element must lie inside its allocation, `dst` must not alias `lhs`/`rhs`
/// and nobody else may access `dst` during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm<E: Float>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut E, usize, usize),
    accumulate: bool,
    lhs: (*const E, usize, usize),
    rhs: (*const E, usize, usize),
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.0.add(i * dst.1 + j * dst.2) = E::zero();
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        E::one(),
        E::one(),
        false,
        false,
        false,
        par,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    #[test]
    fn pool_hands_back_exact_lengths_only() {
        let mut p = Pool::new();
        let n = MB / 4; // 1 MiB of f32
        p.give(vec![7.0f32; n], 64 * MB);
        assert!(
            p.take::<f32>(n + 1).is_none(),
            "a longer request took a shorter buffer"
        );
        assert!(
            p.take::<f32>(n - 1).is_none(),
            "a shorter request took a longer buffer"
        );
        assert!(
            p.take::<f64>(n).is_none(),
            "a buffer changed its element type"
        );
        let v = p.take::<f32>(n).expect("the buffer given back");
        assert_eq!(v.len(), n);
        assert_eq!(p.bytes, 0);
        assert!(p.bufs.is_empty());
    }

    #[test]
    fn pool_stays_within_its_budget_dropping_the_oldest() {
        let mut p = Pool::new();
        let budget = 8 * MB;
        for i in 0..20usize {
            p.give(vec![i as f32; MB / 4 * (1 + i % 3)], budget);
            assert!(p.bytes <= budget, "{} bytes held, budget {budget}", p.bytes);
            let held: usize = p.bufs.iter().map(|(b, _)| b).sum();
            assert_eq!(held, p.bytes);
        }
        // the newest buffer is still there, the first ones are gone
        let newest = p.take::<f32>(MB / 4 * (1 + 19 % 3)).expect("newest kept");
        assert!(newest.iter().all(|&x| x == 19.0));
        let mut kept = Vec::new();
        for k in 1..=3 {
            while let Some(v) = p.take::<f32>(MB / 4 * k) {
                kept.push(v[0] as usize);
            }
        }
        assert!(
            !kept.is_empty() && kept.iter().all(|&i| i >= 10),
            "kept buffers {kept:?}: the oldest should have gone first"
        );
        // small and oversized buffers are not kept
        let before = p.bytes;
        p.give(vec![0f32; 16], budget);
        p.give(vec![0f32; budget], budget);
        assert_eq!(p.bytes, before);
    }
}
