//! `tessera plan config=NAME --memory | --memory-plot | --max-batch`: the
//! memory plan of a training step as text, JSON and SVG.

use anyhow::{anyhow, Result};
use serde_json::json;
use tessera_compiler::ir::Graph;
use tessera_compiler::memory::{human_bytes, MemoryPlan};
use tessera_compiler::pipeline::lower_training;
use tessera_compiler::plan::Plan;

/// The recomputation that fits `budget` bytes with the fewest extra FLOPs,
/// among: none; the MLPs of the first k blocks; the first k whole blocks
/// (the rest keeping their MLPs recomputed). Returns the step and a note
/// (text and JSON) saying what was chosen and what it costs.
pub fn fit_budget(
    build: &dyn Fn(Option<Vec<Vec<String>>>) -> Result<Graph>,
    batch: u64,
    budget: u64,
) -> Result<(Graph, Option<(String, serde_json::Value)>)> {
    let none = build(Some(vec![]))?;
    let blocks = tessera_compiler::recompute::block_count(&none);
    let flops = |g: &Graph| tessera_compiler::ir::flops::total_flops(g, batch);
    let base_flops = flops(&none);
    let mut candidates: Vec<Vec<Vec<String>>> = vec![];
    for k in 1..=blocks {
        candidates.push((0..k).map(|i| vec![format!("trunk.blocks.{i}.mlp")]).collect());
    }
    for k in 1..=blocks {
        candidates.push(
            (0..blocks)
                .map(|i| vec![if i < k { format!("trunk.blocks.{i}") } else { format!("trunk.blocks.{i}.mlp") }])
                .collect(),
        );
    }
    // No recomputation first: the step already built.
    let mut unrecomputed = Some(none);
    let mut last_peak = 0;
    for regions in std::iter::once(vec![]).chain(candidates) {
        let step = match unrecomputed.take() {
            Some(g) => g,
            None => build(Some(regions.clone()))?,
        };
        let peak = planned(&step, batch)?.1.peak_bytes;
        last_peak = peak;
        if peak <= budget {
            let extra = flops(&step).saturating_sub(base_flops);
            let what = if regions.is_empty() {
                "nothing to recompute".to_string()
            } else {
                format!("recompute {} regions ({} ... {})", regions.len(), regions[0][0], regions[regions.len() - 1][0])
            };
            let text = format!(
                "  --memory-budget {}: {what}; {:.1} GFLOPs more per step (+{:.1}%)\n",
                human_bytes(budget),
                extra as f64 / 1e9,
                100.0 * extra as f64 / base_flops.max(1) as f64
            );
            let json = json!({
                "budget_bytes": budget,
                "regions": regions.iter().map(|r| r.join("+")).collect::<Vec<_>>(),
                "extra_flops": extra,
                "step_flops_without_recompute": base_flops,
            });
            return Ok((step, Some((text, json))));
        }
    }
    Err(anyhow!(
        "--memory-budget {}: even recomputing every block the peak is {}; lower the batch or raise the budget",
        human_bytes(budget),
        human_bytes(last_peak)
    ))
}

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

/// The largest batch whose peak is at most `device` bytes (0 if not even 1).
fn max_batch(step: &Graph, device: u64) -> Result<(u64, Option<u64>)> {
    tessera_compiler::pipeline::max_batch(step, device).map_err(|e| anyhow!("{e}"))
}

/// Also reports the peak of the same step in a plain topological order.
pub fn report(
    step: &Graph,
    (config, tree): (&str, &serde_json::Value),
    batch: u64,
    device: Option<u64>,
    gpu: Option<&tessera_plan::cost::Device>,
) -> Result<Report> {
    let (mut plan, m) = planned(step, batch)?;
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
    // Bytes moved and FLOPs (tessera_plan::cost reads the memory plan).
    plan.memory = Some(m.clone());
    let (cost_text, cost_json) = crate::cost_report::section(&plan, batch, tree, gpu);
    text += &cost_text;
    if let (Some(obj), serde_json::Value::Object(extra)) = (json.as_object_mut(), cost_json) {
        obj.extend(extra);
    }
    {
        let plain = tessera_compiler::passes::plain_topological(step).map_err(|e| anyhow!("{e}"))?;
        let peak = planned(&plain, batch)?.1.peak_bytes;
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
    let svg = m.to_svg(&plan, &format!("{config}, batch {batch}"));
    Ok(Report { text, json, svg })
}
