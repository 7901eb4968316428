//! The step's cost on paper (`tessera_plan::cost`): bytes moved and matrix
//! FLOPs per kernel against closed forms, views and folded constants
//! moving nothing, the optimizer's parts counted, the forward FLOPs of
//! ViT-B/16 the graph's count (35.1 GFLOPs per image, fvcore's) less the
//! last block's products for the tokens the classifier does not read,
//! and the roofline as the larger of the two bounds per kernel.

use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::ir::{DType, Graph, Init, Op, Shape, TensorType};
use tessera_compiler::memory::plan_memory;
use tessera_compiler::pipeline::{inference_plan, training_plan};
use tessera_compiler::plan::{lower, Plan};
use tessera_plan::cost::{kernel_cost, KernelClass, StepCost, H100, H200};

fn planned(g: &Graph, training: bool) -> Plan {
    let mut p = lower(g, 1, training).unwrap_or_else(|e| panic!("{e}"));
    p.memory = Some(plan_memory(&p));
    p
}

fn kernel_of(p: &Plan, name: &str) -> usize {
    p.kernels.iter().position(|k| k.op.name() == name).unwrap_or_else(|| panic!("no {name} kernel"))
}

#[test]
fn a_linear_layer_moves_its_operands_and_result_and_does_2mnk() {
    let mut g = Graph::new();
    let x = g.add_input("x", Shape::consts(&[8, 16]), DType::F32).unwrap();
    let w = g.add_param("w", TensorType::f32(Shape::consts(&[32, 16])), Init::Zeros, true, "").unwrap();
    let b = g.add_param("b", TensorType::f32(Shape::consts(&[32])), Init::Zeros, true, "").unwrap();
    let y = g.add_op(Op::Linear, &[x, w, b], "").unwrap();
    // A view of y (no bytes) and a bf16 cast of it (f32 in, bf16 out).
    let flat = g.add_op(Op::Reshape { shape: Shape::consts(&[256]) }, &[y], "").unwrap();
    let half = g.add_op(Op::Cast { dtype: DType::BF16 }, &[flat], "").unwrap();
    g.set_output("y", half);
    let p = planned(&g, false);
    let c = kernel_cost(&p, kernel_of(&p, "linear"));
    assert_eq!(c.flops, 2 * 8 * 32 * 16);
    assert!(!c.flops_bf16);
    assert_eq!(c.bytes["f32"], 4 * (8 * 16 + 32 * 16 + 32 + 8 * 32));
    assert_eq!(c.total_bytes(), c.bytes["f32"]);
    let view = kernel_cost(&p, kernel_of(&p, "reshape"));
    assert_eq!((view.total_bytes(), view.flops), (0, 0));
    let cast = kernel_cost(&p, kernel_of(&p, "cast"));
    assert_eq!((cast.bytes["f32"], cast.bytes["bf16"]), (256 * 4, 256 * 2));
    assert_eq!(KernelClass::of(&p.kernels[kernel_of(&p, "cast")].op), KernelClass::Cast);
    // The step is the sum of its kernels; a view costs nothing in the roofline.
    let s = StepCost::of(&p);
    assert_eq!(s.total.bytes_moved, c.total_bytes() + cast.total_bytes());
    assert_eq!(s.total.flops, 2 * 8 * 32 * 16);
    // Per kernel the larger bound: here every kernel is memory-bound on an H100.
    let (secs, _) = s.seconds(&H100);
    let by_bytes = s.total.bytes_moved as f64 / H100.bandwidth;
    assert!((secs - by_bytes).abs() < 1e-15, "{secs} vs {by_bytes}");
    assert!(s.seconds(&H200).0 < secs);
}

#[test]
fn scalar_constants_fold_and_the_optimizer_writes_its_parts() {
    // A training step of one linear layer: AdamW over w writes w and its two
    // moments (parts of one multi-tensor kernel), reading w, its gradient
    // and the moments; lr and the betas are folded scalars.
    let prog = Program::load(&[]).unwrap();
    let cfg = config::load("quickstart/vit_tiny", &[]).unwrap();
    let (p, _) = training_plan(&prog, cfg.tree(), 2).unwrap();
    let k = kernel_of(&p, "multi_tensor");
    let c = kernel_cost(&p, k);
    let params: u64 = p.tables.params.iter().map(|(_, v)| p.values[*v].numel()).sum();
    // Reads: each parameter, its gradient, two moments (f32), plus the
    // per-step scalars (the bias corrections); writes: parameter and moments.
    let floor = 4 * params * (4 + 3);
    assert!(c.total_bytes() >= floor && c.total_bytes() < floor + 4096, "{} vs {floor}", c.total_bytes());
    assert_eq!(c.flops, 0);
}

#[test]
fn vit_b16_forward_flops_are_the_graphs_35_1_gflops_less_the_unread_tokens() {
    let prog = Program::load(&[]).unwrap();
    let cfg = config::load(
        "pretrain/vision_transformer/supervised/16gpu_deit_b_example",
        &["MODEL.HEAD.PARAMS=[[mlp, {dims: [768, 1000]}]]".into()],
    )
    .unwrap();
    let (p, c) = inference_plan(&prog, cfg.tree(), 2, false).unwrap();
    let s = StepCost::of(&p);
    let graph = tessera_compiler::ir::flops::total_flops(&c.graph, 2);
    assert_eq!(graph, 2 * 35_127_656_448);
    // The plan computes the last block's projection and MLP for the class
    // token alone (slice-first): 196 of 197 tokens' products fewer.
    let (d, hidden) = (768u64, 3072u64);
    let last_block = 196 * (2 * d * d + 2 * 2 * d * hidden);
    assert_eq!(s.total.flops, graph - 2 * last_block);
    // The products run in f32 (no AMP): compute-bound kernels at f32's peak.
    let mm = &s.by_class[&KernelClass::MatrixProduct];
    assert!(mm.flops * 100 >= s.total.flops * 95, "{} of {}", mm.flops, s.total.flops);
}

/// Honest accounting beside a library GEMM: matmul_gelu_grad's epilogue
/// (the erf GELU' cuBLASLt lacks) reads its result back and writes it
/// again, and those bytes are a launch of their own in the roofline (added
/// to, not hidden under, the product's time); its row sum and a layer-norm
/// backward's further results are written bytes; a slice reads only what
/// it keeps, and a slice of contiguous rows at an aligned byte is a view
/// that moves nothing.
#[test]
fn epilogue_passes_parts_and_slices_cost_what_they_move() {
    let mut g = Graph::new();
    let (r, i, c) = (64u64, 32u64, 48u64);
    let a = g.add_input("a", Shape::consts(&[r, i]), DType::F32).unwrap();
    let w = g.add_input("w", Shape::consts(&[i, c]), DType::F32).unwrap();
    let z = g.add_input("z", Shape::consts(&[r, c]), DType::F32).unwrap();
    let y = g
        .add_op(
            Op::MatmulGeluGrad { transpose_a: false, transpose_b: false, row_sum: true, gelu: None },
            &[a, w, z],
            "",
        )
        .unwrap();
    let sum = g.add_op(Op::ResultPart { index: 1, dtype: DType::F32 }, &[y], "").unwrap();
    let rows = |g: &mut Graph, start: u64| {
        let (start, end) = (tessera_compiler::ir::Dim::Const(start), tessera_compiler::ir::Dim::Const(start + 2));
        g.add_op(Op::Slice { axis: 0, start, end }, &[y], "").unwrap()
    };
    // Rows 1..3 start 192 bytes in: copied. Rows 0..2: a view of y.
    let (copied, viewed) = (rows(&mut g, 1), rows(&mut g, 0));
    let doubled = g.add_op(Op::Scale { factor: 2.0 }, &[viewed], "").unwrap();
    g.set_output("sum", sum);
    g.set_output("rows", copied);
    g.set_output("doubled", doubled);
    let p = planned(&g, true);
    let k = kernel_of(&p, "matmul_gelu_grad");
    let cost = kernel_cost(&p, k);
    let scratch = cost.bytes.get("scratch").copied().unwrap_or(0);
    // a, w, z read; y written, then read and written by the epilogue; the sum written.
    let f32_bytes = 4 * (r * i + i * c + r * c + 3 * r * c + c);
    assert_eq!(cost.bytes["f32"], f32_bytes);
    assert!(scratch > 0, "the row sum's partials are scratch");
    assert_eq!(cost.serial_bytes, 2 * 4 * r * c + scratch);
    let secs = H100.seconds(&cost);
    let overlapped = (cost.total_bytes() - cost.serial_bytes) as f64 / H100.bandwidth;
    let want = (cost.flops as f64 / H100.f32_flops).max(overlapped) + cost.serial_bytes as f64 / H100.bandwidth;
    assert!((secs - want).abs() < 1e-15, "{secs} vs {want}");
    let slices: Vec<usize> = (0..p.kernels.len()).filter(|&j| p.kernels[j].op.name() == "slice").collect();
    let [copy, view] = slices[..] else { panic!("two slices: {slices:?}") };
    assert_eq!(kernel_cost(&p, copy).bytes["f32"], 2 * 4 * 2 * c, "a slice reads and writes 2 of {r} rows");
    assert!(kernel_cost(&p, view).bytes.is_empty(), "a view of rows 0..2 moves nothing");
    let placed = &p.memory.as_ref().unwrap().placements;
    assert_eq!(placed[p.kernels[view].output].offset, placed[p.kernels[view].inputs[0]].offset);
    // The JSON report's per-kernel list is this, kernel by kernel.
    let s = StepCost::of(&p);
    let at = s.kernel_index.iter().position(|&j| j == k).unwrap();
    assert_eq!(s.kernels[at].1, cost);
}

/// `share-recompute` against its closed form on a whole step (the tiny
/// ViT, AMP, batch 2: depth 2, D 64, MLP 128, 17 tokens): per MLP the GELU
/// input h (bf16) is no longer read by the weight-gradient product, per
/// layer norm neither the input x nor w and b (f32), of which the backward
/// kernel now reads b; the activation's write and read move from the
/// scratch to a result part, so nothing else changes.
#[test]
fn sharing_a_recomputation_saves_one_read_of_its_input() {
    let prog = Program::load(&[]).unwrap();
    let cfg = config::load("quickstart/vit_tiny", &["MODEL.AMP_PARAMS.USE_AMP=true".into()]).unwrap();
    let bytes = |passes: Vec<&str>| {
        let choice = tessera_compiler::pipeline::PassChoice { passes, ..Default::default() };
        let (p, _, _) = tessera_compiler::pipeline::training_plan_with(&prog, cfg.tree(), 2, choice).unwrap();
        StepCost::of(&p).total.bytes_moved
    };
    // Every token through every block (slice-first would run the last
    // block's MLP on the class token alone).
    let with: Vec<&str> =
        tessera_compiler::passes::default_for(true).into_iter().filter(|&p| p != "slice-first").collect();
    let without: Vec<&str> = with.iter().copied().filter(|&p| p != "share-recompute").collect();
    assert_ne!(with, without);
    let (tokens, d, hidden, depth) = (2 * 17u64, 64u64, 128u64, 2u64);
    let gelu = depth * tokens * hidden * 2;
    let norms = 2 * depth * (tokens * d * 4 + 2 * d * 4 - d * 4);
    assert_eq!(bytes(without) - bytes(with), gelu + norms);
}
