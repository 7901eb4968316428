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
//! - An elementwise kernel whose operand dies there, with the same byte size,
//!   writes in place over it; a state update writes over its state when no
//!   later kernel reads the old value.
//! - Arena offsets: greedy by size (largest first, each at the lowest offset
//!   free over its whole lifetime), 256-byte aligned.
//!
//! Invariant (`check`, and the property tests): two storages whose lifetimes
//! intersect never overlap in the arena, and the arena is at least the
//! largest sum of live transient bytes at any kernel (`lower_bound_bytes`).

use crate::ir::{DType, Op};
use crate::plan::{Plan, Source};
use serde::{Deserialize, Serialize};

/// Offsets in a region or the arena are multiples of this.
pub const ALIGN: u64 = 256;

fn align(b: u64) -> u64 {
    b.div_ceil(ALIGN) * ALIGN
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Region {
    Params,
    Grads,
    OptimizerState,
    Buffers,
    Inputs,
    Arena,
    /// Constants folded into the kernels that read them (scalar fills), and
    /// a multi-tensor kernel's packed result, stored only as its parts.
    Inline,
}

/// Where one value lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub region: Region,
    pub offset: u64,
    pub bytes: u64,
}

/// One transient storage in the arena (several values may share it:
/// aliases and in-place results).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Block {
    pub offset: u64,
    pub bytes: u64,
    /// First and last kernel that touch it (inclusive).
    pub first: usize,
    pub last: usize,
    /// Made in the forward pass and still read after the loss.
    pub kept_for_backward: bool,
    /// The value that created it, for plots and reports.
    pub value: usize,
}

/// The peak and its parts, in bytes. `peak_bytes` is the sum of the parts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Parts {
    pub parameters: u64,
    pub gradients: u64,
    pub optimizer_state: u64,
    pub buffers: u64,
    pub inputs: u64,
    /// Arena bytes taken by activations kept for the backward pass, at the loss.
    pub activations_kept: u64,
    /// The rest of the arena.
    pub transient: u64,
    /// The largest scratch any one kernel needs beside its operands.
    pub workspace: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryPlan {
    pub peak_bytes: u64,
    pub parts: Parts,
    pub arena_bytes: u64,
    /// The largest sum of live transient bytes at one kernel: no arena is smaller.
    pub lower_bound_bytes: u64,
    /// Results written over a dying operand or their state.
    pub in_place: usize,
    /// Per value (plan order).
    pub placements: Vec<Placement>,
    pub blocks: Vec<Block>,
}

/// Scratch a kernel needs besides its operands and result, as a GPU kernel
/// would allocate it: attention's backward keeps rowsum(dO * O) per query
/// (FlashAttention-2) and accumulates dq in f32; cross-entropy keeps one
/// statistic per row. Matrix products and fused elementwise kernels need none.
fn workspace(plan: &Plan, k: usize) -> u64 {
    let kernel = &plan.kernels[k];
    let shape = |i: usize| &plan.values[kernel.inputs[i]].shape;
    match kernel.op {
        Op::AttentionGrad { .. } => {
            let q = shape(0);
            let rows: u64 = q[..q.len() - 1].iter().product();
            let dq_f32 = if plan.values[kernel.inputs[0]].dtype == DType::F32 { 0 } else { rows * q[q.len() - 1] * 4 };
            rows * 4 + dq_f32
        }
        Op::CrossEntropy { .. } | Op::CrossEntropyGrad { .. } => shape(0)[0] * 4,
        _ => 0,
    }
}

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
    let state_of: std::collections::HashMap<usize, usize> =
        plan.state_updates.iter().filter_map(|(name, v)| plan.state(name).map(|s| (*v, s))).collect();
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
        workspace: (0..end).map(|k| align(workspace(plan, k))).max().unwrap_or(0),
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

impl MemoryPlan {
    /// The arena invariant: blocks live at the same time never overlap, and
    /// every block fits in the arena.
    pub fn check(&self) -> Result<(), String> {
        for (i, a) in self.blocks.iter().enumerate() {
            if a.offset % ALIGN != 0 || a.offset + a.bytes > self.arena_bytes {
                return Err(format!("block {i} at {}+{} is outside the arena or misaligned", a.offset, a.bytes));
            }
            for (j, b) in self.blocks.iter().enumerate().skip(i + 1) {
                let in_time = a.first <= b.last && b.first <= a.last;
                let in_space = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
                if in_time && in_space && a.bytes > 0 && b.bytes > 0 {
                    return Err(format!(
                        "blocks {i} (values from {}) and {j} (from {}) are live together at kernels {}..{} and overlap",
                        a.value,
                        b.value,
                        a.first.max(b.first),
                        a.last.min(b.last)
                    ));
                }
            }
        }
        if self.arena_bytes < self.lower_bound_bytes {
            return Err(format!("arena {} is below the live-bytes bound {}", self.arena_bytes, self.lower_bound_bytes));
        }
        Ok(())
    }
}

impl MemoryPlan {
    /// The arena as a picture: kernels (time) across, arena offset up; one
    /// rectangle per storage, blue when kept for the backward pass, orange
    /// when transient; a dashed line at the loss. Hover shows each block.
    pub fn to_svg(&self, title: &str, kernels: usize, loss_kernel: Option<usize>) -> String {
        use std::fmt::Write;
        let (w, h, left, top, bottom) = (1200.0f64, 660.0f64, 90.0f64, 56.0f64, 40.0f64);
        let plot_w = w - left - 20.0;
        let plot_h = h - top - bottom;
        let xs = plot_w / kernels.max(1) as f64;
        let ys = plot_h / self.arena_bytes.max(1) as f64;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let esc = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="20" font-size="14">{} — arena {} (live-bytes bound {}), peak {}</text>"#,
            esc(title),
            human_bytes(self.arena_bytes),
            human_bytes(self.lower_bound_bytes),
            human_bytes(self.peak_bytes)
        );
        for b in &self.blocks {
            let x = left + b.first as f64 * xs;
            let bw = ((b.last - b.first + 1) as f64 * xs).max(0.5);
            let y = top + plot_h - (b.offset + b.bytes) as f64 * ys;
            let bh = (b.bytes as f64 * ys).max(0.5);
            let color = if b.kept_for_backward { "#4c78a8" } else { "#f58518" };
            let _ = writeln!(
                s,
                r##"<rect x="{x:.2}" y="{y:.2}" width="{bw:.2}" height="{bh:.2}" fill="{color}" fill-opacity="0.75" stroke="#333" stroke-width="0.2"><title>value {} · {} · kernels {}–{} · offset {}</title></rect>"##,
                b.value,
                human_bytes(b.bytes),
                b.first,
                b.last,
                human_bytes(b.offset)
            );
        }
        if let Some(l) = loss_kernel {
            let x = left + l as f64 * xs;
            let _ = writeln!(
                s,
                r##"<line x1="{x:.2}" y1="{top}" x2="{x:.2}" y2="{}" stroke="#000" stroke-dasharray="4 3"/><text x="{:.2}" y="{}">loss</text>"##,
                top + plot_h,
                x + 3.0,
                top + 12.0
            );
        }
        let axis_y = top + plot_h;
        let _ =
            writeln!(s, r##"<line x1="{left}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="#000"/>"##, left + plot_w);
        let _ = writeln!(s, r##"<line x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}" stroke="#000"/>"##);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">kernel (execution order, 0–{})</text>"#,
            left + plot_w / 2.0,
            h - 10.0,
            kernels
        );
        for i in 0..=4 {
            let off = self.arena_bytes as f64 * i as f64 / 4.0;
            let y = top + plot_h - off * ys;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.2}" text-anchor="end">{}</text>"#,
                left - 4.0,
                y + 4.0,
                human_bytes(off as u64)
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="30" width="10" height="10" fill="#4c78a8"/><text x="{}" y="39">kept for backward</text><rect x="{}" y="30" width="10" height="10" fill="#f58518"/><text x="{}" y="39">transient</text>"##,
            left + 15.0,
            left + 140.0,
            left + 155.0
        );
        s.push_str("</svg>\n");
        s
    }
}

impl MemoryPlan {
    /// Runs `plan` on paper against this memory plan: every arena cell
    /// (ALIGN bytes) records which value's contents it holds; each kernel
    /// checks that its arena operands still hold their contents, then writes
    /// its result (a reshape's result is its operand's contents). A plan
    /// where a buffer is overwritten while still needed fails here.
    pub fn simulate(&self, plan: &Plan) -> Result<(), String> {
        const EMPTY: u32 = u32::MAX;
        let cells = (self.arena_bytes / ALIGN) as usize;
        let mut held = vec![EMPTY; cells];
        let mut content: Vec<u32> = (0..plan.values.len() as u32).collect();
        let span = |p: &Placement| {
            let a = (p.offset / ALIGN) as usize;
            a..a + (p.bytes.div_ceil(ALIGN) as usize).max(1)
        };
        let mut materialised = vec![false; plan.values.len()];
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); plan.kernels.len()];
        for (v, value) in plan.values.iter().enumerate() {
            if let Source::Part { kernel, .. } = value.source {
                parts[kernel].push(v);
            }
        }
        for (k, kernel) in plan.kernels.iter().enumerate() {
            for &i in &kernel.inputs {
                let p = &self.placements[i];
                if p.region != Region::Arena || p.bytes == 0 {
                    continue;
                }
                if matches!(plan.values[i].source, Source::Fill { .. }) && !materialised[i] {
                    materialised[i] = true;
                    span(p).for_each(|c| held[c] = content[i]);
                }
                if let Some(c) = span(p).find(|&c| held[c] != content[i]) {
                    return Err(format!(
                        "kernel {k} ({}) reads value {i}, but arena cell {c} holds {}",
                        kernel.op.name(),
                        if held[c] == EMPTY { "nothing".to_string() } else { format!("value {}", held[c]) }
                    ));
                }
            }
            let out = kernel.output;
            if matches!(kernel.op, Op::Reshape { .. } | Op::StopGradient) {
                content[out] = content[kernel.inputs[0]];
            }
            for v in std::iter::once(out).chain(parts[k].iter().copied()) {
                let p = &self.placements[v];
                if p.region == Region::Arena && p.bytes > 0 {
                    span(p).for_each(|c| held[c] = content[v]);
                }
            }
        }
        Ok(())
    }
}

/// `1.50 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
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
