//! Elementwise kernels: unary functions, broadcasting binary ops, scalar
//! affine ops, casts and GELU's gradient.

use super::broadcast::{broadcast_shape, zip};
use super::fast_math::{gelu_f32, gelu_grad_f32};
use super::kernel::{f32_of, operands, PAR_CHUNK, PAR_MIN};
use super::pool;
use super::simd::{has_fma, vectorized};
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, stored_as_f32, Data, Tensor};
use rayon::prelude::*;
use tessera_plan::{BinaryOp, DType, UnaryOp};

/// Runs `f(start, out_chunk, x_chunk)` over matching chunks of `out` and `x`
/// (`start`: the chunk's first index), in parallel for large inputs, each
/// chunk compiled for the best vector level. The one driver of the
/// elementwise kernels here.
fn for_chunks(out: &mut [f32], x: &[f32], f: impl Fn(usize, &mut [f32], &[f32]) + Sync) {
    let body = |(c, (o, x)): (usize, (&mut [f32], &[f32]))| {
        vectorized(
            #[inline(always)]
            || f(c * PAR_CHUNK, o, x),
        )
    };
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK)).enumerate().for_each(body);
    } else {
        body((0, (out, x)));
    }
}

/// `f(x, out)` over chunks of a fresh output (see `for_chunks`).
fn chunked(x: &[f32], f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = pool::buffer(x.len());
    for_chunks(
        &mut out,
        x,
        #[inline(always)]
        |_, o, x| f(x, o),
    );
    out
}

/// `f` applied to every element, in parallel for large inputs.
pub fn map_f32(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    chunked(
        x,
        #[inline(always)]
        |x, o| each(x, o, &f),
    )
}

/// The logistic function, without overflow for large |x|.
#[inline]
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `out[i] = f(x[i])`; a plain loop, so it vectorises inside `vectorized`.
#[inline(always)]
fn each(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f(v);
    }
}

/// `out[i] = u(x[i])`: the one definition of each unary op on a slice, for
/// the unary kernel and for fused kernels.
#[inline(always)]
pub(super) fn unary_into(u: UnaryOp, x: &[f32], out: &mut [f32]) {
    match u {
        UnaryOp::Gelu if has_fma() => each(x, out, gelu_f32::<true>),
        UnaryOp::Gelu => each(x, out, gelu_f32::<false>),
        UnaryOp::Relu => each(x, out, |v| if v > 0.0 { v } else { 0.0 }),
        UnaryOp::Tanh => each(x, out, f32::tanh),
        UnaryOp::Sigmoid => each(x, out, sigmoid),
        UnaryOp::Exp => each(x, out, f32::exp),
        UnaryOp::Log => each(x, out, f32::ln),
        UnaryOp::Neg => each(x, out, |v| -v),
        UnaryOp::Sqrt => each(x, out, f32::sqrt),
        UnaryOp::Recip => each(x, out, |v| 1.0 / v),
        UnaryOp::Square => each(x, out, |v| v * v),
        UnaryOp::Heaviside => each(x, out, |v| if v > 0.0 { 1.0 } else { 0.0 }),
    }
}

/// torch.maximum / minimum: NaN propagates.
#[inline(always)]
pub(super) fn max_nan(x: f32, y: f32) -> f32 {
    if x.is_nan() || x > y {
        x
    } else {
        y
    }
}

#[inline(always)]
pub(super) fn min_nan(x: f32, y: f32) -> f32 {
    if x.is_nan() || x < y {
        x
    } else {
        y
    }
}

/// `out[i] = x[i] op y[i]` on same-length slices (fused kernels).
#[inline(always)]
pub(super) fn binary_into(op: BinaryOp, x: &[f32], y: &[f32], out: &mut [f32]) {
    #[inline(always)]
    fn each2(x: &[f32], y: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32) {
        for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
            *o = f(a, b);
        }
    }
    match op {
        BinaryOp::Add => each2(x, y, out, |a, b| a + b),
        BinaryOp::Sub => each2(x, y, out, |a, b| a - b),
        BinaryOp::Mul => each2(x, y, out, |a, b| a * b),
        BinaryOp::Div => each2(x, y, out, |a, b| a / b),
        BinaryOp::Max => each2(x, y, out, max_nan),
        BinaryOp::Min => each2(x, y, out, min_nan),
    }
}

/// `out[i] = x[i] ^ e`, with exact forms for the common exponents.
#[inline(always)]
pub(super) fn pow_into(e: f64, x: &[f32], out: &mut [f32]) {
    match e {
        1.0 => out.copy_from_slice(x),
        2.0 => each(x, out, |v| v * v),
        0.5 => each(x, out, f32::sqrt),
        -1.0 => each(x, out, |v| 1.0 / v),
        e if e == e.trunc() && e.abs() < 64.0 => {
            let n = e as i32;
            each(x, out, |v| v.powi(n))
        }
        e => {
            let e = e as f32;
            each(x, out, |v| v.powf(e))
        }
    }
}

/// `out[i] = dy[i] * GELU'(x[i])`.
#[inline(always)]
pub(super) fn gelu_grad_into(x: &[f32], dy: &[f32], out: &mut [f32]) {
    #[inline(always)]
    fn with<const FMA: bool>(x: &[f32], dy: &[f32], out: &mut [f32]) {
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(dy) {
            *o = g * gelu_grad_f32::<FMA>(x);
        }
    }
    if has_fma() {
        with::<true>(x, dy, out)
    } else {
        with::<false>(x, dy, out)
    }
}

/// In place: `out[i] *= GELU'(z[i])` (a product's GELU-gradient epilogue).
pub(super) fn scale_by_gelu_grad(z: &[f32], out: &mut [f32]) {
    #[inline(always)]
    fn with<const FMA: bool>(z: &[f32], out: &mut [f32]) {
        for (o, &z) in out.iter_mut().zip(z) {
            *o *= gelu_grad_f32::<FMA>(z);
        }
    }
    for_chunks(
        out,
        z,
        #[inline(always)]
        |_, o, z| if has_fma() { with::<true>(z, o) } else { with::<false>(z, o) },
    );
}

pub fn unary(x: &[&Tensor], op: UnaryOp) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let out = chunked(
        f32_of(t, "input")?,
        #[inline(always)]
        |x, o| unary_into(op, x, o),
    );
    Ok(Tensor::f32(t.shape.clone(), out))
}

/// `GeluGrad (x, dy) -> dy * GELU'(x)`.
pub fn gelu_grad(x: &[&Tensor]) -> Result<Tensor, KernelError> {
    let [xt, dy] = operands(x, ["x", "dy"])?;
    same_shape(xt, dy, "x", "dy")?;
    let (xd, gd) = (f32_of(xt, "x")?, f32_of(dy, "dy")?);
    let mut out = pool::buffer(xd.len());
    for_chunks(
        &mut out,
        xd,
        #[inline(always)]
        |start, o, x| gelu_grad_into(x, &gd[start..start + o.len()], o),
    );
    Ok(Tensor::f32(xt.shape.clone(), out))
}

pub(crate) fn same_shape(a: &Tensor, b: &Tensor, ra: &str, rb: &str) -> Result<(), KernelError> {
    if a.shape != b.shape {
        return Err(invalid(format!(
            "{ra} {} and {rb} {} must have the same shape",
            show_shape(&a.shape),
            show_shape(&b.shape)
        )));
    }
    Ok(())
}

/// Numpy-broadcasting binary op on two f32 or two i64 tensors.
pub fn binary(x: &[&Tensor], op: BinaryOp) -> Result<Tensor, KernelError> {
    let [a, b] = operands(x, ["lhs", "rhs"])?;
    let shape = broadcast_shape(&a.shape, &b.shape).ok_or_else(|| {
        invalid(format!("lhs {} and rhs {} do not broadcast", show_shape(&a.shape), show_shape(&b.shape)))
    })?;
    let data = match (&a.data, &b.data) {
        (Data::F32(u), Data::F32(v)) => Data::F32(match op {
            BinaryOp::Add => zip(u, &a.shape, v, &b.shape, &shape, |x, y| x + y),
            BinaryOp::Sub => zip(u, &a.shape, v, &b.shape, &shape, |x, y| x - y),
            BinaryOp::Mul => zip(u, &a.shape, v, &b.shape, &shape, |x, y| x * y),
            BinaryOp::Div => zip(u, &a.shape, v, &b.shape, &shape, |x, y| x / y),
            // torch.maximum / minimum propagate NaN.
            BinaryOp::Max => zip(u, &a.shape, v, &b.shape, &shape, max_nan),
            BinaryOp::Min => zip(u, &a.shape, v, &b.shape, &shape, min_nan),
        }),
        (Data::I64(u), Data::I64(v)) => Data::I64(match op {
            BinaryOp::Add => zip(u, &a.shape, v, &b.shape, &shape, i64::wrapping_add),
            BinaryOp::Sub => zip(u, &a.shape, v, &b.shape, &shape, i64::wrapping_sub),
            BinaryOp::Mul => zip(u, &a.shape, v, &b.shape, &shape, i64::wrapping_mul),
            BinaryOp::Div => {
                if v.contains(&0) {
                    return Err(invalid("integer division by zero"));
                }
                // Floor division, as torch's `//` on integers.
                zip(u, &a.shape, v, &b.shape, &shape, |x, y| {
                    let q = x.wrapping_div(y);
                    if x.wrapping_rem(y) != 0 && ((x < 0) != (y < 0)) {
                        q - 1
                    } else {
                        q
                    }
                })
            }
            BinaryOp::Max => zip(u, &a.shape, v, &b.shape, &shape, i64::max),
            BinaryOp::Min => zip(u, &a.shape, v, &b.shape, &shape, i64::min),
        }),
        _ => return Err(invalid(format!("lhs {} and rhs {} have different dtypes", a.describe(), b.describe()))),
    };
    Ok(Tensor { shape, data })
}

/// `Scale`, `AddScalar`, `PowScalar`: one f32 map each.
pub fn scale(x: &[&Tensor], factor: f64) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let f = factor as f32;
    Ok(Tensor::f32(t.shape.clone(), map_f32(f32_of(t, "input")?, |v| v * f)))
}

/// `DivCount { count }`: x / count (a mean's backward).
pub fn div_scalar(x: &[&Tensor], divisor: f64) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let d = divisor as f32;
    Ok(Tensor::f32(t.shape.clone(), map_f32(f32_of(t, "input")?, |v| v / d)))
}

pub fn add_scalar(x: &[&Tensor], value: f64) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let c = value as f32;
    Ok(Tensor::f32(t.shape.clone(), map_f32(f32_of(t, "input")?, |v| v + c)))
}

pub fn pow_scalar(x: &[&Tensor], exponent: f64) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let out = chunked(
        f32_of(t, "input")?,
        #[inline(always)]
        |x, o| pow_into(exponent, x, o),
    );
    Ok(Tensor::f32(t.shape.clone(), out))
}

/// `v` rounded to the nearest bf16 (ties to even), held as f32: bitwise
/// `half::bf16::from_f32(v).to_f32()`, a NaN staying NaN (quiet, its sign
/// and high payload kept), overflow going to infinity. Branch-free, so the
/// slice loops that call it vectorise.
#[inline(always)]
pub fn round_bf16(v: f32) -> f32 {
    let b = v.to_bits();
    // Adding 0x7FFF (+1 when the kept part is odd) carries into the kept
    // half exactly when the dropped half is above the tie, or at it and odd.
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
    let nan = (b | 0x0040_0000) & 0xFFFF_0000;
    f32::from_bits(if v.is_nan() { nan } else { rounded })
}

/// In place: every element rounded to bf16 (`round_bf16`), in parallel for
/// large slices. How the CPU stores a bf16 value: f32 numbers that bf16 holds.
pub fn round_to_bf16(x: &mut [f32]) {
    let body = |x: &mut [f32]| {
        vectorized(
            #[inline(always)]
            || x.iter_mut().for_each(|v| *v = round_bf16(*v)),
        )
    };
    if x.len() >= PAR_MIN {
        x.par_chunks_mut(PAR_CHUNK).for_each(body);
    } else {
        body(x);
    }
}

/// `Cast`: f32 <-> i64 with Rust's `as` (truncation toward zero, saturating);
/// to bf16 rounded to nearest even (bf16 is held as f32 numbers bf16 can
/// hold); to f32 or f16 a copy (f16 is not rounded: no plan computes in it).
pub fn cast(x: &[&Tensor], dtype: DType) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let mut data = match (&t.data, stored_as_f32(dtype)) {
        (Data::F32(v), true) => Data::F32(super::pool::copy(v)),
        (Data::F32(v), false) => Data::I64(v.iter().map(|&x| x as i64).collect()),
        (Data::I64(v), true) => Data::F32(v.iter().map(|&x| x as f32).collect()),
        (Data::I64(v), false) => Data::I64(v.clone()),
    };
    if let (Data::F32(v), DType::BF16) = (&mut data, dtype) {
        round_to_bf16(v);
    }
    Ok(Tensor { shape: t.shape.clone(), data })
}

#[cfg(test)]
mod tests {
    use super::{round_bf16, round_to_bf16};

    /// half's conversion, the definition `round_bf16` must match bit for bit.
    fn half_round(v: f32) -> f32 {
        half::bf16::from_f32(v).to_f32()
    }

    #[test]
    fn round_bf16_is_halfs_conversion_bit_for_bit() {
        // Every sign, exponent and kept mantissa (the high 16 bits), each
        // with the dropped halves that decide rounding: zero, just above
        // zero, just below, at and just above the tie, the largest, and
        // scattered others.
        let lows = [0u32, 1, 0x3FFF, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF, 0x1234, 0x9ABC];
        let mut checked = 0;
        for hi in 0..=0xFFFFu32 {
            for &lo in &lows {
                let v = f32::from_bits(hi << 16 | lo);
                let (got, want) = (round_bf16(v), half_round(v));
                assert_eq!(got.to_bits(), want.to_bits(), "{v:e} ({:#010x})", v.to_bits());
                checked += 1;
            }
        }
        assert_eq!(checked, 65536 * lows.len());
    }

    #[test]
    fn the_slice_rounding_rounds_every_element_serial_and_parallel() {
        for n in [7usize, super::PAR_MIN + 3] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3183).sin() * 1e3 + 1.0 / (i as f32 + 1.0)).collect();
            let mut y = x.clone();
            round_to_bf16(&mut y);
            for (a, b) in x.iter().zip(&y) {
                assert_eq!(b.to_bits(), half_round(*a).to_bits(), "{a}");
            }
            assert!(x.iter().zip(&y).any(|(a, b)| a != b), "some value must have moved");
        }
    }
}
