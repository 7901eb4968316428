//! Cross-entropy (mean over the batch) and its gradient, with class-index
//! targets (label smoothing s: t = s/K + (1-s) onehot) or soft targets used as
//! given (reference 4.4); the contrastive losses' self-similarity mask.

use super::collective::comm;
use super::kernel::Ctx;
use super::kernel::{f32_of, operands};
use super::softmax::{log_sum_exp_parts, softmax_row};
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, Data, Tensor};
use rayon::prelude::*;

/// The targets of a `[N, K]` problem.
enum Targets<'a> {
    Hard(&'a [i64]),
    Soft(&'a [f32]),
}

fn targets<'a>(logits: &Tensor, target: &'a Tensor) -> Result<(usize, usize, Targets<'a>), KernelError> {
    let [n, k] = logits.shape[..] else {
        return Err(invalid(format!("logits must be [N, classes], got {}", show_shape(&logits.shape))));
    };
    match &target.data {
        Data::I64(t) if target.shape == [n] => {
            if let Some((i, &y)) = t.iter().enumerate().find(|(_, &y)| y < 0 || y as usize >= k) {
                return Err(invalid(format!("target {y} of sample {i} is not a class index in 0..{k}")));
            }
            Ok((n, k, Targets::Hard(t)))
        }
        Data::F32(t) if target.shape == logits.shape => Ok((n, k, Targets::Soft(t))),
        _ => Err(invalid(format!(
            "target must be class indices [{n}] i64 or probabilities [{n},{k}] f32, got {}",
            target.describe()
        ))),
    }
}

/// Probability of class `j` under the (smoothed) target of sample `i`.
#[inline]
fn target_at(t: &Targets, i: usize, j: usize, k: usize, smoothing: f64) -> f64 {
    match t {
        Targets::Hard(y) => smoothing / k as f64 + if y[i] as usize == j { 1.0 - smoothing } else { 0.0 },
        Targets::Soft(p) => p[i * k + j] as f64,
    }
}

/// `CrossEntropy (logits [N, K], target) -> []`: -mean_n sum_k t log_softmax(x).
pub fn cross_entropy(x: &[&Tensor], smoothing: f64) -> Result<Tensor, KernelError> {
    let [lt, tt] = operands(x, ["logits", "target"])?;
    let logits = f32_of(lt, "logits")?;
    let (n, k, t) = targets(lt, tt)?;
    if k == 0 {
        return Err(invalid("logits have no classes"));
    }
    let total: f64 = (0..n)
        .into_par_iter()
        .map(|i| {
            let row = &logits[i * k..][..k];
            let (max, lse) = log_sum_exp_parts(row);
            let log_p = |j: usize| (row[j] - max) as f64 - lse;
            match &t {
                Targets::Hard(y) => {
                    let mean_log_p = (0..k).map(log_p).sum::<f64>() / k as f64;
                    -(smoothing * mean_log_p + (1.0 - smoothing) * log_p(y[i] as usize))
                }
                Targets::Soft(_) => -(0..k).map(|j| target_at(&t, i, j, k, smoothing) * log_p(j)).sum::<f64>(),
            }
        })
        .sum();
    Ok(Tensor::scalar_f32((total / n.max(1) as f64) as f32))
}

/// `CrossEntropyGrad (logits, target, dloss []) -> [N, K]`: (softmax - t) / N * dloss.
pub fn cross_entropy_grad(x: &[&Tensor], smoothing: f64) -> Result<Tensor, KernelError> {
    let [lt, tt, gt] = operands(x, ["logits", "target", "dloss"])?;
    let logits = f32_of(lt, "logits")?;
    let (n, k, t) = targets(lt, tt)?;
    let dloss = match f32_of(gt, "dloss")? {
        [g] if gt.shape.is_empty() => *g as f64,
        _ => return Err(invalid(format!("dloss must be a scalar [], got {}", show_shape(&gt.shape)))),
    };
    let factor = dloss / n.max(1) as f64;
    let mut out = super::pool::copy(logits);
    if k > 0 {
        out.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
            softmax_row(row);
            // d/dx of -sum_j t_j log softmax(x)_j is softmax(x) * sum_j t_j - t: soft
            // targets need not sum to 1 (hard and smoothed ones do).
            let mass: f64 = (0..k).map(|j| target_at(&t, i, j, k, smoothing)).sum();
            for (j, v) in row.iter_mut().enumerate() {
                *v = ((*v as f64 * mass - target_at(&t, i, j, k, smoothing)) * factor) as f32;
            }
        });
    }
    Ok(Tensor::f32(lt.shape.clone(), out))
}

/// `ZeroDiagonal (x [N, N * world]) -> [N, N * world]`: x with
/// x[i, rank * N + i] = 0, a row's similarity to itself (its column among
/// the gathered rows of every rank) left out of SimCLR's denominator
/// (reference 4.3).
pub fn zero_diagonal(x: &[&Tensor], world: u64, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let rank = comm(ctx, "zero_diagonal", world)?.map_or(0, |c| c.rank());
    let [xt] = operands(x, ["x"])?;
    let data = f32_of(xt, "x")?;
    let n = match xt.shape[..] {
        [n, k] if n as u64 * world == k as u64 => n,
        _ => {
            return Err(invalid(format!("x must be [N, N * {world}], got {}", show_shape(&xt.shape))));
        }
    };
    let k = n * world as usize;
    let mut out = super::pool::copy(data);
    for i in 0..n {
        out[i * k + rank * n + i] = 0.0;
    }
    Ok(Tensor::f32(xt.shape.clone(), out))
}
