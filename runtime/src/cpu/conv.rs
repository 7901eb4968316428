//! 2-D convolution and its two gradients, per sample as im2col + gemm.
//!
//! Layout: `col` is `[C*kh*kw, OH*OW]` (row `(c*kh + i)*kw + j`), so the
//! weight `[O, C, kh, kw]` is a row-major `[O, C*kh*kw]` matrix and
//! `out_n = W @ col` is already NCHW. Patch embedding (stride == kernel, no
//! padding) skips the general gather: its patches `[OH*OW, C*kh*kw]` are
//! runs of `kw` contiguous pixels, copied whole (a reshape), and the product
//! reads them transposed.

use super::kernel::{f32_of, operands};
use super::matmul::{gemm_into, parallelism, Mat};
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Sizes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(
        input: [usize; 4],
        out_channels: usize,
        kernel: [usize; 2],
        stride: [u64; 2],
        padding: [u64; 2],
    ) -> Result<Self, KernelError> {
        let [n, c, h, w] = input;
        let (sh, sw, ph, pw) = (stride[0] as usize, stride[1] as usize, padding[0] as usize, padding[1] as usize);
        let [kh, kw] = kernel;
        if sh == 0 || sw == 0 {
            return Err(invalid(format!("stride {stride:?} must be positive")));
        }
        if h + 2 * ph < kh || w + 2 * pw < kw || kh == 0 || kw == 0 {
            return Err(invalid(format!(
                "kernel {kh}x{kw} does not fit the padded input {}x{}",
                h + 2 * ph,
                w + 2 * pw
            )));
        }
        let (oh, ow) = ((h + 2 * ph - kh) / sh + 1, (w + 2 * pw - kw) / sw + 1);
        Ok(Geometry { n, c, h, w, o: out_channels, kh, kw, sh, sw, ph, pw, oh, ow })
    }

    fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn pixels_out(&self) -> usize {
        self.oh * self.ow
    }

    fn sample_in(&self) -> usize {
        self.c * self.h * self.w
    }

    fn is_patchify(&self) -> bool {
        self.sh == self.kh && self.sw == self.kw && self.ph == 0 && self.pw == 0
    }

    /// Scratch elements per sample: the col matrix or the patches.
    fn scratch(&self) -> usize {
        self.ckk() * self.pixels_out()
    }

    /// The input row `ih` of the kernel tap `i` at output row `oh`, if inside.
    #[inline]
    fn in_row(&self, oh: usize, i: usize) -> Option<usize> {
        (oh * self.sh + i).checked_sub(self.ph).filter(|&r| r < self.h)
    }

    #[inline]
    fn in_col(&self, ow: usize, j: usize) -> Option<usize> {
        (ow * self.sw + j).checked_sub(self.pw).filter(|&r| r < self.w)
    }

    /// The sample's `col` (general) or patches (patchify) into `buf`.
    fn gather(&self, x: &[f32], buf: &mut [f32]) {
        if self.is_patchify() {
            self.patchify(x, buf)
        } else {
            self.im2col(x, buf)
        }
    }

    /// Adds (general) or writes (patchify) `buf` back to image layout in `dx`,
    /// which must be zeroed.
    fn scatter(&self, buf: &[f32], dx: &mut [f32]) {
        if self.is_patchify() {
            self.unpatchify(buf, dx)
        } else {
            self.col2im(buf, dx)
        }
    }

    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let l = self.pixels_out();
        for c in 0..self.c {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &mut col[((c * self.kh + i) * self.kw + j) * l..][..l];
                    for oh in 0..self.oh {
                        let dst = &mut row[oh * self.ow..][..self.ow];
                        let Some(ih) = self.in_row(oh, i) else {
                            dst.fill(0.0);
                            continue;
                        };
                        let src = &x[(c * self.h + ih) * self.w..][..self.w];
                        for (ow, d) in dst.iter_mut().enumerate() {
                            *d = self.in_col(ow, j).map_or(0.0, |iw| src[iw]);
                        }
                    }
                }
            }
        }
    }

    fn col2im(&self, col: &[f32], dx: &mut [f32]) {
        let l = self.pixels_out();
        for c in 0..self.c {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &col[((c * self.kh + i) * self.kw + j) * l..][..l];
                    for oh in 0..self.oh {
                        let Some(ih) = self.in_row(oh, i) else { continue };
                        let dst = &mut dx[(c * self.h + ih) * self.w..][..self.w];
                        for (ow, &v) in row[oh * self.ow..][..self.ow].iter().enumerate() {
                            if let Some(iw) = self.in_col(ow, j) {
                                dst[iw] += v;
                            }
                        }
                    }
                }
            }
        }
    }

    fn patchify(&self, x: &[f32], patches: &mut [f32]) {
        let (ckk, kw) = (self.ckk(), self.kw);
        for oh in 0..self.oh {
            for ow in 0..self.ow {
                let patch = &mut patches[(oh * self.ow + ow) * ckk..][..ckk];
                for c in 0..self.c {
                    for i in 0..self.kh {
                        let src = &x[(c * self.h + oh * self.kh + i) * self.w + ow * kw..][..kw];
                        patch[(c * self.kh + i) * kw..][..kw].copy_from_slice(src);
                    }
                }
            }
        }
    }

    fn unpatchify(&self, patches: &[f32], dx: &mut [f32]) {
        let (ckk, kw) = (self.ckk(), self.kw);
        for oh in 0..self.oh {
            for ow in 0..self.ow {
                let patch = &patches[(oh * self.ow + ow) * ckk..][..ckk];
                for c in 0..self.c {
                    for i in 0..self.kh {
                        let dst = &mut dx[(c * self.h + oh * self.kh + i) * self.w + ow * kw..][..kw];
                        dst.copy_from_slice(&patch[(c * self.kh + i) * kw..][..kw]);
                    }
                }
            }
        }
    }

    /// The gathered sample as the right operand `[CKK, L]` of a product.
    fn gathered<'a>(&self, buf: &'a [f32]) -> Mat<'a> {
        let (ckk, l) = (self.ckk(), self.pixels_out());
        if self.is_patchify() {
            Mat::transposed(buf, ckk, l)
        } else {
            Mat::rows(buf, ckk, l)
        }
    }
}

fn four_d(t: &Tensor, role: &str, layout: &str) -> Result<[usize; 4], KernelError> {
    <[usize; 4]>::try_from(&t.shape[..])
        .map_err(|_| invalid(format!("{role} must be {layout}, got {}", show_shape(&t.shape))))
}

/// Runs `body(sample, dst, scratch, gemm threading)` for every sample: in
/// parallel across samples (single-threaded gemm) when there are enough of
/// them, else one sample at a time with a threaded gemm.
fn per_sample(
    out: &mut [f32],
    per_out: usize,
    g: &Geometry,
    gemm_mnk: (usize, usize, usize),
    body: impl Fn(usize, &mut [f32], &mut [f32], Parallelism) + Sync,
) {
    if per_out == 0 {
        return;
    }
    if g.n >= rayon::current_num_threads() && g.n > 1 {
        out.par_chunks_mut(per_out)
            .enumerate()
            .for_each_init(|| vec![0.0f32; g.scratch()], |buf, (n, dst)| body(n, dst, buf, Parallelism::None));
    } else {
        let mut buf = vec![0.0f32; g.scratch()];
        let par = parallelism(gemm_mnk.0, gemm_mnk.1, gemm_mnk.2);
        out.chunks_mut(per_out).enumerate().for_each(|(n, dst)| body(n, dst, &mut buf, par));
    }
}

/// `Conv2d (x [N, C, H, W], w [O, C, kh, kw], b? [O]) -> [N, O, OH, OW]`.
pub fn conv2d(x: &[&Tensor], stride: [u64; 2], padding: [u64; 2]) -> Result<Tensor, KernelError> {
    let (xt, wt, bt) = match *x {
        [a, b] => (a, b, None),
        [a, b, c] => (a, b, Some(c)),
        _ => return Err(invalid(format!("expects 2 or 3 operands (input, weight, bias?), got {}", x.len()))),
    };
    let (xd, wd) = (f32_of(xt, "input")?, f32_of(wt, "weight")?);
    let xs = four_d(xt, "input", "[N, C, H, W]")?;
    let [o, wc, kh, kw] = four_d(wt, "weight", "[O, C, kh, kw]")?;
    if wc != xs[1] {
        return Err(invalid(format!(
            "input {} and weight {} disagree on channels",
            show_shape(&xt.shape),
            show_shape(&wt.shape)
        )));
    }
    let g = Geometry::new(xs, o, [kh, kw], stride, padding)?;
    let bias = match bt {
        Some(bt) if bt.shape == [o] => Some(f32_of(bt, "bias")?),
        Some(bt) => return Err(invalid(format!("bias must be [{o}], got {}", show_shape(&bt.shape)))),
        None => None,
    };
    let (l, ckk) = (g.pixels_out(), g.ckk());
    let mut out = super::pool::zeros(g.n * o * l);
    per_sample(&mut out, o * l, &g, (o, l, ckk), |n, dst, buf, par| {
        g.gather(&xd[n * g.sample_in()..][..g.sample_in()], buf);
        if let Some(b) = bias {
            for (row, &bv) in dst.chunks_mut(l).zip(b) {
                row.fill(bv);
            }
        }
        gemm_into(dst, l, 1, Mat::rows(wd, o, ckk), g.gathered(buf), bias.is_some(), par);
    });
    Ok(Tensor::f32(vec![g.n, o, g.oh, g.ow], out))
}

/// Checks that `dy` is the forward output of geometry `g`.
fn check_dy(dy: &Tensor, g: &Geometry) -> Result<(), KernelError> {
    let want = [g.n, g.o, g.oh, g.ow];
    if dy.shape != want {
        return Err(invalid(format!(
            "dy {} does not match the forward conv output {}",
            show_shape(&dy.shape),
            show_shape(&want)
        )));
    }
    Ok(())
}

/// `Conv2dGradInput (dy [N, O, OH, OW], w [O, C, kh, kw]) -> dx [N, C, H, W]`:
/// per sample `dcol = W^T dy_n`, scattered back (col2im).
pub fn conv2d_grad_input(
    x: &[&Tensor],
    stride: [u64; 2],
    padding: [u64; 2],
    input_hw: [u64; 2],
) -> Result<Tensor, KernelError> {
    let [dyt, wt] = operands(x, ["dy", "weight"])?;
    let (dyd, wd) = (f32_of(dyt, "dy")?, f32_of(wt, "weight")?);
    let [n, ..] = four_d(dyt, "dy", "[N, O, OH, OW]")?;
    let [o, c, kh, kw] = four_d(wt, "weight", "[O, C, kh, kw]")?;
    let (h, w) = (input_hw[0] as usize, input_hw[1] as usize);
    let g = Geometry::new([n, c, h, w], o, [kh, kw], stride, padding)?;
    check_dy(dyt, &g)?;
    let (l, ckk) = (g.pixels_out(), g.ckk());
    let mut dx = super::pool::zeros(n * g.sample_in());
    per_sample(&mut dx, g.sample_in(), &g, (ckk, l, o), |n, dst, buf, par| {
        let dy_n = &dyd[n * o * l..][..o * l];
        if g.is_patchify() {
            // dpatches [L, CKK] = dy_n^T [L, O] @ W [O, CKK]
            gemm_into(buf, ckk, 1, Mat::transposed(dy_n, l, o), Mat::rows(wd, o, ckk), false, par);
        } else {
            // dcol [CKK, L] = W^T [CKK, O] @ dy_n [O, L]
            gemm_into(buf, l, 1, Mat::transposed(wd, ckk, o), Mat::rows(dy_n, o, l), false, par);
        }
        g.scatter(buf, dst);
    });
    Ok(Tensor::f32(vec![n, c, h, w], dx))
}

/// `Conv2dGradWeight (dy [N, O, OH, OW], x [N, C, H, W]) -> dw [O, C, kh, kw]`:
/// `sum_n dy_n col_n^T`, with the samples split into one partial sum per thread.
pub fn conv2d_grad_weight(
    x: &[&Tensor],
    stride: [u64; 2],
    padding: [u64; 2],
    kernel: [u64; 2],
) -> Result<Tensor, KernelError> {
    let [dyt, xt] = operands(x, ["dy", "x"])?;
    let (dyd, xd) = (f32_of(dyt, "dy")?, f32_of(xt, "x")?);
    let xs = four_d(xt, "x", "[N, C, H, W]")?;
    let [_, o, ..] = four_d(dyt, "dy", "[N, O, OH, OW]")?;
    let g = Geometry::new(xs, o, [kernel[0] as usize, kernel[1] as usize], stride, padding)?;
    check_dy(dyt, &g)?;
    let (l, ckk) = (g.pixels_out(), g.ckk());
    // Accumulates samples `ns` into `acc` (overwritten by the first).
    let accumulate = |ns: &[usize], acc: &mut [f32], buf: &mut [f32], par: Parallelism| {
        for (idx, &n) in ns.iter().enumerate() {
            g.gather(&xd[n * g.sample_in()..][..g.sample_in()], buf);
            let dy_n = &dyd[n * o * l..][..o * l];
            let cols = if g.is_patchify() { Mat::rows(buf, l, ckk) } else { Mat::transposed(buf, l, ckk) };
            gemm_into(acc, ckk, 1, Mat::rows(dy_n, o, l), cols, idx > 0, par);
        }
    };
    let samples: Vec<usize> = (0..g.n).collect();
    let threads = rayon::current_num_threads();
    let mut dw = super::pool::zeros(o * ckk);
    if g.n > 1 && threads > 1 {
        let per_task = g.n.div_ceil(threads);
        let partials: Vec<Vec<f32>> = samples
            .par_chunks(per_task)
            .map(|ns| {
                let (mut acc, mut buf) = (vec![0.0f32; o * ckk], vec![0.0f32; g.scratch()]);
                accumulate(ns, &mut acc, &mut buf, Parallelism::None);
                acc
            })
            .collect();
        for p in &partials {
            dw.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
    } else if g.n > 0 {
        let mut buf = vec![0.0f32; g.scratch()];
        accumulate(&samples, &mut dw, &mut buf, parallelism(o, ckk, l));
    }
    Ok(Tensor::f32(vec![o, g.c, g.kh, g.kw], dw))
}
