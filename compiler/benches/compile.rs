//! Compile speed of ViT-L/16 (timm layout): parse every model file,
//! elaborate and verify its IR (target: under 50 ms); and the whole training
//! step with AMP: autodiff, every pass, the verifier, lowering
//! for batch 128 and memory planning (target: under 500 ms).
//! Run: `cargo bench -p tessera-compiler`.

use criterion::{criterion_group, criterion_main, Criterion};
use tessera_compiler::pipeline::{lower_training, training_graph, PassChoice};
use tessera_compiler::{config, elaborate::Program};

fn vit_l16(c: &mut Criterion) {
    let overrides: Vec<String> = [
        "MODEL.TRUNK.VISION_TRANSFORMERS.QKV_BIAS=true",
        "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=24",
        "MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM=1024",
        "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_HEADS=16",
        "MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=4096",
        "MODEL.HEAD.PARAMS=[[mlp, {dims: [1024, 1000]}]]",
    ]
    .map(String::from)
    .to_vec();
    let cfg = config::load("pretrain/vision_transformer/supervised/16gpu_deit_b_example", &overrides).unwrap();
    c.bench_function("parse+elaborate+verify ViT-L/16", |b| {
        b.iter(|| {
            let prog = Program::load(&[]).unwrap();
            let compiled = tessera_compiler::compile(&prog, cfg.tree()).unwrap();
            compiled.graph.verify().unwrap();
            compiled.graph.node_count()
        })
    });
    let mut amp = overrides.clone();
    amp.push("MODEL.AMP_PARAMS.USE_AMP=true".into());
    let cfg = config::load("pretrain/vision_transformer/supervised/16gpu_deit_b_example", &amp).unwrap();
    c.bench_function("training step ViT-L/16: autodiff, every pass, verify, lowering, memory plan", |b| {
        b.iter(|| {
            let prog = Program::load(&[]).unwrap();
            let choice = PassChoice::for_config(cfg.tree());
            let (step, _, _) = training_graph(&prog, cfg.tree(), choice).unwrap();
            step.verify().unwrap();
            let plan = lower_training(&step, 128).unwrap();
            plan.memory.map(|m| m.peak_bytes)
        })
    });
}

criterion_group!(benches, vit_l16);
criterion_main!(benches);
