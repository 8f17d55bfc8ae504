//! Tests of the megalodon-vision data layer: image folder, transforms, patches, loader.
//! One test binary (modules below) to keep link time down.

mod common;
mod export;
mod image_folder;
mod loader;
mod patches;
mod transforms;
