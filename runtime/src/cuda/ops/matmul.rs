//! Matrix products on cuBLASLt (f32 or bf16 operands, f32 accumulation),
//! their prologue and epilogue forms, and convolutions as GEMMs.
//!
//! - linear: one GEMM over the rows of x, the bias as cuBLASLt's BIAS
//!   epilogue (exact: an add after the product, as the CPU does);
//! - matmul: batch dims broadcast; dims that merge into one strided batch
//!   are one batched GEMM, the rest loop (`batched`);
//! - gelu_linear, matmul_gelu_rhs: GELU written once to the `gelu` scratch
//!   in the GEMM's input dtype, then the GEMM (cuBLASLt's GELU epilogue is
//!   the tanh approximation, not the models' erf GELU, so it is not used);
//! - layer_norm_linear, matmul_layer_norm_rhs: the row-normalised operand
//!   (f32 statistics) in the `normalized` scratch, then the GEMM;
//! - matmul_gelu_grad: the GEMM, then its result times GELU'(z) in place
//!   (with its row sum, the hidden bias gradient, and GELU(z), the next
//!   weight gradient's operand, when the plan reads them:
//!   `kernels/gelu_grad_rows.cu`);
//! - linear_residual: the GEMM reading the residual stream as C (beta = 1)
//!   and writing the new stream, the bias as its epilogue (GELU of the
//!   input first into the `gelu` scratch when asked); bf16 operands, the
//!   f32 stream, C, D and bias (cuBLASLt's f32-output bf16 GEMM);
//! - conv2d: im2col into `cols`, one batched GEMM per image's columns,
//!   the bias added after; its gradients as GEMMs around im2col / col2im.

use super::super::device::{Arg, GemmPtrs, Launch};
use super::super::gemm::{ElemType, Epilogue, GemmDesc};
use super::super::lower::{c_type, Lowering, Val};
use super::super::source::{param, KernelSource};
use super::elementwise::{apply, broadcast_strides, grid_for, Ins};
use super::layout::{contiguous, strided_copy};
use tessera_plan::{DType, Instr, Op, UnaryOp};

const CONV: &str = include_str!("../kernels/conv.cu");
const GELU_GRAD_ROWS: &str = include_str!("../kernels/gelu_grad_rows.cu");
/// Rows up to this wide keep gelu_grad_rows' f64 accumulators in shared
/// memory (32 KiB); wider ones in the block's own row of the partials.
const GELU_GRAD_SHARED_COLS: u64 = 4096;

/// Kernel `k`'s result `index` (a `ResultPart` of it), if the plan reads one.
pub(super) fn result_part(l: &Lowering, k: usize, index: u64) -> Result<Option<Val>, String> {
    let part = l.parts(k).iter().find(|(offset, _)| *offset == index);
    part.map(|&(_, v)| l.value(v)).transpose()
}

/// Kernel `k`'s result 1, its result's row sum, if the plan reads it.
pub(super) fn row_sum_part(l: &Lowering, k: usize) -> Result<Option<Val>, String> {
    result_part(l, k, 1)
}

/// matmul_gelu_grad's epilogue with further results: y *= GELU'(z) in
/// place and, with `sum`, the blocks' f64 column sums of y as stored into
/// the `partials` scratch, then their sum per column into `sum`; with
/// `gelu`, GELU(z) written there as z is read (the next product's operand).
fn gelu_grad_rows(
    l: &mut Lowering,
    k: usize,
    y: &Val,
    z: &Val,
    sum: Option<&Val>,
    gelu: Option<&Val>,
) -> Result<(), String> {
    let d = *y.shape.last().ok_or("matmul_gelu_grad's result has at least two axes")?;
    if z.shape != y.shape || sum.is_some_and(|s| s.shape != [d]) || gelu.is_some_and(|g| g.shape != y.shape) {
        return Err(format!("z and GELU(z) must be the result's shape {:?} and its sum [{d}]", y.shape));
    }
    let rows = y.numel() / d.max(1);
    if d == 0 {
        return Ok(());
    }
    let slices = tessera_plan::scratch::norm_weight_grad_blocks(rows);
    let mut params = vec![
        param(&format!("{}*", c_type(y.dtype)?), "y"),
        param(&format!("const {}*", c_type(z.dtype)?), "z"),
        param("i64", "rows"),
        param("i64", "d"),
    ];
    let mut args = vec![Arg::Ptr(y.ptr), Arg::Ptr(z.ptr), Arg::I64(rows as i64), Arg::I64(d as i64)];
    let partials = match sum {
        Some(_) => {
            let (partials, bytes) = l.scratch(k, "partials")?;
            if bytes < slices * d * 8 {
                return Err(format!("the partials scratch holds {bytes} bytes, {} are needed", slices * d * 8));
            }
            params.push(param("double*", "partials"));
            args.push(Arg::Ptr(partials));
            Some(partials)
        }
        None => None,
    };
    if let Some(g) = gelu {
        params.push(param(&format!("{}*", c_type(g.dtype)?), "g"));
        args.push(Arg::Ptr(g.ptr));
    }
    let mut c = tera::Context::new();
    c.insert("partials", &true);
    c.insert("sum", &sum.is_some());
    c.insert("gelu", &gelu.is_some());
    c.insert("shared", &(d <= GELU_GRAD_SHARED_COLS));
    c.insert("cols_alloc", &d);
    let src = KernelSource::render("gelu_grad_rows", GELU_GRAD_ROWS, c, params)?;
    l.launch(k, src, Launch::linear(slices as u32, 256), args);
    match (sum, partials) {
        (Some(sum), Some(partials)) => sum_partials(l, k, sum, partials, slices),
        _ => Ok(()),
    }
}

/// `sum[c]` = the sum over `slices` rows of f64 partials (row-major, one
/// per element of `sum`) of column c, in row order: the second launch of
/// a row sum made by blocks of rows.
pub(super) fn sum_partials(
    l: &mut Lowering,
    k: usize,
    sum: &Val,
    partials: super::super::device::DevPtr,
    slices: u64,
) -> Result<(), String> {
    let d = sum.numel();
    let params = vec![
        param(&format!("{}*", c_type(sum.dtype)?), "sum"),
        param("const double*", "partials"),
        param("i64", "slices"),
        param("i64", "d"),
    ];
    let args = vec![Arg::Ptr(sum.ptr), Arg::Ptr(partials), Arg::I64(slices as i64), Arg::I64(d as i64)];
    let mut c = tera::Context::new();
    c.insert("partials", &false);
    c.insert("sum", &true);
    c.insert("gelu", &false);
    let src = KernelSource::render("row_sum_partials", GELU_GRAD_ROWS, c, params)?;
    l.launch(k, src, Launch::linear(d.div_ceil(256).max(1) as u32, 256), args);
    Ok(())
}

fn elem(d: DType) -> Result<ElemType, String> {
    match d {
        DType::F32 => Ok(ElemType::F32),
        DType::BF16 => Ok(ElemType::BF16),
        other => Err(format!("matrix products take f32 or bf16, not {other}")),
    }
}

/// `out = a @ b` (either read transposed), batch dims broadcast, plus
/// `bias` per output column.
#[allow(clippy::too_many_arguments)]
pub fn product(
    l: &mut Lowering,
    k: usize,
    a: &Val,
    b: &Val,
    ta: bool,
    tb: bool,
    out: &Val,
    bias: Option<&Val>,
) -> Result<(), String> {
    product_with(l, k, a, b, ta, tb, out, bias, 0.0, None)
}

#[allow(clippy::too_many_arguments)]
/// `product`, `beta` times C added (1: the GEMM reads C, adds the product
/// in f32 and rounds once). C is `c` (out's shape and dtype), else the
/// result's current values.
fn product_with(
    l: &mut Lowering,
    k: usize,
    a: &Val,
    b: &Val,
    ta: bool,
    tb: bool,
    out: &Val,
    bias: Option<&Val>,
    beta: f32,
    c: Option<&Val>,
) -> Result<(), String> {
    if let Some(c) = c {
        if c.shape != out.shape || c.dtype != out.dtype {
            return Err(format!("C {:?} {} must be the result's {:?} {}", c.shape, c.dtype, out.shape, out.dtype));
        }
    }
    let (ra, rb) = (a.shape.len(), b.shape.len());
    if ra < 2 || rb < 2 {
        return Err(format!("a {:?} and b {:?} must have rank >= 2", a.shape, b.shape));
    }
    let (ar, ac) = (a.shape[ra - 2], a.shape[ra - 1]);
    let (br, bc) = (b.shape[rb - 2], b.shape[rb - 1]);
    let (m, kk) = if ta { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if tb { (bc, br) } else { (br, bc) };
    let ro = out.shape.len();
    if k2 != kk || ro < 2 || out.shape[ro - 2] != m || out.shape[ro - 1] != n {
        return Err(format!("cannot multiply a {:?} by b {:?} into {:?}", a.shape, b.shape, out.shape));
    }
    let batch_shape = &out.shape[..ro - 2];
    // Batch strides in elements, per operand.
    let sa: Vec<i64> =
        broadcast_strides(&a.shape[..ra - 2], batch_shape)?.iter().map(|s| s * (m * kk) as i64).collect();
    let sb: Vec<i64> =
        broadcast_strides(&b.shape[..rb - 2], batch_shape)?.iter().map(|s| s * (kk * n) as i64).collect();
    let so: Vec<i64> = contiguous(batch_shape).iter().map(|s| s * (m * n) as i64).collect();
    // Batch dims, the unit ones dropped, adjacent ones merged where every
    // operand's strides allow (the inner one then covers both).
    let mut dims: Vec<(u64, [i64; 3])> = (0..batch_shape.len())
        .filter(|&d| batch_shape[d] != 1)
        .map(|d| (batch_shape[d], [sa[d], sb[d], so[d]]))
        .collect();
    let mut i = dims.len();
    while i >= 2 {
        let (outer, inner) = (dims[i - 2], dims[i - 1]);
        if (0..3).all(|o| outer.1[o] == inner.1[o] * inner.0 as i64) {
            dims[i - 2] = (outer.0 * inner.0, inner.1);
            dims.remove(i - 1);
        }
        i -= 1;
    }
    let (count, strides) = dims.pop().unwrap_or((1, [0, 0, 0]));
    let (ea, eb, eo) = (elem(a.dtype)?, elem(b.dtype)?, elem(out.dtype)?);
    let workspace = l.scratch(k, "gemm").ok();
    // b shared by every batch entry and a's batch contiguous: one GEMM over
    // batch * M rows (what a linear layer is).
    let fold =
        !ta && strides[1] == 0 && strides[0] == (m * kk) as i64 && strides[2] == (m * n) as i64 && dims.is_empty();
    let (m_eff, count, strides) = if fold { (m * count, 1, [0, 0, 0]) } else { (m, count, strides) };
    let mut desc = GemmDesc::row_major(
        m_eff,
        n,
        kk,
        (ea, ta, strides[0] as u64),
        (eb, tb, strides[1] as u64),
        (eo, strides[2] as u64),
        count,
    );
    if let Some(bias) = bias {
        if bias.dtype != out.dtype || bias.numel() != n {
            return Err(format!(
                "bias {:?} {} does not fit a product of {n} columns of {}",
                bias.shape, bias.dtype, out.dtype
            ));
        }
        desc.epilogue = Epilogue::Bias;
    }
    let (ws_ptr, ws_bytes) = workspace.unwrap_or((super::super::device::DevPtr::NULL, 0));
    desc.workspace = ws_bytes;
    desc.beta = beta;
    // The remaining outer dims loop, one GEMM each.
    let outer: u64 = dims.iter().map(|d| d.0).product();
    for o in 0..outer {
        let (mut rest, mut off) = (o, [0i64; 3]);
        for d in dims.iter().rev() {
            let c = (rest % d.0) as i64;
            rest /= d.0;
            for (x, s) in off.iter_mut().zip(d.1) {
                *x += c * s;
            }
        }
        // Column-major: cuBLASLt's A is the row-major right operand, B the left.
        let ptrs = GemmPtrs {
            a: b.ptr.add(off[1] as u64 * b.dtype.size_bytes()),
            b: a.ptr.add(off[0] as u64 * a.dtype.size_bytes()),
            c: c.unwrap_or(out).ptr.add(off[2] as u64 * out.dtype.size_bytes()),
            d: out.ptr.add(off[2] as u64 * out.dtype.size_bytes()),
            bias: bias.map(|b| b.ptr).unwrap_or_default(),
            workspace: ws_ptr,
            workspace_bytes: ws_bytes,
        };
        l.gemm(k, desc, ptrs);
    }
    Ok(())
}

/// `v` seen as a matrix: [product of its leading dims, last dim].
fn as_rows(v: &Val) -> Val {
    let last = v.shape.last().copied().unwrap_or(1);
    Val { ptr: v.ptr, shape: vec![v.numel() / last.max(1), last], dtype: v.dtype }
}

/// A scratch piece of kernel `k` holding a tensor of `shape` and `dtype`.
fn scratch_val(l: &Lowering, k: usize, piece: &str, shape: Vec<u64>, dtype: DType) -> Result<Val, String> {
    let (ptr, bytes) = l.scratch(k, piece)?;
    let v = Val { ptr, shape, dtype };
    if v.bytes() > bytes {
        return Err(format!("the `{piece}` scratch holds {bytes} bytes, {} are needed", v.bytes()));
    }
    Ok(v)
}

/// GELU of `z` into the `gelu` scratch, in `dtype`.
fn gelu_into_scratch(l: &mut Lowering, k: usize, z: &Val, dtype: DType) -> Result<Val, String> {
    let g = scratch_val(l, k, "gelu", z.shape.clone(), dtype)?;
    apply(
        l,
        k,
        &g,
        std::slice::from_ref(z),
        &[Ins::Plan(Instr::Operand(0)), Ins::Plan(Instr::Unary(UnaryOp::Gelu, 0))],
    )?;
    Ok(g)
}

/// layer_norm(x, g, b) into the `normalized` scratch, in `dtype`.
fn layer_norm_into_scratch(l: &mut Lowering, k: usize, x: &[Val], eps: f64, dtype: DType) -> Result<Val, String> {
    let y = scratch_val(l, k, "normalized", x[0].shape.clone(), dtype)?;
    super::norm::layer_norm_rows(l, k, &y, &x[0], Some((&x[1], &x[2])), eps)?;
    Ok(y)
}

pub fn lower(l: &mut Lowering, k: usize, op: &Op) -> Result<(), String> {
    let x = l.inputs(k)?;
    let out = l.output(k)?;
    match *op {
        Op::Linear => {
            let w = x.get(1).ok_or("linear needs (x, w, b?)")?;
            product(l, k, &as_rows(&x[0]), w, false, true, &as_rows(&out), x.get(2))
        }
        Op::Matmul { transpose_a, transpose_b } => match &x[..] {
            // The addend as C: read by the GEMM, summed before rounding.
            [a, b, c] => product_with(l, k, a, b, transpose_a, transpose_b, &out, None, 1.0, Some(c)),
            _ => product(l, k, &x[0], &x[1], transpose_a, transpose_b, &out, None),
        },
        Op::GeluLinear => {
            let w = x.get(1).ok_or("gelu_linear needs (z, w, b?)")?;
            let g = gelu_into_scratch(l, k, &x[0], w.dtype)?;
            product(l, k, &as_rows(&g), w, false, true, &as_rows(&out), x.get(2))
        }
        Op::LinearResidual { gelu } => {
            let [xi, w, b, r] = &x[..] else { return Err("linear_residual needs (x, w, b, r)".into()) };
            let g = if gelu { gelu_into_scratch(l, k, xi, w.dtype)? } else { xi.clone() };
            product_with(l, k, &as_rows(&g), w, false, true, &as_rows(&out), Some(b), 1.0, Some(&as_rows(r)))
        }
        Op::MatmulGeluRhs { transpose_a, transpose_b } => {
            let g = gelu_into_scratch(l, k, &x[1], x[0].dtype)?;
            product(l, k, &x[0], &as_rows(&g), transpose_a, transpose_b, &out, None)
        }
        Op::LayerNormLinear { eps } => {
            if x.len() < 4 {
                return Err("layer_norm_linear needs (x, ln weight, ln bias, w, b?)".into());
            }
            let y = layer_norm_into_scratch(l, k, &x[..3], eps, x[3].dtype)?;
            product(l, k, &as_rows(&y), &x[3], false, true, &as_rows(&out), x.get(4))
        }
        Op::MatmulLayerNormRhs { eps, transpose_a, transpose_b } => {
            let y = layer_norm_into_scratch(l, k, &x[1..4], eps, x[0].dtype)?;
            product(l, k, &x[0], &as_rows(&y), transpose_a, transpose_b, &out, None)
        }
        Op::MatmulGeluGrad { transpose_a, transpose_b, .. } => {
            product(l, k, &x[0], &x[1], transpose_a, transpose_b, &out, None)?;
            let (sum, gelu) = (row_sum_part(l, k)?, result_part(l, k, 5)?);
            if sum.is_some() || gelu.is_some() {
                return gelu_grad_rows(l, k, &out, &x[2], sum.as_ref(), gelu.as_ref());
            }
            // out *= GELU'(z), in place (each element read before it is written).
            let body = [Ins::Plan(Instr::Operand(0)), Ins::Plan(Instr::Operand(1)), Ins::Plan(Instr::GeluGrad(1, 0))];
            apply(l, k, &out, &[out.clone(), x[2].clone()], &body)
        }
        Op::Conv2d { stride, padding } => conv2d(l, k, &x, &out, stride, padding),
        Op::Conv2dGradWeight { stride, padding, kernel } => conv2d_grad_weight(l, k, &x, &out, stride, padding, kernel),
        Op::Conv2dGradInput { stride, padding, .. } => conv2d_grad_input(l, k, &x, &out, stride, padding),
        ref other => Err(format!("{} is not a matrix product", other.name())),
    }
}

/// The sizes of one convolution, as `kernels/conv.cu`'s `tsr_conv`.
struct Geometry([i64; 12]);

impl Geometry {
    fn new(input: &[u64], w: &[u64], out_hw: [u64; 2], stride: [u64; 2], padding: [u64; 2]) -> Result<Self, String> {
        let (&[n, c, h, wd], &[_, c2, kh, kw]) = (input, w) else {
            return Err(format!("conv2d takes x [N, C, H, W] and w [O, C, kh, kw], got {input:?} and {w:?}"));
        };
        if c != c2 || stride.contains(&0) {
            return Err(format!("input {input:?} does not fit weight {w:?} with stride {stride:?}"));
        }
        let g = [n, c, h, wd, kh, kw, stride[0], stride[1], padding[0], padding[1], out_hw[0], out_hw[1]];
        Ok(Geometry(g.map(|v| v as i64)))
    }
    fn n(&self) -> u64 {
        self.0[0] as u64
    }
    fn hw_out(&self) -> u64 {
        (self.0[10] * self.0[11]) as u64
    }
    fn ckk(&self) -> u64 {
        (self.0[1] * self.0[4] * self.0[5]) as u64
    }
    fn arg(&self) -> Arg {
        Arg::Bytes(self.0.iter().flat_map(|v| v.to_ne_bytes()).collect())
    }
}

/// im2col (`cols` from `x`) or col2im (`x`-shaped from `cols`).
fn conv_kernel(l: &mut Lowering, k: usize, kind: &str, out: &Val, input: &Val, g: &Geometry) -> Result<(), String> {
    let mut c = tera::Context::new();
    c.insert("kind", kind);
    let params = vec![
        param(&format!("{}*", c_type(out.dtype)?), "out"),
        param(&format!("const {}*", c_type(input.dtype)?), "in"),
        param("tsr_conv", "g"),
    ];
    let src = KernelSource::render(kind, CONV, c, params)?;
    l.launch(k, src, grid_for(out.numel()), vec![Arg::Ptr(out.ptr), Arg::Ptr(input.ptr), g.arg()]);
    Ok(())
}

fn conv2d(l: &mut Lowering, k: usize, x: &[Val], out: &Val, stride: [u64; 2], padding: [u64; 2]) -> Result<(), String> {
    let (input, w) = (&x[0], &x[1]);
    let g = Geometry::new(&input.shape, &w.shape, [out.shape[2], out.shape[3]], stride, padding)?;
    let (n, hw, ckk, o) = (g.n(), g.hw_out(), g.ckk(), w.shape[0]);
    let cols = scratch_val(l, k, "cols", vec![n, hw, ckk], w.dtype)?;
    conv_kernel(l, k, "im2col", &cols, input, &g)?;
    // out_n [O, HW] = W [O, CKK] @ cols_n^T, per image.
    let w2 = Val { ptr: w.ptr, shape: vec![o, ckk], dtype: w.dtype };
    let out3 = Val { ptr: out.ptr, shape: vec![n, o, hw], dtype: out.dtype };
    match x.get(2) {
        Some(b) => {
            // The bias per channel is a row of each image's [O, HW] result,
            // not what cuBLASLt's BIAS epilogue adds (a column): the result
            // is first filled with it, then the GEMM adds the product
            // (beta = 1) and rounds once, as the CPU does.
            let b3 = Val { ptr: b.ptr, shape: vec![o, 1], dtype: b.dtype };
            apply(l, k, &out3, &[b3], &[Ins::Plan(Instr::Operand(0))])?;
            product_with(l, k, &w2, &cols, false, true, &out3, None, 1.0, None)
        }
        None => product(l, k, &w2, &cols, false, true, &out3, None),
    }
}

#[allow(clippy::too_many_arguments)]
fn conv2d_grad_weight(
    l: &mut Lowering,
    k: usize,
    x: &[Val],
    out: &Val,
    stride: [u64; 2],
    padding: [u64; 2],
    kernel: [u64; 2],
) -> Result<(), String> {
    let (dy, input) = (&x[0], &x[1]);
    let (o, c) = (out.shape[0], input.shape[1]);
    let w_shape = [o, c, kernel[0], kernel[1]];
    let g = Geometry::new(&input.shape, &w_shape, [dy.shape[2], dy.shape[3]], stride, padding)?;
    let (n, hw, ckk) = (g.n(), g.hw_out(), g.ckk());
    let cols = scratch_val(l, k, "cols", vec![n * hw, ckk], input.dtype)?;
    conv_kernel(l, k, "im2col", &cols, input, &g)?;
    // dy [N, O, HW] laid out as [O, N*HW], then dW [O, CKK] = dy' @ cols.
    let dyt = scratch_val(l, k, "dy", vec![o, n * hw], dy.dtype)?;
    let dims = [o, n, hw];
    let si = [hw as i64, (o * hw) as i64, 1];
    strided_copy(l, k, &dyt, dy, &dims, &contiguous(&dims), &si, 0, 0)?;
    let out2 = Val { ptr: out.ptr, shape: vec![o, ckk], dtype: out.dtype };
    product(l, k, &dyt, &cols, false, false, &out2, None)
}

fn conv2d_grad_input(
    l: &mut Lowering,
    k: usize,
    x: &[Val],
    out: &Val,
    stride: [u64; 2],
    padding: [u64; 2],
) -> Result<(), String> {
    let (dy, w) = (&x[0], &x[1]);
    let g = Geometry::new(&out.shape, &w.shape, [dy.shape[2], dy.shape[3]], stride, padding)?;
    let (n, hw, ckk, o) = (g.n(), g.hw_out(), g.ckk(), w.shape[0]);
    // cols_n [HW, CKK] = dy_n^T [HW, O] @ W [O, CKK], in f32, then col2im.
    let cols = scratch_val(l, k, "cols", vec![n, hw, ckk], DType::F32)?;
    let dy3 = Val { ptr: dy.ptr, shape: vec![n, o, hw], dtype: dy.dtype };
    let w2 = Val { ptr: w.ptr, shape: vec![o, ckk], dtype: w.dtype };
    product(l, k, &dy3, &w2, true, false, &cols, None)?;
    conv_kernel(l, k, "col2im", out, &cols, &g)
}
