//! Normalisation on the GPU: row normalisation over the last axis
//! (layer_norm, normalize, normalize_grad, and the prologue of
//! layer_norm_linear) in `kernels/norm_rows.cu`, one block per row with
//! f64 statistics as the CPU backend; batch statistics (batch_norm,
//! batch_standardize and its gradient, running_stat) per channel in
//! `kernels/batch_norm.cu`, one block per channel computing its statistics
//! and using them in the same launch (so no scratch).

use super::super::device::{Arg, Launch};
use super::super::lower::{c_type, Lowering, Val};
use super::super::source::{param, KernelSource};
use tessera_plan::Op;

const ROWS: &str = include_str!("../kernels/norm_rows.cu");
const BATCH: &str = include_str!("../kernels/batch_norm.cu");
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

/// `normalize_grad(g, x)`: the backward of (x - mean) * rstd over rows.
fn normalize_grad(l: &mut Lowering, k: usize, out: &Val, g: &Val, x: &Val, eps: f64) -> Result<(), String> {
    let d = *x.shape.last().ok_or("normalize_grad needs at least one axis")?;
    if g.shape != x.shape || out.shape != x.shape {
        return Err(format!("g {:?}, x {:?} and the result {:?} must have one shape", g.shape, x.shape, out.shape));
    }
    let rows = x.numel() / d.max(1);
    let params = vec![
        param(&format!("{}*", c_type(out.dtype)?), "out"),
        param(&format!("const {}*", c_type(x.dtype)?), "x"),
        param(&format!("const {}*", c_type(g.dtype)?), "g"),
        param("i64", "rows"),
        param("i64", "d"),
        param("double", "eps"),
    ];
    let args = vec![
        Arg::Ptr(out.ptr),
        Arg::Ptr(x.ptr),
        Arg::Ptr(g.ptr),
        Arg::I64(rows as i64),
        Arg::I64(d as i64),
        Arg::F64(eps),
    ];
    let mut c = tera::Context::new();
    c.insert("affine", &false);
    c.insert("grad", &true);
    let src = KernelSource::render("normalize_grad", ROWS, c, params)?;
    l.launch(k, src, rows_launch(rows), args);
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
        Op::NormalizeGrad { eps } => {
            let [g, xv] = &x[..] else { return Err("normalize_grad takes (g, x)".into()) };
            normalize_grad(l, k, &out, g, xv, eps)
        }
        Op::BatchNorm { eps, .. } => {
            let [x, w, b, rm, rv] = &x[..] else {
                return Err("batch_norm takes (x, w, b, running_mean, running_var)".into());
            };
            if !matches!(x.shape.len(), 2 | 4) {
                return Err(format!("batch_norm's input must be [N, C] or [N, C, H, W], got {:?}", x.shape));
            }
            let mut c = tera::Context::new();
            c.insert("training", &l.plan.training);
            let channel = [(w, "w"), (b, "b"), (rm, "running_mean"), (rv, "running_var")];
            batch_kernel(l, k, "batch_norm", c, &out, &[(x, "x")], &channel, ("eps", eps))
        }
        Op::BatchStandardize { eps } => {
            let [x] = &x[..] else { return Err("batch_standardize takes (x)".into()) };
            batch_kernel(l, k, "batch_standardize", tera::Context::new(), &out, &[(x, "x")], &[], ("eps", eps))
        }
        Op::BatchStandardizeGrad { eps } => {
            let [g, xv] = &x[..] else { return Err("batch_standardize_grad takes (g, x)".into()) };
            if g.shape != xv.shape {
                return Err(format!("g {:?} and x {:?} must have one shape", g.shape, xv.shape));
            }
            let full = [(xv, "x"), (g, "g")];
            batch_kernel(l, k, "batch_standardize_grad", tera::Context::new(), &out, &full, &[], ("eps", eps))
        }
        Op::RunningStat { momentum, unbiased_var } => {
            let [running, xv] = &x[..] else { return Err("running_stat takes (running, x)".into()) };
            let mut c = tera::Context::new();
            c.insert("unbiased_var", &unbiased_var);
            let channel = [(running, "running")];
            batch_kernel(l, k, "running_stat", c, &out, &[(xv, "x")], &channel, ("momentum", momentum))
        }
        ref other => Err(format!("{} is not a normalisation op", other.name())),
    }
}

/// Per-channel batch statistics: one launch of `kernels/batch_norm.cu` for
/// op `mode` (its name), with x (the first of `full`, which all have x's
/// shape) viewed as [N, C, S]; every operand of `per_channel` must be [C].
/// The result is x's shape, or [C] for running_stat.
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
) -> Result<(), String> {
    let Some(&(x, _)) = full.first() else { return Err("batch statistics need an input".into()) };
    let [n, ch, rest @ ..] = &x.shape[..] else {
        return Err(format!("the input must be [N, C, ...], got {:?}", x.shape));
    };
    let (n, ch, s) = (*n, *ch, rest.iter().product::<u64>());
    let want: &[u64] = if mode == "running_stat" { &[ch] } else { &x.shape };
    if out.shape != want {
        return Err(format!("the result is {:?}, expected {:?}", out.shape, want));
    }
    for (v, role) in per_channel {
        if v.shape != [ch] {
            return Err(format!("{role} must be [{ch}] for x {:?}, got {:?}", x.shape, v.shape));
        }
    }
    let mut params = vec![param(&format!("{}*", c_type(out.dtype)?), "out")];
    let mut args = vec![Arg::Ptr(out.ptr)];
    for (v, role) in full.iter().chain(per_channel) {
        params.push(param(&format!("const {}*", c_type(v.dtype)?), role));
        args.push(Arg::Ptr(v.ptr));
    }
    params.extend([param("i64", "N"), param("i64", "C"), param("i64", "S"), param("double", scalar)]);
    args.extend([Arg::I64(n as i64), Arg::I64(ch as i64), Arg::I64(s as i64), Arg::F64(value)]);
    c.insert("mode", mode);
    let src = KernelSource::render(mode, BATCH, c, params)?;
    l.launch(k, src, batch_launch(ch, n * s), args);
    Ok(())
}

/// One block per channel (grid-stride beyond 4096), with the smallest power
/// of two of threads, from 32 to 256, that covers a channel's elements.
fn batch_launch(channels: u64, per_channel: u64) -> Launch {
    let threads = per_channel.next_power_of_two().clamp(32, THREADS as u64) as u32;
    Launch::linear(channels.clamp(1, 4096) as u32, threads)
}
