//! Epoch iteration over an [`AudioFolder`]: seeded shuffling, parallel decoding, prefetching.
//!
//! * **Order**: epoch `e` visits the files in a permutation seeded by `(seed, e)`
//!   ([`Loader::order`]); without shuffling, in folder order. Batch `i` is positions
//!   `i · batch_size ..` of that order; the last batch is partial unless `drop_last`.
//! * **Content**: each file is decoded ([`read_wav`]) and made into a clip
//!   ([`make_clip_into`]) with a generator seeded by `(seed, epoch, file index)`, so a batch's
//!   content depends only on `(seed, epoch, batch index)`, never on thread timing.
//! * **Parallelism**: the files of a batch are decoded with `rayon` (the global pool, or a
//!   private one of [`LoaderConfig::threads`] threads); [`Loader::epoch`] runs this on a
//!   background thread that keeps up to [`LoaderConfig::prefetch`] finished batches queued in
//!   a bounded channel while the consumer trains. Dropping the iterator stops the thread.
//! * **Bad files**: a file that cannot be decoded (corrupt, truncated, unsupported, empty,
//!   too long, NaN samples) is reported on stderr with its path the first time, left out of
//!   its batch and counted ([`Batch::skipped`], [`EpochIter::skipped`]); a batch may thus hold
//!   fewer than `batch_size` clips, even none. When no file of a whole epoch can be read the
//!   iterator yields an error saying so.
//! * **Resume**: [`Loader::epoch_from`] starts at a batch index; [`Loader::batch`] builds one
//!   batch synchronously. Both give exactly the batches an uninterrupted epoch gives.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;

use crate::augment::{make_clip_into, Augment, ClipConfig};
use crate::clip::{frame, frame_lengths, mask};
use crate::dataset::AudioFolder;
use crate::rng::{permutation, SplitMix64};
use crate::wav::{read_wav, ReadOptions};

/// Settings of a [`Loader`].
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Clips per batch (`> 0`).
    pub batch_size: usize,
    /// Clip length, crop and normalisation.
    pub clip: ClipConfig,
    /// Training augmentation (`None` for evaluation).
    pub augment: Option<Augment>,
    /// How files are decoded (target rate, duration limit).
    pub read: ReadOptions,
    /// Seed of the shuffling, cropping and augmentation.
    pub seed: u64,
    /// Whether each epoch visits the files in a seeded random order (else folder order).
    pub shuffle: bool,
    /// Whether to leave out the last, partial batch of an epoch.
    pub drop_last: bool,
    /// Finished batches kept queued ahead of the consumer (`>= 1`).
    pub prefetch: usize,
    /// Decoding threads: 0 uses rayon's global pool, `n > 0` a private pool of `n` threads.
    pub threads: usize,
    /// Whether to warn on stderr (with the file and the reason) the first time a file is
    /// skipped; later epochs skip and count it silently.
    pub warn: bool,
}

impl LoaderConfig {
    /// Training settings: random crop of [`crate::clip::DEFAULT_CLIP_LEN`] samples, the given
    /// augmentation, shuffled, seed 0, 2 batches prefetched, rayon's global pool, warnings on.
    pub fn train(batch_size: usize, augment: Option<Augment>) -> Self {
        Self {
            batch_size,
            clip: ClipConfig::train(crate::clip::DEFAULT_CLIP_LEN),
            augment,
            read: ReadOptions::default(),
            seed: 0,
            shuffle: true,
            drop_last: false,
            prefetch: 2,
            threads: 0,
            warn: true,
        }
    }

    /// Evaluation settings: centre crop, no augmentation, folder order.
    pub fn eval(batch_size: usize) -> Self {
        Self {
            clip: ClipConfig::eval(crate::clip::DEFAULT_CLIP_LEN),
            shuffle: false,
            ..Self::train(batch_size, None)
        }
    }
}

/// One batch of fixed-length clips.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `batch × clip_len` samples, row-major.
    pub samples: Vec<f32>,
    /// Real (unpadded) length of each row, `batch` values; the rest of a row is zeros.
    pub lengths: Vec<usize>,
    /// Label id of each row, `batch` values.
    pub labels: Vec<usize>,
    /// Rows in this batch (`batch_size`, fewer for a partial last batch or skipped files).
    pub batch: usize,
    /// Files of this batch left out because they could not be read.
    pub skipped: usize,
    /// Samples per row, `L`.
    pub clip_len: usize,
    /// Epoch this batch belongs to.
    pub epoch: u64,
    /// Index of this batch in its epoch.
    pub index: usize,
    /// File indices (into [`AudioFolder::samples`]) of the rows, `batch` values.
    pub ids: Vec<usize>,
    /// Paths of the files left out, `skipped` values.
    pub skipped_files: Vec<PathBuf>,
}

impl Batch {
    /// The padding mask, `batch × clip_len` values: 1 for real samples, 0 for padding.
    pub fn mask(&self) -> Vec<f32> {
        mask(&self.lengths, self.clip_len)
    }

    /// The samples as `batch × tokens × frame_len` frames ([`crate::clip::frame`]) with each
    /// row's real length in frames.
    pub fn frames(&self, frame_len: usize) -> Result<(crate::clip::Framed, Vec<usize>)> {
        let framed = frame(&self.samples, self.clip_len, frame_len)?;
        Ok((framed, frame_lengths(&self.lengths, frame_len)?))
    }
}

struct Inner {
    folder: AudioFolder,
    cfg: LoaderConfig,
    pool: Option<rayon::ThreadPool>,
    /// Files already warned about: each bad file is reported once per loader.
    reported: Mutex<HashSet<usize>>,
}

/// Batches of an [`AudioFolder`] (see the module docs). Cheap to clone (shared).
#[derive(Clone)]
pub struct Loader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("root", &self.inner.folder.root())
            .field("files", &self.inner.folder.len())
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

impl Loader {
    /// Checks `cfg` and builds the loader. Errors: batch size, clip length or prefetch 0, a
    /// batch size that overflows, an empty folder, a thread pool that cannot start.
    pub fn new(folder: AudioFolder, cfg: LoaderConfig) -> Result<Self> {
        ensure!(cfg.batch_size > 0, "batch size must be > 0");
        ensure!(cfg.clip.len > 0, "clip length must be > 0");
        ensure!(cfg.prefetch > 0, "prefetch must be at least 1 batch");
        ensure!(
            !folder.is_empty(),
            "audio set {} has no WAV file",
            folder.root().display()
        );
        cfg.clip
            .len
            .checked_mul(cfg.batch_size)
            .with_context(|| format!("batch of {} clips overflows", cfg.batch_size))?;
        if let Some(a) = &cfg.augment {
            a.config().validate()?;
        }
        let pool = if cfg.threads > 0 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.threads)
                    .thread_name(|i| format!("megalodon-audio-decode-{i}"))
                    .build()
                    .context("starting the audio decoding thread pool")?,
            )
        } else {
            None
        };
        Ok(Self {
            inner: Arc::new(Inner {
                folder,
                cfg,
                pool,
                reported: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// The audio set.
    pub fn folder(&self) -> &AudioFolder {
        &self.inner.folder
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.inner.cfg
    }

    /// Number of labels of the set.
    pub fn num_labels(&self) -> usize {
        self.inner.folder.num_labels()
    }

    /// Samples per clip, `L`.
    pub fn clip_len(&self) -> usize {
        self.inner.cfg.clip.len
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

    /// The order (file indices) in which epoch `epoch` visits the set.
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

    /// Iterates over epoch `epoch` from batch `start` (to resume an interrupted epoch);
    /// `start` equal to [`Self::batches_per_epoch`] gives an empty iteration. Errors when
    /// `start` is past that.
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
            .name("megalodon-audio-prefetch".into())
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
                        "no readable WAV in {}: all {skipped} file(s) of epoch {epoch} failed to \
                         decode (see the warnings above)",
                        inner.folder.root().display()
                    )));
                }
            });
        let (rx, worker, failed) = match worker {
            Ok(h) => (Some(rx), Some(h), None),
            Err(e) => (
                None,
                None,
                Some(anyhow!("cannot start the audio prefetch thread: {e}")),
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
            clips: 0,
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

    /// The clip of file `i` in `epoch`, written into `out`; returns its real length.
    fn load_one(&self, i: usize, epoch: u64, out: &mut [f32]) -> Result<usize> {
        let path = &self.folder.samples()[i].path;
        let raw = read_wav(path, &self.cfg.read)?;
        let mut rng = SplitMix64::from_keys(&[self.cfg.seed, epoch, i as u64]);
        Ok(make_clip_into(
            &raw,
            out,
            &self.cfg.clip,
            self.cfg.augment.as_ref(),
            &mut rng,
        ))
    }

    /// [`Self::load_one`] with a decoder panic turned into an error naming the file.
    fn load_guarded(&self, i: usize, epoch: u64, out: &mut [f32]) -> Result<usize> {
        match catch_unwind(AssertUnwindSafe(|| self.load_one(i, epoch, out))) {
            Ok(r) => r,
            Err(_) => bail!(
                "decoder panicked on WAV {}",
                self.folder.samples()[i].path.display()
            ),
        }
    }

    fn build(&self, order: &[usize], epoch: u64, index: usize) -> Result<Batch> {
        let bs = self.cfg.batch_size;
        let len = self.cfg.clip.len;
        let lo = index
            .checked_mul(bs)
            .filter(|&lo| lo < order.len())
            .with_context(|| format!("batch {index} is past the end of the epoch"))?;
        let hi = lo.saturating_add(bs).min(order.len());
        let ids = &order[lo..hi];
        // One row per file, decoded in parallel straight into the batch buffer.
        let mut buf = vec![0.0f32; ids.len() * len];
        let decode = |buf: &mut Vec<f32>| -> Vec<Result<usize>> {
            buf.par_chunks_mut(len)
                .zip(ids.par_iter())
                .map(|(row, &i)| self.load_guarded(i, epoch, row))
                .collect()
        };
        let results = match &self.pool {
            Some(pool) => pool.install(|| decode(&mut buf)),
            None => decode(&mut buf),
        };
        // Compact: keep the rows that decoded, in order.
        let mut kept = 0usize;
        let mut lengths = Vec::with_capacity(ids.len());
        let mut labels = Vec::with_capacity(ids.len());
        let mut kept_ids = Vec::with_capacity(ids.len());
        let mut skipped_files = Vec::new();
        for (row, (&i, r)) in ids.iter().zip(results).enumerate() {
            match r {
                Ok(length) => {
                    if kept != row {
                        buf.copy_within(row * len..(row + 1) * len, kept * len);
                    }
                    kept += 1;
                    lengths.push(length);
                    labels.push(self.folder.samples()[i].label);
                    kept_ids.push(i);
                }
                Err(e) => {
                    if self.cfg.warn && self.first_report(i) {
                        eprintln!("warning: skipping a WAV (epoch {epoch}, batch {index}): {e:#}");
                    }
                    skipped_files.push(self.folder.samples()[i].path.clone());
                }
            }
        }
        buf.truncate(kept * len);
        Ok(Batch {
            samples: buf,
            lengths,
            labels,
            batch: kept,
            skipped: skipped_files.len(),
            clip_len: len,
            epoch,
            index,
            ids: kept_ids,
            skipped_files,
        })
    }

    /// Whether file `i` has not been reported yet (and marks it reported).
    fn first_report(&self, i: usize) -> bool {
        match self.reported.lock() {
            Ok(mut set) => set.insert(i),
            Err(poisoned) => poisoned.into_inner().insert(i),
        }
    }
}

/// The batches of one epoch, built ahead on a background thread (see [`Loader::epoch`]).
///
/// Yields `Ok(batch)` in index order; an `Err` ends the iteration (no readable file in the
/// whole epoch, or the background thread failed). Dropping it stops the background thread.
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    failed: Option<anyhow::Error>,
    epoch: u64,
    skipped: usize,
    skipped_files: Vec<PathBuf>,
    clips: usize,
    batches: usize,
}

impl EpochIter {
    /// The epoch being iterated.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Files skipped (unreadable) in the batches yielded so far: for the epoch summary.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Paths of the files skipped in the batches yielded so far.
    pub fn skipped_files(&self) -> &[PathBuf] {
        &self.skipped_files
    }

    /// Clips delivered in the batches yielded so far.
    pub fn clips(&self) -> usize {
        self.clips
    }

    /// Batches yielded so far.
    pub fn batches(&self) -> usize {
        self.batches
    }

    fn shutdown(&mut self) -> Option<anyhow::Error> {
        self.stop.store(true, Ordering::Relaxed);
        self.rx = None; // unblocks a worker waiting to send
        match self.worker.take().map(JoinHandle::join) {
            Some(Err(_)) => Some(anyhow!("the audio prefetch thread panicked")),
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
                self.clips += b.batch;
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
