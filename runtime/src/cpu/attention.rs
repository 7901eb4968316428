//! Scaled dot-product attention, one (batch, head) pair per rayon task:
//! `softmax((q k^T) * scale)` over keys (row max subtracted), dropout on the
//! probabilities, then `@ v`. Dropout element `i` is the flat index into the
//! probabilities `[.., H, Nq, Nk]`, the same index a `Dropout` op with this
//! key uses on a tensor of that shape (which is how autodiff replays it).

use super::kernel::{f32_of, operands, Ctx};
use super::matmul::{gemm_into, parallelism, Mat};
use super::pool;
use super::simd::{sum2_f64, vectorized};
use super::softmax::softmax_row;
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// `probs = softmax(q k^T * scale)` over each row (`q` is `nq x d`, `kt`
/// the `d x nk` view of k^T), into `probs` resized to `nq x nk`.
fn probabilities(probs: &mut Vec<f32>, q: Mat, kt: Mat, scale: f32, par: Parallelism) {
    let (nq, nk) = (q.rows, kt.cols);
    probs.resize(nq * nk, 0.0);
    gemm_into(probs, nk, 1, q, kt, false, par);
    vectorized(
        #[inline(always)]
        || {
            for row in probs.chunks_mut(nk.max(1)) {
                row.iter_mut().for_each(|s| *s *= scale);
                softmax_row(row);
            }
        },
    );
}

pub fn attention(x: &[&Tensor], scale: f64, dropout: f64, key: u32, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [qt, kt, vt] = operands(x, ["q", "k", "v"])?;
    let (qd, kd, vd) = (f32_of(qt, "q")?, f32_of(kt, "k")?, f32_of(vt, "v")?);
    let r = qt.rank();
    let lead_ok = r >= 3
        && kt.rank() == r
        && vt.rank() == r
        && qt.shape[..r - 2] == kt.shape[..r - 2]
        && qt.shape[..r - 2] == vt.shape[..r - 2];
    if !lead_ok || kt.shape[r - 1] != qt.shape[r - 1] || vt.shape[r - 2] != kt.shape[r - 2] {
        return Err(invalid(format!(
            "q {}, k {}, v {} are not [.., H, Nq, d], [.., H, Nk, d], [.., H, Nk, dv]",
            show_shape(&qt.shape),
            show_shape(&kt.shape),
            show_shape(&vt.shape)
        )));
    }
    let (nq, d, nk, dv) = (qt.shape[r - 2], qt.shape[r - 1], kt.shape[r - 2], vt.shape[r - 1]);
    let heads: usize = qt.shape[..r - 2].iter().product();
    let rows = if r > 2 { qt.shape[0] } else { 1 };
    let mask = ctx.drop_mask(dropout, key, rows, heads / rows.max(1) * nq * nk)?;
    let scale = scale as f32;
    let mut shape = qt.shape.clone();
    shape[r - 1] = dv;
    let mut out = pool::buffer(heads * nq * dv);
    if nq * dv == 0 {
        return Ok(Tensor::f32(shape, out));
    }
    let one_head = |bh: usize, dst: &mut [f32], scores: &mut Vec<f32>, par: Parallelism| {
        let q = Mat::rows(&qd[bh * nq * d..], nq, d);
        let k = &kd[bh * nk * d..][..nk * d];
        probabilities(scores, q, Mat::transposed(k, d, nk), scale, par);
        if let Some(m) = &mask {
            for (i, row) in scores.chunks_mut(nk.max(1)).enumerate() {
                m.apply(row, ((bh * nq + i) * nk) as u64);
            }
        }
        gemm_into(dst, dv, 1, Mat::rows(scores, nq, nk), Mat::rows(&vd[bh * nk * dv..], nk, dv), false, par);
    };
    if heads > 1 {
        out.par_chunks_mut(nq * dv)
            .enumerate()
            .for_each_init(Vec::new, |scores, (bh, dst)| one_head(bh, dst, scores, Parallelism::None));
    } else {
        let par = parallelism(nq, nk, d.max(dv));
        one_head(0, &mut out, &mut Vec::new(), par);
    }
    Ok(Tensor::f32(shape, out))
}

/// `AttentionGrad (q, k, v, dy) -> [3, .., H, N, d]`: dq, dk, dv stacked, per
/// (batch, head) with P recomputed. With P the probabilities, P~ the dropped
/// ones (mask m scaled by 1/(1-p)) and dy the output gradient:
/// dv = P~^T dy; dP = m * (dy v^T); dS = P * (dP - rowsum(dP * P)) * scale;
/// dq = dS k; dk = dS^T q.
pub fn attention_grad(x: &[&Tensor], scale: f64, dropout: f64, key: u32, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [qt, kt, vt, gt] = operands(x, ["q", "k", "v", "dy"])?;
    let r = qt.rank();
    if r < 3 || kt.shape != qt.shape || vt.shape != qt.shape || gt.shape != qt.shape {
        return Err(invalid(format!(
            "q {}, k {}, v {} and dy {} must share one shape [.., H, N, d]",
            show_shape(&qt.shape),
            show_shape(&kt.shape),
            show_shape(&vt.shape),
            show_shape(&gt.shape)
        )));
    }
    let (qd, kd, vd, gd) = (f32_of(qt, "q")?, f32_of(kt, "k")?, f32_of(vt, "v")?, f32_of(gt, "dy")?);
    let (n, d) = (qt.shape[r - 2], qt.shape[r - 1]);
    let heads: usize = qt.shape[..r - 2].iter().product();
    let rows = if r > 2 { qt.shape[0] } else { 1 };
    let mask = ctx.drop_mask(dropout, key, rows, heads / rows.max(1) * n * n)?;
    let scale = scale as f32;
    let mut shape = vec![3];
    shape.extend_from_slice(&qt.shape);
    let per = heads * n * d;
    let mut out = pool::buffer(3 * per);
    if per == 0 {
        return Ok(Tensor::f32(shape, out));
    }
    let (dq, rest) = out.split_at_mut(per);
    let (dk, dv) = rest.split_at_mut(per);
    // Scratch per task: P, P~ (with dropout) and dP / dS.
    type Scratch = (Vec<f32>, Vec<f32>, Vec<f32>);
    let one_head = |bh: usize, (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]), sc: &mut Scratch, par| {
        let (p, p_dropped, ds) = sc;
        let span = bh * n * d..(bh + 1) * n * d;
        let (q, k, v, g) = (&qd[span.clone()], &kd[span.clone()], &vd[span.clone()], &gd[span]);
        probabilities(p, Mat::rows(q, n, d), Mat::transposed(k, d, n), scale, par);
        let probs_used: &[f32] = match &mask {
            Some(m) => {
                p_dropped.clear();
                p_dropped.extend_from_slice(p);
                for (i, row) in p_dropped.chunks_mut(n).enumerate() {
                    m.apply(row, ((bh * n + i) * n) as u64);
                }
                p_dropped
            }
            None => p,
        };
        gemm_into(dv, d, 1, Mat::transposed(probs_used, n, n), Mat::rows(g, n, d), false, par);
        ds.resize(n * n, 0.0);
        gemm_into(ds, n, 1, Mat::rows(g, n, d), Mat::transposed(v, d, n), false, par);
        if let Some(m) = &mask {
            for (i, row) in ds.chunks_mut(n).enumerate() {
                m.apply(row, ((bh * n + i) * n) as u64);
            }
        }
        vectorized(
            #[inline(always)]
            || {
                for (dp, p) in ds.chunks_mut(n).zip(p.chunks(n)) {
                    let rs = sum2_f64(dp, p, |a, b| a * b) as f32;
                    dp.iter_mut().zip(p).for_each(|(x, &p)| *x = p * (*x - rs) * scale);
                }
            },
        );
        gemm_into(dq, d, 1, Mat::rows(ds, n, n), Mat::rows(k, n, d), false, par);
        gemm_into(dk, d, 1, Mat::transposed(ds, n, n), Mat::rows(q, n, d), false, par);
    };
    let nd = n * d;
    if heads > 1 {
        dq.par_chunks_mut(nd)
            .zip(dk.par_chunks_mut(nd))
            .zip(dv.par_chunks_mut(nd))
            .enumerate()
            .for_each_init(Scratch::default, |sc, (bh, ((a, b), c))| one_head(bh, (a, b, c), sc, Parallelism::None));
    } else {
        one_head(0, (dq, dk, dv), &mut Scratch::default(), parallelism(n, n, d));
    }
    Ok(Tensor::f32(shape, out))
}

/// `qkv [B, N, 3*H*d]` as `AttentionPacked` reads it: (B, N, H, d), or an
/// error naming the shapes.
fn packed_dims(qkv: &Tensor, heads: u64) -> Result<(usize, usize, usize, usize), KernelError> {
    let h = heads as usize;
    match qkv.shape[..] {
        [b, n, c] if h > 0 && c % (3 * h) == 0 => Ok((b, n, h, c / (3 * h))),
        _ => {
            Err(invalid(format!("qkv {} is not [batch, tokens, 3 x {heads} heads x head dim]", show_shape(&qkv.shape))))
        }
    }
}

/// A `rows x cols` view of `data` with row stride `rs` (columns contiguous).
fn strided(data: &[f32], rows: usize, cols: usize, rs: usize) -> Mat<'_> {
    Mat { data, rows, cols, rs, cs: 1 }
}

/// The transpose of `strided(data, cols, rows, rs)`, without a copy.
fn strided_t(data: &[f32], rows: usize, cols: usize, rs: usize) -> Mat<'_> {
    Mat { data, rows, cols, rs: 1, cs: rs }
}

/// Runs `one(b, chunk)` for every batch element's `chunk` of `out`: batch
/// elements in parallel (each task's products single-threaded), or one
/// element with threaded products.
fn per_batch(out: &mut [f32], batch: usize, one: impl Fn(usize, &mut [f32], Parallelism) + Sync, par: Parallelism) {
    let chunk = out.len() / batch.max(1);
    if batch > 1 && chunk > 0 {
        out.par_chunks_mut(chunk).enumerate().for_each(|(b, dst)| one(b, dst, Parallelism::None));
    } else if chunk > 0 {
        one(0, out, par);
    }
}

/// `AttentionPacked (qkv [B, N, 3*H*d]) -> [B, N, H*d]`: `attention` on the
/// heads of the packed product, read through strided views (q, k, v of
/// head h of token i at columns h*d, (H + h)*d and (2H + h)*d of row i),
/// the result written per token as (H, d). Dropout's mask index is the
/// unpacked op's: ((b * H + h) * N + i) * N + j.
pub fn attention_packed(
    x: &[&Tensor],
    heads: u64,
    scale: f64,
    dropout: f64,
    key: u32,
    ctx: &Ctx,
) -> Result<Tensor, KernelError> {
    let [qt] = operands(x, ["qkv"])?;
    let (b, n, h, d) = packed_dims(qt, heads)?;
    let xd = f32_of(qt, "qkv")?;
    let mask = ctx.drop_mask(dropout, key, b, h * n * n)?;
    let scale = scale as f32;
    let (width, row) = (h * d, 3 * h * d);
    let mut out = pool::buffer(b * n * width);
    let one = |bi: usize, dst: &mut [f32], par: Parallelism| {
        let xb = &xd[bi * n * row..][..n * row];
        let mut scores = Vec::new();
        for hi in 0..h {
            let q = strided(&xb[hi * d..], n, d, row);
            probabilities(&mut scores, q, strided_t(&xb[width + hi * d..], d, n, row), scale, par);
            if let Some(m) = &mask {
                for (i, r) in scores.chunks_mut(n.max(1)).enumerate() {
                    m.apply(r, (((bi * h + hi) * n + i) * n) as u64);
                }
            }
            let v = strided(&xb[2 * width + hi * d..], n, d, row);
            gemm_into(&mut dst[hi * d..], width, 1, Mat::rows(&scores, n, n), v, false, par);
        }
    };
    if n * d > 0 {
        per_batch(&mut out, b, one, parallelism(n, n, d));
    }
    Ok(Tensor::f32(vec![b, n, width], out))
}

/// `AttentionPackedGrad (qkv [B, N, 3*H*d], dy [B, N, H*d]) -> [B, N, 3*H*d]`:
/// `attention_grad`'s products on strided views, dq, dk and dv written
/// where q, k and v sit in qkv.
pub fn attention_packed_grad(
    x: &[&Tensor],
    heads: u64,
    scale: f64,
    dropout: f64,
    key: u32,
    ctx: &Ctx,
) -> Result<Tensor, KernelError> {
    let [qt, gt] = operands(x, ["qkv", "dy"])?;
    let (b, n, h, d) = packed_dims(qt, heads)?;
    if gt.shape != [b, n, h * d] {
        return Err(invalid(format!(
            "dy {} is not the attention output's shape [{b},{n},{}]",
            show_shape(&gt.shape),
            h * d
        )));
    }
    let (xd, gd) = (f32_of(qt, "qkv")?, f32_of(gt, "dy")?);
    let mask = ctx.drop_mask(dropout, key, b, h * n * n)?;
    let scale = scale as f32;
    let (width, row) = (h * d, 3 * h * d);
    let mut out = pool::buffer(b * n * row);
    let one = |bi: usize, dst: &mut [f32], par: Parallelism| {
        let xb = &xd[bi * n * row..][..n * row];
        let gb = &gd[bi * n * width..][..n * width];
        let (mut p, mut p_dropped, mut ds) = (Vec::new(), Vec::new(), Vec::new());
        for hi in 0..h {
            let (qo, ko, vo) = (hi * d, width + hi * d, 2 * width + hi * d);
            let g = strided(&gb[hi * d..], n, d, width);
            probabilities(&mut p, strided(&xb[qo..], n, d, row), strided_t(&xb[ko..], d, n, row), scale, par);
            let first = (bi * h + hi) * n;
            let probs_used: &[f32] = match &mask {
                Some(m) => {
                    p_dropped.clear();
                    p_dropped.extend_from_slice(&p);
                    for (i, r) in p_dropped.chunks_mut(n).enumerate() {
                        m.apply(r, ((first + i) * n) as u64);
                    }
                    &p_dropped
                }
                None => &p,
            };
            gemm_into(&mut dst[vo..], row, 1, Mat::transposed(probs_used, n, n), g, false, par);
            ds.resize(n * n, 0.0);
            gemm_into(&mut ds, n, 1, g, strided_t(&xb[vo..], d, n, row), false, par);
            if let Some(m) = &mask {
                for (i, r) in ds.chunks_mut(n).enumerate() {
                    m.apply(r, ((first + i) * n) as u64);
                }
            }
            vectorized(
                #[inline(always)]
                || {
                    for (dp, p) in ds.chunks_mut(n).zip(p.chunks(n)) {
                        let rs = sum2_f64(dp, p, |a, b| a * b) as f32;
                        dp.iter_mut().zip(p).for_each(|(x, &p)| *x = p * (*x - rs) * scale);
                    }
                },
            );
            gemm_into(&mut dst[qo..], row, 1, Mat::rows(&ds, n, n), strided(&xb[ko..], n, d, row), false, par);
            gemm_into(&mut dst[ko..], row, 1, Mat::transposed(&ds, n, n), strided(&xb[qo..], n, d, row), false, par);
        }
    };
    if n * d > 0 {
        per_batch(&mut out, b, one, parallelism(n, n, d));
    }
    Ok(Tensor::f32(vec![b, n, row], out))
}
