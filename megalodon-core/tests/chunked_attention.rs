//! Chunked attention (RoPE restarting per chunk, causal or full masking, padded last chunk, row
//! lengths) against a direct host computation written from the definition in
//! `docs/design.md`: an independent value check of what the causal and bidirectional blocks use.

use dfdx::prelude::*;
use megalodon_core::golden::max_abs_diff;
use megalodon_core::nn::chunked_attention::{chunked_attention, Masking};
use megalodon_core::nn::rope::Rope;
use rand::{Rng, SeedableRng};

const DZ: usize = 4;
const DV: usize = 3;

fn rotate(x: &[f64], pos: usize, rope: &Rope) -> Vec<f64> {
    let mut out = x.to_vec();
    for (j, &f) in rope.freqs.iter().enumerate() {
        let ang = (pos as f32 * f) as f64;
        let (s, c) = ang.sin_cos();
        out[2 * j] = x[2 * j] * c - x[2 * j + 1] * s;
        out[2 * j + 1] = x[2 * j + 1] * c + x[2 * j] * s;
    }
    out
}

/// Output `(B, T, H, DV)` at the real steps; `None` elsewhere.
#[allow(clippy::too_many_arguments)]
fn naive<const H: usize>(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    b: usize,
    t: usize,
    chunk: usize,
    causal: bool,
    lengths: Option<&[usize]>,
) -> Vec<Option<f64>> {
    let rope = Rope::new(DZ, 10000.0);
    let at = |x: &[f64], r: usize, i: usize, h: usize, d: usize| -> Vec<f64> {
        let o = ((r * t + i) * H + h) * d;
        x[o..o + d].to_vec()
    };
    let mut out = vec![None; b * t * H * DV];
    for r in 0..b {
        let len = lengths.map_or(t, |l| l[r]);
        for h in 0..H {
            for i in 0..len {
                let qi = rotate(&at(q, r, i, h, DZ), i % chunk, &rope);
                let start = i / chunk * chunk;
                let keys: Vec<usize> = (start..(start + chunk).min(len))
                    .filter(|&j| !causal || j <= i)
                    .collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let kj = rotate(&at(k, r, j, h, DZ), j % chunk, &rope);
                        qi.iter().zip(&kj).map(|(a, b)| a * b).sum()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..DV {
                    let o: f64 = keys
                        .iter()
                        .zip(&e)
                        .map(|(&j, w)| w / z * at(v, r, j, h, DV)[d])
                        .sum();
                    out[((r * t + i) * H + h) * DV + d] = Some(o);
                }
            }
        }
    }
    out
}

fn check<const H: usize>(
    b: usize,
    t: usize,
    chunk: usize,
    causal: bool,
    lengths: Option<&[usize]>,
) {
    let dev: Cpu = Default::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64((b * 100 + t) as u64);
    let mut r = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.gen_range(-1.5..1.5)).collect() };
    let (qv, kv, vv) = (r(b * t * H * DZ), r(b * t * H * DZ), r(b * t * H * DV));
    let q = dev.tensor_from_vec(qv.clone(), (b, t, Const::<H>, DZ));
    let k = dev.tensor_from_vec(kv.clone(), (b, t, Const::<H>, DZ));
    let v = dev.tensor_from_vec(vv.clone(), (b, t, Const::<H>, DV));
    let masking = if causal {
        Masking::Causal
    } else {
        Masking::Full(lengths)
    };
    let rope = Rope::new(DZ, 10000.0);
    let (a, _) = chunked_attention(q, k, v, None, chunk, &rope, masking).unwrap();
    let got = a.as_vec();
    let want = naive::<H>(&qv, &kv, &vv, b, t, chunk, causal, lengths);
    let (g, w): (Vec<f64>, Vec<f64>) = got
        .iter()
        .zip(&want)
        .filter_map(|(g, w)| w.map(|w| (*g, w)))
        .unzip();
    assert!(g.len() > b * H * DV, "too few real steps compared");
    let d = max_abs_diff(&g, &w);
    // f64 throughout: measured ~1e-15
    assert!(
        d < 1e-12,
        "b {b} t {t} chunk {chunk} causal {causal} lengths {lengths:?}: differs by {d}"
    );
}

#[test]
fn full_attention_with_a_partial_last_chunk() {
    check::<2>(2, 13, 8, false, None);
}

#[test]
fn full_attention_with_row_lengths() {
    check::<2>(2, 20, 8, false, Some(&[13, 20]));
    check::<2>(3, 5, 8, false, Some(&[3, 5, 1])); // one partial chunk only
    check::<2>(2, 24, 8, false, Some(&[16, 9])); // a chunk with no real key at all
}

#[test]
fn causal_attention_with_a_partial_last_chunk() {
    check::<2>(2, 13, 8, true, None);
    check::<2>(1, 24, 8, true, None);
}

/// One head takes reshapes instead of permutes around the attention kernel.
#[test]
fn one_head_causal_and_full() {
    check::<1>(2, 24, 8, true, None); // whole chunks from the start: no output slice
    check::<1>(2, 13, 8, true, None);
    check::<1>(2, 20, 8, false, Some(&[13, 20]));
}
