//! The data path shared by every head (`docs/design.md` §11): a seeded generator whose streams
//! do not depend on dependency versions or thread timing, the labelled-folder reader of the
//! classifier heads, and their prefetching epoch loader. What a file becomes (patches of an
//! image, a clip of a WAV) is the head's [`loader::Decode`]; nothing else differs.

pub mod label_folder;
pub mod loader;
pub mod rng;

pub use label_folder::{FileKind, LabelFolder, Sample};
pub use loader::{Batch, Decode, EpochIter, Loader, LoaderConfig, StepBatches};
pub use rng::{permutation, SplitMix64};
