//! Where a training step's time goes, per op class (`bench_scaling --profile`,
//! `docs/design.md` §12): the model code brackets its ops with [`enter`] and [`leave`]; when
//! profiling is on, the forward time between them is added to the class, and two marker ops on
//! the tape bracket the same ops in backward (dfdx runs backward ops in reverse creation order,
//! so the op made by `leave` runs first and the one made by `enter` last). Regions nest; each
//! class gets its exclusive time (nested regions' time goes to theirs). Off (the default), a
//! region costs one atomic load.
//!
//! Measured on the calling thread: forward and backward run there (the kernels' worker threads
//! are inside the regions). Allocation has no region of its own: dfdx allocates inside its ops,
//! so that time is in the op that allocates.

use dfdx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The op classes a step's time is split into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// Linear layers (`x W^T + b`).
    MatMul,
    /// The CEMA scan.
    Cema,
    /// Softmax attention inside the chunks (the block-attention op).
    Attention,
    /// TimestepNorm, RMSNorm, LayerNorm.
    Norms,
    /// SiLU, gates, the Q/K affine, RoPE, residual adds.
    Elementwise,
    /// Permutes, reshapes, padding and concatenation around the chunk attention.
    Copies,
}

impl OpClass {
    /// Every class, in report order.
    pub const ALL: [OpClass; 6] = [
        OpClass::MatMul,
        OpClass::Cema,
        OpClass::Attention,
        OpClass::Norms,
        OpClass::Elementwise,
        OpClass::Copies,
    ];

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            OpClass::MatMul => "matrix products",
            OpClass::Cema => "CEMA",
            OpClass::Attention => "attention (in-chunk softmax)",
            OpClass::Norms => "norms",
            OpClass::Elementwise => "elementwise (SiLU, gates, affine, RoPE, residuals)",
            OpClass::Copies => "copies/transposes (around attention)",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Seconds per class, forward and backward.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub forward: [f64; 6],
    pub backward: [f64; 6],
}

struct Frame {
    class: OpClass,
    start: Instant,
    nested: f64,
}

#[derive(Default)]
struct State {
    fwd: Vec<Frame>,
    bwd: Vec<Frame>,
    report: Report,
}

static ON: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<State>> = Mutex::new(None);

fn with_state(f: impl FnOnce(&mut State)) {
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(State::default));
}

fn push(stack: &mut Vec<Frame>, class: OpClass) {
    stack.push(Frame {
        class,
        start: Instant::now(),
        nested: 0.0,
    });
}

/// Pops `class`'s frame (if it is on top) and returns its exclusive seconds.
fn pop(stack: &mut Vec<Frame>, class: OpClass) -> Option<f64> {
    if stack.last().map(|f| f.class) != Some(class) {
        return None;
    }
    let f = stack.pop()?;
    let total = f.start.elapsed().as_secs_f64();
    if let Some(parent) = stack.last_mut() {
        parent.nested += total;
    }
    Some((total - f.nested).max(0.0))
}

/// Turns profiling on (clearing what was recorded) or off (keeping it for [`report`]).
pub fn enable(on: bool) {
    if on {
        with_state(|s| *s = State::default());
    }
    ON.store(on, Ordering::SeqCst);
}

/// What was recorded since [`enable`].
pub fn report() -> Report {
    let mut r = Report::default();
    with_state(|s| r = s.report.clone());
    r
}

/// Opens a region of `class` at the tensor `x` that flows into it.
pub fn enter<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    class: OpClass,
    x: Tensor<S, E, D, T>,
) -> Tensor<S, E, D, T> {
    if !ON.load(Ordering::Relaxed) {
        return x;
    }
    with_state(|s| push(&mut s.fwd, class));
    let (x, mut tape) = x.split_tape();
    tape.add_backward_op(move |_| {
        with_state(|s| {
            if let Some(dt) = pop(&mut s.bwd, class) {
                s.report.backward[class.index()] += dt;
            }
        });
        Ok(())
    });
    x.put_tape(tape)
}

/// Closes the region of `class` at its output `y`.
pub fn leave<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    class: OpClass,
    y: Tensor<S, E, D, T>,
) -> Tensor<S, E, D, T> {
    if !ON.load(Ordering::Relaxed) {
        return y;
    }
    with_state(|s| {
        if let Some(dt) = pop(&mut s.fwd, class) {
            s.report.forward[class.index()] += dt;
        }
    });
    let (y, mut tape) = y.split_tape();
    tape.add_backward_op(move |_| {
        with_state(|s| push(&mut s.bwd, class));
        Ok(())
    });
    y.put_tape(tape)
}
