//! Helpers shared by the integration tests: parameter randomisation and finite differences.
#![allow(dead_code)]

use dfdx::prelude::*;
use megalodon::core::{ParamVisitor, Params};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// Sets every parameter to N(0, 0.3^2) noise (zero-initialised norms, biases, gamma/beta too).
pub struct Randomize(pub rand::rngs::StdRng);
impl ParamVisitor<f64, Cpu> for Randomize {
    fn visit<S: Shape>(&mut self, _: &str, t: &mut Tensor<S, f64, Cpu>) -> anyhow::Result<()> {
        let v: Vec<f64> = (0..t.shape().num_elements())
            .map(|_| self.0.gen_range(-0.5..0.5))
            .collect();
        t.copy_from(&v);
        Ok(())
    }
}

/// Adds `h` to entry `idx` of parameter `name`.
pub struct Nudge<'a> {
    pub name: &'a str,
    pub idx: usize,
    pub h: f64,
}
impl ParamVisitor<f64, Cpu> for Nudge<'_> {
    fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, f64, Cpu>) -> anyhow::Result<()> {
        if name == self.name {
            let mut v = t.as_vec();
            v[self.idx] += self.h;
            t.copy_from(&v);
        }
        Ok(())
    }
}

pub struct Grab<'a>(pub &'a Gradients<f64, Cpu>, pub BTreeMap<String, Vec<f64>>);
impl ParamVisitor<f64, Cpu> for Grab<'_> {
    fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, f64, Cpu>) -> anyhow::Result<()> {
        self.1.insert(name.to_string(), self.0.get(&*t).as_vec());
        Ok(())
    }
}

/// Checks `per_tensor` entries of every parameter (the one with the largest gradient, then
/// random ones) against central differences with step `h`; the error relative to the tensor's
/// largest gradient must stay below `tol` (NaN fails). Returns the worst relative error.
pub fn fd_all<M: Params<f64, Cpu>>(
    model: &mut M,
    grads: &BTreeMap<String, Vec<f64>>,
    per_tensor: usize,
    tol: f64,
    mut loss: impl FnMut(&mut M) -> f64,
) -> f64 {
    let h = 1e-5;
    let mut worst: f64 = 0.0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (name, g) in grads {
        let scale = g.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
        let top = (0..g.len()).fold(0, |a, j| if g[j].abs() > g[a].abs() { j } else { a });
        for k in 0..per_tensor {
            let i = if k == 0 {
                top
            } else {
                rng.gen_range(0..g.len())
            };
            model
                .visit_params("", &mut Nudge { name, idx: i, h })
                .unwrap();
            let lp = loss(model);
            model
                .visit_params(
                    "",
                    &mut Nudge {
                        name,
                        idx: i,
                        h: -2.0 * h,
                    },
                )
                .unwrap();
            let lm = loss(model);
            model
                .visit_params("", &mut Nudge { name, idx: i, h })
                .unwrap();
            let fd = (lp - lm) / (2.0 * h);
            let err = (fd - g[i]).abs() / scale;
            assert!(
                err < tol,
                "{name}[{i}]: analytic {} vs finite difference {fd} (rel {err:.2e})",
                g[i]
            );
            worst = worst.max(err);
        }
    }
    worst
}

/// Largest absolute difference; NaN on either side counts as infinitely far.
pub use megalodon::core::golden::max_abs_diff as max_diff;
