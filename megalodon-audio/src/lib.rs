//! # megalodon-audio
//!
//! Raw-waveform speech classification with Megalodon (Mega's SC-Raw recipe: one token per
//! sample, or a strided embedding of a few raw samples per token on CPUs). This crate holds
//! the data layer; the classifier is built on the core's bidirectional encoder
//! ([`megalodon_core`]).
//!
//! Data flow, each step usable on its own:
//!
//! 1. [`dataset::AudioSplits::open`] scans a data folder (one sub-folder per label; plain,
//!    `train/`+`val/`, or the Speech Commands layout with its list files and
//!    `_background_noise_/`) into [`dataset::AudioFolder`]s of labelled WAV paths.
//! 2. [`wav::read_wav`] decodes one file to mono `f32` at 16 kHz (any PCM or float WAV,
//!    resampled with `rubato`), with errors that name the file.
//! 3. [`augment::make_clip`] fits it to a fixed length (pad or crop, keeping the real
//!    length for a padding mask) and, for training, augments it ([`augment::Augment`]: time
//!    shift, gain, background noise from a [`augment::NoiseBank`]), deterministically in a seed.
//! 4. [`loader::Loader`] batches a folder per epoch: seeded permutation, parallel decoding,
//!    background prefetch, unreadable files reported once, skipped and counted, resumable at
//!    any batch; [`loader::ClipBatch::frames`] reshapes a batch for a strided embedding.
//!
//! ```no_run
//! use megalodon_audio::{augment::{Augment, AugmentConfig}, dataset::AudioSplits};
//! use megalodon_audio::loader::{ClipBatch, Clips, Loader, LoaderConfig};
//! use megalodon_audio::wav::ReadOptions;
//!
//! # fn main() -> anyhow::Result<()> {
//! let splits = AudioSplits::open("data/speech", 0.1, 42)?;
//! let augment = Augment::with_noise_files(AugmentConfig::default(), &splits.noise, &ReadOptions::default())?;
//! let mut cfg = LoaderConfig::new(Clips::train(Some(augment)), 32);
//! cfg.seed = 42;
//! let train = Loader::new(splits.train.clone(), cfg)?;
//! for batch in train.epoch(0) {
//!     let batch = batch?;
//!     let (frames, frame_lengths) = batch.frames(16)?; // 32 × 1000 × 16 for 1 s clips
//!     # let _ = (frames, frame_lengths);
//! }
//! # Ok(())
//! # }
//! ```

pub mod augment;
pub mod clip;
pub mod dataset;
pub mod eval;
pub mod loader;
pub mod model;
pub mod rng;
pub mod train;
pub mod wav;

pub use augment::{make_clip, Augment, AugmentConfig, ClipConfig, NoiseBank, NoiseLevel};
pub use clip::{frame, Crop, Framed, Normalize, DEFAULT_CLIP_LEN};
pub use dataset::{AudioFolder, AudioSplits, Layout, Sample, Wavs};
pub use eval::{evaluate, EvalReport};
pub use loader::{Batch, ClipBatch, Clips, EpochIter, Loader, LoaderConfig};
pub use megalodon_core;
pub use model::{
    load_conf, param_count, AudioConf, AudioModel, AudioPreset, SpeechClassifier, SpeechCommands,
    SpeechCpu, SPEECH_COMMANDS, SPEECH_CPU,
};
pub use rng::SplitMix64;
pub use train::{train, StepBatches, TrainHooks, TrainOptions, TrainSummary};
pub use wav::{read_wav, ReadOptions, TARGET_RATE};
