//! Activation recomputation (gradient checkpointing) of a Megalodon layer (`docs/design.md`
//! §12, "Memory"). The layer is checkpointed in two pieces, the attention unit and the normalized
//! FFN: each forward runs without a tape, so none of its intermediates outlive it, and keeps
//! only its inputs; the piece's backward op runs its forward again with a tape of its own,
//! back-propagates the output gradient through it, and leaves the inputs' and the parameters'
//! gradients in the outer gradients. Peak memory is then every piece's inputs plus the
//! intermediates (and their gradients) of the largest piece, instead of every layer's; the cost
//! is one more forward pass.
//!
//! The gradients equal the plain path's (tested in `tests/recompute.rs`). The inner pass
//! accumulates straight into the outer buffers: before it runs, the outer gradient buffers of the
//! inputs and of every parameter are swapped into the inner gradients (the backward kernels add
//! to what is there), and swapped back afterwards, so nothing is copied and it works on any
//! device.

use super::attention::MovingAverageGatedAttention;
use super::block::MegaBlock;
use super::layers::Seq;
use super::nffn::NormalizedFfn;
use crate::device::MegaDevice;
use crate::params::{ParamVisitor, Params};
use crate::util::Float;
use anyhow::Result;
use dfdx::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// Pieces recomputed in backward so far (process-wide; for tests and diagnostics).
pub static RECOMPUTED: AtomicU64 = AtomicU64::new(0);

/// Swaps each visited parameter's gradient buffer between two gradient stores; the first
/// device error (an allocation) is kept in `err`.
struct Swap<'a, E: Dtype, D: Device<E>> {
    outer: &'a mut Gradients<E, D>,
    inner: &'a mut Gradients<E, D>,
    err: Option<D::Err>,
}

impl<E: Dtype, D: Device<E>> ParamVisitor<E, D> for Swap<'_, E, D> {
    fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> Result<()> {
        swap_grad(self.outer, self.inner, &*t).map_err(|e| {
            let msg = anyhow::anyhow!("gradient of {name}: {e:?}");
            self.err = Some(e);
            msg
        })
    }
}

fn swap_grad<S: Shape, E: Dtype, D: Device<E>>(
    outer: &mut Gradients<E, D>,
    inner: &mut Gradients<E, D>,
    t: &Tensor<S, E, D>,
) -> std::result::Result<(), D::Err> {
    let a = outer.get_or_alloc_mut(t)?;
    let b = inner.get_or_alloc_mut(t)?;
    std::mem::swap(a, b);
    Ok(())
}

/// A piece of a layer that can be checkpointed: `K` inputs of width `M`, one output, the same
/// forward for any tape.
trait Piece<const M: usize, const K: usize, E: Dtype, D: Device<E>>:
    Params<E, D> + Clone + 'static
{
    fn run<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        xs: [Seq<M, E, D, T>; K],
        chunk: usize,
    ) -> Result<Seq<M, E, D, T>>;
}

impl<
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E> + 'static,
    > Piece<M, 1, E, D> for MovingAverageGatedAttention<M, Z, V, H, N, G, E, D>
{
    fn run<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        [x]: [Seq<M, E, D, T>; 1],
        chunk: usize,
    ) -> Result<Seq<M, E, D, T>> {
        self.forward(x, chunk, None, None)
    }
}

impl<const M: usize, const F: usize, E: Float, D: MegaDevice<E> + 'static> Piece<M, 2, E, D>
    for NormalizedFfn<M, F, E, D>
{
    /// `[y, x]`: the attention unit's output and the layer input (the second residual).
    fn run<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        [y, x]: [Seq<M, E, D, T>; 2],
        _: usize,
    ) -> Result<Seq<M, E, D, T>> {
        self.forward(y, x, &mut None)
    }
}

/// Swaps the gradient buffers of `xs` and of every parameter of `piece`.
fn swap_all<const M: usize, E: Dtype, D: Device<E>, P: Params<E, D>>(
    piece: &mut P,
    xs: &[Seq<M, E, D>],
    outer: &mut Gradients<E, D>,
    inner: &mut Gradients<E, D>,
) -> std::result::Result<(), D::Err> {
    for x in xs {
        swap_grad(outer, inner, x)?;
    }
    let mut v = Swap {
        outer,
        inner,
        err: None,
    };
    let res = piece.visit_params("", &mut v);
    match (v.err, res) {
        (Some(e), _) => Err(e),
        (None, Ok(())) => Ok(()),
        // the visitor fails only with a device error, kept above
        (None, Err(e)) => unreachable!("recomputed layer: {e:#}"),
    }
}

/// `piece.run(xs)` keeping only `xs` for backward, where the piece is run again.
fn checkpoint<const M: usize, const K: usize, E, D, P, T>(
    piece: &P,
    xs: [Seq<M, E, D, T>; K],
    chunk: usize,
) -> Result<Seq<M, E, D, T>>
where
    E: Float,
    D: MegaDevice<E> + 'static,
    P: Piece<M, K, E, D>,
    T: Tape<E, D> + Merge<NoneTape>,
{
    let mut tape = T::default();
    let xs: [Seq<M, E, D>; K] = xs.map(|x| {
        let (x, t) = x.split_tape();
        tape = std::mem::take(&mut tape).merge(t);
        x
    });
    let y = piece.run(xs.clone(), chunk)?;
    let y_ghost = y.ghost();
    let mut piece = piece.clone();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&y_ghost)?;
        let gy = grads.get(&y_ghost);
        let mut inner = Gradients::leaky();
        // the outer accumulations of the inputs and parameters continue in the inner pass
        swap_all(&mut piece, &xs, grads, &mut inner)?;
        // one inner tape: the first input carries the (swapped-in) gradients, the ops that
        // combine the inputs merge the others' empty tapes into it
        let mut inputs = Vec::with_capacity(K);
        let mut carrier = Some(inner);
        for x in xs.iter().cloned() {
            inputs.push(match carrier.take() {
                Some(g) => x.traced(g),
                None => x.retaped::<OwnedTape<E, D>>(),
            });
        }
        let inputs: [Seq<M, E, D, OwnedTape<E, D>>; K] = match inputs.try_into() {
            Ok(a) => a,
            Err(_) => unreachable!("K inputs in, K inputs out"),
        };
        let out = piece
            .run(inputs, chunk)
            // the same forward on the same inputs succeeded a moment ago
            .unwrap_or_else(|e| panic!("recomputing a layer in backward: {e:#}"));
        let mut inner = (out * gy).try_sum()?.try_backward()?;
        RECOMPUTED.fetch_add(1, Ordering::Relaxed);
        swap_all(&mut piece, &xs, grads, &mut inner)
    });
    Ok(y.put_tape(tape))
}

impl<
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E> + 'static,
    > MegaBlock<M, Z, V, H, F, N, G, E, D>
{
    /// [`MegaBlock::forward`] without a streaming state, keeping only the inputs of the
    /// attention unit and the FFN for backward and recomputing them there. Without a tape
    /// (inference) it is the plain forward.
    pub fn forward_recomputed<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        x: Seq<M, E, D, T>,
        chunk: usize,
    ) -> Result<Seq<M, E, D, T>> {
        if !T::OWNS_TAPE {
            return self.forward(x, chunk, None, None);
        }
        let y = checkpoint(&self.mega, [x.retaped::<T>()], chunk)?;
        checkpoint(&self.nffn, [y, x], chunk)
    }
}
