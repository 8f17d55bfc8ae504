//! Multi-head complex exponential moving average (CEMA), spec section 4.
//! Official: `megalodon/modules/complex_exponential_moving_average.py` (`MultiHeadComplexEMA`).

use crate::params::{join, ParamVisitor, Params};
use crate::util::Float;
use dfdx::prelude::*;

/// CEMA over `M` channels of order `N`. Field names are the official state-dict keys.
pub struct MultiHeadComplexEma<const M: usize, const N: usize, E: Dtype, D: Device<E>> {
    /// (D, N, 1): input coefficient p = sigmoid(alpha).
    pub alpha: Tensor<Rank3<M, N, 1>, E, D>,
    /// (D, N, 1): damping, |q| = 1 - sigmoid(alpha) sigmoid(delta).
    pub delta: Tensor<Rank3<M, N, 1>, E, D>,
    /// (D, 1, 1): base angle phi = sigmoid(theta) 2 pi / N.
    pub theta: Tensor<Rank3<M, 1, 1>, E, D>,
    /// (D, N, 2): output projection eta = (gamma[..,0] + i gamma[..,1]) / sqrt(N).
    pub gamma: Tensor<Rank3<M, N, 2>, E, D>,
    /// (D, 1): skip coefficient.
    pub omega: Tensor<Rank2<M, 1>, E, D>,
}

/// Carried complex hidden state h (B, D, N) as real and imaginary parts.
pub struct CemaState<const M: usize, const N: usize, E: Dtype, D: Device<E>, T = NoneTape> {
    pub re: Tensor<(usize, Const<M>, Const<N>), E, D, T>,
    pub im: Tensor<(usize, Const<M>, Const<N>), E, D, T>,
}

impl<const M: usize, const N: usize, E: Float, D: Device<E>> Params<E, D> for MultiHeadComplexEma<M, N, E, D> {
    fn visit_params<V: ParamVisitor<E, D>>(&mut self, prefix: &str, v: &mut V) -> anyhow::Result<()> {
        v.visit(&join(prefix, "alpha"), &mut self.alpha)?;
        v.visit(&join(prefix, "delta"), &mut self.delta)?;
        v.visit(&join(prefix, "theta"), &mut self.theta)?;
        v.visit(&join(prefix, "gamma"), &mut self.gamma)?;
        v.visit(&join(prefix, "omega"), &mut self.omega)
    }
}
