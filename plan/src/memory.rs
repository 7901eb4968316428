//! The memory plan of a plan: where every value lives (regions of state and
//! inputs, one arena for transients), the peak and its parts, and the checks
//! any backend may run on it (`check`: no two live storages overlap;
//! `simulate`: the plan run on paper against the arena). The compiler's
//! `memory` module computes it; a backend that executes it places every
//! value at its planned offset.

use crate::op::Op;
use crate::plan::{Plan, Source};
use serde::{Deserialize, Serialize};

/// Offsets in a region or the arena are multiples of this.
pub const ALIGN: u64 = 256;

pub fn align(b: u64) -> u64 {
    b.div_ceil(ALIGN) * ALIGN
}

/// Where kernel `k`'s result starts in its operand's storage, in bytes,
/// when the result may be that storage (a view, no copy): 0 for a reshape
/// or stop_gradient; for a slice of contiguous rows (every dim before its
/// axis is 1: q and k out of ConViT's permuted qk product, dq, dk and dv
/// out of an attention gradient), its first byte, when that is a multiple
/// of ALIGN (a GEMM's or a vector load's operand stays aligned). `None`
/// for every other kernel: the memory planner then gives the result its
/// own storage. Whether a result is a view is its placement's to say
/// (`is_view`): a view of a value in another region is a copy.
pub fn view_offset(plan: &Plan, k: usize) -> Option<u64> {
    let kernel = &plan.kernels[k];
    match kernel.op {
        Op::Reshape { .. } | Op::StopGradient => Some(0),
        Op::Slice { axis, start, .. } => {
            let x = plan.values.get(*kernel.inputs.first()?)?;
            let rows_first = x.shape.get(..axis)?.iter().all(|&d| d == 1);
            let row: u64 = x.shape.get(axis + 1..)?.iter().product();
            let at = start.as_const()? * row * x.dtype.size_bytes();
            (rows_first && at.is_multiple_of(ALIGN)).then_some(at)
        }
        _ => None,
    }
}

/// Whether kernel `k`'s result is placed as a view of its operand (at
/// `view_offset` in the same region), or is a concatenation of contiguous
/// rows whose operands already lie where the result puts them, one after
/// another (dq and dk of an attention gradient, two views of its result,
/// concatenated back: `concat_in_place`).
pub fn is_view(plan: &Plan, placements: &[Placement], k: usize) -> bool {
    let kernel = &plan.kernels[k];
    if let Op::Concat { axis } = kernel.op {
        return concat_in_place(plan, placements, k, axis);
    }
    let Some(at) = view_offset(plan, k) else { return false };
    let (Some(x), Some(out)) = (kernel.inputs.first().and_then(|&i| placements.get(i)), placements.get(kernel.output))
    else {
        return false;
    };
    x.region == out.region && x.region != Region::Inline && x.offset + at == out.offset
}

/// Whether concat kernel `k` (along `axis`) of contiguous rows (every dim of
/// its result before the axis is 1) has each operand placed where the
/// result holds it: the result is then its operands' storage, no copy.
pub fn concat_in_place(plan: &Plan, placements: &[Placement], k: usize, axis: usize) -> bool {
    let kernel = &plan.kernels[k];
    let Some(out) = placements.get(kernel.output) else { return false };
    let rows_first = plan.values[kernel.output].shape.get(..axis).is_some_and(|d| d.iter().all(|&d| d == 1));
    if !rows_first || out.region == Region::Inline || kernel.inputs.is_empty() {
        return false;
    }
    let mut at = out.offset;
    for &i in &kernel.inputs {
        let Some(p) = placements.get(i) else { return false };
        if p.region != out.region || p.offset != at {
            return false;
        }
        at += plan.values[i].numel() * plan.values[i].dtype.size_bytes();
    }
    true
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

impl MemoryPlan {
    /// The arena invariant: blocks live at the same time never overlap, and
    /// every block fits in the arena.
    pub fn check(&self) -> Result<(), String> {
        for (i, a) in self.blocks.iter().enumerate() {
            if a.offset % ALIGN != 0 || a.offset.checked_add(a.bytes).is_none_or(|end| end > self.arena_bytes) {
                return Err(format!("block {i} at {}+{} is outside the arena or misaligned", a.offset, a.bytes));
            }
        }
        // Every block ends inside the arena: the sums below cannot overflow.
        // A sweep over kernels keeps the live blocks by offset; they are
        // disjoint so far, so a new block can only overlap its neighbours
        // (n log n: a check of every pair is quadratic in the depth). A
        // block that ends before it starts is the caller's to reject.
        let mut by_first: Vec<usize> = (0..self.blocks.len())
            .filter(|&i| self.blocks[i].bytes > 0 && self.blocks[i].first <= self.blocks[i].last)
            .collect();
        by_first.sort_by_key(|&i| self.blocks[i].first);
        let mut live = std::collections::BTreeMap::<u64, usize>::new();
        let mut ends = std::collections::BinaryHeap::<std::cmp::Reverse<(usize, usize)>>::new();
        for i in by_first {
            let a = &self.blocks[i];
            while let Some(&std::cmp::Reverse((last, j))) = ends.peek() {
                if last >= a.first {
                    break;
                }
                ends.pop();
                live.remove(&self.blocks[j].offset);
            }
            let below = live.range(..=a.offset).next_back().filter(|(&o, &j)| o + self.blocks[j].bytes > a.offset);
            let above = live.range(a.offset..).next().filter(|(&o, _)| o < a.offset + a.bytes);
            if let Some((_, &j)) = below.or(above) {
                let (i, j) = (i.min(j), i.max(j));
                let (a, b) = (&self.blocks[i], &self.blocks[j]);
                return Err(format!(
                    "blocks {i} (values from {}) and {j} (from {}) are live together at kernels {}..{} and overlap",
                    a.value,
                    b.value,
                    a.first.max(b.first),
                    a.last.min(b.last)
                ));
            }
            live.insert(a.offset, i);
            ends.push(std::cmp::Reverse((a.last, i)));
        }
        if self.arena_bytes < self.lower_bound_bytes {
            return Err(format!("arena {} is below the live-bytes bound {}", self.arena_bytes, self.lower_bound_bytes));
        }
        Ok(())
    }
}

/// The op and module (scope) that made value `v`: its kernel's, or for a
/// constant, its first reader's module (`first_reader[v]`, past the last
/// kernel for none).
fn made_by<'a>(plan: &'a Plan, first_reader: &[usize], v: usize) -> (String, &'a str) {
    match &plan.values[v].source {
        Source::Kernel(k) => (plan.kernels[*k].op.name().to_string(), &plan.kernels[*k].scope),
        Source::Part { kernel, .. } => {
            (format!("part of {}", plan.kernels[*kernel].op.name()), &plan.kernels[*kernel].scope)
        }
        Source::Fill { value } => {
            let reader = plan.kernels.get(first_reader[v]);
            (format!("fill {value}"), reader.map_or("", |k| k.scope.as_str()))
        }
        Source::Input { name } | Source::Param { name, .. } | Source::Buffer { name, .. } => (format!("@{name}"), ""),
    }
}

/// The round step, 1, 2 or 5 times a power of ten, that cuts `span` into
/// at most `parts` parts.
fn round_step(span: f64, parts: f64) -> f64 {
    let raw = (span / parts).max(f64::MIN_POSITIVE);
    let decade = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * decade).find(|&s| s >= raw * (1.0 - 1e-12)).unwrap_or(10.0 * decade)
}

/// Ticks of a byte axis from 0 to `top`: (bytes, label) at round values of
/// the largest binary unit `top` reaches (`0`, `0.5 GiB`, `1 GiB`, ...).
fn byte_ticks(top: u64) -> Vec<(f64, String)> {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let u = (0..UNITS.len()).rev().find(|&u| top >= 1u64 << (10 * u)).unwrap_or(0);
    let unit = (1u64 << (10 * u)) as f64;
    let span = top as f64 / unit;
    // Less than a byte is not a step.
    let step = if u == 0 { round_step(span, 8.0).max(1.0) } else { round_step(span, 8.0) };
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    (0..)
        .map(|i| i as f64 * step)
        .take_while(|&t| t <= span * (1.0 + 1e-9))
        .map(|t| (t * unit, if t == 0.0 { "0".to_string() } else { format!("{t:.decimals$} {}", UNITS[u]) }))
        .collect()
}

/// Kernel indices below `kernels` at a round step (at least 1).
fn kernel_ticks(kernels: usize) -> Vec<usize> {
    let step = round_step(kernels as f64, 10.0).max(1.0) as usize;
    (0..kernels.max(1)).step_by(step).collect()
}

impl MemoryPlan {
    /// The peak as a picture: kernels (time) across, bytes up, from 0 to
    /// the peak. The regions live the whole step stack from the bottom
    /// (parameters, gradients, optimizer state, buffers, inputs), then the
    /// arena with one rectangle per storage (blue when kept for the
    /// backward pass, orange when transient; a dashed line at the loss),
    /// then the workspace with each kernel's scratch; so the stack is the
    /// peak of the title. Hover shows each storage's op and module.
    pub fn to_svg(&self, plan: &Plan, title: &str) -> String {
        use std::fmt::Write;
        let kernels = plan.kernels.len();
        let loss_kernel = plan.output("loss").and_then(|v| match plan.values[v].source {
            Source::Kernel(k) => Some(k),
            _ => None,
        });
        let (w, h, left, right, top, bottom) = (1400.0f64, 680.0f64, 90.0f64, 260.0f64, 40.0f64, 50.0f64);
        let plot_w = w - left - right;
        let plot_h = h - top - bottom;
        let xs = plot_w / kernels.max(1) as f64;
        let ys = plot_h / self.peak_bytes.max(1) as f64;
        let y_of = |bytes: f64| top + plot_h - bytes * ys;
        let esc = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="22" font-size="14" data-peak-bytes="{}">{} — peak {}: arena {} (live-bytes bound {})</text>"#,
            self.peak_bytes,
            esc(title),
            human_bytes(self.peak_bytes),
            human_bytes(self.arena_bytes),
            human_bytes(self.lower_bound_bytes)
        );
        // Round ticks and their grid lines, under everything else.
        for (bytes, label) in byte_ticks(self.peak_bytes) {
            let y = y_of(bytes);
            let _ = writeln!(
                s,
                r##"<g class="ytick"><line x1="{left}" y1="{y:.4}" x2="{:.2}" y2="{y:.4}" stroke="#ddd"/><text x="{:.2}" y="{:.2}" text-anchor="end">{label}</text></g>"##,
                left + plot_w,
                left - 6.0,
                y + 4.0
            );
        }
        for k in kernel_ticks(kernels) {
            let x = left + k as f64 * xs;
            let _ = writeln!(
                s,
                r##"<g class="xtick"><line x1="{x:.4}" y1="{:.2}" x2="{x:.4}" y2="{:.2}" stroke="#000"/><text x="{x:.2}" y="{:.2}" text-anchor="middle">{k}</text></g>"##,
                top + plot_h,
                top + plot_h + 5.0,
                top + plot_h + 18.0
            );
        }
        let p = &self.parts;
        let (names, colors) = (
            ["parameters", "gradients", "optimizer state", "buffers", "inputs", "arena", "workspace"],
            ["#54a24b", "#e45756", "#b279a2", "#9d755d", "#72b7b2", "#f4f4f4", "#bab0ac"],
        );
        let sizes = [p.parameters, p.gradients, p.optimizer_state, p.buffers, p.inputs, self.arena_bytes, p.workspace];
        let mut base = 0u64;
        let mut arena_base = 0;
        let legend_x = left + plot_w + 20.0;
        for (r, name) in names.iter().enumerate() {
            let bytes = sizes[r];
            if *name == "arena" {
                arena_base = base;
            }
            let note = match *name {
                "arena" => format!(
                    "activations kept for backward {}, transient {}",
                    human_bytes(p.activations_kept),
                    human_bytes(p.transient)
                ),
                "workspace" => "the largest scratch of any one kernel".to_string(),
                _ => "live the whole step".to_string(),
            };
            let (y, bh) = (y_of((base + bytes) as f64), bytes as f64 * ys);
            let _ = writeln!(
                s,
                r##"<rect class="region" data-region="{name}" data-bytes="{bytes}" x="{left}" y="{y:.4}" width="{plot_w:.2}" height="{bh:.4}" fill="{}" fill-opacity="0.6"><title>{name}: {}, stacked from {} to {} ({})</title></rect>"##,
                colors[r],
                human_bytes(bytes),
                human_bytes(base),
                human_bytes(base + bytes),
                esc(&note)
            );
            // The legend lists the regions top down, as they stack.
            let ly = top + 18.0 * (names.len() - 1 - r) as f64;
            let _ = writeln!(
                s,
                r##"<rect x="{legend_x:.2}" y="{:.2}" width="10" height="10" fill="{}" stroke="#999" stroke-width="0.5"/><text x="{:.2}" y="{:.2}">{name} {}</text>"##,
                ly,
                colors[r],
                legend_x + 15.0,
                ly + 9.0,
                human_bytes(bytes)
            );
            base += bytes;
        }
        for (i, (text, color)) in [("kept for backward", "#4c78a8"), ("transient", "#f58518")].iter().enumerate() {
            let ly = top + 18.0 * (names.len() + 1 + i) as f64;
            let _ = writeln!(
                s,
                r##"<rect x="{legend_x:.2}" y="{ly:.2}" width="10" height="10" fill="{color}"/><text x="{:.2}" y="{:.2}">arena: {text}</text>"##,
                legend_x + 15.0,
                ly + 9.0
            );
        }
        // Found once: a search per constant block is quadratic in the depth.
        let mut first_reader = vec![kernels; plan.values.len()];
        for (k, kernel) in plan.kernels.iter().enumerate().rev() {
            for &i in &kernel.inputs {
                first_reader[i] = k;
            }
        }
        for b in &self.blocks {
            let x = left + b.first as f64 * xs;
            // Named outputs live to the end of the step, one past the last kernel.
            let last = b.last.min(kernels.saturating_sub(1)).max(b.first);
            let bw = ((last - b.first + 1) as f64 * xs).max(0.5);
            let y = y_of((arena_base + b.offset + b.bytes) as f64);
            let bh = (b.bytes as f64 * ys).max(0.5);
            let color = if b.kept_for_backward { "#4c78a8" } else { "#f58518" };
            let (op, module) = made_by(plan, &first_reader, b.value);
            let module = if module.is_empty() { "(no module)" } else { module };
            let _ = writeln!(
                s,
                r##"<rect class="storage" x="{x:.2}" y="{y:.2}" width="{bw:.2}" height="{bh:.2}" fill="{color}" fill-opacity="0.75" stroke="#333" stroke-width="0.2"><title>{} in {} · {} · kernels {}–{} · arena offset {} · value {}</title></rect>"##,
                esc(&op),
                esc(module),
                human_bytes(b.bytes),
                b.first,
                b.last,
                human_bytes(b.offset),
                b.value
            );
        }
        // Each kernel's scratch, from the bottom of the workspace.
        let workspace_base = arena_base + self.arena_bytes;
        for (k, kernel) in plan.kernels.iter().enumerate() {
            let bytes = crate::scratch::scratch(plan, k).total();
            if bytes == 0 {
                continue;
            }
            let scope = if kernel.scope.is_empty() { "(no module)" } else { kernel.scope.as_str() };
            let _ = writeln!(
                s,
                r##"<rect class="scratch" x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="#79706e"><title>scratch of kernel {k}, {} in {} · {}</title></rect>"##,
                left + k as f64 * xs,
                y_of((workspace_base + bytes) as f64),
                xs.max(0.5),
                (bytes as f64 * ys).max(0.5),
                kernel.op.name(),
                esc(scope),
                human_bytes(bytes)
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
            r#"<text x="{}" y="{}" text-anchor="middle">kernel (execution order; {kernels} kernels)</text>"#,
            left + plot_w / 2.0,
            h - 10.0
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
            let view = is_view(plan, &self.placements, k);
            if view {
                content[out] = content[kernel.inputs[0]];
            }
            // A result shares storage with an operand of its own kernel only
            // as the same range (written in place, element for element):
            // never over part of it, or part of it over another range,
            // which a device writing as it reads gets wrong.
            for v in std::iter::once(out).chain(parts[k].iter().copied()).filter(|_| !view) {
                let w = &self.placements[v];
                for &i in &kernel.inputs {
                    let r = &self.placements[i];
                    let overlap = r.region == w.region
                        && r.region != Region::Inline
                        && r.bytes > 0
                        && w.bytes > 0
                        && r.offset < w.offset + w.bytes
                        && w.offset < r.offset + r.bytes;
                    if overlap && (r.offset != w.offset || r.bytes != w.bytes) {
                        return Err(format!(
                            "kernel {k} ({}) writes value {v} over part of value {i}, which it reads",
                            kernel.op.name()
                        ));
                    }
                }
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

    #[test]
    fn steps_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(round_step(12.04, 8.0), 2.0);
        assert_eq!(round_step(1.3, 8.0), 0.2);
        assert_eq!(round_step(1000.0, 8.0), 200.0);
        assert_eq!(round_step(40.0, 8.0), 5.0);
        assert_eq!(round_step(10.0, 10.0), 1.0);
    }

    #[test]
    fn byte_ticks_are_round_in_the_largest_unit() {
        let labels = |top: u64| byte_ticks(top).into_iter().map(|(_, l)| l).collect::<Vec<_>>();
        assert_eq!(labels(12_622_080), ["0", "2 MiB", "4 MiB", "6 MiB", "8 MiB", "10 MiB", "12 MiB"]);
        assert_eq!(labels(3 << 29), ["0", "0.2 GiB", "0.4 GiB", "0.6 GiB", "0.8 GiB", "1.0 GiB", "1.2 GiB", "1.4 GiB"]);
        assert_eq!(labels(700), ["0", "100 B", "200 B", "300 B", "400 B", "500 B", "600 B", "700 B"]);
        assert_eq!(labels(3), ["0", "1 B", "2 B", "3 B"]);
        assert_eq!(labels(0), ["0"]);
        // Each tick sits at its label's bytes.
        for (bytes, label) in byte_ticks(5 << 30) {
            let v: f64 = label.split(' ').next().unwrap().parse().unwrap();
            assert_eq!(bytes, v * (1u64 << 30) as f64, "{label}");
        }
    }

    #[test]
    fn check_finds_exactly_the_overlapping_pairs() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        let mut failures = 0;
        for case in 0..2000 {
            let blocks: Vec<Block> = (0..1 + next(12))
                .map(|v| {
                    let first = next(10) as usize;
                    Block {
                        offset: ALIGN * next(8),
                        bytes: ALIGN * next(4),
                        first,
                        last: first + next(6) as usize,
                        kept_for_backward: false,
                        value: v as usize,
                    }
                })
                .collect();
            // Every pair, as the definition says.
            let overlap = blocks.iter().enumerate().any(|(i, a)| {
                blocks[i + 1..].iter().any(|b| {
                    a.first <= b.last
                        && b.first <= a.last
                        && a.offset < b.offset + b.bytes
                        && b.offset < a.offset + a.bytes
                        && a.bytes > 0
                        && b.bytes > 0
                })
            });
            let m = MemoryPlan {
                peak_bytes: 0,
                parts: Parts::default(),
                arena_bytes: 12 * ALIGN,
                lower_bound_bytes: 0,
                in_place: 0,
                placements: vec![],
                blocks,
            };
            match m.check() {
                Ok(()) => assert!(!overlap, "case {case}: {:?}", m.blocks),
                Err(e) => {
                    assert!(overlap && e.contains("are live together"), "case {case}: {e}");
                    failures += 1;
                }
            }
        }
        // Both outcomes were tried.
        assert!(failures > 100 && failures < 1900, "{failures}");
    }

    #[test]
    fn kernel_ticks_step_roundly_below_the_count() {
        assert_eq!(kernel_ticks(95), [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]);
        assert_eq!(kernel_ticks(2417), (0..2417).step_by(500).collect::<Vec<_>>());
        assert_eq!(kernel_ticks(3), [0, 1, 2]);
        assert_eq!(kernel_ticks(0), [0]);
    }
}
