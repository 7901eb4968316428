//! What every kernel shares: the run context, operand checks, and the
//! thresholds above which work is split across the rayon pool.

use super::random::DropMask;
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, Tensor};

/// Per-run facts a kernel may need: train/eval mode and the random stream keys.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub training: bool,
    pub seed: u64,
    pub step: u64,
    /// Bit i: operand i has the plan type bf16 (its values are bf16
    /// numbers). The fused products round their transformed operand to
    /// the product's input dtype, as the GPU writes it (and PyTorch's
    /// autocast casts it) before the GEMM.
    pub bf16_operands: u32,
    /// The result has the plan type bf16.
    pub bf16_result: bool,
}

impl Ctx {
    /// The dropout mask of op `key` with drop probability `p`, or `None` when
    /// dropout is the identity (eval mode, or p == 0).
    pub fn drop_mask(&self, p: f64, key: u32) -> Result<Option<DropMask>, KernelError> {
        if !(0.0..1.0).contains(&p) {
            return Err(invalid(format!("drop probability {p} must be in [0, 1)")));
        }
        if !self.training || p == 0.0 {
            return Ok(None);
        }
        Ok(Some(DropMask::new(self.seed, self.step, key, p)))
    }
}

/// Element counts from which elementwise work goes parallel (below it, the
/// split costs more than it saves).
pub const PAR_MIN: usize = 1 << 15;
/// Elements per parallel task of elementwise work.
pub const PAR_CHUNK: usize = 1 << 13;

/// Exactly `N` operands, named by role in the error.
pub fn operands<'a, const N: usize>(x: &[&'a Tensor], roles: [&str; N]) -> Result<[&'a Tensor; N], KernelError> {
    <[&Tensor; N]>::try_from(x)
        .map_err(|_| invalid(format!("expects {N} operand(s) ({}), got {}", roles.join(", "), x.len())))
}

/// The f32 data of operand `role`.
pub fn f32_of<'a>(t: &'a Tensor, role: &str) -> Result<&'a [f32], KernelError> {
    t.as_f32().ok_or_else(|| invalid(format!("{role} must be a float tensor, got {}", t.describe())))
}

/// The i64 data of operand `role`.
pub fn i64_of<'a>(t: &'a Tensor, role: &str) -> Result<&'a [i64], KernelError> {
    t.as_i64().ok_or_else(|| invalid(format!("{role} must be an i64 tensor, got {}", t.describe())))
}

/// Requires `t.shape == shape`.
pub fn expect_shape(t: &Tensor, role: &str, shape: &[usize]) -> Result<(), KernelError> {
    if t.shape != shape {
        return Err(invalid(format!("{role} must be {}, got {}", show_shape(shape), show_shape(&t.shape))));
    }
    Ok(())
}

/// Requires `axis < rank`.
pub fn check_axis(axis: usize, t: &Tensor) -> Result<(), KernelError> {
    if axis >= t.rank() {
        return Err(invalid(format!("axis {axis} is out of range for input {}", show_shape(&t.shape))));
    }
    Ok(())
}

/// `(outer, n, inner)`: the sizes before, at and after `axis`.
pub fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}
