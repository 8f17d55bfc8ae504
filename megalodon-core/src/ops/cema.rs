//! Multi-head complex exponential moving average (CEMA), `docs/design.md` §4: its parameters and
//! the composed reference (what every device runs unless it overrides `MegaDevice::cema`).
//! Official: `megalodon/modules/complex_exponential_moving_average.py` (`MultiHeadComplexEMA`).
//!
//! Training form, built only from dfdx tensor ops (so it runs on every dfdx device), linear in T:
//! 1. The input is zero-padded at the front to `L` chunks of `c` steps and laid out chunk-time
//!    major, `XT` (M, c, B L).
//! 2. Within a chunk, `y_loc = LT @ XT` with the per-channel lower Toeplitz matrix of the kernel
//!    `w[j] = Re sum_k p eta q^j` (+ omega at j = 0), and the chunk-end states
//!    `H = (p q^(c-1-s)) @ XT`, (M N, B, L) complex.
//! 3. The states at each chunk start come from an exclusive scan of `H` with decay `q^c`, computed
//!    by the same chunked Toeplitz scheme recursively (chunks of 16 chunk states), so the op count
//!    is O(log T). The final state falls out of that scan.
//! 4. `y = y_loc + Re(sum_k eta q^(i+1) S_chunk)`; a carried `h0` enters as `q^(c-pad) h0` added to
//!    the end state of chunk 0, plus its direct term inside chunk 0.
//!
//! Complex numbers are held as separate real and imaginary tensors. Gradient pitfalls handled
//! here (see `docs/design.md` §4): multi-use tensors are shared by id through
//! `retaped` copies whose original tapes are merged into `y`; `slice` is only applied to fresh
//! tensors in non-overlapping pieces (dfdx's CPU slice backward assigns instead of adding).

#![allow(clippy::type_complexity)] // (re, im) pairs of tensors with spelled-out shapes

use crate::ops::consts as op_consts;
use crate::params::{join, ParamVisitor, Params};
use crate::util::{c, Float};
use dfdx::prelude::*;

/// CEMA over `M` channels of order `N`. Field names are the official state-dict keys.
#[derive(Clone)]
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

impl<const M: usize, const N: usize, E: Float, D: Device<E>> Params<E, D>
    for MultiHeadComplexEma<M, N, E, D>
{
    fn visit_params<V: ParamVisitor<E, D>>(
        &mut self,
        prefix: &str,
        v: &mut V,
    ) -> anyhow::Result<()> {
        v.visit(&join(prefix, "alpha"), &mut self.alpha)?;
        v.visit(&join(prefix, "delta"), &mut self.delta)?;
        v.visit(&join(prefix, "theta"), &mut self.theta)?;
        v.visit(&join(prefix, "gamma"), &mut self.gamma)?;
        v.visit(&join(prefix, "omega"), &mut self.omega)
    }
}

/// Derived coefficients (`docs/design.md` §4), channels flattened to C = M*N (index d*N + k), as
/// tape-less tensors whose tape was moved into the caller's sink.
struct Coefs<const M: usize, E: Dtype, D: Storage<E>> {
    /// (C,) p = sigmoid(alpha)
    p: Tensor<(usize,), E, D>,
    /// (C,) ln|q| = ln(1 - sigmoid(alpha) sigmoid(delta))
    lnr: Tensor<(usize,), E, D>,
    /// (C,) arg q = (k+1) sigmoid(theta) 2 pi / N
    ang: Tensor<(usize,), E, D>,
    /// (C,) Re eta, Im eta
    eta_re: Tensor<(usize,), E, D>,
    eta_im: Tensor<(usize,), E, D>,
    /// (M,) skip coefficient
    omega: Tensor<(Const<M>,), E, D>,
}

/// Complex product of (ar + i ai)(br + i bi) for tape-less shared operands, as taped tensors.
fn cmul<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    ar: &Tensor<S, E, D>,
    ai: &Tensor<S, E, D>,
    br: &Tensor<S, E, D>,
    bi: &Tensor<S, E, D>,
) -> (Tensor<S, E, D, T>, Tensor<S, E, D, T>) {
    let re = ar.retaped::<T>() * br.retaped::<T>() - ai.retaped::<T>() * bi.retaped::<T>();
    let im = ar.retaped::<T>() * bi.retaped::<T>() + ai.retaped::<T>() * br.retaped::<T>();
    (re, im)
}

impl<const M: usize, const N: usize, E: Float, D: Device<E>> MultiHeadComplexEma<M, N, E, D> {
    /// Official initialisation (`docs/design.md` §7).
    pub fn new(dev: &D, rng: &mut impl rand::Rng) -> Self {
        use rand::seq::SliceRandom;
        use rand_distr::{Distribution, Normal};
        let n02 = Normal::new(0.0, 0.2).expect("valid std");
        let n1 = Normal::new(0.0, 1.0).expect("valid std");
        let n025 = Normal::new(0.0, 0.25).expect("valid std");
        let mut sample = |n: usize, d: &Normal<f64>| -> Vec<E> {
            (0..n).map(|_| c::<E>(d.sample(rng))).collect()
        };
        let alpha = dev.tensor_from_vec(sample(M * N, &n02), Rank3::<M, N, 1>::default());
        let delta = dev.tensor_from_vec(sample(M * N, &n02), Rank3::<M, N, 1>::default());
        let mut gamma = vec![E::zero(); M * N * 2];
        for (i, g) in sample(M * N, &n1).into_iter().enumerate() {
            gamma[2 * i] = g;
        }
        let gamma = dev.tensor_from_vec(gamma, Rank3::<M, N, 2>::default());
        // theta: logit of a permuted ladder f_k = M^(-k/M), k = 1..M (clamped away from 1 for M = 1).
        let mut f: Vec<f64> = (1..=M)
            .map(|k| {
                (-(k as f64) * (M as f64).ln() / M as f64)
                    .exp()
                    .clamp(1e-6, 1.0 - 1e-6)
            })
            .collect();
        f.shuffle(rng);
        let theta = dev.tensor_from_vec(
            f.iter().map(|&f| c::<E>((f / (1.0 - f)).ln())).collect(),
            Rank3::<M, 1, 1>::default(),
        );
        // omega: truncated normal on [-1, 1] by rejection.
        let omega: Vec<E> = (0..M)
            .map(|_| loop {
                let x = n025.sample(rng);
                if (-1.0..=1.0).contains(&x) {
                    break c::<E>(x);
                }
            })
            .collect();
        let omega = dev.tensor_from_vec(omega, Rank2::<M, 1>::default());
        Self {
            alpha,
            delta,
            theta,
            gamma,
            omega,
        }
    }

    /// Derived coefficients `(p, q, eta)` of `docs/design.md` §4 as plain tensors: p (M, N), q as
    /// (re, im) (M, N) each, eta as (re, im) (M, N) each.
    pub fn coefficients(
        &self,
    ) -> (
        Tensor<Rank2<M, N>, E, D>,
        [Tensor<Rank2<M, N>, E, D>; 2],
        [Tensor<Rank2<M, N>, E, D>; 2],
    ) {
        let mut sink = NoneTape;
        let co = self.coefs::<NoneTape>(&mut sink);
        let (qr, qi) = pow_table::<E, D, NoneTape>(&co.lnr, &co.ang, &[1.0], None);
        let r2 = |t: Tensor<(usize, usize), E, D>| t.reshape_like(&(Const::<M>, Const::<N>));
        let r1 = |t: Tensor<(usize,), E, D>| t.reshape_like(&(Const::<M>, Const::<N>));
        (r1(co.p), [r2(qr), r2(qi)], [r1(co.eta_re), r1(co.eta_im)])
    }

    fn coefs<T: Tape<E, D>>(&self, sink: &mut T) -> Coefs<M, E, D> {
        let dev = self.alpha.device().clone();
        let ch = M * N;
        let a = self.alpha.retaped::<T>().reshape_like(&(ch,)).sigmoid();
        let dl = self.delta.retaped::<T>().reshape_like(&(ch,)).sigmoid();
        let (a, a2) = dup(a);
        let lnr = ((a2 * dl).negate() + E::one()).ln();
        // phi (M,) -> ang (M, N) = (k+1) phi
        let phi = self
            .theta
            .retaped::<T>()
            .reshape_like(&(Const::<M>,))
            .sigmoid()
            * c::<E>(2.0 * std::f64::consts::PI / N as f64);
        let ks: Tensor<Rank1<N>, E, D> =
            op_consts::tensor(&dev, "cema.k", &[], (Const::<N>,), || {
                (1..=N).map(|k| c::<E>(k as f64)).collect()
            });
        let ang = phi.broadcast::<Rank2<M, N>, Axis<1>>() * ks.broadcast::<Rank2<M, N>, Axis<0>>();
        let ang = ang.reshape_like(&(ch,));
        // eta = (gamma[..,0] + i gamma[..,1]) / sqrt(N), via (C, 2) @ (2,)
        let s = 1.0 / (N as f64).sqrt();
        let g = |v: [f64; 2]| {
            let sel: Tensor<Rank1<2>, E, D> = op_consts::tensor(
                &dev,
                "cema.eta",
                &op_consts::bits(&v),
                (Const::<2>,),
                || v.map(c::<E>).to_vec(),
            );
            self.gamma
                .retaped::<T>()
                .reshape_like(&(ch, Const::<2>))
                .matmul(sel)
        };
        let eta_re = g([s, 0.0]);
        let eta_im = g([0.0, s]);
        let omega = self.omega.retaped::<T>().reshape::<Rank1<M>>();
        Coefs {
            p: share(a, sink),
            lnr: share(lnr, sink),
            ang: share(ang, sink),
            eta_re: share(eta_re, sink),
            eta_im: share(eta_im, sink),
            omega: share(omega, sink),
        }
    }

    /// Causal CEMA (`docs/design.md` §4) of `u` (B, T, M), optionally from the carried state `h0`; returns
    /// `y` (B, T, M) and, when `want_state`, the final state `h_T` (`docs/design.md` §4).
    ///
    /// Tapes: `y` carries the tape of `u`, the parameters, `h0` and every op that `y` needs; the
    /// returned state carries only the ops that produce it from those (merge both into the loss
    /// when both are used). Cost is linear in T (chunked scan, see the module docs).
    pub fn try_forward<T: Tape<E, D> + Merge<T>>(
        &self,
        u: Tensor<(usize, usize, Const<M>), E, D, T>,
        h0: Option<CemaState<M, N, E, D, T>>,
        want_state: bool,
    ) -> anyhow::Result<(
        Tensor<(usize, usize, Const<M>), E, D, T>,
        Option<CemaState<M, N, E, D, T>>,
    )> {
        let t = u.shape().1;
        self.try_forward_chunked(u, h0, want_state, default_chunk(t), STATE_CHUNK)
    }

    /// [`Self::try_forward`] with explicit chunk lengths: `chunk` for the within-chunk Toeplitz
    /// products over the input, `state_chunk` for the recursive scan over chunk states.
    pub fn try_forward_chunked<T: Tape<E, D> + Merge<T>>(
        &self,
        u: Tensor<(usize, usize, Const<M>), E, D, T>,
        h0: Option<CemaState<M, N, E, D, T>>,
        want_state: bool,
        chunk: usize,
        state_chunk: usize,
    ) -> anyhow::Result<(
        Tensor<(usize, usize, Const<M>), E, D, T>,
        Option<CemaState<M, N, E, D, T>>,
    )> {
        let (b, t, _) = *u.shape();
        anyhow::ensure!(
            t >= 1 && b >= 1,
            "CEMA: input u has shape {:?}; need B >= 1 and T >= 1",
            u.shape()
        );
        anyhow::ensure!(
            chunk >= 1 && state_chunk >= 2,
            "CEMA: chunk {chunk} must be >= 1 and state_chunk {state_chunk} >= 2"
        );
        if let Some(h) = &h0 {
            anyhow::ensure!(
                h.re.shape().0 == b && h.im.shape().0 == b,
                "CEMA: h0 has batch {} / {} but u has batch {b}",
                h.re.shape().0,
                h.im.shape().0
            );
        }
        let dev = u.device().clone();
        let ch = M * N;
        let c = chunk.min(t);
        let l = t.div_ceil(c);
        let tp = l * c;
        let pad = tp - t; // zero steps at the front: exact final state for a zero initial state
        let bl = b * l;
        let mut sink = T::default();
        let co = self.coefs::<T>(&mut sink);
        let rs = |x: Tensor<(usize, usize), E, D, T>| x.reshape_like(&(Const::<M>, Const::<N>, c));

        // Input, chunk-time major: XT[d, s, (b, l)] = u[b, l c + s - pad, d]; (M, c, B L).
        let u = if pad > 0 {
            (dev.zeros_like(&(b, pad, Const::<M>)).retaped::<T>(), u).concat_along(Axis::<1>)
        } else {
            u
        };
        let xt = u
            .reshape_like(&(b, l, c, Const::<M>))
            .permute::<_, Axes4<3, 2, 0, 1>>()
            .reshape_like(&(Const::<M>, c, bl));
        let xt = share(xt, &mut sink);

        // Kernel w[d, j] = Re sum_k p eta q^j (+ omega at j = 0), j < c; (M, c).
        let js: Vec<f64> = (0..c).map(|j| j as f64).collect();
        let (qr, qi) = pow_table::<E, D, T>(&co.lnr, &co.ang, &js, None);
        let pe_re = co.p.retaped::<T>() * co.eta_re.retaped::<T>(); // (C,) p eta
        let pe_im = co.p.retaped::<T>() * co.eta_im.retaped::<T>();
        let sh = (ch, c);
        let w = pe_re.broadcast_like::<_, Axis<1>>(&sh) * qr
            - pe_im.broadcast_like::<_, Axis<1>>(&sh) * qi;
        let mut e0 = vec![0.0; c];
        e0[0] = 1.0;
        let w = rs(w).sum::<_, Axis<1>>()
            + co.omega
                .retaped::<T>()
                .broadcast_like::<_, Axis<1>>(&(Const::<M>, c))
                * consts::<E, D>(&dev, &e0).broadcast_like::<_, Axis<0>>(&(Const::<M>, c));
        // Toeplitz LT[d, t, s] = w[d, t - s] for t >= s; (M, c, c).
        let sel = toeplitz_selector::<E, D>(&dev, "cema.toeplitz_lower", c, c, c, |t, s| {
            if t >= s {
                Some(t - s)
            } else {
                None
            }
        });
        let lt = w.matmul(sel).reshape_like(&(Const::<M>, c, c));
        let y_loc = lt.matmul(xt.retaped::<T>()); // (M, c, B L)

        // Chunk-end local states H[d, k, (b, l)] = sum_s p q^(c-1-s) u[s]; (M, N, B L) -> (C, B, L).
        let js: Vec<f64> = (0..c).map(|s| (c - 1 - s) as f64).collect();
        let (er, ei) = pow_table::<E, D, T>(&co.lnr, &co.ang, &js, None);
        let p_b = |x: Tensor<(usize, usize), E, D, T>| {
            x * co.p.retaped::<T>().broadcast_like::<_, Axis<1>>(&sh)
        };
        let mut h_re = rs(p_b(er))
            .matmul(xt.retaped::<T>())
            .reshape_like(&(ch, b, l));
        let mut h_im = rs(p_b(ei))
            .matmul(xt.retaped::<T>())
            .reshape_like(&(ch, b, l));

        // Carried state: h0 (B, M, N) -> (C, B), injected at the end of chunk 0 as q^(c-pad) h0.
        let h0c = h0.map(|h| {
            let f = |x: Tensor<(usize, Const<M>, Const<N>), E, D, T>| {
                x.permute::<_, Axes3<1, 2, 0>>().reshape_like(&(ch, b))
            };
            (share(f(h.re), &mut sink), share(f(h.im), &mut sink))
        });
        if let Some((h0r, h0i)) = &h0c {
            let (qr, qi) = pow_table::<E, D, T>(&co.lnr, &co.ang, &[(c - pad) as f64], None);
            let qr = share(
                qr.reshape_like(&(ch,))
                    .broadcast_like::<_, Axis<1>>(&(ch, b)),
                &mut sink,
            );
            let qi = share(
                qi.reshape_like(&(ch,))
                    .broadcast_like::<_, Axis<1>>(&(ch, b)),
                &mut sink,
            );
            let (ir, ii) = cmul::<_, E, D, T>(&qr, &qi, h0r, h0i);
            let place =
                |x: Tensor<(usize, usize), E, D, T>| -> Tensor<(usize, usize, usize), E, D, T> {
                    let x = x.reshape_like(&(ch, b, 1usize));
                    if l > 1 {
                        (x, dev.zeros_like(&(ch, b, l - 1))).concat_along(Axis::<2>)
                    } else {
                        x
                    }
                };
            h_re = h_re + place(ir);
            h_im = h_im + place(ii);
        }

        // States at the start of each chunk (exclusive scan with decay q^c) and the final state.
        let (s_re, s_im, f_re, f_im) =
            scan_exclusive(h_re, h_im, &co.lnr, &co.ang, c, state_chunk, &mut sink);

        // State term: y_st[d, i, (b, l)] = Re sum_k eta q^(i+1) S[d, k, (b, l)]; G (M, c, N).
        let js: Vec<f64> = (1..=c).map(|i| i as f64).collect();
        let (gq_r, gq_i) = pow_table::<E, D, T>(&co.lnr, &co.ang, &js, None);
        let (g_re, g_im) = eta_times(&co, gq_r, gq_i, &mut sink);
        let gt = |x: Tensor<(usize, usize), E, D, T>| {
            rs(x)
                .permute::<_, Axes3<0, 2, 1>>()
                .reshape_like(&(Const::<M>, c, Const::<N>))
        };
        let s3 = |x: Tensor<(usize, usize, usize), E, D, T>| {
            x.reshape_like(&(Const::<M>, Const::<N>, bl))
        };
        let mut yt = y_loc + gt(g_re).matmul(s3(s_re)) - gt(g_im).matmul(s3(s_im));

        // h0 term inside chunk 0: y[i] += Re sum_k eta q^(i-pad+1) h0 for i >= pad.
        if let Some((h0r, h0i)) = &h0c {
            let js: Vec<f64> = (0..c)
                .map(|i| if i >= pad { (i + 1 - pad) as f64 } else { 0.0 })
                .collect();
            let mask: Vec<f64> = (0..c).map(|i| if i >= pad { 1.0 } else { 0.0 }).collect();
            let (q0r, q0i) = pow_table::<E, D, T>(&co.lnr, &co.ang, &js, Some(&mask));
            let (g0r, g0i) = eta_times(&co, q0r, q0i, &mut sink);
            let hh = |x: &Tensor<(usize, usize), E, D>| {
                x.retaped::<T>().reshape_like(&(Const::<M>, Const::<N>, b))
            };
            let y0 = gt(g0r).matmul(hh(h0r)) - gt(g0i).matmul(hh(h0i)); // (M, c, B)
            let y0 = y0.reshape_like(&(Const::<M>, c, b, 1usize));
            let y0 = if l > 1 {
                (y0, dev.zeros_like(&(Const::<M>, c, b, l - 1))).concat_along(Axis::<3>)
            } else {
                y0
            };
            yt = yt + y0.reshape_like(&(Const::<M>, c, bl));
        }

        // Back to (B, T, M).
        let y = yt
            .reshape_like(&(Const::<M>, c, b, l))
            .permute::<_, Axes4<2, 3, 1, 0>>()
            .reshape_like(&(b, tp, Const::<M>));
        let y = if pad > 0 { y.slice((.., pad.., ..)) } else { y };
        let (y, yt) = y.split_tape();
        let y = y.put_tape(yt.merge(sink));

        let state = want_state.then(|| {
            let f = |x: Tensor<(usize, usize), E, D, T>| {
                x.reshape_like(&(Const::<M>, Const::<N>, b))
                    .permute::<_, Axes3<2, 0, 1>>()
                    .reshape_like(&(b, Const::<M>, Const::<N>))
            };
            CemaState {
                re: f(f_re),
                im: f(f_im),
            }
        });
        Ok((y, state))
    }

    /// Anti-causal CEMA: `y_t = Re(sum_k eta sum_{s>=t} q^(s-t) p u_s) + omega u_t`, i.e. the
    /// causal CEMA of the time-reversed input, reversed back. Linear in T.
    pub fn try_forward_anticausal<T: Tape<E, D> + Merge<T>>(
        &self,
        u: Tensor<(usize, usize, Const<M>), E, D, T>,
    ) -> anyhow::Result<Tensor<(usize, usize, Const<M>), E, D, T>> {
        let t = u.shape().1;
        self.try_forward_anticausal_chunked(u, default_chunk(t), STATE_CHUNK)
    }

    /// [`Self::try_forward_anticausal`] with explicit chunk lengths.
    pub fn try_forward_anticausal_chunked<T: Tape<E, D> + Merge<T>>(
        &self,
        u: Tensor<(usize, usize, Const<M>), E, D, T>,
        chunk: usize,
        state_chunk: usize,
    ) -> anyhow::Result<Tensor<(usize, usize, Const<M>), E, D, T>> {
        let (b, t, _) = *u.shape();
        let dev = u.device().clone();
        let rev = || -> Tensor<(usize, usize), usize, D> {
            op_consts::indices::<_, E, _>(&dev, "cema.reverse", &[], (b, t), || {
                (0..b).flat_map(|_| (0..t).rev()).collect()
            })
        };
        let ur: Tensor<(usize, usize, Const<M>), E, D, T> = u.gather(rev());
        let (y, _) = self.try_forward_chunked(ur, None, false, chunk, state_chunk)?;
        Ok(y.gather(rev()))
    }
}

/// eta * (qr + i qi) for tables (C, L): returns (re, im) (C, L).
fn eta_times<const M: usize, E: Float, D: Device<E>, T: Tape<E, D>>(
    co: &Coefs<M, E, D>,
    qr: Tensor<(usize, usize), E, D, T>,
    qi: Tensor<(usize, usize), E, D, T>,
    sink: &mut T,
) -> (
    Tensor<(usize, usize), E, D, T>,
    Tensor<(usize, usize), E, D, T>,
) {
    let sh = *qr.shape();
    let qr = share(qr, sink);
    let qi = share(qi, sink);
    let er = || co.eta_re.retaped::<T>().broadcast_like::<_, Axis<1>>(&sh);
    let ei = || co.eta_im.retaped::<T>().broadcast_like::<_, Axis<1>>(&sh);
    let re = er() * qr.retaped::<T>() - ei() * qi.retaped::<T>();
    let im = er() * qi.retaped::<T>() + ei() * qr.retaped::<T>();
    (re, im)
}

/// Default within-chunk length for the first level, chosen from the sequence length
/// (measured best when the chunked form was designed).
fn default_chunk(t: usize) -> usize {
    if t <= 4096 {
        32
    } else {
        64
    }
}

/// Chunk length of the recursive scan over chunk states.
const STATE_CHUNK: usize = 16;

/// Splits a taped tensor into the original (keeping its tape) and a retaped copy with a fresh
/// tape. The two share an id: never combine them in one binary op.
fn dup<S: Shape, E: Dtype, D: Storage<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> (Tensor<S, E, D, T>, Tensor<S, E, D, T>) {
    let (x, t) = x.split_tape();
    let y = x.retaped::<T>();
    (x.put_tape(t), y)
}

/// Moves a taped tensor's tape into `sink` and returns the tape-less tensor; every later use is a
/// `retaped::<T>()` copy whose gradients accumulate by id. The sink is merged into the output `y`.
fn share<S: Shape, E: Dtype, D: Storage<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
    sink: &mut T,
) -> Tensor<S, E, D> {
    let (x, t) = x.split_tape();
    let s = std::mem::take(sink);
    *sink = s.merge(t);
    x
}

/// Constant (len,) tensor from f64 values (cached, see [`op_consts`]).
fn consts<E: Float, D: Device<E>>(dev: &D, v: &[f64]) -> Tensor<(usize,), E, D> {
    op_consts::tensor(dev, "cema.values", &op_consts::bits(v), (v.len(),), || {
        v.iter().map(|&x| c::<E>(x)).collect()
    })
}

/// Complex powers `q^j = exp(j ln|q|) (cos j ang, sin j ang)` for channels (C,) and a table of
/// exponents `js` (L,), optionally times a 0/1 mask (L,). Returns (re, im), each (C, L).
fn pow_table<E: Float, D: Device<E>, T: Tape<E, D>>(
    lnr: &Tensor<(usize,), E, D>,
    ang: &Tensor<(usize,), E, D>,
    js: &[f64],
    mask: Option<&[f64]>,
) -> (
    Tensor<(usize, usize), E, D, T>,
    Tensor<(usize, usize), E, D, T>,
) {
    let dev = lnr.device().clone();
    let sh = (lnr.shape().0, js.len());
    let j = consts::<E, D>(&dev, js);
    // (C, L): j ln|q| and j ang
    let lj = lnr.retaped::<T>().broadcast_like::<_, Axis<1>>(&sh)
        * j.clone().broadcast_like::<_, Axis<0>>(&sh);
    let aj =
        ang.retaped::<T>().broadcast_like::<_, Axis<1>>(&sh) * j.broadcast_like::<_, Axis<0>>(&sh);
    let mut mag = lj.exp();
    if let Some(m) = mask {
        mag = mag * consts::<E, D>(&dev, m).broadcast_like::<_, Axis<0>>(&sh);
    }
    let (mag, mag2) = dup(mag);
    let (aj, aj2) = dup(aj);
    (mag * aj.cos(), mag2 * aj2.sin())
}

/// Constant 0/1 matrix (L, rows*cols) that turns a table `w` (C, L) into a Toeplitz matrix by
/// `w @ sel` reshaped to (C, rows, cols): entry (r, k) is `w[f(r, k)]` where `f` gives the index
/// or `None` for a structural zero. `kind` names `f` for the constant cache: one `kind`, one `f`.
fn toeplitz_selector<E: Float, D: Device<E>>(
    dev: &D,
    kind: &'static str,
    len: usize,
    rows: usize,
    cols: usize,
    f: impl Fn(usize, usize) -> Option<usize>,
) -> Tensor<(usize, usize), E, D> {
    let dims = [len, rows, cols].map(|d| d as u64);
    op_consts::tensor(dev, kind, &dims, (len, rows * cols), || {
        let mut v = vec![E::zero(); len * rows * cols];
        for r in 0..rows {
            for k in 0..cols {
                if let Some(j) = f(r, k) {
                    v[j * rows * cols + r * cols + k] = E::one();
                }
            }
        }
        v
    })
}

/// Chunk-state outputs of [`scan_exclusive`]: (prev_re, prev_im) (C, R, L) and (fin_re, fin_im) (C, R).
type ScanOut<E, D, T> = (
    Tensor<(usize, usize, usize), E, D, T>,
    Tensor<(usize, usize, usize), E, D, T>,
    Tensor<(usize, usize), E, D, T>,
    Tensor<(usize, usize), E, D, T>,
);

/// Exclusive complex diagonal scan over the last axis, zero initial state:
/// `prev[l] = sum_{s<l} a^(l-1-s) x[s]` and `fin = sum_s a^(L-1-s) x[s]` (the state after the
/// last step), with per-channel decay `a = q^stride`, `q = exp(lnr + i ang)` of shape (C,).
/// Inputs (C, R, L). Cost O(C R L c2) time and memory; recursion depth log_{c2} L.
/// `prev` carries the tapes of the inputs; `fin` carries only its own ops (fresh tape).
fn scan_exclusive<E: Float, D: Device<E>, T: Tape<E, D>>(
    x_re: Tensor<(usize, usize, usize), E, D, T>,
    x_im: Tensor<(usize, usize, usize), E, D, T>,
    lnr: &Tensor<(usize,), E, D>,
    ang: &Tensor<(usize,), E, D>,
    stride: usize,
    c2: usize,
    sink: &mut T,
) -> ScanOut<E, D, T> {
    let dev = lnr.device().clone();
    let (ch, r, l) = *x_re.shape();
    if l <= c2 {
        // Base case: one strictly-lower Toeplitz matrix with an extra last column for `fin`:
        // K[s, t] = a^(t-1-s) for t > s, t in 0..=L; shape (C, L, L+1).
        let js: Vec<f64> = (0..l).map(|j| (j * stride) as f64).collect();
        let (pr, pi) = pow_table::<E, D, T>(lnr, ang, &js, None); // (C, L)
        let sel = toeplitz_selector::<E, D>(&dev, "cema.toeplitz_strict", l, l, l + 1, |s, t| {
            if t > s {
                Some(t - 1 - s)
            } else {
                None
            }
        });
        let kre = share(pr.matmul(sel.clone()).reshape_like(&(ch, l, l + 1)), sink);
        let kim = share(pi.matmul(sel).reshape_like(&(ch, l, l + 1)), sink);
        let xr = share(x_re, sink);
        let xi = share(x_im, sink);
        // complex (C, R, L) @ (C, L, L+1) -> (C, R, L+1)
        let ore = xr.retaped::<T>().matmul(kre.retaped::<T>())
            - xi.retaped::<T>().matmul(kim.retaped::<T>());
        let oim = xr.retaped::<T>().matmul(kim.retaped::<T>())
            + xi.retaped::<T>().matmul(kre.retaped::<T>());
        // Non-overlapping slices of fresh tensors (dfdx's CPU slice backward assigns).
        let (ore, ore2) = dup(ore);
        let (oim, oim2) = dup(oim);
        let fre = ore2.slice((.., .., l..)).reshape_like(&(ch, r));
        let fim = oim2.slice((.., .., l..)).reshape_like(&(ch, r));
        return (ore.slice((.., .., ..l)), oim.slice((.., .., ..l)), fre, fim);
    }
    // Recursive case: chunks of c2 (zero padding at the front keeps `fin` exact).
    let l2 = l.div_ceil(c2);
    let pad = l2 * c2 - l;
    let front = |x: Tensor<(usize, usize, usize), E, D, T>| {
        let x = if pad > 0 {
            (dev.zeros_like(&(ch, r, pad)).retaped::<T>(), x).concat_along(Axis::<2>)
        } else {
            x
        };
        x.reshape_like(&(ch, r * l2, c2))
    };
    let (sl_re, sl_im, fl_re, fl_im) =
        scan_exclusive(front(x_re), front(x_im), lnr, ang, stride, c2, sink);
    // Chunk-level scan of the chunk-end states with decay a^c2.
    let (sc_re, sc_im, fin_re, fin_im) = scan_exclusive(
        fl_re.reshape_like(&(ch, r, l2)),
        fl_im.reshape_like(&(ch, r, l2)),
        lnr,
        ang,
        stride * c2,
        c2,
        sink,
    );
    // prev[(r,l2), i] = local[(r,l2), i] + a^i * chunk_prev[r, l2]
    let sh = (ch, r * l2, c2);
    let js: Vec<f64> = (0..c2).map(|i| (i * stride) as f64).collect();
    let (pr, pi) = pow_table::<E, D, T>(lnr, ang, &js, None);
    let (pr, pr2) = dup(pr.broadcast_like::<_, Axis<1>>(&sh));
    let (pi, pi2) = dup(pi.broadcast_like::<_, Axis<1>>(&sh));
    let (sr, sr2) = dup(sc_re
        .reshape_like(&(ch, r * l2))
        .broadcast_like::<_, Axis<2>>(&sh));
    let (si, si2) = dup(sc_im
        .reshape_like(&(ch, r * l2))
        .broadcast_like::<_, Axis<2>>(&sh));
    let p_re = sl_re + (pr * sr - pi * si);
    let p_im = sl_im + (pr2 * si2 + pi2 * sr2);
    let back = |x: Tensor<(usize, usize, usize), E, D, T>| {
        let x = x.reshape_like(&(ch, r, l2 * c2));
        if pad > 0 {
            x.slice((.., .., pad..))
        } else {
            x
        }
    };
    (back(p_re), back(p_im), fin_re, fin_im)
}
