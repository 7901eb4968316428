//! Matrix products with an elementwise prologue or epilogue (made by the
//! compiler's `fuse-gelu-matmul` pass). On the CPU the GELU'd operand is
//! computed into a pooled scratch buffer that dies with the kernel (a GPU
//! kernel applies it in registers as it loads tiles); the GELU-gradient
//! epilogue scales the product in place while it is hot.

use super::elementwise::{same_shape, scale_by_gelu_grad, unary};
use super::error::KernelError;
use super::kernel::{f32_of, operands};
use super::matmul::{linear, matmul};
use super::pool;
use super::tensor::{Data, Tensor};
use tessera_compiler::ir::UnaryOp;

/// `GeluLinear (z, w, b?)`: linear(gelu(z), w, b).
pub fn gelu_linear(x: &[&Tensor]) -> Result<Tensor, KernelError> {
    let Some((z, rest)) = x.split_first() else {
        return linear(x);
    };
    let h = unary(&[z], UnaryOp::Gelu)?;
    let mut args: Vec<&Tensor> = vec![&h];
    args.extend_from_slice(rest);
    let y = linear(&args);
    pool::recycle(h);
    y
}

/// `MatmulGeluRhs (a, b)`: a @ gelu(b), either read transposed.
pub fn matmul_gelu_rhs(x: &[&Tensor], ta: bool, tb: bool) -> Result<Tensor, KernelError> {
    let [a, b] = operands(x, ["a", "b"])?;
    let h = unary(&[b], UnaryOp::Gelu)?;
    let y = matmul(&[a, &h], ta, tb);
    pool::recycle(h);
    y
}

/// `MatmulGeluGrad (a, b, z)`: (a @ b) * GELU'(z).
pub fn matmul_gelu_grad(x: &[&Tensor], ta: bool, tb: bool) -> Result<Tensor, KernelError> {
    let [a, b, z] = operands(x, ["a", "b", "z"])?;
    let mut y = matmul(&[a, b], ta, tb)?;
    same_shape(&y, z, "a @ b", "z")?;
    let zd = f32_of(z, "z")?;
    let Data::F32(out) = &mut y.data else { unreachable!("matmul makes f32") };
    scale_by_gelu_grad(zd, out);
    Ok(y)
}
