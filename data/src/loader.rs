//! `Loader`: the DataLoader of one split. An epoch samples (DistributedSampler),
//! batches, reads + decodes + transforms each sample and collates, on
//! NUM_DATALOADER_WORKERS threads, delivering batches in order.
//!
//! As torch's DataLoader, worker w builds batches w, w+N, w+2N, ... and puts
//! them in its own bounded queue (`prefetch_per_worker` finished batches);
//! the caller takes batch b from queue b mod N, so order is kept without
//! reordering buffers. With 0 workers batches are built in the caller's
//! thread on `next()`.
//!
//! Determinism: sample i of epoch e is augmented with key (seed, e, i) and
//! batch b's collator draws with key (seed, e, b·W + rank), so a batch is a
//! pure function of (config, seed, epoch, b): identical for any worker count.
//! Dropping an `Epoch` stops its workers (they check a flag between samples
//! and their queues close) and joins them; a worker still blocked in a read
//! after `JOIN_WAIT` is left to finish on its own. With `Epoch::interrupt_on`
//! the wait for a batch polls a stop flag (a signal), so a read that blocks
//! (a hung network file system) never holds the caller.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::Value;

use crate::collate::{Batch, CollateSample, Collator, SslMethod};
use crate::dataset::{Dataset, DatasetOptions, ImageWarning};
use crate::error::{Error, Result};
use crate::pipeline::Pipeline;
use crate::rng::SampleKey;
use crate::sampler::{self, DistributedSampler};
use crate::split_config::SplitConfig;

/// At most this many warnings are kept per epoch (all are counted).
pub const MAX_WARNINGS_KEPT: usize = 1000;

/// How often a wait for a batch looks at the stop flag.
pub const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// How long dropping an epoch waits for a worker to finish before leaving it.
pub const JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What waiting for a worker's next result gave.
#[derive(Debug, PartialEq)]
pub enum Wait<T> {
    Got(T),
    /// The worker is gone without sending.
    Closed,
    /// `stop` was set before anything came.
    Stopped,
}

/// Receives from `rx`, looking at `stop` every `STOP_POLL` (a blocking
/// `recv` when there is no flag).
pub fn recv_or_stop<T>(rx: &Receiver<T>, stop: Option<&AtomicBool>) -> Wait<T> {
    let Some(stop) = stop else {
        return rx.recv().map_or(Wait::Closed, Wait::Got);
    };
    loop {
        if stop.load(Ordering::SeqCst) {
            // What is ready is still taken; only a wait is cut short.
            return rx.try_recv().map_or(Wait::Stopped, Wait::Got);
        }
        match rx.recv_timeout(STOP_POLL) {
            Ok(v) => return Wait::Got(v),
            Err(RecvTimeoutError::Disconnected) => return Wait::Closed,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// What the engine sets outside the split's config node.
#[derive(Clone, Debug)]
pub struct LoaderOptions {
    /// Seed of augmentations and MixUp/CutMix draws (the engine's SEED_VALUE).
    pub seed: u64,
    /// Seed of the sampler's shuffle (torch's DistributedSampler, as VISSL
    /// builds it, uses 0).
    pub sampler_seed: u64,
    /// Shuffle each epoch (VISSL's DistributedSampler shuffles both splits).
    pub shuffle: bool,
    pub world_size: usize,
    pub rank: usize,
    /// Worker threads; `None` reads DATA.NUM_DATALOADER_WORKERS.
    pub num_workers: Option<usize>,
    /// Finished batches each worker may hold ahead (torch's prefetch_factor, 2).
    pub prefetch_per_worker: usize,
    pub dataset: DatasetOptions,
}

impl Default for LoaderOptions {
    fn default() -> LoaderOptions {
        LoaderOptions {
            seed: 0,
            sampler_seed: 0,
            shuffle: true,
            world_size: 1,
            rank: 0,
            num_workers: None,
            prefetch_per_worker: 2,
            dataset: DatasetOptions::default(),
        }
    }
}

/// Gray-substituted images of an epoch so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochReport {
    /// Batches delivered.
    pub batches: usize,
    /// Images replaced by the mean-gray image.
    pub gray_images: usize,
    /// Their warnings, in delivery order (the first `MAX_WARNINGS_KEPT`).
    pub warnings: Vec<ImageWarning>,
}

struct Shared {
    dataset: Dataset,
    pipeline: Pipeline,
    collator: Collator,
    seed: u64,
    rank: usize,
    world_size: usize,
}

/// The data loader of one split.
pub struct Loader {
    shared: Arc<Shared>,
    sampler: DistributedSampler,
    batch_size: usize,
    drop_last: bool,
    num_workers: usize,
    prefetch: usize,
}

impl Loader {
    /// Builds the split's dataset, pipeline and collator from the `DATA` node
    /// (`data[split]` holds the split's keys; NUM_DATALOADER_WORKERS is read
    /// from `data` itself). Every config error surfaces here.
    pub fn from_config(data: &Value, split: &str, catalog: &Path, options: &LoaderOptions) -> Result<Loader> {
        let node = data.get(split).ok_or_else(|| Error::key(format!("DATA.{split}"), "missing"))?;
        let cfg = SplitConfig::new(node, split)?;
        let dataset = Dataset::from_config(node, split, catalog, &options.dataset)?;
        let transforms = cfg.get("TRANSFORMS").cloned().unwrap_or(Value::Array(Vec::new()));
        let pipeline =
            Pipeline::from_config(&transforms).map_err(|e| Error::key(cfg.key("TRANSFORMS"), e.to_string()))?;
        let collator = Collator::from_config(
            cfg.str_or("COLLATE_FUNCTION", "default_collate")?,
            cfg.get("COLLATE_FUNCTION_PARAMS").unwrap_or(&Value::Null),
            split,
        )?;
        let batch_size = cfg.positive_or("BATCHSIZE_PER_REPLICA", 256)?;
        let drop_last = cfg.bool_or("DROP_LAST", false)?;
        let mut options = options.clone();
        if options.num_workers.is_none() {
            let workers = match data.get("NUM_DATALOADER_WORKERS").filter(|v| !v.is_null()) {
                None => 4,
                Some(v) => crate::split_config::as_int(v).and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                    Error::key("DATA.NUM_DATALOADER_WORKERS", format!("expected 0 or a positive integer, got {v}"))
                })?,
            };
            options.num_workers = Some(workers);
        }
        Loader::new(dataset, pipeline, collator, batch_size, drop_last, &options).map_err(|e| match e {
            // Name the split's keys in the checks of `new` (config keys are upper case).
            Error::Key { key, message }
                if key.starts_with(|c: char| c.is_ascii_uppercase()) && !key.starts_with("DATA.") =>
            {
                Error::Key { key: format!("DATA.{split}.{key}"), message }
            }
            other => other,
        })
    }

    /// A loader over built parts. Checks that the batches can be collated
    /// (MixUp's even batches, labels within `num_classes`, moco's 2 copies)
    /// before any image is read; errors name the config keys.
    pub fn new(
        dataset: Dataset,
        pipeline: Pipeline,
        collator: Collator,
        batch_size: usize,
        drop_last: bool,
        options: &LoaderOptions,
    ) -> Result<Loader> {
        if batch_size == 0 {
            return Err(Error::key("BATCHSIZE_PER_REPLICA", "must be positive"));
        }
        if dataset.is_empty() {
            return Err(Error::key("DATA_LIMIT", "the dataset has no samples"));
        }
        let sampler = DistributedSampler::new(
            dataset.len(),
            options.world_size,
            options.rank,
            options.shuffle,
            options.sampler_seed,
        )?;
        let copies = pipeline.num_outputs();
        let moco_layout = match &collator {
            Collator::Moco => true,
            Collator::CutMixUp(m) => m.ssl_method == Some(SslMethod::Moco),
            _ => false,
        };
        if moco_layout && copies != 2 {
            return Err(Error::key(
                "TRANSFORMS",
                format!("the moco layout needs 2 copies per image (ImgReplicatePil num_times: 2), the transforms make {copies}"),
            ));
        }
        if let Collator::CutMixUp(mix) = &collator {
            let per_rank = sampler.num_samples();
            let last = per_rank % batch_size;
            if batch_size % 2 == 1 {
                return Err(Error::key(
                    "BATCHSIZE_PER_REPLICA",
                    format!("{batch_size} is odd; cutmixup_collator pairs sample i with n-1-i and needs even batches"),
                ));
            }
            if !drop_last && last % 2 == 1 {
                return Err(Error::key(
                    "DROP_LAST",
                    format!(
                        "False leaves a last batch of {last} samples ({per_rank} per process), which cutmixup_collator \
                         cannot pair; set DROP_LAST: True"
                    ),
                ));
            }
            let (max_label, why) = dataset.max_label();
            if max_label >= mix.num_classes as i64 {
                return Err(Error::key(
                    "COLLATE_FUNCTION_PARAMS.num_classes",
                    format!(
                        "{} is too small for labels up to {max_label} ({why}); raise it, or use LABEL_TYPE: zero for SSL",
                        mix.num_classes
                    ),
                ));
            }
        }
        Ok(Loader {
            shared: Arc::new(Shared {
                dataset,
                pipeline,
                collator,
                seed: options.seed,
                rank: options.rank,
                world_size: options.world_size,
            }),
            sampler,
            batch_size,
            drop_last,
            num_workers: options.num_workers.unwrap_or(0),
            prefetch: options.prefetch_per_worker.max(1),
        })
    }

    pub fn dataset(&self) -> &Dataset {
        &self.shared.dataset
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.shared.pipeline
    }

    pub fn collator(&self) -> &Collator {
        &self.shared.collator
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn num_workers(&self) -> usize {
        self.num_workers
    }

    /// Batches per epoch on this rank.
    pub fn num_batches(&self) -> usize {
        sampler::num_batches(self.sampler.num_samples(), self.batch_size, self.drop_last)
    }

    /// This rank's batches of `epoch` as dataset indices (no image is read).
    pub fn batch_indices(&self, epoch: u64) -> Vec<Vec<usize>> {
        sampler::batches(&self.sampler.indices(epoch), self.batch_size, self.drop_last)
    }

    /// Starts an epoch: the workers begin loading at once.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// Starts an epoch at batch `start` (a resumed epoch): the batches
    /// before it are never loaded; each batch is a pure function of its
    /// index, so the rest are those of a whole epoch.
    pub fn epoch_from(&self, epoch: u64, start: usize) -> Epoch {
        let batches = Arc::new(self.batch_indices(epoch));
        let start = start.min(batches.len());
        let stop = Arc::new(AtomicBool::new(false));
        let n = self.num_workers.min(batches.len() - start);
        let workers = (0..n)
            .map(|w| {
                let (tx, rx) = sync_channel(self.prefetch);
                let (shared, batches, stop) = (self.shared.clone(), batches.clone(), stop.clone());
                let thread = std::thread::Builder::new().name(format!("tessera-data-{w}")).spawn(move || {
                    for b in (start + w..batches.len()).step_by(n) {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let loaded = load_batch(&shared, epoch, b, &batches[b], &stop);
                        if tx.send(loaded).is_err() {
                            return; // the epoch was dropped
                        }
                    }
                });
                match thread {
                    Ok(t) => Worker { rx: Some(rx), thread: Some(t) },
                    // No thread: the receiver reports a dead worker on first use.
                    Err(_) => Worker { rx: Some(rx), thread: None },
                }
            })
            .collect();
        Epoch {
            shared: self.shared.clone(),
            epoch,
            batches,
            first: start,
            next: start,
            done: false,
            workers,
            stop,
            interrupt: None,
            report: EpochReport::default(),
        }
    }
}

/// One finished batch and the warnings of its samples.
struct Loaded {
    batch: Result<Batch>,
    warnings: Vec<ImageWarning>,
}

struct Worker {
    rx: Option<Receiver<Loaded>>,
    thread: Option<JoinHandle<()>>,
}

/// Builds batch `b`: read, decode, transform each sample, then collate. A
/// panic (a bug) becomes an error instead of a dead thread.
fn load_batch(shared: &Shared, epoch: u64, b: usize, indices: &[usize], stop: &AtomicBool) -> Loaded {
    let mut warnings = Vec::new();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Batch> {
        let mut samples = Vec::with_capacity(indices.len());
        for &index in indices {
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Batch { batch: b, message: "loading stopped".into() });
            }
            let sample = shared.dataset.get(index)?;
            let views = shared.pipeline.apply(&sample.image, SampleKey::new(shared.seed, epoch, index as u64));
            warnings.extend(sample.warning);
            samples.push(CollateSample { views, label: sample.label, index, valid: sample.valid });
        }
        check_sizes(&shared.dataset, &samples).map_err(|message| Error::Batch { batch: b, message })?;
        let batch_id = (b * shared.world_size + shared.rank) as u64;
        shared.collator.collate(&samples, SampleKey::new(shared.seed, epoch, batch_id))
    }));
    let batch = result.unwrap_or_else(|payload| {
        let reason = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        Err(Error::Batch { batch: b, message: format!("a bug panicked while loading it: {reason}") })
    });
    Loaded { batch, warnings }
}

/// Copies at one position are stacked, so they must share a size. When they
/// do not, names both samples' files, and when one is the gray stand-in for
/// an unreadable image (DEFAULT_GRAY_IMG_SIZE, passed through the
/// transforms), says so and which key sets its size.
fn check_sizes(dataset: &Dataset, samples: &[CollateSample]) -> std::result::Result<(), String> {
    let Some(first) = samples.first() else { return Ok(()) };
    for (p, reference) in first.views.iter().enumerate() {
        let Some(odd) = samples.iter().find(|s| s.views.get(p).is_some_and(|t| t.shape != reference.shape)) else {
            continue;
        };
        let describe = |s: &CollateSample| {
            let file = dataset.path(s.index).map_or("a synthetic image".to_string(), |f| f.display().to_string());
            let stand_in = if s.valid { "" } else { ", unreadable: the gray stand-in" };
            format!("sample {} ({file}{stand_in}) is {:?}", s.index, s.views[p].shape)
        };
        let split = dataset.split();
        let (transforms, gray_key) =
            (format!("DATA.{split}.TRANSFORMS"), format!("DATA.{split}.DEFAULT_GRAY_IMG_SIZE"));
        let fix = match [first, odd].iter().find(|s| !s.valid) {
            Some(gray) => {
                let other = if gray.index == first.index { odd } else { first };
                let side = other.views[p].shape[2];
                format!(
                    "sample {} could not be read, and its stand-in is a {g}x{g} gray image ({gray_key}) that the transforms do not bring to the size of the others; set {gray_key}: {side} (the size the transforms give), or add a resize or crop to {transforms}",
                    gray.index,
                    g = dataset.gray_size()
                )
            }
            None => format!("images of different sizes need a resize or crop in {transforms}"),
        };
        return Err(format!(
            "copy position {p}: cannot stack copies of different sizes (C, H, W): {}, {}; {fix}",
            describe(first),
            describe(odd)
        ));
    }
    Ok(())
}

/// The batches of one epoch, in order; an `Iterator` of `Result<Batch>`.
/// After an error the epoch ends. Dropping it stops and joins the workers.
pub struct Epoch {
    shared: Arc<Shared>,
    epoch: u64,
    batches: Arc<Vec<Vec<usize>>>,
    /// The first batch of this (possibly resumed) epoch.
    first: usize,
    next: usize,
    done: bool,
    workers: Vec<Worker>,
    stop: Arc<AtomicBool>,
    /// The caller's stop flag: a wait for a batch ends when it is set.
    interrupt: Option<Arc<AtomicBool>>,
    report: EpochReport,
}

impl Epoch {
    /// The epoch number.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Gray-image count and warnings of the batches delivered so far.
    pub fn report(&self) -> &EpochReport {
        &self.report
    }

    /// Ends the wait for a batch when `flag` is set (SIGINT/SIGTERM): `next`
    /// then gives `Error::Interrupted` instead of waiting on.
    pub fn interrupt_on(&mut self, flag: Arc<AtomicBool>) {
        self.interrupt = Some(flag);
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in &mut self.workers {
            w.rx = None; // a worker blocked on a full queue wakes with an error
        }
        // A worker blocked in a read (a hung file system) is not waited for
        // without end: after JOIN_WAIT it is left to finish on its own.
        let deadline = std::time::Instant::now() + JOIN_WAIT;
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                while !t.is_finished() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                if t.is_finished() {
                    let _ = t.join();
                }
            }
        }
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.done || self.next >= self.batches.len() {
            return None;
        }
        let b = self.next;
        self.next += 1;
        let loaded = if self.workers.is_empty() {
            load_batch(&self.shared, self.epoch, b, &self.batches[b], &self.stop)
        } else {
            let w = (b - self.first) % self.workers.len();
            match self.workers[w].rx.as_ref().map(|rx| recv_or_stop(rx, self.interrupt.as_deref())) {
                Some(Wait::Got(loaded)) => loaded,
                Some(Wait::Stopped) => Loaded { batch: Err(Error::Interrupted { batch: b }), warnings: Vec::new() },
                _ => Loaded {
                    batch: Err(Error::Worker { worker: w, reason: format!("exited before delivering batch {b}") }),
                    warnings: Vec::new(),
                },
            }
        };
        self.report.batches += 1;
        self.report.gray_images += loaded.warnings.len();
        let room = MAX_WARNINGS_KEPT.saturating_sub(self.report.warnings.len());
        self.report.warnings.extend(loaded.warnings.into_iter().take(room));
        if loaded.batch.is_err() {
            self.done = true;
            self.shut_down();
        }
        Some(loaded.batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = if self.done { 0 } else { self.batches.len() - self.next };
        (0, Some(left))
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.shut_down();
    }
}
