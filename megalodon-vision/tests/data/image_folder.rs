//! ImageFolder scanning, splitting, decoding and its errors.

use std::fs;

use megalodon_vision::{load_rgb, DatasetSplits, ImageFolder};

use crate::common::*;

#[test]
fn scan_sorts_classes_and_labels_mixed_formats() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let img = image::DynamicImage::ImageRgb8(rgb(12, 9, |x, y| [x as u8 * 20, y as u8 * 20, 5]));
    save(&root.join("b_dog/1.png"), &img);
    save(&root.join("b_dog/2.jpg"), &img);
    save(&root.join("a_cat/x.bmp"), &img);
    save(&root.join("a_cat/nested/y.webp"), &img);
    save(&root.join("c_bird/z.jpeg"), &img);
    fs::copy(root.join("b_dog/1.png"), root.join("c_bird/UPPER.PNG")).unwrap();
    fs::write(root.join("c_bird/README.txt"), "notes").unwrap();
    fs::write(root.join("a_cat/.DS_Store"), "junk").unwrap();
    fs::write(root.join("notes.txt"), "top-level file, not a class").unwrap();

    let f = ImageFolder::scan(root).unwrap();
    assert_eq!(f.labels(), &["a_cat", "b_dog", "c_bird"]);
    assert_eq!(f.num_labels(), 3);
    assert_eq!(f.label_counts(), vec![2, 2, 2]);
    assert_eq!(f.len(), 6);
    let names: Vec<(String, usize)> = f
        .samples()
        .iter()
        .map(|s| {
            let rel = s.path.strip_prefix(root).unwrap();
            (rel.to_string_lossy().replace('\\', "/"), s.label)
        })
        .collect();
    assert_eq!(
        names,
        vec![
            ("a_cat/nested/y.webp".to_string(), 0),
            ("a_cat/x.bmp".to_string(), 0),
            ("b_dog/1.png".to_string(), 1),
            ("b_dog/2.jpg".to_string(), 1),
            ("c_bird/UPPER.PNG".to_string(), 2),
            ("c_bird/z.jpeg".to_string(), 2),
        ]
    );
    assert_eq!(f.ignored(), &[root.join("c_bird/README.txt")]);
    // Every listed file decodes to the original size.
    for s in f.samples() {
        let im = load_rgb(&s.path).unwrap();
        assert_eq!(im.dimensions(), (12, 9), "{}", s.path.display());
    }
}

#[test]
fn load_rgb_converts_gray_rgba_and_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("g.png");
    save(&g, &gray(5, 3, 77));
    let im = load_rgb(&g).unwrap();
    assert_eq!(im.dimensions(), (5, 3));
    assert!(im.pixels().all(|p| p.0 == [77, 77, 77]));

    let a = dir.path().join("a.png");
    save(&a, &rgba(4, 4, [10, 20, 30, 128]));
    let im = load_rgb(&a).unwrap();
    assert!(im.pixels().all(|p| p.0 == [10, 20, 30]));

    let b = dir.path().join("c.bmp");
    let src = rgb(7, 2, |x, y| [x as u8, y as u8, 200]);
    save(&b, &image::DynamicImage::ImageRgb8(src.clone()));
    assert_eq!(load_rgb(&b).unwrap(), src);

    // JPEG is lossy: a flat colour comes back close.
    let j = dir.path().join("flat.jpg");
    save(
        &j,
        &image::DynamicImage::ImageRgb8(rgb(16, 16, |_, _| [200, 100, 50])),
    );
    let im = load_rgb(&j).unwrap();
    for p in im.pixels() {
        for (got, want) in p.0.iter().zip([200u8, 100, 50]) {
            assert!((*got as i32 - want as i32).abs() <= 4, "{:?}", p.0);
        }
    }
}

#[test]
fn load_rgb_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("truncated.png");
    write_truncated_png(&t);
    let g = dir.path().join("garbage.jpg");
    write_garbage(&g);
    let u = dir.path().join("really_a_gif.png");
    write_gif_like(&u);
    let m = dir.path().join("missing.png");
    for p in [&t, &g, &u, &m] {
        let e = load_rgb(p).expect_err("must fail");
        assert!(err_has(&e, &p.display().to_string()), "{e:#}");
    }
}

#[test]
fn scan_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    let missing = root.join("nope");
    let e = ImageFolder::scan(&missing).unwrap_err();
    assert!(
        err_has(&e, &missing.display().to_string()) && err_has(&e, "does not exist"),
        "{e:#}"
    );

    let flat = root.join("flat");
    save_sample(&flat.join("a.png"), 0, 0, 4);
    let e = ImageFolder::scan(&flat).unwrap_err();
    assert!(
        err_has(&e, "no class folders") && err_has(&e, &flat.display().to_string()),
        "{e:#}"
    );

    let single = root.join("single");
    make_tree(&single, &[("only", 3)], 4);
    let e = ImageFolder::scan(&single).unwrap_err();
    assert!(
        err_has(&e, "only one class") && err_has(&e, "only"),
        "{e:#}"
    );
    assert!(err_has(&e, &single.display().to_string()), "{e:#}");

    let empty = root.join("empty");
    make_tree(&empty, &[("a", 2), ("b", 2)], 4);
    fs::create_dir_all(empty.join("c")).unwrap();
    let e = ImageFolder::scan(&empty).unwrap_err();
    assert!(err_has(&e, "empty class folder"), "{e:#}");
    assert!(err_has(&e, &empty.join("c").display().to_string()), "{e:#}");

    let noimg = root.join("noimg");
    make_tree(&noimg, &[("a", 2)], 4);
    fs::create_dir_all(noimg.join("b")).unwrap();
    fs::write(noimg.join("b/notes.txt"), "x").unwrap();
    fs::write(noimg.join("b/data.gif"), "x").unwrap();
    let e = ImageFolder::scan(&noimg).unwrap_err();
    assert!(err_has(&e, "no image file"), "{e:#}");
    assert!(err_has(&e, &noimg.join("b").display().to_string()), "{e:#}");
}

#[test]
fn train_val_layout_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_tree(&root.join("train"), &[("cat", 4), ("dog", 3)], 4);
    make_tree(&root.join("val"), &[("cat", 1), ("dog", 2)], 4);
    let s = DatasetSplits::open(root, None, 0).unwrap();
    assert_eq!(s.train.labels(), &["cat", "dog"]);
    assert_eq!(s.val.labels(), &["cat", "dog"]);
    assert_eq!(s.train.label_counts(), vec![4, 3]);
    assert_eq!(s.val.label_counts(), vec![1, 2]);

    // A val split given with train/ cuts train/ and ignores val/.
    let s = DatasetSplits::open(root, Some(0.5), 0).unwrap();
    assert_eq!(s.train.len() + s.val.len(), 7);
    assert!(s
        .val
        .samples()
        .iter()
        .all(|x| x.path.starts_with(root.join("train"))));

    // Class mismatch names both folders and the difference.
    make_tree(&root.join("val"), &[("cow", 1)], 4);
    let e = DatasetSplits::open(root, None, 0).unwrap_err();
    assert!(
        err_has(&e, "cow") && err_has(&e, &root.join("val").display().to_string()),
        "{e:#}"
    );

    // train/ without val/ and no split.
    let other = root.join("other");
    make_tree(&other.join("train"), &[("a", 2), ("b", 2)], 4);
    let e = DatasetSplits::open(&other, None, 0).unwrap_err();
    assert!(
        err_has(&e, "no val/") && err_has(&e, &other.display().to_string()),
        "{e:#}"
    );

    // One tree without a split fraction.
    let tree = root.join("tree");
    make_tree(&tree, &[("a", 2), ("b", 2)], 4);
    let e = DatasetSplits::open(&tree, None, 0).unwrap_err();
    assert!(err_has(&e, "val split"), "{e:#}");
}

#[test]
fn split_is_stratified_deterministic_and_disjoint() {
    let dir = tempfile::tempdir().unwrap();
    make_tree(dir.path(), &[("a", 10), ("b", 20), ("c", 3), ("d", 1)], 4);
    let s1 = DatasetSplits::open(dir.path(), Some(0.2), 7).unwrap();
    let s2 = DatasetSplits::open(dir.path(), Some(0.2), 7).unwrap();
    let s3 = DatasetSplits::open(dir.path(), Some(0.2), 8).unwrap();
    assert_eq!(s1.val.samples(), s2.val.samples());
    assert_eq!(s1.train.samples(), s2.train.samples());
    // round(10*.2)=2, round(20*.2)=4, round(3*.2)=1 (at least one), a single image stays in train.
    assert_eq!(s1.val.label_counts(), vec![2, 4, 1, 0]);
    assert_eq!(s1.train.label_counts(), vec![8, 16, 2, 1]);
    assert_ne!(
        s1.val.samples(),
        s3.val.samples(),
        "another seed, another split"
    );
    let mut all: Vec<_> = s1
        .train
        .samples()
        .iter()
        .chain(s1.val.samples())
        .map(|s| s.path.clone())
        .collect();
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(all.len(), before, "train and val overlap");
    assert_eq!(all.len(), 34);
    for bad in [0.0, 1.0, -0.1, f64::NAN] {
        assert!(
            DatasetSplits::open(dir.path(), Some(bad), 0).is_err(),
            "{bad}"
        );
    }
}
