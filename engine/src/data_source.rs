//! The data pipeline as the trainer's `DataSource`: `tessera-data`'s loader
//! for a split, with its batches mapped onto the plan's input names.
//!
//! Views of one resolution are concatenated position-major into one input
//! (`data`, or `data.0`, `data.1`, ... when crops come in several
//! resolutions: VISSL runs the trunk once per resolution group); SimCLR's
//! two views become one `[2B, ...]` `data` (view-major, simclr_collator);
//! MoCo's second copy is `data_momentum`.

use crate::source::{Batch, Batches, DataSource, Labels};
use std::path::{Path, PathBuf};
use tessera_data::{BatchTensor, Loader, LoaderOptions};
use tessera_runtime::Tensor;

/// `configs/dataset_catalog.json` beside the working directory, else the
/// copy built into the binary, written to the temporary directory under a
/// name that is its checksum: one file per catalog version, shared by every
/// run (not one per process), and replaced atomically so a run never reads
/// a half-written copy.
pub fn catalog_path() -> Result<PathBuf, String> {
    let local = Path::new("configs/dataset_catalog.json");
    if local.is_file() {
        return Ok(local.to_path_buf());
    }
    let bytes = tessera_compiler::config::embedded_file("dataset_catalog.json")
        .ok_or("no configs/dataset_catalog.json here and none built in")?;
    let name = format!("tessera-dataset-catalog-{:016x}.json", crate::checkpoint::checksum(bytes));
    let path = std::env::temp_dir().join(name);
    if std::fs::read(&path).is_ok_and(|have| have == bytes) {
        return Ok(path);
    }
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write the built-in dataset catalog to {}: {e}", path.display())
    })?;
    Ok(path)
}

pub struct PipelineSource {
    loader: Loader,
    warnings: Vec<String>,
    /// The run's stop flag: a wait for a batch ends when it is set.
    interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl PipelineSource {
    /// The loader of `split` (`TRAIN` or `TEST`) of the config `tree`.
    pub fn from_config(tree: &serde_json::Value, split: &str, seed: u64, catalog: &Path) -> Result<Self, String> {
        PipelineSource::shard_from_config(tree, split, seed, catalog, 0, 1)
    }

    /// Rank `rank`'s shard (of `world`) of `split`: the DistributedSampler's
    /// share (reference 5.1).
    pub fn shard_from_config(
        tree: &serde_json::Value,
        split: &str,
        seed: u64,
        catalog: &Path,
        rank: usize,
        world: usize,
    ) -> Result<Self, String> {
        let data = tree.get("DATA").ok_or("the config has no DATA section")?;
        let options = LoaderOptions { seed, rank, world_size: world, ..LoaderOptions::default() };
        let loader = Loader::from_config(data, split, catalog, &options).map_err(|e| e.to_string())?;
        Ok(PipelineSource { loader, warnings: Vec::new(), interrupt: None })
    }

    pub fn loader(&self) -> &Loader {
        &self.loader
    }
}

fn tensor(t: BatchTensor) -> Tensor {
    Tensor::f32(t.shape.to_vec(), t.data)
}

/// Concatenates `[B, C, H, W]` tensors along the batch axis.
fn concat(ts: Vec<BatchTensor>) -> Tensor {
    let [_, c, h, w] = ts[0].shape;
    let n: usize = ts.iter().map(|t| t.shape[0]).sum();
    let mut data = Vec::with_capacity(n * c * h * w);
    for t in ts {
        data.extend_from_slice(&t.data);
    }
    Tensor::f32(vec![n, c, h, w], data)
}

/// The engine's batch: image inputs by name, labels, sample count.
pub fn to_engine(b: tessera_data::Batch) -> Batch {
    let size = b.views.first().map(|v| v.shape[0]).unwrap_or(0);
    // Groups of consecutive views with one resolution.
    let mut groups: Vec<Vec<BatchTensor>> = Vec::new();
    for v in b.views {
        match groups.last_mut() {
            Some(g) if g[0].shape[1..] == v.shape[1..] => g.push(v),
            _ => groups.push(vec![v]),
        }
    }
    let mut images = Vec::new();
    let single = groups.len() == 1;
    for (i, g) in groups.into_iter().enumerate() {
        let name = if single { "data".to_string() } else { format!("data.{i}") };
        images.push((name, if g.len() == 1 { tensor(g.into_iter().next().expect("one")) } else { concat(g) }));
    }
    if let Some(m) = b.momentum {
        images.push(("data_momentum".into(), tensor(m)));
    }
    let labels = match b.labels {
        tessera_data::Labels::Hard { data, .. } => Labels::Hard(data),
        tessera_data::Labels::Soft { shape, data } => Labels::Soft { classes: *shape.last().unwrap_or(&1), data },
    };
    Batch { images, labels, size }
}

impl DataSource for PipelineSource {
    fn batches_per_epoch(&self) -> u64 {
        self.loader.num_batches() as u64
    }

    fn samples(&self) -> u64 {
        self.loader.dataset().len() as u64
    }

    fn epoch(&mut self, epoch: u64, skip: u64) -> Batches<'_> {
        let mut reading = self.loader.epoch_from(epoch, skip as usize);
        if let Some(flag) = &self.interrupt {
            reading.interrupt_on(flag.clone());
        }
        Box::new(Reading { epoch: reading, warnings: &mut self.warnings, done: false })
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    fn interrupt_on(&mut self, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.interrupt = Some(stop);
    }
}

/// An epoch being read; at its end, its report becomes warnings.
struct Reading<'a> {
    epoch: tessera_data::Epoch,
    warnings: &'a mut Vec<String>,
    done: bool,
}

impl Iterator for Reading<'_> {
    type Item = Result<Batch, String>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.epoch.next() {
            Some(b) => Some(b.map(to_engine).map_err(|e| e.to_string())),
            None => {
                if !self.done {
                    self.done = true;
                    let r = self.epoch.report();
                    if r.gray_images > 0 {
                        self.warnings.push(format!(
                            "{} unreadable image(s) replaced by gray ones this epoch (DATA.*.ERROR_ON_UNREADABLE_IMAGE makes this an error)",
                            r.gray_images
                        ));
                        self.warnings.extend(r.warnings.iter().map(|w| w.to_string()));
                    }
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Runs (here: calls) share one copy of the built-in catalog, named by
    /// its checksum, holding exactly its bytes; no file per process.
    #[test]
    fn the_built_in_catalog_is_one_shared_file_per_version() {
        // The crate's directory has no configs/: the built-in copy is used.
        assert!(!std::path::Path::new("configs/dataset_catalog.json").exists());
        let (a, b) = (super::catalog_path().unwrap(), super::catalog_path().unwrap());
        assert_eq!(a, b);
        let name = a.file_name().unwrap().to_string_lossy().to_string();
        let built_in = tessera_compiler::config::embedded_file("dataset_catalog.json").unwrap();
        assert_eq!(name, format!("tessera-dataset-catalog-{:016x}.json", crate::checkpoint::checksum(built_in)));
        assert_eq!(std::fs::read(&a).unwrap(), built_in);
    }
}
