//! Attention and its gradient on the CUDA executor against the CPU backend,
//! on the host device (the same kernel sources compiled by g++ and run one
//! thread per block): shapes with one, a few and many rows, Nq != Nk,
//! dropout in training and in eval, several scales, bf16 operands, two
//! steps (a step's mask differs), and bitwise-equal reruns; the packed
//! forms (q, k, v read in place from qkv) likewise. The kernels are
//! also compiled for sm_90 with NVRTC (no GPU needed). Needs the CUDA tools
//! (scripts/setup-cuda-tools.sh).

use std::collections::BTreeMap;
use tessera_compiler::ir::{DType, Graph, Op, Shape};
use tessera_runtime::cuda::arena::addresses;
use tessera_runtime::cuda::device::{DevPtr, Target};
use tessera_runtime::cuda::lower::Lowering;
use tessera_runtime::cuda::nvrtc;
use tessera_runtime::philox::Stream;
use tessera_runtime::{Backend, Executor, Tensor};

fn rand(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let s = Stream::new(5, 1, seed);
    Tensor::f32(shape.to_vec(), (0..n as u64).map(|i| s.uniform_at(i) * 2.0 - 1.0).collect())
}

fn host() -> Backend {
    crate::open_cuda()
        .unwrap_or_else(|e| panic!("the CUDA host device cannot open ({e}); run scripts/setup-cuda-tools.sh"))
}

/// A graph of one op over f32 inputs `x0, x1, ..` (cast to `dtype` first
/// when it is not f32), its result as output `y`.
fn one_op(op: Op, shapes: &[&[usize]], dtype: DType) -> (Graph, Vec<(String, Tensor)>) {
    let mut g = Graph::new();
    let mut inputs = Vec::new();
    let mut ids = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        let name = format!("x{i}");
        let dims: Vec<u64> = s.iter().map(|&d| d as u64).collect();
        let mut id = g.add_input(&name, Shape::consts(&dims), DType::F32).unwrap();
        if dtype != DType::F32 {
            id = g.add_op(Op::Cast { dtype }, &[id], "").unwrap();
        }
        ids.push(id);
        inputs.push((name, rand(s, i as u32 + 1)));
    }
    let y = g.add_op(op, &ids, "attn").unwrap_or_else(|e| panic!("{e}"));
    g.set_output("y", y);
    (g, inputs)
}

fn planned(g: &Graph, training: bool) -> tessera_plan::Plan {
    let mut plan = tessera_compiler::plan::lower(g, 1, training).unwrap();
    plan.memory = Some(tessera_compiler::memory::plan_memory(&plan));
    plan
}

/// `steps` steps of `plan` on an executor; the output `y` of each.
fn run(ex: &mut Executor, inputs: &[(String, Tensor)], steps: usize, who: &str) -> Vec<Tensor> {
    let inputs: Vec<(&str, Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    (0..steps)
        .map(|_| {
            let mut out: BTreeMap<String, Tensor> = ex.run(&inputs, None).unwrap_or_else(|e| panic!("{who}: {e}"));
            out.remove("y").expect("output y")
        })
        .collect()
}

#[track_caller]
fn assert_close(what: &str, cpu: &Tensor, gpu: &Tensor, tol: f64) {
    assert_eq!(cpu.shape, gpu.shape, "{what}: shapes");
    let (a, b) = (cpu.as_f32().expect("f32 data"), gpu.as_f32().expect("f32 data"));
    assert!(a.iter().all(|x| x.is_finite()), "{what}: the CPU result is not finite");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let err = (*x as f64 - *y as f64).abs() / (1.0 + (*x as f64).abs());
        assert!(err <= tol, "{what}[{i}]: cpu {x} vs cuda {y} (rel {err:.2e} > {tol:.0e})");
    }
}

/// Runs `op` two steps on the CPU and on the host device and compares each
/// step's result; returns the first step's (CPU, host) results.
#[track_caller]
fn check(op: Op, shapes: &[&[usize]], training: bool, dtype: DType, tol: f64) -> (Tensor, Tensor) {
    let what = format!("{op:?} on {shapes:?} ({dtype}, training {training})");
    let (g, inputs) = one_op(op, shapes, dtype);
    let plan = planned(&g, training);
    let mut cpu = Backend::Cpu.executor(plan.clone(), 42).unwrap();
    let mut gpu = host().executor(plan, 42).unwrap_or_else(|e| panic!("{what}: {e}"));
    let a = run(&mut cpu, &inputs, 2, "cpu");
    let b = run(&mut gpu, &inputs, 2, "cuda-host");
    for s in 0..2 {
        assert_close(&format!("{what}, step {s}"), &a[s], &b[s], tol);
    }
    (a[0].clone(), b[0].clone())
}

fn attention(scale: f64, dropout: f64) -> Op {
    Op::Attention { scale, dropout, key: 11 }
}

fn attention_grad(scale: f64, dropout: f64) -> Op {
    Op::AttentionGrad { scale, dropout, key: 11 }
}

/// q, k, v shapes: N = 1, 5, 17, 65; d = 8, 16, 64; Nq != Nk, dv != d;
/// rank 3 and 4.
const FORWARD_SHAPES: &[[&[usize]; 3]] = &[
    [&[1, 1, 1, 8], &[1, 1, 1, 8], &[1, 1, 1, 8]],
    [&[2, 3, 5, 16], &[2, 3, 17, 16], &[2, 3, 17, 8]],
    [&[1, 2, 65, 64], &[1, 2, 17, 64], &[1, 2, 17, 64]],
    [&[4, 17, 8], &[4, 65, 8], &[4, 65, 16]],
    [&[3, 1, 16], &[3, 5, 16], &[3, 5, 16]],
];

/// Self-attention shapes for the gradient.
const GRAD_SHAPES: &[&[usize]] = &[&[1, 1, 1, 8], &[2, 3, 5, 16], &[1, 2, 17, 64], &[2, 65, 8]];

#[test]
fn attention_matches_the_cpu_with_and_without_dropout() {
    for (i, s) in FORWARD_SHAPES.iter().enumerate() {
        let scale = [0.125, 1.0, 0.35, 2.5, 0.25][i];
        check(attention(scale, 0.0), s, true, DType::F32, 1e-5);
        let (cpu, _) = check(attention(scale, 0.3), s, true, DType::F32, 1e-5);
        // Eval: dropout is off, the result is the plain one.
        let (eval, _) = check(attention(scale, 0.3), s, false, DType::F32, 1e-5);
        let (plain, _) = check(attention(scale, 0.0), s, false, DType::F32, 1e-5);
        assert_eq!(eval.as_f32(), plain.as_f32(), "eval ignores dropout");
        if s[1][s[1].len() - 2] > 1 {
            assert_ne!(cpu.as_f32(), plain.as_f32(), "dropout 0.3 changes the result of {s:?}");
        }
    }
}

#[test]
fn attention_grad_matches_the_cpu_with_and_without_dropout() {
    for (i, &s) in GRAD_SHAPES.iter().enumerate() {
        let scale = [0.125, 0.25, 1.0, 0.7][i];
        let shapes = [s, s, s, s];
        let (plain, _) = check(attention_grad(scale, 0.0), &shapes, true, DType::F32, 1e-5);
        let (dropped, _) = check(attention_grad(scale, 0.25), &shapes, true, DType::F32, 1e-5);
        check(attention_grad(scale, 0.25), &shapes, false, DType::F32, 1e-5);
        if s[s.len() - 2] > 1 {
            assert_ne!(dropped.as_f32(), plain.as_f32(), "dropout 0.25 changes the gradient of {s:?}");
            // dk is not all zero (a kernel that skipped it would pass no check).
            let per = plain.as_f32().unwrap().len() / 3;
            assert!(plain.as_f32().unwrap()[per..2 * per].iter().any(|&x| x != 0.0));
        }
    }
}

/// qkv [B, N, 3*H*d] and dy [B, N, H*d] of the packed ops: N = 1, 5, 33
/// (more keys than a tile of the race check's threads); H = 1, 2, 3;
/// d = 8, 16.
const PACKED: &[(usize, usize, usize, usize)] = &[(1, 1, 1, 8), (2, 5, 3, 16), (2, 33, 2, 8)];

#[test]
fn packed_attention_and_its_gradient_match_the_cpu() {
    for (i, &(b, n, h, d)) in PACKED.iter().enumerate() {
        let scale = [0.125, 0.25, 0.7][i];
        let (qkv, out): (&[usize], &[usize]) = (&[b, n, 3 * h * d], &[b, n, h * d]);
        // f32 with and without dropout; bf16 with it.
        for (dtype, p) in [(DType::F32, 0.0), (DType::F32, 0.25), (DType::BF16, 0.25)] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            {
                let fwd = Op::AttentionPacked { heads: h as u64, scale, dropout: p, key: 11 };
                let (cpu, _) = check(fwd, &[qkv], true, dtype, tol);
                assert_eq!(cpu.shape, out, "the result's shape");
                let grad = Op::AttentionPackedGrad { heads: h as u64, scale, dropout: p, key: 11, row_sum: false };
                let (dqkv, _) = check(grad, &[qkv, out], true, dtype, tol);
                // dk is not all zero (a kernel that skipped it would pass no check).
                let dk = |t: &Tensor| {
                    let v = t.as_f32().unwrap().to_vec();
                    v.chunks(3 * h * d).flat_map(|row| row[h * d..2 * h * d].to_vec()).collect::<Vec<_>>()
                };
                if n > 1 {
                    assert!(dk(&dqkv).iter().any(|&x| x != 0.0), "dk of {qkv:?} is zero");
                }
            }
        }
    }
}

#[test]
fn bf16_operands_match_the_cpu_within_bf16_rounding() {
    for s in &FORWARD_SHAPES[1..4] {
        check(attention(0.25, 0.0), s, true, DType::BF16, 1e-2);
        check(attention(0.25, 0.2), s, true, DType::BF16, 1e-2);
    }
    for &s in &GRAD_SHAPES[1..] {
        check(attention_grad(0.25, 0.0), &[s, s, s, s], true, DType::BF16, 1e-2);
        check(attention_grad(0.25, 0.2), &[s, s, s, s], true, DType::BF16, 1e-2);
    }
}

#[test]
fn reruns_are_bitwise_identical() {
    let s: &[usize] = &[2, 2, 65, 16];
    let cases: [(Op, Vec<&[usize]>); 2] = [
        (attention(0.25, 0.1), vec![s, &[2, 2, 17, 16], &[2, 2, 17, 16]]),
        (attention_grad(0.25, 0.1), vec![s, s, s, s]),
    ];
    for (op, shapes) in cases {
        let (g, inputs) = one_op(op, &shapes, DType::F32);
        let mut ex = host().executor(planned(&g, true), 7).unwrap();
        let first = run(&mut ex, &inputs, 1, "cuda-host").remove(0);
        ex.set_step(0);
        let again = run(&mut ex, &inputs, 1, "cuda-host").remove(0);
        let bits = |t: &Tensor| t.as_f32().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&first), bits(&again), "a rerun of the same step differs");
    }
}

/// Every attention kernel, as lowered for f32 and bf16 with and without
/// dropout, compiles for a GPU (sm_90) with NVRTC.
#[test]
fn the_kernels_compile_for_sm_90_with_nvrtc() {
    let s: &[usize] = &[2, 3, 17, 64];
    let mut names = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        for p in [0.0, 0.1] {
            let packed = Op::AttentionPacked { heads: 3, scale: 0.125, dropout: p, key: 11 };
            let packed_grad = Op::AttentionPackedGrad { heads: 3, scale: 0.125, dropout: p, key: 11, row_sum: false };
            for (op, shapes) in [
                (attention(0.125, p), vec![s, &[2, 3, 5, 64], &[2, 3, 5, 32]]),
                (attention_grad(0.125, p), vec![s, s, s, s]),
                (packed, vec![&[2, 17, 3 * 3 * 64][..]]),
                (packed_grad, vec![&[2, 17, 3 * 3 * 64][..], &[2, 17, 3 * 64]]),
            ] {
                let (g, _) = one_op(op, &shapes, dtype);
                let plan = planned(&g, true);
                let memory = plan.memory.clone().unwrap();
                let base = DevPtr(1 << 32);
                let addr = addresses(&plan, &memory, base, &[]);
                let mut l = Lowering::new(&plan, &memory, &addr, base, DevPtr(1 << 31));
                l.lower_all().unwrap_or_else(|e| panic!("{e}"));
                for src in l.sources.iter().filter(|s| s.name.starts_with("attention")) {
                    nvrtc::compile(&src.unit(&Target::Nvrtc { sm: 90 }), &src.name, "sm_90")
                        .unwrap_or_else(|e| panic!("{e}\n(run scripts/setup-cuda-tools.sh for NVRTC)"));
                    names.push(src.name.clone());
                }
            }
        }
    }
    // forward, stats, dq, dkv for each dtype and dropout setting, plain and packed.
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 2 * 2 * 4 * 2, "{names:?}");
}

/// attention_packed_grad with its row sum (the qkv product's bias gradient,
/// summed as the rows are written): the result and the sum against the
/// CPU's (which sums the stored result), f32 and bf16, with and without
/// dropout, on every packed shape, on more rows than the launch has
/// blocks and on more samples than it has chunks (a block per head and
/// chunk of samples, each chunk's partials one row); its kernels compile
/// for sm_90 with NVRTC.
#[test]
fn the_packed_gradient_with_its_row_sum_matches_the_cpu() {
    // 64 heads: 2048 / 64 = 32 chunks for 40 samples.
    let shapes = PACKED.iter().copied().chain([(40, 33, 2, 8), (40, 3, 64, 2)]);
    for (b, n, h, d) in shapes {
        for (dtype, p) in [(DType::F32, 0.0), (DType::F32, 0.25), (DType::BF16, 0.25)] {
            let (qkv, out): (&[usize], &[usize]) = (&[b, n, 3 * h * d], &[b, n, h * d]);
            let grad = Op::AttentionPackedGrad { heads: h as u64, scale: 0.25, dropout: p, key: 11, row_sum: true };
            let (mut g, inputs) = one_op(grad, &[qkv, out], dtype);
            let y = g.outputs()[0].1;
            let sum = g.add_op(Op::ResultPart { index: 1, dtype: DType::F32 }, &[y], "attn.qkv").unwrap();
            g.set_output("sum", sum);
            let plan = planned(&g, true);
            let what = format!("{qkv:?} {dtype} dropout {p}");
            let given: Vec<(&str, Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            let a = Backend::Cpu.executor(plan.clone(), 42).unwrap().run(&given, None).unwrap();
            let b_ = host().executor(plan.clone(), 42).unwrap_or_else(|e| panic!("{what}: {e}")).run(&given, None);
            let b_ = b_.unwrap_or_else(|e| panic!("{what}: {e}"));
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert_close(&format!("y {what}"), &a["y"], &b_["y"], tol);
            // bf16: each side sums what it stored (within a bf16 step of each other).
            assert_close(&format!("sum {what}"), &a["sum"], &b_["sum"], if dtype == DType::F32 { 1e-4 } else { 5e-2 });
            let memory = plan.memory.clone().unwrap();
            let base = DevPtr(1 << 32);
            let addr = addresses(&plan, &memory, base, &[]);
            let mut l = Lowering::new(&plan, &memory, &addr, base, DevPtr(1 << 31));
            l.lower_all().unwrap_or_else(|e| panic!("{e}"));
            let mut summed = 0;
            for src in &l.sources {
                nvrtc::compile(&src.unit(&Target::Nvrtc { sm: 90 }), &src.name, "sm_90")
                    .unwrap_or_else(|e| panic!("{e}\n(run scripts/setup-cuda-tools.sh for NVRTC)"));
                summed += src.name.starts_with("row_sum_partials") as usize;
            }
            assert_eq!(summed, 1, "{what}: one launch sums the partials");
        }
    }
}
