//! Activation recomputation (gradient checkpointing) of one Megalodon layer
//! (`docs/training.md`, "Memory"): the forward pass runs the layer without a tape, so none of
//! its intermediates outlive it, and keeps only the layer's input; the layer's backward op runs
//! the forward again with a tape of its own, back-propagates the output gradient through it,
//! and adds the input's and the parameters' gradients to the outer ones. Peak memory is then
//! every layer's input plus one layer's intermediates and their gradients, instead of every
//! layer's; the cost is one more forward pass of each layer.
//!
//! The gradients are those of the plain path up to float summation order (tested in
//! `tests/recompute.rs`). The inner pass accumulates straight into the outer buffers: before it
//! runs, the outer gradient buffers of the input and of every parameter are swapped into the
//! inner gradients (the backward kernels add to what is there), and swapped back afterwards, so
//! this is device-generic and copies nothing.

use super::block::MegaBlock;
use super::layers::Seq;
use crate::device::MegaDevice;
use crate::params::{ParamVisitor, Params};
use crate::util::Float;
use anyhow::Result;
use dfdx::prelude::*;

/// Swaps each visited parameter's gradient buffer between two gradient stores.
struct Swap<'a, E: Dtype, D: Device<E>> {
    outer: &'a mut Gradients<E, D>,
    inner: &'a mut Gradients<E, D>,
}

impl<E: Dtype, D: Device<E>> ParamVisitor<E, D> for Swap<'_, E, D> {
    fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> Result<()> {
        swap_grad(self.outer, self.inner, &*t)
            .map_err(|e| anyhow::anyhow!("gradient of {name}: {e:?}"))
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
    /// [`MegaBlock::forward`] without a streaming state, keeping only the input for backward
    /// and recomputing the layer there. Without a tape (inference) it is the plain forward.
    pub fn forward_recomputed<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        x: Seq<M, E, D, T>,
        chunk: usize,
    ) -> Result<Seq<M, E, D, T>> {
        if !T::OWNS_TAPE {
            return self.forward(x, chunk, None, None);
        }
        let (x0, mut tape) = x.split_tape();
        let y0 = self.forward(x0.clone(), chunk, None, None)?;
        let y_ghost = y0.ghost();
        let mut layer = self.clone();
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&y_ghost)?;
            let gy = grads.get(&y_ghost);
            let mut inner = Gradients::leaky();
            // the outer accumulations of x and of the parameters continue in the inner pass
            swap_grad(grads, &mut inner, &x0)?;
            layer
                .visit_params(
                    "",
                    &mut Swap {
                        outer: grads,
                        inner: &mut inner,
                    },
                )
                .unwrap_or_else(|e| panic!("recomputed layer: {e:#}"));
            let y = layer
                .forward(x0.clone().traced(inner), chunk, None, None)
                // the same forward on the same input succeeded a moment ago
                .unwrap_or_else(|e| panic!("recomputing a layer in backward: {e:#}"));
            let mut inner = (y * gy).try_sum()?.try_backward()?;
            swap_grad(grads, &mut inner, &x0)?;
            layer
                .visit_params(
                    "",
                    &mut Swap {
                        outer: grads,
                        inner: &mut inner,
                    },
                )
                .unwrap_or_else(|e| panic!("recomputed layer: {e:#}"));
            Ok(())
        });
        Ok(y0.put_tape(tape))
    }
}
