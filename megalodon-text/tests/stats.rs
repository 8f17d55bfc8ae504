//! Unigram entropy and bits per byte.

use megalodon_text::stats::{bits_per_byte, unigram_cross_entropy, unigram_entropy};

#[test]
fn entropy_known_values() {
    assert_eq!(unigram_entropy(&[3, 3, 3], 5).unwrap(), 0.0);
    let h = unigram_entropy(&[0, 1], 2).unwrap();
    assert!((h - 2f64.ln()).abs() < 1e-12, "{h}");
    // p = (1/2, 1/4, 1/4): H = 1.5 bits.
    let h = unigram_entropy(&[0, 0, 1, 2], 3).unwrap();
    assert!((h - 1.5 * 2f64.ln()).abs() < 1e-12, "{h}");
}

#[test]
fn entropy_errors() {
    let e = format!("{:#}", unigram_entropy(&[0, 7], 4).unwrap_err());
    assert!(
        e.contains("token id 7") && e.contains("vocabulary of 4"),
        "{e}"
    );
    assert!(unigram_entropy(&[], 4).is_err());
}

#[test]
fn cross_entropy_is_at_least_entropy() {
    let train: Vec<usize> = (0..1000).map(|i| (i * i) % 7).collect();
    let h = unigram_entropy(&train, 7).unwrap();
    let ce = unigram_cross_entropy(&train, &train, 7).unwrap();
    assert!(ce >= h && ce - h < 0.01, "h {h} ce {ce}");
    // Unseen tokens are expensive but finite (add-one smoothing).
    let ce2 = unigram_cross_entropy(&train, &[5, 6, 6], 8).unwrap();
    assert!(ce2.is_finite() && ce2 > 0.0);
}

#[test]
fn bits_per_byte_converts() {
    // ln 2 nats per token, one token per byte: 1 bit per byte.
    let b = bits_per_byte(2f64.ln(), 10, 10).unwrap();
    assert!((b - 1.0).abs() < 1e-12, "{b}");
    let b = bits_per_byte(2f64.ln(), 10, 40).unwrap();
    assert!((b - 0.25).abs() < 1e-12, "{b}");
    assert!(bits_per_byte(1.0, 1, 0).is_err());
}
