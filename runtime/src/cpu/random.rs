//! Dropout and drop path (stochastic depth), drawn from Philox so that every
//! backend, and the backward pass, sees the same mask: element (or sample)
//! `i` of op `key` at step `s` is kept iff `Stream::new(seed, s, key).keep_at(i, 1-p)`.
//! Autodiff re-applies `Dropout { p, key }` to the upstream gradient, which
//! is exactly the backward because the mask depends on nothing else.

use super::error::KernelError;
use super::kernel::{f32_of, operands, Ctx, PAR_CHUNK, PAR_MIN};
use super::tensor::Tensor;
use crate::philox::Stream;
use rayon::prelude::*;

/// A Bernoulli(1-p) keep mask with the inverted-dropout scale 1/(1-p).
#[derive(Clone, Copy, Debug)]
pub struct DropMask {
    stream: Stream,
    keep: f32,
    scale: f32,
}

impl DropMask {
    pub fn new(seed: u64, step: u64, key: u32, p: f64) -> Self {
        DropMask { stream: Stream::new(seed, step, key), keep: (1.0 - p) as f32, scale: (1.0 / (1.0 - p)) as f32 }
    }

    /// The factor element `index` is multiplied by: 1/(1-p) if kept, else 0.
    #[inline]
    pub fn factor(&self, index: u64) -> f32 {
        if self.stream.keep_at(index, self.keep) {
            self.scale
        } else {
            0.0
        }
    }

    /// Multiplies `values`, which start at flat index `first`, by the mask.
    pub fn apply(&self, values: &mut [f32], first: u64) {
        for (i, v) in values.iter_mut().enumerate() {
            *v *= self.factor(first + i as u64);
        }
    }
}

/// `Dropout { p, key }`: element i of the output (flat index) is masked.
pub fn dropout(x: &[&Tensor], p: f64, key: u32, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let data = f32_of(t, "input")?;
    let Some(mask) = ctx.drop_mask(p, key)? else {
        return Ok(t.clone());
    };
    let mut out = data.to_vec();
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| mask.apply(chunk, (c * PAR_CHUNK) as u64));
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
        return Err(super::error::invalid("drop_path needs a sample axis, got a scalar []"));
    }
    let Some(mask) = ctx.drop_mask(p, key)? else {
        return Ok(t.clone());
    };
    let per_sample = t.shape[1..].iter().product::<usize>();
    let mut out = data.to_vec();
    if per_sample > 0 {
        out.par_chunks_mut(per_sample).enumerate().for_each(|(n, sample)| {
            let f = mask.factor(n as u64);
            sample.iter_mut().for_each(|v| *v *= f);
        });
    }
    Ok(Tensor::f32(t.shape.clone(), out))
}
