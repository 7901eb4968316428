//! `tessera bench config=NAME --device gpu`: the training step of a config
//! on a device, timed: the compiled plan for the device's target run on
//! random inputs of the plan's types (each step uploads its inputs, as a
//! real step does), after warm-up steps; the median step time and the
//! images per second it implies, the planned peak memory and, on a GPU, the
//! device memory the executor took (free memory before and after it was
//! made). What scripts/gpu-check.sh sets beside PyTorch's figures.

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use std::time::Instant;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::training_plan_for;
use tessera_compiler::plan::Target;
use tessera_runtime::{Backend, Device, Executor, Tensor};

pub struct BenchArgs {
    pub name: String,
    pub overrides: Vec<String>,
    pub device: Device,
    pub batch: Option<u64>,
    pub steps: u64,
    pub warmup: u64,
    pub json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let cfg = config::load(&a.name, &a.overrides).map_err(|e| anyhow!("{e}"))?;
    let mut tree = cfg.tree().clone();
    tree["DISTRIBUTED"]["NUM_NODES"] = 1.into();
    tree["DISTRIBUTED"]["NUM_PROC_PER_NODE"] = 1.into();
    let batch =
        a.batch.or_else(|| tree.pointer("/DATA/TRAIN/BATCHSIZE_PER_REPLICA").and_then(|v| v.as_u64())).unwrap_or(1);
    let target = if matches!(a.device, Device::Cpu | Device::CpuArena) { Target::Cpu } else { Target::Cuda };
    let prog = Program::load(&[]).map_err(|e| anyhow!("{e}"))?;
    let compile_start = Instant::now();
    let (plan, _) = training_plan_for(&prog, &tree, batch, target).map_err(|e| anyhow!("{e}"))?;
    let compile_ms = compile_start.elapsed().as_secs_f64() * 1e3;
    let planned = plan.memory.as_ref().map(|m| m.peak_bytes).unwrap_or(0);
    let backend = Backend::open(&a.device).map_err(|e| anyhow!("{e}"))?;
    let before = backend.memory();
    let load_start = Instant::now();
    let mut ex = backend.executor(plan.clone(), 0).map_err(|e| anyhow!("{e}"))?;
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    let after = backend.memory();
    let taken = match (before, after) {
        (Some((free_before, _)), Some((free_after, _))) => Some(free_before.saturating_sub(free_after)),
        _ => None,
    };
    let launches = match &ex {
        Executor::Cuda(c) => Some(c.launches()),
        _ => None,
    };
    let step = |ex: &mut Executor, i: u64| -> Result<f32> {
        let given = tessera_runtime::synthetic::step_inputs(&plan, i);
        let named: Vec<(&str, Tensor)> = given.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let wanted = |n: &str| n == "loss";
        let out = ex.run(&named, Some(&wanted)).map_err(|e| anyhow!("step {i}: {e}"))?;
        Ok(out.get("loss").and_then(|t| t.as_f32()).map(|v| v[0]).unwrap_or(f32::NAN))
    };
    for i in 0..a.warmup {
        step(&mut ex, i)?;
    }
    let mut times = Vec::new();
    let mut last_loss = f32::NAN;
    for i in 0..a.steps {
        let t = Instant::now();
        last_loss = step(&mut ex, a.warmup + i)?;
        times.push(t.elapsed().as_secs_f64());
    }
    let step_s = median(times);
    let report = json!({
        "config": cfg.name(),
        "device": backend.describe(),
        "batch": batch,
        "steps": a.steps,
        "step_ms": step_s * 1e3,
        "images_per_sec": batch as f64 / step_s,
        "planned_peak_bytes": planned,
        "measured_device_bytes": taken,
        "kernels": plan.kernels.len(),
        "launches_per_step": launches,
        "compile_ms": compile_ms,
        "load_ms": load_ms,
        "last_loss": last_loss,
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "{} on {}: batch {batch}, median step {:.2} ms over {} steps = {:.1} img/s; planned peak {:.2} GiB{}; {} kernels{}",
            cfg.name(),
            backend.describe(),
            step_s * 1e3,
            a.steps,
            batch as f64 / step_s,
            planned as f64 / (1u64 << 30) as f64,
            taken.map(|t| format!(", device memory taken {:.2} GiB", t as f64 / (1u64 << 30) as f64)).unwrap_or_default(),
            plan.kernels.len(),
            launches.map(|l| format!(" ({l} launches per step)")).unwrap_or_default(),
        );
    }
    Ok(())
}
