//! `torch.utils.data.distributed.DistributedSampler` (what VISSL uses, with
//! the sampler's own `drop_last=False`) and the DataLoader's batching.
//!
//! Per epoch: a permutation of the N samples (shuffle on), padded by repeating
//! its head until the length divides by the world size W, then rank r takes
//! positions r, r+W, r+2W, ...: `ceil(N / W)` samples per rank. The
//! DataLoader then cuts them into batches of BATCHSIZE_PER_REPLICA, dropping
//! a short last batch when DROP_LAST.
//!
//! torch seeds a generator with `seed + epoch` and draws `randperm`; we draw
//! a uniform permutation from `SampleRng` keyed by (seed, epoch), so the
//! order differs from torch's (bit-for-bit torch is out of reach) but every
//! (seed, epoch) fixes one order on every rank, as torch's does.

use crate::error::{Error, Result};
use crate::rng::{stream, SampleKey, SampleRng};

/// DistributedSampler for one rank.
#[derive(Clone, Debug)]
pub struct DistributedSampler {
    len: usize,
    world_size: usize,
    rank: usize,
    shuffle: bool,
    seed: u64,
}

impl DistributedSampler {
    /// `len` samples, `world_size` ranks, this is `rank`; `seed` is the
    /// sampler's seed (torch's default, and VISSL's, is 0).
    pub fn new(len: usize, world_size: usize, rank: usize, shuffle: bool, seed: u64) -> Result<DistributedSampler> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::key("rank", format!("rank {rank} is not in a world of {world_size} process(es)")));
        }
        Ok(DistributedSampler { len, world_size, rank, shuffle, seed })
    }

    /// Samples per rank and epoch: `ceil(len / world_size)`.
    pub fn num_samples(&self) -> usize {
        self.len.div_ceil(self.world_size)
    }

    /// This rank's dataset indices for `epoch`, in order.
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            SampleRng::new(SampleKey::new(self.seed, epoch, 0), stream::SAMPLER).shuffle(&mut order);
        }
        let total = self.num_samples() * self.world_size;
        // `indices += indices[:padding]`, repeated when padding > len.
        let mut i = 0;
        while order.len() < total && self.len > 0 {
            order.push(order[i % self.len]);
            i += 1;
        }
        order.into_iter().skip(self.rank).step_by(self.world_size).collect()
    }
}

/// DataLoader batching: consecutive runs of `batch_size` (> 0), the last one
/// shorter unless `drop_last` drops it.
pub fn batches(indices: &[usize], batch_size: usize, drop_last: bool) -> Vec<Vec<usize>> {
    indices.chunks(batch_size.max(1)).filter(|c| !drop_last || c.len() == batch_size).map(<[usize]>::to_vec).collect()
}

/// Number of batches per epoch for `num_samples` samples per rank.
pub fn num_batches(num_samples: usize, batch_size: usize, drop_last: bool) -> usize {
    let b = batch_size.max(1);
    if drop_last {
        num_samples / b
    } else {
        num_samples.div_ceil(b)
    }
}
