//! What every kernel shares: the run context, operand checks, and the
//! thresholds above which work is split across the rayon pool.

use super::random::{DropMask, RowMap};
use crate::dist::Collective;
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, Tensor};

/// Per-run facts a kernel may need: train/eval mode, the random stream
/// keys, and this process's place in a data-parallel run.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
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
    /// The collective of a run of several processes (`None`: one process).
    pub dist: Option<Dist<'a>>,
}

/// A data-parallel run as a kernel sees it.
#[derive(Clone, Copy)]
pub struct Dist<'a> {
    pub comm: &'a dyn Collective,
    /// The plan's batch per process.
    pub batch: u64,
    /// Batch norm statistics over groups of this many ranks (0: local).
    pub sync_batch_norm: u64,
}

impl Dist<'_> {
    /// Sums `v` over this rank's batch-norm group (consecutive ranks):
    /// each group's values go in its own slot of one all-reduce, so every
    /// rank of a group gets bitwise the same sums.
    pub fn group_sum(&self, v: &mut [f64]) -> Result<(), KernelError> {
        let group = self.sync_batch_norm as usize;
        let slots = self.comm.world() / group;
        let mine = self.comm.rank() / group;
        let mut all = vec![0f64; slots * v.len()];
        all[mine * v.len()..][..v.len()].copy_from_slice(v);
        self.comm
            .all_reduce_f64(&mut all, crate::dist::Reduction::Sum)
            .map_err(|e| KernelError::Collective(format!("synchronised batch norm: {e}")))?;
        v.copy_from_slice(&all[mine * v.len()..][..v.len()]);
        Ok(())
    }
}

impl<'a> Ctx<'a> {
    /// The group batch norm statistics are reduced over, if any.
    pub fn sync_batch_norm(&self) -> Option<Dist<'a>> {
        self.dist.filter(|d| d.sync_batch_norm > 1 && self.training)
    }

    /// One process's context.
    pub fn single(training: bool, seed: u64, step: u64) -> Ctx<'static> {
        Ctx { training, seed, step, bf16_operands: 0, bf16_result: false, dist: None }
    }

    /// The dropout mask of op `key` with drop probability `p`, or `None` when
    /// dropout is the identity (eval mode, or p == 0), for a tensor of
    /// `rows` rows (axis 0) of `row_len` mask indices each.
    ///
    /// With several processes a row of the local batch draws the mask the
    /// same sample draws in one process with the whole global batch: the
    /// sampler gives rank r the samples r, r + W, r + 2W, ... of the global
    /// batch, so local row i of each batch-sized block is global row
    /// i * W + r (the rank term of the random streams).
    pub fn drop_mask(&self, p: f64, key: u32, rows: usize, row_len: usize) -> Result<Option<DropMask>, KernelError> {
        if !(0.0..1.0).contains(&p) {
            return Err(invalid(format!("drop probability {p} must be in [0, 1)")));
        }
        if !self.training || p == 0.0 {
            return Ok(None);
        }
        let mask = DropMask::new(self.seed, self.step, key, p);
        Ok(Some(match self.dist {
            Some(d) if d.comm.world() > 1 && d.batch > 0 && rows as u64 % d.batch == 0 => mask.sharded(RowMap {
                block: d.batch,
                world: d.comm.world() as u64,
                rank: d.comm.rank() as u64,
                row_len: row_len.max(1) as u64,
            }),
            _ => mask,
        }))
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
