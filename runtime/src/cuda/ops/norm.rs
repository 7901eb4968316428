//! Normalisation on the GPU: row normalisation over the last axis
//! (layer_norm, normalize, normalize_grad, and the prologue of
//! layer_norm_linear) in `kernels/norm_rows.cu`, one block per row with
//! f64 statistics as the CPU backend; LayerNorm's weight gradient in
//! `kernels/norm_weight_grad.cu` (blocks of rows, f64 partials per column); batch statistics (batch_norm,
//! batch_standardize and its gradient, running_stat) per channel in
//! `kernels/batch_norm.cu`, one block per channel computing its statistics
//! and using them in the same launch (so no scratch).

use super::super::device::{Arg, CollectiveOp, CollectiveStep, DevPtr, Elem, Launch};
use super::super::lower::{c_type, Lowering, Step, Val};
use super::super::source::{param, KernelSource};
use crate::dist::Reduction;
use tessera_plan::scratch::{norm_weight_grad_blocks, NORM_WEIGHT_GRAD_COLS};
use tessera_plan::{DType, Op};

const ROWS: &str = include_str!("../kernels/norm_rows.cu");
const BATCH: &str = include_str!("../kernels/batch_norm.cu");
const WEIGHT_GRAD: &str = include_str!("../kernels/norm_weight_grad.cu");
const LAYER_NORM_GRAD: &str = include_str!("../kernels/layer_norm_grad.cu");
/// Rows up to this wide keep layer_norm_grad's three f64 accumulators per
/// column in shared memory (36 KiB); wider ones in the block's own row of
/// the partials.
const LAYER_NORM_GRAD_SHARED_COLS: u64 = 1536;
const THREADS: u32 = 256;

fn rows_launch(rows: u64) -> Launch {
    Launch::linear(rows.clamp(1, 4096) as u32, THREADS)
}

/// `out` = the rows of `x` (last axis) standardised, times w plus b when
/// `affine` is given.
pub fn layer_norm_rows(
    l: &mut Lowering,
    k: usize,
    out: &Val,
    x: &Val,
    affine: Option<(&Val, &Val)>,
    eps: f64,
) -> Result<(), String> {
    let d = *x.shape.last().ok_or("layer norm needs at least one axis")?;
    if out.shape != x.shape {
        return Err(format!("result {:?} is not the input's shape {:?}", out.shape, x.shape));
    }
    let rows = x.numel() / d.max(1);
    let mut params =
        vec![param(&format!("{}*", c_type(out.dtype)?), "out"), param(&format!("const {}*", c_type(x.dtype)?), "x")];
    let mut args = vec![Arg::Ptr(out.ptr), Arg::Ptr(x.ptr)];
    if let Some((w, b)) = affine {
        if w.numel() != d || b.numel() != d {
            return Err(format!("weight {:?} and bias {:?} must be [{d}]", w.shape, b.shape));
        }
        params.push(param(&format!("const {}*", c_type(w.dtype)?), "w"));
        params.push(param(&format!("const {}*", c_type(b.dtype)?), "b"));
        args.extend([Arg::Ptr(w.ptr), Arg::Ptr(b.ptr)]);
    }
    params.extend([param("i64", "rows"), param("i64", "d"), param("double", "eps")]);
    args.extend([Arg::I64(rows as i64), Arg::I64(d as i64), Arg::F64(eps)]);
    let mut c = tera::Context::new();
    c.insert("affine", &affine.is_some());
    c.insert("grad", &false);
    let src = KernelSource::render("norm_rows", ROWS, c, params)?;
    l.launch(k, src, rows_launch(rows), args);
    Ok(())
}

/// `normalize_grad(g, x)`: the backward of (x - mean) * rstd over rows;
/// with `w`, of g = dy * w formed as dy is read (LayerNorm's input gradient).
#[allow(clippy::too_many_arguments)]
fn normalize_grad(
    l: &mut Lowering,
    k: usize,
    out: &Val,
    g: &Val,
    x: &Val,
    w: Option<&Val>,
    r: Option<&Val>,
    eps: f64,
) -> Result<(), String> {
    let d = *x.shape.last().ok_or("normalize_grad needs at least one axis")?;
    if g.shape != x.shape || out.shape != x.shape {
        return Err(format!("g {:?}, x {:?} and the result {:?} must have one shape", g.shape, x.shape, out.shape));
    }
    let rows = x.numel() / d.max(1);
    let mut params = vec![
        param(&format!("{}*", c_type(out.dtype)?), "out"),
        param(&format!("const {}*", c_type(x.dtype)?), "x"),
        param(&format!("const {}*", c_type(g.dtype)?), "g"),
    ];
    let mut args = vec![Arg::Ptr(out.ptr), Arg::Ptr(x.ptr), Arg::Ptr(g.ptr)];
    if let Some(w) = w {
        if w.shape != [d] {
            return Err(format!("w must be [{d}], got {:?}", w.shape));
        }
        params.push(param(&format!("const {}*", c_type(w.dtype)?), "w"));
        args.push(Arg::Ptr(w.ptr));
    }
    if let Some(r) = r {
        if r.shape != x.shape {
            return Err(format!("the residual gradient {:?} must be x's shape {:?}", r.shape, x.shape));
        }
        params.push(param(&format!("const {}*", c_type(r.dtype)?), "r"));
        args.push(Arg::Ptr(r.ptr));
    }
    params.extend([param("i64", "rows"), param("i64", "d"), param("double", "eps")]);
    args.extend([Arg::I64(rows as i64), Arg::I64(d as i64), Arg::F64(eps)]);
    let mut c = tera::Context::new();
    c.insert("affine", &w.is_some());
    c.insert("residual", &r.is_some());
    c.insert("grad", &true);
    let src = KernelSource::render("normalize_grad", ROWS, c, params)?;
    l.launch(k, src, rows_launch(rows), args);
    Ok(())
}

/// `layer_norm_weight_grad(dy, x) -> [D]`: per launch of at most
/// NORM_WEIGHT_GRAD_COLS columns, the blocks' f64 partial sums of dy * xhat
/// into the `partials` scratch, then their sum per column in block order.
fn layer_norm_weight_grad(l: &mut Lowering, k: usize, out: &Val, dy: &Val, x: &Val, eps: f64) -> Result<(), String> {
    let d = *x.shape.last().ok_or("layer_norm_weight_grad needs at least one axis")?;
    if dy.shape != x.shape || out.shape != [d] {
        return Err(format!(
            "dy {:?} must be x's shape {:?} and the result [{d}], got {:?}",
            dy.shape, x.shape, out.shape
        ));
    }
    let rows = x.numel() / d.max(1);
    if d == 0 {
        return Ok(());
    }
    if rows == 0 {
        l.zero(k, out.ptr, out.bytes());
        return Ok(());
    }
    let slices = norm_weight_grad_blocks(rows);
    let width = d.min(NORM_WEIGHT_GRAD_COLS);
    let (partials, bytes) = l.scratch(k, "partials")?;
    if bytes < slices * width * 8 {
        return Err(format!("the partials scratch holds {bytes} bytes, {} are needed", slices * width * 8));
    }
    let (ty_out, ty_dy, ty_x) = (c_type(out.dtype)?, c_type(dy.dtype)?, c_type(x.dtype)?);
    for col0 in (0..d).step_by(width as usize) {
        let cols = width.min(d - col0);
        let params = vec![
            param("double*", "partials"),
            param(&format!("const {ty_dy}*"), "dy"),
            param(&format!("const {ty_x}*"), "x"),
            param("i64", "rows"),
            param("i64", "d"),
            param("i64", "col0"),
            param("i64", "cols"),
            param("double", "eps"),
        ];
        let args = vec![
            Arg::Ptr(partials),
            Arg::Ptr(dy.ptr),
            Arg::Ptr(x.ptr),
            Arg::I64(rows as i64),
            Arg::I64(d as i64),
            Arg::I64(col0 as i64),
            Arg::I64(cols as i64),
            Arg::F64(eps),
        ];
        let mut c = tera::Context::new();
        c.insert("partials", &true);
        c.insert("cols_alloc", &width);
        let src = KernelSource::render("norm_weight_grad_partials", WEIGHT_GRAD, c, params)?;
        l.launch(k, src, Launch::linear(slices as u32, THREADS), args);
        let params = vec![
            param(&format!("{ty_out}*"), "out"),
            param("const double*", "partials"),
            param("i64", "slices"),
            param("i64", "col0"),
            param("i64", "cols"),
        ];
        let args = vec![
            Arg::Ptr(out.ptr),
            Arg::Ptr(partials),
            Arg::I64(slices as i64),
            Arg::I64(col0 as i64),
            Arg::I64(cols as i64),
        ];
        let mut c = tera::Context::new();
        c.insert("partials", &false);
        let src = KernelSource::render("norm_weight_grad_sum", WEIGHT_GRAD, c, params)?;
        l.launch(k, src, Launch::linear(cols.div_ceil(THREADS as u64) as u32, THREADS), args);
    }
    Ok(())
}

/// `layer_norm_grad(dy, x, w[, r][, b])`: one pass over the rows writes dx
/// (plus r), its bf16 copy (part 3), the forward's normalised input (part
/// 5, with b) and the blocks' f64 partial sums of dy *
/// xhat, dy and the copy into the `partials` scratch; a second launch sums
/// them per column into the weight and bias gradients and the copy's sum
/// (parts 1, 2 and 4).
fn layer_norm_grad(
    l: &mut Lowering,
    k: usize,
    out: &Val,
    x: &[Val],
    eps: f64,
    copy_type: Option<DType>,
    normalized_type: Option<DType>,
) -> Result<(), String> {
    // With the normalised input (result 5) the norm's bias comes last.
    let (x, b) = match (normalized_type, x.split_last()) {
        (Some(_), Some((b, rest))) => (rest, Some(b)),
        _ => (x, None),
    };
    let (dy, xv, w, r) = match x {
        [dy, xv, w] => (dy, xv, w, None),
        [dy, xv, w, r] => (dy, xv, w, Some(r)),
        _ => return Err("layer_norm_grad takes (dy, x, w[, r]) and, with its normalised input, b".into()),
    };
    let d = *xv.shape.last().ok_or("layer_norm_grad needs at least one axis")?;
    if dy.shape != xv.shape || out.shape != xv.shape || w.shape != [d] || r.is_some_and(|r| r.shape != xv.shape) {
        return Err(format!(
            "dy {:?}, x {:?}, r and the result {:?} must have one shape and w {:?} be [{d}]",
            dy.shape, xv.shape, out.shape, w.shape
        ));
    }
    // Its parts, by result index.
    let mut parts: [Option<Val>; 6] = Default::default();
    for &(offset, v) in l.parts(k) {
        let slot = parts.get_mut(offset as usize).filter(|_| offset >= 1).ok_or("a layer_norm_grad part is 1 to 5")?;
        *slot = Some(l.value(v)?);
    }
    let [_, weight, bias, copy, copy_sum, normalized] = parts;
    // The copy is bf16 (what mixed precision makes); without one the sum is of dx.
    let rounded = match copy_type {
        Some(DType::BF16) => true,
        None if copy.is_none() => false,
        other => return Err(format!("layer_norm_grad's copy is bf16 on the GPU, not {other:?}")),
    };
    let rows = xv.numel() / d.max(1);
    if d == 0 {
        return Ok(());
    }
    let slices = norm_weight_grad_blocks(rows);
    let (partials, bytes) = l.scratch(k, "partials")?;
    if bytes < slices * 3 * d * 8 {
        return Err(format!("the partials scratch holds {bytes} bytes, {} are needed", slices * 3 * d * 8));
    }
    let mut params = vec![
        param("double*", "partials"),
        param(&format!("{}*", c_type(out.dtype)?), "out"),
        param(&format!("const {}*", c_type(dy.dtype)?), "dy"),
        param(&format!("const {}*", c_type(xv.dtype)?), "x"),
        param(&format!("const {}*", c_type(w.dtype)?), "w"),
    ];
    let mut args = vec![Arg::Ptr(partials), Arg::Ptr(out.ptr), Arg::Ptr(dy.ptr), Arg::Ptr(xv.ptr), Arg::Ptr(w.ptr)];
    if let Some(r) = r {
        params.push(param(&format!("const {}*", c_type(r.dtype)?), "r"));
        args.push(Arg::Ptr(r.ptr));
    }
    if let Some(c) = &copy {
        if c.shape != out.shape {
            return Err(format!("the copy {:?} must be dx's shape {:?}", c.shape, out.shape));
        }
        params.push(param(&format!("{}*", c_type(c.dtype)?), "copy"));
        args.push(Arg::Ptr(c.ptr));
    }
    // The forward's layer_norm(x, w, b), as norm_rows.cu writes it.
    if let Some(n) = &normalized {
        let Some(b) = b.filter(|b| b.shape == [d]) else {
            return Err(format!("the normalised input needs the norm's bias, [{d}]"));
        };
        if n.shape != out.shape || Some(n.dtype) != normalized_type {
            return Err(format!("the normalised input {:?} must be dx's shape {:?}", n.shape, out.shape));
        }
        params.push(param(&format!("const {}*", c_type(b.dtype)?), "b"));
        params.push(param(&format!("{}*", c_type(n.dtype)?), "normalized"));
        args.extend([Arg::Ptr(b.ptr), Arg::Ptr(n.ptr)]);
    }
    params.extend([param("i64", "rows"), param("i64", "d"), param("double", "eps")]);
    args.extend([Arg::I64(rows as i64), Arg::I64(d as i64), Arg::F64(eps)]);
    let shared = d <= LAYER_NORM_GRAD_SHARED_COLS;
    let mut c = tera::Context::new();
    c.insert("partials", &true);
    c.insert("residual", &r.is_some());
    c.insert("copy", &copy.is_some());
    c.insert("normalized", &normalized.is_some());
    c.insert("copy_sum", &copy_sum.is_some());
    c.insert("rounded", &rounded);
    c.insert("shared", &shared);
    c.insert("cols_alloc", &d);
    let src = KernelSource::render("layer_norm_grad_rows", LAYER_NORM_GRAD, c, params)?;
    // (No rows: one block leaves zero partials, so the sums below are zero.)
    l.launch(k, src, Launch::linear(slices as u32, THREADS), args);
    if weight.is_none() && bias.is_none() && copy_sum.is_none() {
        return Ok(());
    }
    let mut params = Vec::new();
    let mut args = Vec::new();
    for (p, name) in [(&weight, "dw"), (&bias, "db"), (&copy_sum, "dc")] {
        if let Some(p) = p {
            if p.shape != [d] {
                return Err(format!("the {name} part {:?} must be [{d}]", p.shape));
            }
            params.push(param(&format!("{}*", c_type(p.dtype)?), name));
            args.push(Arg::Ptr(p.ptr));
        }
    }
    params.extend([param("const double*", "partials"), param("i64", "slices"), param("i64", "d")]);
    args.extend([Arg::Ptr(partials), Arg::I64(slices as i64), Arg::I64(d as i64)]);
    let mut c = tera::Context::new();
    c.insert("partials", &false);
    c.insert("residual", &r.is_some());
    c.insert("copy", &copy.is_some());
    c.insert("normalized", &normalized.is_some());
    c.insert("weight", &weight.is_some());
    c.insert("bias", &bias.is_some());
    c.insert("copy_sum", &copy_sum.is_some());
    let src = KernelSource::render("layer_norm_grad_sums", LAYER_NORM_GRAD, c, params)?;
    l.launch(k, src, Launch::linear(d.div_ceil(THREADS as u64) as u32, THREADS), args);
    Ok(())
}

pub fn lower(l: &mut Lowering, k: usize, op: &Op) -> Result<(), String> {
    let x = l.inputs(k)?;
    let out = l.output(k)?;
    match *op {
        Op::LayerNorm { eps } => {
            let [x, w, b] = &x[..] else { return Err("layer_norm takes (x, w, b)".into()) };
            layer_norm_rows(l, k, &out, x, Some((w, b)), eps)
        }
        Op::Normalize { eps } => layer_norm_rows(l, k, &out, &x[0], None, eps),
        Op::NormalizeGrad { eps } => match &x[..] {
            [g, xv] => normalize_grad(l, k, &out, g, xv, None, None, eps),
            [dy, xv, w] => normalize_grad(l, k, &out, dy, xv, Some(w), None, eps),
            [dy, xv, w, r] => normalize_grad(l, k, &out, dy, xv, Some(w), Some(r), eps),
            _ => Err("normalize_grad takes (g, x), (dy, x, w) or (dy, x, w, r)".into()),
        },
        Op::LayerNormGrad { eps, copy, normalized } => layer_norm_grad(l, k, &out, &x, eps, copy, normalized),
        Op::LayerNormWeightGrad { eps } => match &x[..] {
            [dy, xv] => layer_norm_weight_grad(l, k, &out, dy, xv, eps),
            _ => Err("layer_norm_weight_grad takes (dy, x)".into()),
        },
        Op::BatchNorm { eps, .. } => {
            let [x, w, b, rm, rv] = &x[..] else {
                return Err("batch_norm takes (x, w, b, running_mean, running_var)".into());
            };
            if !matches!(x.shape.len(), 2 | 4) {
                return Err(format!("batch_norm's input must be [N, C] or [N, C, H, W], got {:?}", x.shape));
            }
            let mut c = tera::Context::new();
            c.insert("training", &l.plan.training);
            let group = group_statistics(l, k, x, None, eps)?;
            let channel = [(w, "w"), (b, "b"), (rm, "running_mean"), (rv, "running_var")];
            batch_kernel(l, k, "batch_norm", c, &out, &[(x, "x")], &channel, ("eps", eps), group.as_ref())
        }
        Op::BatchStandardize { eps } => {
            let [x] = &x[..] else { return Err("batch_standardize takes (x)".into()) };
            let group = group_statistics(l, k, x, None, eps)?;
            let c = tera::Context::new();
            batch_kernel(l, k, "batch_standardize", c, &out, &[(x, "x")], &[], ("eps", eps), group.as_ref())
        }
        Op::BatchStandardizeGrad { eps } => {
            let [g, xv] = &x[..] else { return Err("batch_standardize_grad takes (g, x)".into()) };
            if g.shape != xv.shape {
                return Err(format!("g {:?} and x {:?} must have one shape", g.shape, xv.shape));
            }
            let group = group_statistics(l, k, xv, Some(g), eps)?;
            let full = [(xv, "x"), (g, "g")];
            let c = tera::Context::new();
            batch_kernel(l, k, "batch_standardize_grad", c, &out, &full, &[], ("eps", eps), group.as_ref())
        }
        Op::RunningStat { momentum, unbiased_var } => {
            let [running, xv] = &x[..] else { return Err("running_stat takes (running, x)".into()) };
            let mut c = tera::Context::new();
            c.insert("unbiased_var", &unbiased_var);
            let group = group_statistics(l, k, xv, None, 0.0)?;
            let channel = [(running, "running")];
            let scalar = ("momentum", momentum);
            batch_kernel(l, k, "running_stat", c, &out, &[(xv, "x")], &channel, scalar, group.as_ref())
        }
        ref other => Err(format!("{} is not a normalisation op", other.name())),
    }
}

/// A synchronised batch norm's group statistics, filled in by the passes
/// `group_statistics` emits: f64 arrays of one slot of C channels per group
/// (two values per channel for `grad_sums`).
#[derive(Clone, Copy)]
struct Group {
    sums: DevPtr,
    squares: DevPtr,
    grad_sums: Option<DevPtr>,
    /// Ranks per group, and the values per channel over the group.
    size: u64,
    count: f64,
}

/// For a training plan with synchronised batch norm (VISSL's SyncBatchNorm,
/// reference 6.6): the passes that sum channel c's statistics over the
/// rank's group, each an all-reduce (sum) of f64 slots in which each rank
/// wrote its group's: sums of x, then of (x - mean)^2, then for the
/// gradient the sums of g and g * xhat (what SyncBatchNorm's backward
/// all-reduces). `None` when the statistics are the rank's own batch's.
fn group_statistics(l: &mut Lowering, k: usize, x: &Val, g: Option<&Val>, eps: f64) -> Result<Option<Group>, String> {
    let size = l.plan.sync_batch_norm;
    if !l.plan.training || size <= 1 || l.world <= 1 {
        return Ok(None);
    }
    let [n, ch, rest @ ..] = &x.shape[..] else {
        return Err(format!("the input must be [N, C, ...], got {:?}", x.shape));
    };
    let slots = l.world / size;
    // A zeroed array of f64 slots, filled by one pass and summed over the ranks.
    let piece = |l: &Lowering, name: &str, per_channel: u64| -> Result<(DevPtr, u64), String> {
        let (ptr, bytes) = l.scratch(k, name)?;
        let want = slots * ch * per_channel * 8;
        if bytes < want {
            return Err(format!(
                "the scratch piece `{name}` has {bytes} bytes, {slots} groups of {ch} channels need {want}"
            ));
        }
        Ok((ptr, slots * ch * per_channel))
    };
    let (sums, n_sums) = piece(l, "group_sums", 1)?;
    let (squares, _) = piece(l, "group_squares", 1)?;
    let grad = if g.is_some() { Some(piece(l, "group_grad_sums", 2)?) } else { None };
    let count = (size * n * rest.iter().product::<u64>()) as f64;
    // The passes read the sums before them; none reads the gradient's sums.
    let before = Group { sums, squares, grad_sums: None, size, count };
    let pass = |l: &mut Lowering, mode: &str, (into, slots): (DevPtr, u64), full: &[(&Val, &str)]| {
        l.zero(k, into, slots * 8);
        let mut c = tera::Context::new();
        c.insert("mode", mode);
        batch_launch_of(l, k, c, into, "double*", full, ("eps", eps), Some(&before))?;
        let sum = CollectiveOp::AllReduce(Reduction::Sum);
        let step = CollectiveStep { op: sum, elem: Elem::F64, src: into, dst: into, count: slots };
        l.steps.push(Step::Collective { kernel: k, step, slot: 0 });
        Ok::<(), String>(())
    };
    pass(l, "group_sums", (sums, n_sums), &[(x, "x")])?;
    pass(l, "group_squares", (squares, n_sums), &[(x, "x")])?;
    if let (Some(g), Some(piece)) = (g, grad) {
        pass(l, "group_grad_sums", piece, &[(x, "x"), (g, "g")])?;
    }
    Ok(Some(Group { grad_sums: grad.map(|(p, _)| p), ..before }))
}

/// Per-channel batch statistics: one launch of `kernels/batch_norm.cu` for
/// op `mode` (its name), with x (the first of `full`, which all have x's
/// shape) viewed as [N, C, S]; every operand of `per_channel` must be [C].
/// The result is x's shape, or [C] for running_stat. With `group`, the
/// statistics are the group's (synchronised batch norm).
#[allow(clippy::too_many_arguments)]
fn batch_kernel(
    l: &mut Lowering,
    k: usize,
    mode: &str,
    mut c: tera::Context,
    out: &Val,
    full: &[(&Val, &str)],
    per_channel: &[(&Val, &str)],
    (scalar, value): (&str, f64),
    group: Option<&Group>,
) -> Result<(), String> {
    let Some(&(x, _)) = full.first() else { return Err("batch statistics need an input".into()) };
    let [_, ch, ..] = &x.shape[..] else {
        return Err(format!("the input must be [N, C, ...], got {:?}", x.shape));
    };
    let want: &[u64] = if mode == "running_stat" { &[*ch] } else { &x.shape };
    if out.shape != want {
        return Err(format!("the result is {:?}, expected {:?}", out.shape, want));
    }
    for (v, role) in per_channel {
        if v.shape != [*ch] {
            return Err(format!("{role} must be [{ch}] for x {:?}, got {:?}", x.shape, v.shape));
        }
    }
    let out_type = format!("{}*", c_type(out.dtype)?);
    let operands: Vec<(&Val, &str)> = full.iter().chain(per_channel).copied().collect();
    c.insert("mode", mode);
    batch_launch_of(l, k, c, out.ptr, &out_type, &operands, (scalar, value), group)
}

/// Renders and launches one batch-statistics kernel: parameters `out`, the
/// operands, N, C, S, the scalar, then with `group` the group's arrays, the
/// run's `tsr_rng` (for the rank), the group size and count.
#[allow(clippy::too_many_arguments)]
fn batch_launch_of(
    l: &mut Lowering,
    k: usize,
    mut c: tera::Context,
    out: DevPtr,
    out_type: &str,
    operands: &[(&Val, &str)],
    (scalar, value): (&str, f64),
    group: Option<&Group>,
) -> Result<(), String> {
    let Some(&(x, _)) = operands.first() else { return Err("batch statistics need an input".into()) };
    let [n, ch, rest @ ..] = &x.shape[..] else {
        return Err(format!("the input must be [N, C, ...], got {:?}", x.shape));
    };
    let (n, ch, s) = (*n, *ch, rest.iter().product::<u64>());
    let mut params = vec![param(out_type, "out")];
    let mut args = vec![Arg::Ptr(out)];
    for (v, role) in operands {
        params.push(param(&format!("const {}*", c_type(v.dtype)?), role));
        args.push(Arg::Ptr(v.ptr));
    }
    params.extend([param("i64", "N"), param("i64", "C"), param("i64", "S"), param("double", scalar)]);
    args.extend([Arg::I64(n as i64), Arg::I64(ch as i64), Arg::I64(s as i64), Arg::F64(value)]);
    c.insert("sync", &group.is_some());
    if let Some(g) = group {
        params.extend([param("const double*", "sums"), param("const double*", "squares")]);
        args.extend([Arg::Ptr(g.sums), Arg::Ptr(g.squares)]);
        if let Some(gs) = g.grad_sums {
            params.push(param("const double*", "grad_sums"));
            args.push(Arg::Ptr(gs));
        }
        params.extend([param("const tsr_rng*", "rng"), param("i64", "group"), param("double", "group_count")]);
        args.extend([Arg::Ptr(l.rng), Arg::I64(g.size as i64), Arg::F64(g.count)]);
    }
    let name = c.get("mode").and_then(|m| m.as_str()).unwrap_or("batch").to_string();
    let name = if group.is_some() && !name.starts_with("group_") { format!("synced_{name}") } else { name };
    let src = KernelSource::render(&name, BATCH, c, params)?;
    l.launch(k, src, batch_launch(ch, n * s), args);
    Ok(())
}

/// One block per channel (grid-stride beyond 4096), with the smallest power
/// of two of threads, from 32 to 256, that covers a channel's elements.
fn batch_launch(channels: u64, per_channel: u64) -> Launch {
    let threads = per_channel.next_power_of_two().clamp(32, THREADS as u64) as u32;
    Launch::linear(channels.clamp(1, 4096) as u32, threads)
}
