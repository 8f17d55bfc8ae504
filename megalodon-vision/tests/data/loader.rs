//! Loader: determinism, prefetching, resume, bad files.

use std::path::Path;

use megalodon_vision::{
    Batch, ColorMode, ImageFolder, Loader, LoaderConfig, Normalize, Patches, Transform,
};

use crate::common::*;

fn tree(root: &Path) -> ImageFolder {
    make_tree(root, &[("a", 7), ("b", 5), ("c", 6)], 10);
    ImageFolder::scan(root).unwrap()
}

fn config(transform: Transform) -> LoaderConfig {
    let mut cfg = LoaderConfig::new(Patches::new(transform, 4), 4);
    cfg.seed = 42;
    cfg.warn = false;
    cfg
}

fn collect(loader: &Loader, epoch: u64) -> Vec<Batch> {
    loader.epoch(epoch).map(|b| b.unwrap()).collect()
}

#[test]
fn epochs_are_deterministic_and_cover_every_image() {
    let dir = tempfile::tempdir().unwrap();
    let folder = tree(dir.path());
    let mut cfg = config(Transform::train(8));
    cfg.threads = 3;
    cfg.prefetch = 2;
    let loader = Loader::new(folder.clone(), cfg.clone()).unwrap();
    assert_eq!(
        (loader.decode().tokens(), loader.decode().patch_dim()),
        (4, 48)
    );
    assert_eq!(loader.batches_per_epoch(), 5); // 18 images in batches of 4

    let a = collect(&loader, 0);
    let b = collect(&loader, 0);
    assert_eq!(a, b, "same seed and epoch, same batches");
    // Another thread count (rayon's global pool), same content.
    let mut cfg0 = cfg.clone();
    cfg0.threads = 0;
    cfg0.prefetch = 1;
    assert_eq!(collect(&Loader::new(folder.clone(), cfg0).unwrap(), 0), a);
    // The synchronous path builds the same batches.
    for (i, batch) in a.iter().enumerate() {
        assert_eq!(&loader.batch(0, i).unwrap(), batch);
    }

    let sizes: Vec<usize> = a.iter().map(|b| b.batch).collect();
    assert_eq!(sizes, vec![4, 4, 4, 4, 2]);
    let mut seen: Vec<usize> = Vec::new();
    for (i, batch) in a.iter().enumerate() {
        assert_eq!((batch.index, batch.epoch, batch.skipped), (i, 0, 0));
        assert_eq!(batch.values.len(), batch.batch * 4 * 48);
        assert!(batch.values.iter().all(|v| v.is_finite()));
        assert_eq!(batch.labels.len(), batch.batch);
        for (&s, &l) in batch.ids.iter().zip(&batch.labels) {
            assert_eq!(folder.samples()[s].label, l);
        }
        seen.extend(&batch.ids);
    }
    let order = loader.order(0);
    assert_eq!(seen, order);
    seen.sort();
    assert_eq!(
        seen,
        (0..18).collect::<Vec<_>>(),
        "each image once per epoch"
    );
    assert_ne!(order, (0..18).collect::<Vec<_>>(), "shuffled");

    let e1 = collect(&loader, 1);
    assert_ne!(loader.order(1), order, "another epoch, another order");
    assert_ne!(e1, a);
    let mut other = cfg.clone();
    other.seed = 43;
    assert_ne!(Loader::new(folder, other).unwrap().order(0), order);
}

#[test]
fn eval_order_drop_last_and_gray() {
    let dir = tempfile::tempdir().unwrap();
    let folder = tree(dir.path());
    let t = Transform::eval(8)
        .with_color(ColorMode::Gray)
        .with_normalize(Normalize::fashion_mnist());
    let mut cfg = config(t);
    cfg.shuffle = false;
    cfg.drop_last = true;
    let loader = Loader::new(folder, cfg).unwrap();
    assert_eq!(loader.decode().patch_dim(), 16);
    assert_eq!(loader.batches_per_epoch(), 4);
    let batches = collect(&loader, 3);
    assert_eq!(batches.len(), 4);
    let labels: Vec<usize> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(labels, [vec![0; 7], vec![1; 5], vec![2; 4]].concat());
    assert_eq!(
        collect(&loader, 4),
        {
            let mut b = collect(&loader, 3);
            b.iter_mut().for_each(|x| x.epoch = 4);
            b
        },
        "an eval epoch does not depend on the epoch number"
    );
}

#[test]
fn resume_at_a_batch_index() {
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::new(tree(dir.path()), config(Transform::train(8))).unwrap();
    let full = collect(&loader, 2);
    let resumed: Vec<Batch> = loader
        .epoch_from(2, 3)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(resumed, full[3..].to_vec());
    assert_eq!(loader.epoch_from(2, 5).unwrap().count(), 0);
    assert!(loader.epoch_from(2, 6).is_err());
    assert!(loader.batch(2, 5).is_err());
    // Stopping early does not hang: the background thread is stopped on drop.
    let mut it = loader.epoch(2);
    assert_eq!(it.next().unwrap().unwrap(), full[0]);
    assert_eq!(it.batches(), 1);
    drop(it);
}

#[test]
fn bad_images_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_tree(root, &[("a", 5), ("b", 5)], 10);
    write_truncated_png(&root.join("a/bad_truncated.png"));
    write_garbage(&root.join("b/bad_garbage.jpg"));
    write_gif_like(&root.join("b/bad_gif.png"));
    save(&root.join("a/bad_tiny.png"), &gray(3, 3, 9)); // smaller than a 4x4 patch
    let folder = ImageFolder::scan(root).unwrap();
    assert_eq!(folder.len(), 14);
    let mut cfg = config(Transform::train(8));
    cfg.warn = true; // the warnings name the files (visible with --nocapture)
    let loader = Loader::new(folder.clone(), cfg).unwrap();
    let mut it = loader.epoch(0);
    let batches: Vec<Batch> = (&mut it).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 4);
    assert_eq!(it.skipped(), 4);
    assert_eq!(it.rows(), 10);
    assert_eq!(batches.iter().map(|b| b.skipped).sum::<usize>(), 4);
    let mut names: Vec<String> = it
        .skipped_files()
        .iter()
        .map(|p| {
            p.strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "a/bad_tiny.png",
            "a/bad_truncated.png",
            "b/bad_garbage.jpg",
            "b/bad_gif.png"
        ]
    );
    // Counted again in the next epoch.
    let mut it1 = loader.epoch(1);
    assert_eq!((&mut it1).map(|b| b.unwrap().batch).sum::<usize>(), 10);
    assert_eq!(it1.skipped(), 4);
    for b in &batches {
        assert_eq!(
            b.values.len(),
            b.batch * loader.decode().tokens() * loader.decode().patch_dim()
        );
        for &s in &b.ids {
            let name = folder.samples()[s]
                .path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string();
            assert!(!name.starts_with("bad_"), "{name} should have been skipped");
        }
    }
}

#[test]
fn no_readable_image_at_all_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_garbage(&root.join("a/1.png"));
    write_garbage(&root.join("a/2.png"));
    write_truncated_png(&root.join("b/3.png"));
    let folder = ImageFolder::scan(root).unwrap();
    let mut cfg = config(Transform::eval(8));
    cfg.batch_size = 2;
    let loader = Loader::new(folder, cfg).unwrap();
    let items: Vec<_> = loader.epoch(0).collect();
    let err = items
        .into_iter()
        .find_map(|r| r.err())
        .expect("an epoch without a readable image must yield an error");
    assert!(
        err_has(&err, "no readable image") && err_has(&err, &root.display().to_string()),
        "{err:#}"
    );
}

#[test]
fn config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let folder = tree(dir.path());
    let e = Loader::new(
        folder.clone(),
        LoaderConfig::new(Patches::new(Transform::eval(10), 4), 2),
    )
    .unwrap_err();
    assert!(err_has(&e, "not a positive multiple"), "{e:#}");
    assert!(Loader::new(
        folder.clone(),
        LoaderConfig::new(Patches::new(Transform::eval(8), 4), 0)
    )
    .is_err());
    let chw = Transform::eval(8).with_layout(megalodon_vision::Layout::Chw);
    assert!(Loader::new(folder.clone(), LoaderConfig::new(Patches::new(chw, 4), 2)).is_err());
    let mut cfg = LoaderConfig::new(Patches::new(Transform::eval(8), 4), 2);
    cfg.prefetch = 0;
    assert!(Loader::new(folder, cfg).is_err());
}
