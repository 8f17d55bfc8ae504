//! Cutting a square image into non-overlapping patches (the tokens of the vision model).
//!
//! Input: an `S × S × C` image in HWC order (what [`crate::transforms::Transform`] outputs by
//! default). Output: `T = (S / P)²` patches in raster order (left to right, then top to
//! bottom; patch `t` covers rows `(t / (S/P)) * P ..` and columns `(t % (S/P)) * P ..`), each
//! `P · P · C` values in HWC order within the patch: value `(dy, dx, c)` of patch `t` is at
//! `t * P*P*C + (dy * P + dx) * C + c`.
//!
//! [`patchify`] takes the patch size and channels at run time; [`patchify_const`] at compile
//! time, as a model with a compile-time patch embedding will. Both check that `S` is a multiple
//! of `P` and that the sizes do not overflow. [`unpatchify`] is the inverse.

use anyhow::{ensure, Context, Result};

/// Number of patches `(size / patch)²`. Errors when `patch` is 0, `size` is not a positive
/// multiple of `patch`, or the count overflows.
pub fn num_patches(size: usize, patch: usize) -> Result<usize> {
    ensure!(patch > 0, "patch size must be > 0");
    ensure!(
        size > 0 && size.is_multiple_of(patch),
        "image size {size} is not a positive multiple of the patch size {patch}"
    );
    let per_side = size / patch;
    per_side
        .checked_mul(per_side)
        .with_context(|| format!("patch count ({per_side})² overflows"))
}

/// Values per patch, `patch * patch * channels` (checked).
pub fn patch_dim(patch: usize, channels: usize) -> Result<usize> {
    ensure!(channels > 0, "channel count must be > 0");
    patch
        .checked_mul(patch)
        .and_then(|n| n.checked_mul(channels))
        .with_context(|| format!("patch {patch}x{patch}x{channels} overflows"))
}

/// Checks `img.len() == size * size * channels` and the patch grid; returns `(tokens, dim)`.
fn check(img_len: usize, size: usize, patch: usize, channels: usize) -> Result<(usize, usize)> {
    let tokens = num_patches(size, patch)?;
    let dim = patch_dim(patch, channels)?;
    let want = size
        .checked_mul(size)
        .and_then(|n| n.checked_mul(channels))
        .with_context(|| format!("image {size}x{size}x{channels} overflows"))?;
    ensure!(
        img_len == want,
        "image has {img_len} values, expected {size}x{size}x{channels} = {want}"
    );
    Ok((tokens, dim))
}

/// Cuts an `size × size × channels` HWC image into `(size/patch)²` patches of
/// `patch * patch * channels` values, in the order described in the module docs.
///
/// ```
/// use megalodon_vision::patches::patchify;
/// // A 4x4 one-channel image with values 0..16, in 2x2 patches.
/// let img: Vec<f32> = (0..16).map(|v| v as f32).collect();
/// let p = patchify(&img, 4, 2, 1).unwrap();
/// assert_eq!(&p[..4], &[0.0, 1.0, 4.0, 5.0]); // top-left patch
/// assert_eq!(&p[4..8], &[2.0, 3.0, 6.0, 7.0]); // top-right patch
/// assert!(patchify(&img, 4, 3, 1).is_err()); // 4 is not a multiple of 3
/// ```
pub fn patchify(img: &[f32], size: usize, patch: usize, channels: usize) -> Result<Vec<f32>> {
    let mut out = vec![0.0; img.len()];
    patchify_into(img, size, patch, channels, &mut out)?;
    Ok(out)
}

/// [`patchify`] into a caller's buffer of exactly `img.len()` values (e.g. one image's slot in
/// a batch).
pub fn patchify_into(
    img: &[f32],
    size: usize,
    patch: usize,
    channels: usize,
    out: &mut [f32],
) -> Result<()> {
    let (_, dim) = check(img.len(), size, patch, channels)?;
    ensure!(
        out.len() == img.len(),
        "patch buffer has {} values, expected {}",
        out.len(),
        img.len()
    );
    let per_side = size / patch;
    let row = patch * channels; // values of one patch row, contiguous in HWC
    for py in 0..per_side {
        for px in 0..per_side {
            let t = py * per_side + px;
            let dst = &mut out[t * dim..(t + 1) * dim];
            for dy in 0..patch {
                let y = py * patch + dy;
                let src = (y * size + px * patch) * channels;
                dst[dy * row..(dy + 1) * row].copy_from_slice(&img[src..src + row]);
            }
        }
    }
    Ok(())
}

/// [`patchify`] with compile-time patch size `P` and channels `C`.
pub fn patchify_const<const P: usize, const C: usize>(
    img: &[f32],
    size: usize,
) -> Result<Vec<f32>> {
    patchify(img, size, P, C)
}

/// The inverse of [`patchify`]: patches back to an `size × size × channels` HWC image.
pub fn unpatchify(patches: &[f32], size: usize, patch: usize, channels: usize) -> Result<Vec<f32>> {
    let (_, dim) = check(patches.len(), size, patch, channels)?;
    let per_side = size / patch;
    let row = patch * channels;
    let mut img = vec![0.0; patches.len()];
    for py in 0..per_side {
        for px in 0..per_side {
            let t = py * per_side + px;
            let src = &patches[t * dim..(t + 1) * dim];
            for dy in 0..patch {
                let y = py * patch + dy;
                let dst = (y * size + px * patch) * channels;
                img[dst..dst + row].copy_from_slice(&src[dy * row..(dy + 1) * row]);
            }
        }
    }
    Ok(img)
}
