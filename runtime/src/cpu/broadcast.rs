//! Numpy broadcasting as strided iteration: an operand is read through
//! strides over the output shape, with stride 0 on stretched dims. Adjacent
//! dims that are contiguous for every operand are merged first, so the
//! common cases (`[B,N,D] + [D]`, same shapes) run as a few long rows.

use super::kernel::{PAR_CHUNK, PAR_MIN};
use super::pool::Elem;
use super::simd::vectorized;
use rayon::prelude::*;

/// The numpy broadcast of two shapes, or `None` when they are incompatible.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let at = |s: &[usize], i: usize| if i + s.len() >= n { s[i + s.len() - n] } else { 1 };
    (0..n)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// Strides that read a row-major tensor of shape `input` at each index of
/// `output` (0 on stretched or missing leading dims). `input` must broadcast to `output`.
pub fn broadcast_strides(input: &[usize], output: &[usize]) -> Vec<usize> {
    let lead = output.len() - input.len();
    let mut strides = vec![0; output.len()];
    let mut s = 1;
    for i in (0..input.len()).rev() {
        if input[i] != 1 {
            strides[lead + i] = s;
        }
        s *= input[i];
    }
    strides
}

/// Merges adjacent dims that every operand walks contiguously; returns the
/// merged shape and each operand's merged strides. Always rank >= 1.
pub fn coalesce(shape: &[usize], strides: &[&[usize]]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut dims: Vec<usize> = Vec::with_capacity(shape.len());
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for d in 0..shape.len() {
        if shape[d] == 1 {
            continue; // size-1 dims never move any operand
        }
        let mergeable = !dims.is_empty()
            && strides.iter().zip(&out).all(|(s, o)| *o.last().expect("same length as dims") == s[d] * shape[d]);
        if mergeable {
            *dims.last_mut().expect("non-empty") *= shape[d];
            for (o, s) in out.iter_mut().zip(strides) {
                *o.last_mut().expect("non-empty") = s[d];
            }
        } else {
            dims.push(shape[d]);
            for (o, s) in out.iter_mut().zip(strides) {
                o.push(s[d]);
            }
        }
    }
    if dims.is_empty() {
        dims.push(1);
        for o in &mut out {
            o.push(0);
        }
    }
    (dims, out)
}

/// Offset of row `row` (an index over all dims but the last) for `strides`.
#[inline]
fn row_offset(mut row: usize, dims: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for d in (0..dims.len() - 1).rev() {
        off += (row % dims[d]) * strides[d];
        row /= dims[d];
    }
    off
}

/// Rows per parallel task so that a task has about `PAR_CHUNK` elements.
fn rows_per_task(row_len: usize) -> usize {
    (PAR_CHUNK / row_len.max(1)).max(1)
}

/// Runs `fill_rows(first_row, chunk)` over `out` in rows of `len`: split
/// across the pool for large outputs, in one call otherwise.
fn by_rows<U: Send>(out: &mut [U], len: usize, fill_rows: impl Fn(usize, &mut [U]) + Sync) {
    if out.len() >= PAR_MIN {
        let rows = rows_per_task(len);
        out.par_chunks_mut(rows * len).enumerate().for_each(|(c, chunk)| fill_rows(c * rows, chunk));
    } else if !out.is_empty() {
        fill_rows(0, out);
    }
}

/// `out[i] = f(a[i'], b[i''])` with `a`, `b` broadcast to `out_shape`.
pub fn zip<T, U, F>(a: &[T], a_shape: &[usize], b: &[T], b_shape: &[usize], out_shape: &[usize], f: F) -> Vec<U>
where
    T: Copy + Sync,
    U: Elem,
    F: Fn(T, T) -> U + Sync,
{
    let numel: usize = out_shape.iter().product();
    if a_shape == b_shape {
        let mut out = U::buffer(numel);
        let body = |(o, (x, y)): (&mut [U], (&[T], &[T]))| {
            vectorized(
                #[inline(always)]
                || {
                    for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                        *o = f(x, y);
                    }
                },
            )
        };
        if numel >= PAR_MIN {
            out.par_chunks_mut(PAR_CHUNK).zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK))).for_each(body);
        } else {
            body((&mut out, (a, b)));
        }
        return out;
    }
    let sa = broadcast_strides(a_shape, out_shape);
    let sb = broadcast_strides(b_shape, out_shape);
    let (dims, st) = coalesce(out_shape, &[&sa, &sb]);
    let (sa, sb) = (&st[0], &st[1]);
    let len = *dims.last().expect("rank >= 1");
    let (ia, ib) = (sa[dims.len() - 1], sb[dims.len() - 1]);
    let mut out = U::buffer(numel);
    let fill_rows = |first_row: usize, chunk: &mut [U]| {
        vectorized(
            #[inline(always)]
            || {
                for (r, o) in chunk.chunks_mut(len).enumerate() {
                    let row = first_row + r;
                    let (oa, ob) = (row_offset(row, &dims, sa), row_offset(row, &dims, sb));
                    // Contiguous and stretched operands get loops the compiler vectorises.
                    match (ia, ib) {
                        (1, 1) => o
                            .iter_mut()
                            .zip(&a[oa..oa + len])
                            .zip(&b[ob..ob + len])
                            .for_each(|((o, &x), &y)| *o = f(x, y)),
                        (1, 0) => {
                            let y = b[ob];
                            o.iter_mut().zip(&a[oa..oa + len]).for_each(|(o, &x)| *o = f(x, y))
                        }
                        (0, 1) => {
                            let x = a[oa];
                            o.iter_mut().zip(&b[ob..ob + len]).for_each(|(o, &y)| *o = f(x, y))
                        }
                        _ => o.iter_mut().enumerate().for_each(|(i, o)| *o = f(a[oa + i * ia], b[ob + i * ib])),
                    }
                }
            },
        )
    };
    by_rows(&mut out, len, fill_rows);
    out
}

/// `a` broadcast (copied) to `out_shape`.
pub fn expand<T: Elem>(a: &[T], a_shape: &[usize], out_shape: &[usize]) -> Vec<T> {
    let numel: usize = out_shape.iter().product();
    let sa = broadcast_strides(a_shape, out_shape);
    let (dims, st) = coalesce(out_shape, &[&sa]);
    let sa = &st[0];
    let len = *dims.last().expect("rank >= 1");
    let ia = sa[dims.len() - 1];
    let mut out = T::buffer(numel);
    let fill_rows = |first_row: usize, chunk: &mut [T]| {
        for (r, o) in chunk.chunks_mut(len).enumerate() {
            let oa = row_offset(first_row + r, &dims, sa);
            if ia == 1 {
                o.copy_from_slice(&a[oa..oa + len]);
            } else {
                o.iter_mut().enumerate().for_each(|(i, o)| *o = a[oa + i * ia]);
            }
        }
    };
    by_rows(&mut out, len, fill_rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_strides() {
        assert_eq!(broadcast_shape(&[4, 1, 3], &[5, 1]), Some(vec![4, 5, 3]));
        assert_eq!(broadcast_shape(&[], &[2, 3]), Some(vec![2, 3]));
        assert_eq!(broadcast_shape(&[2, 3], &[3, 3]), None);
        assert_eq!(broadcast_strides(&[5, 1], &[4, 5, 3]), vec![0, 1, 0]);
        assert_eq!(broadcast_strides(&[], &[2]), vec![0]);
        // [B,N,D] + [D] merges to two dims.
        let (dims, st) = coalesce(&[2, 3, 4], &[&[12, 4, 1], &[0, 0, 1]]);
        assert_eq!(dims, vec![6, 4]);
        assert_eq!(st, vec![vec![4, 1], vec![0, 1]]);
        let (dims, _) = coalesce(&[1, 1], &[&[0, 0]]);
        assert_eq!(dims, vec![1]);
    }

    #[test]
    fn zip_matches_index_arithmetic() {
        let a: Vec<i64> = (0..12).collect(); // [3, 1, 4]
        let b: Vec<i64> = (0..2).map(|v| v * 100).collect(); // [2, 1]
        let out = zip(&a, &[3, 1, 4], &b, &[2, 1], &[3, 2, 4], |x, y| x + y);
        for i in 0..3 {
            for j in 0..2 {
                for k in 0..4 {
                    assert_eq!(out[(i * 2 + j) * 4 + k], (i * 4 + k) as i64 + 100 * j as i64);
                }
            }
        }
        assert_eq!(expand(&[1, 2], &[2, 1], &[2, 3]), vec![1, 1, 1, 2, 2, 2]);
    }
}
