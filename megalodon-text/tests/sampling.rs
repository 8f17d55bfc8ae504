//! Sampling: seeded draws reproduce; top-k / top-p never return an excluded token.

use megalodon_text::{Sampler, Sampling};

/// Deterministic pseudo-random logits in [-4, 4).
fn logits(n: usize, salt: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let z = (i ^ salt)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(17);
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect()
}

fn conf(top_k: Option<usize>, top_p: f32, seed: u64) -> Sampling {
    Sampling {
        temperature: 1.0,
        top_k,
        top_p,
        seed,
    }
}

#[test]
fn same_seed_same_draws_other_seed_other_draws() {
    let l = logits(200, 1);
    let draw = |seed| {
        let mut s = Sampler::new(&conf(None, 1.0, seed)).unwrap();
        (0..50).map(|_| s.sample(&l).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(draw(3), draw(3));
    assert_ne!(draw(3), draw(4));
}

#[test]
fn top_k_never_picks_outside_the_k_most_likely() {
    for salt in 0..20 {
        let l = logits(100, salt);
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        let k = 1 + (salt as usize % 7);
        let allowed = &order[..k];
        let mut s = Sampler::new(&conf(Some(k), 1.0, salt)).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let id = s.sample(&l).unwrap();
            assert!(
                allowed.contains(&id),
                "top-{k} picked {id}, not in {allowed:?}"
            );
            seen.insert(id);
        }
        // it does sample (not only the argmax) when k > 1
        assert!(k == 1 || seen.len() > 1);
    }
}

#[test]
fn top_p_never_picks_outside_the_nucleus() {
    for salt in 0..20 {
        let l = logits(60, salt + 100);
        let top_p = 0.3 + 0.03 * salt as f32;
        // the nucleus, computed independently: softmax, sort, smallest prefix reaching top_p
        let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = l.iter().map(|&x| f64::from(x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        let mut nucleus = Vec::new();
        let mut cum = 0.0;
        for &i in &order {
            nucleus.push(i);
            cum += e[i] / z;
            if cum >= f64::from(top_p) {
                break;
            }
        }
        assert!(nucleus.len() < l.len());
        let mut s = Sampler::new(&conf(None, top_p, salt)).unwrap();
        for _ in 0..300 {
            let id = s.sample(&l).unwrap();
            assert!(
                nucleus.contains(&id),
                "top-p {top_p} picked {id}, not in {nucleus:?}"
            );
        }
    }
}

#[test]
fn greedy_and_bad_settings() {
    let l = logits(50, 7);
    let argmax = (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
    let mut s = Sampler::new(&Sampling {
        temperature: 0.0,
        ..conf(None, 1.0, 0)
    })
    .unwrap();
    assert_eq!(s.sample(&l).unwrap(), argmax);
    let e = Sampler::new(&conf(Some(0), 1.0, 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--top-k"));
    let e = Sampler::new(&conf(None, 1.5, 0)).unwrap_err().to_string();
    assert!(e.contains("--top-p"));
    let e = Sampler::new(&Sampling {
        temperature: f32::NAN,
        ..conf(None, 1.0, 0)
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("--temperature"));
    let mut s = Sampler::new(&conf(None, 1.0, 0)).unwrap();
    assert!(s.sample(&[0.0, f32::NAN]).is_err());
}
