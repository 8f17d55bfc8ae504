//! Transforms: crops, resizing, flips, normalisation, layouts and errors.

use std::path::Path;

use megalodon_vision::rng::SplitMix64;
use megalodon_vision::transforms::{
    center_crop, random_resized_crop_box, resize_shorter, to_tensor, IMAGENET_MEAN, IMAGENET_STD,
};
use megalodon_vision::{Augment, ColorMode, Layout, Normalize, Transform};

use crate::common::*;

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol // false for NaN
}

/// Pixel value coding its position: distinct for x, y < 16 and each channel.
fn coded(x: u32, y: u32) -> [u8; 3] {
    [
        (x * 16 + y) as u8,
        (255 - x * 16 - y) as u8,
        (x + y * 16) as u8,
    ]
}

#[test]
fn eval_center_crop_takes_the_middle() {
    // 8x4 image, shorter side already 4: no resize, center crop 4x4 starts at x = 2.
    let img = rgb(8, 4, coded);
    let t = Transform::eval(4).with_normalize(Normalize::unit());
    let out = t.apply(&img, Path::new("mem"), 0).unwrap();
    assert_eq!(out.len(), 4 * 4 * 3);
    for y in 0..4u32 {
        for x in 0..4u32 {
            let want = coded(x + 2, y);
            for c in 0..3 {
                let got = out[((y * 4 + x) * 3) as usize + c];
                assert!(
                    close(got, want[c] as f32 / 255.0, 1e-6),
                    "({x},{y},{c}) {got}"
                );
            }
        }
    }
    // Tall image: the crop is vertical.
    let c = center_crop(&rgb(3, 9, coded), 3, 3).unwrap();
    assert_eq!(c.get_pixel(0, 0).0, coded(0, 3));
    assert!(center_crop(&rgb(3, 2, coded), 3, 3).is_err());
}

#[test]
fn eval_resizes_the_shorter_side() {
    let img = rgb(40, 20, |x, _| [x as u8 * 6, 0, 0]);
    assert_eq!(resize_shorter(&img, 10).dimensions(), (20, 10));
    assert_eq!(resize_shorter(&rgb(9, 30, coded), 6).dimensions(), (6, 20));
    let same = resize_shorter(&img, 20);
    assert_eq!(same, img);
    let t = Transform::eval_resize(8, 10);
    let out = t.apply(&img, Path::new("mem"), 0).unwrap();
    assert_eq!(out.len(), 8 * 8 * 3);
    assert!(out.iter().all(|v| v.is_finite()));
    // A flat image stays flat through resizing: every value is the normalized colour.
    let flat = rgb(33, 17, |_, _| [100, 150, 200]);
    let out = Transform::eval_resize(12, 14)
        .with_normalize(Normalize::unit())
        .apply(&flat, Path::new("mem"), 0)
        .unwrap();
    for (i, v) in out.iter().enumerate() {
        let want = [100.0, 150.0, 200.0][i % 3] / 255.0;
        assert!(close(*v, want, 1.0 / 255.0), "{i}: {v} vs {want}");
    }
}

#[test]
fn train_flip_mirrors_and_is_seeded() {
    let s = 6u32;
    let img = rgb(s, s, coded);
    // Scale 1 and ratio 1 on a square image: the crop is the whole image, only the flip varies.
    let t = Transform {
        augment: Augment::Train {
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
            flip: true,
        },
        ..Transform::train(s)
    }
    .with_normalize(Normalize::unit());
    let plain = Transform::eval(s)
        .with_normalize(Normalize::unit())
        .apply(&img, Path::new("mem"), 0)
        .unwrap();
    let idx = |x: u32, y: u32, c: u32| ((y * s + x) * 3 + c) as usize;
    let (mut flipped, mut kept) = (0, 0);
    for seed in 0..64 {
        let out = t.apply(&img, Path::new("mem"), seed).unwrap();
        assert_eq!(
            out,
            t.apply(&img, Path::new("mem"), seed).unwrap(),
            "seeded"
        );
        if out == plain {
            kept += 1;
        } else {
            for y in 0..s {
                for x in 0..s {
                    for c in 0..3 {
                        assert_eq!(out[idx(x, y, c)], plain[idx(s - 1 - x, y, c)]);
                    }
                }
            }
            flipped += 1;
        }
    }
    assert!(flipped > 10 && kept > 10, "flipped {flipped}, kept {kept}");
}

#[test]
fn random_resized_crop_box_stays_inside_and_in_range() {
    let mut rng = SplitMix64::new(3);
    let (mut small, mut large) = (false, false);
    for i in 0..500u32 {
        let (w, h) = (1 + (i * 37) % 300, 1 + (i * 91) % 200);
        let (x, y, cw, ch) =
            random_resized_crop_box(w, h, (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0), &mut rng);
        assert!(
            cw >= 1 && ch >= 1 && x + cw <= w && y + ch <= h,
            "{w}x{h}: {x},{y},{cw},{ch}"
        );
        if w >= 50 && h >= 50 {
            let frac = (cw * ch) as f64 / (w * h) as f64;
            assert!((0.07..=1.0 + 1e-9).contains(&frac), "{frac}");
            small |= frac < 0.3;
            large |= frac > 0.7;
        }
    }
    assert!(
        small && large,
        "crop areas should spread over the scale range"
    );
    // A very wide image falls back to a center crop at the largest allowed ratio.
    let b = random_resized_crop_box(1000, 10, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
    assert_eq!(b, (493, 0, 13, 10));
    // Same seed, same output of a full train transform; another seed, another one.
    let img = rgb(40, 30, |x, y| {
        [(x * 6) as u8, (y * 8) as u8, ((x * y) % 256) as u8]
    });
    let t = Transform::train(16);
    let a = t.apply(&img, Path::new("mem"), 11).unwrap();
    assert_eq!(a, t.apply(&img, Path::new("mem"), 11).unwrap());
    assert_ne!(a, t.apply(&img, Path::new("mem"), 12).unwrap());
    assert_eq!(a.len(), 16 * 16 * 3);
}

#[test]
fn normalisation_values() {
    let img = rgb(2, 2, |_, _| [255, 0, 128]);
    let out = to_tensor(&img, &Normalize::imagenet(), ColorMode::Rgb, Layout::Hwc).unwrap();
    let want = [
        (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
        (0.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
        (128.0 / 255.0 - IMAGENET_MEAN[2]) / IMAGENET_STD[2],
    ];
    // Hand-computed: (1-0.485)/0.229 = 2.2489, -0.456/0.224 = -2.0357, (0.50196-0.406)/0.225 = 0.4265.
    assert!(close(want[0], 2.2489, 1e-4) && close(want[1], -2.0357, 1e-4));
    assert!(close(want[2], 0.4265, 1e-4));
    for (i, v) in out.iter().enumerate() {
        assert!(close(*v, want[i % 3], 1e-5), "{i}: {v}");
    }
    assert_eq!(Normalize::default(), Normalize::imagenet());

    // Gray Fashion-MNIST normalisation on a gray image: one channel.
    let g = rgb(3, 1, |x, _| [(x * 100) as u8; 3]);
    let out = to_tensor(
        &g,
        &Normalize::fashion_mnist(),
        ColorMode::Gray,
        Layout::Hwc,
    )
    .unwrap();
    assert_eq!(out.len(), 3);
    for (x, v) in out.iter().enumerate() {
        let want = ((x * 100) as f32 / 255.0 - 0.2860) / 0.3530;
        assert!(close(*v, want, 1e-5), "{x}: {v} vs {want}");
    }
    // Luma of a coloured pixel.
    let c = rgb(1, 1, |_, _| [255, 0, 0]);
    let out = to_tensor(&c, &Normalize::unit(), ColorMode::Gray, Layout::Hwc).unwrap();
    assert!(close(out[0], 0.299, 1e-5), "{}", out[0]);
    // Custom per-channel values.
    let n = Normalize::new(&[0.5, 0.5, 0.5], &[0.5, 0.25, 2.0]).unwrap();
    let out = to_tensor(
        &rgb(1, 1, |_, _| [255, 255, 0]),
        &n,
        ColorMode::Rgb,
        Layout::Hwc,
    )
    .unwrap();
    assert!(close(out[0], 1.0, 1e-6) && close(out[1], 2.0, 1e-6) && close(out[2], -0.25, 1e-6));

    assert!(Normalize::new(&[0.5], &[0.0]).is_err());
    assert!(Normalize::new(&[0.5, 0.5], &[1.0, 1.0]).is_err());
    assert!(Normalize::new(&[0.5, 0.5, 0.5], &[1.0]).is_err());
    assert!(Normalize::new(&[f32::NAN], &[1.0]).is_err());
    // Three means for one gray channel is an error.
    assert!(to_tensor(&c, &Normalize::imagenet(), ColorMode::Gray, Layout::Hwc).is_err());
}

#[test]
fn hwc_and_chw_layouts() {
    let img = rgb(3, 2, coded);
    let n = Normalize::unit();
    let hwc = to_tensor(&img, &n, ColorMode::Rgb, Layout::Hwc).unwrap();
    let chw = to_tensor(&img, &n, ColorMode::Rgb, Layout::Chw).unwrap();
    let mut sorted_hwc = hwc.clone();
    let mut sorted_chw = chw.clone();
    sorted_hwc.sort_by(f32::total_cmp);
    sorted_chw.sort_by(f32::total_cmp);
    assert_eq!(sorted_hwc, sorted_chw, "same values, another order");
    for y in 0..2usize {
        for x in 0..3usize {
            for c in 0..3usize {
                let want = coded(x as u32, y as u32)[c] as f32 / 255.0;
                assert!(close(hwc[(y * 3 + x) * 3 + c], want, 1e-6));
                assert!(close(chw[(c * 2 + y) * 3 + x], want, 1e-6));
            }
        }
    }
}

#[test]
fn image_smaller_than_a_patch_names_the_file() {
    let t = Transform::eval(16).with_min_side(8);
    let e = t
        .apply(&rgb(5, 20, coded), Path::new("data/cls/tiny.png"), 0)
        .unwrap_err();
    assert!(
        err_has(&e, "data/cls/tiny.png") && err_has(&e, "5x20") && err_has(&e, "8x8 patch"),
        "{e:#}"
    );
    // Exactly one patch is fine (upscaled to the output size).
    assert_eq!(
        t.apply(&rgb(8, 8, coded), Path::new("ok"), 0)
            .unwrap()
            .len(),
        16 * 16 * 3
    );
}

#[test]
fn invalid_settings_are_errors() {
    let img = rgb(8, 8, coded);
    let p = Path::new("mem");
    assert!(Transform::eval_resize(8, 6).apply(&img, p, 0).is_err());
    assert!(Transform::eval(0).apply(&img, p, 0).is_err());
    for (scale, ratio) in [
        ((0.0, 1.0), (0.5, 2.0)),
        ((0.5, 0.2), (0.5, 2.0)),
        ((0.1, 1.5), (0.5, 2.0)),
        ((0.1, 1.0), (2.0, 0.5)),
    ] {
        let t = Transform {
            augment: Augment::Train {
                scale,
                ratio,
                flip: false,
            },
            ..Transform::train(8)
        };
        assert!(t.validate().is_err(), "{scale:?} {ratio:?}");
    }
    assert!(Transform::train(8).validate().is_ok());
    assert_eq!(
        Transform::train(8).with_color(ColorMode::Gray).channels(),
        1
    );
}
