//! Patch extraction order, inverse and errors.

use megalodon_vision::{num_patches, patch_dim, patchify, patchify_const, unpatchify};

/// A 4x4x2 HWC image whose value at (y, x, c) is 100y + 10x + c.
fn coded_image() -> Vec<f32> {
    let mut img = Vec::new();
    for y in 0..4 {
        for x in 0..4 {
            for c in 0..2 {
                img.push((100 * y + 10 * x + c) as f32);
            }
        }
    }
    img
}

#[test]
fn patchify_raster_order_by_hand() {
    let p = patchify(&coded_image(), 4, 2, 2).unwrap();
    // Patches in raster order: top-left, top-right, bottom-left, bottom-right; inside a patch,
    // rows then columns then channels.
    #[rustfmt::skip]
    let want: Vec<f32> = [
        0, 1, 10, 11, 100, 101, 110, 111,
        20, 21, 30, 31, 120, 121, 130, 131,
        200, 201, 210, 211, 300, 301, 310, 311,
        220, 221, 230, 231, 320, 321, 330, 331,
    ]
    .iter()
    .map(|&v| v as f32)
    .collect();
    assert_eq!(p, want);
    assert_eq!(patchify_const::<2, 2>(&coded_image(), 4).unwrap(), want);
    // Patch size 1 keeps the HWC order; patch size = image size too.
    assert_eq!(patchify(&coded_image(), 4, 1, 2).unwrap(), coded_image());
    assert_eq!(patchify(&coded_image(), 4, 4, 2).unwrap(), coded_image());
}

#[test]
fn unpatchify_inverts() {
    let mut rng = megalodon_vision::rng::SplitMix64::new(5);
    let img: Vec<f32> = (0..12 * 12 * 3).map(|_| rng.next_f64() as f32).collect();
    for p in [1, 2, 3, 4, 6, 12] {
        let patches = patchify(&img, 12, p, 3).unwrap();
        assert_eq!(patches.len(), img.len());
        assert_eq!(unpatchify(&patches, 12, p, 3).unwrap(), img, "patch {p}");
        assert_eq!(
            num_patches(12, p).unwrap() * patch_dim(p, 3).unwrap(),
            img.len()
        );
    }
    assert_ne!(patchify(&img, 12, 3, 3).unwrap(), img);
}

#[test]
fn patchify_errors() {
    let img = coded_image();
    let e = patchify(&img, 4, 3, 2).unwrap_err();
    assert!(
        format!("{e:#}").contains("not a positive multiple of the patch size 3"),
        "{e:#}"
    );
    assert!(patchify(&img, 4, 0, 2).is_err());
    assert!(patchify(&img, 4, 2, 0).is_err());
    let e = patchify(&img[1..], 4, 2, 2).unwrap_err();
    assert!(format!("{e:#}").contains("expected 4x4x2 = 32"), "{e:#}");
    assert!(num_patches(0, 2).is_err());
    let huge = usize::MAX - usize::MAX % 2;
    assert!(num_patches(huge, 2).is_err(), "overflow must be an error");
    assert!(patch_dim(usize::MAX / 2, 3).is_err());
    assert_eq!(num_patches(224, 16).unwrap(), 196);
    assert_eq!(patch_dim(16, 3).unwrap(), 768);
}
