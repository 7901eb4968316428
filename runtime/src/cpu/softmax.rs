//! Softmax, log-softmax and L2 normalisation along one axis. The axis is
//! viewed as `[outer, n, inner]`; `inner == 1` (the last axis) runs on
//! contiguous rows, any other axis gathers each lane into a scratch row.

use super::fast_math::exp_f32;
use super::kernel::{check_axis, f32_of, operands, split_at_axis, PAR_MIN};
use super::pool;
use super::simd::{has_fma, max_f32, sum_f64, vectorized};
use crate::error::KernelError;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// In place: `row = softmax(row)`, numerically stable (the row max is
/// subtracted). Inlined so that it vectorises inside callers' `vectorized`.
#[inline(always)]
pub fn softmax_row(row: &mut [f32]) {
    let max = max_f32(row);
    if max == f32::NEG_INFINITY {
        // Every entry is -inf: no probability mass to spread; torch gives NaN.
        row.fill(f32::NAN);
        return;
    }
    if has_fma() {
        row.iter_mut().for_each(|v| *v = exp_f32::<true>(*v - max));
    } else {
        row.iter_mut().for_each(|v| *v = exp_f32::<false>(*v - max));
    }
    let inv = (1.0 / sum_f64(row)) as f32;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `(max, ln sum exp(row - max))`: the pieces of logsumexp, for log-softmax and cross-entropy.
pub fn log_sum_exp_parts(row: &[f32]) -> (f32, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    (max, sum.ln())
}

/// In place: `row = log_softmax(row)`.
pub fn log_softmax_row(row: &mut [f32]) {
    let (max, lse) = log_sum_exp_parts(row);
    row.iter_mut().for_each(|v| *v = ((*v - max) as f64 - lse) as f32);
}

/// In place: `row = row / max(||row||, eps)` (F.normalize).
pub fn l2_normalize_row(row: &mut [f32], eps: f64) {
    let norm = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
    let inv = (1.0 / norm.max(eps)) as f32;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Applies `f` to every lane along `axis`, in parallel over outer blocks or rows.
pub fn along_axis(x: &[f32], shape: &[usize], axis: usize, f: impl Fn(&mut [f32]) + Sync) -> Vec<f32> {
    let (outer, n, inner) = split_at_axis(shape, axis);
    let mut out = pool::buffer(x.len());
    out.copy_from_slice(x);
    if out.is_empty() || n == 0 {
        return out;
    }
    let parallel = out.len() >= PAR_MIN;
    if inner == 1 {
        if parallel {
            out.par_chunks_mut(n).for_each(&f);
        } else {
            out.chunks_mut(n).for_each(&f);
        }
        return out;
    }
    let block = |blk: &mut [f32], lane: &mut Vec<f32>| {
        for i in 0..inner {
            lane.clear();
            lane.extend((0..n).map(|k| blk[k * inner + i]));
            f(lane);
            for (k, &v) in lane.iter().enumerate() {
                blk[k * inner + i] = v;
            }
        }
    };
    if parallel && outer > 1 {
        out.par_chunks_mut(n * inner).for_each_init(Vec::new, |lane, blk| block(blk, lane));
    } else {
        let mut lane = Vec::with_capacity(n);
        debug_assert_eq!(out.len(), outer * n * inner);
        out.chunks_mut(n * inner).for_each(|blk| block(blk, &mut lane));
    }
    out
}

pub fn softmax(x: &[&Tensor], axis: usize) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    check_axis(axis, t)?;
    Ok(Tensor::f32(
        t.shape.clone(),
        along_axis(f32_of(t, "input")?, &t.shape, axis, |row| {
            vectorized(
                #[inline(always)]
                || softmax_row(row),
            )
        }),
    ))
}

pub fn log_softmax(x: &[&Tensor], axis: usize) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    check_axis(axis, t)?;
    Ok(Tensor::f32(t.shape.clone(), along_axis(f32_of(t, "input")?, &t.shape, axis, log_softmax_row)))
}

pub fn l2_normalize(x: &[&Tensor], axis: usize, eps: f64) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    check_axis(axis, t)?;
    let out = along_axis(f32_of(t, "input")?, &t.shape, axis, |row| l2_normalize_row(row, eps));
    Ok(Tensor::f32(t.shape.clone(), out))
}
