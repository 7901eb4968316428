//! MoCo's key encoder (reference 4.1) step by step on the CPU: on the first
//! step it is a copy of the online model; afterwards
//! `theta_k <- m * theta_k + (1 - m) * theta_q`, with the online weights as
//! they were before that step's optimizer update.

use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::training_plan;
use tessera_compiler::plan::Source;
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::Tensor;

fn inputs(ex: &CpuExecutor, t: i32, m: f32) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for v in &ex.plan().values {
        let Source::Input { name } = &v.source else { continue };
        let shape: Vec<usize> = v.shape.iter().map(|&d| d as usize).collect();
        let n: usize = shape.iter().product();
        let t = match name.as_str() {
            "loss.moco_momentum" => Tensor::scalar_f32(m),
            "optim.bias_correction1" => Tensor::scalar_f32(1.0 - 0.9f32.powi(t)),
            "optim.bias_correction2" => Tensor::scalar_f32(1.0 - 0.999f32.powi(t)),
            s if s.starts_with("optim.lr.") => Tensor::scalar_f32(1e-2),
            s if s.starts_with("optim.weight_decay.") => Tensor::scalar_f32(0.05),
            _ => Tensor::f32(
                shape,
                (0..n).map(|i| ((i * 7919 + name.len() * 31 + t as usize) % 997) as f32 / 500.0 - 1.0).collect(),
            ),
        };
        out.push((name.clone(), t));
    }
    out
}

fn run(ex: &mut CpuExecutor, t: i32, m: f32) {
    let owned = inputs(ex, t, m);
    let given: Vec<(&str, Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    ex.run(&given).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_key_encoder_copies_then_follows_the_online_weights() {
    let cfg = config::load("quickstart/moco_vit_tiny", &[]).unwrap();
    let prog = Program::load(&[]).unwrap();
    let (plan, _) = training_plan(&prog, cfg.tree(), 4).unwrap_or_else(|e| panic!("{e}"));
    let mut ex = CpuExecutor::new(plan, 3).unwrap();
    let encoder: Vec<(String, String)> = ex
        .state_names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("loss.moco_encoder.").map(|o| (n.clone(), o.to_string())))
        .collect();
    assert!(encoder.len() > 10, "{encoder:?}");
    let online = |ex: &CpuExecutor| -> Vec<Vec<f32>> {
        encoder.iter().map(|(_, o)| ex.state(o).unwrap().as_f32().unwrap().to_vec()).collect()
    };
    let keys = |ex: &CpuExecutor| -> Vec<Vec<f32>> {
        encoder.iter().map(|(k, _)| ex.state(k).unwrap().as_f32().unwrap().to_vec()).collect()
    };
    let before1 = online(&ex);
    run(&mut ex, 1, 0.0);
    assert_eq!(keys(&ex), before1, "step 1: the key encoder is the online model before its update");
    assert_ne!(online(&ex), before1, "the online model was updated");
    let (k1, q1) = (keys(&ex), online(&ex));
    let m = 0.9f32;
    run(&mut ex, 2, m);
    for ((k2, k1), q1) in keys(&ex).iter().zip(&k1).zip(&q1) {
        for ((a, b), q) in k2.iter().zip(k1).zip(q1) {
            let want = b * m + q * (1.0 - m);
            assert!((a - want).abs() <= 1e-6 * want.abs().max(1.0), "{a} vs {want}");
        }
    }
}
