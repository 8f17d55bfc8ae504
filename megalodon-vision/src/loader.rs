//! Epoch iteration over an [`ImageFolder`]: seeded shuffling, parallel decoding, prefetching.
//!
//! * **Order**: epoch `e` visits the samples in a permutation seeded by `(seed, e)`
//!   ([`Loader::order`]); without shuffling, in folder order. Batch `i` is positions
//!   `i * batch_size ..` of that order; the last batch is partial unless `drop_last`.
//! * **Content**: each image is decoded ([`load_rgb`]), transformed with a seed derived from
//!   `(seed, epoch, sample index)` and cut into patches ([`crate::patches`]), so a batch's
//!   content depends only on `(seed, epoch, batch index)`, never on thread timing.
//! * **Parallelism**: the images of a batch are decoded with `rayon` (the global pool, or a
//!   private one of [`LoaderConfig::threads`] threads); [`Loader::epoch`] runs this on a
//!   background thread that keeps up to [`LoaderConfig::prefetch`] finished batches queued in a
//!   bounded channel while the consumer trains. Dropping the iterator stops the thread.
//! * **Bad files**: an image that cannot be decoded (corrupt, truncated, unsupported format)
//!   or is smaller than one patch is reported on stderr with its path, left out of its batch
//!   and counted ([`Batch::skipped`], [`EpochIter::skipped`]); a batch may thus hold fewer
//!   than `batch_size` images, even none. Each bad file is reported once per loader; it is
//!   counted in every epoch ([`EpochIter::skipped_files`] names them for an epoch summary).
//!   When no image of a whole epoch can be read the iterator yields an error saying so.
//! * **Resume**: [`Loader::epoch_from`] starts at a batch index; [`Loader::batch`] builds one
//!   batch synchronously.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;

use crate::image_folder::{load_rgb, ImageFolder};
use crate::patches::{num_patches, patch_dim, patchify_into};
use crate::rng::{permutation, SplitMix64};
use crate::transforms::Transform;

/// Settings of a [`Loader`].
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Images per batch (`> 0`).
    pub batch_size: usize,
    /// Patch side `P`; the transform's output size must be a multiple of it, and smaller inputs
    /// are skipped.
    pub patch: usize,
    /// Transform applied to every image (its `size`, colour and normalisation). Its layout must
    /// be HWC; its `min_side` is raised to `patch`.
    pub transform: Transform,
    /// Seed of the shuffling and of the random transforms.
    pub seed: u64,
    /// Whether each epoch visits the samples in a seeded random order (else folder order).
    pub shuffle: bool,
    /// Whether to leave out the last, partial batch of an epoch.
    pub drop_last: bool,
    /// Finished batches kept queued ahead of the consumer (`>= 1`).
    pub prefetch: usize,
    /// Decoding threads: 0 uses rayon's global pool, `n > 0` a private pool of `n` threads.
    pub threads: usize,
    /// Whether to print a warning on stderr (with the file and the reason) the first time an
    /// image is skipped; later epochs still skip and count it, silently.
    pub warn: bool,
}

impl LoaderConfig {
    /// Defaults: seed 0, shuffled, partial last batch kept, 2 batches prefetched, rayon's global
    /// pool, warnings on.
    pub fn new(transform: Transform, patch: usize, batch_size: usize) -> Self {
        Self {
            batch_size,
            patch,
            transform,
            seed: 0,
            shuffle: true,
            drop_last: false,
            prefetch: 2,
            threads: 0,
            warn: true,
        }
    }
}

/// One batch of patchified images.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `batch × tokens × patch_dim` values (image-major, then patch, then value in patch).
    pub patches: Vec<f32>,
    /// Label id of each image, `batch` values.
    pub labels: Vec<usize>,
    /// Number of images in this batch (`batch_size`, fewer for a partial last batch or when
    /// images were skipped).
    pub batch: usize,
    /// Images of this batch left out because they could not be read.
    pub skipped: usize,
    /// Epoch this batch belongs to.
    pub epoch: u64,
    /// Index of this batch in its epoch.
    pub index: usize,
    /// Patches per image, `T = (S / P)²`.
    pub tokens: usize,
    /// Values per patch, `P · P · C`.
    pub patch_dim: usize,
    /// Sample indices (into [`ImageFolder::samples`]) of the images, `batch` values.
    pub samples: Vec<usize>,
    /// Paths of the images left out, `skipped` values.
    pub skipped_files: Vec<PathBuf>,
}

struct Inner {
    folder: ImageFolder,
    cfg: LoaderConfig,
    tokens: usize,
    patch_dim: usize,
    image_len: usize,
    pool: Option<rayon::ThreadPool>,
    /// Samples already warned about: each bad file is reported once per loader, not per epoch.
    reported: Mutex<HashSet<usize>>,
}

/// Batches of an [`ImageFolder`] (see the module docs). Cheap to clone (shared).
#[derive(Clone)]
pub struct Loader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("root", &self.inner.folder.root())
            .field("images", &self.inner.folder.len())
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

impl Loader {
    /// Checks `cfg` against `folder` and builds the loader. Errors: batch size or prefetch 0, a
    /// transform size that is not a multiple of the patch, a CHW transform, invalid transform
    /// settings, a thread pool that cannot be started.
    pub fn new(folder: ImageFolder, mut cfg: LoaderConfig) -> Result<Self> {
        ensure!(cfg.batch_size > 0, "batch size must be > 0");
        ensure!(cfg.prefetch > 0, "prefetch must be at least 1 batch");
        ensure!(
            cfg.transform.layout == crate::transforms::Layout::Hwc,
            "the loader patchifies HWC images: set the transform layout to Hwc"
        );
        ensure!(
            !folder.is_empty(),
            "image folder {} has no image",
            folder.root().display()
        );
        let size = cfg.transform.size as usize;
        let tokens = num_patches(size, cfg.patch).context("loader image and patch sizes")?;
        let patch_dim = patch_dim(cfg.patch, cfg.transform.channels())?;
        let min_side = u32::try_from(cfg.patch)
            .with_context(|| format!("patch size {} too large", cfg.patch))?;
        cfg.transform.min_side = cfg.transform.min_side.max(min_side);
        cfg.transform.validate()?;
        let image_len = cfg.transform.output_len()?;
        image_len
            .checked_mul(cfg.batch_size)
            .with_context(|| format!("batch of {} images overflows", cfg.batch_size))?;
        let pool = if cfg.threads > 0 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.threads)
                    .thread_name(|i| format!("megalodon-vision-decode-{i}"))
                    .build()
                    .context("starting the image decoding thread pool")?,
            )
        } else {
            None
        };
        Ok(Self {
            inner: Arc::new(Inner {
                folder,
                cfg,
                tokens,
                patch_dim,
                image_len,
                pool,
                reported: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// The image folder.
    pub fn folder(&self) -> &ImageFolder {
        &self.inner.folder
    }

    /// The settings (with `transform.min_side` raised to the patch size).
    pub fn config(&self) -> &LoaderConfig {
        &self.inner.cfg
    }

    /// Patches per image, `T`.
    pub fn tokens(&self) -> usize {
        self.inner.tokens
    }

    /// Values per patch, `P · P · C`.
    pub fn patch_dim(&self) -> usize {
        self.inner.patch_dim
    }

    /// Number of classes of the folder.
    pub fn num_classes(&self) -> usize {
        self.inner.folder.num_classes()
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.inner.folder.len(), self.inner.cfg.batch_size);
        if self.inner.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The order (sample indices) in which epoch `epoch` visits the folder.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        self.inner.order(epoch)
    }

    /// Builds batch `index` of epoch `epoch` now, on the calling thread (decoding still in
    /// parallel). Errors when `index` is past the epoch's end.
    pub fn batch(&self, epoch: u64, index: usize) -> Result<Batch> {
        let n = self.batches_per_epoch();
        ensure!(
            index < n,
            "batch index {index} out of range: an epoch has {n} batches"
        );
        self.inner.build(&self.inner.order(epoch), epoch, index)
    }

    /// Iterates over epoch `epoch` from its first batch, prefetching on a background thread.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.spawn(epoch, 0)
    }

    /// Iterates over epoch `epoch` from batch `start` (to resume an interrupted epoch); `start`
    /// equal to [`Self::batches_per_epoch`] gives an empty iteration. Errors when `start` is
    /// past that.
    pub fn epoch_from(&self, epoch: u64, start: usize) -> Result<EpochIter> {
        let n = self.batches_per_epoch();
        ensure!(
            start <= n,
            "cannot resume at batch {start}: an epoch has {n} batches"
        );
        Ok(self.spawn(epoch, start))
    }

    fn spawn(&self, epoch: u64, start: usize) -> EpochIter {
        let (tx, rx) = sync_channel(self.inner.cfg.prefetch);
        let stop = Arc::new(AtomicBool::new(false));
        let inner = Arc::clone(&self.inner);
        let stop_worker = Arc::clone(&stop);
        let n = self.batches_per_epoch();
        let worker = std::thread::Builder::new()
            .name("megalodon-vision-prefetch".into())
            .spawn(move || {
                let order = inner.order(epoch);
                let (mut decoded, mut skipped) = (0usize, 0usize);
                for index in start..n {
                    if stop_worker.load(Ordering::Relaxed) {
                        return;
                    }
                    let item = inner.build(&order, epoch, index);
                    let fatal = item.is_err();
                    if let Ok(b) = &item {
                        decoded += b.batch;
                        skipped += b.skipped;
                    }
                    if tx.send(item).is_err() || fatal {
                        return;
                    }
                }
                if decoded == 0 && skipped > 0 {
                    let _ = tx.send(Err(anyhow!(
                        "no readable image in {}: all {skipped} image file(s) of epoch {epoch} \
                         failed to decode (see the warnings above)",
                        inner.folder.root().display()
                    )));
                }
            });
        let (rx, worker, failed) = match worker {
            Ok(h) => (Some(rx), Some(h), None),
            Err(e) => (
                None,
                None,
                Some(anyhow!("cannot start the prefetch thread: {e}")),
            ),
        };
        EpochIter {
            rx,
            worker,
            stop,
            failed,
            epoch,
            skipped: 0,
            skipped_files: Vec::new(),
            images: 0,
            batches: 0,
        }
    }
}

impl Inner {
    fn order(&self, epoch: u64) -> Vec<usize> {
        let n = self.folder.len();
        if self.cfg.shuffle {
            permutation(n, &[self.cfg.seed, epoch])
        } else {
            (0..n).collect()
        }
    }

    /// The transformed, patchified image of sample `i` in `epoch`.
    fn load_one(&self, i: usize, epoch: u64) -> Result<Vec<f32>> {
        let sample = &self.folder.samples()[i];
        let img = load_rgb(&sample.path)?;
        let seed = SplitMix64::derive(&[self.cfg.seed, epoch, i as u64]).next_u64();
        let pixels = self.cfg.transform.apply(&img, &sample.path, seed)?;
        let mut out = vec![0.0; self.image_len];
        let size = self.cfg.transform.size as usize;
        patchify_into(
            &pixels,
            size,
            self.cfg.patch,
            self.cfg.transform.channels(),
            &mut out,
        )?;
        Ok(out)
    }

    /// [`Self::load_one`], with a decoder panic turned into an error naming the file.
    fn load_guarded(&self, i: usize, epoch: u64) -> Result<Vec<f32>> {
        match catch_unwind(AssertUnwindSafe(|| self.load_one(i, epoch))) {
            Ok(r) => r,
            Err(_) => bail!(
                "decoder panicked on image {}",
                self.folder.samples()[i].path.display()
            ),
        }
    }

    fn build(&self, order: &[usize], epoch: u64, index: usize) -> Result<Batch> {
        let bs = self.cfg.batch_size;
        let lo = index
            .checked_mul(bs)
            .filter(|&lo| lo < order.len())
            .with_context(|| format!("batch {index} is past the end of the epoch"))?;
        let hi = lo.saturating_add(bs).min(order.len());
        let ids = &order[lo..hi];
        let decode = || -> Vec<Result<Vec<f32>>> {
            ids.par_iter()
                .map(|&i| self.load_guarded(i, epoch))
                .collect()
        };
        let results = match &self.pool {
            Some(pool) => pool.install(decode),
            None => decode(),
        };
        let mut patches = Vec::with_capacity(self.image_len * ids.len());
        let mut labels = Vec::with_capacity(ids.len());
        let mut samples = Vec::with_capacity(ids.len());
        let mut skipped_files = Vec::new();
        for (&i, r) in ids.iter().zip(results) {
            match r {
                Ok(img) => {
                    patches.extend_from_slice(&img);
                    labels.push(self.folder.samples()[i].label);
                    samples.push(i);
                }
                Err(e) => {
                    if self.cfg.warn && self.first_report(i) {
                        eprintln!(
                            "warning: skipping an image (epoch {epoch}, batch {index}): {e:#}"
                        );
                    }
                    skipped_files.push(self.folder.samples()[i].path.clone());
                }
            }
        }
        Ok(Batch {
            patches,
            batch: labels.len(),
            labels,
            skipped: skipped_files.len(),
            epoch,
            index,
            tokens: self.tokens,
            patch_dim: self.patch_dim,
            samples,
            skipped_files,
        })
    }

    /// Whether sample `i` has not been reported yet (and marks it reported).
    fn first_report(&self, i: usize) -> bool {
        match self.reported.lock() {
            Ok(mut set) => set.insert(i),
            Err(poisoned) => poisoned.into_inner().insert(i),
        }
    }
}

/// The batches of one epoch, built ahead on a background thread (see [`Loader::epoch`]).
///
/// Yields `Ok(batch)` in index order; an `Err` ends the iteration (no readable image in the
/// whole epoch, or the background thread failed). Dropping it stops the background thread.
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    failed: Option<anyhow::Error>,
    epoch: u64,
    skipped: usize,
    skipped_files: Vec<PathBuf>,
    images: usize,
    batches: usize,
}

impl EpochIter {
    /// The epoch being iterated.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Images skipped (unreadable) in the batches yielded so far: for the epoch summary.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Paths of the images skipped in the batches yielded so far.
    pub fn skipped_files(&self) -> &[PathBuf] {
        &self.skipped_files
    }

    /// Images delivered in the batches yielded so far.
    pub fn images(&self) -> usize {
        self.images
    }

    /// Batches yielded so far.
    pub fn batches(&self) -> usize {
        self.batches
    }

    fn shutdown(&mut self) -> Option<anyhow::Error> {
        self.stop.store(true, Ordering::Relaxed);
        self.rx = None; // unblocks a worker waiting to send
        match self.worker.take().map(JoinHandle::join) {
            Some(Err(_)) => Some(anyhow!("the batch prefetch thread panicked")),
            _ => None,
        }
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if let Some(e) = self.failed.take() {
            return Some(Err(e));
        }
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(Ok(b)) => {
                self.skipped += b.skipped;
                self.skipped_files.extend(b.skipped_files.iter().cloned());
                self.images += b.batch;
                self.batches += 1;
                Some(Ok(b))
            }
            Ok(Err(e)) => {
                self.shutdown();
                Some(Err(e))
            }
            Err(_) => self.shutdown().map(Err),
        }
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.shutdown();
    }
}
