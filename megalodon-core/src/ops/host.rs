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
use std::sync::Mutex;

/// Most bytes the scratch pool keeps between uses.
const POOL_BYTES: usize = 1 << 30;

/// Host buffers the kernels are done with, kept for the next call of the same size: a fresh
/// allocation of tens of MB is a fresh `mmap` whose pages fault in one by one (and are unmapped
/// again on free), which made the kernels' cost per token grow with the sequence length. Holds
/// at most [`POOL_BYTES`]; a buffer is reused for a request of at least half its capacity.
static POOL: Mutex<Vec<(usize, Box<dyn Any + Send>)>> = Mutex::new(Vec::new());

/// A zero-filled host buffer of `n` elements, from the pool when it has one that fits.
pub(crate) fn scratch<E: Float + Send>(n: usize) -> Vec<E> {
    let found = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let hit = pool.iter().position(|(_, b)| {
            b.downcast_ref::<Vec<E>>()
                .is_some_and(|v| v.capacity() >= n && v.capacity() / 2 <= n)
        });
        hit.map(|i| pool.swap_remove(i).1)
    };
    match found.and_then(|b| b.downcast::<Vec<E>>().ok()) {
        Some(mut v) => {
            v.clear();
            v.resize(n, E::zero());
            *v
        }
        None => vec![E::zero(); n],
    }
}

/// Gives a buffer back to the pool (dropped instead when the pool is full).
pub(crate) fn recycle<E: Float + Send>(v: Vec<E>) {
    let bytes = v.capacity() * std::mem::size_of::<E>();
    if bytes == 0 {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let held: usize = pool.iter().map(|(b, _)| b).sum();
    if held + bytes <= POOL_BYTES {
        pool.push((bytes, Box::new(v)));
    }
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
    let x = x
        .try_contiguous()
        .map_err(|e| anyhow!("{what}: contiguous copy failed: {e:?}"))?;
    let mut data = scratch(x.shape().num_elements());
    // a contiguous tensor's storage holds exactly its elements, in logical order
    x.copy_into(&mut data);
    let (x, tape) = x.split_tape();
    Ok((data, x, tape))
}

/// The values of a contiguous tensor (fresh from `try_contiguous`) on the host, by `memcpy`.
pub(crate) fn values<S: Shape, E: Float + Send, T>(x: &Tensor<S, E, Cpu, T>) -> Vec<E>
where
    Cpu: Device<E>,
{
    let mut data = scratch(x.shape().num_elements());
    x.copy_into(&mut data);
    data
}

/// A parameter's values on the host (a `memcpy`; `as_vec` walks the strides element by element).
pub(crate) fn param<S: Shape, E: Float + Send>(p: &Tensor<S, E, Cpu>, what: &str) -> Result<Vec<E>>
where
    Cpu: Device<E>,
{
    let p = p
        .clone()
        .try_contiguous()
        .map_err(|e| anyhow!("{what}: contiguous copy failed: {e:?}"))?;
    let mut data = scratch(p.shape().num_elements());
    p.copy_into(&mut data);
    Ok(data)
}

/// A tensor of `shape` holding `data`. The tensor's storage is allocated by dfdx and the data
/// copied in, rather than the vector being adopted: with dfdx's allocation cache on, every
/// tensor's storage goes to that cache when dropped, and adopted vectors would pile up there
/// (the cache only hands buffers back to dfdx's own allocations).
pub(crate) fn output<S: Shape, E: Float>(
    dev: &Cpu,
    data: Vec<E>,
    shape: S,
    what: &str,
) -> Result<Tensor<S, E, Cpu>>
where
    Cpu: Device<E>,
{
    let mut t = dev
        .try_zeros_like(&shape)
        .map_err(|e| anyhow!("{what}: output allocation failed: {e:?}"))?;
    t.copy_from(&data);
    recycle(data);
    Ok(t)
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
            (vec![num_traits::Zero::zero(); $n], false)
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
        }
    }};
}
pub(crate) use {restore_grad, take_grad};

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
