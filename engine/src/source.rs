//! Where training batches come from: the data pipeline (image folders,
//! transforms, collators; `tessera-data`) or batches held in memory (tests,
//! benchmarks). The engine maps a batch onto the plan's inputs by name.

use tessera_runtime::Tensor;

/// The targets of a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Labels {
    /// Class indices, one per sample.
    Hard(Vec<i64>),
    /// Distributions [samples, classes] (cutmixup's mixed, smoothed labels).
    Soft { classes: usize, data: Vec<f32> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Image inputs by plan input name: `data`, or `data.0`, `data.1` per crop
    /// resolution, `data_momentum` (MoCo's key view).
    pub images: Vec<(String, Tensor)>,
    pub labels: Labels,
    /// Samples in the batch.
    pub size: usize,
}

/// An epoch's batches, in order.
pub type Batches<'a> = Box<dyn Iterator<Item = Result<Batch, String>> + 'a>;

pub trait DataSource {
    /// Batches per epoch.
    fn batches_per_epoch(&self) -> u64;
    /// Samples per epoch (after DATA_LIMIT).
    fn samples(&self) -> u64;
    /// The batches of `epoch` from batch `skip` on (a resumed epoch).
    fn epoch(&mut self, epoch: u64, skip: u64) -> Batches<'_>;
    /// What the epoch just read had to report (unreadable images replaced
    /// by gray ones), one line each.
    fn take_warnings(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Cuts a wait for a batch short when `stop` is set (SIGINT/SIGTERM), so
    /// that a read that blocks cannot hold a run that was told to stop; the
    /// epoch then yields an error and the trainer, seeing the flag, stops.
    fn interrupt_on(&mut self, _stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {}
}

/// The same batches every epoch, from memory.
pub struct InMemory {
    pub batches: Vec<Batch>,
}

impl DataSource for InMemory {
    fn batches_per_epoch(&self) -> u64 {
        self.batches.len() as u64
    }

    fn samples(&self) -> u64 {
        self.batches.iter().map(|b| b.size as u64).sum()
    }

    fn epoch(&mut self, _epoch: u64, skip: u64) -> Batches<'_> {
        Box::new(self.batches.iter().skip(skip as usize).cloned().map(Ok))
    }
}
