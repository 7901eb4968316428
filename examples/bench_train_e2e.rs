//! End-to-end CPU training throughput of the quickstart ViT
//! (`configs/quickstart/vit_tiny.yaml`): tessera's whole training loop
//! (`tessera_engine::trainer::train`: lr schedule, meters, logs, the final
//! checkpoint) against the same model and recipe in libtorch (eager forward,
//! cross entropy, backward, AdamW with the same cosine lr set every step, a
//! top-1 meter), both on the same batches held in memory; then tessera with
//! its data pipeline on (PNG decoding, RandomResizedCrop, flip, normalize in
//! a loader thread).
//!
//! Run (from the repository root):
//!
//!     eval "$(./scripts/setup-libtorch.sh)" && cargo run --release --features torch-oracle --example bench_train_e2e
//!
//! Options (environment): `BENCH_THREADS` (2), `BENCH_EPOCHS` (3 epochs of
//! the 5000-image folder per run), `BENCH_REPS` (3 alternating runs of each).

// This benchmark uses the helpers, not the shared step-benchmark model.
#[allow(dead_code)]
#[path = "common/bench.rs"]
mod bench;
#[path = "../tests/oracle/models.rs"]
mod models;

use bench::{env_usize, median};
use models::{ModelSpec, Params};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
use tch::nn::{self, OptimizerConfig};
use tch::Tensor as TT;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::training_plan;
use tessera_engine::data_source::PipelineSource;
use tessera_engine::source::{Batch, DataSource, InMemory, Labels};
use tessera_engine::trainer::{train, TrainSetup};
use tessera_runtime::cpu::CpuExecutor;

fn main() {
    let threads = env_usize("BENCH_THREADS", 2);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    tch::set_num_threads(threads as i32);
    let epochs = env_usize("BENCH_EPOCHS", 3);
    let reps = env_usize("BENCH_REPS", 3);

    let root = std::env::temp_dir().join(format!("tessera-bench-e2e-{}", std::process::id()));
    let folder = root.join("data");
    tessera_data::write_image_folder(&folder, &tessera_data::SynthOptions::default()).expect("synthetic folder");
    let run_dir = |tag: &str| root.join(tag);
    let overrides = |dir: &std::path::Path| -> Vec<String> {
        vec![
            format!("DATA.TRAIN.DATA_PATHS=[{}]", folder.join("train").display()),
            format!("OPTIMIZER.num_epochs={epochs}"),
            format!("CHECKPOINT.DIR={}", dir.display()),
            "CHECKPOINT.OVERWRITE_EXISTING=true".into(),
            "CHECKPOINT.CHECKPOINT_FREQUENCY=1000".into(),
            "TEST_MODEL=false".into(),
        ]
    };
    let cfg = config::load("quickstart/vit_tiny", &overrides(&run_dir("probe"))).unwrap_or_else(|e| panic!("{e}"));
    let tree = cfg.tree().clone();
    let prog = Program::load(&[]).expect("embedded models");

    // The training batches of one epoch, decoded and augmented once, in memory.
    let catalog = tessera_engine::data_source::catalog_path().unwrap();
    let mut source = PipelineSource::from_config(&tree, "TRAIN", 0, &catalog).unwrap_or_else(|e| panic!("{e}"));
    let batches: Vec<Batch> = source.epoch(0, 0).map(|b| b.unwrap()).collect();
    let batch = batches[0].size;
    let steps_per_epoch = batches.len();
    let images = (epochs * steps_per_epoch * batch) as f64;

    // libtorch: the same model, tessera's initial weights, AdamW, cosine lr.
    let spec = ModelSpec::from_config(&tree);
    let (plan, compiled) = training_plan(&prog, &tree, batch as u64).unwrap_or_else(|e| panic!("{e}"));
    let ex = CpuExecutor::new(plan, 0).unwrap();
    let trainable: Vec<String> =
        compiled.graph.params().iter().filter(|(_, _, t)| *t).map(|(_, n, _)| n.to_string()).collect();
    let torch_data: Vec<(TT, TT)> = batches
        .iter()
        .map(|b| {
            let x = &b.images[0].1;
            let dims: Vec<i64> = x.shape.iter().map(|&d| d as i64).collect();
            let Labels::Hard(y) = &b.labels else { panic!("the quickstart has class labels") };
            (TT::from_slice(x.as_f32().unwrap()).reshape(dims), TT::from_slice(y))
        })
        .collect();
    let torch_run = || -> f64 {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let params = Params::in_var_store(
            &vs,
            trainable.iter().map(|n| {
                let t = ex.state(n).unwrap();
                (
                    n.clone(),
                    TT::from_slice(t.as_f32().unwrap()).reshape(t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>()),
                )
            }),
        );
        let mut opt =
            nn::AdamW { beta1: 0.9, beta2: 0.999, wd: 0.05, eps: 1e-8, amsgrad: false }.build(&vs, 1e-3).unwrap();
        let total = (epochs * steps_per_epoch) as f64;
        let start = Instant::now();
        let mut correct = 0i64;
        for e in 0..epochs {
            for (i, (x, y)) in torch_data.iter().enumerate() {
                let w = (e * steps_per_epoch + i) as f64 / total;
                opt.set_lr(0.5 * 1e-3 * (1.0 + (std::f64::consts::PI * w).cos()));
                opt.zero_grad();
                let logits = models::forward(&spec, &params, x);
                let loss = models::loss(&spec, &logits, y);
                loss.backward();
                opt.step();
                let _ = f32::try_from(&loss).unwrap();
                correct += i64::try_from(logits.argmax(1, false).eq_tensor(y).sum(tch::Kind::Int64)).unwrap();
            }
        }
        let _ = correct;
        images / start.elapsed().as_secs_f64()
    };
    let tessera_run = |with_pipeline: bool, tag: &str| -> f64 {
        let dir = run_dir(tag);
        let cfg = config::load("quickstart/vit_tiny", &overrides(&dir)).unwrap();
        let source: Box<dyn DataSource> = if with_pipeline {
            Box::new(PipelineSource::from_config(cfg.tree(), "TRAIN", 0, &catalog).unwrap())
        } else {
            Box::new(InMemory { batches: batches.clone() })
        };
        let start = Instant::now();
        train(TrainSetup {
            cfg: cfg.tree(),
            prog: &prog,
            train: source,
            test: None,
            max_steps: None,
            stop: Arc::new(AtomicBool::new(false)),
            quiet: true,
            device: None,
            plans: None,
            world: None,
            origin: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        images / start.elapsed().as_secs_f64()
    };

    println!(
        "bench_train_e2e: quickstart/vit_tiny (32x32/8, width {}, depth {}), batch {batch}, {epochs} epochs of {steps_per_epoch} steps, {threads} threads",
        spec.vit.dim, spec.vit.layers
    );
    let (mut mem, mut tor, mut pipe) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..reps {
        mem.push(tessera_run(false, &format!("mem{r}")));
        tor.push(torch_run());
        pipe.push(tessera_run(true, &format!("pipe{r}")));
    }
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
    println!("tessera, data in memory   img/s per run: {}", fmt(&mem));
    println!("libtorch, data in memory  img/s per run: {}", fmt(&tor));
    println!("tessera, data pipeline on img/s per run: {}", fmt(&pipe));
    let (m, t, p) = (median(mem), median(tor), median(pipe));
    println!("ratio tessera/libtorch (data in memory): {:.3}", m / t);
    println!("ratio tessera with its data pipeline / libtorch with data in memory: {:.3}", p / t);
    let _ = std::fs::remove_dir_all(&root);
}
