//! Matrix products with a prologue (GELU or layer norm of an operand) or an
//! epilogue (GELU's gradient), made by the compiler's `fuse-into-matmul`
//! pass. On the CPU the transformed operand is computed into a pooled
//! scratch buffer that dies with the kernel (a GPU kernel applies it in
//! registers as it loads tiles); the epilogue scales the product in place
//! while it is hot.

use super::elementwise::{same_shape, scale_by_gelu_grad, unary};
use super::kernel::{f32_of, operands, Ctx};
use super::matmul::{linear, matmul};
use super::norm::layer_norm;
use super::pool;
use crate::error::KernelError;
use crate::tensor::{Data, Tensor};
use tessera_plan::UnaryOp;

/// `[..., K]` as `[product of the leading dims, K]` (the fused products read
/// their right operand as rows).
fn rows_of(shape: &[usize]) -> Vec<usize> {
    match shape.split_last() {
        Some((&k, lead)) => vec![lead.iter().product(), k],
        None => vec![1, 1],
    }
}

/// Rounds a transformed operand to bf16 when the product reads bf16 (`ctx`
/// bit `operand`): the GPU writes it in the GEMM's input dtype, as
/// PyTorch's autocast casts a linear layer's input.
fn as_product_input(mut t: Tensor, ctx: &Ctx, operand: u32) -> Tensor {
    if ctx.bf16_operands & (1 << operand) != 0 {
        if let Data::F32(v) = &mut t.data {
            super::elementwise::round_to_bf16(v);
        }
    }
    t
}

/// `GeluLinear (z, w, b?)`: linear(gelu(z), w, b).
pub fn gelu_linear(x: &[&Tensor], ctx: &Ctx) -> Result<Tensor, KernelError> {
    let Some((z, rest)) = x.split_first() else {
        return linear(x);
    };
    let h = as_product_input(unary(&[z], UnaryOp::Gelu)?, ctx, 1);
    let mut args: Vec<&Tensor> = vec![&h];
    args.extend_from_slice(rest);
    let y = linear(&args);
    pool::recycle(h);
    y
}

/// `LinearResidual (x, w, b, r)`: linear(x, w, b) + r (GELU of x first
/// with `gelu`), in f32: the unfused product and add, bit for bit, except
/// that the product is not rounded to the operands' bf16 (it never is
/// stored). (The GPU's GEMM sums (x w^T + r) + b, its C before its bias
/// epilogue: a last-bit difference.)
pub fn linear_residual(x: &[&Tensor], gelu: bool, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [xt, w, b, r] = operands(x, ["x", "weight", "bias", "residual"])?;
    let y = if gelu { gelu_linear(&[xt, w, b], ctx)? } else { linear(&[xt, w, b])? };
    plus(y, r, "the residual")
}

/// `Matmul (a, b, c)`: a @ b + c in f32, rounded once where stored (the
/// unfused product and add, bit for bit, except that the product is not
/// rounded to a bf16 result type first: it is never stored).
pub fn matmul_add(a: &Tensor, b: &Tensor, c: &Tensor, ta: bool, tb: bool) -> Result<Tensor, KernelError> {
    plus(matmul(&[a, b], ta, tb)?, c, "the addend")
}

/// A product's f32 result `y` plus `c` (`what`, of y's shape), element by
/// element: what a GEMM reading c as its C computes.
fn plus(mut y: Tensor, c: &Tensor, what: &str) -> Result<Tensor, KernelError> {
    same_shape(&y, c, "the product", what)?;
    let cd = f32_of(c, what)?;
    if let Data::F32(v) = &mut y.data {
        v.iter_mut().zip(cd).for_each(|(o, &cv)| *o += cv);
    }
    Ok(y)
}

/// `MatmulGeluRhs (a, b)`: a @ gelu(b), either read transposed.
pub fn matmul_gelu_rhs(x: &[&Tensor], ta: bool, tb: bool, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [a, b] = operands(x, ["a", "b"])?;
    let mut h = as_product_input(unary(&[b], UnaryOp::Gelu)?, ctx, 0);
    h.shape = rows_of(&h.shape);
    let y = matmul(&[a, &h], ta, tb);
    pool::recycle(h);
    y
}

/// `LayerNormLinear (x, g, b, w, bias?)`: linear(layer_norm(x, g, b), w, bias).
pub fn layer_norm_linear(x: &[&Tensor], eps: f64, ctx: &Ctx) -> Result<Tensor, KernelError> {
    if x.len() < 4 {
        return Err(crate::error::invalid(format!(
            "expects 4 or 5 operands (x, ln weight, ln bias, weight, bias?), got {}",
            x.len()
        )));
    }
    let normed = as_product_input(layer_norm(&x[..3], eps)?, ctx, 3);
    let mut args: Vec<&Tensor> = vec![&normed];
    args.extend_from_slice(&x[3..]);
    let y = linear(&args);
    pool::recycle(normed);
    y
}

/// `MatmulLayerNormRhs (a, x, g, b)`: a @ layer_norm(x, g, b), either read transposed.
pub fn matmul_layer_norm_rhs(x: &[&Tensor], eps: f64, ta: bool, tb: bool, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [a, xi, g, b] = operands(x, ["a", "x", "ln weight", "ln bias"])?;
    let mut normed = as_product_input(layer_norm(&[xi, g, b], eps)?, ctx, 0);
    normed.shape = rows_of(&normed.shape);
    let y = matmul(&[a, &normed], ta, tb);
    pool::recycle(normed);
    y
}

/// `MatmulGeluGrad (a, b, z)`: (a @ b) * GELU'(z). A bf16 result is the
/// bf16 product times GELU'(z), rounded: the GPU's GEMM writes the product
/// in the result's dtype and scales it in place (PyTorch's autocast takes
/// the bf16 product into GELU's backward alike).
pub fn matmul_gelu_grad(x: &[&Tensor], ta: bool, tb: bool, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [a, b, z] = operands(x, ["a", "b", "z"])?;
    let mut y = matmul(&[a, b], ta, tb)?;
    same_shape(&y, z, "a @ b", "z")?;
    let zd = f32_of(z, "z")?;
    let Data::F32(out) = &mut y.data else { unreachable!("matmul makes f32") };
    if ctx.bf16_result {
        super::elementwise::round_to_bf16(out);
    }
    scale_by_gelu_grad(zd, out);
    Ok(y)
}
