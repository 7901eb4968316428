//! Softmax and the losses on the GPU: softmax, log_softmax and
//! l2_normalize along any axis (`kernels/softmax.cu`), cross_entropy and
//! its gradient (`kernels/loss.cu`), zero_diagonal
//! (`kernels/loss_zero_diagonal.cu`), with the CPU backend's numerics
//! (`cpu/softmax.rs`, `cpu/loss.rs`): f32 maxima and exponentials, f64 sums.
//!
//! An axis is viewed as [outer, n, inner] and each lane (outer, inner) is
//! normalised by a block (the last axis, or too few lanes to fill the
//! device) or by a thread (an inner axis with many lanes, read coalesced).
//! cross_entropy's mean is two passes through the `partials` scratch (a
//! block's rows, then the ordered fold of the blocks), so it is bitwise
//! deterministic. A class index outside 0..K, which the CPU refuses with an
//! error, cannot stop a kernel: it makes the loss (and its row of the
//! gradient) NaN instead.

use super::super::device::{Arg, Launch};
use super::super::lower::{c_type, Lowering, Val};
use super::super::source::{param, KernelSource, Param};
use super::elementwise::grid_for;
use super::reduce::{fold_partials, threads_for, Acc};
use tessera_plan::{DType, Op};

const SOFTMAX: &str = include_str!("../kernels/softmax.cu");
const LOSS: &str = include_str!("../kernels/loss.cu");
const ZERO_DIAGONAL: &str = include_str!("../kernels/loss_zero_diagonal.cu");

/// Blocks of a grid-stride launch at most.
const MAX_BLOCKS: u64 = 4096;
/// Below this many lanes an inner axis is still done a block per lane.
const BLOCK_LANES_BELOW: u64 = 2048;

fn float(role: &str, d: DType) -> Result<(), String> {
    match d {
        DType::F32 | DType::BF16 => Ok(()),
        other => Err(format!("{role} must be a float tensor, got {other}")),
    }
}

/// softmax, log_softmax (`eps` unused) or l2_normalize (`op`) along `axis`.
fn along_axis(l: &mut Lowering, k: usize, op: &str, axis: usize, eps: f64) -> Result<(), String> {
    let x = l.input(k, 0)?;
    let out = l.output(k)?;
    if axis >= x.shape.len() {
        return Err(format!("axis {axis} is out of range for input {:?}", x.shape));
    }
    if out.shape != x.shape {
        return Err(format!("result {:?} is not the input's shape {:?}", out.shape, x.shape));
    }
    float("input", x.dtype)?;
    float("the result", out.dtype)?;
    let outer: u64 = x.shape[..axis].iter().product();
    let n = x.shape[axis];
    let inner: u64 = x.shape[axis + 1..].iter().product();
    let lanes = outer * inner;
    if lanes == 0 || n == 0 {
        return Ok(());
    }
    let rows = inner == 1 || lanes < BLOCK_LANES_BELOW;
    let params = vec![
        param(&format!("{}*", c_type(out.dtype)?), "out"),
        param(&format!("const {}*", c_type(x.dtype)?), "x"),
        param("i64", "lanes"),
        param("i64", "n"),
        param("i64", "inner"),
        param("double", "eps"),
    ];
    let args = vec![
        Arg::Ptr(out.ptr),
        Arg::Ptr(x.ptr),
        Arg::I64(lanes as i64),
        Arg::I64(n as i64),
        Arg::I64(inner as i64),
        Arg::F64(eps),
    ];
    let mut c = tera::Context::new();
    c.insert("op", op);
    c.insert("rows", &rows);
    let src = KernelSource::render(op, SOFTMAX, c, params)?;
    let shape = if rows { Launch::linear(lanes.min(MAX_BLOCKS) as u32, threads_for(n)) } else { grid_for(lanes) };
    l.launch(k, src, shape, args);
    Ok(())
}

/// Checks (logits [N, K], target) and returns (N, K, hard targets).
fn problem(logits: &Val, target: &Val) -> Result<(u64, u64, bool), String> {
    float("logits", logits.dtype)?;
    let [n, classes] = logits.shape[..] else {
        return Err(format!("logits must be [N, classes], got {:?}", logits.shape));
    };
    if classes == 0 {
        return Err("logits have no classes".into());
    }
    match target.dtype {
        DType::I64 if target.shape == [n] => Ok((n, classes, true)),
        d if d == logits.dtype && target.shape == logits.shape => Ok((n, classes, false)),
        _ => Err(format!(
            "target must be class indices [{n}] i64 or probabilities [{n}, {classes}] like the logits, got {:?} {}",
            target.shape, target.dtype
        )),
    }
}

/// The loss kernel's template context and parameters besides its tensors.
fn loss_source(grad: bool, hard: bool, t: &str, params: Vec<Param>) -> Result<KernelSource, String> {
    let mut c = tera::Context::new();
    c.insert("grad", &grad);
    c.insert("hard", &hard);
    c.insert("t", t);
    KernelSource::render(if grad { "cross_entropy_grad" } else { "cross_entropy" }, LOSS, c, params)
}

/// `CrossEntropy (logits [N, K], target) -> []`: the losses of each block's
/// rows into `partials`, then their ordered fold divided by N.
fn cross_entropy(l: &mut Lowering, k: usize, smoothing: f64) -> Result<(), String> {
    let [x, target] = &l.inputs(k)?[..] else { return Err("cross_entropy takes (logits, target)".into()) };
    let out = l.output(k)?;
    let (n, classes, hard) = problem(x, target)?;
    if !out.shape.is_empty() {
        return Err(format!("the result must be a scalar [], got {:?}", out.shape));
    }
    float("the result", out.dtype)?;
    let (at, bytes) = l.scratch(k, "partials")?;
    if bytes < 8 {
        return Err("the plan's `partials` scratch holds no partial sum".into());
    }
    let blocks = n.clamp(1, bytes / 8);
    let (xt, tt) = (c_type(x.dtype)?, c_type(target.dtype)?);
    let params = vec![
        param("double*", "partials"),
        param(&format!("const {xt}*"), "x"),
        param(&format!("const {tt}*"), "target"),
        param("i64", "rows"),
        param("i64", "k"),
        param("double", "smoothing"),
    ];
    let args = vec![
        Arg::Ptr(at),
        Arg::Ptr(x.ptr),
        Arg::Ptr(target.ptr),
        Arg::I64(n as i64),
        Arg::I64(classes as i64),
        Arg::F64(smoothing),
    ];
    let src = loss_source(false, hard, xt, params)?;
    l.launch(k, src, Launch::linear(blocks as u32, threads_for(classes)), args);
    fold_partials(l, k, Acc::SumF64, at, 1, blocks, &out, "tsr_store(out, o, (float)(a / scale))", n.max(1) as f64)
}

/// `CrossEntropyGrad (logits, target, dloss []) -> [N, K]`.
fn cross_entropy_grad(l: &mut Lowering, k: usize, smoothing: f64) -> Result<(), String> {
    let [x, target, dloss] = &l.inputs(k)?[..] else {
        return Err("cross_entropy_grad takes (logits, target, dloss)".into());
    };
    let out = l.output(k)?;
    let (n, classes, hard) = problem(x, target)?;
    float("dloss", dloss.dtype)?;
    if !dloss.shape.is_empty() {
        return Err(format!("dloss must be a scalar [], got {:?}", dloss.shape));
    }
    if out.shape != x.shape {
        return Err(format!("result {:?} is not the logits' shape {:?}", out.shape, x.shape));
    }
    float("the result", out.dtype)?;
    if n == 0 {
        return Ok(());
    }
    let (xt, tt) = (c_type(x.dtype)?, c_type(target.dtype)?);
    let params = vec![
        param(&format!("{}*", c_type(out.dtype)?), "out"),
        param(&format!("const {xt}*"), "x"),
        param(&format!("const {tt}*"), "target"),
        param(&format!("const {}*", c_type(dloss.dtype)?), "dloss"),
        param("i64", "rows"),
        param("i64", "k"),
        param("double", "smoothing"),
    ];
    let args = vec![
        Arg::Ptr(out.ptr),
        Arg::Ptr(x.ptr),
        Arg::Ptr(target.ptr),
        Arg::Ptr(dloss.ptr),
        Arg::I64(n as i64),
        Arg::I64(classes as i64),
        Arg::F64(smoothing),
    ];
    let src = loss_source(true, hard, xt, params)?;
    l.launch(k, src, Launch::linear(n.min(MAX_BLOCKS) as u32, threads_for(classes)), args);
    Ok(())
}

/// `ZeroDiagonal { world }`: this rank's block is the diagonal; the rank is
/// read at run time from the run's `tsr_rng` (0 for one process).
fn zero_diagonal(l: &mut Lowering, k: usize, world: u64) -> Result<(), String> {
    if world == 0 {
        return Err("world size must be at least 1".into());
    }
    let x = l.input(k, 0)?;
    let out = l.output(k)?;
    float("x", x.dtype)?;
    let [n, cols] = x.shape[..] else { return Err(format!("x must be [N, N * {world}], got {:?}", x.shape)) };
    if cols != n * world || out.shape != x.shape || out.dtype != x.dtype {
        return Err(format!(
            "x must be [N, N * {world}] like the result, got {:?} {} and {:?} {}",
            x.shape, x.dtype, out.shape, out.dtype
        ));
    }
    let t = c_type(x.dtype)?;
    let params = vec![
        param(&format!("{t}*"), "out"),
        param(&format!("const {t}*"), "x"),
        param("i64", "n"),
        param("i64", "cols"),
        param("const tsr_rng*", "rng"),
    ];
    let args = vec![Arg::Ptr(out.ptr), Arg::Ptr(x.ptr), Arg::I64(n as i64), Arg::I64(cols as i64), Arg::Ptr(l.rng)];
    let src = KernelSource::render("zero_diagonal", ZERO_DIAGONAL, tera::Context::new(), params)?;
    l.launch(k, src, grid_for(n * cols), args);
    Ok(())
}

pub fn lower(l: &mut Lowering, k: usize, op: &Op) -> Result<(), String> {
    match *op {
        Op::Softmax { axis } => along_axis(l, k, "softmax", axis, 0.0),
        Op::LogSoftmax { axis } => along_axis(l, k, "log_softmax", axis, 0.0),
        Op::L2Normalize { axis, eps } => along_axis(l, k, "l2_normalize", axis, eps),
        Op::CrossEntropy { label_smoothing } => cross_entropy(l, k, label_smoothing),
        Op::CrossEntropyGrad { label_smoothing } => cross_entropy_grad(l, k, label_smoothing),
        Op::ZeroDiagonal { world } => zero_diagonal(l, k, world),
        ref other => Err(format!("{} is not a softmax or loss op", other.name())),
    }
}
