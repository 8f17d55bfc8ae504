use dfdx::prelude::*;
use megalodon_core::ops::{gates, gates_cpu, norms, norms_cpu};
use std::time::Instant;
type S = (usize, usize, Const<512>);
fn time<F: FnMut()>(name: &str, mut f: F) {
    f();
    let t = Instant::now();
    for _ in 0..10 {
        f();
    }
    println!("{name}: {:.2} ms", t.elapsed().as_secs_f64() * 100.0);
}
fn main() {
    let dev = Cpu::default();
    dev.enable_cache();
    let x: Tensor<S, f32, Cpu> = dev.sample_normal_like(&(1, 4096, Const));
    let w: Tensor<Rank1<512>, f32, Cpu> = dev.sample_normal();
    let b: Tensor<Rank1<512>, f32, Cpu> = dev.sample_normal();
    let wm: Tensor<Rank2<512, 512>, f32, Cpu> = dev.sample_normal();
    let x2: Tensor<(usize, usize, Const<256>), f32, Cpu> =
        dev.sample_normal_like(&(1, 4096, Const));
    let w2: Tensor<Rank2<512, 256>, f32, Cpu> = dev.sample_normal();
    let w3: Tensor<Rank2<64, 256>, f32, Cpu> = dev.sample_normal();
    let b3: Tensor<Rank1<64>, f32, Cpu> = dev.sample_normal();
    for _ in 0..2 {
        time("lin256x512 composed fwd", || {
            let _y = gates::composed_linear(x2.clone(), &w2, Some(&b));
        });
        time("lin256x512 kernel fwd", || {
            let _y = gates_cpu::linear(x2.clone(), &w2, Some(&b)).unwrap();
        });
        time("lin256x64 composed fwd", || {
            let _y = gates::composed_linear(x2.clone(), &w3, Some(&b3));
        });
        time("lin256x64 kernel fwd", || {
            let _y = gates_cpu::linear(x2.clone(), &w3, Some(&b3)).unwrap();
        });
        time("lin256x512 composed fwd taped", || {
            let _y = gates::composed_linear(x2.leaky_trace(), &w2, Some(&b));
        });
        time("lin256x512 kernel fwd taped", || {
            let _y = gates_cpu::linear(x2.leaky_trace(), &w2, Some(&b)).unwrap();
        });
    }
    if std::env::var("ONLY").is_ok() {
        for _ in 0..50 {
            let _y = gates_cpu::silu(x.clone()).unwrap();
        }
        return;
    }
    time("silu composed fwd", || {
        let _y = gates::composed_silu(x.clone());
    });
    time("silu kernel fwd", || {
        let _y = gates_cpu::silu(x.clone()).unwrap();
    });
    time("silu composed fwd+bwd", || {
        let y = gates::composed_silu(x.leaky_trace());
        let _g = y.sum().backward();
    });
    time("silu kernel fwd+bwd", || {
        let y = gates_cpu::silu(x.leaky_trace()).unwrap();
        let _g = y.sum().backward();
    });
    time("ln composed fwd", || {
        let _y = norms::composed_layer_norm(x.clone(), &w, &b, 1e-5);
    });
    time("ln kernel fwd", || {
        let _y = norms_cpu::layer_norm(x.clone(), &w, &b, 1e-5).unwrap();
    });
    time("ln composed fwd+bwd", || {
        let y = norms::composed_layer_norm(x.leaky_trace(), &w, &b, 1e-5);
        let _g = y.sum().backward();
    });
    time("ln kernel fwd+bwd", || {
        let y = norms_cpu::layer_norm(x.leaky_trace(), &w, &b, 1e-5).unwrap();
        let _g = y.sum().backward();
    });
    time("linear composed fwd", || {
        let _y = gates::composed_linear(x.clone(), &wm, Some(&b));
    });
    time("linear kernel fwd", || {
        let _y = gates_cpu::linear(x.clone(), &wm, Some(&b)).unwrap();
    });
    time("linear composed fwd+bwd", || {
        let y = gates::composed_linear(x.leaky_trace(), &wm, Some(&b));
        let _g = y.sum().backward();
    });
    time("linear kernel fwd+bwd", || {
        let y = gates_cpu::linear(x.leaky_trace(), &wm, Some(&b)).unwrap();
        let _g = y.sum().backward();
    });
    time("copy only (vec + copy_into)", || {
        let mut v = vec![0f32; 4096 * 512];
        x.copy_into(&mut v);
        std::hint::black_box(&v);
    });
    let xv = x.as_vec();
    time("raw sigmoid loop 1 thread", || {
        let mut y = vec![0f32; xv.len()];
        for (a, &b) in y.iter_mut().zip(&xv) {
            *a = b / (1.0 + (-b).exp());
        }
        std::hint::black_box(&y);
    });
    time("raw generic sigmoid", || {
        let mut y = vec![0f32; xv.len()];
        for (a, &b) in y.iter_mut().zip(&xv) {
            *a = gen(b);
        }
        std::hint::black_box(&y);
    });
    time("vec zeros only", || {
        let v = vec![0f32; 4096 * 512];
        std::hint::black_box(&v);
    });
}
#[allow(dead_code)]
fn raw() {}

fn gen<E: megalodon_core::util::Float>(x: E) -> E {
    x / (E::one() + (-x).exp())
}
