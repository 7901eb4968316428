//! Compile speed: parse every model file, elaborate ViT-L/16 (timm layout)
//! and verify its IR. Target: under 50 ms. Run: `cargo bench -p tessera-compiler`.

use criterion::{criterion_group, criterion_main, Criterion};
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
}

criterion_group!(benches, vit_l16);
criterion_main!(benches);
