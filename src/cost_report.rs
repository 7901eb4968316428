//! `tessera plan --memory [--device h100|h200]`: what the step moves and
//! computes (`tessera_plan::cost`: bytes moved by dtype and kernel class,
//! matrix FLOPs) and, for a named GPU, the roofline's estimate of its time
//! beside PyTorch's measured figures for the same model where we have them
//! (../shared/reference/gpu.md, measured on an H200).

use serde_json::{json, Value};
use tessera_compiler::memory::human_bytes;
use tessera_plan::cost::{Device, StepCost};
use tessera_plan::Plan;

/// (trunk, layers, heads, batch, what, eager img/s, torch.compile img/s).
type Measured = (&'static str, u64, u64, u64, &'static str, f64, Option<f64>);

/// PyTorch 2.11 + timm on an H200, bf16 autocast, fused AdamW, clipping.
const PYTORCH: &[Measured] = &[
    ("vision_transformer", 12, 12, 256, "ViT-B/16", 2700.0, Some(3420.0)),
    ("vision_transformer", 12, 6, 256, "ViT-S/16", 5589.0, Some(8323.0)),
    ("vision_transformer", 12, 3, 256, "ViT-Ti/16", 8571.0, None),
    ("vision_transformer", 24, 16, 128, "ViT-L/16", 920.0, Some(1135.0)),
    ("convit", 12, 4, 128, "ConViT-Ti", 2578.0, None),
    ("convit", 12, 9, 128, "ConViT-S", 1408.0, Some(2475.0)),
    ("convit", 12, 16, 128, "ConViT-B", 852.0, None),
];

/// The report's section: text and the JSON keys `bytes_moved`, `flops`
/// and (with a device) `roofline`.
pub fn section(plan: &Plan, batch: u64, cfg: &Value, device: Option<&Device>) -> (String, Value) {
    let cost = StepCost::of(plan);
    let t = &cost.total;
    let mut text = format!(
        "  bytes moved per step {} ({} bytes: every kernel's operands read once, its result written once), {:.1} GFLOPs of matrix products\n",
        human_bytes(t.bytes_moved),
        t.bytes_moved,
        t.flops as f64 / 1e9
    );
    let dtypes: Vec<String> = t.bytes.iter().map(|(d, b)| format!("{d} {}", human_bytes(*b))).collect();
    text += &format!("    by dtype: {}\n", dtypes.join(", "));
    text += &format!(
        "    of which {} in passes beside library GEMMs (a prologue's operand through scratch, an epilogue's second pass: what fused-prologue GEMMs would not move)\n",
        human_bytes(t.beside_library)
    );
    let seconds = device.map(|d| cost.seconds(d));
    text += &format!(
        "    {:<20} {:>7} {:>12} {:>10}{}\n",
        "kernel class",
        "kernels",
        "bytes",
        "GFLOPs",
        if seconds.is_some() { "  roofline ms" } else { "" }
    );
    let mut classes = serde_json::Map::new();
    for (class, c) in &cost.by_class {
        let ms = seconds.as_ref().map(|(_, per)| per.get(class).copied().unwrap_or(0.0) * 1e3);
        text += &format!(
            "    {:<20} {:>7} {:>12} {:>10.1}{}\n",
            class.name(),
            c.kernels,
            human_bytes(c.bytes_moved),
            c.flops as f64 / 1e9,
            ms.map(|m| format!("  {m:>11.2}")).unwrap_or_default()
        );
        let mut entry = json!({ "kernels": c.kernels, "bytes": c.bytes_moved, "by_dtype": c.bytes, "flops": c.flops });
        if let Some(ms) = ms {
            entry["roofline_ms"] = json!(ms);
        }
        classes.insert(serde_json::to_value(class).unwrap_or_default().as_str().unwrap_or("?").to_string(), entry);
    }
    // The ops that move the most, for finding the next waste to remove.
    let mut by_op: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for (k, (_, c)) in cost.kernels.iter().enumerate() {
        let e = by_op.entry(plan.kernels[cost.kernel_index[k]].op.name()).or_default();
        e.0 += 1;
        e.1 += c.total_bytes();
    }
    let mut heaviest: Vec<_> = by_op.iter().collect();
    heaviest.sort_by_key(|(name, (_, bytes))| (std::cmp::Reverse(*bytes), *name));
    text += "    heaviest ops:";
    for (name, (n, bytes)) in heaviest.iter().take(8) {
        text += &format!(" {name} x{n} {};", human_bytes(*bytes));
    }
    text.pop();
    text += "\n";
    let by_op: serde_json::Map<String, Value> =
        by_op.iter().map(|(name, (n, b))| (name.to_string(), json!({ "kernels": n, "bytes": b }))).collect();
    // Every kernel, in execution order: the profile on paper.
    let per_kernel: Vec<Value> = cost
        .kernels
        .iter()
        .zip(&cost.kernel_index)
        .map(|((class, c), &k)| {
            let kernel = &plan.kernels[k];
            let shape = |v: usize| format!("{}{:?}", plan.values[v].dtype, plan.values[v].shape);
            let mut e = json!({
                "index": k, "op": kernel.op.name(), "scope": kernel.scope, "class": class,
                "inputs": kernel.inputs.iter().map(|&v| shape(v)).collect::<Vec<_>>(),
                "output": shape(kernel.output),
                "bytes": c.total_bytes(), "by_dtype": c.bytes, "flops": c.flops,
                "beside_library_gemm": c.serial_bytes,
            });
            if let Some(d) = device {
                e["roofline_us"] = json!(d.seconds(c) * 1e6);
            }
            e
        })
        .collect();
    let mut j = json!({
        "bytes_moved": { "total": t.bytes_moved, "beside_library_gemms": t.beside_library, "by_dtype": t.bytes, "by_class": classes, "by_op": by_op, "kernels": per_kernel },
        "flops": t.flops,
        "kernels_costed": t.kernels,
    });
    if let (Some(d), Some((s, _))) = (device, seconds) {
        let img_s = batch as f64 / s.max(1e-12);
        text += &format!(
            "  roofline on an {} ({:.0} TFLOP/s bf16, {:.1} TFLOP/s f32, {:.2} TB/s): {:.1} ms per step, {:.0} img/s (an estimate, not a measurement: no launch latency, no overlap, no cache reuse)\n",
            d.name.to_uppercase(),
            d.bf16_flops / 1e12,
            d.f32_flops / 1e12,
            d.bandwidth / 1e12,
            s * 1e3,
            img_s
        );
        let mut roofline = json!({
            "device": d.name, "bf16_flops": d.bf16_flops, "f32_flops": d.f32_flops, "bandwidth": d.bandwidth,
            "step_ms": s * 1e3, "img_per_sec": img_s,
        });
        match reference(cfg, batch) {
            Some((what, eager, compiled)) => {
                text += &format!(
                    "    PyTorch, {what} batch {batch} bf16 on an H200 (measured): {eager:.0} img/s eager{}\n",
                    compiled.map(|c| format!(", {c:.0} with torch.compile")).unwrap_or_default()
                );
                roofline["pytorch"] = json!({ "model": what, "device": "h200", "eager_img_per_sec": eager, "compile_img_per_sec": compiled });
            }
            None => text += "    (no PyTorch measurement of this model and batch to compare with)\n",
        }
        j["roofline"] = roofline;
    }
    (text, j)
}

/// PyTorch's figures for the config's model at `batch`, if measured.
fn reference(cfg: &Value, batch: u64) -> Option<(&'static str, f64, Option<f64>)> {
    let trunk = &cfg["MODEL"]["TRUNK"];
    let vt = &trunk["VISION_TRANSFORMERS"];
    let name = trunk["NAME"].as_str()?;
    let (layers, heads) = (vt["NUM_LAYERS"].as_u64()?, vt["NUM_HEADS"].as_u64()?);
    let (image, patch) = (vt["IMAGE_SIZE"].as_u64()?, vt["PATCH_SIZE"].as_u64()?);
    if (image, patch) != (224, 16) {
        return None;
    }
    PYTORCH.iter().find(|r| r.0 == name && r.1 == layers && r.2 == heads && r.3 == batch).map(|r| (r.4, r.5, r.6))
}
