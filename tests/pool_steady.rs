//! Every kernel result comes from the buffer pool and goes back to it, so a
//! training loop in steady state holds the same pooled bytes after every
//! step. A kernel that allocated its result elsewhere would make the pool
//! grow by that result each step (up to its 1 GiB cap): the quickstart once
//! grew 230 MB per epoch that way. One test per binary: the pool is global.

use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::training_plan;
use tessera_compiler::plan::Source;
use tessera_runtime::cpu::{pool, CpuExecutor};
use tessera_runtime::Tensor;

#[test]
fn the_pool_holds_the_same_bytes_after_every_step() {
    let prog = Program::load(&[]).unwrap();
    for name in [
        "quickstart/vit_tiny",
        "quickstart/deit_tiny",
        "quickstart/convit_tiny",
        "quickstart/moco_vit_tiny",
        "quickstart/simclr_vit_tiny",
        "quickstart/swav_vit_tiny",
    ] {
        let cfg = config::load(name, &["MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1".into()]).unwrap();
        let (plan, _) = training_plan(&prog, cfg.tree(), 4).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut ex = CpuExecutor::new(plan, 0).unwrap();
        let inputs: Vec<(String, Tensor)> = ex
            .plan()
            .values
            .iter()
            .filter_map(|v| match &v.source {
                Source::Input { name } => {
                    let shape: Vec<usize> = v.shape.iter().map(|&d| d as usize).collect();
                    let n: usize = shape.iter().product();
                    Some((
                        name.clone(),
                        if v.dtype.is_float() {
                            let k = *shape.last().unwrap_or(&1) as f32;
                            Tensor::f32(
                                shape,
                                (0..n).map(|i| if name == "target" { 1.0 / k } else { (i % 7) as f32 * 0.1 }).collect(),
                            )
                        } else {
                            Tensor::i64(shape, vec![0; n])
                        },
                    ))
                }
                _ => None,
            })
            .collect();
        let given: Vec<(&str, Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let mut held = Vec::new();
        for _ in 0..5 {
            ex.run(&given).unwrap_or_else(|e| panic!("{name}: {e}"));
            held.push(pool::held_bytes());
        }
        assert!(held[2..].windows(2).all(|w| w[0] == w[1]), "{name}: pooled bytes per step {held:?}");
    }
}
