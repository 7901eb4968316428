//! The CUDA executor against the CPU backend, op by op, on the host device
//! (the same kernel sources compiled by g++ and run one thread per block;
//! GEMMs on cuBLASLt's descriptors): every op family on small shapes, in
//! f32 (within 1e-5 relative) and bf16 (within 2^-7 relative, one bf16
//! rounding, against the CPU's f32 result). Needs the CUDA headers
//! (scripts/setup-cuda-tools.sh, which scripts/test.sh runs). With
//! TESSERA_CUDA_TEST_DEVICE=gpu, GPU 0 instead of the host device.

use std::collections::BTreeMap;
use tessera_compiler::ir::fused::Instr;
use tessera_compiler::ir::{BinaryOp, DType, Dim, Graph, Init, Op, ReduceOp, Shape, TensorType, UnaryOp};
use tessera_runtime::philox::Stream;
use tessera_runtime::{Backend, Tensor};

fn consts(dims: &[u64]) -> Shape {
    Shape::consts(dims)
}

fn rand(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let s = Stream::new(5, 1, seed);
    Tensor::f32(shape.to_vec(), (0..n as u64).map(|i| s.uniform_at(i) * 2.0 - 1.0).collect())
}

fn host() -> Backend {
    crate::open_cuda()
        .unwrap_or_else(|e| panic!("the CUDA host device cannot open ({e}); run scripts/setup-cuda-tools.sh"))
}

/// Runs `g` (lowered for batch 1, memory planned) on the CPU and on the
/// host device with the same inputs and seed; returns both outputs.
fn both(g: &Graph, training: bool, inputs: &[(&str, Tensor)]) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let mut plan = tessera_compiler::plan::lower(g, 1, training).unwrap();
    plan.memory = Some(tessera_compiler::memory::plan_memory(&plan));
    let mut cpu = Backend::Cpu.executor(plan.clone(), 42).unwrap();
    let mut gpu = host().executor(plan, 42).unwrap_or_else(|e| panic!("{e}"));
    let a = cpu.run(inputs, None).unwrap_or_else(|e| panic!("cpu: {e}"));
    let b = gpu.run(inputs, None).unwrap_or_else(|e| panic!("cuda-host: {e}"));
    (a, b)
}

#[track_caller]
fn assert_close(what: &str, cpu: &Tensor, gpu: &Tensor, tol: f64) {
    assert_eq!(cpu.shape, gpu.shape, "{what}: shapes");
    match (cpu.as_f32(), gpu.as_f32()) {
        (Some(a), Some(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let err = (*x as f64 - *y as f64).abs() / (1.0 + (*x as f64).abs());
                assert!(
                    err <= tol || (x.is_nan() && y.is_nan()),
                    "{what}[{i}]: cpu {x} vs cuda {y} (rel {err:.2e} > {tol:.0e})"
                );
            }
        }
        _ => assert_eq!(cpu.as_i64(), gpu.as_i64(), "{what}"),
    }
}

/// y = op(x0, x1, ...) for f32 inputs of the given shapes.
#[track_caller]
fn check_op(op: Op, shapes: &[&[usize]], training: bool, tol: f64) {
    let mut g = Graph::new();
    let mut inputs = Vec::new();
    let names: Vec<String> = (0..shapes.len()).map(|i| format!("x{i}")).collect();
    let mut ids = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        let dims: Vec<u64> = s.iter().map(|&d| d as u64).collect();
        ids.push(g.add_input(&names[i], consts(&dims), DType::F32).unwrap());
        inputs.push((names[i].as_str(), rand(s, i as u32 + 1)));
    }
    let name = op.name();
    let y = g.add_op(op, &ids, "test").unwrap_or_else(|e| panic!("{e}"));
    g.set_output("y", y);
    let (a, b) = both(&g, training, &inputs);
    assert_close(name, &a["y"], &b["y"], tol);
}

#[test]
fn elementwise_ops_and_fused_programs_match_the_cpu() {
    for u in [
        UnaryOp::Gelu,
        UnaryOp::Relu,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Exp,
        UnaryOp::Neg,
        UnaryOp::Square,
        UnaryOp::Heaviside,
    ] {
        check_op(Op::Unary(u), &[&[3, 17]], true, 1e-5);
    }
    for b in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min] {
        check_op(Op::Binary(b), &[&[2, 3, 5], &[3, 1]], true, 1e-5);
        check_op(Op::Binary(b), &[&[4, 6], &[]], true, 1e-5);
    }
    check_op(Op::Scale { factor: 0.3 }, &[&[7, 5]], true, 1e-6);
    check_op(Op::AddScalar { value: -1.25 }, &[&[7, 5]], true, 1e-6);
    for e in [2.0, 3.0, -2.0, 1.5] {
        check_op(Op::PowScalar { exponent: e }, &[&[9]], true, 1e-5);
    }
    check_op(Op::GeluGrad, &[&[4, 33], &[4, 33]], true, 1e-5);
    check_op(Op::Dropout { p: 0.3, key: 7 }, &[&[5, 300]], true, 0.0);
    check_op(Op::Dropout { p: 0.3, key: 7 }, &[&[5, 300]], false, 0.0);
    check_op(Op::DropPath { p: 0.25, key: 9 }, &[&[16, 3, 4]], true, 0.0);
    check_op(Op::DivCount { count: Dim::Const(7) }, &[&[3, 4]], true, 0.0);
    // A fused program: dropout(gelu(x0 * 0.5 + x1)) with a broadcast operand.
    let body = vec![
        Instr::Operand(0),
        Instr::Operand(1),
        Instr::Scale(0.5, 0),
        Instr::Binary(BinaryOp::Add, 2, 1),
        Instr::Unary(UnaryOp::Gelu, 3),
        Instr::Dropout { p: 0.1, key: 3, x: 4 },
    ];
    check_op(Op::Fused { body }, &[&[6, 40], &[40]], true, 1e-5);
}

#[test]
fn layout_ops_match_the_cpu() {
    check_op(Op::Permute { perm: vec![2, 0, 1] }, &[&[2, 3, 5]], true, 0.0);
    check_op(Op::Slice { axis: 1, start: Dim::Const(1), end: Dim::Const(4) }, &[&[2, 5, 3]], true, 0.0);
    check_op(Op::Expand { shape: consts(&[4, 2, 3]) }, &[&[2, 1]], true, 0.0);
    check_op(Op::Concat { axis: 1 }, &[&[2, 3, 2], &[2, 1, 2], &[2, 4, 2]], true, 0.0);
    check_op(Op::Pad { axis: 0, before: Dim::Const(2), after: Dim::Const(1) }, &[&[3, 2]], true, 0.0);
    check_op(Op::Reshape { shape: consts(&[6, 5]) }, &[&[2, 3, 5]], true, 0.0);
    check_op(Op::StopGradient, &[&[4]], true, 0.0);
}

#[test]
fn matrix_products_and_their_fused_forms_match_the_cpu() {
    check_op(Op::Linear, &[&[2, 5, 7], &[4, 7]], true, 1e-5);
    check_op(Op::Linear, &[&[6, 7], &[4, 7], &[4]], true, 1e-5);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a: &[usize] = if ta { &[2, 3, 5, 4] } else { &[2, 3, 4, 5] };
        let b: &[usize] = if tb { &[3, 6, 5] } else { &[3, 5, 6] };
        check_op(Op::Matmul { transpose_a: ta, transpose_b: tb }, &[a, b], true, 1e-5);
    }
    // Two broadcast batch dims that do not merge: [2,1] x [1,3].
    check_op(Op::matmul(), &[&[2, 1, 4, 5], &[1, 3, 5, 2]], true, 1e-5);
    check_op(Op::GeluLinear, &[&[3, 8], &[5, 8], &[5]], true, 1e-5);
    // The residual stream read as the GEMM's C, the bias as its epilogue.
    for gelu in [false, true] {
        check_op(Op::LinearResidual { gelu }, &[&[2, 3, 8], &[5, 8], &[5], &[2, 3, 5]], true, 1e-5);
    }
    check_op(Op::LayerNormLinear { eps: 1e-6 }, &[&[2, 3, 8], &[8], &[8], &[5, 8], &[5]], true, 1e-5);
    // A product plus an addend read as C: rows (two input gradients of one
    // value), and batched with a broadcast left operand (ConViT's v gradient,
    // the positional probabilities shared by the batch, read transposed).
    let plus = |ta, tb| Op::Matmul { transpose_a: ta, transpose_b: tb };
    check_op(plus(false, false), &[&[2, 3, 8], &[8, 5], &[2, 3, 5]], true, 1e-5);
    check_op(plus(true, false), &[&[1, 3, 4, 4], &[2, 3, 4, 5], &[2, 3, 4, 5]], true, 1e-5);
    check_op(Op::MatmulGeluRhs { transpose_a: true, transpose_b: false }, &[&[6, 4], &[2, 3, 5]], true, 1e-5);
    check_op(
        Op::MatmulLayerNormRhs { eps: 1e-6, transpose_a: true, transpose_b: false },
        &[&[6, 4], &[2, 3, 5], &[5], &[5]],
        true,
        1e-5,
    );
    check_op(
        Op::MatmulGeluGrad { transpose_a: false, transpose_b: true, row_sum: false, gelu: None },
        &[&[4, 6], &[5, 6], &[4, 5]],
        true,
        1e-5,
    );
}

#[test]
fn convolutions_match_the_cpu() {
    // Patch embedding (stride = kernel) and a padded, overlapping one.
    check_op(Op::Conv2d { stride: [4, 4], padding: [0, 0] }, &[&[2, 3, 8, 8], &[5, 3, 4, 4], &[5]], true, 1e-5);
    check_op(Op::Conv2d { stride: [2, 1], padding: [1, 2] }, &[&[2, 3, 7, 6], &[4, 3, 3, 2]], true, 1e-5);
    check_op(
        Op::Conv2dGradWeight { stride: [2, 1], padding: [1, 2], kernel: [3, 2] },
        &[&[2, 4, 4, 9], &[2, 3, 7, 6]],
        true,
        1e-5,
    );
    check_op(
        Op::Conv2dGradInput { stride: [2, 1], padding: [1, 2], input_hw: [7, 6] },
        &[&[2, 4, 4, 9], &[4, 3, 3, 2]],
        true,
        1e-5,
    );
}

#[test]
fn row_normalisation_matches_the_cpu() {
    check_op(Op::LayerNorm { eps: 1e-6 }, &[&[3, 4, 37], &[37], &[37]], true, 1e-5);
    check_op(Op::Normalize { eps: 1e-5 }, &[&[5, 64]], true, 1e-5);
    check_op(Op::NormalizeGrad { eps: 1e-5 }, &[&[5, 64], &[5, 64]], true, 1e-5);
    // LayerNorm's input gradient in one pass: g = dy * w formed as dy is read.
    check_op(Op::NormalizeGrad { eps: 1e-6 }, &[&[3, 4, 37], &[3, 4, 37], &[37]], true, 1e-5);
    // ... plus the residual stream's gradient, added as dx is written.
    check_op(Op::NormalizeGrad { eps: 1e-6 }, &[&[3, 4, 37], &[3, 4, 37], &[37], &[3, 4, 37]], true, 1e-5);
    // LayerNorm's weight gradient: one block of rows, several (600 rows:
    // 10 blocks of 64 or fewer), more than NORM_WEIGHT_GRAD_BLOCKS blocks of
    // 64 (32800 rows: 512 blocks, grid-strided), and rows wider than one
    // launch's columns (4100 > 4096: two launches).
    check_op(Op::LayerNormWeightGrad { eps: 1e-6 }, &[&[3, 4, 37], &[3, 4, 37]], true, 1e-5);
    check_op(Op::LayerNormWeightGrad { eps: 1e-6 }, &[&[2, 300, 24], &[2, 300, 24]], true, 1e-5);
    check_op(Op::LayerNormWeightGrad { eps: 1e-6 }, &[&[32800, 2], &[32800, 2]], true, 1e-5);
    check_op(Op::LayerNormWeightGrad { eps: 1e-5 }, &[&[3, 4100], &[3, 4100]], true, 1e-5);
}

/// LayerNorm's joined backward (`layer_norm_grad` and its four parts: the
/// weight and bias gradients, dx's bf16 copy and that copy's row sum): the
/// CUDA kernel against the CPU, with dy in bf16 as mixed precision makes
/// it, with and without the residual gradient; rows narrow enough for the
/// shared-memory accumulators and wider ones (their own rows of partials),
/// and more rows than blocks (grid-strided). In f32 (no copy) the sum is
/// of dx itself. With `normalized`, also the forward's layer_norm(x, w, b)
/// (result 5, the norm's bias its last operand).
#[test]
fn the_joined_layer_norm_backward_matches_the_cpu() {
    let cases = [
        (vec![3u64, 4, 37], true, true, true),
        (vec![3, 4, 37], false, true, true),
        (vec![3, 4, 37], true, false, true),
        (vec![3, 4, 37], true, true, false),
        (vec![2, 3, 1700], true, true, true),
        (vec![33000, 3], true, true, true),
    ];
    for (shape, with_r, amp, normalized) in cases {
        let d = *shape.last().unwrap();
        let mut g = Graph::new();
        let dy = g.add_input("dy", consts(&shape), DType::F32).unwrap();
        let dy = if amp { g.add_op(Op::Cast { dtype: DType::BF16 }, &[dy], "").unwrap() } else { dy };
        let x = g.add_input("x", consts(&shape), DType::F32).unwrap();
        let w = g.add_input("w", consts(&[d]), DType::F32).unwrap();
        let mut args = vec![dy, x, w];
        if with_r {
            args.push(g.add_input("r", consts(&shape), DType::F32).unwrap());
        }
        let copy = amp.then_some(DType::BF16);
        let low = if amp { DType::BF16 } else { DType::F32 };
        if normalized {
            args.push(g.add_input("b", consts(&[d]), DType::F32).unwrap());
        }
        let op = Op::LayerNormGrad { eps: 1e-6, copy, normalized: normalized.then_some(low) };
        let dx = g.add_op(op, &args, "norm").unwrap();
        g.set_output("dx", dx);
        let parts = [(1, DType::F32), (2, DType::F32), (3, DType::BF16), (4, DType::F32), (5, low)];
        for (index, dtype) in parts.into_iter().filter(|p| (amp || p.0 != 3) && (normalized || p.0 != 5)) {
            let p = g.add_op(Op::ResultPart { index, dtype }, &[dx], "norm").unwrap();
            g.set_output(&format!("part{index}"), p);
        }
        let dims: Vec<usize> = shape.iter().map(|&v| v as usize).collect();
        let inputs = [
            ("dy", rand(&dims, 1)),
            ("x", rand(&dims, 2)),
            ("w", rand(&[d as usize], 3)),
            ("r", rand(&dims, 4)),
            ("b", rand(&[d as usize], 5)),
        ];
        let inputs: Vec<(&str, Tensor)> =
            inputs.into_iter().filter(|(n, _)| (with_r || *n != "r") && (normalized || *n != "b")).collect();
        let (a, b) = both(&g, true, &inputs);
        let what = format!("{shape:?} with r {with_r}, amp {amp}, normalized {normalized}");
        // The normalised input: the same f32 expression of the same
        // statistics, one rounding to bf16 under AMP.
        if normalized {
            let tol = if amp { 2f64.powi(-7) } else { 1e-5 };
            assert_close(&format!("normalized {what}"), &a["part5"], &b["part5"], tol);
        }
        assert_close(&format!("dx {what}"), &a["dx"], &b["dx"], 1e-5);
        // The copy is one bf16 rounding of dx (a dx a hair apart may round
        // to the neighbouring bf16, and so move the copy's sum by as much);
        // the other sums over rows of f32 products agree to f64
        // accumulation's reordering.
        if amp {
            assert_close(&format!("copy {what}"), &a["part3"], &b["part3"], 2f64.powi(-7));
        }
        let sum_tolerance = if amp { 2f64.powi(-7) } else { 1e-5 };
        assert_close(&format!("copy's sum {what}"), &a["part4"], &b["part4"], sum_tolerance);
        for p in ["part1", "part2"] {
            assert_close(&format!("{p} {what}"), &a[p], &b[p], 1e-5);
        }
    }
}

/// matmul_gelu_grad with its row sum (the hidden bias gradient made by the
/// GELU gradient's epilogue) and GELU(z) (the next weight gradient's
/// operand), each with and without the other: the CUDA kernels against the
/// CPU, in f32 and with bf16 operands; rows narrow enough for shared-memory
/// accumulators, wider ones (their own rows of partials), more rows than
/// blocks.
#[test]
fn the_gelu_gradient_with_its_row_sum_matches_the_cpu() {
    for (rows, inner, cols, bf16, row_sum, with_gelu) in [
        (7u64, 6u64, 9u64, false, true, false),
        (7, 6, 9, true, true, true),
        (7, 6, 9, true, false, true),
        (7, 6, 9, false, false, true),
        (3, 5, 4100, true, true, true),
        (33000, 4, 3, false, true, true),
    ] {
        let mut g = Graph::new();
        let mut input = |name: &str, shape: &[u64]| {
            let v = g.add_input(name, consts(shape), DType::F32).unwrap();
            if bf16 {
                g.add_op(Op::Cast { dtype: DType::BF16 }, &[v], "").unwrap()
            } else {
                v
            }
        };
        let (a, b, z) = (input("a", &[rows, inner]), input("b", &[inner, cols]), input("z", &[rows, cols]));
        let low = if bf16 { DType::BF16 } else { DType::F32 };
        let op = Op::MatmulGeluGrad { transpose_a: false, transpose_b: false, row_sum, gelu: with_gelu.then_some(low) };
        let y = g.add_op(op, &[a, b, z], "mlp").unwrap();
        g.set_output("y", y);
        if row_sum {
            let sum = g.add_op(Op::ResultPart { index: 1, dtype: DType::F32 }, &[y], "mlp.fc1").unwrap();
            g.set_output("sum", sum);
        }
        if with_gelu {
            let act = g.add_op(Op::ResultPart { index: 5, dtype: low }, &[y], "mlp.fc2").unwrap();
            g.set_output("gelu", act);
        }
        let (r, i, c) = (rows as usize, inner as usize, cols as usize);
        let inputs = [("a", rand(&[r, i], 1)), ("b", rand(&[i, c], 2)), ("z", rand(&[r, c], 3))];
        let (cpu, gpu) = both(&g, true, &inputs);
        let what = format!("{rows}x{inner}x{cols}, bf16 {bf16}, row sum {row_sum}, gelu {with_gelu}");
        // bf16: the CPU rounds the f32 product once, the GPU the GEMM's
        // result and then the epilogue's (within a bf16 step); the sums add
        // what each stored. GELU(z) is one rounding of the same function.
        let tol = if bf16 { 2f64.powi(-6) } else { 1e-5 };
        assert_close(&format!("y {what}"), &cpu["y"], &gpu["y"], tol);
        if row_sum {
            assert_close(&format!("sum {what}"), &cpu["sum"], &gpu["sum"], tol);
        }
        if with_gelu {
            assert_close(&format!("gelu {what}"), &cpu["gelu"], &gpu["gelu"], if bf16 { 2f64.powi(-7) } else { 1e-5 });
        }
    }
}

/// A small training step through both backends: parameters initialised
/// alike, a state update, outputs and the updated state equal.
#[test]
fn a_plan_with_state_and_fills_runs_like_the_cpu() {
    let mut g = Graph::new();
    let x = g.add_input("x", consts(&[4, 3]), DType::F32).unwrap();
    let w = g.add_param("w", TensorType::f32(consts(&[2, 3])), Init::Normal { std: 1.0 }, true, "").unwrap();
    let count = g.add_buffer("count", TensorType::f32(consts(&[])), Init::Zeros, "").unwrap();
    let y = g.add_op(Op::Linear, &[x, w], "fc").unwrap();
    let half = g.add_fill(0.5, TensorType::f32(consts(&[4, 2])), "");
    let yh = g.add_op(Op::Binary(BinaryOp::Mul), &[y, half], "").unwrap();
    let r = g.add_op(Op::Reshape { shape: consts(&[8]) }, &[yh], "").unwrap();
    let one = g.add_fill(1.0, TensorType::f32(consts(&[])), "");
    let next = g.add_op(Op::Binary(BinaryOp::Add), &[count, one], "").unwrap();
    let d = g.add_op(Op::Dropout { p: 0.5, key: 1 }, &[y], "").unwrap();
    g.set_output("r", r);
    g.set_output("dropped", d);
    g.set_state_update("count", next);
    let _ = ReduceOp::Sum;
    let x = rand(&[4, 3], 3);
    let (a, b) = both(&g, true, &[("x", x)]);
    for k in ["r", "dropped"] {
        assert_close(k, &a[k], &b[k], 1e-6);
    }
}
