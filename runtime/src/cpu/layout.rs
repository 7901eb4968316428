//! Layout kernels, for f32 and i64 alike: reshape, permute, concat, slice,
//! expand (broadcast) and zero padding.

use super::broadcast::{broadcast_strides, coalesce, expand as broadcast_to};
use super::kernel::{check_axis, operands, split_at_axis, PAR_CHUNK, PAR_MIN};
use super::pool::Elem;
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, Data, Tensor};
use rayon::prelude::*;

/// Runs a generic body on the tensor's data, rebuilding the same variant.
macro_rules! per_dtype {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            Data::F32($v) => Data::F32($body),
            Data::I64($v) => Data::I64($body),
        }
    };
}

/// `Reshape { shape }`: same data, new shape (element counts must agree).
pub fn reshape(x: &[&Tensor], shape: &[usize]) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    reshaped(super::pool::pooled_clone(t), shape)
}

/// Reshape by value (the executor moves a dying input here instead of copying).
pub fn reshaped(t: Tensor, shape: &[usize]) -> Result<Tensor, KernelError> {
    if shape.iter().product::<usize>() != t.numel() {
        return Err(invalid(format!("cannot reshape {} to {}", show_shape(&t.shape), show_shape(shape))));
    }
    Ok(Tensor { shape: shape.to_vec(), data: t.data })
}

/// Output `i` reads input `perm[i]`: strided gather, rows of the last output dim.
fn permute_data<T: Elem>(x: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    let mut in_strides = vec![0; shape.len()];
    let mut s = 1;
    for d in (0..shape.len()).rev() {
        in_strides[d] = s;
        s *= shape[d];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let read: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let (dims, st) = coalesce(&out_shape, &[&read]);
    let st = &st[0];
    let (last, inner) = (dims.len() - 1, *dims.last().expect("rank >= 1"));
    let mut out = T::buffer(x.len());
    if x.is_empty() {
        return out;
    }
    if last >= 1 && st[last - 1] == 1 && st[last] != 1 && dims[last - 1] * dims[last] >= TILED_MIN {
        transpose_innermost(x, &dims, st, &mut out);
        return out;
    }
    // Rows of `inner` outputs; a task takes whole rows, about PAR_CHUNK elements.
    let rows_per_task = (PAR_CHUNK / inner.max(1)).max(1);
    let task = |first_row: usize, chunk: &mut [T]| {
        // The input offset of each row, advanced like an odometer over the outer dims.
        let mut idx = vec![0usize; last];
        let mut rem = first_row;
        for d in (0..last).rev() {
            idx[d] = rem % dims[d];
            rem /= dims[d];
        }
        let mut base: usize = (0..last).map(|d| idx[d] * st[d]).sum();
        let step = st[last];
        for o in chunk.chunks_mut(inner) {
            if step == 1 {
                o.copy_from_slice(&x[base..base + inner]);
            } else {
                o.iter_mut().enumerate().for_each(|(j, v)| *v = x[base + j * step]);
            }
            for d in (0..last).rev() {
                idx[d] += 1;
                base += st[d];
                if idx[d] < dims[d] {
                    break;
                }
                base -= dims[d] * st[d];
                idx[d] = 0;
            }
        }
    };
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(rows_per_task * inner).enumerate().for_each(|(c, o)| task(c * rows_per_task, o));
    } else {
        task(0, &mut out);
    }
    out
}

/// Side of the square tiles of a blocked transpose.
const TILE: usize = 32;
/// Transposed blocks from this many elements (1 MiB of f32, about an L2
/// cache) are tiled; smaller ones stay cached and the plain gather is faster.
const TILED_MIN: usize = 1 << 18;

/// The permutations whose two innermost output dims (after merging) are a
/// large transpose: the input's contiguous dim becomes the second-to-last
/// (`x.T` of a weight-gradient operand, `[M, O] -> [O, M]`). A strided gather
/// would fetch one cache line per element from memory; 32 x 32 tiles read
/// contiguous runs and keep the written lines in L1.
fn transpose_innermost<T: Copy + Send + Sync>(x: &[T], dims: &[usize], st: &[usize], out: &mut [T]) {
    let last = dims.len() - 1;
    let (a_len, b_len, b_stride) = (dims[last - 1], dims[last], st[last]);
    let (outer_dims, outer_st) = (&dims[..last - 1], &st[..last - 1]);
    // Output rows a0.. of one block: out(a, b) = x[base + a + b * b_stride].
    let rows = |base: usize, a0: usize, dst: &mut [T]| {
        let n_rows = dst.len() / b_len;
        for b0 in (0..b_len).step_by(TILE) {
            for b in b0..(b0 + TILE).min(b_len) {
                let src = &x[base + a0 + b * b_stride..][..n_rows];
                for (r, &v) in src.iter().enumerate() {
                    dst[r * b_len + b] = v;
                }
            }
        }
    };
    let block = |o: usize, blk: &mut [T]| {
        let (mut idx, mut base) = (o, 0);
        for d in (0..outer_dims.len()).rev() {
            base += (idx % outer_dims[d]) * outer_st[d];
            idx /= outer_dims[d];
        }
        if blk.len() >= PAR_MIN {
            blk.par_chunks_mut(TILE * b_len).enumerate().for_each(|(t, dst)| rows(base, t * TILE, dst));
        } else {
            blk.chunks_mut(TILE * b_len).enumerate().for_each(|(t, dst)| rows(base, t * TILE, dst));
        }
    };
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(a_len * b_len).enumerate().for_each(|(o, blk)| block(o, blk));
    } else {
        out.chunks_mut(a_len * b_len).enumerate().for_each(|(o, blk)| block(o, blk));
    }
}

/// `Permute { perm }`: output dim i is input dim perm[i].
pub fn permute(x: &[&Tensor], perm: &[usize]) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let r = t.rank();
    let mut seen = vec![false; r];
    if perm.len() != r || !perm.iter().all(|&p| p < r && !std::mem::replace(&mut seen[p], true)) {
        return Err(invalid(format!("perm {perm:?} is not a permutation of the axes of {}", show_shape(&t.shape))));
    }
    let shape = perm.iter().map(|&p| t.shape[p]).collect();
    let data = per_dtype!(&t.data, v => permute_data(v, &t.shape, perm));
    Ok(Tensor { shape, data })
}

/// `Concat { axis }`: operands in order along `axis`.
pub fn concat(x: &[&Tensor], axis: usize) -> Result<Tensor, KernelError> {
    let first = x.first().ok_or_else(|| invalid("expects at least 1 operand, got 0"))?;
    check_axis(axis, first)?;
    for (i, t) in x.iter().enumerate() {
        let same = t.rank() == first.rank()
            && (0..t.rank()).all(|d| d == axis || t.shape[d] == first.shape[d])
            && t.data.kind() == first.data.kind();
        if !same {
            return Err(invalid(format!(
                "operand {i} {} does not match operand 0 {} outside axis {axis}",
                t.describe(),
                first.describe()
            )));
        }
    }
    let (outer, _, inner) = split_at_axis(&first.shape, axis);
    let mut shape = first.shape.clone();
    shape[axis] = x.iter().map(|t| t.shape[axis]).sum();
    fn gather<T: Elem>(parts: &[&[T]], lens: &[usize], outer: usize) -> Vec<T> {
        let row: usize = lens.iter().sum();
        let mut out = T::buffer(row * outer);
        let mut at = 0;
        for o in 0..outer {
            for (p, &len) in parts.iter().zip(lens) {
                out[at..at + len].copy_from_slice(&p[o * len..(o + 1) * len]);
                at += len;
            }
        }
        out
    }
    let lens: Vec<usize> = x.iter().map(|t| t.shape[axis] * inner).collect();
    let data = match &first.data {
        Data::F32(_) => {
            Data::F32(gather(&x.iter().map(|t| t.as_f32().expect("kinds checked")).collect::<Vec<_>>(), &lens, outer))
        }
        Data::I64(_) => {
            Data::I64(gather(&x.iter().map(|t| t.as_i64().expect("kinds checked")).collect::<Vec<_>>(), &lens, outer))
        }
    };
    Ok(Tensor { shape, data })
}

/// `Slice { axis, start, end }`: elements start..end of `axis`.
pub fn slice(x: &[&Tensor], axis: usize, start: usize, end: usize) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    check_axis(axis, t)?;
    let (outer, n, inner) = split_at_axis(&t.shape, axis);
    if start > end || end > n {
        return Err(invalid(format!(
            "slice {start}..{end} of axis {axis} is not within 0..{n} for input {}",
            show_shape(&t.shape)
        )));
    }
    let mut shape = t.shape.clone();
    shape[axis] = end - start;
    let data = per_dtype!(&t.data, v => {
        let len = (end - start) * inner;
        let mut out = Elem::buffer(outer * len);
        for (o, dst) in out.chunks_mut(len.max(1)).enumerate().take(outer) {
            dst.copy_from_slice(&v[(o * n + start) * inner..(o * n + end) * inner]);
        }
        out
    });
    Ok(Tensor { shape, data })
}

/// `Pad { axis, before, after }`: zeros around the input along `axis`.
pub fn pad(x: &[&Tensor], axis: usize, before: usize, after: usize) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    check_axis(axis, t)?;
    let (outer, n, inner) = split_at_axis(&t.shape, axis);
    let mut shape = t.shape.clone();
    shape[axis] = before + n + after;
    fn fill<T: Elem>(v: &[T], outer: usize, n: usize, inner: usize, before: usize, after: usize) -> Vec<T> {
        let row = (before + n + after) * inner;
        let mut out = T::buffer(outer * row);
        for (o, dst) in out.chunks_mut(row.max(1)).enumerate().take(outer) {
            dst[..before * inner].fill(T::default());
            dst[before * inner..(before + n) * inner].copy_from_slice(&v[o * n * inner..(o + 1) * n * inner]);
            dst[(before + n) * inner..].fill(T::default());
        }
        out
    }
    let data = per_dtype!(&t.data, v => fill(v, outer, n, inner, before, after));
    Ok(Tensor { shape, data })
}

/// `Expand { shape }`: numpy broadcast to `shape`.
pub fn expand(x: &[&Tensor], shape: &[usize]) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let (r, n) = (t.rank(), shape.len());
    let ok = r <= n && t.shape.iter().zip(&shape[n - r..]).all(|(&s, &d)| s == d || s == 1);
    if !ok {
        return Err(invalid(format!("cannot expand {} to {}", show_shape(&t.shape), show_shape(shape))));
    }
    debug_assert_eq!(broadcast_strides(&t.shape, shape).len(), n);
    let data = per_dtype!(&t.data, v => broadcast_to(v, &t.shape, shape));
    Ok(Tensor { shape: shape.to_vec(), data })
}
