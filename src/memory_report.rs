//! `tessera plan config=NAME --memory | --memory-plot | --max-batch`: the
//! memory plan of a training step as text, JSON and SVG.

use anyhow::{anyhow, Result};
use serde_json::json;
use tessera_compiler::ir::Graph;
use tessera_compiler::memory::{human_bytes, MemoryPlan};
use tessera_compiler::pipeline::lower_training;
use tessera_compiler::plan::{Plan, Source};

pub struct Report {
    pub text: String,
    pub json: serde_json::Value,
    pub svg: String,
}

fn planned(step: &Graph, batch: u64) -> Result<(Plan, MemoryPlan)> {
    let mut plan = lower_training(step, batch).map_err(|e| anyhow!("{e}"))?;
    let memory = plan.memory.take().expect("training plans carry a memory plan");
    Ok((plan, memory))
}

/// The largest batch whose peak is at most `device` bytes (0 if not even 1),
/// found by doubling then bisection; peaks grow with the batch.
fn max_batch(step: &Graph, device: u64) -> Result<(u64, Option<u64>)> {
    let peak = |b: u64| -> Result<u64> { Ok(planned(step, b)?.1.peak_bytes) };
    if peak(1)? > device {
        return Ok((0, None));
    }
    let (mut lo, mut hi) = (1u64, 2u64);
    while peak(hi)? <= device {
        lo = hi;
        hi *= 2;
        if hi > 1 << 24 {
            return Ok((lo, Some(peak(lo)?)));
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if peak(mid)? <= device {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok((lo, Some(peak(lo)?)))
}

/// `unscheduled`: the same step in a plain topological order, whose peak is
/// reported beside the planned order's.
pub fn report(
    step: &Graph,
    unscheduled: Option<&Graph>,
    config: &str,
    batch: u64,
    device: Option<u64>,
) -> Result<Report> {
    let (plan, m) = planned(step, batch)?;
    let loss_kernel = plan.outputs.iter().find(|(n, _)| n == "loss").and_then(|(_, v)| match plan.values[*v].source {
        Source::Kernel(k) => Some(k),
        _ => None,
    });
    let p = &m.parts;
    let rows = [
        ("parameters", p.parameters),
        ("gradients", p.gradients),
        ("optimizer state", p.optimizer_state),
        ("buffers", p.buffers),
        ("inputs", p.inputs),
        ("activations kept for backward", p.activations_kept),
        ("transient", p.transient),
        ("workspace", p.workspace),
    ];
    let mut text = format!(
        "memory plan of {config}: training step, batch {batch} per replica, {} kernels\n  peak {:>36}  ({} bytes)\n",
        plan.kernels.len(),
        human_bytes(m.peak_bytes),
        m.peak_bytes
    );
    for (name, bytes) in rows {
        text += &format!("    {name:<32} {:>10}\n", human_bytes(bytes));
    }
    text += &format!(
        "  arena {} (no arena can be below {}: the most bytes live at one kernel); {} results written in place\n",
        human_bytes(m.arena_bytes),
        human_bytes(m.lower_bound_bytes),
        m.in_place
    );
    let mut json = json!({
        "config": config,
        "batch": batch,
        "kernels": plan.kernels.len(),
        "peak_bytes": m.peak_bytes,
        "parts": m.parts,
        "arena_bytes": m.arena_bytes,
        "lower_bound_bytes": m.lower_bound_bytes,
        "in_place": m.in_place,
    });
    if let Some(plain) = unscheduled {
        let peak = planned(plain, batch)?.1.peak_bytes;
        json["topological_order_peak_bytes"] = json!(peak);
        text += &format!(
            "  in a plain topological order the peak would be {} (the planned order: {:+.1}%)\n",
            human_bytes(peak),
            100.0 * (m.peak_bytes as f64 - peak as f64) / peak.max(1) as f64
        );
    }
    if let Some(device) = device {
        let (best, peak) = max_batch(step, device)?;
        json["device_memory_bytes"] = json!(device);
        json["max_batch"] = json!(best);
        json["max_batch_peak_bytes"] = json!(peak);
        text += &match peak {
            Some(peak) => format!(
                "  largest batch per replica within {}: {best} (peak {})\n",
                human_bytes(device),
                human_bytes(peak)
            ),
            None => format!("  not even batch 1 fits in {}\n", human_bytes(device)),
        };
    }
    let svg = m.to_svg(&format!("{config}, batch {batch}"), plan.kernels.len(), loss_kernel);
    Ok(Report { text, json, svg })
}
