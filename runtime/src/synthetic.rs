//! Synthetic inputs for a plan: a batch of the plan's input types for step
//! `step`, as a benchmark or a backend comparison needs them. Images are
//! uniform in [-1, 1], class targets fall below the model's output width,
//! soft targets are positive rows that sum to 1, and the optimizer's
//! per-step scalars are what the engine computes for AdamW (lr 1e-3, weight
//! decay 0.05, bias corrections of step + 1, MoCo's momentum 0 at the first
//! step then 0.99). Each input is drawn from its own Philox stream keyed by
//! its name, so two plans of one model (f32 and bf16) get the same batch.

use crate::philox::Stream;
use crate::tensor::Tensor;
use tessera_plan::{DType, Plan, Source};

/// The named inputs of `plan` for step `step`.
pub fn step_inputs(plan: &Plan, step: u64) -> Vec<(String, Tensor)> {
    let classes = ["output", "output.0"]
        .iter()
        .find_map(|n| plan.output(n))
        .map(|v| *plan.values[v].shape.last().unwrap_or(&2) as usize)
        .unwrap_or(2)
        .max(1);
    let mut out = Vec::new();
    for v in &plan.values {
        let Source::Input { name } = &v.source else { continue };
        let shape: Vec<usize> = v.shape.iter().map(|&d| d as usize).collect();
        let n: usize = shape.iter().product();
        let key = name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
        let s = Stream::new(77, step, key);
        let t = if v.dtype == DType::I64 {
            Tensor::i64(shape, (0..n as u64).map(|j| (s.u32_at(j) as usize % classes) as i64).collect())
        } else if name.starts_with("optim.lr") {
            Tensor::full(shape, v.dtype, 1e-3)
        } else if name.starts_with("optim.weight_decay") {
            Tensor::full(shape, v.dtype, 0.05)
        } else if name.starts_with("optim.bias_correction1") {
            Tensor::full(shape, v.dtype, 1.0 - 0.9f64.powi(step as i32 + 1))
        } else if name.starts_with("optim.bias_correction2") {
            Tensor::full(shape, v.dtype, 1.0 - 0.999f64.powi(step as i32 + 1))
        } else if name == "loss.moco_momentum" {
            Tensor::full(shape, v.dtype, if step == 0 { 0.0 } else { 0.99 })
        } else if name == "target" {
            let k = shape.last().copied().unwrap_or(1).max(1);
            let raw: Vec<f32> = (0..n as u64).map(|j| s.uniform_at(j) + 0.05).collect();
            let rows = raw.chunks(k).flat_map(|r| {
                let sum: f32 = r.iter().sum();
                r.iter().map(move |x| x / sum).collect::<Vec<_>>()
            });
            Tensor::f32(shape, rows.collect())
        } else {
            Tensor::f32(shape, (0..n as u64).map(|j| s.uniform_at(j) * 2.0 - 1.0).collect())
        };
        out.push((name.clone(), t));
    }
    out
}
