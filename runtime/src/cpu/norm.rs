//! Normalisation: layer norm and `Normalize` over the last axis, batch norm
//! and `BatchStandardize` over all axes but 1, and their gradients. Variances
//! are biased (divide by the count), statistics accumulate in f64.
//!
//! Gradient of standardisation for an upstream gradient g, with
//! xhat = (x - mean) / sigma and means over the normalised elements:
//! dx = (g - mean(g) - xhat * mean(g * xhat)) / sigma.

use super::elementwise::same_shape;
use super::kernel::{expect_shape, f32_of, operands, Ctx, PAR_MIN};
use super::pool;
use super::simd::{sum2_f64, sum_f64, sum_map_f64, vectorized};
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, Tensor};
use rayon::prelude::*;

/// Biased mean and variance of `values` (two passes).
fn mean_var<'a>(values: impl Iterator<Item = &'a [f32]> + Clone, count: usize) -> (f64, f64) {
    let inv = 1.0 / count.max(1) as f64;
    let mean = values.clone().flatten().map(|&v| v as f64).sum::<f64>() * inv;
    let var = values.flatten().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() * inv;
    (mean, var)
}

/// `(mean(g), mean(g * xhat))` for one normalised group.
fn grad_means<'a>(
    g: impl Iterator<Item = &'a [f32]>,
    x: impl Iterator<Item = &'a [f32]>,
    mean: f64,
    inv_sigma: f64,
    count: usize,
) -> (f64, f64) {
    let (mut sg, mut sgx) = (0.0f64, 0.0f64);
    for (gs, xs) in g.zip(x) {
        for (&gv, &xv) in gs.iter().zip(xs) {
            sg += gv as f64;
            sgx += gv as f64 * (xv as f64 - mean) * inv_sigma;
        }
    }
    let inv = 1.0 / count.max(1) as f64;
    (sg * inv, sgx * inv)
}

/// Calls `f(r, row)` for every row `r` of length `d` of `out`, in parallel when large.
fn for_rows(out: &mut [f32], d: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if d == 0 {
        return;
    }
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(d).enumerate().for_each(|(r, row)| f(r, row));
    } else {
        out.chunks_mut(d).enumerate().for_each(|(r, row)| f(r, row));
    }
}

fn last_dim(t: &Tensor) -> Result<usize, KernelError> {
    t.shape.last().copied().ok_or_else(|| invalid("input must have a feature axis, got a scalar []"))
}

/// `LayerNorm (x [..., D], w [D], b [D])`: (x - mean) / sqrt(var + eps) * w + b.
pub fn layer_norm(x: &[&Tensor], eps: f64) -> Result<Tensor, KernelError> {
    let [xt, wt, bt] = operands(x, ["input", "weight", "bias"])?;
    let d = last_dim(xt)?;
    expect_shape(wt, "weight", &[d])?;
    expect_shape(bt, "bias", &[d])?;
    let (w, b) = (f32_of(wt, "weight")?, f32_of(bt, "bias")?);
    standardize_rows(xt, d, eps, Some((w, b)))
}

/// `Normalize (x [..., D])`: layer norm without the affine part.
pub fn normalize(x: &[&Tensor], eps: f64) -> Result<Tensor, KernelError> {
    let [xt] = operands(x, ["input"])?;
    let d = last_dim(xt)?;
    standardize_rows(xt, d, eps, None)
}

/// Biased (mean, variance) of one row, accumulated in f64 lanes.
#[inline(always)]
fn row_mean_var(xs: &[f32]) -> (f64, f64) {
    let inv = 1.0 / xs.len().max(1) as f64;
    let mean = sum_f64(xs) * inv;
    (mean, sum_map_f64(xs, |v| (v - mean) * (v - mean)) * inv)
}

/// (x - mean) / sqrt(var + eps) over each row of `d` values (biased
/// variance), times w plus b when an affine pair is given.
fn standardize_rows(xt: &Tensor, d: usize, eps: f64, affine: Option<(&[f32], &[f32])>) -> Result<Tensor, KernelError> {
    let xd = f32_of(xt, "input")?;
    let mut out = pool::buffer(xt.numel());
    for_rows(&mut out, d, |r, row| {
        vectorized(
            #[inline(always)]
            || {
                let xs = &xd[r * d..][..d];
                let (mean, var) = row_mean_var(xs);
                let inv = 1.0 / (var + eps).sqrt();
                let (m, s) = (mean as f32, inv as f32);
                match affine {
                    Some((w, b)) => row
                        .iter_mut()
                        .zip(xs)
                        .zip(w.iter().zip(b))
                        .for_each(|((o, &x), (&w, &b))| *o = (x - m) * s * w + b),
                    None => row.iter_mut().zip(xs).for_each(|(o, &x)| *o = (x - m) * s),
                }
            },
        )
    });
    Ok(Tensor::f32(xt.shape.clone(), out))
}

/// `NormalizeGrad (g [..., D], x [..., D]) -> dx`, or `(dy, x, w [D])` for
/// g = dy * w (LayerNorm's input gradient; the product rounded to f32 as
/// a separate multiply would).
pub fn normalize_grad(x: &[&Tensor], eps: f64) -> Result<Tensor, KernelError> {
    let (gt, xt, wt, rt) = match x {
        [g, x] => (*g, *x, None, None),
        [g, x, w] => (*g, *x, Some(*w), None),
        [g, x, w, r] => (*g, *x, Some(*w), Some(*r)),
        _ => return Err(invalid(format!("expects (g, x), (dy, x, w) or (dy, x, w, r), got {} operands", x.len()))),
    };
    if let Some(r) = rt {
        same_shape(r, xt, "r", "x")?;
    }
    let rd = rt.map(|r| f32_of(r, "r")).transpose()?;
    same_shape(gt, xt, "g", "x")?;
    let d = last_dim(xt)?;
    let (gd, xd) = (f32_of(gt, "g")?, f32_of(xt, "x")?);
    let weighted = match wt {
        None => None,
        Some(w) => {
            let wd = f32_of(w, "w")?;
            if wd.len() != d {
                return Err(invalid(format!("w must be [{d}], got {}", show_shape(&w.shape))));
            }
            let mut gw = pool::buffer(gd.len());
            gw.par_chunks_mut(d.max(1)).zip(gd.par_chunks(d.max(1))).for_each(|(o, g)| {
                o.iter_mut().zip(g).zip(wd).for_each(|((o, &g), &w)| *o = g * w);
            });
            Some(gw)
        }
    };
    let gd: &[f32] = weighted.as_deref().unwrap_or(gd);
    let mut out = pool::buffer(xt.numel());
    for_rows(&mut out, d, |r, row| {
        vectorized(
            #[inline(always)]
            || {
                let (g, xs) = (&gd[r * d..][..d], &xd[r * d..][..d]);
                let (mean, var) = row_mean_var(xs);
                let inv = 1.0 / (var + eps).sqrt();
                let n = 1.0 / d as f64;
                let mg = sum_f64(g) * n;
                let mgx = sum2_f64(g, xs, |g, x| g * (x - mean)) * inv * n;
                let (m, s, mg, mgx) = (mean as f32, inv as f32, mg as f32, mgx as f32);
                for ((o, &gv), &xv) in row.iter_mut().zip(g).zip(xs) {
                    *o = (gv - mg - (xv - m) * s * mgx) * s;
                }
                // The residual gradient, added as a separate add would (f32).
                if let Some(rd) = rd {
                    row.iter_mut().zip(&rd[r * d..][..d]).for_each(|(o, &rv)| *o += rv);
                }
            },
        )
    });
    if let Some(gw) = weighted {
        pool::recycle(Tensor::f32(vec![gw.len()], gw));
    }
    Ok(Tensor::f32(xt.shape.clone(), out))
}

/// Rows per task of `layer_norm_weight_grad`: a fixed cut, so the sum's
/// order (and its bits) does not depend on the thread count.
const WEIGHT_GRAD_ROWS: usize = 64;

/// `LayerNormWeightGrad (dy [..., D], x [..., D]) -> [D]`: the sum over rows
/// of dy * xhat, xhat = (x - mean) * rstd formed in f32 as `normalize`
/// forms it, each product rounded to f32 as a separate multiply would and
/// summed in f64 (per block of rows, then the blocks in order).
pub fn layer_norm_weight_grad(x: &[&Tensor], eps: f64) -> Result<Tensor, KernelError> {
    let [gt, xt] = operands(x, ["dy", "x"])?;
    same_shape(gt, xt, "dy", "x")?;
    let d = last_dim(xt)?;
    let (gd, xd) = (f32_of(gt, "dy")?, f32_of(xt, "x")?);
    let block = |rows: std::ops::Range<usize>| {
        let mut acc = vec![0.0f64; d];
        vectorized(
            #[inline(always)]
            || {
                for r in rows.clone() {
                    let (g, xs) = (&gd[r * d..][..d], &xd[r * d..][..d]);
                    let (mean, var) = row_mean_var(xs);
                    let (m, s) = (mean as f32, (1.0 / (var + eps).sqrt()) as f32);
                    for ((a, &gv), &xv) in acc.iter_mut().zip(g).zip(xs) {
                        *a += (gv * ((xv - m) * s)) as f64;
                    }
                }
            },
        );
        acc
    };
    let rows = if d == 0 { 0 } else { xd.len() / d };
    let starts: Vec<usize> = (0..rows).step_by(WEIGHT_GRAD_ROWS).collect();
    let cut = |&r0: &usize| r0..(r0 + WEIGHT_GRAD_ROWS).min(rows);
    let partials: Vec<Vec<f64>> = if xd.len() >= PAR_MIN {
        starts.par_iter().map(|r0| block(cut(r0))).collect()
    } else {
        starts.iter().map(|r0| block(cut(r0))).collect()
    };
    let mut out = pool::buffer(d);
    for (c, o) in out.iter_mut().enumerate() {
        *o = partials.iter().map(|p| p[c]).sum::<f64>() as f32;
    }
    Ok(Tensor::f32(vec![d], out))
}

/// `BatchStandardizeGrad` with the group's statistics: mean(g) and
/// mean(g * xhat) are sums over every sample of the group (SyncBatchNorm's
/// backward all-reduces them).
fn synced_standardize_grad(
    gd: &[f32],
    xd: &[f32],
    dims: (usize, usize, usize),
    eps: f64,
    ctx: &Ctx,
    shape: &[usize],
) -> Result<Tensor, KernelError> {
    let group = ctx.sync_batch_norm().expect("checked by the caller");
    let (stats, count) = batch_stats(xd, dims, ctx)?;
    let inv: Vec<f64> = stats.iter().map(|&(_, v)| 1.0 / (v + eps).sqrt()).collect();
    let mut sums: Vec<f64> = (0..dims.1)
        .into_par_iter()
        .flat_map_iter(|c| {
            let (mg, mgx) = grad_means(channel(gd, dims, c), channel(xd, dims, c), stats[c].0, inv[c], 1);
            [mg, mgx]
        })
        .collect();
    group.group_sum(&mut sums)?;
    let n = 1.0 / count.max(1.0);
    let out = per_channel_map(xd, dims, |ch, i, v| {
        let (mean, s) = (stats[ch].0, inv[ch]);
        let xhat = (v as f64 - mean) * s;
        ((gd[i] as f64 - sums[2 * ch] * n - xhat * sums[2 * ch + 1] * n) * s) as f32
    });
    Ok(Tensor::f32(shape.to_vec(), out))
}

/// `[N, C, S...]` viewed as (N, C, S) with S the product of the trailing dims.
fn ncs(t: &Tensor) -> Result<(usize, usize, usize), KernelError> {
    if t.rank() < 2 {
        return Err(invalid(format!("input must be [N, C, ...], got {}", show_shape(&t.shape))));
    }
    Ok((t.shape[0], t.shape[1], t.shape[2..].iter().product()))
}

/// The `S` elements of sample `n`, channel `c`, for every n.
fn channel(x: &[f32], (n, c_count, s): (usize, usize, usize), c: usize) -> impl Iterator<Item = &[f32]> + Clone {
    (0..n).map(move |i| &x[(i * c_count + c) * s..][..s])
}

/// Per-channel biased (mean, var) over N and the trailing dims.
fn channel_stats(x: &[f32], dims: (usize, usize, usize)) -> Vec<(f64, f64)> {
    let count = dims.0 * dims.2;
    (0..dims.1).into_par_iter().map(|c| mean_var(channel(x, dims, c), count)).collect()
}

/// Per-channel biased (mean, var) over the batch, or, with synchronised
/// batch norm, over the batches of the rank's group (two passes, each sum
/// reduced across the group, as one process with the group's samples
/// computes them); and the number of values per channel.
pub fn batch_stats(x: &[f32], dims: (usize, usize, usize), ctx: &Ctx) -> Result<(Vec<(f64, f64)>, f64), KernelError> {
    let local = (dims.0 * dims.2) as f64;
    let Some(group) = ctx.sync_batch_norm() else { return Ok((channel_stats(x, dims), local)) };
    let c = dims.1;
    let mut sums: Vec<f64> =
        (0..c).into_par_iter().map(|ch| channel(x, dims, ch).flatten().map(|&v| v as f64).sum()).collect();
    sums.push(local);
    group.group_sum(&mut sums)?;
    let count = sums[c];
    let means: Vec<f64> = sums[..c].iter().map(|s| s / count.max(1.0)).collect();
    let mut squares: Vec<f64> = (0..c)
        .into_par_iter()
        .map(|ch| channel(x, dims, ch).flatten().map(|&v| (v as f64 - means[ch]).powi(2)).sum())
        .collect();
    group.group_sum(&mut squares)?;
    Ok((means.iter().zip(&squares).map(|(&m, &q)| (m, q / count.max(1.0))).collect(), count))
}

/// Writes `f(c, x)` for every element, in parallel over samples.
fn per_channel_map(
    x: &[f32],
    (n, c, s): (usize, usize, usize),
    f: impl Fn(usize, usize, f32) -> f32 + Sync,
) -> Vec<f32> {
    let mut out = pool::buffer(x.len());
    if c * s == 0 {
        return out;
    }
    out.par_chunks_mut(c * s).enumerate().for_each(|(i, sample)| {
        for (ch, block) in sample.chunks_mut(s).enumerate() {
            let base = (i * c + ch) * s;
            block.iter_mut().enumerate().for_each(|(j, o)| *o = f(ch, base + j, x[base + j]));
        }
    });
    debug_assert_eq!(out.len(), n * c * s);
    out
}

/// `BatchNorm (x [N, C, ...], w, b, running_mean, running_var)`: batch
/// statistics in training, running statistics in eval.
pub fn batch_norm(x: &[&Tensor], eps: f64, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [xt, wt, bt, rmt, rvt] = operands(x, ["input", "weight", "bias", "running_mean", "running_var"])?;
    let dims = ncs(xt)?;
    let c = dims.1;
    for (t, role) in [(wt, "weight"), (bt, "bias"), (rmt, "running_mean"), (rvt, "running_var")] {
        expect_shape(t, role, &[c])?;
    }
    let xd = f32_of(xt, "input")?;
    let (w, b) = (f32_of(wt, "weight")?, f32_of(bt, "bias")?);
    let stats: Vec<(f64, f64)> = if ctx.training {
        batch_stats(xd, dims, ctx)?.0
    } else {
        let (rm, rv) = (f32_of(rmt, "running_mean")?, f32_of(rvt, "running_var")?);
        rm.iter().zip(rv).map(|(&m, &v)| (m as f64, v as f64)).collect()
    };
    // Per channel: y = x * scale + shift.
    let affine: Vec<(f64, f64)> = stats
        .iter()
        .zip(w.iter().zip(b))
        .map(|(&(m, v), (&w, &b))| {
            let scale = w as f64 / (v + eps).sqrt();
            (scale, b as f64 - m * scale)
        })
        .collect();
    let out = per_channel_map(xd, dims, |ch, _, v| (v as f64 * affine[ch].0 + affine[ch].1) as f32);
    Ok(Tensor::f32(xt.shape.clone(), out))
}

/// `BatchStandardize (x [N, C, ...])`: standardised per channel with batch statistics.
pub fn batch_standardize(x: &[&Tensor], eps: f64, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [xt] = operands(x, ["input"])?;
    let dims = ncs(xt)?;
    let xd = f32_of(xt, "input")?;
    let stats: Vec<(f64, f64)> =
        batch_stats(xd, dims, ctx)?.0.into_iter().map(|(m, v)| (m, 1.0 / (v + eps).sqrt())).collect();
    let out = per_channel_map(xd, dims, |ch, _, v| ((v as f64 - stats[ch].0) * stats[ch].1) as f32);
    Ok(Tensor::f32(xt.shape.clone(), out))
}

/// `BatchStandardizeGrad (g, x) -> dx`.
pub fn batch_standardize_grad(x: &[&Tensor], eps: f64, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [gt, xt] = operands(x, ["g", "x"])?;
    same_shape(gt, xt, "g", "x")?;
    let dims = ncs(xt)?;
    let (gd, xd) = (f32_of(gt, "g")?, f32_of(xt, "x")?);
    if ctx.sync_batch_norm().is_some() {
        return synced_standardize_grad(gd, xd, dims, eps, ctx, &xt.shape);
    }
    let count = dims.0 * dims.2;
    // (mean, 1/sigma, mean(g), mean(g * xhat)) per channel.
    let per: Vec<(f64, f64, f64, f64)> = (0..dims.1)
        .into_par_iter()
        .map(|c| {
            let (mean, var) = mean_var(channel(xd, dims, c), count);
            let inv = 1.0 / (var + eps).sqrt();
            let (mg, mgx) = grad_means(channel(gd, dims, c), channel(xd, dims, c), mean, inv, count);
            (mean, inv, mg, mgx)
        })
        .collect();
    let out = per_channel_map(xd, dims, |ch, i, v| {
        let (mean, inv, mg, mgx) = per[ch];
        let xhat = (v as f64 - mean) * inv;
        ((gd[i] as f64 - mg - xhat * mgx) * inv) as f32
    });
    Ok(Tensor::f32(xt.shape.clone(), out))
}

/// `LayerNormGrad`'s operands without the norm's bias, which it reads
/// (last) only when it makes the normalised input (result 5).
pub fn without_bias<'a, 'b>(x: &'a [&'b Tensor], normalized: Option<tessera_plan::DType>) -> &'a [&'b Tensor] {
    match (normalized, x.split_last()) {
        (Some(_), Some((_, rest))) => rest,
        _ => x,
    }
}

/// The other results of `LayerNormGrad` (its result, dx, is
/// `normalize_grad`'s) that `wanted` names: 1 the weight gradient
/// (`layer_norm_weight_grad`'s), 2 the bias gradient (dy summed over the
/// rows, f64 accumulation as `reduce`), 3 dx as the cast to `copy` makes
/// it, 4 the sum of that copy (of dx without one) over the rows, 5 the
/// forward's layer_norm(x, w, b) in its type. Each is computed exactly as the
/// kernel it replaces, so a plan with the joined kernel trains bitwise like
/// one without; the CPU's gain is the kernels it no longer dispatches.
pub fn layer_norm_grad_parts(
    x: &[&Tensor],
    dx: &Tensor,
    eps: f64,
    copy: Option<tessera_plan::DType>,
    normalized: Option<tessera_plan::DType>,
    wanted: &[u64],
) -> Result<Vec<(u64, Tensor)>, KernelError> {
    let [dy, xt, w] = match without_bias(x, normalized) {
        [dy, xt, w, ..] => [*dy, *xt, *w],
        _ => return Err(invalid(format!("expects (dy, x, w) or (dy, x, w, r), got {} operands", x.len()))),
    };
    let low = || copy.ok_or_else(|| invalid("result 3 of a layer-norm backward needs its copy type"));
    let mut parts = Vec::with_capacity(wanted.len());
    for &index in wanted {
        let t = match index {
            1 => layer_norm_weight_grad(&[dy, xt], eps)?,
            2 => super::reduce::row_sums(dy)?,
            3 => super::elementwise::cast(&[dx], low()?)?,
            // The sum of the copy as the copy holds it (rounded), or of dx.
            4 => match copy {
                Some(low) => {
                    let copy = super::elementwise::cast(&[dx], low)?;
                    let sum = super::reduce::row_sums(&copy);
                    pool::recycle(copy);
                    sum?
                }
                None => super::reduce::row_sums(dx)?,
            },
            // The forward's output in the weight-gradient product's type, as
            // `matmul_layer_norm_rhs` computes its operand.
            5 => {
                let (Some(dtype), Some(b)) = (normalized, x.last()) else {
                    return Err(invalid("result 5 of a layer-norm backward needs its type and the norm's bias"));
                };
                let y = layer_norm(&[xt, w, b], eps)?;
                let part = super::elementwise::cast(&[&y], dtype);
                pool::recycle(y);
                part?
            }
            other => return Err(invalid(format!("a layer-norm backward has no result {other}"))),
        };
        parts.push((index, t));
    }
    Ok(parts)
}
