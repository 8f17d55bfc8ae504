//! TimestepNorm's carried state and its composed (dfdx-only) op (`docs/design.md` §3); the
//! module is `nn::timestep_norm::TimestepNorm`, the CPU kernel `ops::norms_cpu::timestep_norm`.
//!
//! The official kernel merges per-step moments with Welford updates; since every step adds the
//! same number of elements the result equals the pooled closed form used here:
//! `M_t = (n0 m0 + sum_{s<=t} mu_s) / n_t`, `V_t = (n0 (v0 + m0^2) + sum_{s<=t} (s2_s + mu_s^2)) / n_t - M_t^2`,
//! with the cumulative sums done by the linear-cost [`cumsum_time`].

use super::scan::cumsum_time;
use crate::ops::consts;
use crate::util::{c, Float, Seq};
use anyhow::{ensure, Result};
use dfdx::prelude::*;

/// Per-row group statistics `(B, G)`.
pub type GroupStat<const G: usize, E, D, T = NoneTape> = Tensor<(usize, Const<G>), E, D, T>;

/// Carried TimestepNorm state: per batch row the number of steps seen and the running group
/// mean and (population) variance. Official cache entry `(n, mean, var)`.
pub struct NormState<const G: usize, E: Dtype, D: Device<E>, T = NoneTape> {
    pub count: Vec<usize>,
    pub mean: GroupStat<G, E, D, T>,
    pub var: GroupStat<G, E, D, T>,
}

impl<const G: usize, E: Dtype, D: Device<E>> Clone for NormState<G, E, D> {
    fn clone(&self) -> Self {
        Self {
            count: self.count.clone(),
            mean: self.mean.clone(),
            var: self.var.clone(),
        }
    }
}

impl<const G: usize, E: Float, D: Device<E>> NormState<G, E, D> {
    /// The official empty state (count 0, mean 0, var 1) for `batch` rows.
    pub fn empty(dev: &D, batch: usize) -> Self {
        Self {
            count: vec![0; batch],
            mean: dev.zeros_like(&(batch, Const)),
            var: dev.ones_like(&(batch, Const)),
        }
    }
}

/// Per-step flags (`true` = real step) from an optional row-major `B*T` padding mask
/// (`true` = padding); the error names the expected length.
pub(crate) fn real_steps(pad: Option<&[bool]>, b: usize, t: usize) -> Result<Vec<bool>> {
    match pad {
        Some(p) => {
            ensure!(
                p.len() == b * t,
                "padding mask has {} entries, expected B*T = {}",
                p.len(),
                b * t
            );
            Ok(p.iter().map(|&x| !x).collect())
        }
        None => Ok(vec![true; b * t]),
    }
}

/// Causal group norm of `x (B, T, M)` over `G` groups continuing from `state` (the official
/// empty state if `None`), weight applied as `1 + w`; see
/// [`TimestepNorm::try_forward`](crate::nn::timestep_norm::TimestepNorm::try_forward).
#[allow(clippy::type_complexity)]
pub fn composed_timestep_norm<
    const M: usize,
    const G: usize,
    E: Float,
    D: Device<E>,
    T: Tape<E, D> + Merge<NoneTape>,
>(
    x: Seq<M, E, D, T>,
    weight: &Tensor<Rank1<M>, E, D>,
    bias: &Tensor<Rank1<M>, E, D>,
    eps: f64,
    state: Option<NormState<G, E, D, T>>,
    pad: Option<&[bool]>,
) -> Result<(Seq<M, E, D, T>, NormState<G, E, D, T>)> {
    let (b, t, _) = *x.shape();
    ensure!(t > 0, "TimestepNorm: empty sequence");
    let dev = x.device().clone();
    let gs = M / G;
    let (count0, mean0, var0) = match state {
        Some(s) => {
            ensure!(
                s.count.len() == b,
                "TimestepNorm state has batch {}, input has batch {b}",
                s.count.len()
            );
            ensure!(
                s.mean.shape().0 == b,
                "TimestepNorm state mean has batch {}, input has batch {b}",
                s.mean.shape().0
            );
            (s.count, s.mean, s.var)
        }
        None => {
            let e = NormState::<G, E, D>::empty(&dev, b);
            (e.count, e.mean.retaped::<T>(), e.var.retaped::<T>())
        }
    };
    // step counts n_t (depend only on the carried counts and the mask). Without padding and
    // with one carried count c0 for the whole batch, 1/n_t = 1/(c0 + t + 1) comes from a cached
    // (T,) ramp and a scalar: nothing is copied to the device. Otherwise the (B, T) table is
    // built on the host (the mask is data).
    let real = real_steps(pad, b, t)?;
    let mut final_count = count0.clone();
    for (bi, n) in final_count.iter_mut().enumerate() {
        *n += real[bi * t..(bi + 1) * t].iter().filter(|&&r| r).count();
    }
    let uniform = count0.windows(2).all(|w| w[0] == w[1]);
    let c0 = count0.first().copied().unwrap_or(0);
    let shp2 = (b, t);
    let ninv_t: Tensor<(usize, usize), E, D> = if pad.is_none() && uniform {
        let ramp: Tensor<(usize,), E, D> =
            consts::tensor(&dev, "timestep_norm.ramp", &[], (t,), || {
                (1..=t).map(|i| c(i as f64)).collect()
            });
        (ramp + c::<E>(c0 as f64))
            .recip()
            .broadcast_like::<_, Axis<0>>(&shp2)
    } else {
        let mut ninv = vec![c::<E>(0.0); b * t];
        for bi in 0..b {
            let mut n = count0[bi];
            for ti in 0..t {
                n += usize::from(real[bi * t + ti]);
                ninv[bi * t + ti] = c(1.0 / n.max(1) as f64);
            }
        }
        dev.tensor_from_vec(ninv, shp2)
    };
    let keep_t: Option<Tensor<(usize, usize), E, D>> = pad.map(|_| {
        let keep = real.iter().map(|&r| c(if r { 1.0 } else { 0.0 })).collect();
        dev.tensor_from_vec(keep, shp2)
    });
    let shp3 = (b, t, Const::<G>);

    // per-step group moments (B, T, G)
    let xg = x.reshape_like(&(b, t, Const::<G>, gs));
    let mu = xg.retaped::<T>().mean::<_, Axis<3>>();
    let m2 = xg.retaped::<T>().square().mean::<_, Axis<3>>();
    let (mu, m2) = match &keep_t {
        Some(keep) => {
            let k = keep.clone().broadcast_like::<_, Axis<2>>(&shp3);
            (mu * k.clone(), m2 * k)
        }
        None => (mu, m2),
    };
    // carried prefix sums (B, G)
    let (p1, p2) = if uniform {
        let n0 = c::<E>(c0 as f64);
        (mean0.retaped::<T>() * n0, (var0 + mean0.square()) * n0)
    } else {
        let n0: Vec<E> = count0.iter().map(|&n| c(n as f64)).collect();
        let n0_t: Tensor<(usize,), E, D> = dev.tensor_from_vec(n0, (b,));
        let n0g = n0_t.broadcast_like::<_, Axis<1>>(&(b, Const::<G>));
        (
            mean0.retaped::<T>() * n0g.clone(),
            (var0 + mean0.square()) * n0g,
        )
    };
    let s1 = cumsum_time(mu) + p1.broadcast_like::<_, Axis<1>>(&shp3);
    let s2 = cumsum_time(m2) + p2.broadcast_like::<_, Axis<1>>(&shp3);
    let ninv3 = ninv_t.broadcast_like::<_, Axis<2>>(&shp3);
    let mean_t = s1 * ninv3.clone();
    let var_t = s2 * ninv3 - mean_t.retaped::<T>().square();

    // state after the last step
    let last: Tensor<(usize,), usize, D> =
        consts::indices::<_, E, _>(&dev, "timestep_norm.last", &[t as u64], (b,), || {
            vec![t - 1; b]
        });
    let mean_last = mean_t.retaped::<T>().select(last.clone());
    let var_last = var_t.retaped::<T>().select(last);

    let shp4 = (b, t, Const::<G>, gs);
    let rstd = (var_t + c::<E>(eps))
        .sqrt()
        .recip()
        .broadcast_like::<_, Axis<3>>(&shp4);
    let centered = xg - mean_t.broadcast_like::<_, Axis<3>>(&shp4);
    let normed = (centered * rstd).reshape_like(&(b, t, Const::<M>));
    let w =
        (weight.retaped::<T>() + c::<E>(1.0)).broadcast_like::<_, Axes2<0, 1>>(&(b, t, Const::<M>));
    let bias = bias
        .retaped::<T>()
        .broadcast_like::<_, Axes2<0, 1>>(&(b, t, Const::<M>));
    let mut y = normed * w + bias;
    if let Some(keep) = keep_t {
        y = y * keep.broadcast_like::<_, Axis<2>>(&(b, t, Const::<M>));
    }
    Ok((
        y,
        NormState {
            count: final_count,
            mean: mean_last,
            var: var_last,
        },
    ))
}
