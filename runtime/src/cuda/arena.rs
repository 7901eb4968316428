//! The memory plan, executed: one device allocation laid out as the plan's
//! regions (parameters, gradients, optimizer state, buffers, inputs), its
//! arena and its workspace, in that order, so that the allocation is the
//! planned peak exactly. Every value's address is its region's base plus
//! its planned offset; scalar constants (fills the memory plan folds into
//! their readers) live in a small table of the executor's, written once.
//!
//! Invariant: nothing is allocated per step; `address` is total over the
//! values a kernel reads or writes.

use super::device::DevPtr;
use tessera_plan::memory::{align, MemoryPlan, Region};
use tessera_plan::{Plan, Source};

/// Where the regions start inside the one allocation, in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub params: u64,
    pub grads: u64,
    pub optimizer_state: u64,
    pub buffers: u64,
    pub inputs: u64,
    pub arena: u64,
    pub workspace: u64,
    /// The allocation's size: the memory plan's peak.
    pub total: u64,
}

impl Layout {
    pub fn of(m: &MemoryPlan) -> Layout {
        let p = &m.parts;
        let mut at = 0;
        let mut next = |bytes: u64| {
            let here = at;
            at += align(bytes);
            here
        };
        let params = next(p.parameters);
        let grads = next(p.gradients);
        let optimizer_state = next(p.optimizer_state);
        let buffers = next(p.buffers);
        let inputs = next(p.inputs);
        let arena = next(m.arena_bytes);
        let workspace = next(p.workspace);
        Layout { params, grads, optimizer_state, buffers, inputs, arena, workspace, total: at }
    }

    pub fn region(&self, r: Region) -> Option<u64> {
        match r {
            Region::Params => Some(self.params),
            Region::Grads => Some(self.grads),
            Region::OptimizerState => Some(self.optimizer_state),
            Region::Buffers => Some(self.buffers),
            Region::Inputs => Some(self.inputs),
            Region::Arena => Some(self.arena),
            Region::Inline => None,
        }
    }
}

/// The device address of every value (`None`: stored nowhere, a
/// multi-tensor kernel's packed result), given the allocation's base and the
/// address of each scalar fill in the constant table.
pub fn addresses(plan: &Plan, m: &MemoryPlan, base: DevPtr, constants: &[(usize, DevPtr)]) -> Vec<Option<DevPtr>> {
    let layout = Layout::of(m);
    let mut addr: Vec<Option<DevPtr>> = m
        .placements
        .iter()
        .map(|p| layout.region(p.region).map(|r| base.add(r + p.offset)))
        .collect();
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

/// The scalar fills the memory plan places nowhere (folded into readers):
/// the executor keeps them in its constant table.
pub fn inline_constants(plan: &Plan, m: &MemoryPlan) -> Vec<usize> {
    plan.values
        .iter()
        .enumerate()
        .filter(|(v, value)| matches!(value.source, Source::Fill { .. }) && m.placements[*v].region == Region::Inline)
        .map(|(v, _)| v)
        .collect()
}
