//! Sum / mean / max over a set of axes. Kept and reduced dims are each
//! merged where contiguous; then either every output element folds its own
//! strided set (the reduced dims are innermost, e.g. a mean over tokens), or,
//! when the innermost dim is kept (e.g. a bias gradient summing `[B*N, D]`
//! over rows), whole contiguous rows are folded into an accumulator row.
//! f32 sums accumulate in f64.

use super::broadcast::coalesce;
use super::kernel::{operands, PAR_CHUNK, PAR_MIN};
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, Data, Tensor};
use rayon::prelude::*;
use tessera_plan::ReduceOp;

/// Offset of `index` in a (merged) dim list: `sum_d i_d * strides[d]`.
#[inline]
fn offset(mut index: usize, sizes: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for d in (0..sizes.len()).rev() {
        off += (index % sizes[d]) * strides[d];
        index /= sizes[d];
    }
    off
}

/// A fold over the reduced axes of a row-major tensor; the result is in the
/// kept dims' order (which is the output's layout with or without keepdim).
struct Reduction {
    kept: (Vec<usize>, Vec<usize>),
    reduced: (Vec<usize>, Vec<usize>),
}

impl Reduction {
    fn new(shape: &[usize], axes: &[usize]) -> Self {
        let mut strides = vec![0; shape.len()];
        let mut s = 1;
        for d in (0..shape.len()).rev() {
            strides[d] = s;
            s *= shape[d];
        }
        let split = |keep: bool| {
            let dims: Vec<usize> = (0..shape.len()).filter(|d| axes.contains(d) != keep).collect();
            let sizes: Vec<usize> = dims.iter().map(|&d| shape[d]).collect();
            let st: Vec<usize> = dims.iter().map(|&d| strides[d]).collect();
            let (sizes, mut st) = coalesce(&sizes, &[&st]);
            (sizes, st.remove(0))
        };
        Reduction { kept: split(true), reduced: split(false) }
    }

    fn run<T, A>(&self, x: &[T], init: A, fold: impl Fn(A, T) -> A + Sync, combine: impl Fn(A, A) -> A + Sync) -> Vec<A>
    where
        T: Copy + Sync,
        A: Copy + Send + Sync,
    {
        let (ks, kst) = (&self.kept.0, &self.kept.1);
        let (rs, rst) = (&self.reduced.0, &self.reduced.1);
        let n_out: usize = ks.iter().product();
        let n_red: usize = rs.iter().product();
        let mut out = vec![init; n_out];
        if n_out == 0 || n_red == 0 || x.is_empty() {
            return out;
        }
        let (klast, rlast) = (ks.len() - 1, rs.len() - 1);
        if kst[klast] == 1 && ks[klast] > 1 {
            // Innermost dim kept: fold contiguous rows of length `len`.
            let len = ks[klast];
            let (outer_sizes, outer_strides) = (&ks[..klast], &kst[..klast]);
            let fold_rows = |acc: &mut [A], base: usize, reds: std::ops::Range<usize>| {
                for r in reds {
                    let row = &x[base + offset(r, rs, rst)..][..len];
                    acc.iter_mut().zip(row).for_each(|(a, &v)| *a = fold(*a, v));
                }
            };
            if n_out / len > 1 {
                let body =
                    |(o, acc): (usize, &mut [A])| fold_rows(acc, offset(o, outer_sizes, outer_strides), 0..n_red);
                if x.len() >= PAR_MIN {
                    out.par_chunks_mut(len).enumerate().for_each(body);
                } else {
                    out.chunks_mut(len).enumerate().for_each(body);
                }
            } else if x.len() >= PAR_MIN {
                // One output row: split the reduced rows and combine partial rows.
                let per_task = (PAR_CHUNK / len).max(1);
                let partial = (0..n_red.div_ceil(per_task))
                    .into_par_iter()
                    .map(|t| {
                        let mut acc = vec![init; len];
                        fold_rows(&mut acc, 0, t * per_task..((t + 1) * per_task).min(n_red));
                        acc
                    })
                    .reduce(|| vec![init; len], |a, b| a.iter().zip(&b).map(|(&a, &b)| combine(a, b)).collect());
                out = partial;
            } else {
                fold_rows(&mut out, 0, 0..n_red);
            }
            return out;
        }
        // Fold each output element's strided set; the last reduced dim runs innermost.
        let (rlen, rstride) = (rs[rlast], rst[rlast]);
        let (router_sizes, router_strides) = (&rs[..rlast], &rst[..rlast]);
        let one = |o: usize| {
            let base = offset(o, ks, kst);
            let mut acc = init;
            for r in 0..n_red / rlen {
                let start = base + offset(r, router_sizes, router_strides);
                if rstride == 1 {
                    acc = x[start..start + rlen].iter().fold(acc, |a, &v| fold(a, v));
                } else {
                    acc = (0..rlen).fold(acc, |a, j| fold(a, x[start + j * rstride]));
                }
            }
            acc
        };
        if x.len() >= PAR_MIN {
            out.par_iter_mut().enumerate().for_each(|(o, v)| *v = one(o));
        } else {
            out.iter_mut().enumerate().for_each(|(o, v)| *v = one(o));
        }
        out
    }
}

/// `Reduce { op, axes, keepdim }`.
/// `SumOfSquares (x_1, ..., x_n) -> []`: sum of x^2 over every element of
/// every operand, accumulated in f64 lanes (the squared global L2 norm).
pub fn sum_of_squares(x: &[&Tensor]) -> Result<Tensor, KernelError> {
    if x.is_empty() {
        return Err(crate::error::invalid("expects at least 1 operand, got 0"));
    }
    let mut total = 0.0f64;
    for (i, t) in x.iter().enumerate() {
        let d = super::kernel::f32_of(t, &format!("operand {i}"))?;
        total += d
            .par_chunks(super::kernel::PAR_CHUNK)
            .map(|c| {
                super::simd::vectorized(
                    #[inline(always)]
                    || super::simd::sum_map_f64(c, |v| v * v),
                )
            })
            .sum::<f64>();
    }
    Ok(Tensor::scalar_f32(total as f32))
}

/// The sum over every axis but the last (a bias gradient), as `reduce`.
pub fn row_sums(x: &Tensor) -> Result<Tensor, KernelError> {
    let leading: Vec<usize> = (0..x.shape.len().saturating_sub(1)).collect();
    reduce(&[x], ReduceOp::Sum, &leading, false)
}

pub fn reduce(x: &[&Tensor], op: ReduceOp, axes: &[usize], keepdim: bool) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    for (i, &a) in axes.iter().enumerate() {
        if a >= t.rank() || axes[..i].contains(&a) {
            return Err(invalid(format!("axes {axes:?} are not distinct axes of input {}", show_shape(&t.shape))));
        }
    }
    let shape: Vec<usize> = (0..t.rank())
        .filter_map(|d| match axes.contains(&d) {
            false => Some(t.shape[d]),
            true if keepdim => Some(1),
            true => None,
        })
        .collect();
    let count: usize = axes.iter().map(|&a| t.shape[a]).product();
    let r = Reduction::new(&t.shape, axes);
    let data = match (&t.data, op) {
        (Data::F32(v), ReduceOp::Sum) => {
            Data::F32(r.run(v, 0.0f64, |a, x| a + x as f64, |a, b| a + b).into_iter().map(|s| s as f32).collect())
        }
        (Data::F32(v), ReduceOp::Mean) => {
            let inv = 1.0 / count as f64;
            Data::F32(
                r.run(v, 0.0f64, |a, x| a + x as f64, |a, b| a + b).into_iter().map(|s| (s * inv) as f32).collect(),
            )
        }
        (Data::F32(v), ReduceOp::Max) => {
            // NaN propagates, as in torch.amax.
            let max = |a: f32, x: f32| if a.is_nan() || x.is_nan() { f32::NAN } else { a.max(x) };
            Data::F32(r.run(v, f32::NEG_INFINITY, max, max))
        }
        (Data::I64(v), ReduceOp::Sum) => Data::I64(r.run(v, 0i64, i64::wrapping_add, i64::wrapping_add)),
        (Data::I64(v), ReduceOp::Max) => Data::I64(r.run(v, i64::MIN, i64::max, i64::max)),
        (Data::I64(_), ReduceOp::Mean) => return Err(invalid("mean of an i64 tensor (cast it to a float first)")),
    };
    Ok(Tensor { shape, data })
}
