//! Plain layers with official parameter names: linear (PyTorch weight layout), RMSNorm and
//! LayerNorm with the Megalodon `1 + w` weight convention, SiLU.

use crate::device::MegaDevice;
pub use crate::ops::gates::rms_normalize;
use crate::params::{join, ParamVisitor, Params};
use crate::profile::{self, OpClass};
use crate::util::{c, Float};
use anyhow::Result;
use dfdx::prelude::*;
use rand::Rng;
use rand_distr::{Distribution, Normal};

pub use crate::util::Seq;

/// Samples a host vector from N(0, std^2), truncated at +-`cut` (no truncation when `cut` is None).
pub fn normal_vec<E: Dtype>(rng: &mut impl Rng, n: usize, std: f64, cut: Option<f64>) -> Vec<E> {
    let dist = Normal::new(0.0, std.max(1e-30)).expect("finite std");
    (0..n)
        .map(|_| loop {
            let x: f64 = dist.sample(rng);
            if cut.map(|cv| x.abs() <= cv).unwrap_or(true) {
                break c::<E>(x);
            }
        })
        .collect()
}

/// `Linear(I -> O)`: weight `(O, I)` (PyTorch layout), optional bias `(O,)`; `y = x W^T + b`.
#[derive(Clone)]
pub struct Linear<const I: usize, const O: usize, E: Dtype, D: Device<E>> {
    pub weight: Tensor<Rank2<O, I>, E, D>,
    pub bias: Option<Tensor<Rank1<O>, E, D>>,
}

impl<const I: usize, const O: usize, E: Float, D: Device<E>> Linear<I, O, E, D> {
    /// Official "he" init (Kaiming normal, fan_in, a = sqrt(5): std = 1/sqrt(3 fan_in)), zero bias.
    pub fn new(dev: &D, rng: &mut impl Rng, bias: bool) -> Self {
        let w = normal_vec::<E>(rng, O * I, 1.0 / (3.0 * I as f64).sqrt(), None);
        Self {
            weight: dev.tensor_from_vec(w, Rank2::<O, I>::default()),
            bias: bias.then(|| dev.zeros()),
        }
    }

    /// `x (B, T, I) -> (B, T, O)`.
    pub fn forward<T: Tape<E, D>>(&self, x: Seq<I, E, D, T>) -> Result<Seq<O, E, D, T>>
    where
        D: MegaDevice<E>,
    {
        let x = profile::enter(OpClass::MatMul, x);
        let y = D::linear(x, &self.weight, self.bias.as_ref())?;
        Ok(profile::leave(OpClass::MatMul, y))
    }

    /// `x W^T + b + r`: the layer with a residual `r (B, T, O)` added in the same pass.
    pub fn forward_add<T: Tape<E, D>>(
        &self,
        x: Seq<I, E, D, T>,
        r: Seq<O, E, D, T>,
    ) -> Result<Seq<O, E, D, T>>
    where
        D: MegaDevice<E>,
    {
        let x = profile::enter(OpClass::MatMul, x);
        let y = D::linear_add(x, &self.weight, self.bias.as_ref(), r)?;
        Ok(profile::leave(OpClass::MatMul, y))
    }
}

impl<const I: usize, const O: usize, E: Float, D: Device<E>> Params<E, D> for Linear<I, O, E, D> {
    fn visit_params<V: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut V) -> Result<()> {
        v.visit(&join(prefix, "weight"), &mut self.weight)?;
        if let Some(b) = &mut self.bias {
            v.visit(&join(prefix, "bias"), b)?;
        }
        Ok(())
    }
}

/// `silu(x) = x * sigmoid(x)` on the device's kernel.
pub fn silu<S: Shape, E: Float, D: MegaDevice<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> Result<Tensor<S, E, D, T>> {
    D::silu(x)
}

/// RMSNorm with weight applied as `1 + w` (official `layer_norm.RMSNorm`).
#[derive(Clone)]
pub struct RmsNorm<const M: usize, E: Dtype, D: Device<E>> {
    pub weight: Tensor<Rank1<M>, E, D>,
    pub eps: f64,
}

impl<const M: usize, E: Float, D: Device<E>> RmsNorm<M, E, D> {
    pub fn new(dev: &D, eps: f64) -> Self {
        Self {
            weight: dev.zeros(),
            eps,
        }
    }

    pub fn forward<T: Tape<E, D>>(&self, x: Seq<M, E, D, T>) -> Result<Seq<M, E, D, T>>
    where
        D: MegaDevice<E>,
    {
        let x = profile::enter(OpClass::Norms, x);
        let y = D::rms_norm(x, Some(&self.weight), self.eps)?;
        Ok(profile::leave(OpClass::Norms, y))
    }
}

impl<const M: usize, E: Float, D: Device<E>> Params<E, D> for RmsNorm<M, E, D> {
    fn visit_params<V: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut V) -> Result<()> {
        v.visit(&join(prefix, "weight"), &mut self.weight)
    }
}

/// LayerNorm over the last axis with weight `1 + w` and bias (official `layer_norm.LayerNorm`).
#[derive(Clone)]
pub struct LayerNorm<const M: usize, E: Dtype, D: Device<E>> {
    pub weight: Tensor<Rank1<M>, E, D>,
    pub bias: Tensor<Rank1<M>, E, D>,
    pub eps: f64,
}

impl<const M: usize, E: Float, D: Device<E>> LayerNorm<M, E, D> {
    pub fn new(dev: &D, eps: f64) -> Self {
        Self {
            weight: dev.zeros(),
            bias: dev.zeros(),
            eps,
        }
    }

    pub fn forward<T: Tape<E, D>>(&self, x: Seq<M, E, D, T>) -> Result<Seq<M, E, D, T>>
    where
        D: MegaDevice<E>,
    {
        let x = profile::enter(OpClass::Norms, x);
        let y = D::layer_norm(x, &self.weight, &self.bias, self.eps)?;
        Ok(profile::leave(OpClass::Norms, y))
    }
}

impl<const M: usize, E: Float, D: Device<E>> Params<E, D> for LayerNorm<M, E, D> {
    fn visit_params<V: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut V) -> Result<()> {
        v.visit(&join(prefix, "weight"), &mut self.weight)?;
        v.visit(&join(prefix, "bias"), &mut self.bias)
    }
}
