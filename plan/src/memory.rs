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
        for (i, a) in self.blocks.iter().enumerate() {
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
