//! Normalisation on the GPU: row normalisation over the last axis
//! (layer_norm, normalize, normalize_grad, and the prologue of
//! layer_norm_linear) in `kernels/norm_rows.cu`, one block per row with
//! f64 statistics as the CPU backend; batch statistics (batch_norm and its
//! parts) per channel.

use super::super::device::{Arg, Launch};
use super::super::lower::{c_type, Lowering, Val};
use super::super::source::{param, KernelSource};
use tessera_plan::Op;

const ROWS: &str = include_str!("../kernels/norm_rows.cu");
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
    let mut params = vec![
        param(&format!("{}*", c_type(out.dtype)?), "out"),
        param(&format!("const {}*", c_type(x.dtype)?), "x"),
    ];
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
    let args = vec![Arg::Ptr(out.ptr), Arg::Ptr(x.ptr), Arg::Ptr(g.ptr), Arg::I64(rows as i64), Arg::I64(d as i64), Arg::F64(eps)];
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
        ref other => Err(format!("{} is not implemented by the CUDA backend yet", other.name())),
    }
}
