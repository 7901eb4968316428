//! Training-step throughput on the CPU: tessera's training plan on the CPU
//! executor against the same model in libtorch (eager forward, backward,
//! AdamW step through tch), in one process, on the same threads.
//!
//! Run (one command, from the repository root):
//!
//!     eval "$(./scripts/setup-libtorch.sh)" && cargo run --release --features torch-oracle --example bench_train_step
//!
//! Options (environment): `BENCH_THREADS` (default 2: libtorch's intra-op
//! threads and rayon's pool), `BENCH_WARMUP` (default 5 steps each),
//! `BENCH_REPS` (default 9 timed repetitions each), `BENCH_STEPS` (default 5
//! steps per repetition), `BENCH_PROFILE=0` to skip the per-kernel profile.
//!
//! Model: ViT on 32x32 images, patch 4 (64 tokens + class token), width 96,
//! depth 4, 3 heads, MLP 384, linear head to 10 classes, cross entropy;
//! batch 64; AdamW (lr 1e-3, weight decay 0.05). tessera builds it from
//! `quickstart/vit_tiny` with overrides; libtorch runs the eager model of
//! `tests/oracle/models.rs` from tessera's initial weights. Repetitions of
//! the two alternate, so drift in the machine affects both; the reported
//! figure is the median over repetitions of images per second.
//!
//! Afterwards, the tessera step is replayed kernel by kernel from the
//! outside (`tessera_runtime::cpu::run_kernel` on the plan's kernels) to show
//! which kernels dominate, and libtorch's step is split into forward,
//! backward and optimizer.

#[path = "common/bench.rs"]
mod bench;
#[path = "../tests/oracle/models.rs"]
mod models;

use bench::{env_usize, median, tiny_vit_overrides, BATCH};

use models::{labels, normal_values, ModelSpec, Params};
use std::collections::HashMap;
use std::time::Instant;
use tch::nn::{self, OptimizerConfig};
use tch::Tensor as TT;
use tessera_compiler::autodiff::{Optimizer, StepOptions};
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::ir::Op;
use tessera_compiler::pipeline::training_plan;
use tessera_compiler::plan::Source;
use tessera_runtime::cpu::{multi_tensor, pool, run_kernel, typed, CpuExecutor, Ctx};
use tessera_runtime::Tensor;

const LR: f64 = 1e-3;

/// A tessera tensor as a libtorch one.
fn tch_of(t: &Tensor) -> TT {
    TT::from_slice(t.as_f32().unwrap()).reshape(t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>())
}

fn main() {
    let threads = env_usize("BENCH_THREADS", 2);
    // rayon reads this when its global pool starts (the first parallel kernel).
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    tch::set_num_threads(threads as i32);
    tch::manual_seed(0);
    let (warmup, reps, steps) = (env_usize("BENCH_WARMUP", 5), env_usize("BENCH_REPS", 9), env_usize("BENCH_STEPS", 5));

    let overrides = tiny_vit_overrides();
    let cfg = config::load("quickstart/vit_tiny", &overrides).unwrap_or_else(|e| panic!("{e}"));
    let prog = Program::load(&[]).expect("embedded models");
    let (plan, compiled) = training_plan(&prog, cfg.tree(), BATCH as u64).unwrap_or_else(|e| panic!("{e}"));
    let Optimizer::AdamW { beta1, beta2, eps } = StepOptions::from_config(cfg.tree()).unwrap().optimizer else {
        panic!("the benchmark uses AdamW")
    };
    let spec = ModelSpec::from_config(cfg.tree());
    let mut ex = CpuExecutor::new(plan, 0).unwrap_or_else(|e| panic!("{e}"));
    let trainable: Vec<String> =
        compiled.graph.params().iter().filter(|(_, _, t)| *t).map(|(_, n, _)| n.to_string()).collect();
    let n_params: usize = trainable.iter().map(|n| ex.state(n).unwrap().numel()).sum();

    // One fixed batch for both.
    let img = spec.vit.image_size;
    let data = normal_values(1, BATCH * 3 * img * img);
    let target = labels(2, BATCH, 10);
    let data_t = TT::from_slice(&data).reshape([BATCH as i64, 3, img as i64, img as i64]);
    let target_t = TT::from_slice(&target);

    // libtorch: tessera's initial weights in a VarStore, libtorch's AdamW.
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let params = Params::in_var_store(&vs, trainable.iter().map(|n| (n.clone(), tch_of(ex.state(n).unwrap()))));
    let mut opt = nn::AdamW { beta1, beta2, wd: 0.05, eps, amsgrad: false }.build(&vs, LR).unwrap();

    let mut tessera_t = 0i32;
    let tessera_inputs = |t: i32| -> Vec<(String, Tensor)> {
        let scalar = |v: f64| Tensor::f32(vec![], vec![v as f32]);
        let mut v: Vec<(String, Tensor)> = vec![
            ("data".into(), Tensor::f32(vec![BATCH, 3, img, img], data.clone())),
            ("target".into(), Tensor::i64(vec![BATCH], target.clone())),
            ("optim.bias_correction1".into(), scalar(1.0 - beta1.powi(t))),
            ("optim.bias_correction2".into(), scalar(1.0 - beta2.powi(t))),
        ];
        for g in &compiled.param_groups {
            v.push((format!("optim.lr.{}", g.name), scalar(LR)));
            v.push((format!("optim.weight_decay.{}", g.name), scalar(g.weight_decay)));
        }
        v
    };
    let mut tessera_step = |ex: &mut CpuExecutor| -> f32 {
        tessera_t += 1;
        let owned = tessera_inputs(tessera_t);
        let inputs: Vec<(&str, Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let out = ex.run(&inputs).unwrap_or_else(|e| panic!("{e}"));
        out["loss"].as_f32().unwrap()[0]
    };
    let mut torch_step = || -> f32 {
        opt.zero_grad();
        let logits = models::forward(&spec, &params, &data_t);
        let loss = models::loss(&spec, &logits, &target_t);
        loss.backward();
        opt.step();
        f32::try_from(&loss).unwrap()
    };

    println!(
        "bench_train_step: ViT 32x32/4, width {}, depth {}, heads {}, MLP {}, {} params, batch {BATCH}, AdamW",
        spec.vit.dim, spec.vit.layers, spec.vit.heads, spec.vit.mlp_dim, n_params
    );
    println!(
        "threads: libtorch {} (intra-op), rayon {} (RAYON_NUM_THREADS); {} CPUs; warm-up {warmup}, {reps} repetitions of {steps} steps",
        tch::get_num_threads(),
        threads,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let (mut l0t, mut l0x) = (0.0, 0.0);
    for i in 0..warmup {
        let (a, b) = (tessera_step(&mut ex), torch_step());
        if i == 0 {
            (l0t, l0x) = (a, b);
        }
    }
    let (mut tes, mut tor) = (Vec::new(), Vec::new());
    let (mut lt, mut lx) = (0.0, 0.0);
    for _ in 0..reps {
        let s = Instant::now();
        for _ in 0..steps {
            lt = tessera_step(&mut ex);
        }
        tes.push((steps * BATCH) as f64 / s.elapsed().as_secs_f64());
        let s = Instant::now();
        for _ in 0..steps {
            lx = torch_step();
        }
        tor.push((steps * BATCH) as f64 / s.elapsed().as_secs_f64());
    }
    let (mt, mx) = (median(tes.clone()), median(tor.clone()));
    println!("first-step loss: tessera {l0t:.5}, libtorch {l0x:.5}; last loss: tessera {lt:.5}, libtorch {lx:.5}");
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
    println!("tessera  img/s per repetition: {}", fmt(&tes));
    println!("libtorch img/s per repetition: {}", fmt(&tor));
    println!("tessera:  {mt:.1} img/s ({:.1} ms/step)", 1e3 * BATCH as f64 / mt);
    println!("libtorch: {mx:.1} img/s ({:.1} ms/step)", 1e3 * BATCH as f64 / mx);
    println!("ratio tessera/libtorch: {:.3}", mt / mx);

    if std::env::var("BENCH_PROFILE").map(|v| v == "0").unwrap_or(false) {
        return;
    }

    // libtorch's step split into forward (+ loss), backward, optimizer.
    let mut phases = [0f64; 3];
    let prof_steps = 5;
    for _ in 0..prof_steps {
        opt.zero_grad();
        let s = Instant::now();
        let logits = models::forward(&spec, &params, &data_t);
        let loss = models::loss(&spec, &logits, &target_t);
        phases[0] += s.elapsed().as_secs_f64();
        let s = Instant::now();
        loss.backward();
        phases[1] += s.elapsed().as_secs_f64();
        let s = Instant::now();
        opt.step();
        phases[2] += s.elapsed().as_secs_f64();
    }
    let ms = |x: f64| 1e3 * x / prof_steps as f64;
    println!(
        "\nlibtorch per step: forward {:.1} ms, backward {:.1} ms, AdamW {:.1} ms",
        ms(phases[0]),
        ms(phases[1]),
        ms(phases[2])
    );

    // tessera's step replayed kernel by kernel (same kernels, same order).
    let plan = ex.plan().clone();
    let owned = tessera_inputs(tessera_t + 1);
    let given: HashMap<&str, &Tensor> = owned.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let loss_value = plan.outputs.iter().find(|(n, _)| n == "loss").map(|(_, v)| *v).expect("a loss");
    let loss_kernel = plan.kernels.iter().position(|k| k.output == loss_value).expect("a loss kernel");
    let mut last_use = vec![None; plan.values.len()];
    for (i, k) in plan.kernels.iter().enumerate() {
        for &j in &k.inputs {
            last_use[j] = Some(i);
        }
    }
    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    let mut by_shape: HashMap<String, (f64, usize, f64)> = HashMap::new();
    let mut by_phase = [0f64; 3];
    let mut total = 0.0;
    for rep in 0..prof_steps {
        let mut vals: Vec<Option<Tensor>> = plan
            .values
            .iter()
            .map(|v| match &v.source {
                Source::Input { name } => Some(given[name.as_str()].clone()),
                Source::Param { name, .. } | Source::Buffer { name, .. } => Some(ex.state(name).unwrap().clone()),
                Source::Fill { value } => {
                    Some(Tensor::full(v.shape.iter().map(|&d| d as usize).collect(), v.dtype, *value))
                }
                Source::Kernel(_) | Source::Part { .. } => None,
            })
            .collect();
        let ctx = Ctx {
            training: plan.training,
            seed: ex.seed(),
            step: 1000 + rep,
            bf16_operands: 0,
            bf16_result: false,
            dist: None,
        };
        for (i, k) in plan.kernels.iter().enumerate() {
            // As the executor: a reshape of a kernel result read for the last
            // time moves it; every other kernel runs on its operands.
            let movable = matches!(k.op, Op::Reshape { .. } | Op::StopGradient)
                && last_use[k.inputs[0]] == Some(i)
                && matches!(plan.values[k.inputs[0]].source, Source::Kernel(_));
            let s = Instant::now();
            let y = if movable {
                let mut t = vals[k.inputs[0]].take().expect("operand computed");
                t.shape = plan.values[k.output].shape.iter().map(|&d| d as usize).collect();
                t
            } else if let Op::MultiTensor { body, arity, results } = &k.op {
                // The optimizer: timed, its parts (state updates, read by no kernel) dropped.
                let xs: Vec<&Tensor> = k.inputs.iter().map(|&j| vals[j].as_ref().expect("operand computed")).collect();
                let sets = multi_tensor(&xs, body, *arity as usize, results).expect("multi-tensor kernel");
                sets.into_iter().flatten().for_each(pool::recycle);
                Tensor::f32(vec![0], vec![])
            } else {
                let xs: Vec<&Tensor> = k.inputs.iter().map(|&j| vals[j].as_ref().expect("operand computed")).collect();
                run_kernel(&k.op, &xs, &typed(&ctx, &plan, i))
                    .unwrap_or_else(|e| panic!("kernel {i} {}: {e}", k.op.name()))
            };
            let dt = s.elapsed().as_secs_f64();
            vals[k.output] = Some(y);
            // Free what no later kernel reads, into the buffer pool as the executor does.
            for &j in &k.inputs {
                if last_use[j] == Some(i) {
                    if let Some(t) = vals[j].take() {
                        pool::recycle(t);
                    }
                }
            }
            let e = by_op.entry(k.op.name().to_string()).or_default();
            e.0 += dt;
            e.1 += 1;
            let shapes: Vec<String> = k.inputs.iter().map(|&j| format!("{:?}", plan.values[j].shape)).collect();
            let key = match &k.op {
                Op::MultiTensor { arity, .. } => {
                    format!("multi_tensor over {} tensor sets", k.inputs.len() / *arity as usize)
                }
                _ => format!("{} {}", k.op.name(), shapes.join(" ")),
            };
            let flops = match k.op {
                // 2 * (output elements) * (contracted length)
                Op::Matmul { .. } | Op::Linear => {
                    // The contracted dim: a's last, or its second to last when read transposed.
                    let a = &plan.values[k.inputs[0]].shape;
                    let inner = match k.op {
                        Op::Matmul { transpose_a: true, .. } => a[a.len() - 2],
                        _ => *a.last().unwrap(),
                    };
                    2.0 * plan.values[k.output].numel() as f64 * inner as f64
                }
                _ => 0.0,
            };
            let e = by_shape.entry(key).or_default();
            e.0 += dt;
            e.1 += 1;
            e.2 += flops;
            let phase = if k.scope.starts_with("optim") {
                2
            } else if i <= loss_kernel {
                0
            } else {
                1
            };
            by_phase[phase] += dt;
            total += dt;
        }
    }
    println!(
        "tessera per step (kernel replay, {} kernels): forward {:.1} ms, backward {:.1} ms, clip+AdamW {:.1} ms, total {:.1} ms",
        plan.kernels.len(),
        ms(by_phase[0]),
        ms(by_phase[1]),
        ms(by_phase[2]),
        ms(total)
    );
    let mut ops: Vec<(String, (f64, usize))> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1 .0.partial_cmp(&a.1 .0).unwrap());
    println!("tessera kernels by total time per step:");
    for (name, (t, n)) in ops.iter().take(15) {
        println!(
            "  {name:<24} {:>7.2} ms {:>5.1}%  ({} calls/step)",
            ms(*t),
            100.0 * t / total,
            n / prof_steps as usize
        );
    }
    let mut shapes: Vec<(String, (f64, usize, f64))> = by_shape.into_iter().collect();
    shapes.sort_by(|a, b| b.1 .0.partial_cmp(&a.1 .0).unwrap());
    println!("tessera kernels by operand shapes (top 30), time per step:");
    for (key, (t, n, flops)) in shapes.iter().take(30) {
        let rate = if *flops > 0.0 { format!("  {:.1} GFLOP/s", flops / t / 1e9) } else { String::new() };
        println!("  {:>7.2} ms {:>5.1}%  x{:<3} {key}{rate}", ms(*t), 100.0 * t / total, n / prof_steps as usize);
    }
}
