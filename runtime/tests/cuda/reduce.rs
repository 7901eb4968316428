//! The CUDA executor's reductions, softmax family and losses against the
//! CPU backend, on the host device (the same kernel sources compiled by g++
//! and run one thread per block): reduce (sum, mean, max over rows,
//! columns, several axes and everything, one pass and two), sum_of_squares,
//! softmax, log_softmax, l2_normalize, cross_entropy and its gradient,
//! zero_diagonal. f32 within 1e-5 relative; bf16 inputs (values rounded to
//! bf16, made bf16 by a cast in the graph) within 1e-2. Also: the same plan run twice gives bitwise
//! identical results. Needs the CUDA headers (scripts/setup-cuda-tools.sh).

use std::collections::BTreeMap;
use tessera_compiler::ir::{DType, Graph, Op, ReduceOp, Shape};
use tessera_compiler::plan::Plan;
use tessera_runtime::philox::Stream;
use tessera_runtime::{Backend, Tensor};

fn rand(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let s = Stream::new(5, 1, seed);
    Tensor::f32(shape.to_vec(), (0..n as u64).map(|i| s.uniform_at(i) * 2.0 - 1.0).collect())
}

/// Class indices in 0..classes.
fn classes(n: usize, classes: usize, seed: u32) -> Tensor {
    let s = Stream::new(7, 1, seed);
    Tensor::i64(
        vec![n],
        (0..n as u64).map(|i| ((s.uniform_at(i) * classes as f32) as i64).min(classes as i64 - 1)).collect(),
    )
}

/// `t` with element `i` set to `v` for each (i, v).
fn with(mut t: Tensor, set: &[(usize, f32)]) -> Tensor {
    let d = t.as_f32_mut().expect("an f32 tensor");
    for &(i, v) in set {
        d[i] = v;
    }
    t
}

fn host() -> Backend {
    crate::open_cuda()
        .unwrap_or_else(|e| panic!("the CUDA host device cannot open ({e}); run scripts/setup-cuda-tools.sh"))
}

/// One operand of the op under test: a tensor fed as a graph input (f32 or
/// i64, `plain`), cast in the graph to `cast` when given (`bf16_in`).
struct Operand {
    data: Tensor,
    cast: Option<DType>,
}

fn plain(t: Tensor) -> Operand {
    Operand { data: t, cast: None }
}

/// A bf16 operand: `t` rounded to bf16 first, so that both backends see the
/// same values (the CPU holds bf16 as f32 and its cast does not round) and
/// only the results' rounding differs.
fn bf16_in(t: Tensor) -> Operand {
    let v: Vec<f32> = t.as_f32().expect("an f32 tensor").iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    Operand { data: Tensor::f32(t.shape.clone(), v), cast: Some(DType::BF16) }
}

/// The plan (batch 1, memory planned) of y = op(operands), checked to hold
/// a kernel of `op`, and its inputs.
fn plan_of(op: &Op, operands: &[Operand]) -> (Plan, Vec<(String, Tensor)>) {
    let mut g = Graph::new();
    let mut inputs = Vec::new();
    let mut ids = Vec::new();
    for (i, o) in operands.iter().enumerate() {
        let name = format!("x{i}");
        let dims: Vec<u64> = o.data.shape.iter().map(|&d| d as u64).collect();
        let dtype = if o.data.as_i64().is_some() { DType::I64 } else { DType::F32 };
        let mut id = g.add_input(&name, Shape::consts(&dims), dtype).unwrap();
        if let Some(d) = o.cast {
            id = g.add_op(Op::Cast { dtype: d }, &[id], "test").unwrap();
        }
        ids.push(id);
        inputs.push((name, o.data.clone()));
    }
    let y = g.add_op(op.clone(), &ids, "test").unwrap_or_else(|e| panic!("{e}"));
    g.set_output("y", y);
    let mut plan = tessera_compiler::plan::lower(&g, 1, true).unwrap();
    plan.memory = Some(tessera_compiler::memory::plan_memory(&plan));
    assert!(plan.kernels.iter().any(|k| k.op == *op), "the plan has no {} kernel", op.name());
    (plan, inputs)
}

/// The launch list of `plan`, lowered with made-up addresses (they are only
/// written into the list, never followed).
fn lowered(plan: &Plan) -> tessera_runtime::cuda::lower::Lowering<'_> {
    use tessera_runtime::cuda::device::DevPtr;
    let memory = plan.memory.as_ref().unwrap();
    let addr: Vec<Option<DevPtr>> =
        (0..plan.values.len()).map(|v| Some(DevPtr(0x10_0000 + 0x1_0000 * v as u64))).collect();
    let addr: &'static [Option<DevPtr>] = Box::leak(addr.into_boxed_slice());
    let mut l = tessera_runtime::cuda::lower::Lowering::new(plan, memory, addr, DevPtr(0x1000_0000), DevPtr(0x800));
    l.lower_all().unwrap_or_else(|e| panic!("{e}"));
    l
}

/// Kernel launches of the op under test (`op`) in its plan.
fn launches_of(op: &Op, operands: &[Operand]) -> usize {
    use tessera_runtime::cuda::lower::Step;
    let (plan, _) = plan_of(op, operands);
    let k = plan.kernels.iter().position(|k| k.op == *op).unwrap();
    lowered(&plan).steps.iter().filter(|s| matches!(s, Step::Launch { kernel, .. } if *kernel == k)).count()
}

fn refs(inputs: &[(String, Tensor)]) -> Vec<(&str, Tensor)> {
    inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect()
}

/// y on the CPU and on the host device.
fn both(op: &Op, operands: &[Operand]) -> (Tensor, Tensor) {
    let (plan, inputs) = plan_of(op, operands);
    let mut cpu = Backend::Cpu.executor(plan.clone(), 42).unwrap();
    let mut gpu = host().executor(plan, 42).unwrap_or_else(|e| panic!("{}: {e}", op.name()));
    let a = cpu.run(&refs(&inputs), None).unwrap_or_else(|e| panic!("cpu: {e}"));
    let b = gpu.run(&refs(&inputs), None).unwrap_or_else(|e| panic!("cuda-host: {e}"));
    (a["y"].clone(), b["y"].clone())
}

#[track_caller]
fn assert_close(what: &str, cpu: &Tensor, gpu: &Tensor, tol: f64) {
    assert_eq!(cpu.shape, gpu.shape, "{what}: shapes");
    match (cpu.as_f32(), gpu.as_f32()) {
        (Some(a), Some(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let err = (*x as f64 - *y as f64).abs() / (1.0 + (*x as f64).abs());
                assert!(
                    err <= tol || (x.is_nan() && y.is_nan()) || x == y,
                    "{what}[{i}]: cpu {x} vs cuda {y} (rel {err:.2e} > {tol:.0e})"
                );
            }
        }
        _ => assert_eq!(cpu.as_i64(), gpu.as_i64(), "{what}"),
    }
}

/// op(operands) on both backends agree within `tol`; returns the result.
#[track_caller]
fn check(what: &str, op: Op, operands: &[Operand], tol: f64) -> Tensor {
    let (a, b) = both(&op, operands);
    assert_close(&format!("{what} {}", op.name()), &a, &b, tol);
    b
}

fn reduce(op: ReduceOp, axes: &[usize], keepdim: bool) -> Op {
    Op::Reduce { op, axes: axes.to_vec(), keepdim }
}

const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];

#[test]
fn reductions_over_any_axes_match_the_cpu() {
    let cases: &[(&[usize], &[usize])] = &[
        (&[6, 37], &[1]),      // rows, a block per output
        (&[6, 37], &[0]),      // columns, a thread per output
        (&[6, 37], &[0, 1]),   // everything
        (&[3, 4, 5], &[0, 2]), // two axes that do not merge
        (&[3, 4, 5], &[1]),    // a middle axis
        (&[3, 4, 5], &[2, 1]), // axes in any order
        (&[2, 1, 3], &[1]),    // a size-1 axis
        (&[7], &[0]),
    ];
    for (shape, axes) in cases {
        for op in OPS {
            for keepdim in [false, true] {
                let what = format!("{shape:?} over {axes:?} keepdim {keepdim}");
                check(&what, reduce(op, axes, keepdim), &[plain(rand(shape, 1))], 1e-5);
            }
        }
    }
}

#[test]
fn reductions_of_many_elements_to_few_outputs_take_two_passes_and_match_the_cpu() {
    // Columns (a bias gradient), rows of few outputs, everything to a scalar,
    // everything of a 2-d tensor: each output cut into slices, then folded.
    let cases: &[(&[usize], &[usize])] = &[
        (&[3000, 24], &[0]),
        (&[5, 10000], &[1]),
        (&[40000], &[0]),
        (&[300, 170], &[0, 1]),
        (&[40, 30, 500], &[0, 2]),
    ];
    for (shape, axes) in cases {
        for op in OPS {
            let what = format!("{shape:?} over {axes:?}");
            let x = || plain(rand(shape, 2));
            assert_eq!(launches_of(&reduce(op, axes, false), &[x()]), 2, "{what}: slices, then their fold");
            check(&what, reduce(op, axes, false), &[x()], 1e-5);
        }
    }
    assert_eq!(
        launches_of(&reduce(ReduceOp::Sum, &[1], false), &[plain(rand(&[6, 37], 1))]),
        1,
        "few elements: one pass"
    );
    assert_eq!(
        launches_of(&reduce(ReduceOp::Sum, &[0], false), &[plain(rand(&[60, 5000], 1))]),
        1,
        "many outputs: one pass"
    );
    // Sums of positive numbers: the mean of 40000 values near 0.5 is tested
    // for its relative accuracy, not only against 1 + |x|.
    let pos = Tensor::f32(vec![40000], rand(&[40000], 3).as_f32().unwrap().iter().map(|v| v.abs() * 1000.0).collect());
    let (a, b) = both(&reduce(ReduceOp::Sum, &[0], false), &[plain(pos)]);
    let (a, b) = (a.as_f32().unwrap()[0] as f64, b.as_f32().unwrap()[0] as f64);
    assert!((a - b).abs() <= 1e-6 * a.abs(), "sum of 40000 positives: cpu {a} vs cuda {b}");
}

#[test]
fn max_and_sum_propagate_nan_like_the_cpu() {
    // One NaN in row 2 / column 3 of [3000, 24], and in [5, 10000] row 1.
    let cols = with(rand(&[3000, 24], 4), &[(1500 * 24 + 3, f32::NAN)]);
    let rows = with(rand(&[5, 10000], 5), &[(10000 + 7777, f32::NAN)]);
    let small = with(rand(&[4, 9], 6), &[(2 * 9, f32::NAN), (9 + 4, f32::NEG_INFINITY)]);
    for op in [ReduceOp::Max, ReduceOp::Sum] {
        let y = check("columns with a NaN", reduce(op, &[0], false), &[plain(cols.clone())], 1e-5);
        let y = y.as_f32().unwrap();
        assert!(y[3].is_nan() && y.iter().filter(|v| v.is_nan()).count() == 1, "{y:?}");
        let y = check("rows with a NaN", reduce(op, &[1], false), &[plain(rows.clone())], 1e-5);
        assert!(y.as_f32().unwrap()[1].is_nan());
        check("all with a NaN", reduce(op, &[0, 1], false), &[plain(rows.clone())], 1e-5);
        check("small with NaN and -inf", reduce(op, &[1], true), &[plain(small.clone())], 1e-5);
        check("small with NaN and -inf", reduce(op, &[0], true), &[plain(small.clone())], 1e-5);
    }
}

#[test]
fn reductions_of_bf16_and_i64_inputs_match_the_cpu() {
    for (shape, axes) in [(&[6, 37][..], &[1][..]), (&[3000, 24], &[0]), (&[40000], &[0]), (&[3, 4, 5], &[0, 2])] {
        for op in OPS {
            let y = check(
                &format!("bf16 {shape:?} over {axes:?}"),
                reduce(op, axes, false),
                &[bf16_in(rand(shape, 7))],
                1e-2,
            );
            assert!(y.as_f32().is_some());
        }
    }
    let ints = Tensor::i64(vec![50, 7], (0..350).map(|i| (i * 7919 % 1001) - 500).collect());
    let big = Tensor::i64(vec![3000, 3], (0..9000).map(|i| i64::MAX / 4000 * ((i % 13) - 6)).collect());
    for op in [ReduceOp::Sum, ReduceOp::Max] {
        for axes in [&[0][..], &[1], &[0, 1]] {
            check(&format!("i64 over {axes:?}"), reduce(op, axes, false), &[plain(ints.clone())], 0.0);
            check(&format!("large i64 over {axes:?}"), reduce(op, axes, true), &[plain(big.clone())], 0.0);
        }
    }
}

#[test]
fn sum_of_squares_matches_the_cpu() {
    let shapes: &[&[usize]] = &[&[3, 4], &[17], &[], &[200, 300], &[1, 5, 1]];
    let ops: Vec<Operand> = shapes.iter().enumerate().map(|(i, s)| plain(rand(s, 10 + i as u32))).collect();
    check("5 tensors", Op::SumOfSquares, &ops, 1e-5);
    let ops: Vec<Operand> = shapes.iter().enumerate().map(|(i, s)| bf16_in(rand(s, 10 + i as u32))).collect();
    check("5 bf16 tensors", Op::SumOfSquares, &ops, 1e-2);
    check("one tensor", Op::SumOfSquares, &[plain(rand(&[1000, 70], 3))], 1e-5);
    // Several launches (32 tensors each), of sizes 1 to 5000.
    let ops: Vec<Operand> = (0..75).map(|i| plain(rand(&[(i * 67) % 5000 + 1], i as u32))).collect();
    check("75 tensors", Op::SumOfSquares, &ops, 1e-5);
    // A NaN anywhere makes the norm NaN.
    let y =
        check("a NaN", Op::SumOfSquares, &[plain(rand(&[10], 1)), plain(with(rand(&[300], 2), &[(5, f32::NAN)]))], 0.0);
    assert!(y.as_f32().unwrap()[0].is_nan());
}

#[test]
fn softmax_log_softmax_and_l2_normalize_match_the_cpu() {
    // (shape, axis): the last axis; an inner axis with few lanes (a block
    // per lane, strided) and with many (a thread per lane); axis 0; long rows.
    let cases: &[(&[usize], usize)] = &[
        (&[5, 37], 1),
        (&[4, 300, 5], 1),
        (&[64, 7, 40], 1),
        (&[6, 9], 0),
        (&[3, 5000], 1),
        (&[2, 3, 4], 2),
        (&[11], 0),
    ];
    for (shape, axis) in cases {
        let what = format!("{shape:?} along {axis}");
        let x = || plain(with(rand(shape, 20), &[(0, 30.0), (1, -25.0)]));
        check(&what, Op::Softmax { axis: *axis }, &[x()], 1e-5);
        check(&what, Op::LogSoftmax { axis: *axis }, &[x()], 1e-5);
        check(&what, Op::L2Normalize { axis: *axis, eps: 1e-12 }, &[x()], 1e-5);
        let b = || bf16_in(rand(shape, 21));
        check(&format!("bf16 {what}"), Op::Softmax { axis: *axis }, &[b()], 1e-2);
        check(&format!("bf16 {what}"), Op::LogSoftmax { axis: *axis }, &[b()], 1e-2);
        check(&format!("bf16 {what}"), Op::L2Normalize { axis: *axis, eps: 1e-12 }, &[b()], 1e-2);
    }
    // A row of -inf (softmax NaN, as torch), -inf entries, a zero row under
    // l2_normalize's eps.
    let inf = f32::NEG_INFINITY;
    let odd = with(rand(&[3, 6], 22), &[(0, inf), (1, inf), (2, inf), (3, inf), (4, inf), (5, inf), (7, inf)]);
    let y = check("-inf rows", Op::Softmax { axis: 1 }, &[plain(odd.clone())], 1e-5);
    assert!(
        y.as_f32().unwrap()[..6].iter().all(|v| v.is_nan()) && y.as_f32().unwrap()[6..].iter().all(|v| !v.is_nan())
    );
    check("-inf rows", Op::LogSoftmax { axis: 1 }, &[plain(odd)], 1e-5);
    let zero = with(rand(&[2, 4], 23), &[(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0)]);
    check("a zero row", Op::L2Normalize { axis: 1, eps: 1e-3 }, &[plain(zero)], 1e-5);
}

#[test]
fn cross_entropy_and_its_gradient_match_the_cpu() {
    // (N, K): few rows, more rows than blocks of the first pass, many classes.
    for (n, k) in [(37usize, 11usize), (3000, 5), (4, 3000), (1, 1)] {
        let logits = || rand(&[n, k], 30);
        let soft = || Tensor::f32(vec![n, k], rand(&[n, k], 31).as_f32().unwrap().iter().map(|v| v.abs()).collect());
        let dloss = || plain(Tensor::scalar_f32(0.75));
        for s in [0.0, 0.1] {
            let what = format!("[{n}, {k}] smoothing {s}");
            let ce = Op::CrossEntropy { label_smoothing: s };
            let grad = Op::CrossEntropyGrad { label_smoothing: s };
            check(&what, ce.clone(), &[plain(logits()), plain(classes(n, k, 32))], 1e-5);
            check(&what, grad.clone(), &[plain(logits()), plain(classes(n, k, 32)), dloss()], 1e-5);
            check(&format!("soft {what}"), ce.clone(), &[plain(logits()), plain(soft())], 1e-5);
            check(&format!("soft {what}"), grad.clone(), &[plain(logits()), plain(soft()), dloss()], 1e-5);
            check(&format!("bf16 {what}"), ce.clone(), &[bf16_in(logits()), plain(classes(n, k, 32))], 1e-2);
            check(&format!("bf16 soft {what}"), ce, &[bf16_in(logits()), bf16_in(soft())], 1e-2);
            check(
                &format!("bf16 {what}"),
                grad,
                &[bf16_in(logits()), plain(classes(n, k, 32)), bf16_in(Tensor::scalar_f32(0.75))],
                1e-2,
            );
        }
    }
    // Large logits (the max is subtracted) and a -inf logit.
    let x = with(rand(&[3, 5], 33), &[(0, 80.0), (6, -1e4), (12, f32::NEG_INFINITY)]);
    let t = Tensor::i64(vec![3], vec![0, 4, 1]);
    check("extreme", Op::CrossEntropy { label_smoothing: 0.0 }, &[plain(x.clone()), plain(t.clone())], 1e-5);
    check(
        "extreme",
        Op::CrossEntropyGrad { label_smoothing: 0.0 },
        &[plain(x), plain(t), plain(Tensor::scalar_f32(1.0))],
        1e-5,
    );
}

/// A class index outside 0..K: the CPU refuses it; a kernel cannot stop, so
/// the loss and that row of the gradient are NaN (and only that row).
#[test]
fn an_invalid_class_index_makes_the_loss_nan() {
    let x = rand(&[3, 4], 34);
    let t = Tensor::i64(vec![3], vec![1, 4, 0]);
    for op in [Op::CrossEntropy { label_smoothing: 0.1 }, Op::CrossEntropyGrad { label_smoothing: 0.1 }] {
        let mut operands = vec![plain(x.clone()), plain(t.clone())];
        if matches!(op, Op::CrossEntropyGrad { .. }) {
            operands.push(plain(Tensor::scalar_f32(1.0)));
        }
        let (plan, inputs) = plan_of(&op, &operands);
        assert!(Backend::Cpu.executor(plan.clone(), 42).unwrap().run(&refs(&inputs), None).is_err());
        let y = host().executor(plan, 42).unwrap().run(&refs(&inputs), None).unwrap()["y"].clone();
        let y = y.as_f32().unwrap();
        match op {
            Op::CrossEntropy { .. } => assert!(y[0].is_nan()),
            _ => assert!(y.iter().enumerate().all(|(i, v)| v.is_nan() == (4..8).contains(&i)), "{y:?}"),
        }
    }
}

#[test]
fn zero_diagonal_matches_the_cpu_on_one_rank_and_needs_the_collective_on_several() {
    let y = check("[7, 7]", Op::ZeroDiagonal { world: 1 }, &[plain(rand(&[7, 7], 40))], 0.0);
    assert!((0..7).all(|i| y.as_f32().unwrap()[i * 8] == 0.0));
    let y = check("bf16 [5, 5]", Op::ZeroDiagonal { world: 1 }, &[bf16_in(rand(&[5, 5], 41))], 1e-2);
    assert!((0..5).all(|i| y.as_f32().unwrap()[i * 6] == 0.0));
    let (plan, inputs) = plan_of(&Op::ZeroDiagonal { world: 2 }, &[plain(rand(&[3, 6], 42))]);
    let err = host().executor(plan, 42).unwrap().run(&refs(&inputs), None).err().expect("ran alone").to_string();
    assert!(err.contains("one rank of 2") && err.contains("collective"), "{err}");
}

/// The host device runs a plan twice (one executor, then a fresh one) with
/// bitwise-identical results: every sum is taken in a fixed order.
#[test]
fn runs_are_bitwise_deterministic() {
    let bits = |t: &Tensor| -> Vec<u32> { t.as_f32().unwrap().iter().map(|v| v.to_bits()).collect() };
    let cases: Vec<(Op, Vec<Operand>)> = vec![
        (reduce(ReduceOp::Sum, &[0], false), vec![plain(rand(&[3000, 24], 50))]),
        (reduce(ReduceOp::Mean, &[0], false), vec![plain(rand(&[40000], 51))]),
        (reduce(ReduceOp::Sum, &[1], false), vec![plain(rand(&[5, 10000], 52))]),
        (Op::SumOfSquares, (0..40).map(|i| plain(rand(&[i * 91 + 3], i as u32))).collect()),
        (Op::CrossEntropy { label_smoothing: 0.1 }, vec![plain(rand(&[3000, 5], 53)), plain(classes(3000, 5, 54))]),
        (Op::Softmax { axis: 1 }, vec![plain(rand(&[3, 5000], 55))]),
    ];
    for (op, operands) in cases {
        let (plan, inputs) = plan_of(&op, &operands);
        let mut first = host().executor(plan.clone(), 42).unwrap();
        let mut runs: Vec<BTreeMap<String, Tensor>> = Vec::new();
        runs.push(first.run(&refs(&inputs), None).unwrap());
        runs.push(first.run(&refs(&inputs), None).unwrap());
        runs.push(host().executor(plan, 42).unwrap().run(&refs(&inputs), None).unwrap());
        for r in &runs[1..] {
            assert_eq!(bits(&runs[0]["y"]), bits(&r["y"]), "{}", op.name());
        }
    }
}

/// Every kernel variant of these families (row and column folds, one and
/// two passes, f64 / f32 / i64 accumulators, f32 and bf16 operands, block-
/// and thread-per-lane softmax, the losses) compiles with NVRTC for sm_90,
/// as a GPU would load it: the host device's g++ does not see device-only
/// mistakes. Needs NVRTC (scripts/setup-cuda-tools.sh), no GPU.
#[test]
fn every_kernel_variant_compiles_with_nvrtc() {
    use tessera_runtime::cuda::device::Target;
    let t = |s: &[usize]| rand(s, 60);
    let cases: Vec<(Op, Vec<Operand>)> = vec![
        (reduce(ReduceOp::Sum, &[1], false), vec![plain(t(&[6, 37]))]),
        (reduce(ReduceOp::Mean, &[0], false), vec![plain(t(&[3000, 24]))]),
        (reduce(ReduceOp::Max, &[0], false), vec![bf16_in(t(&[3000, 24]))]),
        (reduce(ReduceOp::Max, &[1], false), vec![plain(t(&[5, 10000]))]),
        (reduce(ReduceOp::Sum, &[0, 2], false), vec![bf16_in(t(&[40, 30, 50]))]),
        (reduce(ReduceOp::Sum, &[0], false), vec![plain(Tensor::i64(vec![3000, 3], vec![1; 9000]))]),
        (reduce(ReduceOp::Max, &[1], false), vec![plain(Tensor::i64(vec![3, 3000], vec![1; 9000]))]),
        (Op::SumOfSquares, vec![plain(t(&[3, 4])), plain(t(&[17]))]),
        (Op::SumOfSquares, vec![bf16_in(t(&[3, 4])), bf16_in(t(&[17]))]),
        (Op::CrossEntropy { label_smoothing: 0.1 }, vec![plain(t(&[37, 11])), plain(classes(37, 11, 1))]),
        (Op::CrossEntropy { label_smoothing: 0.0 }, vec![bf16_in(t(&[37, 11])), bf16_in(t(&[37, 11]))]),
        (
            Op::CrossEntropyGrad { label_smoothing: 0.1 },
            vec![plain(t(&[37, 11])), plain(classes(37, 11, 1)), plain(Tensor::scalar_f32(1.0))],
        ),
        (
            Op::CrossEntropyGrad { label_smoothing: 0.0 },
            vec![bf16_in(t(&[37, 11])), bf16_in(t(&[37, 11])), bf16_in(Tensor::scalar_f32(1.0))],
        ),
        (Op::ZeroDiagonal { world: 1 }, vec![bf16_in(t(&[5, 5]))]),
    ];
    let mut cases = cases;
    for op in [Op::Softmax { axis: 1 }, Op::LogSoftmax { axis: 1 }, Op::L2Normalize { axis: 1, eps: 1e-12 }] {
        cases.push((op.clone(), vec![plain(t(&[5, 37]))]));
        cases.push((op.clone(), vec![bf16_in(t(&[64, 7, 40]))]));
    }
    let mut seen = std::collections::HashSet::new();
    for (op, operands) in cases {
        let (plan, _) = plan_of(&op, &operands);
        let l = lowered(&plan);
        for src in l.sources.iter().filter(|s| seen.insert(s.name.clone())) {
            let unit = src.unit(&Target::Nvrtc { sm: 90 });
            if let Err(e) = tessera_runtime::cuda::nvrtc::compile(&unit, &src.name, "sm_90") {
                panic!("{}: {e}\n{}", op.name(), src.text);
            }
        }
    }
    assert!(seen.iter().filter(|n| n.starts_with("reduce_")).count() >= 8, "{seen:?}");
}

/// reduce_f32 (what mixed precision makes of a bias gradient's sum): a bf16
/// tensor read as it is, summed wide, an f32 result; the same numbers as
/// the f32 reduction of its f32 copy, on both backends.
#[test]
fn reduce_f32_reads_bf16_and_gives_the_f32_reduction_of_its_copy() {
    for (shape, axes) in [(&[3000usize, 24][..], &[0usize][..]), (&[6, 37], &[1]), (&[4, 5, 6], &[0, 1])] {
        for op in OPS {
            let wide = Op::ReduceF32 { op, axes: axes.to_vec(), keepdim: false };
            let what = format!("{shape:?} over {axes:?}");
            let (plan, _) = plan_of(&wide, &[bf16_in(rand(shape, 3))]);
            let y = plan.outputs[0].1;
            assert_eq!(plan.values[y].dtype, DType::F32, "{what}");
            assert!(plan.kernels.iter().any(|k| k.inputs.iter().any(|&v| plan.values[v].dtype == DType::BF16)));
            let got = check(&what, wide, &[bf16_in(rand(shape, 3))], 1e-5);
            // The reference: the f32 reduction of the same (bf16-exact) values.
            let exact = bf16_in(rand(shape, 3)).data;
            let (want, _) = both(&reduce(op, axes, false), &[plain(exact)]);
            assert_close(&format!("{what} against f32"), &want, &got, 1e-6);
        }
    }
}
