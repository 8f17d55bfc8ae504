//! Corpus loading errors, ordering and the train/validation split.

use megalodon_text::{Corpus, BUNDLED_CORPUS};
use std::path::Path;

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn missing_path_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("no-such-corpus.txt");
    let e = err_text(Corpus::load(&p));
    assert!(e.contains("no-such-corpus.txt"), "{e}");
    assert!(e.contains("no such file"), "{e}");
}

#[test]
fn empty_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.txt");
    std::fs::write(&p, "").unwrap();
    let e = err_text(Corpus::load(&p));
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
}

#[test]
fn folder_without_txt_and_folder_of_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.md"), "not a corpus").unwrap();
    let e = err_text(Corpus::load(dir.path()));
    assert!(e.contains("no .txt files"), "{e}");
    assert!(e.contains(&dir.path().display().to_string()), "{e}");

    std::fs::write(dir.path().join("a.txt"), "").unwrap();
    std::fs::write(dir.path().join("b.txt"), "").unwrap();
    let e = err_text(Corpus::load(dir.path()));
    assert!(e.contains("all 2 .txt files"), "{e}");
}

#[test]
fn non_utf8_names_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("latin1.txt");
    // "ok\ncaf" then 0xE9 (Latin-1 e-acute) then "\n": the bad byte is at offset 6, line 2.
    std::fs::write(&p, b"ok\ncaf\xe9\n").unwrap();
    let e = err_text(Corpus::load(&p));
    assert!(e.contains("latin1.txt"), "{e}");
    assert!(e.contains("byte offset 6"), "{e}");
    assert!(e.contains("line 2"), "{e}");
    assert!(e.contains("0xe9"), "{e}");
    // Inside a folder the offending file is named, not just the folder.
    std::fs::write(dir.path().join("good.txt"), "fine\n").unwrap();
    let e = err_text(Corpus::load(dir.path()));
    assert!(e.contains("latin1.txt"), "{e}");
}

#[test]
fn folder_is_sorted_recursive_and_skips_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("b.txt"), "bee\n").unwrap();
    std::fs::write(d.join("a.TXT"), "\u{feff}ay\n").unwrap();
    std::fs::write(d.join("sub/c.txt"), "sea\n").unwrap();
    std::fs::write(d.join("z.md"), "ignored\n").unwrap();
    std::fs::write(d.join(".hidden.txt"), "ignored\n").unwrap();
    std::fs::write(d.join("empty.txt"), "").unwrap();
    let c = Corpus::load(d).unwrap();
    let names: Vec<_> = c
        .docs
        .iter()
        .map(|x| {
            x.path
                .strip_prefix(d)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, ["a.TXT", "b.txt", "sub/c.txt"]);
    // The byte-order mark is dropped, nothing else changes.
    assert_eq!(c.texts(), ["ay\n", "bee\n", "sea\n"]);
    assert_eq!(c.skipped_empty, [d.join("empty.txt")]);
    assert_eq!(c.total_bytes(), 11);
    // Loading again gives the same corpus.
    assert_eq!(Corpus::load(d).unwrap(), c);
}

#[test]
fn split_is_deterministic_disjoint_and_at_line_boundaries() {
    let text: String = (0..200)
        .map(|i| format!("line {i} of the play\n"))
        .collect();
    let c = Corpus::from_texts([
        ("x.txt", text.clone()),
        ("y.txt", text.replace("play", "poem")),
    ]);
    let s = c.split(0.1).unwrap();
    assert_eq!(s, c.split(0.1).unwrap());
    for (i, d) in c.docs.iter().enumerate() {
        let (tr, va) = (&s.train[i].text, &s.val[i].text);
        // Head + tail is the document: nothing lost, nothing shared.
        assert_eq!(format!("{tr}{va}"), d.text);
        assert!(tr.ends_with('\n'), "cut not at a line boundary");
        assert!(!va.is_empty() && !tr.is_empty());
        // About 10% held out.
        let frac = va.len() as f64 / d.text.len() as f64;
        assert!((0.05..0.15).contains(&frac), "validation fraction {frac}");
        // No validation line occurs in the training part of the same document.
        for line in va.lines() {
            assert!(!tr.lines().any(|l| l == line), "{line:?} in both parts");
        }
    }
    // A larger fraction holds out more.
    assert!(c.split(0.3).unwrap().val_bytes() > s.val_bytes());
    // Zero holds out nothing.
    assert_eq!(c.split(0.0).unwrap().val_bytes(), 0);
}

#[test]
fn split_rejects_bad_fractions_and_tiny_corpora() {
    let c = Corpus::from_texts([("x.txt", "a\nb\n")]);
    for f in [-0.1, 1.0, 1.5, f64::NAN] {
        let e = err_text(c.split(f));
        assert!(e.contains("--val-fraction"), "{e}");
    }
    let tiny = Corpus::from_texts([("one-line.txt", "x")]);
    let e = err_text(tiny.split(0.5));
    assert!(e.contains("too small"), "{e}");
}

#[test]
fn split_without_newline_in_tail_moves_back() {
    // The target cut (byte 12 of 16) lies in the last line, which has no newline after it.
    let c = Corpus::from_texts([("x.txt", "first\nsecond\nend")]);
    let s = c.split(0.25).unwrap();
    assert_eq!(s.train[0].text, "first\nsecond\n");
    assert_eq!(s.val[0].text, "end");
}

#[test]
fn bundled_corpus_loads() {
    let c = Corpus::load(Path::new(BUNDLED_CORPUS)).unwrap();
    assert_eq!(c.docs.len(), 8, "eight plays");
    assert_eq!(c.total_bytes(), 1_036_321);
    assert!(c.docs[0].path.ends_with("hamlet.txt"));
    assert!(c.docs[0].text.starts_with("HAMLET, PRINCE OF DENMARK"));
    let s = c.split(0.05).unwrap();
    assert!(s.val.iter().all(|d| !d.text.is_empty()));
}
