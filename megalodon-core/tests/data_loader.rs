//! The classifiers' shared data layer with a toy decoder (a text file holding one number per
//! file): label folders, the stratified split, the prefetching loader (determinism across
//! thread counts, resume, bad files) and step batches. Vision and audio test their decoders on
//! top of this.

use std::path::Path;

use anyhow::{bail, Context, Result};
use megalodon_core::data::{
    Decode, FileKind, LabelFolder, Loader, LoaderConfig, SplitMix64, StepBatches,
};

struct Numbers;
impl FileKind for Numbers {
    const WHAT: &'static str = "number";
    const FOLDER: &'static str = "label";
    const EXTENSIONS: &'static [&'static str] = &["num"];
    const RESERVED: &'static [&'static str] = &["_extra_"];
}

/// Row: the file's number `x`, then `x + u` with `u` uniform from the generator; real length
/// `1 + x mod row_len`. `panic` makes the decoder panic; other unparsable text is an error.
#[derive(Debug, Clone)]
struct Toy {
    row: usize,
}
impl Decode for Toy {
    type Kind = Numbers;
    fn prepare(&mut self) -> Result<usize> {
        Ok(self.row)
    }
    fn decode(&self, path: &Path, rng: &mut SplitMix64, out: &mut [f32]) -> Result<usize> {
        let text = std::fs::read_to_string(path)?;
        if text.trim() == "panic" {
            panic!("toy decoder panic");
        }
        let x: usize = text
            .trim()
            .parse()
            .with_context(|| format!("{} is not a number", path.display()))?;
        if x == 999 {
            bail!("999 is unreadable");
        }
        let len = 1 + x % out.len();
        out[0] = x as f32;
        for v in &mut out[1..len] {
            *v = x as f32 + rng.next_f64() as f32;
        }
        Ok(len)
    }
}

type Folder = LabelFolder<Numbers>;

/// `labels[i]` files in folder `l{i}`, numbered globally from 0; `bad` numbers are written as
/// 999 (unreadable), `panic` ones as "panic".
fn tree(root: &Path, labels: &[usize], bad: &[usize], panics: &[usize]) {
    let mut n = 0;
    for (l, &count) in labels.iter().enumerate() {
        let dir = root.join(format!("l{l}"));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for i in 0..count {
            let text = if bad.contains(&n) {
                "999".to_string()
            } else if panics.contains(&n) {
                "panic".to_string()
            } else {
                n.to_string()
            };
            // the last file of each label one folder deeper (found recursively; `sub` sorts
            // after the numbered files, so folder order is file-number order)
            let sub = if i + 1 == count { "sub" } else { "" };
            std::fs::write(dir.join(sub).join(format!("{n:03}.num")), text).unwrap();
            n += 1;
        }
    }
}

fn cfg(batch: usize, threads: usize, prefetch: usize) -> LoaderConfig<Toy> {
    let mut c = LoaderConfig::new(Toy { row: 5 }, batch);
    c.seed = 7;
    c.threads = threads;
    c.prefetch = prefetch;
    c.warn = false;
    c
}

#[test]
fn scan_split_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    tree(root, &[6, 3, 1], &[], &[]);
    std::fs::create_dir_all(root.join("_extra_")).unwrap();
    std::fs::write(root.join("l0/readme.txt"), "x").unwrap();
    std::fs::write(root.join("l1/.hidden.num"), "1").unwrap();
    let f = Folder::scan(root).unwrap();
    assert_eq!(f.labels(), &["l0", "l1", "l2"]);
    assert_eq!(f.label_counts(), vec![6, 3, 1]);
    assert_eq!(f.ignored().len(), 1);
    let (t, v) = f.split(0.34, 1).unwrap();
    // round(6·0.34) = 2; round(3·0.34) = 1; a single file is never validation
    assert_eq!(
        (t.label_counts(), v.label_counts()),
        (vec![4, 2, 1], vec![2, 1, 0])
    );
    let (t2, v2) = f.split(0.34, 1).unwrap();
    assert_eq!((t.samples(), v.samples()), (t2.samples(), v2.samples()));
    let (_, v3) = f.split(0.34, 2).unwrap();
    assert_ne!(v.samples(), v3.samples(), "another seed, another split");
    let mut all: Vec<_> = t.samples().iter().chain(v.samples()).cloned().collect();
    all.sort_by(|a, b| a.path.cmp(&b.path));
    let mut want = f.samples().to_vec();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(all, want, "the split is a partition");
    assert!(format!("{:#}", f.split(1.0, 0).unwrap_err()).contains("val_split"));

    let e = format!("{:#}", Folder::scan(root.join("nope")).unwrap_err());
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
    let one = root.join("one");
    tree(&one, &[2], &[], &[]);
    let e = format!("{:#}", Folder::scan(&one).unwrap_err());
    assert!(e.contains("only one label folder"), "{e}");
    std::fs::create_dir_all(one.join("l9")).unwrap();
    let e = format!("{:#}", Folder::scan(&one).unwrap_err());
    assert!(e.contains("empty label folder") && e.contains("l9"), "{e}");
    std::fs::write(one.join("l9/a.txt"), "1").unwrap();
    let e = format!("{:#}", Folder::scan(&one).unwrap_err());
    assert!(e.contains("no number file") && e.contains("l9"), "{e}");
    let other = Folder::from_samples("x", vec!["a".into(), "b".into()], vec![]).unwrap();
    let e = format!("{:#}", f.check_same_labels(&other).unwrap_err());
    assert!(e.contains("l0") && e.contains("\"a\""), "{e}");
}

fn epoch(l: &Loader<Toy>, e: u64) -> Vec<megalodon_core::data::Batch> {
    l.epoch(e).collect::<Result<Vec<_>>>().unwrap()
}

#[test]
fn batches_depend_on_seed_epoch_and_index_only() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), &[7, 6], &[], &[]);
    let f = Folder::scan(dir.path()).unwrap();
    let a = Loader::new(f.clone(), cfg(4, 1, 1)).unwrap();
    let b = Loader::new(f.clone(), cfg(4, 3, 4)).unwrap();
    let c = Loader::new(f.clone(), cfg(4, 0, 2)).unwrap();
    assert_eq!(a.batches_per_epoch(), 4);
    let ea = epoch(&a, 0);
    assert_eq!(ea, epoch(&b, 0));
    assert_eq!(ea, epoch(&c, 0));
    assert_ne!(ea, epoch(&a, 1), "each epoch its own order and randomness");
    let mut seen: Vec<usize> = ea.iter().flat_map(|b| b.ids.clone()).collect();
    assert_eq!(
        ea.last().unwrap().batch,
        1,
        "13 files: a partial last batch"
    );
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..13).collect::<Vec<_>>(),
        "an epoch visits every file once"
    );
    for bt in &ea {
        assert_eq!(bt.values.len(), bt.batch * 5);
        for (r, &id) in bt.ids.iter().enumerate() {
            let name = f.samples()[id].path.file_stem().unwrap().to_str().unwrap();
            let x: usize = name.parse().unwrap();
            assert_eq!(x, id, "files are numbered in folder order");
            assert_eq!(bt.labels[r], f.samples()[id].label);
            assert_eq!(bt.values[r * 5], x as f32);
            assert_eq!(bt.lengths[r], 1 + x % 5);
            assert!(bt.values[r * 5 + bt.lengths[r]..(r + 1) * 5]
                .iter()
                .all(|&v| v == 0.0));
        }
    }
    // resume inside an epoch and single batches give the same batches
    let tail: Vec<_> = a.epoch_from(0, 2).unwrap().map(Result::unwrap).collect();
    assert_eq!(tail, ea[2..]);
    assert_eq!(a.batch(0, 1).unwrap(), ea[1]);
    assert!(a.batch(0, 4).is_err() && a.epoch_from(0, 5).is_err());
    assert_eq!(a.epoch_from(0, 4).unwrap().count(), 0);
    // drop_last, folder order
    let mut o = cfg(4, 0, 1);
    o.drop_last = true;
    o.shuffle = false;
    let d = Loader::new(f.clone(), o).unwrap();
    assert_eq!(d.batches_per_epoch(), 3);
    assert_eq!(epoch(&d, 0)[0].ids, vec![0, 1, 2, 3]);
    // settings errors
    assert!(Loader::new(f.clone(), cfg(0, 0, 1)).is_err());
    assert!(Loader::new(f.clone(), cfg(2, 0, 0)).is_err());
    let e = format!(
        "{:#}",
        Loader::new(f, cfg(usize::MAX / 2, 0, 1)).unwrap_err()
    );
    assert!(e.contains("overflows"), "{e}");
}

#[test]
fn bad_files_are_skipped_counted_and_step_batches_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    // files 0 and 1 unreadable, file 5 panics the decoder
    tree(dir.path(), &[4, 4], &[0, 1], &[5]);
    let f = Folder::scan(dir.path()).unwrap();
    let mut c = cfg(2, 2, 2);
    c.shuffle = false;
    let l = Loader::new(f.clone(), c).unwrap();
    let mut it = l.epoch(0);
    let bs: Vec<_> = (&mut it).map(Result::unwrap).collect();
    assert_eq!((it.skipped(), it.rows(), it.batches()), (3, 5, 4));
    assert_eq!((bs[0].batch, bs[0].skipped), (0, 2), "a batch may be empty");
    assert_eq!(bs[2].ids, vec![4]);
    assert!(it.skipped_files()[2].ends_with("005.num"));
    assert!(l.batch(0, 2).unwrap().skipped_files[0].ends_with("005.num"));

    // step 1 would be the empty batch 0: the next readable batch of the epoch is taken, and a
    // fresh StepBatches asked for step 1 after a jump gives the same
    let mut s = StepBatches::new(l.clone()).unwrap();
    let b1 = s.get(1).unwrap();
    assert_eq!(b1.ids, vec![2, 3]);
    assert_eq!(s.epoch_skipped().len(), 2);
    let b6 = s.get(6).unwrap();
    let mut s2 = StepBatches::new(l.clone()).unwrap();
    assert_eq!(s2.get(6).unwrap(), b6);
    assert_eq!(s2.get(1).unwrap(), b1);
    assert!(s.get(0).is_err());

    // a folder whose every file is unreadable is an error, not a hang
    let bad = dir.path().join("bad");
    tree(&bad, &[1, 1], &[0, 1], &[]);
    let l = Loader::new(Folder::scan(&bad).unwrap(), cfg(1, 0, 1)).unwrap();
    let errs: Vec<_> = l.epoch(0).filter_map(|r| r.err()).collect();
    assert_eq!(errs.len(), 1);
    assert!(format!("{:#}", errs[0]).contains("no readable number file"));
    let e = format!("{:#}", StepBatches::new(l).unwrap().get(1).unwrap_err());
    assert!(e.contains("no readable number file"), "{e}");
}

#[test]
fn batches_shard_into_contiguous_rows_for_data_parallel_ranks() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), &[3, 2], &[], &[]);
    let l = Loader::new(Folder::scan(dir.path()).unwrap(), cfg(5, 0, 1)).unwrap();
    let b = l.batch(0, 0).unwrap();
    let parts: Vec<_> = (0..2).map(|p| b.shard(p, 2).unwrap()).collect();
    assert_eq!((parts[0].batch, parts[1].batch), (2, 3));
    let ids: Vec<usize> = parts.iter().flat_map(|p| p.ids.clone()).collect();
    assert_eq!(ids, b.ids, "the shards are the batch's rows in order");
    let values: Vec<f32> = parts.iter().flat_map(|p| p.values.clone()).collect();
    assert_eq!(values, b.values);
    assert_eq!(parts[1].lengths, b.lengths[2..]);
    assert!(b.shard(2, 2).is_err());
}
