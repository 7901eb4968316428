//! CPU training-step throughput of the tiny ViT of `bench_train_step` with
//! the CPU pipeline's passes (`passes::default_for_cpu`, what
//! `training_plan` uses) against no passes at all (one kernel per op), in
//! one process, alternating repetitions; prints the ratio. No libtorch needed:
//!
//!     cargo run --release --example bench_fusion
//!
//! Options (environment): `BENCH_THREADS` (default 2), `BENCH_REPS` (default
//! 7 repetitions of `BENCH_STEPS`, default 5, steps each), `BENCH_PASSES`
//! (the passes of the fused plan, comma-separated; default: the CPU pipeline).

#[path = "common/bench.rs"]
mod bench;

use bench::{env_usize, median, tiny_vit_overrides, BATCH};
use std::time::Instant;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::{training_plan_with, PassChoice};
use tessera_compiler::plan::{Plan, Source};
use tessera_compiler::{config, passes};
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::Tensor;

/// Deterministic inputs: images in [-1, 1), labels 0..9, AdamW scalars for step t.
fn inputs(plan: &Plan, t: i32) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for v in &plan.values {
        let Source::Input { name } = &v.source else { continue };
        let shape: Vec<usize> = v.shape.iter().map(|&d| d as usize).collect();
        let n: usize = shape.iter().product();
        let t = match name.as_str() {
            "optim.bias_correction1" => Tensor::f32(shape, vec![1.0 - 0.9f32.powi(t)]),
            "optim.bias_correction2" => Tensor::f32(shape, vec![1.0 - 0.999f32.powi(t)]),
            s if s.starts_with("optim.lr.") => Tensor::f32(shape, vec![1e-3]),
            s if s.starts_with("optim.weight_decay.") => Tensor::f32(shape, vec![0.05]),
            "target" => Tensor::i64(shape, (0..n as i64).map(|i| i % 10).collect()),
            _ => Tensor::f32(shape, (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect()),
        };
        out.push((name.clone(), t));
    }
    out
}

fn main() {
    let threads = env_usize("BENCH_THREADS", 2);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let (reps, steps) = (env_usize("BENCH_REPS", 7), env_usize("BENCH_STEPS", 5));
    let overrides = tiny_vit_overrides();
    let cfg = config::load("quickstart/vit_tiny", &overrides).unwrap_or_else(|e| panic!("{e}"));
    let prog = Program::load(&[]).expect("embedded models");
    let build = |names: Vec<&str>| {
        let choice = PassChoice::passes(names);
        let (plan, _, _) =
            training_plan_with(&prog, cfg.tree(), BATCH as u64, choice).unwrap_or_else(|e| panic!("{e}"));
        CpuExecutor::new(plan, 0).unwrap_or_else(|e| panic!("{e}"))
    };
    let chosen = std::env::var("BENCH_PASSES").ok();
    let names: Vec<&str> = match &chosen {
        Some(list) => list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect(),
        None => passes::default_for_cpu(),
    };
    let mut fused = build(names);
    let mut unfused = build(vec![]);
    println!(
        "bench_fusion: tiny ViT (32x32/4, width 96, depth 4), batch {BATCH}, {threads} threads: {} kernels with every pass, {} with none",
        fused.plan().kernels.len(),
        unfused.plan().kernels.len()
    );
    let step = |ex: &mut CpuExecutor, t: &mut i32| -> f32 {
        *t += 1;
        let owned = inputs(ex.plan(), *t);
        let given: Vec<(&str, Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        ex.run(&given).unwrap_or_else(|e| panic!("{e}"))["loss"].as_f32().unwrap()[0]
    };
    let (mut tf, mut tu) = (0, 0);
    for _ in 0..3 {
        step(&mut fused, &mut tf);
        step(&mut unfused, &mut tu);
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (mut lf, mut lu) = (0.0, 0.0);
    for _ in 0..reps {
        let s = Instant::now();
        for _ in 0..steps {
            lf = step(&mut fused, &mut tf);
        }
        a.push((steps * BATCH) as f64 / s.elapsed().as_secs_f64());
        let s = Instant::now();
        for _ in 0..steps {
            lu = step(&mut unfused, &mut tu);
        }
        b.push((steps * BATCH) as f64 / s.elapsed().as_secs_f64());
    }
    let (mf, mu) = (median(a), median(b));
    println!("last loss: fused {lf:.5}, unfused {lu:.5}");
    println!("fused:   {mf:.1} img/s\nunfused: {mu:.1} img/s\nratio fused/unfused: {:.3}", mf / mu);
}
