//! The image classifier: parameter counts from the config, a short training run on a synthetic
//! but learnable image set (well above chance), save/load/classify round trip, evaluation report,
//! bad input. One model type (the CPU preset in f32) keeps the build small.

use std::path::Path;

use dfdx::prelude::*;
use image::{GrayImage, Luma};
use megalodon_core::checkpoint::save_run;
use megalodon_core::fit::{fit, FitConf};
use megalodon_core::optim::{OptimConf, Schedule};
use megalodon_core::params::Params;
use megalodon_vision::image_folder::{DatasetSplits, ImageFolder};
use megalodon_vision::rng::SplitMix64;
use megalodon_vision::{
    evaluate, load_conf, param_count, train_transform, AugmentLevel, FashionSmall,
    ImageNetMegalodon, Loader, LoaderConfig, Patches, StepBatches, VisionConf, FASHION_SMALL,
    IMAGENET,
};

type Small = FashionSmall<f32, Cpu>;

fn names(k: usize) -> Vec<String> {
    (0..k).map(|i| format!("c{i}")).collect()
}

#[test]
fn parameter_counts_from_the_config() {
    // ImageNet: computed without building the model
    let conf = ImageNetMegalodon::<f32, Cpu>::preset_conf(&IMAGENET, names(1000), true).unwrap();
    let n = param_count(&conf, 1000).unwrap();
    println!("imagenet preset: {n} parameters");
    // 12 x 6,795,008 (layers) + 1,536 (final norm) + 590,592 (patch embedding 768x768 + 768)
    // + 150,528 (196 x 768 positions) + 769,000 (head)
    assert_eq!(n, 12 * 6_795_008 + 1_536 + 590_592 + 150_528 + 769_000);
    assert!((80_000_000..95_000_000).contains(&n), "{n}");
    let no_pos = VisionConf {
        pos_embed: false,
        ..conf
    };
    assert_eq!(param_count(&no_pos, 1000).unwrap(), n - 150_528);

    // the CPU preset: the formula equals the allocated model's count, with and without positions
    let dev: Cpu = Default::default();
    for pos in [true, false] {
        let conf = Small::preset_conf(&FASHION_SMALL, names(10), pos).unwrap();
        let mut m = Small::new(&dev, conf.clone(), 0).unwrap();
        assert_eq!(param_count(&conf, 10).unwrap(), m.num_params(), "pos {pos}");
        let names = m.param_names();
        assert_eq!(names.iter().any(|k| k == "pos_embed"), pos);
        assert!(names.contains(&"patch_embed.weight".to_string()));
        assert!(names.contains(&"encoder.layers.1.nffn.fc2.weight".to_string()));
        assert!(names.contains(&"head.weight".to_string()));
    }
}

/// A 28x28 gray image of class `label`: 0 horizontal stripes, 1 vertical stripes, 2 a bright
/// centred disc, 3 a dark checkerboard; random period/phase/radius and noise.
fn synthetic(label: usize, rng: &mut SplitMix64) -> GrayImage {
    let period = 3 + (rng.next_u64() % 4) as u32;
    let phase = (rng.next_u64() % 7) as u32;
    let radius = 6.0 + (rng.next_u64() % 6) as f32;
    GrayImage::from_fn(28, 28, |x, y| {
        let on = match label {
            0 => ((y + phase) / period).is_multiple_of(2),
            1 => ((x + phase) / period).is_multiple_of(2),
            2 => {
                let (dx, dy) = (x as f32 - 13.5, y as f32 - 13.5);
                dx * dx + dy * dy < radius * radius
            }
            _ => ((x / period) + (y / period)).is_multiple_of(2),
        };
        let base: i32 = if label == 3 {
            if on {
                90
            } else {
                20
            }
        } else if on {
            220
        } else {
            30
        };
        let noise = (rng.next_u64() % 61) as i32 - 30;
        Luma([(base + noise).clamp(0, 255) as u8])
    })
}

/// `root/{train,val}/c{k}/*.png` with `n_train` / `n_val` images per class.
fn write_set(root: &Path, n_train: usize, n_val: usize, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for (split, n) in [("train", n_train), ("val", n_val)] {
        for label in 0..4 {
            let dir = root.join(split).join(format!("c{label}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                synthetic(label, &mut rng)
                    .save(dir.join(format!("{i:03}.png")))
                    .unwrap();
            }
        }
    }
}

fn val_loader(folder: ImageFolder, conf: &VisionConf) -> Loader {
    let mut lc = LoaderConfig::new(Patches::new(conf.eval_transform().unwrap(), conf.patch), 64);
    lc.shuffle = false;
    Loader::new(folder, lc).unwrap()
}

/// Trains briefly on the synthetic set (one corrupt file among the training images), then checks
/// accuracy, the evaluation report, the skipped file, save/load/classify, and bad inputs.
#[test]
fn trains_above_chance_then_round_trips_and_rejects_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_set(&data, 40, 20, 1);
    let corrupt = data.join("train/c0/zz-corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nnot really").unwrap();

    let splits = DatasetSplits::open(&data, None, 0).unwrap();
    let dev: Cpu = Default::default();
    let conf = Small::preset_conf(&FASHION_SMALL, splits.train.labels().to_vec(), true).unwrap();
    let mut model = Small::new(&dev, conf.clone(), 3).unwrap();
    let mut lc = LoaderConfig::new(
        Patches::new(
            train_transform(&conf, AugmentLevel::None).unwrap(),
            conf.patch,
        ),
        16,
    );
    lc.seed = 5;
    lc.warn = false;
    let mut data_steps = StepBatches::new(Loader::new(splits.train.clone(), lc).unwrap()).unwrap();
    let per_epoch = data_steps.per_epoch() as u64;
    assert_eq!(per_epoch, 11); // 161 files in batches of 16
    let steps = 4 * per_epoch;
    let optim = OptimConf {
        lr: 3e-3,
        warmup: 5,
        max_steps: steps as usize,
        weight_decay: 0.0,
        schedule: Schedule::Cosine,
        ..OptimConf::default()
    };
    let run = tmp.path().join("run");
    let fc = FitConf {
        steps,
        out: Some(run.clone()),
        seed: 3,
        data: "synthetic".into(),
        ..FitConf::default()
    };
    let mut skipped = 0;
    let logs = fit(
        &mut model,
        optim,
        &fc,
        |s| {
            let b = data_steps.get(s)?;
            skipped += b.skipped;
            Ok(b)
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(logs.len() as u64, steps);
    assert_eq!(skipped, 4, "the corrupt file is skipped once per epoch");
    assert_eq!(data_steps.epoch_skipped().len(), 1);

    // accuracy well above chance (25%) on held-out images
    let vl = val_loader(splits.val.clone(), &conf);
    let r = evaluate(&vl, model.classes(), |p, b| model.logits_host(p, b)).unwrap();
    println!("{}", r.summary());
    assert_eq!(r.total(), 80);
    assert!(r.top1() >= 0.8, "val accuracy {}", r.top1());
    assert_eq!(r.top5(), 1.0); // 4 classes: always within the top 5

    // the report: counts recomputed by hand, last line for scripts
    let mut correct = 0;
    for b in vl.epoch(0) {
        let b = b.unwrap();
        let z = model.logits_host(&b.values, b.batch).unwrap();
        for (row, &l) in z.chunks(4).zip(&b.labels) {
            correct += usize::from(megalodon_vision::eval::argmax(row) == l);
        }
    }
    assert_eq!(r.correct(), correct as u64);
    let summary = r.summary();
    let last = summary.lines().last().unwrap();
    assert_eq!(
        last,
        format!("accuracy = {:.2}%", 100.0 * correct as f64 / 80.0)
    );
    let png = tmp.path().join("confusion.png");
    r.confusion_png(&png).unwrap();
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);

    // load the run (its latest checkpoint) and classify: same probabilities as before saving
    let loaded = Small::load(&run).unwrap();
    assert_eq!(load_conf(&run).unwrap(), conf);
    let img = image::DynamicImage::ImageLuma8(synthetic(1, &mut SplitMix64::new(77)));
    let a = model.classify(&img).unwrap();
    let b = loaded.classify(&img).unwrap();
    assert_eq!(a, b);
    assert_eq!(a[0].0, "c1", "{a:?}");
    assert!((a.iter().map(|x| x.1).sum::<f32>() - 1.0).abs() < 1e-5);
    // an RGB input of another size is converted and resized to the model's
    let big = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
        56,
        40,
        image::Rgb([10, 200, 30]),
    ));
    assert_eq!(loaded.classify(&big).unwrap().len(), 4);
    // also a plain save_run directory
    let plain = tmp.path().join("plain");
    save_run(&plain, &conf, &mut model).unwrap();
    assert_eq!(Small::load(&plain).unwrap().classify(&img).unwrap(), a);

    // bad input: an image smaller than one patch
    let tiny = image::DynamicImage::new_luma8(3, 3);
    let e = format!("{:#}", loaded.classify(&tiny).unwrap_err());
    assert!(e.contains("smaller than one 4x4 patch"), "{e}");
    // a missing run, a folder that is no run
    let e = format!("{:#}", Small::load(tmp.path().join("nope")).err().unwrap());
    assert!(e.contains("does not exist"), "{e}");
    let e = format!("{:#}", Small::load(&data).err().unwrap());
    assert!(e.contains("not a run directory"), "{e}");
    // --init from a run of another image size / position setting / preset
    let other = VisionConf {
        image_size: 24,
        ..conf.clone()
    };
    let e = format!("{:#}", conf.check_init(&other).unwrap_err());
    assert!(e.contains("--init") && e.contains("image_size 24"), "{e}");
    let other = VisionConf {
        pos_embed: false,
        ..conf.clone()
    };
    assert!(format!("{:#}", conf.check_init(&other).unwrap_err()).contains("pos_embed"));
    let imagenet = ImageNetMegalodon::<f32, Cpu>::preset_conf(&IMAGENET, names(4), true).unwrap();
    let e = format!("{:#}", conf.check_init(&imagenet).unwrap_err());
    assert!(e.contains("preset imagenet"), "{e}");
    // another class list is fine (the head is re-initialised)
    let renamed = VisionConf {
        classes: names(7),
        ..conf.clone()
    };
    conf.check_init(&renamed).unwrap();
    // a config of another preset cannot build this type
    let e = format!("{:#}", Small::new(&dev, imagenet, 0).err().unwrap());
    assert!(e.contains("patch 16"), "{e}");
    // image larger than the position table
    let e = format!(
        "{:#}",
        Small::check_conf(&VisionConf {
            image_size: 32,
            ..conf.clone()
        })
        .unwrap_err()
    );
    assert!(e.contains("exceeds the position table"), "{e}");
    // evaluating on data with other classes
    let e = format!(
        "{:#}",
        evaluate(&vl, &names(5), |p, b| loaded.logits_host(p, b)).unwrap_err()
    );
    assert!(e.contains("differ from the model's"), "{e}");
}

#[test]
fn bad_data_folders_are_errors_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut rng = SplitMix64::new(2);
    // a single class
    let one = root.join("one/cat");
    std::fs::create_dir_all(&one).unwrap();
    synthetic(0, &mut rng).save(one.join("a.png")).unwrap();
    let e = format!(
        "{:#}",
        DatasetSplits::open(root.join("one"), Some(0.5), 0).unwrap_err()
    );
    assert!(e.contains("only one class folder (cat)"), "{e}");
    // an empty class folder
    std::fs::create_dir_all(root.join("one/dog")).unwrap();
    let e = format!(
        "{:#}",
        DatasetSplits::open(root.join("one"), Some(0.5), 0).unwrap_err()
    );
    assert!(e.contains("empty class folder") && e.contains("dog"), "{e}");
    // a folder whose only images are unreadable: the training data says so
    let bad = root.join("bad");
    for c in ["a", "b"] {
        std::fs::create_dir_all(bad.join(c)).unwrap();
        std::fs::write(bad.join(c).join("x.png"), b"garbage").unwrap();
    }
    let folder = ImageFolder::scan(&bad).unwrap();
    let conf = Small::preset_conf(&FASHION_SMALL, names(2), true).unwrap();
    let mut lc = LoaderConfig::new(Patches::new(conf.eval_transform().unwrap(), 4), 2);
    lc.warn = false;
    let mut steps = StepBatches::new(Loader::new(folder, lc).unwrap()).unwrap();
    let e = format!("{:#}", steps.get(1).err().unwrap());
    assert!(e.contains("no readable image"), "{e}");
}
