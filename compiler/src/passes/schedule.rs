//! Memory-aware scheduling: a topological order of the step chosen to keep
//! fewer bytes alive, since the lowered plan runs kernels in node order.
//! List scheduling: among the ops whose operands are ready, an op that frees
//! more bytes than it allocates (operands it reads for the last time, minus
//! its own result) runs first, the most freeing first; otherwise the
//! earliest op of the current order runs. No allocation ever moves earlier
//! (a greedy "smallest allocation first" pulls backward-pass recomputations
//! into the forward pass and raises the peak). Why: in the backward
//! pass, finishing a gradient (and freeing what it read) before starting
//! the next branch lowers the peak; `tessera plan --memory` reports the peak
//! with and without this pass.

use super::mapped;
use crate::ir::{Graph, IrError, Op, ValueId};
use std::collections::{HashMap, HashSet};

fn bytes(g: &Graph, v: ValueId) -> i64 {
    // A symbolic batch counts as 1: the order does not depend on it.
    let n = g.ty(v).shape.numel(1) as i64;
    n * g.ty(v).dtype.size_bytes() as i64
}

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let order = g.topo_order()?;
    let pos: HashMap<ValueId, usize> = order.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let pinned: HashSet<ValueId> = g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect();
    // Reader counts (with multiplicity: an op reading a value twice frees it once).
    let mut readers: HashMap<ValueId, usize> = HashMap::new();
    let mut waiting: HashMap<ValueId, usize> = HashMap::new();
    for &v in &order {
        let ops: HashSet<ValueId> = g.operands(v).into_iter().collect();
        waiting.insert(v, ops.len());
        for o in ops {
            *readers.entry(o).or_insert(0) += 1;
        }
    }
    // Storage the op allocates: views and leaves allocate nothing.
    let allocates = |v: ValueId| -> i64 {
        match g.node(v).op {
            Op::Reshape { .. } | Op::StopGradient => 0,
            ref op if op.is_leaf() => 0,
            _ => bytes(g, v),
        }
    };
    let frees = |v: ValueId, readers: &HashMap<ValueId, usize>| -> i64 {
        let ops: HashSet<ValueId> = g.operands(v).into_iter().collect();
        ops.into_iter()
            .filter(|o| readers[o] == 1 && !pinned.contains(o) && !g.node(*o).op.is_leaf())
            .map(|o| bytes(g, o))
            .sum()
    };
    // Leaves first, in order (they cost nothing); then the best net freer.
    let mut scheduled: Vec<ValueId> = Vec::with_capacity(order.len());
    let mut ready: Vec<ValueId> = Vec::new();
    let mut release = |v: ValueId, ready: &mut Vec<ValueId>, readers: &mut HashMap<ValueId, usize>| {
        for o in g.operands(v).into_iter().collect::<HashSet<_>>() {
            *readers.get_mut(&o).expect("counted") -= 1;
        }
        for u in g.users(v) {
            let w = waiting.get_mut(&u).expect("counted");
            *w -= 1;
            if *w == 0 {
                ready.push(u);
            }
        }
    };
    for &v in order.iter().filter(|&&v| g.node(v).op.is_leaf()) {
        scheduled.push(v);
        release(v, &mut ready, &mut readers);
    }
    while !ready.is_empty() {
        // An op that frees more than it allocates runs first (most first);
        // otherwise the current order holds, so no allocation moves earlier.
        let net = |v: ValueId| allocates(v) - frees(v, &readers);
        let best = ready
            .iter()
            .enumerate()
            .min_by_key(|&(_, &v)| {
                let n = net(v);
                if n < 0 {
                    (0, n, pos[&v])
                } else {
                    (1, 0, pos[&v])
                }
            })
            .map(|(i, _)| i)
            .expect("ready is not empty");
        let v = ready.swap_remove(best);
        scheduled.push(v);
        release(v, &mut ready, &mut readers);
    }
    if scheduled.len() != order.len() {
        return Err(IrError::Invalid("scheduling left ops unscheduled (a cycle?)".into()));
    }
    // Reorder only for a clear gain (1% of the live-bytes peak at batch 1):
    // the estimate ignores in-place results and the arena's packing.
    let (before, after) = (live_peak(g, &order), live_peak(g, &scheduled));
    if after * 100 >= before * 99 {
        return Ok("kept the current order (scheduling would not lower its live-bytes peak by 1%)".into());
    }
    let ops = |o: &[ValueId]| o.iter().copied().filter(|&v| !g.node(v).op.is_leaf()).collect::<Vec<_>>();
    let moved = ops(&scheduled).iter().zip(&ops(&order)).filter(|(a, b)| a != b).count();
    *g = in_order(g, &scheduled)?;
    Ok(format!(
        "{moved} of {} ops moved; live-bytes peak at batch 1 {} -> {}",
        order.len(),
        crate::memory::human_bytes(before as u64),
        crate::memory::human_bytes(after as u64)
    ))
}

/// The largest sum of bytes of op results alive at one point of `order`
/// (batch 1; results live from their op to their last reader; views,
/// leaves and named results excluded: they are the same in every order).
fn live_peak(g: &Graph, order: &[ValueId]) -> i64 {
    let pos: HashMap<ValueId, usize> = order.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let mut delta = vec![0i64; order.len() + 1];
    for &v in order {
        let node = g.node(v);
        if node.op.is_leaf() || matches!(node.op, Op::Reshape { .. } | Op::StopGradient) {
            continue;
        }
        let last = g.users(v).iter().map(|u| pos[u]).max().unwrap_or(pos[&v]);
        delta[pos[&v]] += bytes(g, v);
        delta[last + 1] -= bytes(g, v);
    }
    let (mut live, mut peak) = (0, 0);
    for d in delta {
        live += d;
        peak = peak.max(live);
    }
    peak
}

/// `g` rebuilt with its nodes created in `order` (a topological order).
pub(crate) fn in_order(g: &Graph, order: &[ValueId]) -> Result<Graph, IrError> {
    let mut new = Graph::new();
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    for &v in order {
        let operands = mapped(g, v, &map)?;
        map.insert(v, new.add_node_like(g.node(v), &operands)?);
    }
    for (name, v) in g.outputs() {
        new.set_output(name, map[v]);
    }
    for (name, v) in g.state_updates() {
        new.add_state_update(name, map[v]);
    }
    Ok(new)
}

/// `g` in petgraph's plain topological order (depth-first, no regard for
/// memory): the baseline that `tessera plan --memory` compares against.
pub fn plain_topological(g: &Graph) -> Result<Graph, IrError> {
    let order = petgraph::algo::toposort(g.petgraph(), None)
        .map_err(|c| IrError::Invalid(format!("the graph has a cycle through node {}", c.node_id().index())))?;
    in_order(g, &order)
}
