//! Memory planning of a lowered plan: where every value lives, how much the
//! step needs at its peak, and what that peak is made of.
//!
//! Storage kinds: parameters, gradients (`grad.*` outputs), optimizer state
//! (`optim.*` buffers), other buffers and inputs each get one contiguous
//! region (a flat optimizer kernel or an all-reduce bucket reads them as one
//! buffer); every other value is a transient in one arena.
//! - Lifetimes are kernel intervals [producer, last reader] (named outputs
//!   live to the end of the step).
//! - A reshape or stop_gradient aliases its operand (no storage of its own),
//!   except when its result lives in another region (a gradient made by a
//!   reshape): then placements differ and a backend copies.
//! - A gradient all-reduce of a data-parallel step is in place in the
//!   gradient region: the backward writes the gradient there.
//! - An elementwise kernel whose operand dies there, with the same byte size,
//!   writes in place over it; a state update writes over its state when no
//!   later kernel reads the old value.
//! - Arena offsets: greedy by size (largest first, each at the lowest offset
//!   free over its whole lifetime), 256-byte aligned.
//!
//! Invariant (`check`, and the property tests): two storages whose lifetimes
//! intersect never overlap in the arena, and the arena is at least the
//! largest sum of live transient bytes at any kernel (`lower_bound_bytes`).

use crate::ir::Op;
use crate::plan::{Plan, Source};
pub use tessera_plan::memory::*;

/// Union-find over values: storage shared by aliases and in-place results.
fn find(parent: &mut [usize], mut v: usize) -> usize {
    while parent[v] != v {
        parent[v] = parent[parent[v]];
        v = parent[v];
    }
    v
}

pub fn plan_memory(plan: &Plan) -> MemoryPlan {
    let n = plan.values.len();
    let bytes = |v: usize| plan.values[v].numel() * plan.values[v].dtype.size_bytes();
    let end = plan.kernels.len();
    let mut last_use: Vec<Option<usize>> = vec![None; n];
    for (k, kernel) in plan.kernels.iter().enumerate() {
        for &i in &kernel.inputs {
            last_use[i] = Some(k);
        }
    }
    let grad_values: std::collections::HashSet<usize> = plan.tables.grads.iter().map(|(_, v)| *v).collect();
    let named: std::collections::HashSet<usize> = plan.outputs.iter().map(|(_, v)| *v).collect();
    let states = plan.state_index();
    let state_of: std::collections::HashMap<usize, usize> =
        plan.state_updates.iter().filter_map(|(name, v)| states.get(name.as_str()).map(|&s| (*v, s))).collect();
    // The last kernel that reads a state's old value through any view of it
    // (a reshape or stop_gradient of a parameter shares its storage); the
    // end of the step when the state or a view is a named output.
    let mut view_of: Vec<usize> = (0..n).collect();
    let mut old_value_read = vec![0usize; n];
    for (k, kernel) in plan.kernels.iter().enumerate() {
        for &i in &kernel.inputs {
            old_value_read[view_of[i]] = old_value_read[view_of[i]].max(k);
        }
        if matches!(kernel.op, Op::Reshape { .. } | Op::StopGradient) {
            view_of[kernel.output] = view_of[kernel.inputs[0]];
        }
    }
    for v in &named {
        old_value_read[view_of[*v]] = end;
    }

    // Regions of state and inputs, contiguous, in plan order.
    let mut placements: Vec<Placement> =
        plan.values.iter().map(|_| Placement { region: Region::Inline, offset: 0, bytes: 0 }).collect();
    let mut region_size = std::collections::HashMap::<Region, u64>::new();
    let mut place = |placements: &mut Vec<Placement>, v: usize, region: Region| {
        let at = region_size.entry(region).or_insert(0);
        placements[v] = Placement { region, offset: *at, bytes: bytes(v) };
        *at += align(bytes(v));
    };
    for (v, value) in plan.values.iter().enumerate() {
        match &value.source {
            Source::Param { .. } => place(&mut placements, v, Region::Params),
            Source::Buffer { name, .. } if name.starts_with("optim.") => {
                place(&mut placements, v, Region::OptimizerState)
            }
            Source::Buffer { .. } => place(&mut placements, v, Region::Buffers),
            Source::Input { .. } => place(&mut placements, v, Region::Inputs),
            Source::Kernel(_) if grad_values.contains(&v) => place(&mut placements, v, Region::Grads),
            _ => {}
        }
    }
    // A data-parallel step's gradient all-reduce runs in place: the
    // backward writes the gradient straight into its slot of the gradient
    // region, where the all-reduce (its only reader) averages it. So the
    // slot is written by nothing else until the optimizer reads it, and a
    // backend may run the all-reduce beside the rest of the backward
    // (DDP's buckets over the flat gradients) without a copy kept alive.
    let mut readers = vec![0usize; n];
    for kernel in &plan.kernels {
        for &i in &kernel.inputs {
            readers[i] += 1;
        }
    }
    for kernel in &plan.kernels {
        let [d] = kernel.inputs[..] else { continue };
        let out = kernel.output;
        let gradient = kernel.scope == tessera_plan::GRADIENT_ALL_REDUCE_SCOPE
            && matches!(kernel.op, Op::AllReduce { .. })
            && placements[out].region == Region::Grads;
        let private = matches!(plan.values[d].source, Source::Kernel(_))
            && placements[d].region == Region::Inline
            && readers[d] == 1
            && !named.contains(&d)
            && !state_of.contains_key(&d)
            && bytes(d) == bytes(out);
        if gradient && private {
            placements[d] = placements[out].clone();
        }
    }

    // Transient storages: union-find over aliases and in-place results, with
    // each group's last reader kept up to date as members join.
    let lives_to_end: std::collections::HashSet<usize> =
        named.iter().copied().chain(plan.state_updates.iter().map(|(_, v)| *v)).collect();
    let dies = |v: usize| if lives_to_end.contains(&v) { end } else { last_use[v].unwrap_or(0) };
    let transient = |placements: &Vec<Placement>, v: usize| -> bool {
        match plan.values[v].source {
            Source::Kernel(k) if matches!(plan.kernels[k].op, Op::MultiTensor { .. }) => false,
            Source::Kernel(_) | Source::Part { .. } => placements[v].region == Region::Inline,
            Source::Fill { .. } => plan.values[v].numel() > 1,
            _ => false,
        }
    };
    let mut parent: Vec<usize> = (0..n).collect();
    let mut first = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    for v in 0..n {
        if transient(&placements, v) {
            let born = match plan.values[v].source {
                Source::Kernel(k) | Source::Part { kernel: k, .. } => k,
                // A fill is materialised for its first reader.
                _ => plan.kernels.iter().position(|kern| kern.inputs.contains(&v)).unwrap_or(end),
            };
            first[v] = born;
            last[v] = dies(v).max(born);
        }
    }
    let mut in_place = 0;
    let mut parts_of: Vec<Vec<usize>> = vec![Vec::new(); end];
    for (v, value) in plan.values.iter().enumerate() {
        if let Source::Part { kernel, .. } = value.source {
            parts_of[kernel].push(v);
        }
    }
    for (k, kernel) in plan.kernels.iter().enumerate() {
        // A part overwrites its state when nothing later reads the old value
        // and this kernel reads it only in the part's own tensor set (each
        // element is read before the same element is written).
        for &part in &parts_of[k] {
            let Some(&s) = state_of.get(&part) else { continue };
            let same = plan.values[s].shape == plan.values[part].shape && bytes(s) == bytes(part);
            if old_value_read[s] <= k && same && reads_only_in_own_set(plan, k, part, s) {
                placements[part] = placements[s].clone();
                in_place += 1;
            }
        }
        let out = kernel.output;
        // A state update overwrites its state when nothing reads the old
        // value later (through any view), and its kernel either is
        // elementwise over same-shaped values or does not read the state.
        if let Some(&s) = state_of.get(&out) {
            let same = plan.values[s].shape == plan.values[out].shape && bytes(s) == bytes(out);
            let safe_kernel = kernel.op.is_elementwise() || !kernel.inputs.contains(&s);
            if old_value_read[s] <= k && same && safe_kernel {
                placements[out] = placements[s].clone();
                in_place += 1;
                continue;
            }
        }
        let view = matches!(kernel.op, Op::Reshape { .. } | Op::StopGradient);
        if view && !transient(&placements, kernel.inputs[0]) && transient(&placements, out) {
            // A view of a parameter, input or gradient: no storage of its own.
            placements[out] = placements[kernel.inputs[0]].clone();
            continue;
        }
        if !transient(&placements, out) {
            continue;
        }
        let alias = if view {
            Some(kernel.inputs[0])
        } else if kernel.op.is_elementwise() {
            let mut found = None;
            for &i in &kernel.inputs {
                // Same shape, same element size: element i is read before it is written.
                let same = plan.values[i].shape == plan.values[out].shape && bytes(i) == bytes(out);
                if transient(&placements, i) && same {
                    let r = find(&mut parent, i);
                    if last[r] <= k {
                        found = Some(i);
                        break;
                    }
                }
            }
            found
        } else {
            None
        };
        if let Some(i) = alias {
            let r = find(&mut parent, i);
            parent[out] = r;
            first[r] = first[r].min(first[out]);
            last[r] = last[r].max(last[out]);
            if !view {
                in_place += 1;
            }
        }
    }
    let loss_kernel =
        plan.outputs.iter().find(|(name, _)| name == "loss").and_then(|(_, v)| match plan.values[*v].source {
            Source::Kernel(k) => Some(k),
            _ => None,
        });
    let mut size = vec![0u64; n];
    for v in 0..n {
        if transient(&placements, v) {
            let r = find(&mut parent, v);
            size[r] = size[r].max(bytes(v));
        }
    }
    let mut blocks: Vec<Block> = Vec::new();
    let mut block_of = vec![usize::MAX; n];
    for v in 0..n {
        if transient(&placements, v) && find(&mut parent, v) == v {
            let kept = loss_kernel.is_some_and(|l| first[v] < l && last[v] > l);
            block_of[v] = blocks.len();
            blocks.push(Block {
                offset: 0,
                bytes: align(size[v]),
                first: first[v],
                last: last[v],
                kept_for_backward: kept,
                value: v,
            });
        }
    }
    let arena_bytes = assign_offsets(&mut blocks);
    for v in 0..n {
        if transient(&placements, v) {
            let b = &blocks[block_of[find(&mut parent, v)]];
            placements[v] = Placement { region: Region::Arena, offset: b.offset, bytes: bytes(v) };
        }
    }
    let lower_bound_bytes = live_peak(&blocks, end);
    let kept_at_loss: u64 = blocks.iter().filter(|b| b.kept_for_backward).map(|b| b.bytes).sum();
    let region = |r: Region| region_size.get(&r).copied().unwrap_or(0);
    let parts = Parts {
        parameters: region(Region::Params),
        gradients: region(Region::Grads),
        optimizer_state: region(Region::OptimizerState),
        buffers: region(Region::Buffers),
        inputs: region(Region::Inputs),
        activations_kept: kept_at_loss.min(arena_bytes),
        transient: arena_bytes - kept_at_loss.min(arena_bytes),
        workspace: (0..end).map(|k| tessera_plan::scratch::scratch(plan, k).total()).max().unwrap_or(0),
    };
    let peak_bytes = parts.parameters
        + parts.gradients
        + parts.optimizer_state
        + parts.buffers
        + parts.inputs
        + parts.activations_kept
        + parts.transient
        + parts.workspace;
    MemoryPlan { peak_bytes, parts, arena_bytes, lower_bound_bytes, in_place, placements, blocks }
}

/// Whether multi-tensor kernel `k` reads value `s` only among the operands
/// of the tensor set whose result `part` is (sets are `arity` operands each;
/// results are packed result-major, so the part's offset modulo the total
/// element count falls in its set's range).
fn reads_only_in_own_set(plan: &Plan, k: usize, part: usize, s: usize) -> bool {
    let kernel = &plan.kernels[k];
    let Op::MultiTensor { arity, .. } = kernel.op else { return false };
    let Source::Part { offset, .. } = plan.values[part].source else { return false };
    let sets: Vec<&[usize]> = kernel.inputs.chunks(arity as usize).collect();
    let numel = |set: &[usize]| set.iter().map(|&i| plan.values[i].numel()).max().unwrap_or(0);
    let total: u64 = sets.iter().map(|set| numel(set)).sum();
    if total == 0 {
        return false;
    }
    let mut at = offset % total;
    let own = sets.iter().position(|set| {
        let n = numel(set);
        let here = at < n;
        at = at.saturating_sub(n);
        here
    });
    let Some(own) = own else { return false };
    sets.iter().enumerate().all(|(j, set)| j == own || !set.contains(&s))
}

/// Greedy by size: largest block first, at the lowest offset where it
/// overlaps no placed block that is live at the same time. Returns the arena size.
fn assign_offsets(blocks: &mut [Block]) -> u64 {
    let mut order: Vec<usize> = (0..blocks.len()).collect();
    order.sort_by(|&a, &b| blocks[b].bytes.cmp(&blocks[a].bytes).then(blocks[a].first.cmp(&blocks[b].first)));
    let mut placed: Vec<usize> = Vec::with_capacity(blocks.len());
    let mut arena = 0;
    for i in order {
        let (f, l, size) = (blocks[i].first, blocks[i].last, blocks[i].bytes);
        let mut busy: Vec<(u64, u64)> = placed
            .iter()
            .map(|&j| &blocks[j])
            .filter(|b| b.first <= l && f <= b.last)
            .map(|b| (b.offset, b.offset + b.bytes))
            .collect();
        busy.sort_unstable();
        let mut at = 0;
        for (s, e) in busy {
            if at + size <= s {
                break;
            }
            at = at.max(e);
        }
        blocks[i].offset = at;
        arena = arena.max(at + size);
        placed.push(i);
    }
    arena
}

/// The largest sum of bytes of blocks live at one kernel.
fn live_peak(blocks: &[Block], kernels: usize) -> u64 {
    let mut delta = vec![0i128; kernels + 2];
    for b in blocks {
        delta[b.first] += b.bytes as i128;
        delta[b.last + 1] -= b.bytes as i128;
    }
    let (mut live, mut peak) = (0i128, 0i128);
    for d in delta {
        live += d;
        peak = peak.max(live);
    }
    peak as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(first: usize, last: usize, bytes: u64) -> Block {
        Block { offset: 0, bytes, first, last, kept_for_backward: false, value: 0 }
    }

    #[test]
    fn greedy_by_size_reuses_space_of_dead_blocks() {
        // a [0,1] 1024, b [2,3] 1024 can share; c [1,2] 512 overlaps both in time.
        let mut bs = vec![block(0, 1, 1024), block(2, 3, 1024), block(1, 2, 512)];
        let arena = assign_offsets(&mut bs);
        assert_eq!(arena, 1536);
        assert_eq!(bs[0].offset, bs[1].offset);
        assert_eq!(live_peak(&bs, 4), 1536);
        let mp = MemoryPlan {
            peak_bytes: 0,
            parts: Parts::default(),
            arena_bytes: arena,
            lower_bound_bytes: 1536,
            in_place: 0,
            placements: vec![],
            blocks: bs,
        };
        mp.check().unwrap();
    }

    #[test]
    fn bytes_read_like_a_person_writes_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
    }
}
