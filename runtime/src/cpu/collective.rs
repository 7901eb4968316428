//! Collectives. With `world == 1` all-gather, all-reduce and all-gather's
//! gradient are identities; with more ranks they run through the run's
//! collective (`Ctx::dist`), which must span exactly the plan's world.

use super::kernel::{f32_of, operands, Ctx};
use crate::dist::{Collective, Reduction};
use crate::error::{invalid, KernelError};
use crate::tensor::Tensor;
use tessera_plan::ReduceOp;

/// The collective for an op over `world` ranks: `None` for one rank; an
/// error when the run has no collective or one of another size.
pub fn comm<'a>(ctx: &Ctx<'a>, op: &'static str, world: u64) -> Result<Option<&'a dyn Collective>, KernelError> {
    match (world, ctx.dist) {
        (0, _) => Err(invalid("world size must be at least 1")),
        (1, _) => Ok(None),
        (_, None) => Err(KernelError::NeedsCollectives { op, world }),
        (_, Some(d)) if d.comm.world() as u64 == world => Ok(Some(d.comm)),
        (_, Some(d)) => Err(invalid(format!(
            "{op}: the plan was compiled for {world} ranks, but this run has {} (DISTRIBUTED.NUM_NODES x NUM_PROC_PER_NODE)",
            d.comm.world()
        ))),
    }
}

fn failed(e: crate::dist::DistError) -> KernelError {
    KernelError::Collective(e.to_string())
}

/// `AllGather`: every rank's tensor concatenated along axis 0, in rank order.
pub fn all_gather(x: &[&Tensor], world: u64, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let Some(comm) = comm(ctx, "all_gather", world)? else { return Ok(super::pool::pooled_clone(t)) };
    let data = comm.all_gather_f32(f32_of(t, "input")?).map_err(failed)?;
    let mut shape = t.shape.clone();
    shape[0] *= world as usize;
    Ok(Tensor::f32(shape, data))
}

/// `AllGatherGrad`: the gradient of `AllGather` (VISSL's GatherLayer
/// backward, reference 4.3): every rank's gradient of the gathered tensor,
/// summed, and this rank's block of it.
pub fn all_gather_grad(x: &[&Tensor], world: u64, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["dy"])?;
    let Some(comm) = comm(ctx, "all_gather_grad", world)? else { return Ok(super::pool::pooled_clone(t)) };
    let mine = comm.reduce_scatter_f32(f32_of(t, "dy")?).map_err(failed)?;
    let mut shape = t.shape.clone();
    shape[0] /= world as usize;
    Ok(Tensor::f32(shape, mine))
}

/// `AllReduce`: element-wise sum, mean or max over the ranks.
pub fn all_reduce(x: &[&Tensor], op: ReduceOp, world: u64, ctx: &Ctx) -> Result<Tensor, KernelError> {
    let [t] = operands(x, ["input"])?;
    let Some(comm) = comm(ctx, "all_reduce", world)? else { return Ok(super::pool::pooled_clone(t)) };
    let mut data = super::pool::copy(f32_of(t, "input")?);
    let op = match op {
        ReduceOp::Sum => Reduction::Sum,
        ReduceOp::Mean => Reduction::Mean,
        ReduceOp::Max => Reduction::Max,
    };
    comm.all_reduce_f32(&mut data, op).map_err(failed)?;
    Ok(Tensor::f32(t.shape.clone(), data))
}
