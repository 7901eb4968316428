//! Scaled dot-product attention, one (batch, head) pair per rayon task:
//! `softmax((q k^T) * scale)` over keys (row max subtracted), dropout on the
//! probabilities, then `@ v`. Dropout element `i` is the flat index into the
//! probabilities `[.., H, Nq, Nk]`, the same index a `Dropout` op with this
//! key uses on a tensor of that shape (which is how autodiff replays it).

use super::error::{invalid, KernelError};
use super::kernel::{f32_of, operands, Ctx};
use super::matmul::{gemm_into, parallelism, Mat};
use super::softmax::softmax_row;
use super::tensor::{show_shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

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
    let mask = ctx.drop_mask(dropout, key)?;
    let scale = scale as f32;
    let mut shape = qt.shape.clone();
    shape[r - 1] = dv;
    let mut out = vec![0.0f32; heads * nq * dv];
    if nq * dv == 0 {
        return Ok(Tensor::f32(shape, out));
    }
    let one_head = |bh: usize, dst: &mut [f32], scores: &mut Vec<f32>, par: Parallelism| {
        scores.resize(nq * nk, 0.0);
        let q = Mat::rows(&qd[bh * nq * d..], nq, d);
        let k_t = Mat::transposed(&kd[bh * nk * d..], d, nk);
        gemm_into(scores, nk, 1, q, k_t, false, par);
        for (i, row) in scores.chunks_mut(nk.max(1)).enumerate() {
            row.iter_mut().for_each(|s| *s *= scale);
            softmax_row(row);
            if let Some(m) = &mask {
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
