//! The per-op-class profile (`megalodon_core::profile`, `bench_scaling --profile`) of one
//! training step of a Tiny LM: every class the step uses gets forward and backward time, the
//! classes add up to no more than the step, and nothing is recorded while profiling is off.

use dfdx::prelude::*;
use megalodon_core::nn::model::cross_entropy;
use megalodon_core::params::alloc_grads;
use megalodon_core::presets::Tiny;
use megalodon_core::profile::{self, OpClass};
use std::time::Instant;

#[test]
fn a_profiled_step_splits_its_time_per_op_class() {
    let conf = Tiny::<f32, Cpu>::default_conf(16, 40);
    let mut m = Tiny::<f32, Cpu>::new(&Cpu::default(), conf, 1).unwrap();
    let t = 64;
    let toks: Vec<usize> = (0..t).map(|i| (i * 7 + 3) % 40).collect();
    let targets: Vec<Option<usize>> = (0..t).map(|i| Some((i * 5 + 1) % 40)).collect();
    let step = |m: &mut Tiny<f32, Cpu>| {
        let g = alloc_grads(m).unwrap();
        let t0 = Instant::now();
        let loss = cross_entropy(m.forward_train(&toks, 1, t, g).unwrap(), &targets).unwrap();
        let _ = loss.backward();
        t0.elapsed().as_secs_f64()
    };
    step(&mut m);
    profile::enable(true);
    let secs = step(&mut m);
    profile::enable(false);
    let r = profile::report();
    for c in OpClass::ALL {
        let (f, b) = (r.forward[c as usize], r.backward[c as usize]);
        println!(
            "{:>50}: forward {:.3} ms, backward {:.3} ms",
            c.name(),
            f * 1e3,
            b * 1e3
        );
        assert!(f > 0.0 && b > 0.0, "{} got no time ({f}, {b})", c.name());
    }
    let sum: f64 = r.forward.iter().chain(&r.backward).sum();
    assert!(
        sum.is_finite() && sum <= secs,
        "classes {sum} s > step {secs} s"
    );
    // off: nothing more is recorded
    step(&mut m);
    assert_eq!(profile::report(), r);
}
