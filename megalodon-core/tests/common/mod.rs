//! Shared helpers for the CEMA test files.
#![allow(dead_code)]

use dfdx::prelude::*;
use megalodon_core::golden::Golden;
use megalodon_core::nn::cema::MultiHeadComplexEma;
use rand::{rngs::StdRng, Rng};

/// Flat CEMA parameter vectors (alpha, delta, theta, gamma, omega) in their tensor layouts.
#[derive(Clone)]
pub struct CemaParams {
    pub alpha: Vec<f64>,
    pub delta: Vec<f64>,
    pub theta: Vec<f64>,
    pub gamma: Vec<f64>,
    pub omega: Vec<f64>,
}

impl CemaParams {
    /// Uniform random parameters for `m` channels of order `n`, wide enough to exercise every
    /// coefficient (|q| from ~0.1 to ~1, both rotation directions, complex eta).
    pub fn random(m: usize, n: usize, rng: &mut StdRng) -> Self {
        let mut v = |k: usize, s: f64| {
            (0..k)
                .map(|_| s * (rng.gen::<f64>() * 2.0 - 1.0))
                .collect::<Vec<_>>()
        };
        CemaParams {
            alpha: v(m * n, 1.5),
            delta: v(m * n, 1.5),
            theta: v(m, 2.0),
            gamma: v(m * n * 2, 1.0),
            omega: v(m, 0.5),
        }
    }

    /// The `params` of `tests/fixtures/cema.json`.
    pub fn from_golden(g: &Golden) -> Self {
        let t = |k: &str| g.tensor(&["params", k]).unwrap().data;
        CemaParams {
            alpha: t("alpha"),
            delta: t("delta"),
            theta: t("theta"),
            gamma: t("gamma"),
            omega: t("omega"),
        }
    }

    /// A module holding these values.
    pub fn model<const M: usize, const N: usize, E: Dtype + num_traits::Float, D: Device<E>>(
        &self,
        dev: &D,
    ) -> MultiHeadComplexEma<M, N, E, D> {
        let cv = |v: &[f64]| {
            v.iter()
                .map(|&x| <E as num_traits::NumCast>::from(x).unwrap())
                .collect::<Vec<E>>()
        };
        MultiHeadComplexEma {
            alpha: dev.tensor_from_vec(cv(&self.alpha), Rank3::<M, N, 1>::default()),
            delta: dev.tensor_from_vec(cv(&self.delta), Rank3::<M, N, 1>::default()),
            theta: dev.tensor_from_vec(cv(&self.theta), Rank3::<M, 1, 1>::default()),
            gamma: dev.tensor_from_vec(cv(&self.gamma), Rank3::<M, N, 2>::default()),
            omega: dev.tensor_from_vec(cv(&self.omega), Rank2::<M, 1>::default()),
        }
    }
}
