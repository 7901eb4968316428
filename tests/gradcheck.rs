//! Finite-difference checks of every gradient rule: for each op, a tiny graph
//! `loss = sum(op(params) * probe)` is differentiated by autodiff and run on
//! the CPU backend; the analytic directional derivative along random
//! directions must match central differences of the loss.

use tessera_compiler::autodiff::backward;
use tessera_compiler::ir::{BinaryOp, DType, Dim, Graph, Init, Op, ReduceOp, Shape, TensorType, UnaryOp, ValueId};
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::philox::Stream;
use tessera_runtime::Tensor;

const B: u64 = 3;

fn shape(dims: &[i64]) -> Shape {
    // -1 stands for the symbolic batch.
    Shape(dims.iter().map(|&d| if d < 0 { Dim::B } else { Dim::Const(d as u64) }).collect())
}

/// A case: builds the forward value from its parameters.
struct Case {
    name: &'static str,
    params: Vec<(Vec<i64>, Init)>,
    build: fn(&mut Graph, &[ValueId]) -> ValueId,
    training: bool,
}

fn op(g: &mut Graph, op: Op, xs: &[ValueId]) -> ValueId {
    g.add_op(op, xs, "t").unwrap_or_else(|e| panic!("{e}"))
}

fn normal() -> Init {
    Init::Normal { std: 1.0 }
}

fn positive() -> Init {
    Init::Uniform { low: 0.5, high: 2.0 }
}

fn run_case(case: &Case) {
    let mut g = Graph::new();
    let params: Vec<ValueId> = case
        .params
        .iter()
        .enumerate()
        .map(|(i, (dims, init))| {
            g.add_param(&format!("p{i}"), TensorType::f32(shape(dims)), init.clone(), true, "t").unwrap()
        })
        .collect();
    let y = (case.build)(&mut g, &params);
    let yshape = g.ty(y).shape.clone();
    let probe = g.add_input("probe", yshape.clone(), DType::F32).unwrap();
    let prod = op(&mut g, Op::Binary(BinaryOp::Mul), &[y, probe]);
    let r = yshape.rank();
    let loss = op(&mut g, Op::Reduce { op: ReduceOp::Sum, axes: (0..r).collect(), keepdim: false }, &[prod]);
    g.set_output("loss", loss);
    let grads = backward(&mut g, loss).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    for (n, d) in &grads {
        g.set_output(&format!("grad.{n}"), *d);
    }
    g.verify().unwrap();
    let plan = tessera_compiler::plan::lower(&g, B, case.training).unwrap();
    let probe_len: u64 = yshape.numel(B);
    let s = Stream::new(99, 0, 7);
    let probe_t = Tensor::f32(
        yshape.0.iter().map(|d| d.eval(B) as usize).collect(),
        (0..probe_len).map(|i| s.uniform_at(i) * 2.0 - 1.0).collect(),
    );
    let mut ex = CpuExecutor::new(plan, 5).unwrap();
    let loss_at = |ex: &mut CpuExecutor| -> (f64, Vec<(String, Vec<f32>)>) {
        ex.set_step(0);
        let out = ex.run(&[("probe", probe_t.clone())]).unwrap();
        let l = out["loss"].as_f32().unwrap()[0] as f64;
        let gs = grads.iter().map(|(n, _)| (n.clone(), out[&format!("grad.{n}")].as_f32().unwrap().to_vec())).collect();
        (l, gs)
    };
    let base: Vec<(String, Tensor)> = grads.iter().map(|(n, _)| (n.clone(), ex.state(n).unwrap().clone())).collect();
    let (_, analytic) = loss_at(&mut ex);
    assert_eq!(analytic.len(), case.params.len(), "{}: every parameter gets a gradient", case.name);
    // Three random directions; each compares <grad, d> with (L(p+hd) - L(p-hd)) / 2h.
    for dir in 0..3u32 {
        let ds: Vec<Vec<f32>> = base
            .iter()
            .enumerate()
            .map(|(i, (_, t))| {
                let st = Stream::new(dir as u64, i as u64, 11);
                (0..t.as_f32().unwrap().len() as u64).map(|j| st.uniform_at(j) * 2.0 - 1.0).collect()
            })
            .collect();
        let h = 1e-2f32;
        let eval = |sign: f32, ex: &mut CpuExecutor| {
            for ((n, t), d) in base.iter().zip(&ds) {
                let v: Vec<f32> = t.as_f32().unwrap().iter().zip(d).map(|(x, d)| x + sign * h * d).collect();
                ex.set_state(n, Tensor::f32(t.shape.clone(), v)).unwrap();
            }
            loss_at(ex).0
        };
        let numeric = (eval(1.0, &mut ex) - eval(-1.0, &mut ex)) / (2.0 * h as f64);
        let exact: f64 = analytic
            .iter()
            .zip(&ds)
            .map(|((_, g), d)| g.iter().zip(d).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>())
            .sum();
        let err = (numeric - exact).abs() / (1e-2 + numeric.abs().max(exact.abs()));
        assert!(err < 2e-2, "{}: direction {dir}: autodiff {exact:.6}, finite differences {numeric:.6}", case.name);
    }
}

fn unary(g: &mut Graph, u: UnaryOp, x: ValueId) -> ValueId {
    op(g, Op::Unary(u), &[x])
}

#[test]
fn gradients_match_finite_differences() {
    let cases = vec![
        Case {
            name: "linear+bias",
            params: vec![(vec![-1, 4, 5], normal()), (vec![3, 5], normal()), (vec![3], normal())],
            build: |g, p| op(g, Op::Linear, p),
            training: true,
        },
        Case {
            name: "linear",
            params: vec![(vec![-1, 5], normal()), (vec![3, 5], normal())],
            build: |g, p| op(g, Op::Linear, p),
            training: true,
        },
        Case {
            name: "matmul broadcast",
            params: vec![(vec![-1, 2, 3, 4], normal()), (vec![4, 5], normal())],
            build: |g, p| op(g, Op::matmul(), p),
            training: true,
        },
        Case {
            name: "slices that tile their input (concat backward)",
            params: vec![(vec![-1, 5, 2], normal())],
            build: |g, p| {
                let a = op(g, Op::Slice { axis: 1, start: Dim::Const(0), end: Dim::Const(2) }, p);
                let b = op(g, Op::Slice { axis: 1, start: Dim::Const(2), end: Dim::Const(5) }, p);
                let a2 = op(g, Op::Scale { factor: 2.0 }, &[a]);
                let b2 = unary(g, UnaryOp::Square, b);
                op(g, Op::Concat { axis: 1 }, &[b2, a2])
            },
            training: true,
        },
        Case {
            name: "a slice and a direct use (pad backward)",
            params: vec![(vec![-1, 5], normal())],
            build: |g, p| {
                let a = op(g, Op::Slice { axis: 1, start: Dim::Const(1), end: Dim::Const(3) }, p);
                let a2 = op(g, Op::Concat { axis: 1 }, &[a, a, a]);
                let x = op(g, Op::Slice { axis: 1, start: Dim::Const(0), end: Dim::Const(5) }, &[p[0]]);
                let b = op(g, Op::Concat { axis: 1 }, &[x, p[0]]);
                let c = op(g, Op::Slice { axis: 1, start: Dim::Const(0), end: Dim::Const(6) }, &[b]);
                op(g, Op::Binary(BinaryOp::Mul), &[c, a2])
            },
            training: true,
        },
        Case {
            name: "matmul a^T",
            params: vec![(vec![-1, 4, 3], normal()), (vec![4, 5], normal())],
            build: |g, p| op(g, Op::Matmul { transpose_a: true, transpose_b: false }, p),
            training: true,
        },
        Case {
            name: "matmul b^T",
            params: vec![(vec![-1, 3, 4], normal()), (vec![5, 4], normal())],
            build: |g, p| op(g, Op::Matmul { transpose_a: false, transpose_b: true }, p),
            training: true,
        },
        Case {
            name: "matmul a^T b^T",
            params: vec![(vec![-1, 2, 4, 3], normal()), (vec![-1, 2, 5, 4], normal())],
            build: |g, p| op(g, Op::Matmul { transpose_a: true, transpose_b: true }, p),
            training: true,
        },
        Case {
            name: "conv2d",
            params: vec![(vec![-1, 2, 5, 5], normal()), (vec![3, 2, 3, 3], normal()), (vec![3], normal())],
            build: |g, p| op(g, Op::Conv2d { stride: [2, 2], padding: [1, 1] }, p),
            training: true,
        },
        Case {
            name: "patch conv",
            params: vec![(vec![-1, 3, 4, 4], normal()), (vec![6, 3, 2, 2], normal()), (vec![6], normal())],
            build: |g, p| op(g, Op::Conv2d { stride: [2, 2], padding: [0, 0] }, p),
            training: true,
        },
        Case {
            name: "attention",
            params: vec![(vec![-1, 2, 4, 3], normal()), (vec![-1, 2, 5, 3], normal()), (vec![-1, 2, 5, 2], normal())],
            build: |g, p| op(g, Op::Attention { scale: 0.7, dropout: 0.0, key: 1 }, p),
            training: true,
        },
        Case {
            name: "self-attention (stacked gradient kernel)",
            params: vec![(vec![-1, 2, 5, 3], normal()), (vec![-1, 2, 5, 3], normal()), (vec![-1, 2, 5, 3], normal())],
            build: |g, p| op(g, Op::Attention { scale: 0.6, dropout: 0.0, key: 3 }, p),
            training: true,
        },
        Case {
            name: "attention+dropout",
            params: vec![(vec![-1, 2, 4, 3], normal()), (vec![-1, 2, 4, 3], normal()), (vec![-1, 2, 4, 3], normal())],
            build: |g, p| op(g, Op::Attention { scale: 0.5, dropout: 0.3, key: 2 }, p),
            training: true,
        },
        Case {
            name: "layer_norm",
            params: vec![(vec![-1, 3, 6], normal()), (vec![6], normal()), (vec![6], normal())],
            build: |g, p| op(g, Op::LayerNorm { eps: 1e-5 }, p),
            training: true,
        },
        Case {
            name: "cross_entropy soft",
            params: vec![(vec![-1, 5], normal())],
            build: |g, p| {
                // Soft targets come from the data (the cutmixup collator): a constant here,
                // summing to 1.5 per row so the rule is checked beyond normalised targets.
                let t = g.add_fill(0.3, TensorType::f32(shape(&[-1, 5])), "t");
                op(g, Op::CrossEntropy { label_smoothing: 0.0 }, &[p[0], t])
            },
            training: true,
        },
        Case {
            name: "cross_entropy hard+smoothing",
            params: vec![(vec![-1, 5], normal())],
            build: |g, p| {
                let t = g.add_fill(2.0, TensorType::new(shape(&[-1]), DType::I64), "t");
                op(g, Op::CrossEntropy { label_smoothing: 0.1 }, &[p[0], t])
            },
            training: true,
        },
        Case {
            name: "gelu",
            params: vec![(vec![-1, 7], normal())],
            build: |g, p| unary(g, UnaryOp::Gelu, p[0]),
            training: true,
        },
        Case {
            name: "relu",
            // Both branches, each at least 0.5 from the kink (finite differences must not cross it).
            params: vec![(vec![-1, 7], positive()), (vec![-1, 7], positive())],
            build: |g, p| {
                let n = unary(g, UnaryOp::Neg, p[1]);
                let x = op(g, Op::Concat { axis: 1 }, &[p[0], n]);
                unary(g, UnaryOp::Relu, x)
            },
            training: true,
        },
        Case {
            name: "tanh",
            params: vec![(vec![-1, 7], normal())],
            build: |g, p| unary(g, UnaryOp::Tanh, p[0]),
            training: true,
        },
        Case {
            name: "sigmoid",
            params: vec![(vec![-1, 7], normal())],
            build: |g, p| unary(g, UnaryOp::Sigmoid, p[0]),
            training: true,
        },
        Case {
            name: "exp",
            params: vec![(vec![-1, 7], normal())],
            build: |g, p| unary(g, UnaryOp::Exp, p[0]),
            training: true,
        },
        Case {
            name: "log",
            params: vec![(vec![-1, 7], positive())],
            build: |g, p| unary(g, UnaryOp::Log, p[0]),
            training: true,
        },
        Case {
            name: "sqrt",
            params: vec![(vec![-1, 7], positive())],
            build: |g, p| unary(g, UnaryOp::Sqrt, p[0]),
            training: true,
        },
        Case {
            name: "recip",
            params: vec![(vec![-1, 7], positive())],
            build: |g, p| unary(g, UnaryOp::Recip, p[0]),
            training: true,
        },
        Case {
            name: "square",
            params: vec![(vec![-1, 7], normal())],
            build: |g, p| unary(g, UnaryOp::Square, p[0]),
            training: true,
        },
        Case {
            name: "neg",
            params: vec![(vec![-1, 7], normal())],
            build: |g, p| unary(g, UnaryOp::Neg, p[0]),
            training: true,
        },
        Case {
            name: "add broadcast",
            params: vec![(vec![-1, 3, 4], normal()), (vec![1, 4], normal())],
            build: |g, p| op(g, Op::Binary(BinaryOp::Add), p),
            training: true,
        },
        Case {
            name: "sub broadcast",
            params: vec![(vec![-1, 3, 4], normal()), (vec![3, 1], normal())],
            build: |g, p| op(g, Op::Binary(BinaryOp::Sub), p),
            training: true,
        },
        Case {
            name: "mul broadcast",
            params: vec![(vec![-1, 3, 4], normal()), (vec![4], normal())],
            build: |g, p| op(g, Op::Binary(BinaryOp::Mul), p),
            training: true,
        },
        Case {
            name: "div broadcast",
            params: vec![(vec![-1, 3, 4], normal()), (vec![-1, 1, 4], positive())],
            build: |g, p| op(g, Op::Binary(BinaryOp::Div), p),
            training: true,
        },
        Case {
            name: "scale",
            params: vec![(vec![-1, 4], normal())],
            build: |g, p| op(g, Op::Scale { factor: -1.5 }, p),
            training: true,
        },
        Case {
            name: "add_scalar",
            params: vec![(vec![-1, 4], normal())],
            build: |g, p| op(g, Op::AddScalar { value: 2.0 }, p),
            training: true,
        },
        Case {
            name: "pow_scalar",
            params: vec![(vec![-1, 4], positive())],
            build: |g, p| op(g, Op::PowScalar { exponent: 1.7 }, p),
            training: true,
        },
        Case {
            name: "softmax",
            params: vec![(vec![-1, 3, 5], normal())],
            build: |g, p| op(g, Op::Softmax { axis: 2 }, p),
            training: true,
        },
        Case {
            name: "softmax axis 1",
            params: vec![(vec![-1, 3, 5], normal())],
            build: |g, p| op(g, Op::Softmax { axis: 1 }, p),
            training: true,
        },
        Case {
            name: "log_softmax",
            params: vec![(vec![-1, 5], normal())],
            build: |g, p| op(g, Op::LogSoftmax { axis: 1 }, p),
            training: true,
        },
        Case {
            name: "l2_normalize",
            params: vec![(vec![-1, 5], normal())],
            build: |g, p| op(g, Op::L2Normalize { axis: 1, eps: 1e-12 }, p),
            training: true,
        },
        Case {
            name: "dropout",
            params: vec![(vec![-1, 9], normal())],
            build: |g, p| op(g, Op::Dropout { p: 0.4, key: 3 }, p),
            training: true,
        },
        Case {
            name: "drop_path",
            params: vec![(vec![-1, 3, 4], normal())],
            build: |g, p| op(g, Op::DropPath { p: 0.5, key: 4 }, p),
            training: true,
        },
        Case {
            name: "sum keepdim",
            params: vec![(vec![-1, 3, 4], normal())],
            build: |g, p| op(g, Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keepdim: true }, p),
            training: true,
        },
        Case {
            name: "mean over batch",
            params: vec![(vec![-1, 3, 4], normal())],
            build: |g, p| op(g, Op::Reduce { op: ReduceOp::Mean, axes: vec![0, 2], keepdim: false }, p),
            training: true,
        },
        Case {
            name: "reshape+permute",
            params: vec![(vec![-1, 6, 2], normal())],
            build: |g, p| {
                let r = op(g, Op::Reshape { shape: shape(&[-1, 3, 4]) }, p);
                op(g, Op::Permute { perm: vec![2, 0, 1] }, &[r])
            },
            training: true,
        },
        Case {
            name: "concat+slice",
            params: vec![(vec![-1, 2, 3], normal()), (vec![-1, 4, 3], normal())],
            build: |g, p| {
                let c = op(g, Op::Concat { axis: 1 }, p);
                op(g, Op::Slice { axis: 1, start: Dim::Const(1), end: Dim::Const(5) }, &[c])
            },
            training: true,
        },
        Case {
            name: "slice batch",
            params: vec![(vec![-1, 3], normal())],
            build: |g, p| {
                let x = op(g, Op::Concat { axis: 0 }, &[p[0], p[0]]);
                op(g, Op::Slice { axis: 0, start: Dim::B, end: Dim::Batch(2) }, &[x])
            },
            training: true,
        },
        Case {
            name: "expand",
            params: vec![(vec![1, 1, 4], normal())],
            build: |g, p| op(g, Op::Expand { shape: shape(&[-1, 3, 4]) }, p),
            training: true,
        },
        Case {
            name: "all_gather world 1",
            params: vec![(vec![-1, 4], normal())],
            build: |g, p| op(g, Op::AllGather { world: 1 }, p),
            training: true,
        },
    ];
    for case in &cases {
        run_case(case);
    }
}

#[test]
fn batch_norm_gradient_in_training_mode() {
    run_case(&Case {
        name: "batch_norm",
        params: vec![(vec![-1, 4], normal()), (vec![4], normal()), (vec![4], normal())],
        build: |g, p| {
            let c = TensorType::f32(Shape::consts(&[4]));
            let rm = g.add_buffer("rm", c.clone(), Init::Zeros, "t").unwrap();
            let rv = g.add_buffer("rv", c, Init::Ones, "t").unwrap();
            op(g, Op::BatchNorm { eps: 1e-5, momentum: 0.1 }, &[p[0], p[1], p[2], rm, rv])
        },
        training: true,
    });
}
