//! Compiler passes on the training step of every tiny reference model: the
//! kernel list after all passes (snapshots, so a fusion regression shows as a
//! diff), the verifier after each pass, and fused against unfused plans on
//! the CPU (same losses and updated parameters, dropout and drop path on).

use std::collections::BTreeMap;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::passes;
use tessera_compiler::pipeline::{training_plan_with, PassChoice};
use tessera_compiler::plan::{Plan, Source};
use tessera_compiler::{autodiff, compile};
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::Tensor;

const MODELS: [&str; 8] = [
    "quickstart/vit_tiny",
    "quickstart/deit_tiny",
    "quickstart/deit_tiny_distilled",
    "quickstart/convit_tiny",
    "quickstart/moco_vit_tiny",
    "quickstart/simclr_vit_tiny",
    "quickstart/swav_vit_tiny",
    "quickstart/vit_example_head",
];

fn plan(name: &str, overrides: &[&str], pass_names: &[&str]) -> Plan {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = config::load(name, &ov).unwrap();
    let prog = Program::load(&[]).unwrap();
    let choice = PassChoice::passes(pass_names.to_vec());
    let (plan, _, _) = training_plan_with(&prog, cfg.tree(), 2, choice).unwrap_or_else(|e| panic!("{name}: {e}"));
    plan
}

#[test]
fn kernel_lists_of_the_reference_models() {
    for name in MODELS {
        let fused = plan(name, &[], passes::DEFAULT);
        let unfused = plan(name, &[], &[]);
        let text = format!(
            "# {name}, training step, batch 2: {} kernels after {} ({} with no passes)\n{}",
            fused.kernels.len(),
            passes::DEFAULT.join(", "),
            unfused.kernels.len(),
            fused.kernel_listing()
        );
        assert!(fused.kernels.len() * 2 < unfused.kernels.len(), "{name}: fusion should at least halve the kernels");
        insta::assert_snapshot!(format!("kernels__{}", name.replace('/', "__")), text);
    }
}

#[test]
fn the_verifier_passes_after_every_pass() {
    let prog = Program::load(&[]).unwrap();
    for name in MODELS {
        let cfg = config::load(name, &[]).unwrap();
        let c = compile(&prog, cfg.tree()).unwrap();
        let opts = autodiff::StepOptions::from_config(cfg.tree()).unwrap();
        let mut g = autodiff::training_step(c.graph, &c.param_groups, &opts).unwrap();
        let mut seen = Vec::new();
        // Every pass, the optional ones too.
        let mut all = passes::default_for(true);
        all.push("schedule");
        let reports = passes::run(&mut g, &all, true, |p, g| {
            g.verify().unwrap_or_else(|e| panic!("{name}: after {p}: {e}"));
            seen.push(p.to_string());
        })
        .unwrap();
        assert_eq!(seen, all);
        // Only the precision pass adds nodes (its casts), the optimizer
        // rule one (the packed result: its parts replace the update ops),
        // slice-first the slices of the operands of an op it moves,
        // patch-linear two per patch embedding (the image's layout as
        // patches takes three views and a copy, the weight's a view), and
        // share-recompute two per kernel it gives a result 5 (the result and
        // its view as rows).
        let grew: Vec<&str> = reports.iter().filter(|r| r.nodes_after > r.nodes_before).map(|r| r.pass).collect();
        let allowed = ["amp-bf16", "fuse-optimizer", "slice-first", "patch-linear", "share-recompute"];
        assert!(grew.iter().all(|p| allowed.contains(p)), "{name}: {grew:?} added nodes");
        let shared = reports.iter().find(|r| r.pass == "share-recompute").unwrap();
        // "{gelus} GELUs and {norms} layer norms ..., for {n} weight gradients":
        // a kernel's result 5 and its view as rows are made once, however
        // many weight gradients read them.
        let counts: Vec<usize> = shared.detail.split(' ').filter_map(|w| w.parse().ok()).collect();
        let rewritten: usize = counts[..2].iter().sum();
        assert!(counts[2] >= rewritten, "{name}: {}", shared.detail);
        assert!(rewritten > 0, "{name}: {}", shared.detail);
        assert_eq!(shared.nodes_after, shared.nodes_before + 2 * rewritten, "{name}: {}", shared.detail);
        let opt = reports.iter().find(|r| r.pass == "fuse-optimizer").unwrap();
        assert_eq!(opt.nodes_after, opt.nodes_before + 1, "{name}: {}", opt.detail);
    }
}

/// Deterministic inputs for a plan: data in [-1, 1), class 0/1 targets,
/// uniform soft targets, and the optimizer's scalars for AdamW step `t`.
fn inputs(plan: &Plan, t: i32) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for v in &plan.values {
        let Source::Input { name } = &v.source else { continue };
        let shape: Vec<usize> = v.shape.iter().map(|&d| d as usize).collect();
        let n: usize = shape.iter().product();
        let t = match name.as_str() {
            s if s.starts_with("optim.bias_correction1") => Tensor::f32(shape, vec![1.0 - 0.9f32.powi(t)]),
            s if s.starts_with("optim.bias_correction2") => Tensor::f32(shape, vec![1.0 - 0.999f32.powi(t)]),
            s if s.starts_with("optim.lr.") => Tensor::f32(shape, vec![1e-3]),
            s if s.starts_with("optim.weight_decay.") => Tensor::f32(shape, vec![0.05]),
            _ if !v.dtype.is_float() => Tensor::i64(shape, (0..n as i64).map(|i| i % 2).collect()),
            "target" => {
                let k = *shape.last().unwrap();
                Tensor::f32(shape, vec![1.0 / k as f32; n])
            }
            _ => {
                let salt = name.len() as u64;
                let vals = (0..n as u64).map(|i| ((i * 2_654_435_761 + salt * 97) % 1000) as f32 / 500.0 - 1.0);
                Tensor::f32(shape, vals.collect())
            }
        };
        out.push((name.clone(), t));
    }
    out
}

/// Losses of three steps and every state after them.
fn train(plan: Plan) -> (Vec<f32>, BTreeMap<String, Tensor>) {
    let mut ex = CpuExecutor::new(plan, 7).unwrap();
    let mut losses = Vec::new();
    for t in 1..=3 {
        let owned = inputs(ex.plan(), t);
        let given: Vec<(&str, Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let out = ex.run(&given).unwrap_or_else(|e| panic!("{e}"));
        losses.push(out["loss"].as_f32().unwrap()[0]);
    }
    let states = ex.state_names().into_iter().map(|n| (n.clone(), ex.state(&n).unwrap().clone())).collect();
    (losses, states)
}

#[test]
fn fused_and_unfused_training_steps_agree() {
    let noisy = [
        "MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1",
        "MODEL.TRUNK.VISION_TRANSFORMERS.ATTENTION_DROPOUT_RATE=0.1",
        "MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.3",
    ];
    let amp = ["MODEL.AMP_PARAMS.USE_AMP=true"];
    let mut cases: Vec<(&str, &[&str])> = MODELS.iter().map(|m| (*m, &[][..])).collect();
    cases.push(("quickstart/vit_tiny", &noisy));
    cases.push(("quickstart/deit_tiny", &amp));
    cases.push(("quickstart/convit_tiny", &amp));
    // Recomputation (with DeiT's drop path: the recomputed masks must match).
    let block = ["MODEL.TRUNK.VISION_TRANSFORMERS.CHECKPOINT_BLOCK=true"];
    let mlp =
        ["MODEL.TRUNK.VISION_TRANSFORMERS.CHECKPOINT_MLP=true", "MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.2"];
    let segments = [
        "MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING=true",
        "MODEL.ACTIVATION_CHECKPOINTING.NUM_ACTIVATION_CHECKPOINTING_SPLITS=2",
    ];
    cases.push(("quickstart/deit_tiny", &block));
    cases.push(("quickstart/vit_tiny", &mlp));
    cases.push(("quickstart/vit_tiny", &segments));
    // The multi-tensor rule on SGD's programs (momentum, Nesterov, none).
    let nesterov = ["OPTIMIZER.name=sgd", "OPTIMIZER.momentum=0.9", "OPTIMIZER.nesterov=true"];
    let plain_sgd = ["OPTIMIZER.name=sgd", "OPTIMIZER.momentum=0.0"];
    cases.push(("quickstart/vit_tiny", &nesterov));
    cases.push(("quickstart/deit_tiny", &plain_sgd));
    for (name, overrides) in cases {
        let fused = plan(name, overrides, &passes::default_for(overrides == amp));
        assert!(fused.kernels.iter().any(|k| k.op.name() == "fused"), "{name}: nothing was fused");
        // Every parameter's update is a part of one multi-tensor kernel.
        let multi = fused.kernels.iter().filter(|k| k.op.name() == "multi_tensor").count();
        assert_eq!(multi, 1, "{name} {overrides:?}: {multi} optimizer kernels");
        for (pname, _) in fused.params() {
            let Some((_, u)) = fused.state_updates.iter().find(|(n, _)| n == pname) else { continue };
            // SwAV's prototypes are renormalised after their update (a row
            // norm, not elementwise), so their AdamW program stays on its own.
            let renormed = fused.kernels.iter().any(|k| k.op.name() == "l2_normalize" && k.output == *u);
            if renormed && pname.contains("prototypes") {
                continue;
            }
            assert!(
                matches!(fused.values[*u].source, Source::Part { .. }),
                "{name} {overrides:?}: {pname} is not updated by the multi-tensor kernel"
            );
        }
        if overrides == amp {
            let bf16 = fused.values.iter().filter(|v| v.dtype == tessera_compiler::ir::DType::BF16).count();
            assert!(bf16 > 10, "{name}: AMP made only {bf16} bf16 values");
        }
        let (lf, sf) = train(fused);
        // The reference: no recomputation and no passes but the forward
        // pattern rewrites (tested on their own below; a different float
        // order would be amplified by AdamW on gradients that are zero in
        // exact arithmetic, such as a bias before BatchNorm).
        let plain: Vec<&str> = overrides.iter().copied().filter(|o| !o.contains("CHECKPOINT")).collect();
        let (lu, su) = train(plan(name, &plain, passes::FORWARD));
        // AMP against this f32 reference: the CPU rounds bf16 values as a
        // GPU does, so losses move by bf16 roundings (8 significant bits),
        // and each AdamW step moves a parameter by at most about lr (here
        // 1e-3, |m^/sqrt(v^)| <= 1 over three steps), so two runs whose
        // gradients differ stay within 2 lr per step; the moments of
        // near-zero gradients are rounding noise and are not compared.
        let bf16 = overrides == amp;
        let loss_tol = if bf16 { 2e-2 } else { 1e-5 };
        for (a, b) in lf.iter().zip(&lu) {
            assert!((a - b).abs() <= loss_tol * b.abs().max(1.0), "{name} {overrides:?}: losses {lf:?} vs {lu:?}");
        }
        assert_eq!(sf.keys().collect::<Vec<_>>(), su.keys().collect::<Vec<_>>(), "{name}: same state");
        if bf16 {
            for (k, a) in sf.iter().filter(|(k, _)| !k.starts_with("optim.")) {
                let (Some(a), Some(b)) = (a.as_f32(), su[k].as_f32()) else { continue };
                let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 3.0 * 2.0 * 1e-3 + 1e-5, "{name} {overrides:?}: parameter {k} moved {worst} apart");
            }
            continue;
        }
        for (k, a) in &sf {
            let (a, b) = (a.as_f32(), su[k].as_f32());
            let (Some(a), Some(b)) = (a, b) else { continue };
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1e-2)).fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "{name} {overrides:?}: state {k} differs by {worst} (relative)");
        }
    }
}

/// Runs `g` (constant shapes) on the CPU in training mode with `inputs`; returns output `y`.
fn eval(g: &tessera_compiler::ir::Graph, inputs: &[(&str, Tensor)]) -> Vec<f32> {
    let plan = tessera_compiler::plan::lower(g, 1, true).unwrap();
    let mut ex = CpuExecutor::new(plan, 3).unwrap();
    let out = ex.run(inputs).unwrap_or_else(|e| panic!("{e}"));
    out["y"].as_f32().unwrap().to_vec()
}

fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 37 + salt * 11) % 101) as f32 - 50.0) / 40.0).collect()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{a:?} vs {b:?}");
    }
}

#[test]
fn hand_written_attention_becomes_one_attention_op() {
    use tessera_compiler::ir::{DType, Graph, Op, Shape};
    // softmax((q * 0.5) @ k^T * 0.25) with dropout, @ v; and a transposed-product variant.
    for (scale_q, transpose_product, p) in [(true, false, 0.2), (false, true, 0.0)] {
        let mut g = Graph::new();
        let s = Shape::consts(&[2, 3, 5, 4]);
        let q = g.add_input("q", s.clone(), DType::F32).unwrap();
        let k = g.add_input("k", s.clone(), DType::F32).unwrap();
        let v = g.add_input("v", s.clone(), DType::F32).unwrap();
        let q2 = if scale_q { g.add_op(Op::Scale { factor: 0.5 }, &[q], "attn").unwrap() } else { q };
        let scores = if transpose_product {
            g.add_op(Op::Matmul { transpose_a: false, transpose_b: true }, &[q2, k], "attn").unwrap()
        } else {
            let kt = g.add_op(Op::Permute { perm: vec![0, 1, 3, 2] }, &[k], "attn").unwrap();
            g.add_op(Op::matmul(), &[q2, kt], "attn").unwrap()
        };
        let scaled = g.add_op(Op::Scale { factor: 0.25 }, &[scores], "attn").unwrap();
        let mut probs = g.add_op(Op::Softmax { axis: 3 }, &[scaled], "attn").unwrap();
        if p > 0.0 {
            probs = g.add_op(Op::Dropout { p, key: 7 }, &[probs], "attn").unwrap();
        }
        let y = g.add_op(Op::matmul(), &[probs, v], "attn").unwrap();
        g.set_output("y", y);
        let inputs: Vec<(&str, Tensor)> = ["q", "k", "v"]
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, Tensor::f32(vec![2, 3, 5, 4], values(120, i))))
            .collect();
        let before = eval(&g, &inputs);
        let mut rewritten = g.clone();
        let report = passes::run(&mut rewritten, &["attention-pattern"], true, |_, _| {}).unwrap();
        assert_eq!(report[0].detail, "1 hand-written attentions recognised");
        let ops: Vec<&str> = rewritten.node_ids().iter().map(|&n| rewritten.node(n).op.name()).collect();
        assert!(ops.contains(&"attention") && !ops.contains(&"softmax") && !ops.contains(&"matmul"), "{ops:?}");
        let scale = if scale_q { 0.125 } else { 0.25 };
        let (s_, p_, key) = rewritten
            .node_ids()
            .into_iter()
            .find_map(|n| match rewritten.node(n).op {
                Op::Attention { scale, dropout, key } => Some((scale, dropout, key)),
                _ => None,
            })
            .unwrap();
        assert_eq!((s_, p_), (scale, p));
        if p > 0.0 {
            assert_eq!(key, 7, "the dropout's key, so the same mask");
        }
        close(&eval(&rewritten, &inputs), &before);
        // With the probabilities also an output, nothing is rewritten.
        let mut named = g.clone();
        named.set_output("probs", probs);
        let report = passes::run(&mut named, &["attention-pattern"], true, |_, _| {}).unwrap();
        assert_eq!(report[0].detail, "0 hand-written attentions recognised");
    }
}

/// timm's attention core on qkv [2, 7, 3*3*4] (split by reshape, permute and
/// slices; heads merged back by permute and reshape) and its backward for
/// dy [2, 7, 12], with attention dropout: the same numbers before and after
/// `packed-attention`, which leaves no permute or slice behind.
#[test]
fn packed_attention_keeps_the_numbers_of_the_split_it_replaces() {
    use tessera_compiler::ir::{DType, Dim, Graph, Op, Shape};
    let (b, n, h, d) = (2u64, 7u64, 3u64, 4u64);
    let mut g = Graph::new();
    let c = |x: &[u64]| Shape::consts(x);
    let qkv = g.add_input("qkv", c(&[b, n, 3 * h * d]), DType::F32).unwrap();
    let dy = g.add_input("dy", c(&[b, n, h * d]), DType::F32).unwrap();
    let r = g.add_op(Op::Reshape { shape: c(&[b, n, 3, h, d]) }, &[qkv], "attn").unwrap();
    let p = g.add_op(Op::Permute { perm: vec![2, 0, 3, 1, 4] }, &[r], "attn").unwrap();
    let mut parts: Vec<_> = (0..3)
        .map(|i| {
            let s =
                g.add_op(Op::Slice { axis: 0, start: Dim::Const(i), end: Dim::Const(i + 1) }, &[p], "attn").unwrap();
            g.add_op(Op::Reshape { shape: c(&[b, h, n, d]) }, &[s], "attn").unwrap()
        })
        .collect();
    let a = g.add_op(Op::Attention { scale: 0.5, dropout: 0.3, key: 9 }, &parts, "attn").unwrap();
    let t = g.add_op(Op::Permute { perm: vec![0, 2, 1, 3] }, &[a], "attn").unwrap();
    let y = g.add_op(Op::Reshape { shape: c(&[b, n, h * d]) }, &[t], "attn").unwrap();
    let dr = g.add_op(Op::Reshape { shape: c(&[b, n, h, d]) }, &[dy], "attn").unwrap();
    parts.push(g.add_op(Op::Permute { perm: vec![0, 2, 1, 3] }, &[dr], "attn").unwrap());
    let ag = g.add_op(Op::AttentionGrad { scale: 0.5, dropout: 0.3, key: 9 }, &parts, "attn").unwrap();
    let j = g.add_op(Op::Permute { perm: vec![1, 3, 0, 2, 4] }, &[ag], "attn").unwrap();
    let dqkv = g.add_op(Op::Reshape { shape: c(&[b, n, 3 * h * d]) }, &[j], "attn").unwrap();
    g.set_output("y", y);
    g.set_output("dqkv", dqkv);
    let inputs =
        [("qkv", Tensor::f32(vec![2, 7, 36], values(504, 1))), ("dy", Tensor::f32(vec![2, 7, 12], values(168, 2)))];
    let run = |g: &Graph| {
        let plan = tessera_compiler::plan::lower(g, 1, true).unwrap();
        let mut ex = CpuExecutor::new(plan, 3).unwrap();
        let out = ex.run(&inputs).unwrap_or_else(|e| panic!("{e}"));
        (out["y"].as_f32().unwrap().to_vec(), out["dqkv"].as_f32().unwrap().to_vec())
    };
    let (y0, d0) = run(&g);
    let mut packed = g.clone();
    let report = passes::run(&mut packed, &["packed-attention"], true, |_, _| {}).unwrap();
    assert_eq!(
        report[0].detail,
        "1 attentions and 1 attention gradients read q, k and v in place from their packed product"
    );
    let ops: Vec<&str> = packed.node_ids().iter().map(|&v| packed.node(v).op.name()).collect();
    assert!(!ops.iter().any(|o| ["permute", "slice", "reshape"].contains(o)), "{ops:?}");
    let (y1, d1) = run(&packed);
    close(&y1, &y0);
    close(&d1, &d0);
    // The mask is on: without dropout the result differs.
    let mut plain = g.clone();
    for v in plain.node_ids() {
        if let Op::Attention { dropout, .. } = &mut plain.node_mut(v).op {
            *dropout = 0.0;
        }
    }
    assert_ne!(run(&plain).0, y0, "dropout 0.3 changes the attention");
}

#[test]
fn hand_written_soft_target_cross_entropy_becomes_one_op() {
    use tessera_compiler::ir::{BinaryOp, DType, Graph, Op, ReduceOp, Shape, UnaryOp};
    for neg_first in [false, true] {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[4, 5]), DType::F32).unwrap();
        let t = g.add_input("t", Shape::consts(&[4, 5]), DType::F32).unwrap();
        let ls = g.add_op(Op::LogSoftmax { axis: 1 }, &[x], "loss").unwrap();
        let prod = g.add_op(Op::Binary(BinaryOp::Mul), &[t, ls], "loss").unwrap();
        let sum = g.add_op(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keepdim: false }, &[prod], "loss").unwrap();
        let mean = |g: &mut Graph, v| {
            g.add_op(Op::Reduce { op: ReduceOp::Mean, axes: vec![0], keepdim: false }, &[v], "loss").unwrap()
        };
        let y = if neg_first {
            let n = g.add_op(Op::Scale { factor: -1.0 }, &[sum], "loss").unwrap();
            mean(&mut g, n)
        } else {
            let m = mean(&mut g, sum);
            g.add_op(Op::Unary(UnaryOp::Neg), &[m], "loss").unwrap()
        };
        g.set_output("y", y);
        let targets: Vec<f32> = (0..20).map(|i| if i % 5 == i / 5 { 0.8 } else { 0.05 }).collect();
        let inputs = [("x", Tensor::f32(vec![4, 5], values(20, 1))), ("t", Tensor::f32(vec![4, 5], targets))];
        let before = eval(&g, &inputs);
        let mut rewritten = g.clone();
        let report = passes::run(&mut rewritten, &["cross-entropy-pattern"], true, |_, _| {}).unwrap();
        assert_eq!(report[0].detail, "1 hand-written cross-entropies recognised");
        let ops: Vec<&str> = rewritten.node_ids().iter().map(|&n| rewritten.node(n).op.name()).collect();
        assert_eq!(ops.iter().filter(|o| !matches!(**o, "input")).collect::<Vec<_>>(), [&"cross_entropy"]);
        close(&eval(&rewritten, &inputs), &before);
    }
    // A target that depends on a trainable parameter keeps its gradient: not rewritten.
    let mut g = Graph::new();
    let x = g.add_input("x", Shape::consts(&[4, 5]), DType::F32).unwrap();
    let w = g
        .add_param(
            "w",
            tessera_compiler::ir::TensorType::f32(Shape::consts(&[4, 5])),
            tessera_compiler::ir::Init::Zeros,
            true,
            "",
        )
        .unwrap();
    let t = g.add_op(Op::Softmax { axis: 1 }, &[w], "").unwrap();
    let ls = g.add_op(Op::LogSoftmax { axis: 1 }, &[x], "").unwrap();
    let prod = g.add_op(Op::Binary(BinaryOp::Mul), &[t, ls], "").unwrap();
    let sum = g.add_op(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keepdim: false }, &[prod], "").unwrap();
    let m = g.add_op(Op::Reduce { op: ReduceOp::Mean, axes: vec![0], keepdim: false }, &[sum], "").unwrap();
    let y = g.add_op(Op::Unary(UnaryOp::Neg), &[m], "").unwrap();
    g.set_output("y", y);
    let report = passes::run(&mut g, &["cross-entropy-pattern"], true, |_, _| {}).unwrap();
    assert_eq!(report[0].detail, "0 hand-written cross-entropies recognised");
}

#[test]
fn convit_gated_attention_is_split_into_content_attention_and_a_positional_product() {
    let prog = Program::load(&[]).unwrap();
    let cfg = config::load("quickstart/convit_tiny", &[]).unwrap();
    let (_, _, reports) =
        tessera_compiler::pipeline::training_graph(&prog, cfg.tree(), PassChoice::for_config(cfg.tree())).unwrap();
    let gated = reports.iter().find(|r| r.pass == "gated-attention-pattern").unwrap();
    // Both GPSA blocks of the tiny ConViT (the libtorch parity tests check
    // the rewritten model's logits and gradients against eager GPSA).
    assert_eq!(gated.detail, "2 gated attentions split into content attention and positional product");
    let fused = plan("quickstart/convit_tiny", &[], passes::DEFAULT);
    let count = |name: &str| fused.kernels.iter().filter(|k| k.op.name() == name).count();
    // The plain block's qkv is one packed product, read in place.
    assert_eq!(
        (count("attention"), count("attention_packed")),
        (2, 1),
        "2 GPSA blocks + 1 plain block, each one attention kernel"
    );
    // No softmax over per-sample N x N scores is left in the forward pass.
    let softmax_over_batch =
        fused.kernels.iter().filter(|k| k.op.name() == "softmax" && fused.values[k.output].shape[0] == 2).count();
    assert_eq!(softmax_over_batch, 0);
}
