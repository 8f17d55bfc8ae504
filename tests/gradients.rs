//! Gradients of every parameter (and the input) against central finite differences in f64:
//! the whole causal LM (all ops: TimestepNorm, CEMA, RoPE chunked attention over a partial last
//! chunk, norms, FFN, tied head) and the bidirectional classifier block.

use dfdx::prelude::*;
use megalodon::core::nn::bidirectional::BidirectionalBlock;
use megalodon::core::nn::model::cross_entropy;
use megalodon::core::params::alloc_grads;
use megalodon::core::presets::{Tiny, TINY_CHUNK};
use megalodon::core::{ModelConf, Params};
use rand::SeedableRng;
use std::collections::BTreeMap;

mod common;
use common::{fd_all, max_diff, Grab, Randomize};

/// Entries checked per parameter tensor (the largest-gradient one and random ones).
const FD_PER_TENSOR: usize = 8;
/// Worst relative error allowed: about 10x the measured worst (6.5e-9 for the whole model,
/// 3.7e-9 for the bidirectional block, central differences with h = 1e-5 in f64).
const FD_TOL: f64 = 6e-8;

#[test]
fn whole_model_gradients_match_finite_differences() {
    let dev: Cpu = Default::default();
    let conf = ModelConf {
        swiglu: true,
        share_emb: true,
        scale_emb: true,
        ..Tiny::<f64, Cpu>::default_conf(TINY_CHUNK, 11)
    };
    let mut m = Tiny::<f64, Cpu>::new(&dev, conf, 5).unwrap();
    m.visit_params("", &mut Randomize(rand::rngs::StdRng::seed_from_u64(5)))
        .unwrap();
    let (b, t) = (2, 19); // 2 full chunks of 8 and a partial one
    let tokens: Vec<usize> = (0..b * t).map(|i| (i * 5 + 1) % 11).collect();
    let targets: Vec<Option<usize>> = (0..b * t)
        .map(|i| if i % 4 == 3 { None } else { Some((i * 3) % 11) })
        .collect();
    let grads = alloc_grads(&mut m).unwrap();
    let l = cross_entropy(m.forward_train(&tokens, b, t, grads).unwrap(), &targets).unwrap();
    let g = l.backward();
    let mut grab = Grab(&g, BTreeMap::new());
    m.visit_params("", &mut grab).unwrap();
    let analytic = grab.1;
    assert_eq!(analytic.len(), m.param_names().len());
    let worst = fd_all(&mut m, &analytic, FD_PER_TENSOR, FD_TOL, |m| {
        cross_entropy(m.forward(&tokens, b, t).unwrap(), &targets)
            .unwrap()
            .as_vec()[0]
    });
    println!(
        "whole model: worst relative error {worst:.2e} over {} tensors",
        analytic.len()
    );
}

type Bidi = BidirectionalBlock<16, 8, 16, 2, 24, 4, 2, f64, Cpu>;

fn bidi(seed: u64) -> Bidi {
    let dev: Cpu = Default::default();
    let conf = ModelConf {
        swiglu: false,
        ..ModelConf::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut blk = Bidi::new(&dev, &mut rng, &conf, 0);
    blk.visit_params(
        "",
        &mut Randomize(rand::rngs::StdRng::seed_from_u64(seed + 1)),
    )
    .unwrap();
    blk
}

#[test]
fn bidirectional_block_gradients_match_finite_differences() {
    let dev: Cpu = Default::default();
    let mut blk = bidi(2);
    let t = 13; // one full chunk of 8 and a partial one: padded keys must be masked
    let x: Tensor<(usize, usize, Const<16>), f64, _> = dev.sample_normal_like(&(2, t, Const));
    let w: Tensor<(usize, usize, Const<16>), f64, _> = dev.sample_normal_like(&(2, t, Const));
    let out = blk.forward(x.leaky_trace(), 8, None).unwrap();
    let g = (out * w.clone()).sum().backward();
    let gx = g.get(&x).as_vec();
    let mut grab = Grab(&g, BTreeMap::new());
    blk.visit_params("", &mut grab).unwrap();
    let analytic = grab.1;
    let worst = fd_all(&mut blk, &analytic, FD_PER_TENSOR, FD_TOL, |b| {
        (b.forward(x.clone(), 8, None).unwrap() * w.clone())
            .sum::<Rank0, _>()
            .as_vec()[0]
    });
    println!("bidirectional block: worst relative error {worst:.2e}");
    // input gradient
    let xv = x.as_vec();
    let scale = gx.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    for i in [0usize, 77, 200, 2 * t * 16 - 1] {
        let f = |d: f64| {
            let mut v = xv.clone();
            v[i] += d;
            (blk.forward(dev.tensor_from_vec(v, (2, t, Const::<16>)), 8, None)
                .unwrap()
                * w.clone())
            .sum::<Rank0, _>()
            .as_vec()[0]
        };
        let fd = (f(1e-5) - f(-1e-5)) / 2e-5;
        assert!(
            (fd - gx[i]).abs() / scale < 1e-5,
            "x[{i}]: {} vs {fd}",
            gx[i]
        );
    }
}

#[test]
fn bidirectional_block_sees_the_future_and_reversal_swaps_directions() {
    let dev: Cpu = Default::default();
    let blk = bidi(4);
    let t = 16;
    let x: Tensor<(usize, usize, Const<16>), f64, _> = dev.sample_normal_like(&(1, t, Const));
    let mut xv = x.as_vec();
    let y0 = blk.forward(x.clone(), 8, None).unwrap().as_vec();
    // non-causal: changing the last step changes the first step's output
    xv[(t - 1) * 16] += 1.0;
    let y1 = blk
        .forward(dev.tensor_from_vec(xv, (1, t, Const::<16>)), 8, None)
        .unwrap()
        .as_vec();
    assert!(
        (y0[0] - y1[0]).abs() > 1e-6,
        "bidirectional block must see later steps"
    );

    // reversing the input in time swaps the roles of the two CEMA directions
    let rev = |v: &[f64]| -> Vec<f64> {
        (0..t)
            .rev()
            .flat_map(|s| v[s * 16..(s + 1) * 16].to_vec())
            .collect()
    };
    let mut swapped = bidi(4);
    std::mem::swap(&mut swapped.cema, &mut swapped.cema_rev);
    let e = blk.bidirectional_ema(x.clone()).unwrap().as_vec();
    let xr = dev.tensor_from_vec(rev(&x.as_vec()), (1, t, Const::<16>));
    let er = rev(&swapped.bidirectional_ema(xr).unwrap().as_vec());
    let d = max_diff(&e, &er);
    assert!(
        d < 1e-10,
        "reversed input with swapped directions differs by {d}"
    );
}
