//! Parity of every IR op with libtorch, forward and backward.
//!
//! For each op: a graph `y = op(params)` and `loss = sum(y * probe)`, with
//! random parameters and a random probe. tessera computes `y` (a graph
//! output) and the gradient of every parameter (autodiff on the CPU
//! backend); libtorch computes the same from the same values with
//! `requires_grad` and `backward`. Both run in f32.
//!
//! Tolerance: rtol 1e-5, atol 1e-6 (`|a - e| <= atol + rtol |e|` elementwise)
//! for every case; `--nocapture` prints each case's largest differences.
//! Forward only: reduce max, maximum, minimum, heaviside (no gradient rule).
//! Not covered: queue_push / queue_advance (MoCo's queue, no libtorch op),
//! casts to f16 (no plan computes in f16; the CPU copies them), and the
//! gradient ops autodiff emits, which are covered through backward. Casts
//! to bf16 round to nearest even on both sides (the gradient too).
//!
//! Run: `eval "$(./scripts/setup-libtorch.sh)" && cargo test --release --features torch-oracle --test torch_parity_ops`
#![cfg(feature = "torch-oracle")]

mod oracle;

use oracle::{check_close, tensor_from, to_vec};
use tch::{Kind, Reduction, Tensor as TT};
use tessera_compiler::autodiff::{backward, training_step, Optimizer, StepOptions};
use tessera_compiler::ir::{BinaryOp, DType, Dim, Graph, Init, Op, ReduceOp, Shape, TensorType, UnaryOp, ValueId};
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::philox::Stream;
use tessera_runtime::Tensor;

const RTOL: f32 = 1e-5;
const ATOL: f32 = 1e-6;

/// How a parameter's values are drawn.
#[derive(Clone, Copy, Debug)]
enum Dist {
    /// N(0, 1).
    Normal,
    /// U(0.5, 2): for log, sqrt, recip, pow and divisors.
    Positive,
}

/// A graph input that is not differentiated (targets).
#[derive(Clone, Copy, Debug)]
enum Extra {
    /// Class indices `[n]` in `0..k` (i64).
    Labels { n: usize, k: usize },
    /// Rows of a probability distribution `[n, k]` (soft targets).
    Probs { n: usize, k: usize },
}

struct Case {
    name: &'static str,
    params: Vec<(Vec<usize>, Dist)>,
    extras: Vec<Extra>,
    /// tessera's graph: `(graph, params, extra inputs) -> y`.
    tessera: fn(&mut Graph, &[ValueId], &[ValueId]) -> ValueId,
    /// libtorch's `y` from the same values.
    torch: fn(&[TT], &[TT]) -> TT,
    /// Compare gradients too (false: the op has no gradient rule, forward only).
    grad: bool,
    /// Lower the plan in training mode.
    training: bool,
    rtol: f32,
    atol: f32,
}

impl Case {
    fn new(
        name: &'static str,
        params: Vec<(Vec<usize>, Dist)>,
        tessera: fn(&mut Graph, &[ValueId], &[ValueId]) -> ValueId,
        torch: fn(&[TT], &[TT]) -> TT,
    ) -> Case {
        Case { name, params, extras: vec![], tessera, torch, grad: true, training: false, rtol: RTOL, atol: ATOL }
    }
    fn extras(mut self, e: Vec<Extra>) -> Case {
        self.extras = e;
        self
    }
    fn forward_only(mut self) -> Case {
        self.grad = false;
        self
    }
    fn training(mut self) -> Case {
        self.training = true;
        self
    }
    fn atol(mut self, atol: f32) -> Case {
        self.atol = atol;
        self
    }
}

fn n(shape: &[usize]) -> (Vec<usize>, Dist) {
    (shape.to_vec(), Dist::Normal)
}

fn pos(shape: &[usize]) -> (Vec<usize>, Dist) {
    (shape.to_vec(), Dist::Positive)
}

/// Deterministic draws: stream `(seed, stream)`, N(0,1) by Box-Muller.
fn draw(seed: u64, stream: u32, len: usize, dist: Dist) -> Vec<f32> {
    let s = Stream::new(seed, 0, stream);
    (0..len as u64)
        .map(|i| match dist {
            Dist::Positive => 0.5 + 1.5 * s.uniform_at(i),
            Dist::Normal => {
                let u1 = (s.uniform_at(2 * i) as f64).max(1e-7);
                let u2 = s.uniform_at(2 * i + 1) as f64;
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            }
        })
        .collect()
}

fn shape_i64(s: &[usize]) -> Vec<i64> {
    s.iter().map(|&d| d as i64).collect()
}

fn consts(s: &[usize]) -> Shape {
    Shape::consts(&s.iter().map(|&d| d as u64).collect::<Vec<_>>())
}

fn op(g: &mut Graph, op: Op, xs: &[ValueId]) -> ValueId {
    g.add_op(op, xs, "t").unwrap_or_else(|e| panic!("{e}"))
}

fn un(g: &mut Graph, u: UnaryOp, x: ValueId) -> ValueId {
    op(g, Op::Unary(u), &[x])
}

fn bin(g: &mut Graph, b: BinaryOp, x: &[ValueId]) -> ValueId {
    op(g, Op::Binary(b), x)
}

/// `loss = sum(y * probe)` with a new graph input `probe` of y's shape.
fn probe_loss(g: &mut Graph, y: ValueId) -> (ValueId, Vec<usize>) {
    let ys = g.ty(y).shape.clone();
    let dims: Vec<usize> = ys.dims().iter().map(|d| d.as_const().expect("constant shapes") as usize).collect();
    let probe = g.add_input("probe", ys.clone(), DType::F32).unwrap();
    let prod = bin(g, BinaryOp::Mul, &[y, probe]);
    let loss = if dims.is_empty() {
        prod
    } else {
        op(g, Op::Reduce { op: ReduceOp::Sum, axes: (0..dims.len()).collect(), keepdim: false }, &[prod])
    };
    (loss, dims)
}

// Largest |tessera - libtorch| seen by `compare` in this thread, and the
// largest such difference relative to max |libtorch| of its tensor.
thread_local! {
    static WORST: std::cell::Cell<(f64, f64)> = const { std::cell::Cell::new((0.0, 0.0)) };
}

fn take_worst() -> (f64, f64) {
    WORST.with(|w| w.replace((0.0, 0.0)))
}

/// Compares shapes and values (`|a - e| <= atol + rtol |e|` elementwise);
/// a mismatch is appended to `report`.
fn compare(what: &str, tessera: &Tensor, torch: &TT, rtol: f32, atol: f32, report: &mut Vec<String>) -> bool {
    let want = shape_i64(&tessera.shape);
    if torch.size() != want {
        report.push(format!("{what}: shape: tessera {:?}, libtorch {:?}", tessera.shape, torch.size()));
        return false;
    }
    let a = tessera.as_f32().expect("f32 result");
    let e = to_vec(torch);
    let diff = a.iter().zip(&e).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    let scale = e.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    WORST.with(|w| {
        let (d, r) = w.get();
        w.set((d.max(diff), r.max(if scale > 0.0 { diff / scale } else { diff })));
    });
    match check_close(a, &e, rtol, atol, what) {
        Ok(()) => true,
        Err(msg) => {
            report.push(msg);
            false
        }
    }
}

/// Runs one case; returns the failures (empty: it passed).
fn run_case(idx: usize, case: &Case) -> Vec<String> {
    let mut failures = Vec::new();
    let seed = 1000 + idx as u64;
    let mut g = Graph::new();
    let params: Vec<ValueId> = case
        .params
        .iter()
        .enumerate()
        .map(|(i, (s, _))| g.add_param(&format!("p{i}"), TensorType::f32(consts(s)), Init::Zeros, true, "t").unwrap())
        .collect();
    let mut extra_ids = Vec::new();
    let mut extra_vals: Vec<(String, Tensor, TT)> = Vec::new();
    for (i, e) in case.extras.iter().enumerate() {
        let name = format!("x{i}");
        let s = Stream::new(seed, 0, 500 + i as u32);
        match *e {
            Extra::Labels { n, k } => {
                extra_ids.push(g.add_input(&name, consts(&[n]), DType::I64).unwrap());
                let labels: Vec<i64> = (0..n as u64).map(|j| (s.u32_at(j) % k as u32) as i64).collect();
                let tt = TT::from_slice(&labels);
                extra_vals.push((name, Tensor::i64(vec![n], labels), tt));
            }
            Extra::Probs { n, k } => {
                extra_ids.push(g.add_input(&name, consts(&[n, k]), DType::F32).unwrap());
                let raw: Vec<f32> = (0..(n * k) as u64).map(|j| s.uniform_at(j) + 0.05).collect();
                let mut p = raw.clone();
                for row in p.chunks_mut(k) {
                    let sum: f32 = row.iter().sum();
                    row.iter_mut().for_each(|v| *v /= sum);
                }
                let tt = tensor_from(&p, &[n as i64, k as i64]);
                extra_vals.push((name, Tensor::f32(vec![n, k], p), tt));
            }
        }
    }
    let y = (case.tessera)(&mut g, &params, &extra_ids);
    g.set_output("y", y);
    let mut probe = None;
    let mut grads = Vec::new();
    if case.grad {
        let (loss, dims) = probe_loss(&mut g, y);
        g.set_output("loss", loss);
        grads = backward(&mut g, loss).unwrap_or_else(|e| panic!("{}: backward: {e}", case.name));
        for (name, d) in &grads {
            g.set_output(&format!("grad.{name}"), *d);
        }
        let len = dims.iter().product::<usize>();
        let pv = draw(seed, 900, len, Dist::Normal);
        probe = Some((Tensor::f32(dims.clone(), pv.clone()), tensor_from(&pv, &shape_i64(&dims))));
    }
    g.verify().unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let plan =
        tessera_compiler::plan::lower(&g, 1, case.training).unwrap_or_else(|e| panic!("{}: lower: {e}", case.name));
    let mut ex = CpuExecutor::new(plan, 3).unwrap();

    // Same values on both sides.
    let mut torch_params = Vec::new();
    for (i, (s, dist)) in case.params.iter().enumerate() {
        let v = draw(seed, i as u32, s.iter().product(), *dist);
        ex.set_state(&format!("p{i}"), Tensor::f32(s.clone(), v.clone())).unwrap();
        torch_params.push(tensor_from(&v, &shape_i64(s)).set_requires_grad(true));
    }
    let mut inputs: Vec<(&str, Tensor)> = extra_vals.iter().map(|(n, t, _)| (n.as_str(), t.clone())).collect();
    if let Some((p, _)) = &probe {
        inputs.push(("probe", p.clone()));
    }
    let out = ex.run(&inputs).unwrap_or_else(|e| panic!("{}: run: {e}", case.name));

    let torch_extras: Vec<TT> = extra_vals.iter().map(|(_, _, t)| t.shallow_clone()).collect();
    let ty = (case.torch)(&torch_params, &torch_extras);
    compare(&format!("{}: y", case.name), &out["y"], &ty, case.rtol, case.atol, &mut failures);
    if let Some((_, probe_t)) = &probe {
        let loss = (&ty * probe_t).sum(Kind::Float);
        loss.backward();
        if grads.len() != case.params.len() {
            failures.push(format!(
                "{}: tessera gives {} gradients for {} params",
                case.name,
                grads.len(),
                params.len()
            ));
        }
        for (i, p) in torch_params.iter().enumerate() {
            let name = format!("p{i}");
            let Some(tg) = out.get(&format!("grad.{name}")) else {
                failures.push(format!("{}: no tessera gradient for {name}", case.name));
                continue;
            };
            let grad = p.grad();
            if !grad.defined() {
                failures.push(format!("{}: libtorch gives no gradient for {name}", case.name));
                continue;
            }
            compare(&format!("{}: grad {name}", case.name), tg, &grad, case.rtol, case.atol, &mut failures);
        }
    }
    failures
}

fn run_all(cases: &[Case]) {
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        take_worst();
        let f = run_case(i, case);
        let (d, r) = take_worst();
        let status = if f.is_empty() { "ok" } else { "FAILED" };
        println!("{:<44} {status:<6} max |diff| {d:.2e}, max |diff| / max |torch| {r:.2e}", case.name);
        failures.extend(f);
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

fn red(g: &mut Graph, o: ReduceOp, x: ValueId, axes: &[usize], keepdim: bool) -> ValueId {
    op(g, Op::Reduce { op: o, axes: axes.to_vec(), keepdim }, &[x])
}

/// tessera: the bicubic-resize matrix buffer (ViT position embeddings for
/// crops of another size) applied to a [from*from, D] grid of rows.
fn bicubic(g: &mut Graph, x: ValueId, from: u64, to: u64) -> ValueId {
    let scale_factor = ((to * to) as f64 / (from * from) as f64).sqrt();
    let ty = TensorType::f32(consts(&[(to * to) as usize, (from * from) as usize]));
    let m = g.add_buffer("resize", ty, Init::BicubicResize { from, to, scale_factor }, "t").unwrap();
    op(g, Op::matmul(), &[m, x])
}

/// libtorch: VISSL's F.interpolate(grid, scale_factor = sqrt(N_in / N_cfg), mode = "bicubic").
fn torch_bicubic(x: &TT, from: i64, to: i64) -> TT {
    let d = x.size()[1];
    let sf = ((to * to) as f64 / (from * from) as f64).sqrt();
    let img = x.reshape([1, from, from, d]).permute([0, 3, 1, 2]);
    let out = img.upsample_bicubic2d([to, to], false, Some(sf), Some(sf));
    out.permute([0, 2, 3, 1]).reshape([to * to, d])
}

#[test]
fn compound_ops_match_libtorch() {
    let cases = vec![
        Case::new(
            "bicubic resize 4x4 -> 2x2",
            vec![n(&[16, 3])],
            |g, p, _| bicubic(g, p[0], 4, 2),
            |p, _| torch_bicubic(&p[0], 4, 2),
        ),
        Case::new(
            "bicubic resize 4x4 -> 6x6",
            vec![n(&[16, 3])],
            |g, p, _| bicubic(g, p[0], 4, 6),
            |p, _| torch_bicubic(&p[0], 4, 6),
        ),
        Case::new(
            "bicubic resize 14x14 -> 9x9",
            vec![n(&[196, 2])],
            |g, p, _| bicubic(g, p[0], 14, 9),
            |p, _| torch_bicubic(&p[0], 14, 9),
        )
        // One f32 sum of 196 products per element against PyTorch's two
        // separable passes: rounding near zero differs by ~2e-6.
        .atol(5e-6),
        Case::new(
            "linear+bias",
            vec![n(&[2, 3, 5]), n(&[4, 5]), n(&[4])],
            |g, p, _| op(g, Op::Linear, p),
            |p, _| p[0].linear(&p[1], Some(&p[2])),
        ),
        Case::new(
            "linear",
            vec![n(&[6, 5]), n(&[4, 5])],
            |g, p, _| op(g, Op::Linear, p),
            |p, _| p[0].linear::<TT>(&p[1], None),
        ),
        Case::new(
            "matmul 2d",
            vec![n(&[3, 4]), n(&[4, 5])],
            |g, p, _| op(g, Op::matmul(), p),
            |p, _| p[0].matmul(&p[1]),
        ),
        Case::new(
            "matmul batch x 2d",
            vec![n(&[2, 3, 4]), n(&[4, 5])],
            |g, p, _| op(g, Op::matmul(), p),
            |p, _| p[0].matmul(&p[1]),
        ),
        Case::new(
            "matmul broadcast batch",
            vec![n(&[2, 1, 3, 4]), n(&[3, 4, 5])],
            |g, p, _| op(g, Op::matmul(), p),
            |p, _| p[0].matmul(&p[1]),
        ),
        Case::new(
            "matmul batched",
            vec![n(&[2, 3, 4, 6]), n(&[2, 3, 6, 5])],
            |g, p, _| op(g, Op::matmul(), p),
            |p, _| p[0].matmul(&p[1]),
        ),
        Case::new(
            "matmul a^T (weight-gradient form)",
            vec![n(&[7, 3]), n(&[7, 5])],
            |g, p, _| op(g, Op::Matmul { transpose_a: true, transpose_b: false }, p),
            |p, _| p[0].transpose(0, 1).matmul(&p[1]),
        ),
        Case::new(
            "matmul b^T batched (attention-score form)",
            vec![n(&[2, 3, 4, 6]), n(&[2, 3, 5, 6])],
            |g, p, _| op(g, Op::Matmul { transpose_a: false, transpose_b: true }, p),
            |p, _| p[0].matmul(&p[1].transpose(-2, -1)),
        ),
        Case::new(
            "matmul a^T b^T broadcast",
            vec![n(&[2, 1, 4, 3]), n(&[3, 5, 4])],
            |g, p, _| op(g, Op::Matmul { transpose_a: true, transpose_b: true }, p),
            |p, _| p[0].transpose(-2, -1).matmul(&p[1].transpose(-2, -1)),
        ),
        Case::new(
            "conv2d stride 2 pad 1",
            vec![n(&[2, 3, 7, 7]), n(&[4, 3, 3, 3]), n(&[4])],
            |g, p, _| op(g, Op::Conv2d { stride: [2, 2], padding: [1, 1] }, p),
            |p, _| p[0].conv2d(&p[1], Some(&p[2]), [2, 2], [1, 1], [1, 1], 1),
        ),
        Case::new(
            "conv2d patch embedding (stride = kernel)",
            vec![n(&[2, 3, 8, 8]), n(&[6, 3, 4, 4]), n(&[6])],
            |g, p, _| op(g, Op::Conv2d { stride: [4, 4], padding: [0, 0] }, p),
            |p, _| p[0].conv2d(&p[1], Some(&p[2]), [4, 4], [0, 0], [1, 1], 1),
        ),
        Case::new(
            "conv2d no bias, stride [2,1], pad [0,1]",
            vec![n(&[1, 2, 6, 5]), n(&[3, 2, 3, 2])],
            |g, p, _| op(g, Op::Conv2d { stride: [2, 1], padding: [0, 1] }, p),
            |p, _| p[0].conv2d::<TT>(&p[1], None, [2, 1], [0, 1], [1, 1], 1),
        ),
        Case::new(
            "attention",
            vec![n(&[2, 3, 5, 4]), n(&[2, 3, 6, 4]), n(&[2, 3, 6, 7])],
            |g, p, _| op(g, Op::Attention { scale: 0.4, dropout: 0.0, key: 1 }, p),
            |p, _| (p[0].matmul(&p[1].transpose(-2, -1)) * 0.4).softmax(-1, Kind::Float).matmul(&p[2]),
        ),
        Case::new(
            "attention (training mode, dropout 0)",
            vec![n(&[1, 2, 4, 3]), n(&[1, 2, 4, 3]), n(&[1, 2, 4, 3])],
            |g, p, _| op(g, Op::Attention { scale: 3f64.powf(-0.5), dropout: 0.0, key: 2 }, p),
            |p, _| (p[0].matmul(&p[1].transpose(-2, -1)) * 3f64.powf(-0.5)).softmax(-1, Kind::Float).matmul(&p[2]),
        )
        .training(),
        Case::new(
            "layer_norm eps 1e-6",
            vec![n(&[2, 3, 8]), n(&[8]), n(&[8])],
            |g, p, _| op(g, Op::LayerNorm { eps: 1e-6 }, p),
            |p, _| p[0].layer_norm([8], Some(&p[1]), Some(&p[2]), 1e-6, false),
        ),
        Case::new(
            "layer_norm eps 1e-5",
            vec![n(&[5, 16]), n(&[16]), n(&[16])],
            |g, p, _| op(g, Op::LayerNorm { eps: 1e-5 }, p),
            |p, _| p[0].layer_norm([16], Some(&p[1]), Some(&p[2]), 1e-5, false),
        ),
        Case::new(
            "cross_entropy hard targets",
            vec![n(&[5, 7])],
            |g, p, x| op(g, Op::CrossEntropy { label_smoothing: 0.0 }, &[p[0], x[0]]),
            |p, x| p[0].cross_entropy_loss::<TT>(&x[0], None, Reduction::Mean, -100, 0.0),
        )
        .extras(vec![Extra::Labels { n: 5, k: 7 }]),
        Case::new(
            "cross_entropy label smoothing 0.1",
            vec![n(&[5, 7])],
            |g, p, x| op(g, Op::CrossEntropy { label_smoothing: 0.1 }, &[p[0], x[0]]),
            |p, x| p[0].cross_entropy_loss::<TT>(&x[0], None, Reduction::Mean, -100, 0.1),
        )
        .extras(vec![Extra::Labels { n: 5, k: 7 }]),
        Case::new(
            "cross_entropy soft targets",
            vec![n(&[6, 4])],
            |g, p, x| op(g, Op::CrossEntropy { label_smoothing: 0.0 }, &[p[0], x[0]]),
            |p, x| p[0].cross_entropy_loss::<TT>(&x[0], None, Reduction::Mean, -100, 0.0),
        )
        .extras(vec![Extra::Probs { n: 6, k: 4 }]),
    ];
    run_all(&cases);
}

#[test]
fn elementwise_ops_match_libtorch() {
    let cases = vec![
        Case::new("gelu (exact)", vec![n(&[3, 7])], |g, p, _| un(g, UnaryOp::Gelu, p[0]), |p, _| p[0].gelu("none")),
        Case::new("relu", vec![n(&[3, 7])], |g, p, _| un(g, UnaryOp::Relu, p[0]), |p, _| p[0].relu()),
        Case::new("tanh", vec![n(&[3, 7])], |g, p, _| un(g, UnaryOp::Tanh, p[0]), |p, _| p[0].tanh()),
        Case::new("sigmoid", vec![n(&[3, 7])], |g, p, _| un(g, UnaryOp::Sigmoid, p[0]), |p, _| p[0].sigmoid()),
        Case::new("exp", vec![n(&[3, 7])], |g, p, _| un(g, UnaryOp::Exp, p[0]), |p, _| p[0].exp()),
        Case::new("log", vec![pos(&[3, 7])], |g, p, _| un(g, UnaryOp::Log, p[0]), |p, _| p[0].log()),
        Case::new("sqrt", vec![pos(&[3, 7])], |g, p, _| un(g, UnaryOp::Sqrt, p[0]), |p, _| p[0].sqrt()),
        Case::new("recip", vec![pos(&[3, 7])], |g, p, _| un(g, UnaryOp::Recip, p[0]), |p, _| p[0].reciprocal()),
        Case::new("square", vec![n(&[3, 7])], |g, p, _| un(g, UnaryOp::Square, p[0]), |p, _| p[0].square()),
        Case::new("neg", vec![n(&[3, 7])], |g, p, _| un(g, UnaryOp::Neg, p[0]), |p, _| -&p[0]),
        Case::new(
            "heaviside (forward)",
            vec![n(&[3, 7])],
            |g, p, _| un(g, UnaryOp::Heaviside, p[0]),
            |p, _| p[0].heaviside(&p[0].zeros_like()),
        )
        .forward_only(),
        Case::new(
            "cast to bf16 and back",
            vec![n(&[3, 7])],
            |g, p, _| {
                let b = op(g, Op::Cast { dtype: DType::BF16 }, &[p[0]]);
                op(g, Op::Cast { dtype: DType::F32 }, &[b])
            },
            |p, _| p[0].to_kind(Kind::BFloat16).to_kind(Kind::Float),
        ),
        Case::new(
            "add broadcast [2,3,4]+[1,4]",
            vec![n(&[2, 3, 4]), n(&[1, 4])],
            |g, p, _| bin(g, BinaryOp::Add, p),
            |p, _| &p[0] + &p[1],
        ),
        Case::new(
            "add broadcast [4]+[2,3,4]",
            vec![n(&[4]), n(&[2, 3, 4])],
            |g, p, _| bin(g, BinaryOp::Add, p),
            |p, _| &p[0] + &p[1],
        ),
        Case::new(
            "sub broadcast [2,3,4]-[3,1]",
            vec![n(&[2, 3, 4]), n(&[3, 1])],
            |g, p, _| bin(g, BinaryOp::Sub, p),
            |p, _| &p[0] - &p[1],
        ),
        Case::new(
            "mul broadcast [2,3,4]*[4]",
            vec![n(&[2, 3, 4]), n(&[4])],
            |g, p, _| bin(g, BinaryOp::Mul, p),
            |p, _| &p[0] * &p[1],
        ),
        Case::new(
            "mul broadcast both [3,1]*[2,1,4]",
            vec![n(&[3, 1]), n(&[2, 1, 4])],
            |g, p, _| bin(g, BinaryOp::Mul, p),
            |p, _| &p[0] * &p[1],
        ),
        Case::new(
            "div broadcast [2,3,4]/[2,1,4]",
            vec![n(&[2, 3, 4]), pos(&[2, 1, 4])],
            |g, p, _| bin(g, BinaryOp::Div, p),
            |p, _| &p[0] / &p[1],
        ),
        Case::new(
            "div broadcast [4]/[3,4]",
            vec![n(&[4]), pos(&[3, 4])],
            |g, p, _| bin(g, BinaryOp::Div, p),
            |p, _| &p[0] / &p[1],
        ),
        Case::new(
            "maximum (forward)",
            vec![n(&[2, 3]), n(&[3])],
            |g, p, _| bin(g, BinaryOp::Max, p),
            |p, _| p[0].maximum(&p[1]),
        )
        .forward_only(),
        Case::new(
            "minimum (forward)",
            vec![n(&[2, 3]), n(&[2, 1])],
            |g, p, _| bin(g, BinaryOp::Min, p),
            |p, _| p[0].minimum(&p[1]),
        )
        .forward_only(),
        Case::new("scale -1.5", vec![n(&[3, 4])], |g, p, _| op(g, Op::Scale { factor: -1.5 }, p), |p, _| &p[0] * -1.5),
        Case::new(
            "add_scalar 2",
            vec![n(&[3, 4])],
            |g, p, _| op(g, Op::AddScalar { value: 2.0 }, p),
            |p, _| &p[0] + 2.0,
        ),
        Case::new(
            "pow_scalar 1.7",
            vec![pos(&[3, 4])],
            |g, p, _| op(g, Op::PowScalar { exponent: 1.7 }, p),
            |p, _| p[0].pow_tensor_scalar(1.7),
        ),
        Case::new(
            "pow_scalar -0.5",
            vec![pos(&[3, 4])],
            |g, p, _| op(g, Op::PowScalar { exponent: -0.5 }, p),
            |p, _| p[0].pow_tensor_scalar(-0.5),
        ),
        Case::new(
            "pow_scalar 3 (negative bases)",
            vec![n(&[3, 4])],
            |g, p, _| op(g, Op::PowScalar { exponent: 3.0 }, p),
            |p, _| p[0].pow_tensor_scalar(3.0),
        ),
        Case::new(
            "softmax last axis",
            vec![n(&[2, 3, 5])],
            |g, p, _| op(g, Op::Softmax { axis: 2 }, p),
            |p, _| p[0].softmax(2, Kind::Float),
        ),
        Case::new(
            "softmax axis 1",
            vec![n(&[2, 3, 5])],
            |g, p, _| op(g, Op::Softmax { axis: 1 }, p),
            |p, _| p[0].softmax(1, Kind::Float),
        ),
        Case::new(
            "log_softmax axis 1",
            vec![n(&[4, 5])],
            |g, p, _| op(g, Op::LogSoftmax { axis: 1 }, p),
            |p, _| p[0].log_softmax(1, Kind::Float),
        ),
        Case::new(
            "log_softmax axis 0",
            vec![n(&[4, 5])],
            |g, p, _| op(g, Op::LogSoftmax { axis: 0 }, p),
            |p, _| p[0].log_softmax(0, Kind::Float),
        ),
        // F.normalize(x, dim) = x / max(||x||_2, eps) (its definition in torch.nn.functional).
        Case::new(
            "l2_normalize axis 1",
            vec![n(&[4, 5])],
            |g, p, _| op(g, Op::L2Normalize { axis: 1, eps: 1e-12 }, p),
            |p, _| &p[0] / p[0].norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12),
        ),
        Case::new(
            "l2_normalize axis 0 of [3,2,4]",
            vec![n(&[3, 2, 4])],
            |g, p, _| op(g, Op::L2Normalize { axis: 0, eps: 1e-12 }, p),
            |p, _| &p[0] / p[0].norm_scalaropt_dim(2.0, [0], true).clamp_min(1e-12),
        ),
        Case::new(
            "dropout p=0.3 in eval mode",
            vec![n(&[3, 9])],
            |g, p, _| op(g, Op::Dropout { p: 0.3, key: 3 }, p),
            |p, _| p[0].dropout(0.3, false),
        ),
        Case::new(
            "dropout p=0 in training mode",
            vec![n(&[3, 9])],
            |g, p, _| op(g, Op::Dropout { p: 0.0, key: 3 }, p),
            |p, _| p[0].dropout(0.0, true),
        )
        .training(),
        // DropPath is identity in eval mode and at p = 0 (reference 1.5).
        Case::new(
            "drop_path p=0.3 in eval mode",
            vec![n(&[3, 2, 4])],
            |g, p, _| op(g, Op::DropPath { p: 0.3, key: 4 }, p),
            |p, _| p[0].shallow_clone(),
        ),
        Case::new(
            "drop_path p=0 in training mode",
            vec![n(&[3, 2, 4])],
            |g, p, _| op(g, Op::DropPath { p: 0.0, key: 4 }, p),
            |p, _| p[0].shallow_clone(),
        )
        .training(),
    ];
    run_all(&cases);
}

#[test]
fn reductions_and_layout_ops_match_libtorch() {
    let cases = vec![
        Case::new(
            "sum axis 1 keepdim",
            vec![n(&[2, 3, 4])],
            |g, p, _| red(g, ReduceOp::Sum, p[0], &[1], true),
            |p, _| p[0].sum_dim_intlist([1i64].as_slice(), true, Kind::Float),
        ),
        Case::new(
            "sum axes [0,2]",
            vec![n(&[2, 3, 4])],
            |g, p, _| red(g, ReduceOp::Sum, p[0], &[0, 2], false),
            |p, _| p[0].sum_dim_intlist([0i64, 2].as_slice(), false, Kind::Float),
        ),
        Case::new(
            "sum all",
            vec![n(&[3, 5])],
            |g, p, _| red(g, ReduceOp::Sum, p[0], &[0, 1], false),
            |p, _| p[0].sum(Kind::Float),
        ),
        Case::new(
            "mean axes [1,2]",
            vec![n(&[2, 3, 4])],
            |g, p, _| red(g, ReduceOp::Mean, p[0], &[1, 2], false),
            |p, _| p[0].mean_dim([1i64, 2].as_slice(), false, Kind::Float),
        ),
        Case::new(
            "mean axis 0 keepdim",
            vec![n(&[2, 3, 4])],
            |g, p, _| red(g, ReduceOp::Mean, p[0], &[0], true),
            |p, _| p[0].mean_dim([0i64].as_slice(), true, Kind::Float),
        ),
        Case::new(
            "max axis 1 (forward)",
            vec![n(&[2, 3, 4])],
            |g, p, _| red(g, ReduceOp::Max, p[0], &[1], false),
            |p, _| p[0].amax([1], false),
        )
        .forward_only(),
        Case::new(
            "max axes [0,2] keepdim (forward)",
            vec![n(&[2, 3, 4])],
            |g, p, _| red(g, ReduceOp::Max, p[0], &[0, 2], true),
            |p, _| p[0].amax([0, 2], true),
        )
        .forward_only(),
        Case::new(
            "reshape [2,6,2] -> [4,3,2]",
            vec![n(&[2, 6, 2])],
            |g, p, _| op(g, Op::Reshape { shape: Shape::consts(&[4, 3, 2]) }, p),
            |p, _| p[0].reshape([4, 3, 2]),
        ),
        Case::new(
            "permute [2,0,1]",
            vec![n(&[2, 3, 4])],
            |g, p, _| op(g, Op::Permute { perm: vec![2, 0, 1] }, p),
            |p, _| p[0].permute([2, 0, 1]),
        ),
        Case::new(
            "permute [0,2,1,3]",
            vec![n(&[2, 3, 4, 5])],
            |g, p, _| op(g, Op::Permute { perm: vec![0, 2, 1, 3] }, p),
            |p, _| p[0].permute([0, 2, 1, 3]),
        ),
        Case::new(
            "concat axis 1",
            vec![n(&[2, 2, 3]), n(&[2, 4, 3])],
            |g, p, _| op(g, Op::Concat { axis: 1 }, p),
            |p, _| TT::cat(&[&p[0], &p[1]], 1),
        ),
        Case::new(
            "concat axis 0 of three",
            vec![n(&[1, 3]), n(&[2, 3]), n(&[1, 3])],
            |g, p, _| op(g, Op::Concat { axis: 0 }, p),
            |p, _| TT::cat(&[&p[0], &p[1], &p[2]], 0),
        ),
        Case::new(
            "slice axis 1 [1,5)",
            vec![n(&[2, 6, 3])],
            |g, p, _| op(g, Op::Slice { axis: 1, start: Dim::Const(1), end: Dim::Const(5) }, p),
            |p, _| p[0].narrow(1, 1, 4),
        ),
        Case::new(
            "slice last axis [0,1)",
            vec![n(&[2, 3, 4])],
            |g, p, _| op(g, Op::Slice { axis: 2, start: Dim::Const(0), end: Dim::Const(1) }, p),
            |p, _| p[0].narrow(2, 0, 1),
        ),
        Case::new(
            "expand [1,1,4] -> [2,3,4]",
            vec![n(&[1, 1, 4])],
            |g, p, _| op(g, Op::Expand { shape: Shape::consts(&[2, 3, 4]) }, p),
            |p, _| p[0].expand([2, 3, 4], false),
        ),
        Case::new(
            "cast f32 -> f32",
            vec![n(&[2, 3])],
            |g, p, _| op(g, Op::Cast { dtype: DType::F32 }, p),
            |p, _| p[0].to_kind(Kind::Float),
        ),
        // y = stop_gradient(a) + a * b: a's gradient comes only through the product.
        Case::new(
            "stop_gradient",
            vec![n(&[2, 3]), n(&[2, 3])],
            |g, p, _| {
                let s = op(g, Op::StopGradient, &[p[0]]);
                let m = bin(g, BinaryOp::Mul, &[p[0], p[1]]);
                bin(g, BinaryOp::Add, &[s, m])
            },
            |p, _| p[0].detach() + &p[0] * &p[1],
        ),
        // One rank: all_gather is the identity with its gradient, all_reduce the
        // identity without one (as stop_gradient above).
        Case::new(
            "all_gather world 1",
            vec![n(&[3, 4])],
            |g, p, _| op(g, Op::AllGather { world: 1 }, p),
            |p, _| p[0].shallow_clone(),
        ),
        Case::new(
            "all_reduce world 1",
            vec![n(&[2, 3]), n(&[2, 3])],
            |g, p, _| {
                let s = op(g, Op::AllReduce { op: ReduceOp::Sum, world: 1 }, &[p[0]]);
                let m = bin(g, BinaryOp::Mul, &[p[0], p[1]]);
                bin(g, BinaryOp::Add, &[s, m])
            },
            |p, _| p[0].detach() + &p[0] * &p[1],
        ),
        Case::new(
            "expand [3,1] -> [2,3,5] (new leading dim)",
            vec![n(&[3, 1])],
            |g, p, _| op(g, Op::Expand { shape: Shape::consts(&[2, 3, 5]) }, p),
            |p, _| p[0].expand([2, 3, 5], false),
        ),
    ];
    run_all(&cases);
}

/// BatchNorm in training mode: batch statistics in the forward, gradients,
/// and the running-stat updates of the training step against torch's
/// `running_mean`/`running_var` after one forward (momentum 0.1; the running
/// variance takes the unbiased batch variance).
#[test]
fn batch_norm_training_step_matches_libtorch() {
    let mut failures = Vec::new();
    for (case, xshape) in [[6usize, 4, 0, 0], [3, 4, 2, 3]].iter().enumerate() {
        let xs: Vec<usize> = xshape.iter().copied().filter(|&d| d > 0).collect();
        let c = xs[1];
        let (eps, momentum) = (1e-5, 0.1);
        let seed = 77 + case as u64;
        let mut g = Graph::new();
        let x = g.add_param("x", TensorType::f32(consts(&xs)), Init::Zeros, true, "t").unwrap();
        let w = g.add_param("w", TensorType::f32(consts(&[c])), Init::Zeros, true, "t").unwrap();
        let b = g.add_param("b", TensorType::f32(consts(&[c])), Init::Zeros, true, "t").unwrap();
        let rm = g.add_buffer("rm", TensorType::f32(consts(&[c])), Init::Zeros, "t").unwrap();
        let rv = g.add_buffer("rv", TensorType::f32(consts(&[c])), Init::Ones, "t").unwrap();
        let y = op(&mut g, Op::BatchNorm { eps, momentum }, &[x, w, b, rm, rv]);
        g.set_output("y", y);
        let (loss, dims) = probe_loss(&mut g, y);
        g.set_output("loss", loss);
        // No parameter groups: the step only adds the running-stat updates.
        let opts = StepOptions {
            optimizer: Optimizer::Sgd { momentum: 0.0, nesterov: false },
            clip_max_norm: None,
            late_start: vec![],
            normalize_prototypes: false,
            world: 1,
        };
        let g = training_step(g, &[], &opts).unwrap();
        let mut ex = CpuExecutor::new(tessera_compiler::plan::lower(&g, 1, true).unwrap(), 0).unwrap();

        let vals: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![
            ("x", xs.clone(), draw(seed, 0, xs.iter().product(), Dist::Normal).iter().map(|v| 2.0 * v + 0.7).collect()),
            ("w", vec![c], draw(seed, 1, c, Dist::Normal)),
            ("b", vec![c], draw(seed, 2, c, Dist::Normal)),
            ("rm", vec![c], draw(seed, 3, c, Dist::Normal)),
            ("rv", vec![c], draw(seed, 4, c, Dist::Positive)),
        ];
        let mut tp = Vec::new();
        for (name, s, v) in &vals {
            ex.set_state(name, Tensor::f32(s.clone(), v.clone())).unwrap();
            let t = tensor_from(v, &shape_i64(s));
            tp.push(if name.starts_with('r') { t } else { t.set_requires_grad(true) });
        }
        let pv = draw(seed, 9, dims.iter().product(), Dist::Normal);
        let out = ex.run(&[("probe", Tensor::f32(dims.clone(), pv.clone()))]).unwrap();

        let ty = tp[0].batch_norm(Some(&tp[1]), Some(&tp[2]), Some(&tp[3]), Some(&tp[4]), true, momentum, eps, false);
        (&ty * tensor_from(&pv, &shape_i64(&dims))).sum(Kind::Float).backward();
        let what = |s: &str| format!("batch_norm {xs:?}: {s}");
        compare(&what("y"), &out["y"], &ty, RTOL, ATOL, &mut failures);
        for (i, name) in ["x", "w", "b"].iter().enumerate() {
            compare(
                &what(&format!("grad {name}")),
                &out[&format!("grad.{name}")],
                &tp[i].grad(),
                RTOL,
                ATOL,
                &mut failures,
            );
        }
        // torch updated its running stats in place during the forward.
        compare(&what("running_mean"), ex.state("rm").unwrap(), &tp[3], RTOL, ATOL, &mut failures);
        compare(&what("running_var"), ex.state("rv").unwrap(), &tp[4], RTOL, ATOL, &mut failures);
        // And they did change (the comparison is not of two untouched buffers).
        assert!(to_vec(&tp[3]) != vals[3].2, "torch's running mean moved");
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// The harness must be able to fail: a deliberately wrong libtorch side
/// (exp against tessera's sigmoid, and a gradient through a different op)
/// is reported.
#[test]
fn a_wrong_op_is_reported() {
    let wrong =
        Case::new("sigmoid vs exp", vec![n(&[2, 3])], |g, p, _| un(g, UnaryOp::Sigmoid, p[0]), |p, _| p[0].exp());
    let f = run_case(0, &wrong);
    assert!(f.iter().any(|m| m.contains("sigmoid vs exp: y")), "{f:?}");
    assert!(f.iter().any(|m| m.contains("sigmoid vs exp: grad p0")), "{f:?}");
    // Same forward, different gradient: tessera's y = 1.0 * x (gradient 1); libtorch's
    // y = 2x - detach(x) has the same value but gradient 2.
    let grad_only = Case::new(
        "identity vs 2x - x.detach()",
        vec![n(&[2, 3])],
        |g, p, _| op(g, Op::Scale { factor: 1.0 }, p),
        |p, _| &p[0] * 2.0 - p[0].detach(),
    );
    let f = run_case(1, &grad_only);
    assert!(f.len() == 1 && f[0].contains("grad p0"), "{f:?}");
}
