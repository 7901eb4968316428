//! `Dataset`: one split's samples as VISSL's `GenericSSLDataset` serves them
//! (`vissl/data/ssl_dataset.py`), from a `DATA.TRAIN` / `DATA.TEST` node.
//!
//! - Sources: `disk_folder` (torchvision ImageFolder) and `synthetic`; one
//!   data source per split (every ViT config uses one).
//! - Paths: `DATA_PATHS[0]`, else `DATASET_NAMES[0]` looked up in the catalog.
//! - Labels (reference 5.2): with LABEL_SOURCES the source's labels whatever
//!   LABEL_TYPE says; otherwise `zero` gives 0 and anything else the sample
//!   index (VISSL's hydra_config rewrites `standard` to `sample_index` when
//!   there is no label source).
//! - DATA_LIMIT: a seeded subset (see `subset`).
//! - Unreadable images: VISSL's mean-gray image of DEFAULT_GRAY_IMG_SIZE and
//!   `data_valid = -1`, with a warning naming the file; an error instead when
//!   ERROR_ON_UNREADABLE_IMAGE (proposed key) or the option is set.
//!
//! Every config mistake is an error here, before training, naming the key.

mod catalog;
mod image_folder;
mod subset;
mod synthetic;

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use image_folder::IMG_EXTENSIONS;
pub use synthetic::{generate_image as synthetic_image, SYNTHETIC_DEFAULT_SIZE};

use crate::decode::decode_file;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::split_config::SplitConfig;
use catalog::Catalog;
use image_folder::{FolderError, ImageFolder};
use synthetic::Synthetic;

/// The data sources implemented, as DATA_SOURCES names them.
pub const DATA_SOURCES: [&str; 2] = ["disk_folder", "synthetic"];

/// The config key (in DATA.TRAIN / DATA.TEST) that turns an unreadable image
/// into an error instead of a gray stand-in. Not yet in defaults.yaml: when
/// absent, `DatasetOptions::error_on_unreadable_image` decides.
pub const ERROR_ON_UNREADABLE_IMAGE: &str = "ERROR_ON_UNREADABLE_IMAGE";

/// What the engine decides outside the split's config node.
#[derive(Clone, Debug, Default)]
pub struct DatasetOptions {
    /// An unreadable or corrupt image is an error (`Error::Decode`) instead of
    /// VISSL's gray image; the split key ERROR_ON_UNREADABLE_IMAGE overrides it.
    pub error_on_unreadable_image: bool,
}

/// One decoded sample, before transforms.
#[derive(Clone, Debug)]
pub struct Sample {
    pub image: Image,
    /// Per LABEL_SOURCES / LABEL_TYPE.
    pub label: i64,
    /// The sample's index in the (limited) dataset: VISSL's `data_idx`.
    pub index: usize,
    /// False when `image` is the gray stand-in (VISSL's `data_valid` -1).
    pub valid: bool,
    /// Why the image was replaced, when it was.
    pub warning: Option<ImageWarning>,
}

/// An image that could not be read and was replaced by the gray image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageWarning {
    pub index: usize,
    pub path: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for ImageWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "could not load sample {} ({}): {}; using the mean-gray image",
            self.index,
            self.path.display(),
            self.reason
        )
    }
}

#[derive(Clone, Debug)]
enum Source {
    Folder(ImageFolder),
    Synthetic(Synthetic),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LabelRule {
    /// LABEL_SOURCES: the folder's class index or the synthetic label.
    FromSource,
    SampleIndex,
    Zero,
}

/// One split's samples.
#[derive(Clone, Debug)]
pub struct Dataset {
    split: String,
    source: Source,
    labels: LabelRule,
    /// DATA_LIMIT: external index -> source index.
    subset: Option<Vec<usize>>,
    gray_size: usize,
    error_on_unreadable: bool,
}

fn folder_error(key: &str, path: &Path, how: &str, err: FolderError) -> Error {
    let p = path.display();
    let message = match err {
        FolderError::Missing => format!("data path {p}{how} does not exist"),
        FolderError::NotADirectory => {
            format!(
                "data path {p}{how} is not a directory; disk_folder needs a directory with one sub-directory per class"
            )
        }
        FolderError::Unreadable(dir, e) => format!("cannot read directory {}: {e}", dir.display()),
        FolderError::NoClasses => {
            format!("found no class folder in {p}{how}; disk_folder needs one sub-directory per class")
        }
        FolderError::EmptyClass(classes) => format!(
            "class folder(s) {} in {p}{how} hold no image file (extensions: {})",
            classes.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "),
            IMG_EXTENSIONS.join(" ")
        ),
    };
    Error::key(key, message)
}

impl Dataset {
    /// Builds the dataset of one split from its config node (`DATA.TRAIN` or
    /// `DATA.TEST`); `split` names it in messages and picks the catalog part
    /// ("train" for TRAIN, "val" otherwise); `catalog` is
    /// `configs/dataset_catalog.json`, read only when a path comes from
    /// DATASET_NAMES. Scans the whole folder tree.
    pub fn from_config(node: &Value, split: &str, catalog: &Path, options: &DatasetOptions) -> Result<Dataset> {
        let cfg = SplitConfig::new(node, split)?;
        for (key, what) in [
            ("ENABLE_QUEUE_DATASET", "replacing bad images by earlier good ones makes samples depend on loading order"),
            ("COPY_TO_LOCAL_DISK", "copy the data yourself and point DATA_PATHS at the copy"),
        ] {
            if cfg.bool_or(key, false)? {
                return Err(cfg.error(key, format!("True is not supported by tessera ({what}); set it to False")));
            }
        }
        let sources = cfg.str_list("DATA_SOURCES")?;
        let source_name = match sources.as_slice() {
            [] => {
                return Err(
                    cfg.error("DATA_SOURCES", format!("is empty; set it to one of [{}]", DATA_SOURCES.join(", ")))
                )
            }
            [one] => *one,
            more => {
                return Err(cfg.error(
                    "DATA_SOURCES",
                    format!("{} sources given; tessera reads one data source per split", more.len()),
                ))
            }
        };
        if !DATA_SOURCES.contains(&source_name) {
            return Err(cfg.error(
                "DATA_SOURCES[0]",
                format!("unknown data source `{source_name}`; supported: {}", DATA_SOURCES.join(", ")),
            ));
        }
        let names = cfg.str_list("DATASET_NAMES")?;
        if names.len() != sources.len() {
            return Err(cfg.error(
                "DATASET_NAMES",
                format!("has {} entries but DATA_SOURCES has {} (one name per source)", names.len(), sources.len()),
            ));
        }
        let paths = cfg.str_list("DATA_PATHS")?;
        if !paths.is_empty() && paths.len() != sources.len() {
            return Err(cfg.error(
                "DATA_PATHS",
                format!(
                    "has {} entries but DATA_SOURCES has {} (one path per source, or none)",
                    paths.len(),
                    sources.len()
                ),
            ));
        }

        let gray_size = cfg.positive_or("DEFAULT_GRAY_IMG_SIZE", 224)?;
        let limit = cfg.int_or("DATA_LIMIT", -1)?;
        if limit < -1 {
            return Err(cfg.error("DATA_LIMIT", format!("must be -1 (all samples) or a count, got {limit}")));
        }
        let limit = usize::try_from(limit).ok();

        let source = if source_name == "synthetic" {
            let num_labels = cfg.int_or("RANDOM_SYNTHETIC_LABELS", 0)?;
            let num_labels = usize::try_from(num_labels).map_err(|_| {
                cfg.error("RANDOM_SYNTHETIC_LABELS", format!("must be 0 or positive, got {num_labels}"))
            })?;
            Source::Synthetic(Synthetic {
                len: SYNTHETIC_DEFAULT_SIZE.max(limit.unwrap_or(0)),
                size: gray_size,
                random_images: cfg.bool_or("RANDOM_SYNTHETIC_IMAGES", false)?,
                num_labels,
            })
        } else {
            let (root, key, how) = match paths.first() {
                Some(p) => (PathBuf::from(p), cfg.key("DATA_PATHS[0]"), String::new()),
                None => {
                    let key = cfg.key("DATASET_NAMES[0]");
                    let catalog = Catalog::load(catalog)?;
                    let root = catalog.data_path(names[0], split, &key)?;
                    let how = format!(
                        " (dataset `{}` in catalog {}; edit the catalog entry or set {})",
                        names[0],
                        catalog.path().display(),
                        cfg.key("DATA_PATHS")
                    );
                    (root, key, how)
                }
            };
            Source::Folder(ImageFolder::scan(&root).map_err(|e| folder_error(&key, &root, &how, e))?)
        };

        let label_sources = cfg.str_list("LABEL_SOURCES")?;
        let label_type = cfg.str_or("LABEL_TYPE", "standard")?;
        if !["standard", "sample_index", "zero"].contains(&label_type) {
            return Err(cfg.error(
                "LABEL_TYPE",
                format!("unknown label type `{label_type}`; use standard, sample_index or zero"),
            ));
        }
        let labels = match label_sources.as_slice() {
            [] if label_type == "zero" => LabelRule::Zero,
            // hydra_config: no label source and not `zero` -> `sample_index`.
            [] => LabelRule::SampleIndex,
            // ssl_dataset.load_labels: disk_folder labels need a disk_folder source.
            [l] if *l == source_name => LabelRule::FromSource,
            [l] if DATA_SOURCES.contains(l) => {
                return Err(cfg.error(
                    "LABEL_SOURCES[0]",
                    format!("label source `{l}` needs the data source `{l}`, but DATA_SOURCES is [{source_name}]"),
                ))
            }
            [l] => {
                return Err(cfg.error(
                    "LABEL_SOURCES[0]",
                    format!("unknown label source `{l}`; supported: {}", DATA_SOURCES.join(", ")),
                ))
            }
            more => {
                return Err(
                    cfg.error("LABEL_SOURCES", format!("{} label sources given; one per data source", more.len()))
                )
            }
        };

        let error_on_unreadable = cfg.bool_or(ERROR_ON_UNREADABLE_IMAGE, options.error_on_unreadable_image)?;
        let mut dataset =
            Dataset { split: split.to_string(), source, labels, subset: None, gray_size, error_on_unreadable };
        if let Some(num) = limit {
            dataset.subset = Some(dataset.limit(&cfg, num)?);
        }
        Ok(dataset)
    }

    /// The DATA_LIMIT subset (VISSL: only when DATA_LIMIT >= 0).
    fn limit(&self, cfg: &SplitConfig<'_>, num: usize) -> Result<Vec<usize>> {
        let sampling = cfg.sub("DATA_LIMIT_SAMPLING")?;
        let (seed, balanced, skip) = match &sampling {
            None => (0, false, 0),
            Some(s) => (s.int_or("SEED", 0)?, s.bool_or("IS_BALANCED", false)?, s.int_or("SKIP_NUM_SAMPLES", 0)?),
        };
        let skip = usize::try_from(skip).map_err(|_| {
            cfg.error("DATA_LIMIT_SAMPLING.SKIP_NUM_SAMPLES", format!("must be 0 or positive, got {skip}"))
        })?;
        let total = self.source_len();
        let picked = if balanced {
            if self.labels != LabelRule::FromSource {
                return Err(cfg.error(
                    "DATA_LIMIT_SAMPLING.IS_BALANCED",
                    "balanced sampling needs labels from LABEL_SOURCES (VISSL asserts the same)",
                ));
            }
            let labels: Vec<i64> = (0..total).map(|i| self.source_label(i)).collect();
            subset::balanced(&labels, num, skip, seed as u64)
        } else {
            subset::unbalanced(total, num, skip, seed as u64)
        };
        picked.map_err(|why| cfg.error("DATA_LIMIT", format!("{num}: {why} ({})", self.describe_source())))
    }

    fn describe_source(&self) -> String {
        match &self.source {
            Source::Folder(f) => format!("{} images in {}", f.samples.len(), f.root.display()),
            Source::Synthetic(s) => format!("synthetic, {} samples", s.len),
        }
    }

    fn source_len(&self) -> usize {
        match &self.source {
            Source::Folder(f) => f.samples.len(),
            Source::Synthetic(s) => s.len,
        }
    }

    fn source_label(&self, internal: usize) -> i64 {
        match &self.source {
            Source::Folder(f) => f.samples[internal].1 as i64,
            Source::Synthetic(s) => s.label(internal),
        }
    }

    /// The split's name, as given to `from_config`.
    pub fn split(&self) -> &str {
        &self.split
    }

    /// Number of samples (DATA_LIMIT applied).
    pub fn len(&self) -> usize {
        self.subset.as_ref().map_or_else(|| self.source_len(), Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// ImageFolder class names in label order; empty for `synthetic`.
    pub fn classes(&self) -> &[String] {
        match &self.source {
            Source::Folder(f) => &f.classes,
            Source::Synthetic(_) => &[],
        }
    }

    fn internal(&self, index: usize) -> Result<usize> {
        if index >= self.len() {
            return Err(Error::key(
                format!("DATA.{}", self.split),
                format!("sample index {index} is outside the dataset of {}", self.len()),
            ));
        }
        Ok(self.subset.as_ref().map_or(index, |s| s[index]))
    }

    /// DEFAULT_GRAY_IMG_SIZE: the side of the stand-in for an unreadable image.
    pub fn gray_size(&self) -> usize {
        self.gray_size
    }

    /// The file of sample `index` (`None` for synthetic samples).
    pub fn path(&self, index: usize) -> Option<&Path> {
        let internal = self.internal(index).ok()?;
        match &self.source {
            Source::Folder(f) => Some(&f.samples[internal].0),
            Source::Synthetic(_) => None,
        }
    }

    /// The label of sample `index`, without reading the image.
    pub fn label(&self, index: usize) -> Result<i64> {
        let internal = self.internal(index)?;
        Ok(match self.labels {
            LabelRule::FromSource => self.source_label(internal),
            LabelRule::SampleIndex => index as i64,
            LabelRule::Zero => 0,
        })
    }

    /// The largest label any sample can have (for checks against a
    /// collator's `num_classes` before training).
    pub(crate) fn max_label(&self) -> (i64, &'static str) {
        match (&self.labels, &self.source) {
            (LabelRule::Zero, _) => (0, "LABEL_TYPE zero"),
            (LabelRule::SampleIndex, _) => (self.len() as i64 - 1, "LABEL_TYPE sample_index (the sample's index)"),
            (LabelRule::FromSource, Source::Folder(f)) => (f.classes.len() as i64 - 1, "the folder's class index"),
            (LabelRule::FromSource, Source::Synthetic(s)) => {
                (s.num_labels.max(1) as i64 - 1, "RANDOM_SYNTHETIC_LABELS")
            }
        }
    }

    /// Reads and decodes sample `index`. An unreadable file gives the gray
    /// image and a warning, or `Error::Decode` in error mode.
    pub fn get(&self, index: usize) -> Result<Sample> {
        let internal = self.internal(index)?;
        let label = self.label(index)?;
        let (image, warning) = match &self.source {
            Source::Synthetic(s) => (s.image(internal), None),
            Source::Folder(f) => {
                let path = &f.samples[internal].0;
                match decode_file(path) {
                    Ok(image) => (image, None),
                    Err(e) if self.error_on_unreadable => return Err(e),
                    Err(e) => {
                        let reason = match e {
                            Error::Decode { reason, .. } => reason,
                            other => other.to_string(),
                        };
                        // data_helper.get_mean_image(DEFAULT_GRAY_IMG_SIZE).
                        let warning = ImageWarning { index, path: path.clone(), reason };
                        (Image::mean_gray(self.gray_size), Some(warning))
                    }
                }
            }
        };
        Ok(Sample { image, label, index, valid: warning.is_none(), warning })
    }
}
