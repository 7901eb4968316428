//! Kernels that compute new state: MoCo's queue (push and pointer advance,
//! reference 4.1) and batch norm's running statistics.

use super::collective::comm;
use super::kernel::Ctx;
use super::kernel::{f32_of, i64_of, operands};
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, Tensor};
use rayon::prelude::*;

/// The scalar i64 `ptr` as an index.
fn pointer(t: &Tensor) -> Result<i64, KernelError> {
    match i64_of(t, "ptr")? {
        [p] if t.shape.is_empty() => Ok(*p),
        _ => Err(invalid(format!("ptr must be an i64 scalar [], got {}", t.describe()))),
    }
}

/// `QueuePush (queue [E, K], ptr [] i64, keys [N, E]) -> [E, K]`: the queue with
/// the keys of every rank (N * world of them, in the global batch's sample
/// order) transposed into columns ptr.., modulo K (MoCo's enqueue,
/// reference 4.1).
pub fn queue_push(x: &[&Tensor], world: u64, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [qt, pt, kt] = operands(x, ["queue", "ptr", "keys"])?;
    if let Some(c) = comm(ctx, "queue_push", world)? {
        let all = c.all_gather_f32(f32_of(kt, "keys")?).map_err(|e| KernelError::Collective(e.to_string()))?;
        let (w, n) = (world as usize, kt.shape.first().copied().unwrap_or(0));
        let row = kt.numel() / n.max(1);
        // In the global batch's sample order (rank r's key i is sample
        // i * world + r, as the sampler deals them), not rank-major as
        // gathered: the queue then holds what one process with the whole
        // batch would hold, column for column.
        let mut keys = Vec::with_capacity(all.len());
        for i in 0..n {
            for r in 0..w {
                keys.extend_from_slice(&all[(r * n + i) * row..][..row]);
            }
        }
        let mut shape = kt.shape.clone();
        if let Some(n) = shape.first_mut() {
            *n *= w;
        }
        let gathered = Tensor::f32(shape, keys);
        return queue_push(&[qt, pt, &gathered], 1, ctx);
    }
    let (queue, keys) = (f32_of(qt, "queue")?, f32_of(kt, "keys")?);
    let ([e, k], [n, ke]) = (&qt.shape[..], &kt.shape[..]) else {
        return Err(invalid(format!(
            "queue must be [dim, length] and keys [N, dim], got {} and {}",
            show_shape(&qt.shape),
            show_shape(&kt.shape)
        )));
    };
    let (e, k, n) = (*e, *k, *n);
    if *ke != e {
        return Err(invalid(format!("keys dim {ke} does not match queue dim {e}")));
    }
    let ptr = pointer(pt)?;
    if ptr < 0 || n > k || (ptr as usize) >= k.max(1) {
        return Err(invalid(format!("{n} keys at ptr {ptr} do not fit in a queue of length {k}")));
    }
    let ptr = ptr as usize;
    let mut out = super::pool::copy(queue);
    if k > 0 {
        // Columns ptr, ptr+1, ... wrap around: a ring holds the newest K keys,
        // the same set as SwAV's shifted queue whatever the batch (MoCo's
        // queue size is a multiple of the batch, so it never wraps there).
        out.par_chunks_mut(k).enumerate().for_each(|(d, row)| {
            for i in 0..n {
                row[(ptr + i) % k] = keys[i * e + d];
            }
        });
    }
    Ok(Tensor::f32(vec![e, k], out))
}

/// `QueueAdvance (ptr [] i64, keys [N, E], queue [E, K]) -> [] i64`:
/// (ptr + N * world) mod K. Pure arithmetic, so any world size works.
pub fn queue_advance(x: &[&Tensor], world: u64) -> Result<Tensor, KernelError> {
    let [pt, kt, qt] = operands(x, ["ptr", "keys", "queue"])?;
    let ptr = pointer(pt)?;
    let (Some(&n), [_, k]) = (kt.shape.first(), &qt.shape[..]) else {
        return Err(invalid(format!(
            "keys must be [N, dim] and queue [dim, length], got {} and {}",
            show_shape(&kt.shape),
            show_shape(&qt.shape)
        )));
    };
    if *k == 0 {
        return Err(invalid("the queue has length 0"));
    }
    let next = (ptr as i128 + n as i128 * world as i128).rem_euclid(*k as i128);
    Ok(Tensor::scalar_i64(next as i64))
}

/// `RunningStat (running [C], x [N, C, ...]) -> [C]`: (1 - m) running + m stat,
/// stat the batch mean, or with `unbiased_var` the unbiased batch variance
/// (PyTorch's BatchNorm running-statistics update).
pub fn running_stat(x: &[&Tensor], momentum: f64, unbiased_var: bool, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [rt, xt] = operands(x, ["running", "x"])?;
    let (running, xd) = (f32_of(rt, "running")?, f32_of(xt, "x")?);
    if xt.rank() < 2 || rt.shape != [xt.shape[1]] {
        return Err(invalid(format!(
            "running stat must be [C] for x [N, C, ...], got {} and {}",
            show_shape(&rt.shape),
            show_shape(&xt.shape)
        )));
    }
    let (n, c, s) = (xt.shape[0], xt.shape[1], xt.shape[2..].iter().product::<usize>());
    if ctx.sync_batch_norm().is_some() {
        // SyncBatchNorm's running statistics: the group's mean and its
        // unbiased variance (the group's count less one).
        let (stats, count) = super::norm::batch_stats(xd, (n, c, s), ctx)?;
        let out = stats
            .iter()
            .zip(running)
            .map(|(&(mean, var), &r)| {
                let stat = if unbiased_var { var * count / (count - 1.0) } else { mean };
                ((1.0 - momentum) * r as f64 + momentum * stat) as f32
            })
            .collect();
        return Ok(Tensor::f32(vec![c], out));
    }
    let count = n * s;
    let out = (0..c)
        .into_par_iter()
        .map(|ch| {
            let values = || (0..n).flat_map(move |i| xd[(i * c + ch) * s..][..s].iter().map(|&v| v as f64));
            let mean = values().sum::<f64>() / count.max(1) as f64;
            let stat = if unbiased_var {
                // With one element PyTorch's unbiased variance is NaN as well.
                values().map(|v| (v - mean).powi(2)).sum::<f64>() / (count as f64 - 1.0)
            } else {
                mean
            };
            ((1.0 - momentum) * running[ch] as f64 + momentum * stat) as f32
        })
        .collect();
    Ok(Tensor::f32(vec![c], out))
}
