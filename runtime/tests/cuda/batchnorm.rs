//! Batch statistics (batch_norm in training and eval, batch_standardize and
//! its gradient, running_stat) and MoCo's queue (queue_push,
//! queue_advance) on the CUDA host device against the CPU backend, in f32
//! and in bf16 (operands cast to bf16 inside the graph), plus bitwise
//! determinism of the host device. Needs the CUDA headers
//! (scripts/setup-cuda-tools.sh).
//!
//! bf16 cases feed values that bf16 holds exactly, so both backends start
//! from the same numbers; the CPU keeps bf16 values as unrounded f32, the
//! CUDA backend rounds each result once, hence the tolerance 2^-8 (bf16's
//! unit roundoff) relative to 1 + |y|.

use std::collections::BTreeMap;
use tessera_compiler::ir::{DType, Graph, Init, Op, Shape, TensorType, ValueId};
use tessera_compiler::plan::Plan;
use tessera_runtime::philox::Stream;
use tessera_runtime::{Backend, Executor, Tensor};

const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1.0 / 256.0;

fn shape(dims: &[usize]) -> Shape {
    Shape::consts(&dims.iter().map(|&d| d as u64).collect::<Vec<_>>())
}

/// Uniform values in [lo, hi), from the Philox stream `key`; rounded to
/// bf16 when `dtype` is bf16, so that a cast to bf16 is exact.
fn values(dims: &[usize], key: u32, lo: f32, hi: f32, dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let s = Stream::new(11, 3, key);
    let data = (0..n as u64)
        .map(|i| {
            let v = lo + (hi - lo) * s.uniform_at(i);
            if dtype == DType::BF16 {
                half::bf16::from_f32(v).to_f32()
            } else {
                v
            }
        })
        .collect();
    Tensor::f32(dims.to_vec(), data)
}

fn host() -> Backend {
    crate::open_cuda()
        .unwrap_or_else(|e| panic!("the CUDA host device cannot open ({e}); run scripts/setup-cuda-tools.sh"))
}

/// Host-device executors are built one at a time: two threads compiling or
/// loading the same kernel at once collide on the host device's temporary
/// file names (the g++ directory and the loaded library are named by
/// process and kernel, not by thread).
static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn host_executor(plan: Plan) -> Result<Executor, tessera_runtime::RuntimeError> {
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    host().executor(plan, 7)
}

fn plan_of(g: &Graph, training: bool) -> Plan {
    let mut plan = tessera_compiler::plan::lower(g, 1, training).unwrap_or_else(|e| panic!("{e}"));
    plan.memory = Some(tessera_compiler::memory::plan_memory(&plan));
    plan
}

/// The CPU and host-device executors of one plan, same seed.
fn pair(plan: Plan) -> (Executor, Executor) {
    let cpu = Backend::Cpu.executor(plan.clone(), 7).unwrap_or_else(|e| panic!("cpu: {e}"));
    let gpu = host_executor(plan).unwrap_or_else(|e| panic!("cuda-host: {e}"));
    (cpu, gpu)
}

fn run(e: &mut Executor, inputs: &[(&str, Tensor)], who: &str) -> BTreeMap<String, Tensor> {
    e.run(inputs, None).unwrap_or_else(|err| panic!("{who}: {err}"))
}

#[track_caller]
fn assert_close(what: &str, cpu: &Tensor, gpu: &Tensor, tol: f64) {
    assert_eq!(cpu.shape, gpu.shape, "{what}: shapes");
    match (cpu.as_f32(), gpu.as_f32()) {
        (Some(a), Some(b)) => {
            assert_eq!(a.len(), b.len(), "{what}: lengths");
            for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
                let err = (x as f64 - y as f64).abs() / (1.0 + (x as f64).abs());
                let both_nan = x.is_nan() && y.is_nan();
                assert!(both_nan || err <= tol, "{what}[{i}]: cpu {x} vs cuda {y} (rel {err:.2e} > {tol:.0e})");
            }
        }
        _ => assert_eq!(cpu.as_i64(), gpu.as_i64(), "{what}"),
    }
}

/// Graph inputs named `names`, f32, cast to `dtype` when it is bf16.
fn inputs_as(g: &mut Graph, names: &[&str], dims: &[&[usize]], dtype: DType) -> Vec<ValueId> {
    names
        .iter()
        .zip(dims)
        .map(|(n, d)| {
            let v = g.add_input(n, shape(d), DType::F32).unwrap();
            if dtype == DType::BF16 {
                g.add_op(Op::Cast { dtype }, &[v], "").unwrap()
            } else {
                v
            }
        })
        .collect()
}

/// `op` over inputs x0, x1, ... (values from `ranges`), run on both
/// backends; returns the CPU's and the host device's `y`.
fn op_on_both(op: Op, dims: &[&[usize]], ranges: &[(f32, f32)], dtype: DType, training: bool) -> (Tensor, Tensor) {
    let names: Vec<String> = (0..dims.len()).map(|i| format!("x{i}")).collect();
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let mut g = Graph::new();
    let ids = inputs_as(&mut g, &refs, dims, dtype);
    let y = g.add_op(op, &ids, "test").unwrap_or_else(|e| panic!("{e}"));
    g.set_output("y", y);
    let feed: Vec<(&str, Tensor)> =
        (0..dims.len()).map(|i| (refs[i], values(dims[i], i as u32 + 1, ranges[i].0, ranges[i].1, dtype))).collect();
    let (mut cpu, mut gpu) = pair(plan_of(&g, training));
    let (a, b) = (run(&mut cpu, &feed, "cpu"), run(&mut gpu, &feed, "cuda-host"));
    (a["y"].clone(), b["y"].clone())
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        BF16_TOL
    } else {
        F32_TOL
    }
}

#[test]
fn batch_norm_matches_the_cpu_in_training_and_eval() {
    for dims in [&[6usize, 5][..], &[3, 4, 5, 7], &[40, 3]] {
        let c = dims[1];
        let all: [&[usize]; 5] = [dims, &[c], &[c], &[c], &[c]];
        // x off centre, so that the mean matters; a positive running variance.
        let ranges = [(-0.5, 2.0), (0.5, 1.5), (-1.0, 1.0), (-0.5, 0.5), (0.25, 2.0)];
        for dtype in [DType::F32, DType::BF16] {
            for training in [true, false] {
                let op = Op::BatchNorm { eps: 1e-5, momentum: 0.1 };
                let (a, b) = op_on_both(op, &all, &ranges, dtype, training);
                let what = format!("batch_norm {dims:?} {dtype} training={training}");
                assert_close(&what, &a, &b, tol(dtype));
                // Standardised per channel in training: the result is not x.
                assert!(a.as_f32().unwrap().iter().any(|v| v.abs() > 0.1), "{what}: a trivial result");
            }
        }
    }
}

#[test]
fn batch_standardize_and_its_gradient_match_the_cpu() {
    for dims in [&[8usize, 3][..], &[2, 3, 4, 5], &[1, 6, 3, 3]] {
        for dtype in [DType::F32, DType::BF16] {
            let (a, b) = op_on_both(Op::BatchStandardize { eps: 1e-5 }, &[dims], &[(0.0, 3.0)], dtype, true);
            assert_close(&format!("batch_standardize {dims:?} {dtype}"), &a, &b, tol(dtype));
            let ranges = [(-1.0, 1.0), (-2.0, 1.0)];
            let (a, b) = op_on_both(Op::BatchStandardizeGrad { eps: 1e-5 }, &[dims, dims], &ranges, dtype, true);
            assert_close(&format!("batch_standardize_grad {dims:?} {dtype}"), &a, &b, tol(dtype));
        }
    }
}

#[test]
fn running_stat_matches_the_cpu() {
    // [1, 3]: one element per channel, where the unbiased variance is NaN.
    for dims in [&[5usize, 4][..], &[2, 3, 4, 4], &[1, 3]] {
        let c = dims[1];
        for dtype in [DType::F32, DType::BF16] {
            for unbiased_var in [false, true] {
                let op = Op::RunningStat { momentum: 0.1, unbiased_var };
                let (a, b) = op_on_both(op, &[&[c], dims], &[(0.0, 1.0), (-1.0, 3.0)], dtype, true);
                let what = format!("running_stat {dims:?} {dtype} unbiased_var={unbiased_var}");
                assert_close(&what, &a, &b, tol(dtype));
                let nan = a.as_f32().unwrap().iter().any(|v| v.is_nan());
                assert_eq!(nan, unbiased_var && dims[0] == 1, "{what}: NaN where PyTorch gives NaN");
            }
        }
    }
}

/// batch_norm with running statistics as buffers updated by running_stat
/// (what the training step makes), over three steps: outputs and buffers.
#[test]
fn batch_norm_with_running_statistics_over_steps_matches_the_cpu() {
    for (dims, dtype) in [(&[6usize, 4, 3, 2][..], DType::F32), (&[10, 8][..], DType::BF16)] {
        let c = dims[1];
        let mut g = Graph::new();
        let ty = TensorType::new(shape(&[c]), dtype);
        let w = g.add_param("bn.weight", ty.clone(), Init::Normal { std: 1.0 }, true, "bn").unwrap();
        let b = g.add_param("bn.bias", ty.clone(), Init::Normal { std: 1.0 }, true, "bn").unwrap();
        let rm = g.add_buffer("bn.running_mean", ty.clone(), Init::Zeros, "bn").unwrap();
        let rv = g.add_buffer("bn.running_var", ty, Init::Ones, "bn").unwrap();
        let x = inputs_as(&mut g, &["x"], &[dims], dtype)[0];
        let y = g.add_op(Op::BatchNorm { eps: 1e-5, momentum: 0.1 }, &[x, w, b, rm, rv], "bn").unwrap();
        let new_mean = g.add_op(Op::RunningStat { momentum: 0.1, unbiased_var: false }, &[rm, x], "bn").unwrap();
        let new_var = g.add_op(Op::RunningStat { momentum: 0.1, unbiased_var: true }, &[rv, x], "bn").unwrap();
        g.set_output("y", y);
        g.add_state_update("bn.running_mean", new_mean);
        g.add_state_update("bn.running_var", new_var);
        let (mut cpu, mut gpu) = pair(plan_of(&g, true));
        // The CPU keeps bf16 state unrounded: both start from values bf16 holds.
        for (i, name) in ["bn.weight", "bn.bias"].into_iter().enumerate() {
            let t = values(&[c], 30 + i as u32, -1.0, 1.5, dtype);
            cpu.write_state(name, t.clone()).unwrap();
            gpu.write_state(name, t).unwrap();
        }
        for step in 0..3u32 {
            let feed = [("x", values(dims, 20 + step, -1.0, 2.0, dtype))];
            let (a, b) = (run(&mut cpu, &feed, "cpu"), run(&mut gpu, &feed, "cuda-host"));
            assert_close(&format!("y at step {step}"), &a["y"], &b["y"], tol(dtype));
            for name in ["bn.running_mean", "bn.running_var"] {
                let (sa, sb) = (cpu.read_state(name).unwrap().unwrap(), gpu.read_state(name).unwrap().unwrap());
                assert_close(&format!("{name} after step {step}"), &sa, &sb, tol(dtype));
            }
        }
        // The buffers moved from their initial zeros and ones.
        let mean = cpu.read_state("bn.running_mean").unwrap().unwrap();
        assert!(mean.as_f32().unwrap().iter().all(|&v| v != 0.0), "running mean not updated");
    }
}

/// MoCo's queue over steps: push N keys at the device-side pointer, then
/// advance it; K = 10 and N = 4 wrap around at steps 2 and 4.
#[test]
fn queue_push_and_advance_match_the_cpu_with_wrap_around() {
    let (e, len, n) = (3usize, 10usize, 4usize);
    for dtype in [DType::F32, DType::BF16] {
        let mut g = Graph::new();
        // The CPU keeps bf16 state unrounded: a bf16 queue starts from a value bf16 holds.
        let init = if dtype == DType::BF16 { Init::Constant(0.375) } else { Init::Normal { std: 1.0 } };
        let queue = g.add_buffer("queue", TensorType::new(shape(&[e, len]), dtype), init, "").unwrap();
        let ptr = g.add_buffer("queue_ptr", TensorType::new(shape(&[]), DType::I64), Init::Zeros, "").unwrap();
        let keys = inputs_as(&mut g, &["keys"], &[&[n, e]], dtype)[0];
        let pushed = g.add_op(Op::QueuePush { world: 1 }, &[queue, ptr, keys], "").unwrap();
        let next = g.add_op(Op::QueueAdvance { world: 1 }, &[ptr, keys, queue], "").unwrap();
        g.set_output("queue", pushed);
        g.set_output("ptr", next);
        g.add_state_update("queue", pushed);
        g.add_state_update("queue_ptr", next);
        let (mut cpu, mut gpu) = pair(plan_of(&g, true));
        let mut at = 0usize;
        for step in 0..5u32 {
            let k = values(&[n, e], 40 + step, -1.0, 1.0, dtype);
            let feed = [("keys", k.clone())];
            let (a, b) = (run(&mut cpu, &feed, "cpu"), run(&mut gpu, &feed, "cuda-host"));
            let what = format!("{dtype} step {step}");
            assert_close(&format!("queue, {what}"), &a["queue"], &b["queue"], 0.0);
            assert_close(&format!("ptr, {what}"), &a["ptr"], &b["ptr"], 0.0);
            for name in ["queue", "queue_ptr"] {
                let (sa, sb) = (cpu.read_state(name).unwrap().unwrap(), gpu.read_state(name).unwrap().unwrap());
                assert_close(&format!("state {name}, {what}"), &sa, &sb, 0.0);
            }
            // Key i sits in column (at + i) mod K of the pushed queue.
            let (q, kd) = (b["queue"].as_f32().unwrap(), k.as_f32().unwrap());
            for i in 0..n {
                for d in 0..e {
                    assert_eq!(q[d * len + (at + i) % len], kd[i * e + d], "{what}: key {i}, dim {d}");
                }
            }
            at = (at + n) % len;
            assert_eq!(b["ptr"].as_i64().unwrap(), &[at as i64], "{what}");
        }
    }
}

/// queue_push of a plan for several ranks builds, and refuses to run
/// without the run's collective (tests/distributed.rs runs MoCo's across
/// processes).
#[test]
fn queue_ops_over_several_ranks_need_the_runs_collective() {
    let mut g = Graph::new();
    let queue = g.add_input("queue", shape(&[3, 8]), DType::F32).unwrap();
    let ptr = g.add_input("ptr", shape(&[]), DType::I64).unwrap();
    let keys = g.add_input("keys", shape(&[2, 3]), DType::F32).unwrap();
    let pushed = g.add_op(Op::QueuePush { world: 2 }, &[queue, ptr, keys], "").unwrap();
    g.set_output("queue", pushed);
    let e = refused(plan_of(&g, true));
    assert!(e.contains("one rank of 2") && e.contains("collective"), "{e}");
    let mut g = Graph::new();
    let queue = g.add_input("queue", shape(&[3, 8]), DType::F32).unwrap();
    let ptr = g.add_input("ptr", shape(&[]), DType::I64).unwrap();
    let keys = g.add_input("keys", shape(&[2, 3]), DType::F32).unwrap();
    let next = g.add_op(Op::QueueAdvance { world: 2 }, &[ptr, keys, queue], "").unwrap();
    g.set_output("ptr", next);
    // Moving the pointer is arithmetic (by N x world), as on the CPU.
    let mut ex = host_executor(plan_of(&g, true)).unwrap();
    let given = [
        ("queue", Tensor::f32(vec![3, 8], vec![0.0; 24])),
        ("ptr", Tensor::scalar_i64(1)),
        ("keys", Tensor::f32(vec![2, 3], vec![0.0; 6])),
    ];
    let out = ex.run(&given, None).unwrap();
    assert_eq!(out["ptr"].as_i64().unwrap(), &[5]);
}

/// The error of running `plan` on the host device with zero inputs.
fn refused(plan: Plan) -> String {
    let inputs: Vec<(String, Tensor)> = plan
        .values
        .iter()
        .filter_map(|v| match &v.source {
            tessera_compiler::plan::Source::Input { name } => {
                let shape: Vec<usize> = v.shape.iter().map(|&d| d as usize).collect();
                Some((name.clone(), Tensor::full(shape, v.dtype, 0.0)))
            }
            _ => None,
        })
        .collect();
    let given: Vec<(&str, Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let mut ex = host_executor(plan).unwrap_or_else(|e| panic!("{e}"));
    ex.run(&given, None).err().expect("ran without the run's collective").to_string()
}

/// The same plan twice on the host device (two executors, and one executor
/// stepping twice from the same state): bitwise equal results.
#[test]
fn batch_statistics_are_bitwise_deterministic() {
    let dims = [24usize, 70, 3, 5];
    let c = dims[1];
    let mut g = Graph::new();
    let ids = inputs_as(&mut g, &["x", "g", "w", "b", "rm", "rv"], &[&dims, &dims, &[c], &[c], &[c], &[c]], DType::F32);
    let (x, gr) = (ids[0], ids[1]);
    let bn = g.add_op(Op::BatchNorm { eps: 1e-5, momentum: 0.1 }, &[x, ids[2], ids[3], ids[4], ids[5]], "").unwrap();
    let st = g.add_op(Op::BatchStandardize { eps: 1e-5 }, &[x], "").unwrap();
    let dx = g.add_op(Op::BatchStandardizeGrad { eps: 1e-5 }, &[gr, x], "").unwrap();
    let rs = g.add_op(Op::RunningStat { momentum: 0.1, unbiased_var: true }, &[ids[5], x], "").unwrap();
    for (name, v) in [("bn", bn), ("st", st), ("dx", dx), ("rs", rs)] {
        g.set_output(name, v);
    }
    let ranges = [(-1.0, 3.0), (-1.0, 1.0), (0.5, 1.5), (-1.0, 1.0), (-0.5, 0.5), (0.5, 2.0)];
    let names = ["x", "g", "w", "b", "rm", "rv"];
    let all_dims: [&[usize]; 6] = [&dims, &dims, &[c], &[c], &[c], &[c]];
    let feed: Vec<(&str, Tensor)> =
        (0..6).map(|i| (names[i], values(all_dims[i], 60 + i as u32, ranges[i].0, ranges[i].1, DType::F32))).collect();
    let plan = plan_of(&g, true);
    let mut first = host_executor(plan.clone()).unwrap();
    let mut second = host_executor(plan).unwrap();
    let a = run(&mut first, &feed, "first");
    let b = run(&mut second, &feed, "second");
    let again = run(&mut first, &feed, "first, again");
    let bits = |t: &Tensor| t.as_f32().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    for name in ["bn", "st", "dx", "rs"] {
        assert_eq!(bits(&a[name]), bits(&b[name]), "{name}: two executors differ");
        assert_eq!(bits(&a[name]), bits(&again[name]), "{name}: two steps differ");
    }
}

/// Every kernel these ops render (f32 and bf16, training and eval) compiles
/// with NVRTC for sm_90, as a GPU would load it (no GPU needed).
#[test]
fn the_kernels_compile_with_nvrtc_for_sm_90() {
    use tessera_runtime::cuda::device::{DevPtr, Target};
    use tessera_runtime::cuda::{arena, lower::Lowering, nvrtc};
    let families = ["batch_norm_", "batch_standardize_", "batch_standardize_grad_", "running_stat_", "queue_"];
    let mut compiled = std::collections::BTreeSet::new();
    for dtype in [DType::F32, DType::BF16] {
        for training in [true, false] {
            let (dims, c) = ([4usize, 6, 3, 3], 6usize);
            let mut g = Graph::new();
            let names = ["x", "g", "w", "b", "rm", "rv", "queue", "keys"];
            let all: [&[usize]; 8] = [&dims, &dims, &[c], &[c], &[c], &[c], &[5, 16], &[4, 5]];
            let v = inputs_as(&mut g, &names, &all, dtype);
            let ptr = g.add_input("ptr", shape(&[]), DType::I64).unwrap();
            let ops = [
                (Op::BatchNorm { eps: 1e-5, momentum: 0.1 }, vec![v[0], v[2], v[3], v[4], v[5]]),
                (Op::BatchStandardize { eps: 1e-5 }, vec![v[0]]),
                (Op::BatchStandardizeGrad { eps: 1e-5 }, vec![v[1], v[0]]),
                (Op::RunningStat { momentum: 0.1, unbiased_var: false }, vec![v[4], v[0]]),
                (Op::RunningStat { momentum: 0.1, unbiased_var: true }, vec![v[5], v[0]]),
                (Op::QueuePush { world: 1 }, vec![v[6], ptr, v[7]]),
                (Op::QueueAdvance { world: 1 }, vec![ptr, v[7], v[6]]),
            ];
            for (i, (op, xs)) in ops.into_iter().enumerate() {
                let y = g.add_op(op, &xs, "").unwrap();
                g.set_output(&format!("y{i}"), y);
            }
            let plan = plan_of(&g, training);
            let memory = plan.memory.clone().unwrap();
            let slots: Vec<(usize, DevPtr)> = arena::inline_constants(&plan, &memory)
                .into_iter()
                .enumerate()
                .map(|(i, v)| (v, DevPtr(0x1000 + 8 * i as u64)))
                .collect();
            let base = DevPtr(1 << 32);
            let addr = arena::addresses(&plan, &memory, base, &slots);
            let mut l = Lowering::new(&plan, &memory, &addr, base, DevPtr(0x1000));
            l.lower_all().unwrap_or_else(|e| panic!("lowering: {e}"));
            for s in l.sources.iter().filter(|s| families.iter().any(|f| s.name.starts_with(f))) {
                if compiled.insert(s.name.clone()) {
                    let unit = s.unit(&Target::Nvrtc { sm: 90 });
                    let out = nvrtc::compile(&unit, &s.name, "sm_90").unwrap_or_else(|e| panic!("{e}"));
                    assert!(!out.cubin.is_empty(), "{}: no CUBIN", s.name);
                }
            }
        }
    }
    // batch_norm (training, eval) x 2 dtypes, standardize, grad and
    // running_stat (biased, unbiased) x 2, queue push and advance x 2 (advance shared).
    assert!(compiled.len() >= 15, "only {} kernels: {compiled:?}", compiled.len());
}

/// Synchronised batch norm (SyncBatchNorm over a group of 2 ranks): two
/// host-device executors, each with half the batch and joined in a TCP
/// ring, give the rows one process with the whole batch gives on the CPU
/// (batch_norm, the gradient of batch_standardize and the unbiased running
/// variance, whose statistics are the group's; the f64 sums travel between
/// the kernels' passes).
#[test]
fn synchronised_batch_norm_over_two_ranks_matches_one_process_with_both_batches() {
    use std::sync::Arc;
    use std::time::Duration;
    use tessera_runtime::dist::{RingCollective, StoreClient, StoreServer};
    let (n, c, hw) = (6usize, 3usize, [2usize, 3]);
    let dims = |n: usize| vec![n, c, hw[0], hw[1]];
    // The step of `n` samples; with `world` 2 a collective marks it a
    // data-parallel plan, and its batch norms are synchronised.
    let build = |n: usize, world: u64| -> Plan {
        let mut g = Graph::new();
        let x = g.add_input("x", shape(&dims(n)), DType::F32).unwrap();
        let gr = g.add_input("g", shape(&dims(n)), DType::F32).unwrap();
        let cs: Vec<ValueId> =
            ["w", "b", "rm", "rv"].iter().map(|k| g.add_input(k, shape(&[c]), DType::F32).unwrap()).collect();
        let y = g.add_op(Op::BatchNorm { eps: 1e-5, momentum: 0.1 }, &[x, cs[0], cs[1], cs[2], cs[3]], "").unwrap();
        let dx = g.add_op(Op::BatchStandardizeGrad { eps: 1e-5 }, &[gr, x], "").unwrap();
        let var = g.add_op(Op::RunningStat { momentum: 0.1, unbiased_var: true }, &[cs[3], x], "").unwrap();
        let mean = g.add_op(Op::RunningStat { momentum: 0.1, unbiased_var: false }, &[cs[2], x], "").unwrap();
        for (name, v) in [("y", y), ("dx", dx), ("var", var), ("mean", mean)] {
            g.set_output(name, v);
        }
        if world > 1 {
            let sum = g.add_op(Op::AllReduce { op: tessera_compiler::ir::ReduceOp::Sum, world }, &[cs[0]], "").unwrap();
            g.set_output("w_sum", sum);
        }
        let mut plan = tessera_compiler::plan::lower(&g, 1, true).unwrap_or_else(|e| panic!("{e}"));
        plan.sync_batch_norm = if world > 1 { 2 } else { 0 };
        plan.memory = Some(tessera_compiler::memory::plan_memory(&plan));
        plan
    };
    let x = values(&dims(n), 1, -0.5, 2.0, DType::F32);
    let gr = values(&dims(n), 2, -1.0, 1.0, DType::F32);
    let per_channel: Vec<Tensor> = (0..4).map(|i| values(&[c], 3 + i, 0.25, 1.5, DType::F32)).collect();
    let feed = |x: Tensor, gr: Tensor| -> Vec<(&'static str, Tensor)> {
        let mut f = vec![("x", x), ("g", gr)];
        f.extend(["w", "b", "rm", "rv"].into_iter().zip(per_channel.iter().cloned()));
        f
    };
    let whole = {
        let mut cpu = Backend::Cpu.executor(build(n, 1), 7).unwrap();
        let f = feed(x.clone(), gr.clone());
        let given: Vec<(&str, Tensor)> = f.iter().map(|(k, t)| (*k, t.clone())).collect();
        run(&mut cpu, &given, "cpu, whole batch")
    };
    let half = |t: &Tensor, r: usize| {
        let per = t.as_f32().unwrap().len() / 2;
        Tensor::f32(dims(n / 2), t.as_f32().unwrap()[r * per..][..per].to_vec())
    };
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let addr = format!("127.0.0.1:{}", server.port());
    let ranks: Vec<BTreeMap<String, Tensor>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                let (addr, x, gr, feed, build, half) = (addr.clone(), &x, &gr, &feed, &build, &half);
                s.spawn(move || {
                    let store = StoreClient::connect(&addr, Duration::from_secs(20)).unwrap();
                    let ring = RingCollective::join(&store, "bn", r, 2, Duration::from_secs(20)).unwrap();
                    let mut ex = host_executor(build(n / 2, 2)).unwrap_or_else(|e| panic!("{e}"));
                    ex.set_collective(Arc::new(ring)).unwrap();
                    let f = feed(half(x, r), half(gr, r));
                    let given: Vec<(&str, Tensor)> = f.iter().map(|(k, t)| (*k, t.clone())).collect();
                    run(&mut ex, &given, &format!("cuda-host rank {r}"))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, got) in ranks.iter().enumerate() {
        for out in ["y", "dx"] {
            assert_close(&format!("{out} rank {r}"), &half(&whole[out], r), &got[out], F32_TOL);
        }
        for out in ["var", "mean"] {
            assert_close(&format!("{out} rank {r}"), &whole[out], &got[out], F32_TOL);
        }
    }
}

/// The run's start on the CUDA executor: every rank takes rank 0's states
/// device to device (NCCL's broadcast on a GPU; the TCP ring here), f32 and
/// bf16 alike; integer states are left alone.
#[test]
fn states_broadcast_from_rank_0_device_to_device() {
    use std::sync::Arc;
    use std::time::Duration;
    use tessera_runtime::dist::{RingCollective, StoreClient, StoreServer};
    let build = || -> Plan {
        let mut g = Graph::new();
        let w =
            g.add_param("w", TensorType::new(shape(&[5, 3]), DType::F32), Init::Normal { std: 1.0 }, true, "").unwrap();
        let h =
            g.add_param("h", TensorType::new(shape(&[4]), DType::BF16), Init::Normal { std: 1.0 }, true, "").unwrap();
        let x = g.add_input("x", shape(&[3]), DType::F32).unwrap();
        let s = g.add_op(Op::AllReduce { op: tessera_compiler::ir::ReduceOp::Sum, world: 2 }, &[x], "").unwrap();
        g.set_output("w", w);
        g.set_output("h", h);
        g.set_output("s", s);
        plan_of(&g, true)
    };
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let addr = format!("127.0.0.1:{}", server.port());
    let got: Vec<(Tensor, Tensor, Tensor, Tensor)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                let (addr, build) = (addr.clone(), &build);
                s.spawn(move || {
                    let store = StoreClient::connect(&addr, Duration::from_secs(20)).unwrap();
                    let ring = RingCollective::join(&store, "states", r, 2, Duration::from_secs(20)).unwrap();
                    let _one_at_a_time = BUILD.lock().unwrap_or_else(|p| p.into_inner());
                    // Another seed per rank: different initial weights.
                    let mut ex = host().executor(build(), 7 + r as u64).unwrap_or_else(|e| panic!("{e}"));
                    drop(_one_at_a_time);
                    let ring: Arc<dyn tessera_runtime::dist::Collective> = Arc::new(ring);
                    ex.set_collective(ring.clone()).unwrap();
                    let before = (ex.read_state("w").unwrap().unwrap(), ex.read_state("h").unwrap().unwrap());
                    ex.broadcast_states(&["w".into(), "h".into(), "absent".into()], ring.as_ref()).unwrap();
                    let after = (ex.read_state("w").unwrap().unwrap(), ex.read_state("h").unwrap().unwrap());
                    (before.0, before.1, after.0, after.1)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let v = |t: &Tensor| t.as_f32().unwrap().to_vec();
    assert_ne!(v(&got[0].0), v(&got[1].0), "the ranks started alike: nothing to broadcast");
    for (r, (_, _, w, h)) in got.iter().enumerate() {
        assert_eq!(v(w), v(&got[0].0), "rank {r}: w");
        assert_eq!(v(h), v(&got[0].1), "rank {r}: h (bf16)");
    }
}
