//! Activation recomputation (`Backbone::recompute`) gives the gradients of the plain path: every
//! parameter's gradient of a Tiny LM over several chunks, batch 2, within 1e-5 of the largest,
//! with every layer's attention unit and FFN recomputed in backward.

use dfdx::prelude::*;
use megalodon_core::nn::model::cross_entropy;
use megalodon_core::nn::recompute::RECOMPUTED;
use megalodon_core::params::{alloc_grads, ParamVisitor, Params};
use megalodon_core::presets::Tiny;
use rand::{Rng, SeedableRng};
use std::sync::atomic::Ordering;

struct Collect<'a>(&'a Gradients<f32, Cpu>, Vec<(String, Vec<f32>)>);
impl ParamVisitor<f32, Cpu> for Collect<'_> {
    fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, f32, Cpu>) -> anyhow::Result<()> {
        self.1.push((name.to_string(), self.0.get(&*t).as_vec()));
        Ok(())
    }
}

fn grads(
    m: &mut Tiny<f32, Cpu>,
    toks: &[usize],
    targets: &[Option<usize>],
    b: usize,
    t: usize,
) -> (f32, Vec<(String, Vec<f32>)>) {
    let g = alloc_grads(m).unwrap();
    let loss = cross_entropy(m.forward_train(toks, b, t, g).unwrap(), targets).unwrap();
    let l = loss.array();
    let g = loss.backward();
    let mut c = Collect(&g, Vec::new());
    m.visit_params("", &mut c).unwrap();
    (l, c.1)
}

#[test]
fn recomputed_layers_give_the_plain_gradients() {
    let conf = Tiny::<f32, Cpu>::default_conf(16, 50);
    let mut m = Tiny::<f32, Cpu>::new(&Cpu::default(), conf, 3).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (b, t) = (2, 70);
    let toks: Vec<usize> = (0..b * t).map(|_| rng.gen_range(0..50)).collect();
    let targets: Vec<Option<usize>> = (0..b * t).map(|_| Some(rng.gen_range(0..50))).collect();
    let (l0, g0) = grads(&mut m, &toks, &targets, b, t);
    m.backbone.recompute = true;
    let before = RECOMPUTED.load(Ordering::Relaxed);
    let (l1, g1) = grads(&mut m, &toks, &targets, b, t);
    // the attention unit and the FFN of every layer were recomputed
    let layers = m.backbone.layers.len() as u64;
    assert_eq!(RECOMPUTED.load(Ordering::Relaxed) - before, 2 * layers);
    assert_eq!(l0, l1, "the forward pass must not change");
    let scale = g0
        .iter()
        .flat_map(|(_, v)| v.iter())
        .fold(0f32, |a, &x| a.max(x.abs()));
    assert!(scale > 0.0 && scale.is_finite());
    let mut worst = (0f32, String::new());
    for ((n0, a), (n1, c)) in g0.iter().zip(&g1) {
        assert_eq!(n0, n1);
        for (x, y) in a.iter().zip(c) {
            let d = (x - y).abs();
            // NaN is the worst match
            let d = if d.is_nan() { f32::INFINITY } else { d };
            if d > worst.0 {
                worst = (d, n0.clone());
            }
        }
    }
    println!(
        "{} parameters; worst |diff| {:.2e} ({}) of max |grad| {scale:.3e}",
        g0.len(),
        worst.0,
        worst.1
    );
    assert!(
        worst.0 <= 1e-5 * scale,
        "recomputed gradient of {} differs by {}",
        worst.1,
        worst.0
    );
}
