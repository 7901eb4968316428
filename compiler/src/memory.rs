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
//!   and so does a slice of contiguous rows at an aligned byte
//!   (`tessera_plan::memory::view_offset`: its result is that range of the
//!   operand's storage), except when its result lives in another region (a
//!   gradient made by a reshape): then placements differ and a backend
//!   copies.
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
/// A value only ever joins a group when it is made (a fresh singleton under
/// the group's root), so each keeps its byte offset from the root's start
/// (`at`: a slice view's rows) and path compression leaves it true.
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
    let mut first_use = vec![end; n];
    for (k, kernel) in plan.kernels.iter().enumerate() {
        for &i in &kernel.inputs {
            last_use[i] = Some(k);
            first_use[i] = first_use[i].min(k);
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
    let updated: std::collections::HashSet<usize> = state_of.values().copied().collect();
    let mut view_of: Vec<usize> = (0..n).collect();
    // A view's byte offset into the value it views.
    let mut view_at = vec![0u64; n];
    let mut old_value_read = vec![0usize; n];
    for (k, kernel) in plan.kernels.iter().enumerate() {
        for &i in &kernel.inputs {
            old_value_read[view_of[i]] = old_value_read[view_of[i]].max(k);
        }
        if let Some(delta) = view_offset(plan, k) {
            view_of[kernel.output] = view_of[kernel.inputs[0]];
            view_at[kernel.output] = view_at[kernel.inputs[0]] + delta;
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
            Source::Kernel(_) | Source::Part { .. } if grad_values.contains(&v) => {
                place(&mut placements, v, Region::Grads)
            }
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
        // A kernel with several results (a layer-norm backward) writes each
        // wherever it lives, as any kernel its result.
        let made = match plan.values[d].source {
            Source::Kernel(_) => true,
            Source::Part { kernel, .. } => !matches!(plan.kernels[kernel].op, Op::MultiTensor { .. }),
            _ => false,
        };
        let private = made
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
    let mut at = vec![0u64; n];
    let mut first = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    for v in 0..n {
        if transient(&placements, v) {
            let born = match plan.values[v].source {
                Source::Kernel(k) | Source::Part { kernel: k, .. } => k,
                // A fill is materialised for its first reader.
                _ => first_use[v],
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
        // Built once per kernel: a per-part scan of every set is quadratic
        // in the parameters of a fused optimizer kernel.
        let mut sets: Option<TensorSets> = None;
        for &part in &parts_of[k] {
            let Some(&s) = state_of.get(&part) else { continue };
            let same = plan.values[s].shape == plan.values[part].shape && bytes(s) == bytes(part);
            if old_value_read[s] <= k
                && same
                && !kernel.inputs.iter().any(|&i| i != s && view_of[i] == s)
                && sets.get_or_insert_with(|| TensorSets::of(plan, k)).only_in_own(plan, part, s)
            {
                placements[part] = placements[s].clone();
                in_place += 1;
            }
        }
        let out = kernel.output;
        // A state update overwrites its state when nothing reads the old
        // value later (through any view), and its kernel either does not
        // read the state (through any view) or is elementwise and reads it
        // only element for element (the state, or a view of all of it at
        // offset 0: a reshape).
        if let Some(&s) = state_of.get(&out) {
            let same = plan.values[s].shape == plan.values[out].shape && bytes(s) == bytes(out);
            let whole = |i: usize| view_at[i] == 0 && plan.values[i].numel() == plan.values[s].numel();
            let mut reads = kernel.inputs.iter().filter(|&&i| view_of[i] == s);
            let safe_kernel =
                if kernel.op.is_elementwise() { reads.all(|&i| whole(i)) } else { reads.next().is_none() };
            if old_value_read[s] <= k && same && safe_kernel {
                placements[out] = placements[s].clone();
                in_place += 1;
                continue;
            }
        }
        // A view kept past the step (an output or a state's update) of a
        // state that is updated would read the new value once the updates
        // are written over the states at the step's end: it is a copy.
        let kept_past_step = named.contains(&out) || state_of.contains_key(&out);
        let view = view_offset(plan, k).filter(|_| !(kept_past_step && updated.contains(&view_of[out])));
        if let Some(delta) = view.filter(|_| !transient(&placements, kernel.inputs[0]) && transient(&placements, out)) {
            // A view of a parameter, input or gradient: no storage of its own.
            let x = &placements[kernel.inputs[0]];
            placements[out] = match x.region {
                Region::Inline => x.clone(),
                region => Placement { region, offset: x.offset + delta, bytes: bytes(out) },
            };
            continue;
        }
        if !transient(&placements, out) {
            continue;
        }
        let alias = if let Some(delta) = view {
            Some((kernel.inputs[0], delta))
        } else if let Some(first_row) = adjacent_rows(plan, k, &mut parent, &at, |v| transient(&placements, v)) {
            Some((first_row, 0))
        } else if kernel.op.is_elementwise() {
            let mut found = None;
            for &i in &kernel.inputs {
                // Same shape, same element size: element i is read before it is written.
                let same = plan.values[i].shape == plan.values[out].shape && bytes(i) == bytes(out);
                if transient(&placements, i) && same {
                    let r = find(&mut parent, i);
                    // Every operand in that storage must be read element for
                    // element too: the same range in the result's shape (not
                    // another row of it, a slice view).
                    let element_for_element = kernel.inputs.iter().all(|&j| {
                        !transient(&placements, j)
                            || find(&mut parent, j) != r
                            || (at[j] == at[i]
                                && plan.values[j].shape == plan.values[out].shape
                                && bytes(j) == bytes(out))
                    });
                    if last[r] <= k && element_for_element {
                        found = Some((i, 0));
                        break;
                    }
                }
            }
            found
        } else {
            None
        };
        if let Some((i, delta)) = alias {
            let r = find(&mut parent, i);
            parent[out] = r;
            at[out] = at[i] + delta;
            first[r] = first[r].min(first[out]);
            last[r] = last[r].max(last[out]);
            if view.is_none() && !matches!(kernel.op, Op::Concat { .. }) {
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
            size[r] = size[r].max(at[v] + bytes(v));
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
            placements[v] = Placement { region: Region::Arena, offset: b.offset + at[v], bytes: bytes(v) };
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

/// For a concat of contiguous rows (every dim of its result before the axis
/// 1) whose operands are members of one storage group lying one after
/// another in it (views of one value's consecutive rows, as an attention
/// gradient's dq and dk): its first operand, whose place the result takes
/// (no copy). `at` is each member's byte offset in its group.
fn adjacent_rows(
    plan: &Plan,
    k: usize,
    parent: &mut [usize],
    at: &[u64],
    transient: impl Fn(usize) -> bool,
) -> Option<usize> {
    let kernel = &plan.kernels[k];
    let Op::Concat { axis } = kernel.op else { return None };
    let shape = &plan.values[kernel.output].shape;
    let (&first, rest) = kernel.inputs.split_first()?;
    if !shape.get(..axis)?.iter().all(|&d| d == 1) || !kernel.inputs.iter().all(|&i| transient(i)) {
        return None;
    }
    let root = find(parent, first);
    let bytes = |v: usize| plan.values[v].numel() * plan.values[v].dtype.size_bytes();
    let mut end = at[first] + bytes(first);
    for &i in rest {
        if find(parent, i) != root || at[i] != end {
            return None;
        }
        end += bytes(i);
    }
    Some(first)
}

/// The tensor sets of a multi-tensor kernel (`arity` operands each):
/// where each set's elements end in the packed result, and which set
/// reads each operand (`None`: more than one).
struct TensorSets {
    /// Cumulative element counts; empty when the kernel is not multi-tensor.
    ends: Vec<u64>,
    reader: std::collections::HashMap<usize, Option<usize>>,
}

impl TensorSets {
    fn of(plan: &Plan, k: usize) -> TensorSets {
        let kernel = &plan.kernels[k];
        let Op::MultiTensor { arity, .. } = kernel.op else {
            return TensorSets { ends: Vec::new(), reader: Default::default() };
        };
        let mut ends = Vec::new();
        let mut reader = std::collections::HashMap::new();
        let mut total = 0u64;
        for (j, set) in kernel.inputs.chunks(arity as usize).enumerate() {
            total += set.iter().map(|&i| plan.values[i].numel()).max().unwrap_or(0);
            ends.push(total);
            for &i in set {
                reader.entry(i).and_modify(|r: &mut Option<usize>| *r = r.filter(|&r| r == j)).or_insert(Some(j));
            }
        }
        TensorSets { ends, reader }
    }

    /// Whether the kernel reads value `s` only among the operands of the
    /// set whose result `part` is (results are packed result-major, so the
    /// part's offset modulo the total element count falls in its set's
    /// range).
    fn only_in_own(&self, plan: &Plan, part: usize, s: usize) -> bool {
        let Source::Part { offset, .. } = plan.values[part].source else { return false };
        let total = self.ends.last().copied().unwrap_or(0);
        if total == 0 {
            return false;
        }
        let at = offset % total;
        // The first set whose range holds `at` (empty sets hold nothing).
        let own = self.ends.partition_point(|&e| e <= at);
        match self.reader.get(&s) {
            None => true,
            Some(r) => *r == Some(own),
        }
    }
}

/// Greedy by size: largest block first, at the lowest offset where it
/// overlaps no placed block that is live at the same time. Returns the arena size.
fn assign_offsets(blocks: &mut [Block]) -> u64 {
    assign_offsets_counted(blocks).0
}

/// `assign_offsets`, and the number of run-set probes it made (the tests
/// bound it, so the planner stays near-linear in the number of blocks).
///
/// Placed blocks are kept in a segment tree over lifetimes (endpoints
/// ranked): `cover[n]` holds the offset ranges of blocks whose lifetime
/// covers node n's range (a block is stored at its O(log B) canonical
/// nodes), `any[n]` those of blocks stored at n or below it. The blocks
/// live during [f, l] are then `any` of the query's canonical nodes and
/// `cover` of the nodes above them, O(log B) run sets in all, each merged
/// into disjoint runs; the lowest free offset is found by jumping past the
/// run that blocks it until none does. The offsets are exactly those of
/// first fit over a sorted list of every overlapping block (the
/// reference in the tests), without visiting each such block.
fn assign_offsets_counted(blocks: &mut [Block]) -> (u64, u64) {
    let mut order: Vec<usize> = (0..blocks.len()).collect();
    order.sort_by(|&a, &b| blocks[b].bytes.cmp(&blocks[a].bytes).then(blocks[a].first.cmp(&blocks[b].first)));
    // Only the order of lifetime endpoints matters for overlap: rank them.
    let mut times: Vec<usize> = blocks.iter().flat_map(|b| [b.first, b.last]).collect();
    times.sort_unstable();
    times.dedup();
    let rank = |t: usize| times.partition_point(|&x| x < t);
    let leaves = times.len().next_power_of_two().max(1);
    let mut tree = Tree { cover: vec![Runs::default(); 2 * leaves], any: vec![Runs::default(); 2 * leaves] };
    let mut probes = 0u64;
    let mut arena = 0;
    let mut sets: Vec<usize> = Vec::new();
    for i in order {
        let (f, l, size) = (rank(blocks[i].first), rank(blocks[i].last), blocks[i].bytes);
        sets.clear();
        tree.live_sets(1, 0, leaves - 1, f, l, &mut sets);
        let mut at = 0;
        loop {
            let mut next = at;
            for &s in &sets {
                probes += 1;
                let runs = if s & 1 == 0 { &tree.any[s >> 1] } else { &tree.cover[s >> 1] };
                if let Some(end) = runs.blocking(at, size) {
                    next = next.max(end);
                }
            }
            if next == at {
                break;
            }
            at = next;
        }
        blocks[i].offset = at;
        arena = arena.max(at + size);
        // A block of no bytes blocks nothing (first fit never moves past it).
        if size > 0 {
            tree.insert(1, 0, leaves - 1, f, l, (at, at + size));
        }
    }
    (arena, probes)
}

/// Disjoint, non-touching byte ranges [start, end), by start.
#[derive(Clone, Default)]
struct Runs(std::collections::BTreeMap<u64, u64>);

impl Runs {
    fn add(&mut self, (mut start, mut end): (u64, u64)) {
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        while let Some((&s, &e)) = self.0.range(start..=end).next() {
            self.0.remove(&s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// The end of the run that [at, at + size) overlaps, if any (the last
    /// run starting before at + size: runs are disjoint, so it ends last).
    fn blocking(&self, at: u64, size: u64) -> Option<u64> {
        let (_, &end) = self.0.range(..at + size).next_back()?;
        (size > 0 && end > at).then_some(end)
    }
}

/// The segment tree of `assign_offsets_counted`; node 1 is the root, node
/// n's children are 2n and 2n + 1.
struct Tree {
    cover: Vec<Runs>,
    any: Vec<Runs>,
}

impl Tree {
    fn insert(&mut self, n: usize, lo: usize, hi: usize, f: usize, l: usize, range: (u64, u64)) {
        if l < lo || hi < f {
            return;
        }
        self.any[n].add(range);
        if f <= lo && hi <= l {
            self.cover[n].add(range);
            return;
        }
        let mid = (lo + hi) / 2;
        self.insert(2 * n, lo, mid, f, l, range);
        self.insert(2 * n + 1, mid + 1, hi, f, l, range);
    }

    /// The run sets holding every placed block live somewhere in [f, l]:
    /// `2n` for `any[n]`, `2n + 1` for `cover[n]`.
    fn live_sets(&self, n: usize, lo: usize, hi: usize, f: usize, l: usize, out: &mut Vec<usize>) {
        if l < lo || hi < f {
            return;
        }
        if f <= lo && hi <= l {
            out.push(2 * n);
            return;
        }
        out.push(2 * n + 1);
        let mid = (lo + hi) / 2;
        self.live_sets(2 * n, lo, mid, f, l, out);
        self.live_sets(2 * n + 1, mid + 1, hi, f, l, out);
    }
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

    /// First fit over every placed block that overlaps in time, sorted by
    /// offset: the planner's definition, quadratic in the blocks.
    fn reference_offsets(blocks: &mut [Block]) -> u64 {
        let mut order: Vec<usize> = (0..blocks.len()).collect();
        order.sort_by(|&a, &b| blocks[b].bytes.cmp(&blocks[a].bytes).then(blocks[a].first.cmp(&blocks[b].first)));
        let mut placed: Vec<usize> = Vec::new();
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

    /// Blocks of a `layers`-deep network: per layer, activations kept from
    /// its forward to its backward (nested lifetimes) in three sizes, and
    /// short transients in both passes.
    fn deep_network(layers: usize) -> Vec<Block> {
        let end = 4 * layers + 2;
        let mut bs = Vec::new();
        for i in 0..layers {
            let (fwd, bwd) = (2 * i, end - 2 * i - 1);
            for bytes in [4096, 1024, 1024, 256] {
                bs.push(block(fwd, bwd, bytes));
            }
            bs.push(block(fwd, fwd + 1, 4096));
            bs.push(block(bwd - 1, bwd, 2048));
            bs.push(block(bwd, bwd, 512));
        }
        bs
    }

    #[test]
    fn offsets_are_those_of_first_fit_over_every_live_block() {
        // A small LCG: the same cases on every run.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |m: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        for case in 0..300 {
            let n = 1 + next(60) as usize;
            let kernels = 1 + next(40) as usize;
            let mut bs: Vec<Block> = (0..n)
                .map(|_| {
                    let first = next(kernels as u64) as usize;
                    let last = first + next((kernels - first) as u64) as usize;
                    // Few sizes, so ties in the greedy order are common; some empty.
                    block(first, last, 256 * next(6))
                })
                .collect();
            let mut want = bs.clone();
            let arena = assign_offsets(&mut bs);
            assert_eq!(arena, reference_offsets(&mut want), "case {case}");
            assert_eq!(bs, want, "case {case}");
        }
        let mut bs = deep_network(40);
        let mut want = bs.clone();
        assert_eq!(assign_offsets(&mut bs), reference_offsets(&mut want));
        assert_eq!(bs, want);
    }

    #[test]
    fn offset_assignment_work_grows_linearly_with_depth() {
        // First fit over every live block takes (blocks live at once) steps
        // per block: quadratic in the depth. The probes of run sets here grow
        // as blocks times log(blocks).
        let probes = |layers: usize| {
            let mut bs = deep_network(layers);
            let (_, probes) = assign_offsets_counted(&mut bs);
            probes as f64 / bs.len() as f64
        };
        let (small, large) = (probes(250), probes(2000));
        assert!(large < 2.0 * small, "probes per block: {small:.1} at 250 layers, {large:.1} at 2000");
        assert!(large < 200.0, "probes per block at 2000 layers: {large:.1}");
    }

    #[test]
    fn bytes_read_like_a_person_writes_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
    }
}
