//! Epoch iteration over a [`LabelFolder`]: seeded shuffling, parallel decoding, prefetching. One
//! loader for every classifier head; what a file becomes (patches of an image, a clip of a WAV)
//! is the head's [`Decode`] (`docs/design.md` §11).
//!
//! * **Order**: epoch `e` visits the samples in a permutation seeded by `(seed, e)`
//!   ([`Loader::order`]); without shuffling, in folder order. Batch `i` is positions
//!   `i · batch_size ..` of that order; the last batch is partial unless `drop_last`.
//! * **Content**: each file is decoded into one row of [`Loader::row_len`] values with a
//!   generator seeded by `(seed, epoch, sample index)`, so a batch's content depends only on
//!   `(seed, epoch, batch index)`, never on thread timing.
//! * **Parallelism**: the files of a batch are decoded with `rayon` (the global pool, or a
//!   private one of [`LoaderConfig::threads`] threads); [`Loader::epoch`] runs this on a
//!   background thread that keeps up to [`LoaderConfig::prefetch`] finished batches queued in a
//!   bounded channel while the consumer trains. Dropping the iterator stops the thread.
//! * **Bad files**: a file that cannot be decoded (corrupt, truncated, unsupported, too small,
//!   a decoder panic) is reported on stderr with its path the first time, left out of its batch
//!   and counted ([`Batch::skipped`], [`EpochIter::skipped`]); a batch may thus hold fewer than
//!   `batch_size` rows, even none. When no file of a whole epoch can be read the iterator yields
//!   an error saying so.
//! * **Resume**: [`Loader::epoch_from`] starts at a batch index; [`Loader::batch`] builds one
//!   batch synchronously. Both give exactly the batches an uninterrupted epoch gives.

use std::collections::HashSet;
use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;

use super::label_folder::{FileKind, LabelFolder};
use super::rng::{permutation, SplitMix64};

/// How one file of a [`LabelFolder`] becomes one row of a batch: a head's decoding settings.
pub trait Decode: Clone + Debug + Send + Sync + 'static {
    /// The files it reads.
    type Kind: FileKind;

    /// Checks the settings (and may complete them, e.g. raise a minimum size) before any file
    /// is read; returns the row length (values per file), at least 1.
    fn prepare(&mut self) -> Result<usize>;

    /// Decodes the file at `path` into `out` (one row of zeros), drawing any randomness from
    /// `rng`; returns the row's real length (`out.len()` unless the rest is padding).
    fn decode(&self, path: &Path, rng: &mut SplitMix64, out: &mut [f32]) -> Result<usize>;
}

/// Settings of a [`Loader`]: the batching shared by every head, and the head's [`Decode`].
#[derive(Debug, Clone)]
pub struct LoaderConfig<P> {
    /// Rows per batch (`> 0`).
    pub batch_size: usize,
    /// What each file becomes.
    pub decode: P,
    /// Seed of the shuffling and of the decoder's randomness.
    pub seed: u64,
    /// Whether each epoch visits the samples in a seeded random order (else folder order).
    pub shuffle: bool,
    /// Whether to leave out the last, partial batch of an epoch.
    pub drop_last: bool,
    /// Finished batches kept queued ahead of the consumer (`>= 1`).
    pub prefetch: usize,
    /// Decoding threads: 0 uses rayon's global pool, `n > 0` a private pool of `n` threads.
    pub threads: usize,
    /// Whether to print a warning on stderr (with the file and the reason) the first time a
    /// file is skipped; later epochs still skip and count it, silently.
    pub warn: bool,
}

impl<P> LoaderConfig<P> {
    /// Training defaults: seed 0, shuffled, partial last batch kept, 2 batches prefetched,
    /// rayon's global pool, warnings on.
    pub fn new(decode: P, batch_size: usize) -> Self {
        Self {
            batch_size,
            decode,
            seed: 0,
            shuffle: true,
            drop_last: false,
            prefetch: 2,
            threads: 0,
            warn: true,
        }
    }

    /// Evaluation defaults: [`Self::new`] in folder order.
    pub fn ordered(decode: P, batch_size: usize) -> Self {
        Self {
            shuffle: false,
            ..Self::new(decode, batch_size)
        }
    }
}

/// One batch of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `batch × row_len` values, row-major.
    pub values: Vec<f32>,
    /// Real (unpadded) length of each row, `batch` values; the rest of a row is zeros.
    pub lengths: Vec<usize>,
    /// Label id of each row, `batch` values.
    pub labels: Vec<usize>,
    /// Rows in this batch (`batch_size`, fewer for a partial last batch or skipped files).
    pub batch: usize,
    /// Files of this batch left out because they could not be read.
    pub skipped: usize,
    /// Values per row.
    pub row_len: usize,
    /// Epoch this batch belongs to.
    pub epoch: u64,
    /// Index of this batch in its epoch.
    pub index: usize,
    /// Sample indices (into [`LabelFolder::samples`]) of the rows, `batch` values.
    pub ids: Vec<usize>,
    /// Paths of the files left out, `skipped` values.
    pub skipped_files: Vec<PathBuf>,
}

impl Batch {
    /// Rank `part`'s rows (of `parts`) for data-parallel training
    /// ([`crate::fit::Trainable::shard`]): a contiguous run of rows, sizes differing by at most
    /// one (a batch that lost rows to unreadable files may split unevenly; the ranks' gradients
    /// are weighted by their row counts). `skipped` and `skipped_files` stay with part 0.
    pub fn shard(&self, part: usize, parts: usize) -> Result<Batch> {
        let (lo, hi) = crate::distributed::shard_range(self.batch, part, parts)?;
        let n = self.row_len;
        let (skipped, skipped_files) = if part == 0 {
            (self.skipped, self.skipped_files.clone())
        } else {
            (0, Vec::new())
        };
        Ok(Batch {
            values: self.values[lo * n..hi * n].to_vec(),
            lengths: self.lengths[lo..hi].to_vec(),
            labels: self.labels[lo..hi].to_vec(),
            batch: hi - lo,
            skipped,
            row_len: n,
            epoch: self.epoch,
            index: self.index,
            ids: self.ids[lo..hi].to_vec(),
            skipped_files,
        })
    }
}

struct Inner<P: Decode> {
    folder: LabelFolder<P::Kind>,
    cfg: LoaderConfig<P>,
    row_len: usize,
    pool: Option<rayon::ThreadPool>,
    /// Samples already warned about: each bad file is reported once per loader, not per epoch.
    reported: Mutex<HashSet<usize>>,
}

/// Batches of a [`LabelFolder`] (see the module docs). Cheap to clone (shared).
pub struct Loader<P: Decode> {
    inner: Arc<Inner<P>>,
}

impl<P: Decode> Clone for Loader<P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<P: Decode> Debug for Loader<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("root", &self.inner.folder.root())
            .field("files", &self.inner.folder.len())
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

impl<P: Decode> Loader<P> {
    /// Checks `cfg` against `folder` and builds the loader. Errors: batch size or prefetch 0,
    /// an empty folder, invalid decoding settings, a batch whose size overflows, a thread pool
    /// that cannot be started.
    pub fn new(folder: LabelFolder<P::Kind>, mut cfg: LoaderConfig<P>) -> Result<Self> {
        let what = <P::Kind as FileKind>::WHAT;
        ensure!(cfg.batch_size > 0, "batch size must be > 0");
        ensure!(cfg.prefetch > 0, "prefetch must be at least 1 batch");
        ensure!(
            !folder.is_empty(),
            "{} has no {what} file",
            folder.root().display()
        );
        let row_len = cfg.decode.prepare()?;
        ensure!(row_len > 0, "{what} rows must hold at least one value");
        row_len.checked_mul(cfg.batch_size).with_context(|| {
            format!(
                "a batch of {} rows of {row_len} values overflows",
                cfg.batch_size
            )
        })?;
        let pool = if cfg.threads > 0 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.threads)
                    .thread_name(|i| format!("megalodon-decode-{i}"))
                    .build()
                    .with_context(|| format!("starting the {what} decoding thread pool"))?,
            )
        } else {
            None
        };
        Ok(Self {
            inner: Arc::new(Inner {
                folder,
                cfg,
                row_len,
                pool,
                reported: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// The files.
    pub fn folder(&self) -> &LabelFolder<P::Kind> {
        &self.inner.folder
    }

    /// The settings, as completed by [`Decode::prepare`].
    pub fn config(&self) -> &LoaderConfig<P> {
        &self.inner.cfg
    }

    /// The decoding settings.
    pub fn decode(&self) -> &P {
        &self.inner.cfg.decode
    }

    /// Number of labels of the folder.
    pub fn num_labels(&self) -> usize {
        self.inner.folder.num_labels()
    }

    /// Values per row.
    pub fn row_len(&self) -> usize {
        self.inner.row_len
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
            .name("megalodon-prefetch".into())
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
                        "no readable {} file in {}: all {skipped} file(s) of epoch {epoch} failed \
                         to decode (see the warnings above)",
                        <P::Kind as FileKind>::WHAT,
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
            rows: 0,
            batches: 0,
        }
    }
}

impl<P: Decode> Inner<P> {
    fn order(&self, epoch: u64) -> Vec<usize> {
        let n = self.folder.len();
        if self.cfg.shuffle {
            permutation(n, &[self.cfg.seed, epoch])
        } else {
            (0..n).collect()
        }
    }

    /// Sample `i` of `epoch` decoded into `row` (zeros); returns its real length. A decoder
    /// panic becomes an error naming the file.
    fn load(&self, i: usize, epoch: u64, row: &mut [f32]) -> Result<usize> {
        let path = &self.folder.samples()[i].path;
        let run = || -> Result<usize> {
            let mut rng = SplitMix64::from_keys(&[self.cfg.seed, epoch, i as u64]);
            let len = self.cfg.decode.decode(path, &mut rng, row)?;
            ensure!(
                len <= self.row_len,
                "decoding {} gave {len} values for a row of {}",
                path.display(),
                self.row_len
            );
            Ok(len)
        };
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(r) => r,
            Err(_) => bail!(
                "the decoder panicked on {} file {}",
                <P::Kind as FileKind>::WHAT,
                path.display()
            ),
        }
    }

    fn build(&self, order: &[usize], epoch: u64, index: usize) -> Result<Batch> {
        let (bs, len) = (self.cfg.batch_size, self.row_len);
        let lo = index
            .checked_mul(bs)
            .filter(|&lo| lo < order.len())
            .with_context(|| format!("batch {index} is past the end of the epoch"))?;
        let hi = lo.saturating_add(bs).min(order.len());
        let ids = &order[lo..hi];
        // One row per file, decoded in parallel straight into the batch buffer (its size was
        // checked against overflow in `Loader::new`).
        let mut values = vec![0.0f32; ids.len() * len];
        let decode = |buf: &mut Vec<f32>| -> Vec<Result<usize>> {
            buf.par_chunks_mut(len)
                .zip(ids.par_iter())
                .map(|(row, &i)| self.load(i, epoch, row))
                .collect()
        };
        let results = match &self.pool {
            Some(pool) => pool.install(|| decode(&mut values)),
            None => decode(&mut values),
        };
        // Compact: keep the rows that decoded, in order.
        let mut kept = Vec::with_capacity(ids.len());
        let (mut lengths, mut labels) = (Vec::new(), Vec::new());
        let mut skipped_files = Vec::new();
        for (row, (&i, r)) in ids.iter().zip(results).enumerate() {
            let sample = &self.folder.samples()[i];
            match r {
                Ok(real) => {
                    if kept.len() != row {
                        values.copy_within(row * len..(row + 1) * len, kept.len() * len);
                    }
                    kept.push(i);
                    lengths.push(real);
                    labels.push(sample.label);
                }
                Err(e) => {
                    if self.cfg.warn && self.first_report(i) {
                        eprintln!(
                            "warning: skipping a {} file (epoch {epoch}, batch {index}): {e:#}",
                            <P::Kind as FileKind>::WHAT
                        );
                    }
                    skipped_files.push(sample.path.clone());
                }
            }
        }
        values.truncate(kept.len() * len);
        Ok(Batch {
            values,
            lengths,
            batch: labels.len(),
            labels,
            skipped: skipped_files.len(),
            row_len: len,
            epoch,
            index,
            ids: kept,
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
/// Yields `Ok(batch)` in index order; an `Err` ends the iteration (no readable file in the whole
/// epoch, or the background thread failed). Dropping it stops the background thread.
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    failed: Option<anyhow::Error>,
    epoch: u64,
    skipped: usize,
    skipped_files: Vec<PathBuf>,
    rows: usize,
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

    /// Rows delivered in the batches yielded so far.
    pub fn rows(&self) -> usize {
        self.rows
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
                self.rows += b.batch;
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

/// Batches by optimizer step over a [`Loader`], for the core's training loop: step `s`
/// (1-based) takes batch `(s - 1) % batches_per_epoch` of epoch `(s - 1) / batches_per_epoch`,
/// a pure function of the step (the loader's content depends only on seed, epoch and batch
/// index), so a resumed run sees the batches of the uninterrupted one. One prefetching
/// [`EpochIter`] stays open while the steps are consecutive; a jump (resume) reopens it at the
/// right batch.
pub struct StepBatches<P: Decode> {
    loader: Loader<P>,
    per_epoch: usize,
    iter: Option<EpochIter>,
    /// `(epoch, batch index)` the open iterator yields next.
    next: (u64, usize),
    /// Files skipped in the epoch being iterated, since its iterator opened.
    epoch_skipped: Vec<PathBuf>,
}

impl<P: Decode> StepBatches<P> {
    /// Errors when the loader has no batch per epoch.
    pub fn new(loader: Loader<P>) -> Result<Self> {
        let per_epoch = loader.batches_per_epoch();
        ensure!(
            per_epoch > 0,
            "{} yields no batch per epoch (fewer {} files than one batch with drop_last?)",
            loader.folder().root().display(),
            <P::Kind as FileKind>::WHAT
        );
        Ok(Self {
            loader,
            per_epoch,
            iter: None,
            next: (0, 0),
            epoch_skipped: Vec::new(),
        })
    }

    /// Batches per epoch.
    pub fn per_epoch(&self) -> usize {
        self.per_epoch
    }

    /// The loader.
    pub fn loader(&self) -> &Loader<P> {
        &self.loader
    }

    /// `(epoch, batch index)` of 1-based step `step`.
    pub fn position(&self, step: u64) -> Result<(u64, usize)> {
        ensure!(step >= 1, "steps are numbered from 1");
        let s = step - 1;
        let n = self.per_epoch as u64;
        Ok((s / n, usize::try_from(s % n).context("batch index")?))
    }

    /// The batch of step `step`. When every file of that batch is unreadable, the next batch
    /// of the epoch that has a readable file is taken instead (still a function of the step
    /// alone, so resuming stays exact); an epoch with no readable file is an error.
    pub fn get(&mut self, step: u64) -> Result<Batch> {
        let (epoch, index) = self.position(step)?;
        if self.iter.is_none() || self.next != (epoch, index) || index == 0 {
            self.iter = Some(self.loader.epoch_from(epoch, index)?);
            self.epoch_skipped.clear();
        }
        let it = self.iter.as_mut().context("epoch iterator")?;
        let b = it
            .next()
            .with_context(|| format!("epoch {epoch} ended before batch {index}"))??;
        ensure!(
            b.epoch == epoch && b.index == index,
            "loader yielded batch {} of epoch {}, expected batch {index} of epoch {epoch}",
            b.index,
            b.epoch
        );
        self.epoch_skipped.extend(b.skipped_files.iter().cloned());
        self.next = if index + 1 == self.per_epoch {
            (epoch + 1, 0)
        } else {
            (epoch, index + 1)
        };
        if b.batch > 0 {
            return Ok(b);
        }
        for k in 1..self.per_epoch {
            let other = self.loader.batch(epoch, (index + k) % self.per_epoch)?;
            if other.batch > 0 {
                return Ok(other);
            }
        }
        bail!(
            "no readable {} file in {}: all {} file(s) of epoch {epoch} failed to decode (see \
             the warnings above)",
            <P::Kind as FileKind>::WHAT,
            self.loader.folder().root().display(),
            self.loader.folder().len()
        )
    }

    /// Files skipped so far in the current epoch (since its iterator opened).
    pub fn epoch_skipped(&self) -> &[PathBuf] {
        &self.epoch_skipped
    }

    /// [`Self::epoch_skipped`], emptied.
    pub fn take_epoch_skipped(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.epoch_skipped)
    }
}
