//! tessera-data: VISSL's data side for the vision-transformer configs:
//! datasets, sampler, collators and a threaded loader over image decoding and
//! the transforms of the TRANSFORMS lists (torchvision's semantics on
//! Pillow's arithmetic), plus a synthetic ImageFolder generator.
//!
//! The engine's view:
//!
//! ```no_run
//! use tessera_data::{Loader, LoaderOptions};
//! # fn run(data: &serde_json::Value) -> tessera_data::Result<()> {
//! let catalog = std::path::Path::new("configs/dataset_catalog.json");
//! let loader = Loader::from_config(data, "TRAIN", catalog, &LoaderOptions::default())?; // data = config DATA node
//! let mut batches = loader.epoch(0);
//! for batch in batches.by_ref() {
//!     let batch = batch?; // views[p]: f32 [B, C, H, W]; labels; data_idx; data_valid
//! }
//! let gray = batches.report().gray_images; // unreadable files replaced this epoch
//! # Ok(()) }
//! ```
//!
//! Data flow: config -> [`Dataset`] (paths, labels) -> [`sampler`] (this
//! rank's order, batches) -> per sample: bytes -> [`decode`] -> [`Image`]
//! (8-bit RGB, the PIL stage) -> [`Pipeline`] (PIL transforms -> ToTensor ->
//! [`Tensor`] f32 CHW -> tensor transforms) -> [`Collator`] -> [`Batch`].
//! Invariants: config errors surface before training and name the key;
//! decoding never panics on bad bytes; a batch is a pure function of
//! (config, seed, epoch, batch index), whatever the worker count; the
//! deterministic image ops match Pillow 13 (see tests/pillow_parity.rs).

mod collate;
mod color;
mod config;
pub use config::{MAX_IMAGE_SIDE, MAX_RAND_AUGMENT_LAYERS, MAX_VIEWS};
mod dataset;
mod decode;
mod error;
mod filter;
pub mod functional;
mod geometry;
mod image;
mod loader;
mod pipeline;
mod resample;
mod rng;
pub mod sampler;
mod split_config;
pub mod synth;
mod tensor;
pub mod transforms;

pub use collate::{
    box_lam, cutmix_box, Batch, BatchTensor, CollateSample, Collator, CutMixUp, Labels, MixMode, MixUnit, SslMethod,
    COLLATE_FUNCTIONS,
};
pub use dataset::{
    synthetic_image, Dataset, DatasetOptions, ImageWarning, Sample, DATA_SOURCES, ERROR_ON_UNREADABLE_IMAGE,
    IMG_EXTENSIONS, SYNTHETIC_DEFAULT_SIZE,
};
pub use decode::{decode, decode_file, read_image_file, MAX_IMAGE_FILE_BYTES, MAX_PIXELS};
pub use error::{Error, Result};
pub use image::{Image, MEAN_GRAY};
pub use loader::{recv_or_stop, Epoch, EpochReport, Loader, LoaderOptions, Wait, MAX_WARNINGS_KEPT};
pub use pipeline::Pipeline;
pub use rng::{philox4x32_10, SampleKey, SampleRng};
pub use synth::{write_image_folder, SynthOptions, SynthReport};
pub use tensor::Tensor;
