//! Loader: batch contents, determinism across threads and prefetch depths, resume, bad files.

mod common;

use common::*;
use megalodon_audio::augment::{Augment, AugmentConfig, ClipConfig, NoiseBank};
use megalodon_audio::dataset::{AudioFolder, AudioSplits};
use megalodon_audio::loader::{Batch, ClipBatch, Clips, Loader, LoaderConfig};

fn tree(n: usize) -> (tempfile::TempDir, AudioFolder) {
    let dir = tempfile::tempdir().unwrap();
    // Lengths vary around the clip length so both padding and cropping happen.
    for (li, l) in ["down", "go", "up"].iter().enumerate() {
        for i in 0..n {
            let len = 1_200 + 150 * ((i + li) % 5);
            let x = sine(200.0 + 50.0 * li as f64 + i as f64, 0.3, 16_000, len);
            write_mono16(&dir.path().join(l).join(format!("{i:02}.wav")), 16_000, &x);
        }
    }
    let f = AudioFolder::scan(dir.path()).unwrap();
    (dir, f)
}

fn train_cfg(batch: usize, threads: usize, prefetch: usize) -> LoaderConfig {
    let noise = NoiseBank::from_clips(vec![sine(77.0, 0.5, 16_000, 2_000)]);
    let aug = Augment::new(
        AugmentConfig {
            time_shift_ms: 5.0,
            ..AugmentConfig::default()
        },
        noise,
    )
    .unwrap();
    let mut cfg = LoaderConfig::new(Clips::train(Some(aug)), batch);
    cfg.decode.clip = ClipConfig::train(1_500);
    cfg.seed = 11;
    cfg.threads = threads;
    cfg.prefetch = prefetch;
    cfg
}

fn collect(l: &Loader, epoch: u64) -> Vec<Batch> {
    l.epoch(epoch).map(|b| b.unwrap()).collect()
}

#[test]
fn batches_have_the_documented_shape() {
    let (_d, f) = tree(7); // 21 files
    let l = Loader::new(f.clone(), train_cfg(4, 2, 2)).unwrap();
    assert_eq!(l.batches_per_epoch(), 6);
    let bs = collect(&l, 0);
    assert_eq!(
        bs.iter().map(|b| b.batch).collect::<Vec<_>>(),
        vec![4, 4, 4, 4, 4, 1]
    );
    let mut seen = Vec::new();
    for (i, b) in bs.iter().enumerate() {
        assert_eq!(b.index, i);
        assert_eq!(b.values.len(), b.batch * 1_500);
        assert_eq!(
            (b.lengths.len(), b.labels.len(), b.ids.len()),
            (b.batch, b.batch, b.batch)
        );
        for r in 0..b.batch {
            assert_eq!(b.labels[r], f.samples()[b.ids[r]].label);
            let row = &b.values[r * 1_500..(r + 1) * 1_500];
            assert!(b.lengths[r] > 0 && b.lengths[r] <= 1_500);
            assert!(
                row[b.lengths[r]..].iter().all(|&v| v == 0.0),
                "padding not zero"
            );
            assert!(row[..b.lengths[r]].iter().any(|&v| v != 0.0));
        }
        let m = b.mask();
        assert_eq!(
            m.iter().filter(|&&v| v == 1.0).count(),
            b.lengths.iter().sum::<usize>()
        );
        let (fr, fl) = b.frames(16).unwrap();
        assert_eq!((fr.batch, fr.tokens, fr.frame_len), (b.batch, 94, 16)); // ceil(1500/16)
        assert_eq!(
            fl,
            b.lengths.iter().map(|l| l.div_ceil(16)).collect::<Vec<_>>()
        );
        seen.extend_from_slice(&b.ids);
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..21).collect::<Vec<_>>(),
        "each file once per epoch"
    );
    assert_eq!(
        l.order(0),
        bs.iter().flat_map(|b| b.ids.clone()).collect::<Vec<_>>()
    );
}

#[test]
fn deterministic_regardless_of_threads_and_prefetch() {
    let (_d, f) = tree(6);
    let a = Loader::new(f.clone(), train_cfg(5, 1, 1)).unwrap();
    let b = Loader::new(f.clone(), train_cfg(5, 3, 4)).unwrap();
    let c = Loader::new(f.clone(), train_cfg(5, 0, 2)).unwrap();
    let ea = collect(&a, 2);
    assert_eq!(ea, collect(&b, 2));
    assert_eq!(ea, collect(&c, 2));
    // Another epoch: another order and other augmentation draws.
    let e3 = collect(&a, 3);
    assert_ne!(a.order(2), a.order(3));
    assert_ne!(ea[0].values, e3[0].values);
    // Another seed: another order.
    let mut cfg = train_cfg(5, 1, 1);
    cfg.seed = 12;
    assert_ne!(Loader::new(f, cfg).unwrap().order(2), a.order(2));
}

#[test]
fn resume_at_a_batch_index() {
    let (_d, f) = tree(5);
    let l = Loader::new(f, train_cfg(4, 2, 3)).unwrap();
    let full = collect(&l, 1);
    assert_eq!(full.len(), 4);
    for start in 0..=4 {
        let rest: Vec<Batch> = l
            .epoch_from(1, start)
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(rest, full[start..].to_vec(), "resume at {start}");
    }
    assert_eq!(l.batch(1, 2).unwrap(), full[2]);
    assert!(l.epoch_from(1, 5).is_err());
    assert!(l.batch(1, 4).is_err());
    // Stopping early (dropping the iterator) is fine.
    let mut it = l.epoch(1);
    assert_eq!(it.next().unwrap().unwrap(), full[0]);
    drop(it);
}

#[test]
fn eval_loader_is_ordered_and_unaugmented() {
    let (_d, f) = tree(3);
    let mut cfg = LoaderConfig::ordered(Clips::eval(), 4);
    cfg.decode.clip = ClipConfig::eval(1_500);
    let l = Loader::new(f.clone(), cfg).unwrap();
    let bs = collect(&l, 0);
    let ids: Vec<usize> = bs.iter().flat_map(|b| b.ids.clone()).collect();
    assert_eq!(ids, (0..9).collect::<Vec<_>>());
    let other = collect(&l, 5);
    assert_eq!(bs.len(), other.len());
    for (a, b) in bs.iter().zip(&other) {
        assert!(
            a.values == b.values && a.lengths == b.lengths && a.labels == b.labels,
            "eval batches depend on the epoch"
        );
    }
}

#[test]
fn corrupt_files_are_skipped_and_counted() {
    let (d, _) = tree(4);
    let bad = d.path().join("go/03.wav");
    std::fs::write(&bad, b"RIFF\x10\0\0\0WAVEjunk").unwrap();
    let trunc = d.path().join("up/01.wav");
    let bytes = std::fs::read(&trunc).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let f = AudioFolder::scan(d.path()).unwrap();
    let l = Loader::new(f, train_cfg(3, 2, 2)).unwrap();
    for epoch in 0..2 {
        let mut it = l.epoch(epoch);
        let mut clips = 0;
        for b in it.by_ref() {
            let b = b.unwrap();
            assert_eq!(b.values.len(), b.batch * 1_500);
            clips += b.batch;
        }
        assert_eq!((clips, it.skipped(), it.rows()), (10, 2, 10));
        let mut names = it.skipped_files().to_vec();
        names.sort();
        assert_eq!(names, vec![bad.clone(), trunc.clone()]);
    }
}

#[test]
fn no_readable_wav_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for p in ["a/1.wav", "a/2.wav", "b/1.wav"] {
        let p = dir.path().join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"not audio").unwrap();
    }
    let splits = AudioSplits::open(dir.path(), 0.0, 0).unwrap();
    let mut cfg = LoaderConfig::ordered(Clips::eval(), 2);
    cfg.warn = false;
    let l = Loader::new(splits.train, cfg).unwrap();
    let items: Vec<_> = l.epoch(0).collect();
    let last = items.last().unwrap();
    let e = format!("{:#}", last.as_ref().unwrap_err());
    assert!(
        e.contains("no readable WAV") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
    assert!(items[..items.len() - 1]
        .iter()
        .all(|b| b.as_ref().unwrap().batch == 0));
}

#[test]
fn config_errors() {
    let (_d, f) = tree(1);
    assert!(Loader::new(f.clone(), LoaderConfig::ordered(Clips::eval(), 0)).is_err());
    let mut cfg = LoaderConfig::ordered(Clips::eval(), 2);
    cfg.prefetch = 0;
    assert!(Loader::new(f.clone(), cfg).is_err());
    let mut cfg = LoaderConfig::ordered(Clips::eval(), usize::MAX / 2);
    cfg.decode.clip.len = 16_000;
    let e = format!("{:#}", Loader::new(f, cfg).unwrap_err());
    assert!(e.contains("overflows"), "{e}");
}
