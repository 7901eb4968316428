//! The CPU backend's kernels, each run through a one-op plan on the executor
//! and compared with an independent reference written plainly here (naive
//! loops in f64), a closed form, or central differences of the forward
//! kernel (for the gradient kernels). Also: random masks, initialisers, and
//! the executor's contract (inputs, state, errors).

use std::collections::BTreeMap;
use tessera_compiler::ir::{BinaryOp, DType, Dim, Graph, Init, Op, ReduceOp, Shape, TensorType, UnaryOp};
use tessera_compiler::plan::Plan;
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::philox::Stream;
use tessera_runtime::{RuntimeError, Tensor};

// ---------------------------------------------------------------- harness

fn consts(dims: &[usize]) -> Shape {
    Shape::consts(&dims.iter().map(|&d| d as u64).collect::<Vec<_>>())
}

fn dtype_of(t: &Tensor) -> DType {
    if t.as_f32().is_some() {
        DType::F32
    } else {
        DType::I64
    }
}

/// A plan with inputs `x0, x1, ...` typed like `inputs` and output `y = op(x...)`.
struct OneOp {
    ex: CpuExecutor,
    names: Vec<String>,
}

impl OneOp {
    fn new(op: Op, inputs: &[&Tensor], training: bool) -> OneOp {
        let mut g = Graph::new();
        let names: Vec<String> = (0..inputs.len()).map(|i| format!("x{i}")).collect();
        let ids: Vec<_> =
            inputs.iter().zip(&names).map(|(t, n)| g.add_input(n, consts(&t.shape), dtype_of(t)).unwrap()).collect();
        let y = g.add_op(op, &ids, "test").unwrap_or_else(|e| panic!("{e}"));
        g.set_output("y", y);
        let plan = tessera_compiler::plan::lower(&g, 1, training).unwrap();
        OneOp { ex: CpuExecutor::new(plan, 1234).unwrap(), names }
    }

    fn run(&mut self, inputs: &[&Tensor]) -> Tensor {
        let named: Vec<(&str, Tensor)> =
            self.names.iter().zip(inputs).map(|(n, t)| (n.as_str(), (*t).clone())).collect();
        self.ex.run(&named).unwrap_or_else(|e| panic!("{e}")).remove("y").unwrap()
    }

    fn try_run(&mut self, inputs: &[&Tensor]) -> Result<Tensor, RuntimeError> {
        let named: Vec<(&str, Tensor)> =
            self.names.iter().zip(inputs).map(|(n, t)| (n.as_str(), (*t).clone())).collect();
        Ok(self.ex.run(&named)?.remove("y").unwrap())
    }
}

fn run_op(op: Op, inputs: &[&Tensor]) -> Tensor {
    OneOp::new(op, inputs, true).run(inputs)
}

fn run_op_eval(op: Op, inputs: &[&Tensor]) -> Tensor {
    OneOp::new(op, inputs, false).run(inputs)
}

/// Uniform values in [-1, 1) (test data; `seed` picks the stream).
fn rand(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let s = Stream::new(99, 7, seed);
    Tensor::f32(shape.to_vec(), (0..n as u64).map(|i| s.uniform_at(i) * 2.0 - 1.0).collect())
}

fn f(t: &Tensor) -> Vec<f64> {
    t.as_f32().expect("an f32 tensor").iter().map(|&v| v as f64).collect()
}

/// |got - want| <= tol * (1 + |want|) elementwise.
#[track_caller]
fn assert_close(got: &Tensor, want: &[f64], tol: f64) {
    let g = f(got);
    assert_eq!(g.len(), want.len(), "element count");
    for (i, (a, b)) in g.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "element {i}: got {a}, want {b} (tol {tol})");
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Multi-index of flat index `i` in `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d];
        i /= shape[d];
    }
    idx
}

/// Flat index in `shape` of the output multi-index `idx` under numpy broadcasting.
fn bcast_index(idx: &[usize], shape: &[usize]) -> usize {
    let lead = idx.len() - shape.len();
    let st = strides(shape);
    (0..shape.len()).map(|d| if shape[d] == 1 { 0 } else { idx[lead + d] * st[d] }).sum()
}

/// The derivative of `loss(x)` along every coordinate of `x`, by central differences.
fn central_differences(x: &Tensor, h: f32, mut loss: impl FnMut(&Tensor) -> f64) -> Vec<f64> {
    let base = x.as_f32().unwrap().to_vec();
    (0..base.len())
        .map(|i| {
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let lp = loss(&Tensor::f32(x.shape.clone(), plus));
            let lm = loss(&Tensor::f32(x.shape.clone(), minus));
            (lp - lm) / (2.0 * h as f64)
        })
        .collect()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    f(a).iter().zip(f(b)).map(|(x, y)| x * y).sum()
}

/// erf by its Maclaurin series (independent of the runtime's), for |x| <= 3.
fn erf_series(x: f64) -> f64 {
    let mut sum = 0.0;
    let mut term = x; // (-1)^n x^(2n+1) / n!
    for n in 0..200 {
        sum += term / (2 * n + 1) as f64;
        term *= -x * x / (n + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

// ---------------------------------------------------------------- elementwise

#[test]
fn gelu_matches_closed_forms_and_the_erf_series() {
    let x = Tensor::f32(vec![4], vec![0.0, 1.0, -1.0, 2.0]);
    // x * Phi(x): Phi(1) = 0.8413447460685429, Phi(2) = 0.9772498680518208.
    let want = [0.0, 0.8413447460685429, -(1.0 - 0.8413447460685429), 2.0 * 0.9772498680518208];
    assert_close(&run_op(Op::Unary(UnaryOp::Gelu), &[&x]), &want, 1e-7);
    let x = Tensor::f32(vec![301], (0..301).map(|i| (i as f32 - 150.0) / 30.0).collect());
    let want: Vec<f64> = f(&x).iter().map(|&v| 0.5 * v * (1.0 + erf_series(v / std::f64::consts::SQRT_2))).collect();
    assert_close(&run_op(Op::Unary(UnaryOp::Gelu), &[&x]), &want, 2e-7);
}

#[test]
fn unary_ops_match_std_functions() {
    let x = rand(&[3, 7], 1);
    let pos = Tensor::f32(vec![3, 7], f(&x).iter().map(|v| (v.abs() + 0.1) as f32).collect());
    type Case<'a> = (UnaryOp, &'a Tensor, fn(f64) -> f64);
    let cases: Vec<Case> = vec![
        (UnaryOp::Relu, &x, |v| v.max(0.0)),
        (UnaryOp::Tanh, &x, f64::tanh),
        (UnaryOp::Sigmoid, &x, |v| 1.0 / (1.0 + (-v).exp())),
        (UnaryOp::Exp, &x, f64::exp),
        (UnaryOp::Log, &pos, f64::ln),
        (UnaryOp::Neg, &x, |v| -v),
        (UnaryOp::Sqrt, &pos, f64::sqrt),
        (UnaryOp::Recip, &pos, |v| 1.0 / v),
        (UnaryOp::Square, &x, |v| v * v),
        (UnaryOp::Heaviside, &x, |v| if v > 0.0 { 1.0 } else { 0.0 }),
    ];
    for (op, input, reference) in cases {
        let want: Vec<f64> = f(input).iter().map(|&v| reference(v)).collect();
        assert_close(&run_op(Op::Unary(op), &[input]), &want, 1e-6);
    }
    // Sigmoid saturates without overflow.
    let big = Tensor::f32(vec![2], vec![-200.0, 200.0]);
    assert_close(&run_op(Op::Unary(UnaryOp::Sigmoid), &[&big]), &[0.0, 1.0], 0.0);
}

#[test]
fn binary_ops_broadcast_like_numpy() {
    let shapes: [(&[usize], &[usize]); 6] = [
        (&[2, 3, 4], &[2, 3, 4]),
        (&[2, 1, 4], &[3, 1]),
        (&[5], &[]),
        (&[], &[2, 3]),
        (&[4, 1, 3], &[1, 5, 1]),
        (&[70, 600], &[600]),
    ];
    type Reference = fn(f64, f64) -> f64;
    let ops: [(BinaryOp, Reference); 6] = [
        (BinaryOp::Add, |a, b| a + b),
        (BinaryOp::Sub, |a, b| a - b),
        (BinaryOp::Mul, |a, b| a * b),
        (BinaryOp::Div, |a, b| a / b),
        (BinaryOp::Max, f64::max),
        (BinaryOp::Min, f64::min),
    ];
    for (sa, sb) in shapes {
        let a = rand(sa, 2);
        let b = Tensor::f32(sb.to_vec(), f(&rand(sb, 3)).iter().map(|v| (v + 1.5) as f32).collect());
        let out_rank = sa.len().max(sb.len());
        let out_shape: Vec<usize> = (0..out_rank)
            .map(|i| {
                let get = |s: &[usize]| if i + s.len() >= out_rank { s[i + s.len() - out_rank] } else { 1 };
                get(sa).max(get(sb))
            })
            .collect();
        for (op, reference) in ops {
            let y = run_op(Op::Binary(op), &[&a, &b]);
            assert_eq!(y.shape, out_shape);
            let n: usize = out_shape.iter().product();
            let (fa, fb) = (f(&a), f(&b));
            let want: Vec<f64> = (0..n)
                .map(|i| {
                    let idx = unravel(i, &out_shape);
                    reference(fa[bcast_index(&idx, sa)], fb[bcast_index(&idx, sb)])
                })
                .collect();
            assert_close(&y, &want, 1e-6);
        }
    }
}

#[test]
fn integer_binary_ops_and_casts() {
    let a = Tensor::i64(vec![4], vec![7, -7, 6, 0]);
    let b = Tensor::i64(vec![], vec![2]);
    assert_eq!(run_op(Op::Binary(BinaryOp::Add), &[&a, &b]).as_i64().unwrap(), &[9, -5, 8, 2]);
    assert_eq!(run_op(Op::Binary(BinaryOp::Div), &[&a, &b]).as_i64().unwrap(), &[3, -4, 3, 0]);
    assert_eq!(run_op(Op::Binary(BinaryOp::Max), &[&a, &b]).as_i64().unwrap(), &[7, 2, 6, 2]);
    let x = Tensor::f32(vec![3], vec![1.9, -1.9, 3.0]);
    assert_eq!(run_op(Op::Cast { dtype: DType::I64 }, &[&x]).as_i64().unwrap(), &[1, -1, 3]);
    let back = run_op(Op::Cast { dtype: DType::F32 }, &[&a]);
    assert_eq!(back.as_f32().unwrap(), &[7.0, -7.0, 6.0, 0.0]);
    // bf16 is held as f32 numbers bf16 can hold: 1.9 rounds to the nearest
    // (1.8984375, 8 significant bits), 3.0 stays (tests/bf16.rs goes further).
    assert_eq!(run_op(Op::Cast { dtype: DType::BF16 }, &[&x]).as_f32().unwrap(), &[1.8984375, -1.8984375, 3.0]);
}

#[test]
fn scalar_ops() {
    let x = rand(&[5, 3], 4);
    let fx = f(&x);
    assert_close(&run_op(Op::Scale { factor: -2.5 }, &[&x]), &fx.iter().map(|v| v * -2.5).collect::<Vec<_>>(), 1e-6);
    assert_close(&run_op(Op::AddScalar { value: 0.75 }, &[&x]), &fx.iter().map(|v| v + 0.75).collect::<Vec<_>>(), 1e-6);
    for e in [2.0, 3.0, -1.0, 1.0] {
        let want: Vec<f64> = fx.iter().map(|v| v.powf(e)).collect();
        assert_close(&run_op(Op::PowScalar { exponent: e }, &[&x]), &want, 1e-5);
    }
    let pos = Tensor::f32(vec![15], fx.iter().map(|v| (v.abs() + 0.2) as f32).collect());
    for e in [0.5, -0.5, 1.7] {
        let want: Vec<f64> = f(&pos).iter().map(|v| v.powf(e)).collect();
        assert_close(&run_op(Op::PowScalar { exponent: e }, &[&pos]), &want, 1e-5);
    }
    let want: Vec<f64> = fx.iter().map(|v| v / 6.0).collect();
    assert_close(&run_op(Op::DivCount { count: Dim::Const(6) }, &[&x]), &want, 1e-6);
}

#[test]
fn gelu_grad_matches_central_differences() {
    let x = Tensor::f32(vec![40], (0..40).map(|i| (i as f32 - 20.0) / 6.0).collect());
    let dy = rand(&[40], 5);
    let grad = run_op(Op::GeluGrad, &[&x, &dy]);
    let mut gelu = OneOp::new(Op::Unary(UnaryOp::Gelu), &[&x], true);
    let fd = central_differences(&x, 1e-2, |xp| dot(&gelu.run(&[xp]), &dy));
    assert_close(&grad, &fd, 2e-3);
    // Saturation: GELU'(x) -> 1 and 0, also far beyond any table.
    let x = Tensor::f32(vec![4], vec![30.0, -30.0, 1e20, -1e20]);
    let ones = Tensor::f32(vec![4], vec![1.0; 4]);
    assert_close(&run_op(Op::GeluGrad, &[&x, &ones]), &[1.0, 0.0, 1.0, 0.0], 0.0);
    assert_close(&run_op(Op::Unary(UnaryOp::Gelu), &[&x]), &[30.0, 0.0, 1e20f32 as f64, 0.0], 0.0);
}

// ---------------------------------------------------------------- products

/// out[b, m, n] = sum_k a[b, m, k] b[b, k, n] with numpy batch broadcasting, in f64.
fn matmul_ref(a: &Tensor, b: &Tensor) -> (Vec<usize>, Vec<f64>) {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
    let (ba, bb) = (&a.shape[..ra - 2], &b.shape[..rb - 2]);
    let r = ba.len().max(bb.len());
    let get = |s: &[usize], i: usize| if i + s.len() >= r { s[i + s.len() - r] } else { 1 };
    let batch: Vec<usize> = (0..r).map(|i| get(ba, i).max(get(bb, i))).collect();
    let nb: usize = batch.iter().product();
    let (fa, fb) = (f(a), f(b));
    let mut out = Vec::new();
    for bi in 0..nb {
        let idx = unravel(bi, &batch);
        let (oa, ob) = (bcast_index(&idx, ba) * m * k, bcast_index(&idx, bb) * k * n);
        for i in 0..m {
            for j in 0..n {
                out.push((0..k).map(|l| fa[oa + i * k + l] * fb[ob + l * n + j]).sum());
            }
        }
    }
    let mut shape = batch;
    shape.extend([m, n]);
    (shape, out)
}

#[test]
fn matmul_matches_naive_loops_with_broadcast_batches() {
    let cases: [(&[usize], &[usize]); 7] = [
        (&[3, 4], &[4, 5]),
        (&[2, 1, 4, 5], &[3, 5, 6]),
        (&[4, 5], &[2, 5, 3]),
        (&[2, 3, 7, 9], &[9, 11]),
        (&[1, 13, 1], &[1, 1, 17]),
        (&[24, 33, 17], &[24, 17, 29]),
        (&[131, 97], &[97, 203]),
    ];
    for (sa, sb) in cases {
        let (a, b) = (rand(sa, 6), rand(sb, 7));
        let (shape, want) = matmul_ref(&a, &b);
        let y = run_op(Op::matmul(), &[&a, &b]);
        assert_eq!(y.shape, shape, "{sa:?} @ {sb:?}");
        assert_close(&y, &want, 1e-5);
    }
}

#[test]
fn linear_matches_naive_loops() {
    for (xs, o, bias) in
        [(vec![3, 5, 7], 11, true), (vec![1, 1], 1, false), (vec![2, 97, 129], 67, true), (vec![300, 200], 150, false)]
    {
        let i = *xs.last().unwrap();
        let (x, w, b) = (rand(&xs, 8), rand(&[o, i], 9), rand(&[o], 10));
        let rows = x.numel() / i;
        let (fx, fw, fb) = (f(&x), f(&w), f(&b));
        let want: Vec<f64> = (0..rows * o)
            .map(|e| {
                let (r, c) = (e / o, e % o);
                (0..i).map(|l| fx[r * i + l] * fw[c * i + l]).sum::<f64>() + if bias { fb[c] } else { 0.0 }
            })
            .collect();
        let y = if bias { run_op(Op::Linear, &[&x, &w, &b]) } else { run_op(Op::Linear, &[&x, &w]) };
        let mut shape = xs.clone();
        *shape.last_mut().unwrap() = o;
        assert_eq!(y.shape, shape);
        assert_close(&y, &want, 1e-5);
    }
}

/// `linear_residual(x, w, b, r)` = r + x w^T + b, and with `gelu` the
/// product of GELU(x) (exact erf GELU), against naive loops in f64.
#[test]
fn linear_residual_adds_the_product_to_the_stream() {
    let (xs, o) = (vec![2, 9, 13], 6);
    let i = *xs.last().unwrap();
    let (x, w, b, r) = (rand(&xs, 40), rand(&[o, i], 41), rand(&[o], 42), rand(&[2, 9, o], 43));
    let (fx, fw, fb, fr) = (f(&x), f(&w), f(&b), f(&r));
    let erf_gelu = |v: f64| 0.5 * v * (1.0 + erf_series(v / std::f64::consts::SQRT_2));
    for gelu in [false, true] {
        let act = |v: f64| if gelu { erf_gelu(v) } else { v };
        let want: Vec<f64> = (0..18 * o)
            .map(|e| {
                let (row, c) = (e / o, e % o);
                fr[e] + (0..i).map(|l| act(fx[row * i + l]) * fw[c * i + l]).sum::<f64>() + fb[c]
            })
            .collect();
        let y = run_op(Op::LinearResidual { gelu }, &[&x, &w, &b, &r]);
        assert_eq!(y.shape, [2, 9, o]);
        assert_close(&y, &want, 1e-5);
    }
}

/// Naive convolution in f64: [N, O, OH, OW].
fn conv_ref(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: [usize; 2], pad: [usize; 2]) -> (Vec<usize>, Vec<f64>) {
    let [n, c, h, wd] = x.shape[..] else { panic!() };
    let [o, _, kh, kw] = w.shape[..] else { panic!() };
    let oh = (h + 2 * pad[0] - kh) / stride[0] + 1;
    let ow = (wd + 2 * pad[1] - kw) / stride[1] + 1;
    let (fx, fw) = (f(x), f(w));
    let mut out = Vec::new();
    for ni in 0..n {
        for oi in 0..o {
            for y in 0..oh {
                for xx in 0..ow {
                    let mut s = b.map_or(0.0, |b| f(b)[oi]);
                    for ci in 0..c {
                        for i in 0..kh {
                            for j in 0..kw {
                                let iy = (y * stride[0] + i) as isize - pad[0] as isize;
                                let ix = (xx * stride[1] + j) as isize - pad[1] as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                    s += fx[((ni * c + ci) * h + iy as usize) * wd + ix as usize]
                                        * fw[((oi * c + ci) * kh + i) * kw + j];
                                }
                            }
                        }
                    }
                    out.push(s);
                }
            }
        }
    }
    (vec![n, o, oh, ow], out)
}

/// (input, weight, stride, padding): general, strided, 1x1, and patch embeddings.
type ConvCase = ([usize; 4], [usize; 4], [u64; 2], [u64; 2]);

fn conv_cases() -> Vec<ConvCase> {
    vec![
        ([2, 3, 7, 6], [4, 3, 3, 3], [2, 2], [1, 1]),
        ([1, 2, 5, 5], [3, 2, 3, 2], [1, 2], [0, 1]),
        ([3, 4, 4, 4], [5, 4, 1, 1], [1, 1], [0, 0]),
        ([2, 3, 8, 8], [6, 3, 4, 4], [4, 4], [0, 0]),
        ([1, 2, 9, 10], [3, 2, 4, 4], [4, 4], [0, 0]),
        ([1, 3, 5, 7], [2, 3, 2, 3], [2, 3], [0, 0]),
    ]
}

#[test]
fn conv2d_matches_naive_loops() {
    for (xs, ws, stride, padding) in conv_cases() {
        let (x, w, b) = (rand(&xs, 11), rand(&ws, 12), rand(&[ws[0]], 13));
        let st = [stride[0] as usize, stride[1] as usize];
        let pd = [padding[0] as usize, padding[1] as usize];
        let (shape, want) = conv_ref(&x, &w, Some(&b), st, pd);
        let y = run_op(Op::Conv2d { stride, padding }, &[&x, &w, &b]);
        assert_eq!(y.shape, shape);
        assert_close(&y, &want, 1e-5);
        let (_, want) = conv_ref(&x, &w, None, st, pd);
        assert_close(&run_op(Op::Conv2d { stride, padding }, &[&x, &w]), &want, 1e-5);
    }
}

#[test]
fn conv2d_grads_match_central_differences() {
    for (xs, ws, stride, padding) in conv_cases() {
        let (x, w) = (rand(&xs, 14), rand(&ws, 15));
        let mut conv = OneOp::new(Op::Conv2d { stride, padding }, &[&x, &w], true);
        let dy = rand(&conv.run(&[&x, &w]).shape, 16);
        let gi = run_op(Op::Conv2dGradInput { stride, padding, input_hw: [xs[2] as u64, xs[3] as u64] }, &[&dy, &w]);
        let fd = central_differences(&x, 1e-2, |xp| dot(&conv.run(&[xp, &w]), &dy));
        assert_eq!(gi.shape, xs.to_vec());
        assert_close(&gi, &fd, 2e-3);
        let gw = run_op(Op::Conv2dGradWeight { stride, padding, kernel: [ws[2] as u64, ws[3] as u64] }, &[&dy, &x]);
        let fd = central_differences(&w, 1e-2, |wp| dot(&conv.run(&[&x, wp]), &dy));
        assert_eq!(gw.shape, ws.to_vec());
        assert_close(&gw, &fd, 2e-3);
    }
}

#[test]
fn conv2d_on_more_samples_than_threads_uses_the_batched_path() {
    // Eight samples: per-sample products in parallel, partial weight gradients summed.
    let (xs, ws) = ([8, 3, 8, 8], [5, 3, 4, 4]);
    let (x, w) = (rand(&xs, 17), rand(&ws, 18));
    let (_, want) = conv_ref(&x, &w, None, [4, 4], [0, 0]);
    let y = run_op(Op::Conv2d { stride: [4, 4], padding: [0, 0] }, &[&x, &w]);
    assert_close(&y, &want, 1e-5);
    // Adjoint identity: <conv(x, w), dy> = <w, grad_weight(dy, x)> = <x, grad_input(dy, w)>.
    let dy = rand(&y.shape, 19);
    let gw = run_op(Op::Conv2dGradWeight { stride: [4, 4], padding: [0, 0], kernel: [4, 4] }, &[&dy, &x]);
    let gi = run_op(Op::Conv2dGradInput { stride: [4, 4], padding: [0, 0], input_hw: [8, 8] }, &[&dy, &w]);
    let lhs = dot(&y, &dy);
    assert!((dot(&gw, &w) - lhs).abs() < 1e-4 * (1.0 + lhs.abs()));
    assert!((dot(&gi, &x) - lhs).abs() < 1e-4 * (1.0 + lhs.abs()));
}

// ---------------------------------------------------------------- attention

fn softmax_ref(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// softmax(q k^T * scale) (times the mask `keep`, if any) @ v, in f64.
fn attention_ref(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, keep: Option<&[f64]>) -> Vec<f64> {
    let r = q.shape.len();
    let (nq, d, nk, dv) = (q.shape[r - 2], q.shape[r - 1], k.shape[r - 2], v.shape[r - 1]);
    let heads: usize = q.shape[..r - 2].iter().product();
    let (fq, fk, fv) = (f(q), f(k), f(v));
    let mut out = Vec::new();
    for h in 0..heads {
        for i in 0..nq {
            let scores: Vec<f64> = (0..nk)
                .map(|j| (0..d).map(|l| fq[(h * nq + i) * d + l] * fk[(h * nk + j) * d + l]).sum::<f64>() * scale)
                .collect();
            let mut p = softmax_ref(&scores);
            if let Some(m) = keep {
                p.iter_mut().enumerate().for_each(|(j, pv)| *pv *= m[(h * nq + i) * nk + j]);
            }
            for c in 0..dv {
                out.push((0..nk).map(|j| p[j] * fv[(h * nk + j) * dv + c]).sum());
            }
        }
    }
    out
}

#[test]
fn attention_matches_naive_loops() {
    for (lead, nq, nk, d, dv) in [(vec![2, 3], 5, 7, 4, 6), (vec![1], 9, 9, 8, 8), (vec![1, 1], 33, 20, 16, 5)] {
        let shape = |n: usize, e: usize| [lead.clone(), vec![n, e]].concat();
        let (q, k, v) = (rand(&shape(nq, d), 20), rand(&shape(nk, d), 21), rand(&shape(nk, dv), 22));
        let scale = 1.0 / (d as f64).sqrt();
        let y = run_op(Op::Attention { scale, dropout: 0.0, key: 3 }, &[&q, &k, &v]);
        assert_eq!(y.shape, shape(nq, dv));
        assert_close(&y, &attention_ref(&q, &k, &v, scale, None), 1e-5);
        // Dropout is the identity in eval mode.
        let y = run_op_eval(Op::Attention { scale, dropout: 0.5, key: 3 }, &[&q, &k, &v]);
        assert_close(&y, &attention_ref(&q, &k, &v, scale, None), 1e-5);
    }
}

#[test]
fn attention_dropout_is_the_dropout_op_on_the_probabilities() {
    let (q, k, v) = (rand(&[2, 3, 6, 4], 23), rand(&[2, 3, 5, 4], 24), rand(&[2, 3, 5, 4], 25));
    let (p, key) = (0.3, 77);
    // The mask of `Dropout { p, key }` on ones of the probabilities' shape, same seed and step.
    let ones = Tensor::f32(vec![2, 3, 6, 5], vec![1.0; 180]);
    let mask = f(&run_op(Op::Dropout { p, key }, &[&ones]));
    assert!(mask.contains(&0.0) && mask.iter().any(|&m| m > 1.0));
    let y = run_op(Op::Attention { scale: 0.5, dropout: p, key }, &[&q, &k, &v]);
    assert_close(&y, &attention_ref(&q, &k, &v, 0.5, Some(&mask)), 1e-5);
}

// ---------------------------------------------------------------- softmax family

#[test]
fn softmax_log_softmax_and_l2_normalize() {
    let x = Tensor::f32(vec![3, 4, 5], f(&rand(&[3, 4, 5], 26)).iter().map(|v| (v * 30.0) as f32).collect());
    for axis in 0..3 {
        let shape = &x.shape;
        let st = strides(shape);
        let fx = f(&x);
        let mut want_sm = vec![0.0; 60];
        let mut want_l2 = vec![0.0; 60];
        for i in 0..60 {
            let idx = unravel(i, shape);
            if idx[axis] != 0 {
                continue;
            }
            let lane: Vec<usize> = (0..shape[axis]).map(|a| i + a * st[axis]).collect();
            let vals: Vec<f64> = lane.iter().map(|&j| fx[j]).collect();
            let norm = vals.iter().map(|v| v * v).sum::<f64>().sqrt();
            for (p, (&j, v)) in softmax_ref(&vals).into_iter().zip(lane.iter().zip(&vals)) {
                want_sm[j] = p;
                want_l2[j] = v / norm;
            }
        }
        let sm = run_op(Op::Softmax { axis }, &[&x]);
        assert_close(&sm, &want_sm, 1e-6);
        let ls = run_op(Op::LogSoftmax { axis }, &[&x]);
        assert_close(&ls, &want_sm.iter().map(|p| p.ln()).collect::<Vec<_>>(), 1e-5);
        assert_close(&run_op(Op::L2Normalize { axis, eps: 1e-12 }, &[&x]), &want_l2, 1e-6);
    }
    // Rows sum to 1, even for huge logits (the row max is subtracted).
    let big = Tensor::f32(vec![2, 3], vec![1000.0, 1001.0, 999.0, -5.0, 0.0, 5.0]);
    let sm = f(&run_op(Op::Softmax { axis: 1 }, &[&big]));
    assert!(sm.iter().all(|v| v.is_finite()));
    assert!((sm[..3].iter().sum::<f64>() - 1.0).abs() < 1e-6 && (sm[3..].iter().sum::<f64>() - 1.0).abs() < 1e-6);
    // A zero vector stays zero: the norm is clamped at eps.
    let z = Tensor::f32(vec![1, 3], vec![0.0; 3]);
    assert_close(&run_op(Op::L2Normalize { axis: 1, eps: 1e-12 }, &[&z]), &[0.0; 3], 0.0);
}

// ---------------------------------------------------------------- normalisation

fn mean_var(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    (m, v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64)
}

#[test]
fn layer_norm_standardises_rows_and_applies_the_affine() {
    let x = Tensor::f32(vec![4, 3, 10], f(&rand(&[4, 3, 10], 27)).iter().map(|v| (v * 3.0 + 1.0) as f32).collect());
    let ones = Tensor::f32(vec![10], vec![1.0; 10]);
    let zeros = Tensor::f32(vec![10], vec![0.0; 10]);
    let y = f(&run_op(Op::LayerNorm { eps: 1e-6 }, &[&x, &ones, &zeros]));
    for row in y.chunks(10) {
        let (m, v) = mean_var(row);
        assert!(m.abs() < 1e-6 && (v - 1.0).abs() < 1e-4, "mean {m}, var {v}");
    }
    let (w, b) = (rand(&[10], 28), rand(&[10], 29));
    let (fx, fw, fb) = (f(&x), f(&w), f(&b));
    let mut want = Vec::new();
    let mut want_plain = Vec::new();
    for row in fx.chunks(10) {
        let (m, v) = mean_var(row);
        for (j, xv) in row.iter().enumerate() {
            let xhat = (xv - m) / (v + 1e-5).sqrt();
            want.push(xhat * fw[j] + fb[j]);
            want_plain.push(xhat);
        }
    }
    assert_close(&run_op(Op::LayerNorm { eps: 1e-5 }, &[&x, &w, &b]), &want, 1e-5);
    assert_close(&run_op(Op::Normalize { eps: 1e-5 }, &[&x]), &want_plain, 1e-5);
}

#[test]
fn normalize_grad_matches_central_differences() {
    let x = rand(&[3, 6], 30);
    let g = rand(&[3, 6], 31);
    let eps = 1e-5;
    let grad = run_op(Op::NormalizeGrad { eps }, &[&g, &x]);
    let mut fwd = OneOp::new(Op::Normalize { eps }, &[&x], true);
    let fd = central_differences(&x, 1e-2, |xp| dot(&fwd.run(&[xp]), &g));
    assert_close(&grad, &fd, 3e-3);
    // The (dy, x, w) form is the gradient of normalize(x) * w: dy * w taken
    // as the upstream gradient, formed inside the kernel.
    let w = rand(&[6], 32);
    let fused = run_op(Op::NormalizeGrad { eps }, &[&g, &x, &w]);
    let zero = Tensor::f32(vec![6], vec![0.0; 6]);
    let mut scaled = OneOp::new(Op::LayerNorm { eps }, &[&x, &w, &zero], true);
    let fd = central_differences(&x, 1e-2, |xp| dot(&scaled.run(&[xp, &w, &zero]), &g));
    assert_close(&fused, &fd, 3e-3);
    // (dy, x, w, r): r added to that gradient, exactly as an add would.
    let r = rand(&[3, 6], 33);
    let with_r = run_op(Op::NormalizeGrad { eps }, &[&g, &x, &w, &r]);
    let (a, b, c) = (with_r.as_f32().unwrap(), fused.as_f32().unwrap(), r.as_f32().unwrap());
    assert!(a.iter().zip(b).zip(c).all(|((a, b), c)| *a == c + b), "{a:?}");
}

/// LayerNorm's weight gradient is the gradient of sum(dy * layer_norm(x, w, 0))
/// with respect to w: sum over rows of dy * xhat (central differences in w),
/// for rows cut into several of the kernel's blocks (300 rows) and one.
#[test]
fn layer_norm_weight_grad_is_the_gradient_in_w() {
    for shape in [&[3usize, 6][..], &[3, 100, 5]] {
        let d = *shape.last().unwrap();
        let (x, dy, w) = (rand(shape, 34), rand(shape, 35), rand(&[d], 36));
        let eps = 1e-5;
        let dw = run_op(Op::LayerNormWeightGrad { eps }, &[&dy, &x]);
        assert_eq!(dw.shape, [d]);
        let zero = Tensor::f32(vec![d], vec![0.0; d]);
        let mut ln = OneOp::new(Op::LayerNorm { eps }, &[&x, &w, &zero], true);
        let fd = central_differences(&w, 1e-2, |wp| dot(&ln.run(&[&x, wp, &zero]), &dy));
        assert_close(&dw, &fd, 1e-3);
        // And exactly the closed form, in f64.
        let (fx, fg) = (f(&x), f(&dy));
        let mut want = vec![0.0; d];
        for (row, g) in fx.chunks(d).zip(fg.chunks(d)) {
            let (m, v) = mean_var(row);
            for j in 0..d {
                want[j] += g[j] * (row[j] - m) / (v + eps).sqrt();
            }
        }
        assert_close(&dw, &want, 1e-5);
    }
}

#[test]
fn batch_standardize_and_batch_norm_use_statistics_over_all_axes_but_1() {
    let x = Tensor::f32(vec![4, 3, 2, 2], f(&rand(&[4, 3, 2, 2], 32)).iter().map(|v| (v * 2.0 + 0.5) as f32).collect());
    let fx = f(&x);
    let channel = |c: usize| -> Vec<f64> {
        (0..4).flat_map(|n| (0..4).map(move |s| (n, s))).map(|(n, s)| fx[(n * 3 + c) * 4 + s]).collect()
    };
    let stats: Vec<(f64, f64)> = (0..3).map(|c| mean_var(&channel(c))).collect();
    let eps = 1e-5;
    let want: Vec<f64> =
        (0..48).map(|i| (fx[i] - stats[(i / 4) % 3].0) / (stats[(i / 4) % 3].1 + eps).sqrt()).collect();
    assert_close(&run_op(Op::BatchStandardize { eps }, &[&x]), &want, 1e-5);
    // Batch norm: batch statistics when training, running statistics in eval.
    let (w, b) = (Tensor::f32(vec![3], vec![1.5, -1.0, 0.5]), Tensor::f32(vec![3], vec![0.1, 0.2, 0.3]));
    let (rm, rv) = (Tensor::f32(vec![3], vec![0.5, -0.5, 0.0]), Tensor::f32(vec![3], vec![2.0, 1.0, 0.25]));
    let bn = Op::BatchNorm { eps, momentum: 0.1 };
    let want_train: Vec<f64> = (0..48).map(|i| want[i] * f(&w)[(i / 4) % 3] + f(&b)[(i / 4) % 3]).collect();
    assert_close(&run_op(bn.clone(), &[&x, &w, &b, &rm, &rv]), &want_train, 1e-5);
    let want_eval: Vec<f64> = (0..48)
        .map(|i| {
            let c = (i / 4) % 3;
            (fx[i] - f(&rm)[c]) / (f(&rv)[c] + eps).sqrt() * f(&w)[c] + f(&b)[c]
        })
        .collect();
    assert_close(&run_op_eval(bn.clone(), &[&x, &w, &b, &rm, &rv]), &want_eval, 1e-5);
    // [N, C] input.
    let x2 = rand(&[5, 3], 33);
    let cols: Vec<(f64, f64)> =
        (0..3).map(|c| mean_var(&f(&x2).iter().skip(c).step_by(3).cloned().collect::<Vec<_>>())).collect();
    let want2: Vec<f64> =
        f(&x2).iter().enumerate().map(|(i, v)| (v - cols[i % 3].0) / (cols[i % 3].1 + eps).sqrt()).collect();
    assert_close(&run_op(Op::BatchStandardize { eps }, &[&x2]), &want2, 1e-5);
}

#[test]
fn batch_standardize_grad_matches_central_differences() {
    for shape in [vec![3, 2, 2, 2], vec![4, 3]] {
        let x = rand(&shape, 34);
        let g = rand(&shape, 35);
        let grad = run_op(Op::BatchStandardizeGrad { eps: 1e-5 }, &[&g, &x]);
        let mut fwd = OneOp::new(Op::BatchStandardize { eps: 1e-5 }, &[&x], true);
        let fd = central_differences(&x, 1e-2, |xp| dot(&fwd.run(&[xp]), &g));
        assert_close(&grad, &fd, 3e-3);
    }
}

#[test]
fn running_stat_blends_the_batch_mean_or_unbiased_variance() {
    let x = rand(&[4, 2, 3], 36);
    let fx = f(&x);
    let running = Tensor::f32(vec![2], vec![1.0, -2.0]);
    let vals = |c: usize| -> Vec<f64> {
        (0..4).flat_map(|n| (0..3).map(move |s| (n * 2 + c) * 3 + s)).map(|i| fx[i]).collect()
    };
    let m = 0.1;
    let want_mean: Vec<f64> = (0..2).map(|c| (1.0 - m) * f(&running)[c] + m * mean_var(&vals(c)).0).collect();
    let want_var: Vec<f64> =
        (0..2).map(|c| (1.0 - m) * f(&running)[c] + m * mean_var(&vals(c)).1 * 12.0 / 11.0).collect();
    assert_close(&run_op(Op::RunningStat { momentum: m, unbiased_var: false }, &[&running, &x]), &want_mean, 1e-6);
    assert_close(&run_op(Op::RunningStat { momentum: m, unbiased_var: true }, &[&running, &x]), &want_var, 1e-6);
}

// ---------------------------------------------------------------- loss

#[test]
fn cross_entropy_closed_forms_and_naive_loops() {
    // Uniform logits: ln K whatever the target and smoothing.
    let uniform = Tensor::f32(vec![3, 7], vec![0.25; 21]);
    let y = Tensor::i64(vec![3], vec![0, 3, 6]);
    for s in [0.0, 0.1] {
        let loss = run_op(Op::CrossEntropy { label_smoothing: s }, &[&uniform, &y]);
        assert!(loss.shape.is_empty());
        assert_close(&loss, &[7f64.ln()], 1e-6);
    }
    let logits = Tensor::f32(vec![3, 7], f(&rand(&[3, 7], 37)).iter().map(|v| (v * 4.0) as f32).collect());
    let fl = f(&logits);
    let log_p: Vec<Vec<f64>> = fl.chunks(7).map(|r| softmax_ref(r).iter().map(|p| p.ln()).collect()).collect();
    let s = 0.1;
    let hard: f64 = (0..3)
        .map(|n| -(0..7).map(|k| (s / 7.0 + if k == [0, 3, 6][n] { 1.0 - s } else { 0.0 }) * log_p[n][k]).sum::<f64>())
        .sum::<f64>()
        / 3.0;
    assert_close(&run_op(Op::CrossEntropy { label_smoothing: s }, &[&logits, &y]), &[hard], 1e-6);
    let t = run_op(Op::Softmax { axis: 1 }, &[&rand(&[3, 7], 38)]);
    let ft = f(&t);
    let soft: f64 = (0..3).map(|n| -(0..7).map(|k| ft[n * 7 + k] * log_p[n][k]).sum::<f64>()).sum::<f64>() / 3.0;
    assert_close(&run_op(Op::CrossEntropy { label_smoothing: 0.0 }, &[&logits, &t]), &[soft], 1e-6);
    // A class index out of range is an error naming it.
    let bad = Tensor::i64(vec![3], vec![0, 7, 1]);
    let err = OneOp::new(Op::CrossEntropy { label_smoothing: 0.0 }, &[&logits, &bad], true)
        .try_run(&[&logits, &bad])
        .unwrap_err()
        .to_string();
    assert!(err.contains("target 7 of sample 1 is not a class index in 0..7"), "{err}");
}

#[test]
fn cross_entropy_grad_matches_central_differences() {
    let logits = rand(&[4, 5], 39);
    let hard = Tensor::i64(vec![4], vec![1, 0, 4, 2]);
    let soft = run_op(Op::Softmax { axis: 1 }, &[&rand(&[4, 5], 40)]);
    let dloss = Tensor::scalar_f32(1.7);
    for (target, s) in [(&hard, 0.0), (&hard, 0.2), (&soft, 0.0)] {
        let grad = run_op(Op::CrossEntropyGrad { label_smoothing: s }, &[&logits, target, &dloss]);
        let mut fwd = OneOp::new(Op::CrossEntropy { label_smoothing: s }, &[&logits, target], true);
        let fd = central_differences(&logits, 1e-2, |lp| f(&fwd.run(&[lp, target]))[0] * 1.7);
        assert_close(&grad, &fd, 2e-3);
    }
}

// ---------------------------------------------------------------- reductions

#[test]
fn reduce_sum_mean_max_over_any_axes() {
    let shape = [3, 4, 5, 2];
    let x = rand(&shape, 41);
    let fx = f(&x);
    let axes_sets: [&[usize]; 8] = [&[0], &[1], &[3], &[0, 1], &[1, 3], &[0, 2], &[0, 1, 2, 3], &[]];
    for axes in axes_sets {
        for keepdim in [false, true] {
            let out_keep: Vec<usize> = (0..4).map(|d| if axes.contains(&d) { 1 } else { shape[d] }).collect();
            let n_out: usize = out_keep.iter().product();
            let (mut sum, mut max, mut count) = (vec![0.0; n_out], vec![f64::NEG_INFINITY; n_out], vec![0.0; n_out]);
            for (i, &v) in fx.iter().enumerate() {
                let idx: Vec<usize> = unravel(i, &shape)
                    .iter()
                    .enumerate()
                    .map(|(d, &j)| if axes.contains(&d) { 0 } else { j })
                    .collect();
                let o: usize = idx.iter().zip(strides(&out_keep)).map(|(a, b)| a * b).sum();
                sum[o] += v;
                max[o] = max[o].max(v);
                count[o] += 1.0;
            }
            let want_shape: Vec<usize> = if keepdim {
                out_keep.clone()
            } else {
                (0..4).filter(|d| !axes.contains(d)).map(|d| shape[d]).collect()
            };
            let mean: Vec<f64> = sum.iter().zip(&count).map(|(s, c)| s / c).collect();
            for (op, want) in [(ReduceOp::Sum, &sum), (ReduceOp::Mean, &mean), (ReduceOp::Max, &max)] {
                let y = run_op(Op::Reduce { op, axes: axes.to_vec(), keepdim }, &[&x]);
                assert_eq!(y.shape, want_shape, "{op:?} {axes:?}");
                assert_close(&y, want, 1e-6);
            }
        }
    }
    let xi = Tensor::i64(vec![2, 3], vec![1, -5, 3, 4, 5, 6]);
    assert_eq!(
        run_op(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keepdim: false }, &[&xi]).as_i64().unwrap(),
        &[-1, 15]
    );
    assert_eq!(
        run_op(Op::Reduce { op: ReduceOp::Max, axes: vec![0], keepdim: false }, &[&xi]).as_i64().unwrap(),
        &[4, 5, 6]
    );
}

#[test]
fn large_reductions_take_the_parallel_paths() {
    // A bias gradient ([rows, D] summed over rows), and a mean over the last axis.
    let x = rand(&[1000, 70], 42);
    let fx = f(&x);
    let cols: Vec<f64> = (0..70).map(|j| (0..1000).map(|i| fx[i * 70 + j]).sum()).collect();
    assert_close(&run_op(Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keepdim: false }, &[&x]), &cols, 1e-6);
    let rows: Vec<f64> = fx.chunks(70).map(|r| r.iter().sum::<f64>() / 70.0).collect();
    assert_close(&run_op(Op::Reduce { op: ReduceOp::Mean, axes: vec![1], keepdim: true }, &[&x]), &rows, 1e-6);
    let x3 = rand(&[40, 50, 30], 43);
    let fx3 = f(&x3);
    let mid: Vec<f64> = (0..40 * 30).map(|o| (0..50).map(|j| fx3[(o / 30 * 50 + j) * 30 + o % 30]).sum()).collect();
    assert_close(&run_op(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keepdim: false }, &[&x3]), &mid, 1e-6);
}

// ---------------------------------------------------------------- layout

#[test]
fn permute_reshape_concat_slice_expand_pad() {
    let shape = [2, 3, 4, 5];
    let x = rand(&shape, 44);
    let fx = f(&x);
    for perm in [vec![0, 2, 1, 3], vec![3, 2, 1, 0], vec![2, 0, 3, 1], vec![0, 1, 2, 3]] {
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let want: Vec<f64> = (0..120)
            .map(|i| {
                let o = unravel(i, &out_shape);
                let mut idx = [0; 4];
                for (d, &p) in perm.iter().enumerate() {
                    idx[p] = o[d];
                }
                fx[idx.iter().zip(strides(&shape)).map(|(a, b)| a * b).sum::<usize>()]
            })
            .collect();
        let y = run_op(Op::Permute { perm: perm.clone() }, &[&x]);
        assert_eq!(y.shape, out_shape);
        assert_close(&y, &want, 0.0);
    }
    let xi = Tensor::i64(vec![2, 3], (0..6).collect());
    assert_eq!(run_op(Op::Permute { perm: vec![1, 0] }, &[&xi]).as_i64().unwrap(), &[0, 3, 1, 4, 2, 5]);
    // Large transposes take the tiled path (sizes not multiples of the tile).
    for (shape, perm) in
        [(vec![600, 501], vec![1, 0]), (vec![2, 523, 530], vec![0, 2, 1]), (vec![3, 300, 2, 450], vec![0, 3, 2, 1])]
    {
        let n: usize = shape.iter().product();
        let x = Tensor::i64(shape.clone(), (0..n as i64).collect());
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let y = run_op(Op::Permute { perm: perm.clone() }, &[&x]);
        let y = y.as_i64().unwrap();
        for i in (0..n).step_by(7) {
            let o = unravel(i, &out_shape);
            let mut idx = vec![0; shape.len()];
            for (d, &p) in perm.iter().enumerate() {
                idx[p] = o[d];
            }
            let want: usize = idx.iter().zip(strides(&shape)).map(|(a, b)| a * b).sum();
            assert_eq!(y[i], want as i64, "{shape:?} {perm:?} at {i}");
        }
    }
    let r = run_op(Op::Reshape { shape: consts(&[6, 20]) }, &[&x]);
    assert_eq!((r.shape.clone(), r.as_f32().unwrap()), (vec![6, 20], x.as_f32().unwrap()));
    // Concat along axis 1 of [2,1,2] and [2,2,2].
    let a = Tensor::f32(vec![2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]);
    let b = Tensor::f32(vec![2, 2, 2], (10..18).map(|v| v as f32).collect());
    let c = run_op(Op::Concat { axis: 1 }, &[&a, &b]);
    assert_eq!(c.shape, vec![2, 3, 2]);
    assert_eq!(c.as_f32().unwrap(), &[1.0, 2.0, 10.0, 11.0, 12.0, 13.0, 3.0, 4.0, 14.0, 15.0, 16.0, 17.0]);
    let s = run_op(Op::Slice { axis: 1, start: Dim::Const(1), end: Dim::Const(3) }, &[&c]);
    assert_eq!(s.as_f32().unwrap(), b.as_f32().unwrap());
    let p = run_op(Op::Pad { axis: 1, before: Dim::Const(1), after: Dim::Const(2) }, &[&a]);
    assert_eq!(p.shape, vec![2, 4, 2]);
    assert_eq!(p.as_f32().unwrap(), &[0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
    let e = run_op(Op::Expand { shape: consts(&[2, 2, 3]) }, &[&Tensor::f32(vec![2, 1], vec![5.0, 6.0])]);
    assert_eq!(e.as_f32().unwrap(), &[5.0, 5.0, 5.0, 6.0, 6.0, 6.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0]);
    let e = run_op(Op::Expand { shape: consts(&[3, 2]) }, &[&Tensor::f32(vec![], vec![7.0])]);
    assert_eq!(e.as_f32().unwrap(), &[7.0; 6]);
}

// ---------------------------------------------------------------- randomness

/// A plan `y = dropout(x)` (or drop path) whose step can be set.
fn masked(op: Op, x: &Tensor, step: u64) -> Vec<f64> {
    let mut one = OneOp::new(op, &[x], true);
    one.ex.set_step(step);
    f(&one.run(&[x]))
}

#[test]
fn dropout_masks_are_keyed_by_op_and_step_and_keep_1_minus_p() {
    let n = 100_000;
    let ones = Tensor::f32(vec![n], vec![1.0; n]);
    let p = 0.25;
    let a = masked(Op::Dropout { p, key: 5 }, &ones, 3);
    assert_eq!(a, masked(Op::Dropout { p, key: 5 }, &ones, 3), "same key and step: same mask");
    assert_ne!(a, masked(Op::Dropout { p, key: 5 }, &ones, 4), "another step: another mask");
    assert_ne!(a, masked(Op::Dropout { p, key: 6 }, &ones, 3), "another key: another mask");
    let kept = a.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.75).abs() < 0.005, "keep rate {kept}");
    assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6), "kept values are scaled by 1/(1-p)");
    // The mask is the philox rule itself: element i kept iff keep_at(i, 1-p).
    let s = Stream::new(1234, 3, 5);
    assert!((0..1000).all(|i| (a[i] != 0.0) == s.keep_at(i as u64, 0.75)));
    // Applied to a gradient: the same mask (autodiff's backward of dropout).
    let g = rand(&[n], 45);
    let dg = masked(Op::Dropout { p, key: 5 }, &g, 3);
    assert!(dg.iter().zip(&a).zip(f(&g)).all(|((d, m), gv)| (d - m * gv).abs() < 1e-6));
    // Eval plans: the identity.
    assert_eq!(f(&run_op_eval(Op::Dropout { p, key: 5 }, &[&g])), f(&g));
}

#[test]
fn drop_path_keeps_or_drops_whole_samples() {
    let x = rand(&[4000, 3, 2], 46);
    let p = 0.2;
    let y = masked(Op::DropPath { p, key: 9 }, &x, 0);
    let fx = f(&x);
    let s = Stream::new(1234, 0, 9);
    let mut kept = 0;
    for n in 0..4000 {
        let keep = s.keep_at(n as u64, 0.8);
        kept += keep as usize;
        for j in 0..6 {
            let want = if keep { fx[n * 6 + j] / 0.8 } else { 0.0 };
            assert!((y[n * 6 + j] - want).abs() < 1e-6);
        }
    }
    assert!((kept as f64 / 4000.0 - 0.8).abs() < 0.02, "keep rate {}", kept as f64 / 4000.0);
    assert_ne!(y, masked(Op::DropPath { p, key: 9 }, &x, 1));
    assert_eq!(f(&run_op_eval(Op::DropPath { p, key: 9 }, &[&x])), fx);
}

// ---------------------------------------------------------------- collectives and queues

#[test]
fn collectives_are_identities_on_one_rank_and_errors_on_more() {
    let x = rand(&[3, 4], 47);
    for op in
        [Op::AllGather { world: 1 }, Op::AllReduce { op: ReduceOp::Sum, world: 1 }, Op::AllGatherGrad { world: 1 }]
    {
        assert_eq!(f(&run_op(op, &[&x])), f(&x));
    }
    let x4 = rand(&[4, 4], 48);
    for op in
        [Op::AllGather { world: 2 }, Op::AllReduce { op: ReduceOp::Mean, world: 2 }, Op::AllGatherGrad { world: 2 }]
    {
        let name = op.name();
        let err = OneOp::new(op, &[&x4], true).try_run(&[&x4]).unwrap_err().to_string();
        assert!(err.contains("needs the run's collective") && err.contains(name), "{err}");
    }
}

#[test]
fn queue_push_writes_key_columns_and_advance_wraps() {
    let queue = Tensor::f32(vec![2, 6], (0..12).map(|v| v as f32).collect());
    let ptr = Tensor::scalar_i64(2);
    let keys = Tensor::f32(vec![3, 2], vec![-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]);
    let q = run_op(Op::QueuePush { world: 1 }, &[&queue, &ptr, &keys]);
    assert_eq!(q.as_f32().unwrap(), &[0.0, 1.0, -1.0, -3.0, -5.0, 5.0, 6.0, 7.0, -2.0, -4.0, -6.0, 11.0]);
    let next = run_op(Op::QueueAdvance { world: 1 }, &[&ptr, &keys, &queue]);
    assert_eq!(next.as_i64().unwrap(), &[5]);
    let next = run_op(Op::QueueAdvance { world: 1 }, &[&Tensor::scalar_i64(3), &keys, &queue]);
    assert_eq!(next.as_i64().unwrap(), &[0]);
    // A block past the end wraps to the front (a ring of the newest K keys).
    let q = run_op(Op::QueuePush { world: 1 }, &[&queue, &Tensor::scalar_i64(4), &keys]);
    assert_eq!(q.as_f32().unwrap(), &[-5.0, 1.0, 2.0, 3.0, -1.0, -3.0, -6.0, 7.0, 8.0, 9.0, -2.0, -4.0]);
    let over = Tensor::scalar_i64(6);
    let err = OneOp::new(Op::QueuePush { world: 1 }, &[&queue, &over, &keys], true)
        .try_run(&[&queue, &over, &keys])
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fit"), "{err}");
}

// ---------------------------------------------------------------- initialisation

/// The initial value of a parameter `name` of `shape` under `init`.
fn init_value(name: &str, shape: &[usize], init: Init, seed: u64) -> Tensor {
    let mut g = Graph::new();
    let p = g.add_param(name, TensorType::f32(consts(shape)), init, true, "").unwrap();
    g.set_output("p", p);
    CpuExecutor::new(tessera_compiler::plan::lower(&g, 1, true).unwrap(), seed).unwrap().state(name).unwrap().clone()
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let (m, var) = mean_var(v);
    (m, var.sqrt())
}

#[test]
fn trunc_normal_has_the_right_statistics_and_bounds() {
    let v = f(&init_value("pos_embed", &[100_000], Init::TruncNormal { std: 0.02, a: -2.0, b: 2.0 }, 0));
    let (m, s) = mean_std(&v);
    assert!(m.abs() < 3.0 * 0.02 / (100_000f64).sqrt(), "mean {m}");
    assert!((s / 0.02 - 1.0).abs() < 0.01, "std {s}");
    // Tight bounds: every value inside, and the truncated normal's mean
    // (phi(a) - phi(b)) / (Phi(b) - Phi(a)) for std 1, a = -0.5, b = 1.
    let v = f(&init_value("w", &[100_000], Init::TruncNormal { std: 1.0, a: -0.5, b: 1.0 }, 0));
    assert!(v.iter().all(|&x| (-0.5..=1.0).contains(&x)));
    let phi = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let cdf = |x: f64| 0.5 * (1.0 + erf_series(x / std::f64::consts::SQRT_2));
    let want = (phi(-0.5) - phi(1.0)) / (cdf(1.0) - cdf(-0.5));
    assert!((mean_std(&v).0 - want).abs() < 0.005, "mean {} want {want}", mean_std(&v).0);
    // Lecun normal: std sqrt(1 / fan_in).
    let v = f(&init_value("pre_logits.weight", &[400, 250], Init::LecunNormal, 0));
    assert!((mean_std(&v).1 / (1.0f64 / 250.0).sqrt() - 1.0).abs() < 0.01);
}

#[test]
fn normal_uniform_and_kaiming_uniform() {
    let v = f(&init_value("n", &[100_000], Init::Normal { std: 3.0 }, 1));
    let (m, s) = mean_std(&v);
    assert!(m.abs() < 0.03 && (s / 3.0 - 1.0).abs() < 0.01, "{m} {s}");
    // Four standard deviations are exceeded by about 6e-5 of normal draws.
    let tails = v.iter().filter(|x| x.abs() > 12.0).count();
    assert!((1..=20).contains(&tails), "{tails}");
    let v = f(&init_value("u", &[100_000], Init::Uniform { low: -1.0, high: 3.0 }, 1));
    assert!(v.iter().all(|&x| (-1.0..3.0).contains(&x)));
    assert!((mean_std(&v).0 - 1.0).abs() < 0.02);
    // PyTorch's default: a = sqrt(5) gives U(+-1/sqrt(fan_in)), fan_in = 3*4*4.
    let v = f(&init_value("conv.weight", &[64, 3, 4, 4], Init::KaimingUniform { a: 5f64.sqrt(), fan_in: None }, 1));
    let bound = 1.0 / 48f64.sqrt();
    let max = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(max <= bound && max > 0.99 * bound, "max {max} bound {bound}");
    let v = f(&init_value("conv.bias", &[5000], Init::KaimingUniform { a: 5f64.sqrt(), fan_in: Some(48) }, 1));
    assert!(v.iter().all(|x| x.abs() <= bound));
    let v = f(&init_value("fc.weight", &[10, 200], Init::KaimingUniform { a: 0.0, fan_in: None }, 1));
    let max = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(max <= (6.0f64 / 200.0).sqrt() && max > 0.95 * (6.0f64 / 200.0).sqrt());
}

#[test]
fn init_depends_only_on_seed_and_name() {
    let init = Init::TruncNormal { std: 0.02, a: -2.0, b: 2.0 };
    let a = init_value("blocks.0.attn.qkv.weight", &[12, 4], init.clone(), 7);
    assert_eq!(a, init_value("blocks.0.attn.qkv.weight", &[12, 4], init.clone(), 7));
    assert_ne!(a, init_value("blocks.1.attn.qkv.weight", &[12, 4], init.clone(), 7));
    assert_ne!(a, init_value("blocks.0.attn.qkv.weight", &[12, 4], init.clone(), 8));
    // Element values depend on the flat index only, not the shape.
    let flat = init_value("blocks.0.attn.qkv.weight", &[48], init, 7);
    assert_eq!(a.as_f32(), flat.as_f32());
}

#[test]
fn constant_identity_and_normalised_columns() {
    assert_eq!(f(&init_value("a", &[2, 2], Init::Ones, 0)), vec![1.0; 4]);
    assert_eq!(f(&init_value("a", &[3], Init::Constant(0.5), 0)), vec![0.5; 3]);
    assert_eq!(f(&init_value("v.weight", &[3, 3], Init::Identity, 0)), vec![1., 0., 0., 0., 1., 0., 0., 0., 1.]);
    let q = f(&init_value("queue", &[16, 50], Init::NormalColumnsNormalized, 0));
    for c in 0..50 {
        let norm: f64 = (0..16).map(|r| q[r * 50 + c].powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6, "column {c}: {norm}");
    }
    assert!(q.iter().any(|&v| v < 0.0) && q.iter().any(|&v| v > 0.0));
}

#[test]
fn convit_local_init_written_out() {
    // H = 4: k = 2, centre 0.5; head h = h1 + 2 h2 gets [2(h2-c)], [2(h1-c)], [-1], times strength 2.
    let w = f(&init_value("pos_proj.weight", &[4, 6], Init::ConvitLocal { strength: 2.0, locality_dim: 2 }, 0));
    #[rustfmt::skip]
    let want = [
        -2., -2., -2., -2., -2., -2., // h1 0, h2 0: 2*(0-0.5)*2
        -2., -2.,  2.,  2., -2., -2., // h1 1, h2 0
         2.,  2., -2., -2., -2., -2., // h1 0, h2 1
         2.,  2.,  2.,  2., -2., -2., // h1 1, h2 1
    ];
    assert_eq!(w, want);
    // H = 9: k = 3, centre 1, strength 1, locality_dim 1: row h = h1 + 3 h2 is
    // [2(h2-1), 2(h1-1), -1].
    let w = f(&init_value("pos_proj.weight", &[9, 3], Init::ConvitLocal { strength: 1.0, locality_dim: 1 }, 0));
    #[rustfmt::skip]
    let want = [
        -2., -2., -1., // h1 0, h2 0
        -2.,  0., -1., // h1 1, h2 0
        -2.,  2., -1., // h1 2, h2 0
         0., -2., -1., // h1 0, h2 1
         0.,  0., -1.,
         0.,  2., -1.,
         2., -2., -1., // h1 0, h2 2
         2.,  0., -1.,
         2.,  2., -1.,
    ];
    assert_eq!(w, want);
    // H = 5: rows past k^2 = 4 keep a trunc_normal(0.02) draw.
    let w = f(&init_value("pos_proj.weight", &[5, 3], Init::ConvitLocal { strength: 1.0, locality_dim: 1 }, 0));
    assert_eq!(&w[..12], &[-1., -1., -1., -1., 1., -1., 1., -1., -1., 1., 1., -1.]);
    assert!(w[12..].iter().all(|v| v.abs() < 0.2 && *v != 0.0));
}

#[test]
fn relative_positions_for_a_2x2_grid_written_out() {
    let r = f(&init_value("rel_indices", &[1, 4, 4, 3], Init::RelativePositions2d { grid: 2, locality_dim: 1 }, 0));
    // Tokens 0..4 at (x, y) = (0,0), (1,0), (0,1), (1,1); entry (i, j) = [dx, dy, dx^2 + dy^2].
    #[rustfmt::skip]
    let want = [
        0., 0., 0.,    1., 0., 1.,    0., 1., 1.,    1., 1., 2.,
       -1., 0., 1.,    0., 0., 0.,   -1., 1., 2.,    0., 1., 1.,
        0.,-1., 1.,    1.,-1., 2.,    0., 0., 0.,    1., 0., 1.,
       -1.,-1., 2.,    0.,-1., 1.,   -1., 0., 1.,    0., 0., 0.,
    ];
    assert_eq!(r, want);
    let r2 = f(&init_value("rel", &[1, 4, 4, 6], Init::RelativePositions2d { grid: 2, locality_dim: 2 }, 0));
    let repeated: Vec<f64> = want.chunks(3).flat_map(|c| [c[0], c[0], c[1], c[1], c[2], c[2]]).collect();
    assert_eq!(r2, repeated);
}

#[test]
fn bad_init_shapes_are_errors_naming_the_state() {
    let mut g = Graph::new();
    let p = g.add_param("v.weight", TensorType::f32(consts(&[2, 3, 4])), Init::Identity, true, "").unwrap();
    g.set_output("p", p);
    let err = CpuExecutor::new(tessera_compiler::plan::lower(&g, 1, true).unwrap(), 0).err().unwrap().to_string();
    assert!(err.contains("`v.weight`") && err.contains("identity"), "{err}");
}

// ---------------------------------------------------------------- executor

/// loss = mean(linear(x, w) * mask) with a state update of `count` (+1) and a batch-norm stat.
fn small_plan(training: bool) -> Plan {
    let mut g = Graph::new();
    let x = g.add_input("x", consts(&[4, 3]), DType::F32).unwrap();
    let w = g.add_param("w", TensorType::f32(consts(&[2, 3])), Init::Normal { std: 1.0 }, true, "").unwrap();
    let count = g.add_buffer("count", TensorType::f32(consts(&[])), Init::Zeros, "").unwrap();
    let rm = g.add_buffer("rm", TensorType::f32(consts(&[2])), Init::Zeros, "").unwrap();
    let y = g.add_op(Op::Linear, &[x, w], "fc").unwrap();
    let r = g.add_op(Op::Reshape { shape: consts(&[8]) }, &[y], "").unwrap();
    let loss = g.add_op(Op::Reduce { op: ReduceOp::Mean, axes: vec![0], keepdim: false }, &[r], "").unwrap();
    let next = g.add_op(Op::AddScalar { value: 1.0 }, &[count], "").unwrap();
    let stat = g.add_op(Op::RunningStat { momentum: 0.5, unbiased_var: false }, &[rm, y], "").unwrap();
    let d = g.add_op(Op::Dropout { p: 0.5, key: 1 }, &[y], "").unwrap();
    g.set_output("loss", loss);
    g.set_output("y", y);
    g.set_output("dropped", d);
    g.add_state_update("count", next);
    g.add_state_update("rm", stat);
    tessera_compiler::plan::lower(&g, 1, training).unwrap()
}

#[test]
fn run_returns_outputs_applies_state_updates_and_counts_steps() {
    let mut ex = CpuExecutor::new(small_plan(true), 3).unwrap();
    assert_eq!(ex.state_names(), vec!["w", "count", "rm"]);
    ex.set_state("w", Tensor::f32(vec![2, 3], vec![1.0, 0.0, 0.0, 0.0, 1.0, 1.0])).unwrap();
    let x = Tensor::f32(vec![4, 3], (0..12).map(|v| v as f32).collect());
    let out: BTreeMap<String, Tensor> = ex.run(&[("x", x.clone())]).unwrap();
    // y rows: [x0, x1 + x2] = [0,3], [3,9], [6,15], [9,21]; mean 66/8.
    assert_eq!(out["y"].as_f32().unwrap(), &[0.0, 3.0, 3.0, 9.0, 6.0, 15.0, 9.0, 21.0]);
    assert_close(&out["loss"], &[66.0 / 8.0], 1e-7);
    assert_eq!(ex.state("count").unwrap().as_f32().unwrap(), &[1.0]);
    assert_close(ex.state("rm").unwrap(), &[0.5 * 4.5, 0.5 * 12.0], 1e-7);
    assert_eq!(ex.step(), 1);
    let second = ex.run(&[("x", x.clone())]).unwrap();
    assert_eq!(ex.state("count").unwrap().as_f32().unwrap(), &[2.0]);
    assert_ne!(out["dropped"], second["dropped"], "the step keys the dropout mask");
    ex.set_step(0);
    assert_eq!(ex.run(&[("x", x)]).unwrap()["dropped"], out["dropped"], "a replayed step repeats its mask");
}

#[test]
fn run_rejects_bad_inputs_with_clear_errors_and_changes_nothing() {
    let mut ex = CpuExecutor::new(small_plan(false), 0).unwrap();
    let err = ex.run(&[]).unwrap_err().to_string();
    assert!(err.contains("missing input `x`") && err.contains("[4,3] f32"), "{err}");
    let err = ex.run(&[("x", Tensor::zeros(vec![4, 2], DType::F32))]).unwrap_err().to_string();
    assert_eq!(err, "input `x`: expected [4,3] f32, got [4,2] f32");
    let err = ex.run(&[("x", Tensor::zeros(vec![4, 3], DType::I64))]).unwrap_err().to_string();
    assert_eq!(err, "input `x`: expected [4,3] f32, got [4,3] i64");
    let err = ex.run(&[("x", Tensor::zeros(vec![4, 3], DType::F32)), ("z", Tensor::scalar_f32(1.0))]).unwrap_err();
    assert!(err.to_string().contains("unknown input `z`"), "{err}");
    let err = ex.set_state("w", Tensor::zeros(vec![3, 2], DType::F32)).unwrap_err().to_string();
    assert_eq!(err, "state `w`: expected [2,3] f32, got [3,2] f32");
    assert!(matches!(ex.set_state("nope", Tensor::scalar_f32(0.0)), Err(RuntimeError::UnknownState { .. })));
    assert_eq!(ex.step(), 0);
    assert_eq!(ex.state("count").unwrap().as_f32().unwrap(), &[0.0]);
    // In eval mode dropout is the identity.
    let out = ex.run(&[("x", rand(&[4, 3], 50))]).unwrap();
    assert_eq!(out["dropped"], out["y"]);
}

#[test]
fn kernel_errors_name_the_kernel_and_scope() {
    let logits = rand(&[2, 3], 51);
    let bad = Tensor::i64(vec![2], vec![0, -1]);
    let err = OneOp::new(Op::CrossEntropy { label_smoothing: 0.0 }, &[&logits, &bad], true)
        .try_run(&[&logits, &bad])
        .unwrap_err()
        .to_string();
    assert_eq!(err, "kernel 0 (cross_entropy) in `test`: target -1 of sample 1 is not a class index in 0..3");
}

// ---------------------------------------------------------------- speed (printed, not asserted)

#[test]
fn linear_throughput_on_a_vit_b_mlp_product() {
    // 1576 x 768 @ 768 x 3072: ViT-B/16's fc1 on 8 x 197 tokens.
    let (m, k, n) = (1576, 768, 3072);
    let x = rand(&[m, k], 52);
    let w = rand(&[n, k], 53);
    let mut one = OneOp::new(Op::Linear, &[&x, &w], true);
    let inputs = [("x0", x), ("x1", w)];
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        let t = std::time::Instant::now();
        let y = one.ex.run(&inputs).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        assert_eq!(y["y"].shape, vec![m, n]);
    }
    let gflops = 2.0 * (m * k * n) as f64 / best / 1e9;
    println!(
        "linear {m}x{k} @ {k}x{n} through the executor: {:.1} ms, {gflops:.0} GFLOP/s on {} threads",
        best * 1e3,
        rayon::current_num_threads()
    );
}

#[test]
fn sum_of_squares_covers_every_element_of_every_operand() {
    let a = Tensor::f32(vec![2, 3], vec![1.0, -2.0, 3.0, 0.5, 0.0, -1.5]);
    let b = Tensor::f32(vec![40_000], (0..40_000).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect());
    let want: f64 = a.as_f32().unwrap().iter().chain(b.as_f32().unwrap()).map(|&v| (v as f64) * (v as f64)).sum();
    let got = run_op(Op::SumOfSquares, &[&a, &b]);
    assert_eq!(got.shape, Vec::<usize>::new());
    let got = got.as_f32().unwrap()[0] as f64;
    assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
}

/// Runs `op` as one kernel on `world` ranks (threads joined in a TCP ring),
/// rank r on `inputs(r)`; each rank's result.
fn on_ranks(op: Op, world: usize, inputs: impl Fn(usize) -> Vec<Tensor> + Sync) -> Vec<Tensor> {
    use std::sync::Arc;
    use std::time::Duration;
    use tessera_runtime::dist::{RingCollective, StoreClient, StoreServer};
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let addr = format!("127.0.0.1:{}", server.port());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (addr, op, inputs) = (addr.clone(), op.clone(), &inputs);
                s.spawn(move || {
                    let store = StoreClient::connect(&addr, Duration::from_secs(10)).unwrap();
                    let ring = RingCollective::join(&store, "ops", r, world, Duration::from_secs(10)).unwrap();
                    let xs = inputs(r);
                    let refs: Vec<&Tensor> = xs.iter().collect();
                    let mut one = OneOp::new(op, &refs, true);
                    one.ex.set_collective(Arc::new(ring));
                    one.run(&refs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn collectives_on_two_ranks_gather_reduce_and_take_this_ranks_block() {
    let v32 = |t: &Tensor| t.as_f32().unwrap().to_vec();
    let filled = |r: usize, shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::f32(shape.to_vec(), (0..n).map(|i| (r * 100 + i) as f32).collect())
    };
    // all_gather: rank 0's rows, then rank 1's.
    let got = on_ranks(Op::AllGather { world: 2 }, 2, |r| vec![filled(r, &[2, 3])]);
    let expect: Vec<f32> = (0..2).flat_map(|r| (0..6).map(move |i| (r * 100 + i) as f32)).collect();
    for g in &got {
        assert_eq!((g.shape.clone(), v32(g)), (vec![4, 3], expect.clone()));
    }
    // all_reduce: sum, mean and max over the ranks.
    for (op, combine) in [
        (ReduceOp::Sum, (|a: f32, b: f32| a + b) as fn(f32, f32) -> f32),
        (ReduceOp::Mean, |a, b| (a + b) / 2.0),
        (ReduceOp::Max, f32::max),
    ] {
        let got = on_ranks(Op::AllReduce { op, world: 2 }, 2, |r| vec![filled(r, &[5])]);
        let expect: Vec<f32> = (0..5).map(|i| combine(i as f32, (100 + i) as f32)).collect();
        assert!(got.iter().all(|g| v32(g) == expect), "{op:?}: {got:?}");
    }
    // all_gather_grad: the gathered gradient summed over the ranks, this rank's block.
    let got = on_ranks(Op::AllGatherGrad { world: 2 }, 2, |r| vec![filled(r, &[4, 2])]);
    for (r, g) in got.iter().enumerate() {
        let expect: Vec<f32> = (0..4).map(|i| ((r * 4 + i) * 2 + 100) as f32).collect();
        assert_eq!((g.shape.clone(), v32(g)), (vec![2, 2], expect), "rank {r}");
    }
    // zero_diagonal: row i's own column among both ranks' rows is rank * N + i.
    let got = on_ranks(Op::ZeroDiagonal { world: 2 }, 2, |_| vec![Tensor::f32(vec![2, 4], vec![1.0; 8])]);
    assert_eq!(v32(&got[0]), [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
    assert_eq!(v32(&got[1]), [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
    // queue_push: every rank's keys, in the global batch's sample order
    // (rank r's key i is sample i * 2 + r), as columns from ptr.
    let got = on_ranks(Op::QueuePush { world: 2 }, 2, |r| {
        vec![Tensor::f32(vec![2, 6], vec![0.0; 12]), Tensor::scalar_i64(1), filled(r, &[2, 2])]
    });
    for g in &got {
        assert_eq!(v32(g), [0.0, 0.0, 100.0, 2.0, 102.0, 0.0, 0.0, 1.0, 101.0, 3.0, 103.0, 0.0]);
    }
}

/// A gradient all-reduce read before its bucket is full (a kernel between
/// two gradients of one bucket): the bucket goes out early, cut at the same
/// place on every rank, and the results are the plain means.
#[test]
fn a_gradient_read_before_its_bucket_is_full_is_sent_early() {
    use std::sync::Arc;
    use std::time::Duration;
    use tessera_runtime::dist::{RingCollective, StoreClient, StoreServer};
    let mean = || Op::AllReduce { op: ReduceOp::Mean, world: 2 };
    let mut g = Graph::new();
    let x = g.add_input("x", consts(&[3]), DType::F32).unwrap();
    let y = g.add_input("y", consts(&[3]), DType::F32).unwrap();
    let a = g.add_op(mean(), &[x], "optim.all_reduce").unwrap();
    let r = g.add_op(Op::Scale { factor: 2.0 }, &[a], "optim").unwrap();
    let y2 = g.add_op(Op::Binary(BinaryOp::Add), &[r, y], "optim").unwrap();
    let b = g.add_op(mean(), &[y2], "optim.all_reduce").unwrap();
    g.set_output("r", r);
    g.set_output("b", b);
    let mut plan = tessera_compiler::plan::lower(&g, 1, true).unwrap();
    plan.gradient_bucket_bytes = 1 << 20; // one bucket for both
    let order: Vec<&str> = plan.kernels.iter().map(|k| k.op.name()).collect();
    assert_eq!(order, ["all_reduce", "scale", "add", "all_reduce"], "the reader sits inside the bucket");
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let addr = format!("127.0.0.1:{}", server.port());
    let got: Vec<BTreeMap<String, Tensor>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|rank| {
                let (addr, plan) = (addr.clone(), plan.clone());
                s.spawn(move || {
                    let store = StoreClient::connect(&addr, Duration::from_secs(10)).unwrap();
                    let ring = RingCollective::join(&store, "early", rank, 2, Duration::from_secs(10)).unwrap();
                    let mut ex = CpuExecutor::new(plan, 0).unwrap();
                    ex.set_collective(Arc::new(ring));
                    let v = |base: f32| Tensor::f32(vec![3], (0..3).map(|i| base + (rank * 10 + i) as f32).collect());
                    ex.run(&[("x", v(0.0)), ("y", v(100.0))]).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for out in &got {
        // mean(x) = 5 + i; r = 2 mean(x); b = mean(r + y) = r + 105 + i.
        let r: Vec<f32> = (0..3).map(|i| 2.0 * (5.0 + i as f32)).collect();
        let b: Vec<f32> = (0..3).map(|i| r[i] + 105.0 + i as f32).collect();
        assert_eq!(out["r"].as_f32().unwrap(), &r[..]);
        assert_eq!(out["b"].as_f32().unwrap(), &b[..]);
    }
}
