//! Layout ops on the GPU: reshape and stop_gradient are the memory plan's
//! aliases (no work) or one copy, and so is a slice of contiguous rows the
//! plan places in its operand (and a concat of operands placed in its
//! result); permute, slice, expand, concat and pad are
//! one strided copy each (`kernels/layout.cu`), per operand for concat,
//! after zeroing for pad.

use super::super::device::Arg;
use super::super::lower::{c_type, Lowering, Val};
use super::super::source::{param, KernelSource};
use super::elementwise::{broadcast_strides, grid_for};
use tessera_plan::{Dim, Op};

const TEMPLATE: &str = include_str!("../kernels/layout.cu");

/// Row-major strides of `shape`, in elements.
pub fn contiguous(shape: &[u64]) -> Vec<i64> {
    let mut s = vec![0i64; shape.len()];
    let mut acc = 1i64;
    for d in (0..shape.len()).rev() {
        s[d] = acc;
        acc *= shape[d] as i64;
    }
    s
}

fn fixed(d: Dim) -> Result<u64, String> {
    d.as_const().ok_or_else(|| format!("dim {d} is not fixed (plans have no symbolic batch)"))
}

/// One strided copy over `dims`: out[out_base + c.so] = x[in_base + c.si].
#[allow(clippy::too_many_arguments)]
pub fn strided_copy(
    l: &mut Lowering,
    k: usize,
    out: &Val,
    x: &Val,
    dims: &[u64],
    so: &[i64],
    si: &[i64],
    out_base: i64,
    in_base: i64,
) -> Result<(), String> {
    if out.dtype != x.dtype {
        return Err(format!("a copy from {} to {}", x.dtype, out.dtype));
    }
    let n: u64 = dims.iter().product();
    if n == 0 {
        return Ok(());
    }
    // Rank 0 copies one element; the kernel wants at least one dim.
    let (dims, so, si) =
        if dims.is_empty() { (vec![1], vec![0], vec![0]) } else { (dims.to_vec(), so.to_vec(), si.to_vec()) };
    let rank = dims.len();
    let t = c_type(out.dtype)?;
    let dty = format!("tsr_dims_{rank}");
    let params = vec![
        param(&format!("{t}*"), "out"),
        param(&format!("const {t}*"), "x"),
        param("i64", "n"),
        param(&dty, "dims"),
        param(&dty, "so"),
        param(&dty, "si"),
        param("i64", "out_base"),
        param("i64", "in_base"),
    ];
    let mut c = tera::Context::new();
    c.insert("rank", &rank);
    let src = KernelSource::render("layout", TEMPLATE, c, params)?;
    let bytes = |v: &[i64]| Arg::Bytes(v.iter().flat_map(|x| x.to_ne_bytes()).collect());
    let args = vec![
        Arg::Ptr(out.ptr),
        Arg::Ptr(x.ptr),
        Arg::I64(n as i64),
        bytes(&dims.iter().map(|&d| d as i64).collect::<Vec<_>>()),
        bytes(&so),
        bytes(&si),
        Arg::I64(out_base),
        Arg::I64(in_base),
    ];
    l.launch(k, src, grid_for(n), args);
    Ok(())
}

/// The result is the operand's data: nothing when the memory plan placed
/// them together, else one copy.
pub fn identity(l: &mut Lowering, k: usize) -> Result<(), String> {
    let (x, out) = (l.input(k, 0)?, l.output(k)?);
    if x.bytes() != out.bytes() {
        return Err(format!("the result ({} bytes) is not its operand's data ({} bytes)", out.bytes(), x.bytes()));
    }
    l.copy(k, out.ptr, x.ptr, out.bytes());
    Ok(())
}

pub fn lower(l: &mut Lowering, k: usize, op: &Op) -> Result<(), String> {
    let out = l.output(k)?;
    match op {
        Op::Reshape { .. } | Op::StopGradient => identity(l, k),
        Op::Permute { perm } => {
            let x = l.input(k, 0)?;
            if perm.len() != x.shape.len() || perm.iter().any(|&p| p >= x.shape.len()) {
                return Err(format!("perm {perm:?} does not fit input {:?}", x.shape));
            }
            let s = contiguous(&x.shape);
            let si: Vec<i64> = perm.iter().map(|&p| s[p]).collect();
            strided_copy(l, k, &out, &x, &out.shape.clone(), &contiguous(&out.shape), &si, 0, 0)
        }
        Op::Slice { axis, start, .. } => {
            let x = l.input(k, 0)?;
            let s = contiguous(&x.shape);
            let base = fixed(*start)? as i64 * s.get(*axis).copied().ok_or("axis out of range")?;
            // A view (`memory::view_offset`): the rows are where they are.
            if out.ptr.0 == x.ptr.0 + base as u64 * x.dtype.size_bytes() && out.dtype == x.dtype {
                return Ok(());
            }
            strided_copy(l, k, &out, &x, &out.shape.clone(), &contiguous(&out.shape), &s, 0, base)
        }
        Op::Expand { .. } => {
            let x = l.input(k, 0)?;
            let si = broadcast_strides(&x.shape, &out.shape)?;
            strided_copy(l, k, &out, &x, &out.shape.clone(), &contiguous(&out.shape), &si, 0, 0)
        }
        Op::Concat { axis } => {
            let so = contiguous(&out.shape);
            let mut at = 0i64;
            for x in l.inputs(k)? {
                let step = so.get(*axis).copied().ok_or("axis out of range")?;
                // An operand the plan placed where the result holds it
                // (`memory::concat_in_place`): nothing to copy.
                let there = out.ptr.0 + (at * step) as u64 * out.dtype.size_bytes() == x.ptr.0 && out.dtype == x.dtype;
                if !there {
                    strided_copy(l, k, &out, &x, &x.shape.clone(), &so, &contiguous(&x.shape), at * step, 0)?;
                }
                at += x.shape[*axis] as i64;
            }
            Ok(())
        }
        Op::Pad { axis, before, .. } => {
            let x = l.input(k, 0)?;
            let so = contiguous(&out.shape);
            l.zero(k, out.ptr, out.bytes());
            let base = fixed(*before)? as i64 * so.get(*axis).copied().ok_or("axis out of range")?;
            strided_copy(l, k, &out, &x, &x.shape.clone(), &so, &contiguous(&x.shape), base, 0)
        }
        other => Err(format!("{} is not a layout op", other.name())),
    }
}
