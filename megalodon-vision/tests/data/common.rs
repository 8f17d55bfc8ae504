//! Helpers shared by the data-layer tests: tiny images written into temporary folders.

use std::fs;
use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage, Rgb, RgbImage, Rgba, RgbaImage};

/// A `w × h` RGB image whose pixel `(x, y)` is `f(x, y)`.
pub fn rgb(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb(f(x, y)))
}

/// Saves `img` at `path` (format from the extension), creating parent folders.
pub fn save(path: &Path, img: &DynamicImage) {
    fs::create_dir_all(path.parent().expect("path has a parent")).expect("create folder");
    img.save(path)
        .unwrap_or_else(|e| panic!("save {}: {e}", path.display()));
}

/// A small RGB image coloured by `label` and `i`, saved at `path`.
pub fn save_sample(path: &Path, label: usize, i: usize, side: u32) {
    let img = rgb(side, side, |x, y| {
        [
            (label * 80) as u8,
            (i * 7 + x as usize) as u8,
            (y * 3) as u8,
        ]
    });
    save(path, &DynamicImage::ImageRgb8(img));
}

/// A gray image.
pub fn gray(w: u32, h: u32, v: u8) -> DynamicImage {
    DynamicImage::ImageLuma8(GrayImage::from_pixel(w, h, image::Luma([v])))
}

/// An RGBA image.
pub fn rgba(w: u32, h: u32, px: [u8; 4]) -> DynamicImage {
    DynamicImage::ImageRgba8(RgbaImage::from_pixel(w, h, Rgba(px)))
}

/// Writes `classes[k].1` PNG images of `side × side` into `root/<classes[k].0>/NNN.png`;
/// returns the paths in write order.
pub fn make_tree(root: &Path, classes: &[(&str, usize)], side: u32) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for (label, (name, n)) in classes.iter().enumerate() {
        for i in 0..*n {
            let p = root.join(name).join(format!("{i:03}.png"));
            save_sample(&p, label, i, side);
            paths.push(p);
        }
    }
    paths
}

/// Bytes of a valid PNG of `side × side`.
pub fn png_bytes(side: u32) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(rgb(side, side, |x, y| [x as u8, y as u8, 9]))
        .write_to(&mut buf, image::ImageFormat::Png)
        .expect("encode png");
    buf.into_inner()
}

/// Writes a truncated PNG (first half of a valid one).
pub fn write_truncated_png(path: &Path) {
    let bytes = png_bytes(32);
    fs::create_dir_all(path.parent().expect("parent")).expect("create folder");
    fs::write(path, &bytes[..bytes.len() / 2]).expect("write");
}

/// Writes bytes that are no image at all.
pub fn write_garbage(path: &Path) {
    fs::create_dir_all(path.parent().expect("parent")).expect("create folder");
    fs::write(path, b"this is not an image, just some text").expect("write");
}

/// Writes a GIF header (a format this crate does not decode) under `path`.
pub fn write_gif_like(path: &Path) {
    fs::create_dir_all(path.parent().expect("parent")).expect("create folder");
    fs::write(path, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").expect("write");
}

/// Whether the error chain's text contains `needle`.
pub fn err_has(e: &anyhow::Error, needle: &str) -> bool {
    format!("{e:#}").contains(needle)
}
