//! Collectives. This executor runs one rank: with `world == 1` all-gather,
//! all-reduce and all-gather's gradient are identities; a plan for more ranks
//! needs a collective backend, which is reported as such.

use super::kernel::operands;
use crate::error::{invalid, KernelError};
use crate::tensor::Tensor;

/// Fails unless `world == 1`.
pub fn single_rank(op: &'static str, world: u64) -> Result<(), KernelError> {
    match world {
        1 => Ok(()),
        0 => Err(invalid("world size must be at least 1")),
        _ => Err(KernelError::NeedsCollectives { op, world }),
    }
}

/// `AllGather`, `AllReduce` and `AllGatherGrad` on one rank: the input itself.
pub fn identity_on_one_rank(x: &[&Tensor], op: &'static str, world: u64) -> Result<Tensor, KernelError> {
    single_rank(op, world)?;
    let [t] = operands(x, ["input"])?;
    Ok(super::pool::pooled_clone(t))
}
