//! The Fashion-MNIST export helper (scripts/fashion-mnist-export.py) on tiny synthetic IDX
//! files, read back with the ImageFolder reader: class folders, label ids and pixel values.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use flate2::Compression;
use megalodon_vision::{load_rgb, DatasetSplits};

const ROWS: usize = 2;
const COLS: usize = 3;

fn write_gz(path: &Path, bytes: &[u8]) {
    let mut enc = GzEncoder::new(File::create(path).unwrap(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap();
}

/// Writes `{prefix}-images-idx3-ubyte.gz` and `{prefix}-labels-idx1-ubyte.gz`; image `i` has
/// pixel `j` equal to `(i * 31 + j * 7) % 256`.
fn write_idx(dir: &Path, prefix: &str, labels: &[u8]) -> Vec<Vec<u8>> {
    let n = labels.len();
    let images: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            (0..ROWS * COLS)
                .map(|j| ((i * 31 + j * 7) % 256) as u8)
                .collect()
        })
        .collect();
    let mut img = Vec::new();
    img.extend(0x803u32.to_be_bytes());
    img.extend((n as u32).to_be_bytes());
    img.extend((ROWS as u32).to_be_bytes());
    img.extend((COLS as u32).to_be_bytes());
    images.iter().for_each(|im| img.extend(im));
    write_gz(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")), &img);
    let mut lab = Vec::new();
    lab.extend(0x801u32.to_be_bytes());
    lab.extend((n as u32).to_be_bytes());
    lab.extend(labels);
    write_gz(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), &lab);
    images
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fashion-mnist-export.py")
}

#[test]
fn export_helper_writes_a_readable_image_folder() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("skipping: python3 not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&src).unwrap();
    let train_labels: Vec<u8> = vec![9, 0, 3, 1, 2, 4, 5, 6, 7, 8, 3];
    let val_labels: Vec<u8> = vec![5, 0, 1, 2, 3, 4, 6, 7, 8, 9];
    let train = write_idx(&src, "train", &train_labels);
    let val = write_idx(&src, "t10k", &val_labels);
    let status = Command::new("python3")
        .arg(script())
        .arg(&src)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());

    let data = DatasetSplits::open(&out, None, 0).unwrap();
    assert_eq!(
        data.train.labels(),
        &[
            "0-t-shirt-top",
            "1-trouser",
            "2-pullover",
            "3-dress",
            "4-coat",
            "5-sandal",
            "6-shirt",
            "7-sneaker",
            "8-bag",
            "9-ankle-boot"
        ]
    );
    for (folder, labels, images) in [
        (&data.train, &train_labels, &train),
        (&data.val, &val_labels, &val),
    ] {
        assert_eq!(folder.len(), labels.len());
        for s in folder.samples() {
            let i: usize = s
                .path
                .file_stem()
                .unwrap()
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(s.label, labels[i] as usize, "{}", s.path.display());
            let im = load_rgb(&s.path).unwrap();
            assert_eq!(im.dimensions(), (COLS as u32, ROWS as u32));
            let got: Vec<u8> = im.pixels().map(|p| p.0[0]).collect();
            assert_eq!(&got, &images[i], "{}", s.path.display());
            assert!(im.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
        }
    }

    // A corrupt source is an error, not a partial export.
    write_gz(
        &src.join("t10k-labels-idx1-ubyte.gz"),
        b"\x00\x00\x08\x01\x00\x00\x00\x05ab",
    );
    let bad = Command::new("python3")
        .arg(script())
        .arg(&src)
        .arg(dir.path().join("out2"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("t10k-labels"));
}

/// The real export, when `scripts/fashion-mnist-export.sh` has been run (ignored by default:
/// `cargo test -p megalodon-vision --test data -- --ignored`).
#[test]
#[ignore = "needs data/fashion-mnist from scripts/fashion-mnist-export.sh"]
fn real_fashion_mnist_export() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/fashion-mnist");
    let data = DatasetSplits::open(&root, None, 0).unwrap();
    assert_eq!(data.train.num_labels(), 10);
    assert_eq!(data.train.label_counts(), vec![6000; 10]);
    assert_eq!(data.val.label_counts(), vec![1000; 10]);
    let im = load_rgb(&data.val.samples()[0].path).unwrap();
    assert_eq!(im.dimensions(), (28, 28));
}
