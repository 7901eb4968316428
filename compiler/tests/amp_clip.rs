//! Mixed precision with gradient clipping on the shipped configs that use
//! both (MODEL.AMP_PARAMS.USE_AMP, MODEL.GRAD_CLIP): clipping and the
//! optimizer run in f32 on the f32 copy of each gradient, as PyTorch's
//! clip_grad_norm_ and optimizer.step on the f32 .grad under autocast.

use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::ir::{BinaryOp, DType, Op};
use tessera_compiler::passes;
use tessera_compiler::pipeline::{training_graph, PassChoice};

#[test]
fn shipped_amp_configs_clip_f32_gradients_by_an_f32_coefficient() {
    let prog = Program::load(&[]).unwrap();
    // The AMP pipeline before elementwise fusion, so every op is visible.
    let names: Vec<&str> = passes::default_for(true)
        .into_iter()
        .filter(|p| !matches!(*p, "fuse-elementwise" | "fuse-optimizer"))
        .collect();
    for name in [
        "pretrain/vision_transformer/supervised/1gpu_vit_example",
        "pretrain/vision_transformer/moco/vit_b16",
        "pretrain/vision_transformer/simclr/vit_l16",
    ] {
        let cfg = config::load(name, &[]).unwrap();
        assert!(tessera_compiler::pipeline::uses_amp(cfg.tree()), "{name} uses AMP");
        let (g, _, _) = training_graph(&prog, cfg.tree(), PassChoice::passes(names.clone())).unwrap();
        let grads: Vec<_> = g.outputs().iter().filter(|(n, _)| n.starts_with("grad.")).collect();
        assert!(grads.len() > 50, "{name}: {} gradients", grads.len());
        let mut coefs = Vec::new();
        let mut from_bf16 = 0;
        for (grad_name, v) in &grads {
            // grad.<p> = mul(f32 gradient, f32 coefficient), in f32.
            assert!(
                matches!(g.node(*v).op, Op::Binary(BinaryOp::Mul)),
                "{name}: {grad_name} is {}",
                g.node(*v).op.name()
            );
            let [d, c] = g.operands(*v)[..] else { panic!("{name}: {grad_name} has not two operands") };
            let types = (g.ty(*v).dtype, g.ty(d).dtype, g.ty(c).dtype);
            assert_eq!(types, (DType::F32, DType::F32, DType::F32), "{name}: {grad_name}");
            // Configs for several processes average each gradient (in f32)
            // before clipping.
            let d = if matches!(g.node(d).op, Op::AllReduce { .. }) {
                assert_eq!(g.ty(d).dtype, DType::F32, "{name}: {grad_name}'s all-reduce");
                g.operands(d)[0]
            } else {
                d
            };
            if matches!(g.node(d).op, Op::Cast { .. }) && g.ty(g.operands(d)[0]).dtype == DType::BF16 {
                from_bf16 += 1;
            }
            if !coefs.contains(&c) {
                coefs.push(c);
            }
        }
        assert_eq!(coefs.len(), 1, "{name}: one clip coefficient");
        assert!(from_bf16 > grads.len() / 3, "{name}: {from_bf16} gradients are f32 casts of bf16 products");
        // No op of the optimizer step computes in bf16, and nothing casts the
        // coefficient (every reader of it is f32).
        for v in g.node_ids() {
            let node = g.node(v);
            if node.scope.split('.').next() == Some("optim") {
                assert_eq!(g.ty(v).dtype, DType::F32, "{name}: {} in {} is bf16", node.op.name(), node.scope);
            }
        }
        for u in g.users(coefs[0]) {
            assert_eq!(g.ty(u).dtype, DType::F32, "{name}: {} reads the coefficient", g.node(u).op.name());
        }
    }
}
