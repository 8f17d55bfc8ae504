//! Presets: the official shapes' parameter counts (spec section 8), checked without allocating,
//! and the counting formula checked against built models.

use dfdx::prelude::*;
use megalodon::core::nn::model::param_count;
use megalodon::core::presets::{official, Mega1_3B, Mega200M, Mega7B, Small, Tiny, TINY_CHUNK};
use megalodon::core::Params;

#[test]
fn official_parameter_counts_match_the_spec() {
    // spec section 8: 200M -> 0.221 B; 1.3B -> 1.343 B; 1.3B_pg19 -> 1.328 B; 7.1B -> 7.117 B; 7.3B -> 7.386 B
    for (name, billions) in [
        ("mega200M", 0.221),
        ("mega1.3B", 1.343),
        ("mega1.3B_pg19", 1.328),
        ("mega7.1B", 7.117),
        ("mega7.3B", 7.386),
    ] {
        let n = param_count(&official(name).unwrap()) as f64 / 1e9;
        assert!(
            (n - billions).abs() < 0.0005,
            "{name}: {n:.4} B, spec says {billions} B"
        );
    }
}

#[test]
fn preset_types_have_the_official_shapes() {
    assert_eq!(
        Mega200M::<f32, Cpu>::DIMS,
        official("mega200M").unwrap().dims()
    );
    assert_eq!(
        Mega1_3B::<f32, Cpu>::DIMS,
        official("mega1.3B").unwrap().dims()
    );
    assert_eq!(
        Mega7B::<f32, Cpu>::DIMS,
        official("mega7.1B").unwrap().dims()
    );
    // counts from the type's own dims (nothing allocated)
    let c = Mega7B::<f32, Cpu>::default_conf(2048, 32000);
    assert!((param_count(&c) as f64 / 1e9 - 7.117).abs() < 0.0005);
}

#[test]
fn formula_equals_built_models() {
    let dev: Cpu = Default::default();
    let conf = Tiny::<f32, Cpu>::default_conf(TINY_CHUNK, 50);
    let mut m = Tiny::<f32, Cpu>::new(&dev, conf.clone(), 0).unwrap();
    assert_eq!(m.num_params(), param_count(&conf));
    let tied = megalodon::core::ModelConf {
        swiglu: true,
        share_emb: true,
        scale_emb: true,
        rescale_nffn: true,
        ..conf
    };
    let mut m = Tiny::<f32, Cpu>::new(&dev, tied.clone(), 0).unwrap();
    assert_eq!(m.num_params(), param_count(&tied));
    let conf = Small::<f32, Cpu>::default_conf(256, 256);
    let mut m = Small::<f32, Cpu>::new(&dev, conf.clone(), 0).unwrap();
    assert_eq!(m.num_params(), param_count(&conf));
}

#[test]
fn config_and_type_mismatch_is_an_error() {
    let dev: Cpu = Default::default();
    let mut conf = Tiny::<f32, Cpu>::default_conf(TINY_CHUNK, 50);
    conf.norm_num_groups = 8;
    let err = Tiny::<f32, Cpu>::new(&dev, conf, 0)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("norm_num_groups") && err.contains('4') && err.contains('8'),
        "{err}"
    );
    let mut conf = Tiny::<f32, Cpu>::default_conf(TINY_CHUNK, 50);
    conf.dropout = 0.1;
    assert!(
        Tiny::<f32, Cpu>::new(&dev, conf, 0).is_err(),
        "dropout is not implemented and must be refused"
    );
}

#[test]
fn bad_tokens_are_errors_not_panics() {
    let dev: Cpu = Default::default();
    let m = Tiny::<f32, Cpu>::new(&dev, Tiny::<f32, Cpu>::default_conf(TINY_CHUNK, 50), 0).unwrap();
    let err = m
        .forward(&[1, 2, 50], 1, 3)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("50") && err.contains("vocabulary"), "{err}");
    assert!(m.forward(&[1, 2], 1, 3).is_err());
    assert!(m.forward(&[], 1, 0).is_err());
}
