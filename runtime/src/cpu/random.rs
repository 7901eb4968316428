//! Dropout and drop path (stochastic depth), drawn from Philox so that every
//! backend, and the backward pass, sees the same mask: element (or sample)
//! `i` of op `key` at step `s` is kept iff `Stream::new(seed, s, key).keep_at(i, 1-p)`.
//! Autodiff re-applies `Dropout { p, key }` to the upstream gradient, which
//! is exactly the backward because the mask depends on nothing else.

use super::kernel::{f32_of, operands, Ctx, PAR_CHUNK, PAR_MIN};
use crate::error::KernelError;
use crate::philox::{philox4x32_10, Stream};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// A Bernoulli(1-p) keep mask with the inverted-dropout scale 1/(1-p).
///
/// `apply` draws a whole Philox block (four elements) per call of the
/// bijection, reproducing `Stream::keep_at` word for word (a test below
/// holds the two together), which is four times cheaper than per element.
#[derive(Clone, Copy, Debug)]
pub struct DropMask {
    stream: Stream,
    key: [u32; 2],
    step: u64,
    op: u32,
    keep: f32,
    scale: f32,
    /// Where this process's rows sit in the global batch (`None`: one process).
    rows: Option<RowMap>,
}

/// Local mask indices to global ones in a data-parallel run: a tensor's rows
/// (axis 0) come in blocks of `block` (the per-process batch; several blocks
/// for stacked crops or views), and local row i of block c is row
/// c * block * world + i * world + rank of one process's global batch.
#[derive(Clone, Copy, Debug)]
pub struct RowMap {
    pub block: u64,
    pub world: u64,
    pub rank: u64,
    /// Mask indices per row.
    pub row_len: u64,
}

impl RowMap {
    fn global(&self, index: u64) -> u64 {
        let (row, within) = (index / self.row_len, index % self.row_len);
        let (c, i) = (row / self.block, row % self.block);
        (c * self.block * self.world + i * self.world + self.rank) * self.row_len + within
    }
}

impl DropMask {
    pub fn new(seed: u64, step: u64, key: u32, p: f64) -> Self {
        DropMask {
            stream: Stream::new(seed, step, key),
            key: [seed as u32, (seed >> 32) as u32],
            step,
            op: key,
            keep: (1.0 - p) as f32,
            scale: (1.0 / (1.0 - p)) as f32,
            rows: None,
        }
    }

    /// This mask as one process of a data-parallel run draws it.
    pub fn sharded(self, rows: RowMap) -> Self {
        DropMask { rows: Some(rows), ..self }
    }

    /// The factor element `index` is multiplied by: 1/(1-p) if kept, else 0.
    #[inline]
    pub fn factor(&self, index: u64) -> f32 {
        let index = self.rows.map_or(index, |m| m.global(index));
        if self.stream.keep_at(index, self.keep) {
            self.scale
        } else {
            0.0
        }
    }

    /// The four 32-bit draws of counter block `block` (`Stream::u32_at`'s layout).
    #[inline]
    fn block(&self, block: u64) -> [u32; 4] {
        let ctr = [block as u32, (block >> 32) as u32 ^ self.op, self.step as u32, (self.step >> 32) as u32];
        philox4x32_10(ctr, self.key)
    }

    #[inline]
    fn factor_of_word(&self, word: u32) -> f32 {
        // `Stream::uniform_at` then `keep_at`, on a word already drawn.
        if ((word >> 8) as f32 * (1.0 / (1u32 << 24) as f32)) < self.keep {
            self.scale
        } else {
            0.0
        }
    }

    /// Multiplies `values`, which start at flat index `first`, by the mask.
    pub fn apply(&self, values: &mut [f32], first: u64) {
        let Some(m) = self.rows else { return self.apply_contiguous(values, first) };
        // Row by row: each local row is contiguous in the global indices.
        let mut i = 0;
        while i < values.len() {
            let index = first + i as u64;
            let len = ((m.row_len - index % m.row_len) as usize).min(values.len() - i);
            self.apply_contiguous(&mut values[i..i + len], m.global(index));
            i += len;
        }
    }

    fn apply_contiguous(&self, values: &mut [f32], first: u64) {
        let mut i = 0;
        while i < values.len() {
            let index = first + i as u64;
            let words = self.block(index / 4);
            for &w in &words[(index % 4) as usize..] {
                let Some(v) = values.get_mut(i) else { break };
                *v *= self.factor_of_word(w);
                i += 1;
            }
        }
    }
}

/// `Dropout { p, key }`: element i of the output (flat index) is masked.
pub fn dropout(x: &[&Tensor], p: f64, key: u32, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let data = f32_of(t, "input")?;
    let rows = t.shape.first().copied().unwrap_or(1);
    let Some(mask) = ctx.drop_mask(p, key, rows, t.numel() / rows.max(1))? else {
        return Ok(super::pool::pooled_clone(t));
    };
    let mut out = super::pool::copy(data);
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(PAR_CHUNK).enumerate().for_each(|(c, chunk)| mask.apply(chunk, (c * PAR_CHUNK) as u64));
    } else {
        mask.apply(&mut out, 0);
    }
    Ok(Tensor::f32(t.shape.clone(), out))
}

/// `DropPath { p, key }`: sample n (index along axis 0) is kept or zeroed
/// whole, kept samples scaled by 1/(1-p) (reference 1.5).
pub fn drop_path(x: &[&Tensor], p: f64, key: u32, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let data = f32_of(t, "input")?;
    if t.rank() == 0 {
        return Err(crate::error::invalid("drop_path needs a sample axis, got a scalar []"));
    }
    let Some(mask) = ctx.drop_mask(p, key, t.shape[0], 1)? else {
        return Ok(super::pool::pooled_clone(t));
    };
    let per_sample = t.shape[1..].iter().product::<usize>();
    let mut out = super::pool::copy(data);
    if per_sample > 0 {
        out.par_chunks_mut(per_sample).enumerate().for_each(|(n, sample)| {
            let f = mask.factor(n as u64);
            sample.iter_mut().for_each(|v| *v *= f);
        });
    }
    Ok(Tensor::f32(t.shape.clone(), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_draws_match_the_stream_element_by_element() {
        for (seed, step, key, first) in [(0, 0, 0, 0u64), (0x1234_5678_9abc, 7, 3, 1), (5, u64::MAX - 1, 9, 1 << 33)] {
            let mask = DropMask::new(seed, step, key, 0.4);
            let mut values = vec![1.0f32; 1001];
            mask.apply(&mut values, first);
            for (i, &v) in values.iter().enumerate() {
                assert_eq!(v, mask.factor(first + i as u64), "element {i} of seed {seed} step {step} key {key}");
            }
            assert!(values.contains(&0.0) && values.iter().any(|&v| v > 1.0));
        }
    }

    #[test]
    fn a_rank_draws_the_rows_of_its_samples_in_the_global_batch() {
        // Global batch of 6 = 3 ranks x 2, two stacked views (12 rows of 5).
        let (world, block, row_len) = (3u64, 2u64, 5u64);
        let global = DropMask::new(9, 4, 2, 0.5);
        let mut all = vec![1.0f32; (2 * world * block * row_len) as usize];
        global.apply(&mut all, 0);
        for rank in 0..world {
            let mask = global.sharded(RowMap { block, world, rank, row_len });
            let mut mine = vec![1.0f32; (2 * block * row_len) as usize];
            mask.apply(&mut mine[1..], 1);
            mine[0] = mask.factor(0);
            for (row, r) in mine.chunks(row_len as usize).enumerate() {
                let (view, i) = (row as u64 / block, row as u64 % block);
                let g = (view * block * world + i * world + rank) as usize;
                assert_eq!(r, &all[g * row_len as usize..][..row_len as usize], "rank {rank} row {row}");
            }
        }
    }
}
