//! The CPU arena executor (`cpu::ArenaExecutor`: the CPU kernels with every
//! value at its place in the memory plan) against the pooled `CpuExecutor`,
//! which ignores the memory plan: every quickstart model's training plan,
//! for the CPU target, the CUDA target (prologue fusion) and the CUDA
//! target with mixed precision, runs three steps on both with the same
//! seed and inputs, and every output of every step and every state after
//! the steps must agree bitwise: the memory plan's in-place results,
//! aliases and shared arena storage change nothing. (Plans with bf16
//! values too: the arena stores them in two bytes, rounded to nearest even
//! as the GPU does, and the pooled executor holds them as f32 rounded the
//! same way.) Every plan also runs on the arena executor with
//! memory that shares nothing, bitwise equal to the planned memory whatever
//! the dtypes; the plans are checked to contain every kind of sharing the
//! executor must honour (`Sharing`). A memory plan broken on purpose is
//! caught, so these comparisons can fail.

use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::training_plan_for;
use tessera_compiler::plan::{Plan, Source, Target};
use tessera_plan::memory::Region;
use tessera_plan::{DType, Op};
use tessera_runtime::cpu::ArenaExecutor;
use tessera_runtime::philox::Stream;
use tessera_runtime::{Backend, Device, Executor, RuntimeError, Tensor};

const BATCH: u64 = 4;
const STEPS: u64 = 3;
const SEED: u64 = 7;

fn quickstart_models() -> Vec<String> {
    config::embedded_config_names().into_iter().filter(|n| n.starts_with("quickstart/")).collect()
}

fn plan_of(prog: &Program, name: &str, target: Target, overrides: &[&str]) -> Plan {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = config::load(name, &ov).unwrap_or_else(|e| panic!("{name}: {e}"));
    training_plan_for(prog, cfg.tree(), BATCH, target).unwrap_or_else(|e| panic!("{name}: {e}")).0
}

fn uniform(shape: &[usize], key: u32, step: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let s = Stream::new(11, step, key);
    (0..n as u64).map(|i| s.uniform_at(i)).collect()
}

/// Inputs of the plan's types for step `step`: images in [-1, 1], labels
/// below the class count, soft targets on the simplex, and the
/// optimizer's and MoCo's scalars at values a run would feed.
fn inputs_for(plan: &Plan, step: u64) -> Vec<(String, Tensor)> {
    let classes = plan.output("output").and_then(|v| plan.values[v].shape.last().copied()).unwrap_or(10).max(1);
    let mut out = Vec::new();
    for (key, v) in plan.values.iter().enumerate() {
        let Source::Input { name } = &v.source else { continue };
        let shape: Vec<usize> = v.shape.iter().map(|&d| d as usize).collect();
        let u = uniform(&shape, key as u32, step);
        let t = match (v.dtype, shape.len()) {
            (DType::I64, _) => {
                Tensor::i64(shape, u.iter().map(|x| (x * classes as f32) as i64 % classes as i64).collect())
            }
            (_, 0) => Tensor::scalar_f32(scalar(name, step)),
            (_, 2) if name == "target" => {
                let c = shape[1];
                let rows: Vec<f32> = u
                    .chunks(c)
                    .flat_map(|r| {
                        let sum: f32 = r.iter().sum();
                        r.iter().map(move |x| x / sum).collect::<Vec<_>>()
                    })
                    .collect();
                Tensor::f32(shape, rows)
            }
            _ => Tensor::f32(shape, u.iter().map(|x| 2.0 * x - 1.0).collect()),
        };
        out.push((name.clone(), t));
    }
    out
}

fn scalar(name: &str, step: u64) -> f32 {
    let t = (step + 1) as i32;
    if name.starts_with("optim.lr.") {
        1e-3
    } else if name.starts_with("optim.weight_decay.") {
        0.05
    } else if name.starts_with("optim.bias_correction1") {
        1.0 - 0.9f32.powi(t)
    } else if name.starts_with("optim.bias_correction2") {
        1.0 - 0.999f32.powi(t)
    } else if name == "loss.moco_momentum" {
        0.99
    } else {
        panic!("no test value for scalar input `{name}`")
    }
}

fn feed(inputs: &[(String, Tensor)]) -> Vec<(&str, Tensor)> {
    inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect()
}

/// The first bitwise difference between `a` and `b`, and how many elements differ.
fn difference(a: &Tensor, b: &Tensor) -> Option<String> {
    if a.shape != b.shape {
        return Some(format!("shapes {:?} and {:?}", a.shape, b.shape));
    }
    match (a.as_f32(), b.as_f32()) {
        (Some(x), Some(y)) => {
            let differ = |i: &usize| x[*i].to_bits() != y[*i].to_bits();
            let first = (0..x.len()).find(differ)?;
            let count = (0..x.len()).filter(differ).count();
            Some(format!("element {first}: {} vs {} ({count} of {} elements differ)", x[first], y[first], x.len()))
        }
        _ => (a.as_i64() != b.as_i64()).then(|| format!("i64 values {:?} vs {:?}", a.as_i64(), b.as_i64())),
    }
}

/// `plan` with a memory plan that shares nothing: every kernel result,
/// part and non-scalar fill outside the gradient region gets storage of
/// its own in the arena for the whole step (no in-place results, no
/// aliases, no result over its state: state updates are copied at the
/// end). The arena executor on it stores values exactly as on the planned
/// memory, so the two agree bitwise whatever the dtypes, unless the memory
/// plan's sharing is wrong.
fn unshared(plan: &Plan) -> Plan {
    use tessera_plan::memory::{align, Block, Placement};
    let mut plan = plan.clone();
    let mut m = plan.memory.take().unwrap();
    let end = plan.kernels.len();
    let mut at = 0;
    m.blocks.clear();
    for (v, value) in plan.values.iter().enumerate() {
        let p = &m.placements[v];
        let own = match value.source {
            Source::Kernel(_) | Source::Part { .. } => p.region != Region::Grads && p.region != Region::Inline,
            Source::Fill { .. } => p.region != Region::Inline,
            _ => false,
        };
        if own {
            let bytes = value.numel() * value.dtype.size_bytes();
            m.placements[v] = Placement { region: Region::Arena, offset: at, bytes };
            m.blocks.push(Block {
                offset: at,
                bytes: align(bytes),
                first: 0,
                last: end,
                kept_for_backward: false,
                value: v,
            });
            at += align(bytes);
        }
    }
    let p = &mut m.parts;
    m.arena_bytes = at;
    m.lower_bound_bytes = at;
    m.in_place = 0;
    p.activations_kept = 0;
    p.transient = at;
    m.peak_bytes = p.parameters + p.gradients + p.optimizer_state + p.buffers + p.inputs + at + p.workspace;
    plan.memory = Some(m);
    plan
}

fn largest_difference(a: &Tensor, b: &Tensor) -> f64 {
    match (a.as_f32(), b.as_f32()) {
        (Some(x), Some(y)) => {
            x.iter().zip(y).map(|(p, q)| (*p as f64 - *q as f64).abs() / (1.0 + (*p as f64).abs())).fold(0.0, f64::max)
        }
        _ => 0.0,
    }
}

/// What two executors did differently over `STEPS` steps of a plan.
struct Comparison {
    /// Each output or state that differs, with its first difference.
    mismatches: Vec<String>,
    /// The largest relative difference of the loss, of the states and of anything.
    loss: f64,
    states: f64,
    largest: f64,
}

/// Runs `STEPS` steps on `a` and `b` (plans of the same model, the same
/// seed) with the same inputs and compares every output of every step and
/// every state after the steps, bitwise.
fn compare(what: &str, mut a: Executor, mut b: Executor) -> Comparison {
    let plan = a.plan().clone();
    let mut c = Comparison { mismatches: Vec::new(), loss: 0.0, states: 0.0, largest: 0.0 };
    let check = |c: &mut Comparison, name: String, x: &Tensor, y: &Tensor| {
        let d = largest_difference(x, y);
        c.largest = c.largest.max(d);
        if name.ends_with("`loss`") {
            c.loss = c.loss.max(d);
        }
        if name.starts_with("state") {
            c.states = c.states.max(d);
        }
        if let Some(d) = difference(x, y) {
            c.mismatches.push(format!("{what}: {name}: {d}"));
        }
    };
    for step in 0..STEPS {
        let inputs = inputs_for(&plan, step);
        let x = a.run(&feed(&inputs), None).unwrap_or_else(|e| panic!("{what}: step {step}: {e}"));
        let y = b.run(&feed(&inputs), None).unwrap_or_else(|e| panic!("{what}: step {step}: {e}"));
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{what}: output names");
        for (name, t) in &x {
            check(&mut c, format!("step {step} output `{name}`"), t, &y[name]);
        }
    }
    assert_eq!(a.state_names(), b.state_names(), "{what}: state names");
    for name in a.state_names() {
        let (x, y) = (a.read_state(&name).unwrap().unwrap(), b.read_state(&name).unwrap().unwrap());
        check(&mut c, format!("state `{name}` after {STEPS} steps"), &x, &y);
    }
    c
}

/// How often each decision of a memory plan that the arena executor must
/// honour occurs: what the parity checks cover.
#[derive(Default, Debug)]
struct Sharing {
    /// Results over an operand (elementwise in place), outside views.
    over_operand: usize,
    /// Reshapes and stop_gradients that alias, and that copy.
    views_aliased: usize,
    views_copied: usize,
    /// Multi-tensor parts and other state updates written over their state.
    parts_over_state: usize,
    updates_over_state: usize,
    /// State updates copied at the end of the step.
    updates_copied: usize,
    /// Non-scalar fills written before their first reader.
    arena_fills: usize,
}

impl Sharing {
    fn add(&mut self, plan: &Plan) {
        let m = plan.memory.as_ref().unwrap();
        let same = |a: usize, b: usize| m.placements[a].region != Region::Inline && m.placements[a] == m.placements[b];
        for k in &plan.kernels {
            if matches!(k.op, Op::Reshape { .. } | Op::StopGradient) {
                *if same(k.output, k.inputs[0]) { &mut self.views_aliased } else { &mut self.views_copied } += 1;
            } else if k.inputs.iter().any(|&i| same(i, k.output)) {
                self.over_operand += 1;
            }
        }
        for (name, v) in &plan.state_updates {
            let part = matches!(plan.values[*v].source, Source::Part { .. });
            match (same(*v, plan.state(name).unwrap()), part) {
                (true, true) => self.parts_over_state += 1,
                (true, false) => self.updates_over_state += 1,
                (false, _) => self.updates_copied += 1,
            }
        }
        let fills = plan.values.iter().enumerate().filter(|(v, value)| {
            matches!(value.source, Source::Fill { .. }) && m.placements[*v].region == Region::Arena
        });
        self.arena_fills += fills.count();
    }

    fn every_kind_occurs(&self) -> bool {
        let s = self;
        [
            s.over_operand,
            s.views_aliased,
            s.views_copied,
            s.parts_over_state,
            s.updates_over_state,
            s.updates_copied,
            s.arena_fills,
        ]
        .iter()
        .all(|&n| n > 0)
    }
}

fn executor(backend: Backend, plan: &Plan) -> Executor {
    backend.executor(plan.clone(), SEED).unwrap_or_else(|e| panic!("{e}"))
}

/// Every quickstart model under `target` and `overrides`. The arena
/// executor on the planned memory agrees bitwise with the arena executor
/// on memory that shares nothing (the memory plan's decisions change
/// nothing), and with the pooled executor, bitwise. Panics listing every
/// disagreement.
fn every_model(target: Target, overrides: &[&str], expect_bf16: bool) {
    let prog = Program::load(&[]).unwrap();
    let mut bad = Vec::new();
    let arena = |p: &Plan| executor(Backend::CpuArena, p);
    let pooled = |p: &Plan| executor(Backend::Cpu, p);
    let mut sharing = Sharing::default();
    for name in quickstart_models() {
        let plan = plan_of(&prog, &name, target, overrides);
        sharing.add(&plan);
        let has_bf16 = plan.values.iter().any(|v| v.dtype == DType::BF16);
        assert_eq!(has_bf16, expect_bf16, "{name} ({target}, {overrides:?}): bf16 values");
        let memory = plan.memory.as_ref().unwrap();
        assert!(memory.in_place > 0, "{name}: the memory plan writes something in place");
        let t = std::time::Instant::now();
        let what = format!("{name} ({target} {overrides:?})");
        let own = compare(&format!("{what}, unshared vs planned arena"), arena(&unshared(&plan)), arena(&plan));
        bad.extend(own.mismatches.into_iter().take(5));
        let both = compare(&format!("{what}, pooled vs arena"), pooled(&plan), arena(&plan));
        bad.extend(both.mismatches.into_iter().take(5));
        eprintln!(
            "{what}: {} kernels, {} in place; pooled vs arena: loss {:.1e}, states {:.1e}, any {:.1e}; {:.2?}",
            plan.kernels.len(),
            memory.in_place,
            both.loss,
            both.states,
            both.largest,
            t.elapsed()
        );
    }
    eprintln!("{target} {overrides:?}: {sharing:?}");
    assert!(sharing.every_kind_occurs(), "the plans no longer cover every kind of sharing: {sharing:?}");
    assert!(bad.is_empty(), "the executors disagree:\n{}", bad.join("\n"));
}

#[test]
fn every_model_trains_bitwise_alike_on_the_cpu_targets_plan() {
    every_model(Target::Cpu, &[], false);
}

#[test]
fn every_model_trains_bitwise_alike_on_the_cuda_targets_plan() {
    every_model(Target::Cuda, &[], false);
}

#[test]
fn every_model_trains_alike_within_bf16_rounding_with_mixed_precision() {
    every_model(Target::Cuda, &["MODEL.AMP_PARAMS.USE_AMP=true"], true);
}

fn vit_tiny(target: Target) -> Plan {
    plan_of(&Program::load(&[]).unwrap(), "quickstart/vit_tiny", target, &[])
}

/// Two gradients of the same size made to share storage: neither the
/// paper checks (`check`, `simulate`: they look at the arena only) nor the
/// placement bounds see it, but executing the plan does.
#[test]
fn gradients_made_to_overlap_change_the_results() {
    let plan = vit_tiny(Target::Cpu);
    let m = plan.memory.as_ref().unwrap();
    let bytes = |v: usize| m.placements[v].bytes;
    let grads: Vec<usize> = plan.tables.grads.iter().map(|(_, v)| *v).collect();
    let (a, b) = grads
        .iter()
        .enumerate()
        .find_map(|(i, &a)| grads[i + 1..].iter().find(|&&b| bytes(b) == bytes(a)).map(|&b| (a, b)))
        .expect("two gradients of one size");
    let mut broken = plan.clone();
    let bm = broken.memory.as_mut().unwrap();
    assert_eq!(bm.placements[a].region, Region::Grads);
    bm.placements[a].offset = bm.placements[b].offset;
    let bm = broken.memory.as_ref().unwrap();
    bm.check().unwrap();
    bm.simulate(&broken).unwrap();
    let c = compare("overlapping gradients", executor(Backend::Cpu, &plan), executor(Backend::CpuArena, &broken));
    assert!(!c.mismatches.is_empty(), "the broken memory plan went unnoticed");
    eprintln!("overlapping gradients: {} outputs and states differ, e.g. {}", c.mismatches.len(), c.mismatches[0]);
}

/// Two arena values live together at one kernel made to share storage: the
/// executor refuses the plan (its paper check finds the clobbered operand).
#[test]
fn arena_values_made_to_overlap_are_refused() {
    let plan = vit_tiny(Target::Cpu);
    let m = plan.memory.as_ref().unwrap();
    let in_arena =
        |v: &usize| m.placements[*v].region == Region::Arena && matches!(plan.values[*v].source, Source::Kernel(_));
    let (a, b) = plan
        .kernels
        .iter()
        .find_map(|k| {
            let xs: Vec<usize> = k.inputs.iter().copied().filter(in_arena).collect();
            let &[a, b, ..] = &xs[..] else { return None };
            let fits = m.placements[b].offset + m.placements[a].bytes <= m.arena_bytes;
            (m.placements[a].offset != m.placements[b].offset && fits).then_some((a, b))
        })
        .expect("a kernel reading two arena values");
    let mut broken = plan.clone();
    let bm = broken.memory.as_mut().unwrap();
    bm.placements[a].offset = bm.placements[b].offset;
    let e = ArenaExecutor::new(broken, SEED).err().expect("the broken memory plan is refused");
    assert!(matches!(e, RuntimeError::InvalidPlan(_)) && e.to_string().contains("memory plan"), "{e}");
}

/// A placement past the end of its region is an error, not a panic or a
/// write into the next region.
#[test]
fn placements_outside_their_region_are_refused() {
    let plan = vit_tiny(Target::Cpu);
    let v = plan.tables.params[0].1;
    let mut broken = plan.clone();
    let bm = broken.memory.as_mut().unwrap();
    bm.placements[v].offset = bm.parts.parameters;
    let e = ArenaExecutor::new(broken, SEED).err().expect("refused");
    assert!(e.to_string().contains("outside its region"), "{e}");
    let mut unplanned = plan;
    unplanned.memory = None;
    let e = ArenaExecutor::new(unplanned, SEED).err().expect("refused");
    assert!(e.to_string().contains("no memory plan"), "{e}");
}

/// `cpu-arena` through the backend seam: parsing, inputs checked before
/// anything runs, state read, written (type-checked) and handed over, and
/// the outputs a caller asks for.
#[test]
fn cpu_arena_is_a_device_of_the_backend_seam() {
    let device = Device::parse("cpu-arena").unwrap();
    assert_eq!(device, Device::CpuArena);
    assert_eq!(device.to_string(), "cpu-arena");
    let backend = Backend::open(&device).unwrap();
    assert!(backend.describe().starts_with("cpu-arena"));
    let plan = vit_tiny(Target::Cpu);
    let mut a = backend.executor(plan.clone(), SEED).unwrap();
    let inputs = inputs_for(&plan, 0);
    let err = a.run(&feed(&inputs[1..]), None).expect_err("an input is missing");
    assert!(matches!(err, RuntimeError::MissingInput { .. }), "{err}");
    let mut wrong = feed(&inputs);
    wrong[0].1 = Tensor::f32(vec![1], vec![0.0]);
    let err = a.run(&wrong, None).expect_err("an input has the wrong type");
    assert!(matches!(err, RuntimeError::TypeMismatch { .. }), "{err}");
    assert_eq!(a.step(), 0, "a refused run changes nothing");

    let loss_only = |n: &str| n == "loss";
    let out = a.run(&feed(&inputs), Some(&loss_only)).unwrap();
    assert_eq!(out.keys().collect::<Vec<_>>(), ["loss"]);
    assert_eq!(a.step(), 1);

    let name = plan.tables.params[0].0.clone();
    let before = a.read_state(&name).unwrap().unwrap();
    let err = a.write_state(&name, Tensor::f32(vec![1], vec![0.0])).expect_err("wrong type");
    assert!(matches!(err, RuntimeError::TypeMismatch { .. }), "{err}");
    assert!(matches!(a.write_state("no.such.state", before.clone()), Err(RuntimeError::UnknownState { .. })));
    assert!(a.read_state("no.such.state").unwrap().is_none());
    let mut doubled = before.clone();
    doubled.as_f32_mut().unwrap().iter_mut().for_each(|x| *x *= 2.0);
    a.write_state(&name, doubled.clone()).unwrap();
    assert_eq!(a.read_state(&name).unwrap().unwrap(), doubled);

    let mut b = backend.executor(plan.clone(), SEED + 1).unwrap();
    a.move_state_to(&mut b).unwrap();
    for n in a.state_names() {
        assert_eq!(a.read_state(&n).unwrap(), b.read_state(&n).unwrap(), "{n} handed over");
    }
    b.set_step(a.step());
    assert_eq!(b.step(), 1);
}

/// A kernel that fails in the middle of a step (a label that is no class:
/// the optimizer may not have run, but nothing says so) leaves the
/// executor refusing to run, since state may be half updated in place.
#[test]
fn a_kernel_failure_poisons_the_executor() {
    let plan = vit_tiny(Target::Cpu);
    let mut a = Backend::CpuArena.executor(plan.clone(), SEED).unwrap();
    let mut inputs = inputs_for(&plan, 0);
    let target = inputs.iter_mut().find(|(n, _)| n == "target").unwrap();
    target.1 = Tensor::i64(target.1.shape.clone(), vec![1000; target.1.numel()]);
    let err = a.run(&feed(&inputs), None).expect_err("no class 1000");
    assert!(matches!(err, RuntimeError::Kernel { .. }), "{err}");
    let err = a.run(&feed(&inputs_for(&plan, 0)), None).expect_err("poisoned");
    assert!(err.to_string().contains("failed earlier"), "{err}");
    assert_eq!(a.step(), 0);
}
