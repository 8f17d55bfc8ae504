//! Folder layouts: label ids, noise folder, stratified split, Speech Commands lists, errors.

mod common;

use common::*;
use megalodon_audio::dataset::{AudioFolder, AudioSplits, Layout};

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

#[test]
fn plain_folder_labels_noise_and_stratified_split() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_label_tree(root, &["zebra", "apple", "mango"], 10, 400);
    write_mono16(
        &root.join("_background_noise_/white.wav"),
        16_000,
        &sine(50.0, 0.1, 16_000, 800),
    );
    std::fs::write(root.join("apple/notes.txt"), "x").unwrap();
    std::fs::create_dir_all(root.join(".hidden")).unwrap();
    let s = AudioSplits::open(root, 0.2, 7).unwrap();
    assert_eq!(s.layout, Layout::Plain);
    assert_eq!(s.labels(), ["apple", "mango", "zebra"]);
    assert_eq!(s.noise, vec![root.join("_background_noise_/white.wav")]);
    assert_eq!(s.train.label_counts(), vec![8, 8, 8]);
    assert_eq!(s.val.label_counts(), vec![2, 2, 2]);
    assert!(s.test.is_none());
    // Labels follow the folder names; train and val are disjoint and cover everything.
    for smp in s.train.samples().iter().chain(s.val.samples()) {
        let dir = smp
            .path
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(s.labels()[smp.label], dir);
    }
    let mut all: Vec<_> = s
        .train
        .samples()
        .iter()
        .chain(s.val.samples())
        .map(|x| x.path.clone())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 30);
    // Seeded: same seed, same split; another seed, another split.
    let again = AudioSplits::open(root, 0.2, 7).unwrap();
    assert_eq!(again.val.samples(), s.val.samples());
    let other = AudioSplits::open(root, 0.2, 8).unwrap();
    assert_ne!(other.val.samples(), s.val.samples());
    // The .txt file is listed as ignored.
    let full = AudioFolder::scan(root).unwrap();
    assert_eq!(full.ignored(), [root.join("apple/notes.txt")]);
    assert_eq!(full.len(), 30);
}

#[test]
fn speech_commands_lists_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_label_tree(root, &["no", "yes"], 5, 200);
    write_mono16(
        &root.join("_background_noise_/pink.wav"),
        16_000,
        &sine(60.0, 0.1, 16_000, 800),
    );
    std::fs::write(
        root.join("validation_list.txt"),
        "yes/yes_001.wav\nno/no_002.wav\n\n",
    )
    .unwrap();
    std::fs::write(
        root.join("testing_list.txt"),
        "./yes/yes_004.wav\nyes/gone.wav\n",
    )
    .unwrap();
    let s = AudioSplits::open(root, 0.5, 1).unwrap();
    assert_eq!(s.layout, Layout::SpeechCommands);
    assert_eq!(s.labels(), ["no", "yes"]);
    let names = |f: &AudioFolder| -> Vec<String> {
        f.samples()
            .iter()
            .map(|x| {
                x.path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    };
    assert_eq!(names(&s.val), ["no/no_002.wav", "yes/yes_001.wav"]);
    assert_eq!(names(s.test.as_ref().unwrap()), ["yes/yes_004.wav"]);
    assert_eq!(s.train.len(), 7);
    assert_eq!(s.missing_listed, 1);
    assert_eq!(s.noise.len(), 1);
    assert!(!s.labels().iter().any(|l| l == "_background_noise_"));
}

#[test]
fn train_val_trees() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_label_tree(&root.join("train"), &["a", "b"], 3, 100);
    make_label_tree(&root.join("val"), &["a", "b"], 1, 100);
    let s = AudioSplits::open(root, 0.3, 0).unwrap();
    assert_eq!(s.layout, Layout::Trees);
    assert_eq!((s.train.len(), s.val.len()), (6, 2));
    make_label_tree(&root.join("test"), &["a", "c"], 1, 100);
    let e = err_of(AudioSplits::open(root, 0.3, 0));
    assert!(
        e.contains("label folders differ") && e.contains("test"),
        "{e}"
    );
}

#[test]
fn layout_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let missing = root.join("nope");
    let e = err_of(AudioSplits::open(&missing, 0.1, 0));
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");

    let one = root.join("one");
    make_label_tree(&one, &["only"], 2, 100);
    let e = err_of(AudioFolder::scan(&one));
    assert!(e.contains("only one label") && e.contains("one"), "{e}");

    let none = root.join("none");
    std::fs::create_dir_all(none.join("_background_noise_")).unwrap();
    let e = err_of(AudioFolder::scan(&none));
    assert!(e.contains("no label folders") && e.contains("none"), "{e}");

    let empty = root.join("empty");
    make_label_tree(&empty, &["a"], 2, 100);
    std::fs::create_dir_all(empty.join("b")).unwrap();
    let e = err_of(AudioFolder::scan(&empty));
    assert!(
        e.contains("empty label folder") && e.contains("empty/b"),
        "{e}"
    );

    let nowav = root.join("nowav");
    make_label_tree(&nowav, &["a"], 2, 100);
    std::fs::create_dir_all(nowav.join("b")).unwrap();
    std::fs::write(nowav.join("b/readme.txt"), "x").unwrap();
    let e = err_of(AudioFolder::scan(&nowav));
    assert!(e.contains("no WAV file") && e.contains("nowav/b"), "{e}");

    let trees = root.join("trees");
    make_label_tree(&trees.join("train"), &["a", "b"], 2, 100);
    let e = err_of(AudioSplits::open(&trees, 0.1, 0));
    assert!(e.contains("no val/"), "{e}");

    let e = err_of(AudioSplits::open(trees.join("train"), 1.0, 0));
    assert!(e.contains("val_split"), "{e}");
}
