//! TimestepNorm against the official golden vectors (`tests/fixtures/timestep_norm.json`),
//! and split-call equivalence over several cumulative-sum blocks.

use dfdx::prelude::*;
use megalodon_core::golden::{max_abs_diff, Golden};
use megalodon_core::nn::timestep_norm::{NormState, TimestepNorm};
use megalodon_core::util::to_f64;

fn fixture() -> Golden {
    Golden::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/timestep_norm.json"
    ))
    .unwrap()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    max_abs_diff(a, b) / scale
}

fn run_case(case: &str, with_state: bool, with_mask: bool, state_loss: bool) {
    let g = fixture();
    let dev: Cpu = Default::default();
    let (b, t) = (2usize, 20usize);
    let mut tn = TimestepNorm::<8, 2, f32, Cpu>::new(&dev, 1e-5);
    tn.weight = g
        .tensor(&["params", "weight"])
        .unwrap()
        .to_dev(&dev, Rank1::<8>::default())
        .unwrap();
    tn.bias = g
        .tensor(&["params", "bias"])
        .unwrap()
        .to_dev(&dev, Rank1::<8>::default())
        .unwrap();
    let x: Tensor<(usize, usize, Const<8>), f32, _> = g
        .tensor(&["x"])
        .unwrap()
        .to_dev(&dev, (b, t, Const))
        .unwrap();
    let gy: Tensor<(usize, usize, Const<8>), f32, _> = g
        .tensor(&["g"])
        .unwrap()
        .to_dev(&dev, (b, t, Const))
        .unwrap();
    let mean0: Tensor<(usize, Const<2>), f32, _> = g
        .tensor(&["prev_mean"])
        .unwrap()
        .to_dev(&dev, (b, Const))
        .unwrap();
    let var0: Tensor<(usize, Const<2>), f32, _> = g
        .tensor(&["prev_var"])
        .unwrap()
        .to_dev(&dev, (b, Const))
        .unwrap();
    let count0: Vec<usize> = g
        .tensor(&["prev_count"])
        .unwrap()
        .data
        .iter()
        .map(|&v| v as usize)
        .collect();
    let mask: Vec<bool> = g
        .tensor(&["padding_mask"])
        .unwrap()
        .data
        .iter()
        .map(|&v| v != 0.0)
        .collect();

    let xt = x.leaky_trace();
    let state = with_state.then(|| NormState {
        count: count0.clone(),
        mean: mean0.retaped::<OwnedTape<f32, Cpu>>(),
        var: var0.retaped(),
    });
    let (y, st) = tn
        .try_forward(xt, state, with_mask.then_some(&mask[..]))
        .unwrap();
    let yv = to_f64(&y);
    let exp_y = g.tensor(&["cases", case, "y"]).unwrap().data;
    let dy = max_abs_diff(&yv, &exp_y);
    assert!(dy < 1e-5, "{case}: y max diff {dy}");
    let exp_count: Vec<usize> = g
        .tensor(&["cases", case, "count"])
        .unwrap()
        .data
        .iter()
        .map(|&v| v as usize)
        .collect();
    assert_eq!(st.count, exp_count, "{case}: count");
    let dm = max_abs_diff(
        &to_f64(&st.mean),
        &g.tensor(&["cases", case, "mean"]).unwrap().data,
    );
    let dv = max_abs_diff(
        &to_f64(&st.var),
        &g.tensor(&["cases", case, "var"]).unwrap().data,
    );
    assert!(
        dm < 1e-5 && dv < 1e-5,
        "{case}: state diffs mean {dm} var {dv}"
    );

    let mut loss = (y * gy).sum();
    if state_loss {
        let gm: Tensor<(usize, Const<2>), f32, _> =
            g.tensor(&["gm"]).unwrap().to_dev(&dev, (b, Const)).unwrap();
        let gv: Tensor<(usize, Const<2>), f32, _> =
            g.tensor(&["gv"]).unwrap().to_dev(&dev, (b, Const)).unwrap();
        loss = loss + (st.mean * gm).sum() + (st.var * gv).sum();
    }
    let grads = loss.backward();
    let mut checks: Vec<(&str, Vec<f64>)> = vec![
        ("x", to_f64(&grads.get(&x))),
        ("weight", to_f64(&grads.get(&tn.weight))),
        ("bias", to_f64(&grads.get(&tn.bias))),
    ];
    if with_state {
        checks.push(("prev_mean", to_f64(&grads.get(&mean0))));
        checks.push(("prev_var", to_f64(&grads.get(&var0))));
    }
    for (name, got) in checks {
        let exp = g.tensor(&["cases", case, "grads", name]).unwrap().data;
        let e = rel_err(&got, &exp);
        assert!(e < 1e-4, "{case}: grad {name} relative error {e}");
    }
}

#[test]
fn golden_no_state() {
    run_case("no_state", false, false, false);
}

#[test]
fn golden_with_state() {
    run_case("with_state", true, false, false);
}

#[test]
fn golden_with_state_and_state_loss() {
    run_case("with_state_and_state_loss", true, false, true);
}

#[test]
fn golden_padding_mask() {
    run_case("padding_mask", false, true, false);
}

#[test]
fn golden_padding_mask_with_state() {
    run_case("padding_mask_with_state", true, true, false);
}

fn take_steps(v: &[f64], b: usize, t: usize, from: usize, to: usize) -> Vec<f64> {
    megalodon_core::util::time_slice(v, b, t, 8, from, to)
}

#[test]
fn long_sequence_split_equals_one_call() {
    // T spans several cumulative-sum blocks; two calls with carried state equal one call.
    let dev: Cpu = Default::default();
    let mut tn = TimestepNorm::<8, 2, f64, Cpu>::new(&dev, 1e-5);
    tn.weight = dev.sample_normal();
    let t = 150;
    let x: Tensor<(usize, usize, Const<8>), f64, _> = dev.sample_normal_like(&(2, t, Const));
    let (y_full, s_full) = tn.try_forward(x.clone(), None, None).unwrap();
    let xv = x.as_vec();
    let split = 67;
    let x1 = dev.tensor_from_vec(take_steps(&xv, 2, t, 0, split), (2, split, Const::<8>));
    let x2 = dev.tensor_from_vec(take_steps(&xv, 2, t, split, t), (2, t - split, Const::<8>));
    let (y1, s1) = tn.try_forward(x1, None, None).unwrap();
    let (y2, s2) = tn.try_forward(x2, Some(s1), None).unwrap();
    let yf = y_full.as_vec();
    assert!(max_abs_diff(&y1.as_vec(), &take_steps(&yf, 2, t, 0, split)) < 1e-10);
    assert!(max_abs_diff(&y2.as_vec(), &take_steps(&yf, 2, t, split, t)) < 1e-10);
    assert_eq!(s2.count, s_full.count);
    assert!(max_abs_diff(&s2.var.as_vec(), &s_full.var.as_vec()) < 1e-10);
    assert!(max_abs_diff(&s2.mean.as_vec(), &s_full.mean.as_vec()) < 1e-10);
}

#[test]
fn wrong_mask_length_is_an_error() {
    let dev: Cpu = Default::default();
    let tn = TimestepNorm::<8, 2, f64, Cpu>::new(&dev, 1e-5);
    let sn = megalodon_core::nn::timestep_norm::SequenceNorm::<8, 2, f64, Cpu>::new(&dev, 1e-5);
    let x: Tensor<(usize, usize, Const<8>), f64, _> = dev.sample_normal_like(&(2, 5, Const));
    let short = vec![false; 9];
    let e = tn
        .try_forward(x.clone(), None, Some(&short))
        .err()
        .expect("must fail")
        .to_string();
    assert!(e.contains("10") && e.contains('9'), "{e}");
    assert!(sn.try_forward(x, Some(&short)).is_err());
}

#[test]
fn sequence_norm_matches_a_direct_computation() {
    // non-causal group norm over all real steps of each row, padded steps output 0
    let dev: Cpu = Default::default();
    let mut sn = megalodon_core::nn::timestep_norm::SequenceNorm::<8, 2, f64, Cpu>::new(&dev, 1e-5);
    sn.weight = dev.sample_normal();
    sn.bias = dev.sample_normal();
    let (b, t) = (2, 7);
    let x: Tensor<(usize, usize, Const<8>), f64, _> = dev.sample_normal_like(&(b, t, Const));
    let pad: Vec<bool> = (0..b * t).map(|i| i == 3 || i >= 12).collect();
    let y = sn.try_forward(x.clone(), Some(&pad)).unwrap().as_vec();
    let (xv, w, bias) = (x.as_vec(), sn.weight.as_vec(), sn.bias.as_vec());
    for bi in 0..b {
        for g in 0..2 {
            let vals: Vec<f64> = (0..t)
                .filter(|&ti| !pad[bi * t + ti])
                .flat_map(|ti| (0..4).map(move |f| (ti, f)))
                .map(|(ti, f)| xv[(bi * t + ti) * 8 + g * 4 + f])
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            for ti in 0..t {
                for f in 0..4 {
                    let i = (bi * t + ti) * 8 + g * 4 + f;
                    let want = if pad[bi * t + ti] {
                        0.0
                    } else {
                        (xv[i] - mean) / (var + 1e-5).sqrt() * (1.0 + w[g * 4 + f])
                            + bias[g * 4 + f]
                    };
                    assert!(
                        (y[i] - want).abs() < 1e-9,
                        "b{bi} t{ti} f{}: {} vs {want}",
                        g * 4 + f,
                        y[i]
                    );
                }
            }
        }
    }
}
