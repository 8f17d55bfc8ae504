//! Interleaved rotary position embedding that restarts at every attention chunk
//! (`docs/design.md`, "Chunked attention and RoPE"): the tables and the composed dfdx op (the
//! CPU kernel is `ops::gates_cpu::rope`).

use crate::ops::consts;
use crate::util::{c, Float, Heads};
use dfdx::prelude::*;

/// Interleaved rotary embedding restarting at every chunk (`docs/design.md` §5).
#[derive(Debug, Clone)]
pub struct Rope {
    /// `rope.freqs` (dz/2,): `1 / base^(2j/dz)` computed in f64, stored as f32.
    pub freqs: Vec<f32>,
}

impl Rope {
    pub fn new(dz: usize, base: f64) -> Self {
        let freqs = (0..dz / 2)
            .map(|j| (1.0 / base.powf((2 * j) as f64 / dz as f64)) as f32)
            .collect();
        Self { freqs }
    }

    /// `(cos, sin)` per (position, pair) (`len(positions) * dz/2` each), computed as in
    /// [`Rope::apply`].
    pub fn cos_sin<E: Dtype>(&self, positions: &[usize]) -> (Vec<E>, Vec<E>) {
        let n = positions.len() * self.freqs.len();
        let (mut cs, mut sn) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for &m in positions {
            for &f in &self.freqs {
                let (s, co) = ((m as f32 * f) as f64).sin_cos();
                cs.push(c(co));
                sn.push(c(s));
            }
        }
        (cs, sn)
    }

    /// `(cos, signed sin)` tables `(len(positions), dz)`: for pair j at position m the angle is
    /// `m * freqs[j]` in f32; `sin` carries `-sin` at even and `+sin` at odd slots.
    fn tables<E: Dtype>(&self, positions: &[usize]) -> (Vec<E>, Vec<E>) {
        let dz = self.freqs.len() * 2;
        let mut cs = Vec::with_capacity(positions.len() * dz);
        let mut sn = Vec::with_capacity(positions.len() * dz);
        for &m in positions {
            for &f in &self.freqs {
                let ang = (m as f32 * f) as f64;
                let (s, co) = ang.sin_cos();
                cs.push(c(co));
                cs.push(c(co));
                sn.push(c(-s));
                sn.push(c(s));
            }
        }
        (cs, sn)
    }

    /// The cache key of the tables at `positions`: the positions (a run `start..start+len` as
    /// two numbers) and the frequencies' bits.
    fn key(&self, positions: &[usize]) -> Vec<u64> {
        let run = positions.windows(2).all(|w| w[1] == w[0] + 1);
        let mut k = Vec::with_capacity(self.freqs.len() + 3);
        if run {
            k.extend([0, positions.first().map_or(0, |&p| p as u64 + 1)]);
        } else {
            k.push(1);
            k.extend(positions.iter().map(|&p| p as u64));
        }
        k.push(u64::MAX);
        k.extend(self.freqs.iter().map(|f| u64::from(f.to_bits())));
        k
    }

    /// Rotates `x (B, T, H, dz)`; `positions` has length T (within-chunk positions). The
    /// composed reference: element products with the tables plus a pair-swap matrix product.
    pub fn apply<const H: usize, E: Float, D: Device<E>, T: Tape<E, D>>(
        &self,
        x: Heads<H, E, D, T>,
        positions: &[usize],
    ) -> Heads<H, E, D, T> {
        let (b, t, _, dz) = *x.shape();
        let dev = x.device().clone();
        // the tables and the swap matrix are constants of (positions, freqs): built once
        let key = self.key(positions);
        let cs: Tensor<(usize, usize), E, D> =
            consts::tensor(&dev, "rope.cos", &key, (t, dz), || {
                self.tables::<E>(positions).0
            });
        let sn: Tensor<(usize, usize), E, D> =
            consts::tensor(&dev, "rope.sin", &key, (t, dz), || {
                self.tables::<E>(positions).1
            });
        // swap matrix: (x P)[2j] = x[2j+1], (x P)[2j+1] = x[2j]
        let p: Tensor<(usize, usize), E, D> =
            consts::tensor(&dev, "rope.swap", &[], (dz, dz), || {
                let mut p = vec![c::<E>(0.0); dz * dz];
                for j in 0..dz / 2 {
                    p[(2 * j + 1) * dz + 2 * j] = c(1.0);
                    p[(2 * j) * dz + 2 * j + 1] = c(1.0);
                }
                p
            });
        let shape = (b, t, Const::<H>, dz);
        let swapped = x
            .retaped::<T>()
            .reshape_like(&(b * t, Const::<H>, dz))
            .matmul(p)
            .reshape_like(&shape);
        x * cs.broadcast_like::<_, Axes2<0, 2>>(&shape)
            + swapped * sn.broadcast_like::<_, Axes2<0, 2>>(&shape)
    }
}
