//! The memory plan, executed on a device: one allocation laid out by
//! `memory_layout::Layout` (regions, arena, workspace, in that order), so
//! that the allocation is the planned peak exactly. Every value's address is
//! the allocation's base plus its offset there; scalar constants (fills the
//! memory plan folds into their readers) live in a small table of the
//! executor's, written once.
//!
//! Invariant: nothing is allocated per step; `address` is total over the
//! values a kernel reads or writes.

use super::device::DevPtr;
pub use crate::memory_layout::{inline_constants, Layout};
use tessera_plan::memory::MemoryPlan;
use tessera_plan::Plan;

/// The device address of every value (`None`: stored nowhere, a
/// multi-tensor kernel's packed result), given the allocation's base and the
/// address of each scalar fill in the constant table.
pub fn addresses(plan: &Plan, m: &MemoryPlan, base: DevPtr, constants: &[(usize, DevPtr)]) -> Vec<Option<DevPtr>> {
    let mut addr: Vec<Option<DevPtr>> =
        crate::memory_layout::offsets(m).into_iter().map(|o| o.map(|o| base.add(o))).collect();
    for &(v, p) in constants {
        addr[v] = Some(p);
    }
    // A value of zero bytes still gets an address (never read).
    for (v, a) in addr.iter_mut().enumerate() {
        if a.is_none() && plan.values[v].numel() == 0 {
            *a = Some(base);
        }
    }
    addr
}
