//! Trains the tiny ViT of `configs/quickstart/vit_tiny.yaml` for 50 AdamW
//! steps on one fixed batch of random images on the CPU backend, printing the
//! loss as it falls. Run: `cargo run --release --example train_tiny_vit`.

use tessera_compiler::autodiff::{Optimizer, StepOptions};
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::training_plan;
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::philox::Stream;
use tessera_runtime::Tensor;

/// Runs `steps` training steps and returns the loss of each.
pub fn train(steps: usize, verbose: bool) -> Vec<f32> {
    let cfg = config::load("quickstart/vit_tiny", &[]).expect("embedded config");
    let prog = Program::load(&[]).expect("embedded models");
    let batch = 16u64;
    let (plan, compiled) = training_plan(&prog, cfg.tree(), batch).unwrap_or_else(|e| panic!("{e}"));
    let Optimizer::AdamW { beta1, beta2, .. } = StepOptions::from_config(cfg.tree()).unwrap().optimizer else {
        panic!("the quickstart config uses AdamW");
    };
    let mut ex = CpuExecutor::new(plan, 0).unwrap_or_else(|e| panic!("{e}"));

    // One fixed batch of random images and labels: the model must memorise it.
    let s = Stream::new(1, 0, 0);
    let pixels = (batch * 3 * 32 * 32) as usize;
    let data =
        Tensor::f32(vec![batch as usize, 3, 32, 32], (0..pixels as u64).map(|i| s.uniform_at(i) * 2.0 - 1.0).collect());
    let target = Tensor::i64(vec![batch as usize], (0..batch).map(|i| (s.u32_at(1 << 20 | i) % 10) as i64).collect());
    let scalar = |v: f64| Tensor::f32(vec![], vec![v as f32]);

    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let t = (step + 1) as i32;
        let mut owned: Vec<(String, Tensor)> = vec![
            ("data".into(), data.clone()),
            ("target".into(), target.clone()),
            ("optim.bias_correction1".into(), scalar(1.0 - beta1.powi(t))),
            ("optim.bias_correction2".into(), scalar(1.0 - beta2.powi(t))),
        ];
        for g in &compiled.param_groups {
            owned.push((format!("optim.lr.{}", g.name), scalar(1e-3)));
            owned.push((format!("optim.weight_decay.{}", g.name), scalar(g.weight_decay)));
        }
        let inputs: Vec<(&str, Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let out = ex.run(&inputs).unwrap_or_else(|e| panic!("{e}"));
        let loss = out["loss"].as_f32().expect("f32 loss")[0];
        if verbose && (step % 5 == 0 || step + 1 == steps) {
            println!("step {step:>3}  loss {loss:.4}");
        }
        losses.push(loss);
    }
    losses
}

#[allow(dead_code)]
fn main() {
    let losses = train(50, true);
    println!("loss {:.4} -> {:.4}", losses[0], losses[losses.len() - 1]);
}
