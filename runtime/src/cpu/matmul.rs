//! Matrix products on the `gemm` crate: the safe wrapper every kernel uses,
//! and the `linear` and `matmul` kernels.
//!
//! Threads: one large product runs gemm on the whole rayon pool
//! (`Parallelism::Rayon(0)`); batched products (matmul over batch x heads,
//! attention, per-sample convolution) split the batch across the pool and run
//! each gemm single-threaded, which is faster for attention-sized matrices.

use super::broadcast::{broadcast_shape, broadcast_strides};
use super::kernel::{f32_of, operands};
use super::pool;
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// A strided read-only matrix: element (i, j) lives at `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows x cols` matrix at the start of `data`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose of a row-major `cols x rows` matrix (no copy).
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: 1, cs: rows }
    }

    /// Whether every element lies inside `len` elements.
    fn fits(rows: usize, cols: usize, rs: usize, cs: usize, len: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
    }
}

/// Products from this many multiply-adds use all threads.
const PARALLEL_GEMM_MIN: usize = 96 * 96 * 96;

/// The gemm threading for one `m x k x n` product.
pub fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    if rayon::current_num_threads() > 1 && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_GEMM_MIN {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

/// `dst = lhs @ rhs`, or `dst += lhs @ rhs` when `accumulate`; `dst` is
/// `lhs.rows x rhs.cols` at strides (`dst_rs`, `dst_cs`).
///
/// # Panics
/// If the inner dimensions differ or a view reaches outside its slice
/// (kernels check their operands' shapes before calling this).
#[allow(clippy::too_many_arguments)]
pub fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    dst_cs: usize,
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    par: Parallelism,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "gemm: inner dimensions differ");
    assert!(Mat::fits(m, n, dst_rs, dst_cs, dst.len()), "gemm: dst view out of bounds");
    assert!(Mat::fits(m, k, lhs.rs, lhs.cs, lhs.data.len()), "gemm: lhs view out of bounds");
    assert!(Mat::fits(k, n, rhs.rs, rhs.cs, rhs.data.len()), "gemm: rhs view out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_rs + j * dst_cs] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: the three views were bounds-checked above; `dst` is a unique
    // borrow, so it aliases neither operand. gemm computes
    // dst = alpha * dst + beta * lhs * rhs (alpha is ignored unless read_dst).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// `Linear (x [..., I], w [O, I], b? [O]) -> [..., O]`: x w^T + b.
pub fn linear(x: &[&Tensor]) -> Result<Tensor, KernelError> {
    let (xt, wt, bt) = match *x {
        [a, b] => (a, b, None),
        [a, b, c] => (a, b, Some(c)),
        _ => return Err(invalid(format!("expects 2 or 3 operands (input, weight, bias?), got {}", x.len()))),
    };
    let (xd, wd) = (f32_of(xt, "input")?, f32_of(wt, "weight")?);
    let [o, i] = wt.shape[..] else {
        return Err(invalid(format!("weight must be [out, in], got {}", show_shape(&wt.shape))));
    };
    if xt.shape.last() != Some(&i) {
        return Err(invalid(format!("input {} does not end in weight's in_features {i}", show_shape(&xt.shape))));
    }
    let m: usize = xt.shape[..xt.rank() - 1].iter().product();
    let mut out = pool::buffer(m * o);
    if let Some(bt) = bt {
        let bd = f32_of(bt, "bias")?;
        if bt.shape != [o] {
            return Err(invalid(format!("bias must be [{o}], got {}", show_shape(&bt.shape))));
        }
        out.chunks_mut(o.max(1)).for_each(|row| row.copy_from_slice(bd));
    }
    gemm_into(&mut out, o, 1, Mat::rows(xd, m, i), Mat::transposed(wd, i, o), bt.is_some(), parallelism(m, o, i));
    let mut shape = xt.shape.clone();
    *shape.last_mut().expect("rank >= 1") = o;
    Ok(Tensor::f32(shape, out))
}

/// `Matmul (a [..., M, K], b [..., K, N]) -> [..., M, N]` with broadcast batch dims.
/// A `rows x cols` view of `data`, read transposed when `t`.
fn view(data: &[f32], rows: usize, cols: usize, t: bool) -> Mat<'_> {
    if t {
        Mat::transposed(data, rows, cols)
    } else {
        Mat::rows(data, rows, cols)
    }
}

pub fn matmul(x: &[&Tensor], ta: bool, tb: bool) -> Result<Tensor, KernelError> {
    let [at, bt] = operands(x, ["a", "b"])?;
    let (ad, bd) = (f32_of(at, "a")?, f32_of(bt, "b")?);
    let (ra, rb) = (at.rank(), bt.rank());
    if ra < 2 || rb < 2 {
        return Err(invalid(format!(
            "a {} and b {} must have rank >= 2",
            show_shape(&at.shape),
            show_shape(&bt.shape)
        )));
    }
    // Stored shapes; a transposed operand is read through swapped strides.
    let (ar, ac) = (at.shape[ra - 2], at.shape[ra - 1]);
    let (br, bc) = (bt.shape[rb - 2], bt.shape[rb - 1]);
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if tb { (bc, br) } else { (br, bc) };

    let (a_batch, b_batch) = (&at.shape[..ra - 2], &bt.shape[..rb - 2]);
    let batch_shape = broadcast_shape(a_batch, b_batch);
    let Some(batch_shape) = batch_shape.filter(|_| k == k2) else {
        return Err(invalid(format!("cannot multiply a {} by b {}", show_shape(&at.shape), show_shape(&bt.shape))));
    };
    let batch: usize = batch_shape.iter().product();
    let mut shape = batch_shape.clone();
    shape.extend([m, n]);
    let mut out = pool::buffer(batch * m * n);
    if !ta && b_batch.iter().product::<usize>() == 1 && a_batch == &batch_shape[..] {
        // b is shared by every batch entry: one [batch*M, K] @ [K, N] product.
        let rows = batch * m;
        gemm_into(&mut out, n, 1, Mat::rows(ad, rows, k), view(bd, k, n, tb), false, parallelism(rows, n, k));
        return Ok(Tensor::f32(shape, out));
    }
    let sa = broadcast_strides(a_batch, &batch_shape);
    let sb = broadcast_strides(b_batch, &batch_shape);
    let offsets = |mut bi: usize| {
        let (mut oa, mut ob) = (0, 0);
        for d in (0..batch_shape.len()).rev() {
            let i = bi % batch_shape[d];
            bi /= batch_shape[d];
            oa += i * sa[d];
            ob += i * sb[d];
        }
        (oa * m * k, ob * k * n)
    };
    let one = |bi: usize, dst: &mut [f32], par: Parallelism| {
        let (oa, ob) = offsets(bi);
        gemm_into(dst, n, 1, view(&ad[oa..], m, k, ta), view(&bd[ob..], k, n, tb), false, par);
    };
    if m * n == 0 {
        return Ok(Tensor::f32(shape, out));
    }
    if batch >= rayon::current_num_threads() && batch > 1 {
        out.par_chunks_mut(m * n).enumerate().for_each(|(bi, dst)| one(bi, dst, Parallelism::None));
    } else {
        let par = parallelism(m, n, k);
        out.chunks_mut(m * n).enumerate().for_each(|(bi, dst)| one(bi, dst, par));
    }
    Ok(Tensor::f32(shape, out))
}
