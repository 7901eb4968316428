//! The launch list of a data-parallel step (`cuda/overlap.rs`): gradient
//! all-reduces in place in the gradient region, merged into buckets of at
//! most DATA.DDP_BUCKET_CAP_MB over adjacent gradients, each started on
//! the communication stream as soon as its last gradient is made and joined
//! just before the first step that reads its gradients; between a
//! collective and its join no step touches what it reads or writes. Checked
//! on the lists lowered on paper (no device), by value: which plan values
//! each bucket covers, and which kernels read or write them.

use std::collections::{BTreeSet, HashMap};
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::training_plan_for;
use tessera_compiler::plan::{Plan, Source, Target};
use tessera_plan::memory::Region;
use tessera_plan::GRADIENT_ALL_REDUCE_SCOPE;
use tessera_runtime::cuda::device::DevPtr;
use tessera_runtime::cuda::lower::{launch_list, Step};

fn plan(name: &str, extra: &[&str]) -> Plan {
    let prog = Program::load(&[]).unwrap();
    let mut o = vec!["DISTRIBUTED.NUM_PROC_PER_NODE=2".to_string()];
    o.extend(extra.iter().map(|s| s.to_string()));
    let cfg = config::load(name, &o).unwrap_or_else(|e| panic!("{e}"));
    training_plan_for(&prog, cfg.tree(), 4, Target::Cuda).unwrap_or_else(|e| panic!("{e}")).0
}

/// The values each kernel reads or writes (operands, result, parts).
fn touched(plan: &Plan) -> Vec<BTreeSet<usize>> {
    let mut t: Vec<BTreeSet<usize>> =
        plan.kernels.iter().map(|k| k.inputs.iter().copied().chain([k.output]).collect()).collect();
    for (v, value) in plan.values.iter().enumerate() {
        if let Source::Part { kernel, .. } = value.source {
            t[kernel].insert(v);
        }
    }
    t
}

struct Checked {
    gradients: usize,
    buckets: Vec<usize>,
    /// Steps run between each gradient bucket and its join.
    overlapped: Vec<usize>,
}

/// Checks the list of `plan` and reports its buckets.
fn check(plan: &Plan, cap: u64) -> Checked {
    let (steps, addr, _) = launch_list(plan).unwrap_or_else(|e| panic!("{e}"));
    let touched = touched(plan);
    let memory = plan.memory.as_ref().unwrap();
    // The gradient all-reduces: in place in the gradient region.
    let gradients: Vec<usize> = (0..plan.kernels.len())
        .filter(|&k| plan.kernels[k].scope == GRADIENT_ALL_REDUCE_SCOPE)
        .map(|k| plan.kernels[k].output)
        .collect();
    for &g in &gradients {
        let k = plan.kernels.iter().position(|k| k.output == g).unwrap();
        let d = plan.kernels[k].inputs[0];
        assert_eq!(memory.placements[g].region, Region::Grads);
        assert_eq!(addr[d], addr[g], "the gradient of kernel {k} is not made in its slot");
    }
    let bytes = |v: usize| plan.values[v].numel() * plan.values[v].dtype.size_bytes();
    let mut covered: HashMap<usize, usize> = HashMap::new();
    let mut checked = Checked { gradients: gradients.len(), buckets: vec![], overlapped: vec![] };
    for (i, s) in steps.iter().enumerate() {
        let Step::Collective { kernel, step, slot } = s else { continue };
        let waits: Vec<usize> = (i + 1..steps.len())
            .filter(|&j| matches!(steps[j], Step::WaitCollective { slot: w, .. } if w == *slot))
            .collect();
        assert_eq!(waits.len(), 1, "collective slot {slot} is joined {} times", waits.len());
        let join = waits[0];
        // The values it reads or writes.
        let values: BTreeSet<usize> = if plan.kernels[*kernel].scope == GRADIENT_ALL_REDUCE_SCOPE {
            let (lo, hi) = (step.dst.0, step.dst.0 + step.count * 4);
            let members: Vec<usize> = gradients
                .iter()
                .copied()
                .filter(|&g| addr[g].is_some_and(|DevPtr(a)| a >= lo && a + bytes(g) <= hi))
                .collect();
            assert!(!members.is_empty(), "bucket at slot {slot} covers no gradient");
            let total: u64 = members.iter().map(|&g| bytes(g)).sum();
            assert!(members.len() == 1 || step.count * 4 <= cap, "bucket of {total} bytes over the cap {cap}");
            for &g in &members {
                *covered.entry(g).or_default() += 1;
            }
            checked.buckets.push(members.len());
            checked.overlapped.push(join - i - 1);
            // The step after the join needs the gradients (not a later one).
            let after = steps[join + 1..].iter().find(|s| !matches!(s, Step::WaitCollective { .. })).unwrap();
            let ins = &plan.kernels[after.kernel()].inputs;
            assert!(
                members.iter().any(|g| ins.contains(g)),
                "slot {slot} is joined before a step that does not read it"
            );
            let ins: BTreeSet<usize> = members
                .iter()
                .flat_map(|&g| [g, plan.kernels.iter().find(|k| k.output == g).unwrap().inputs[0]])
                .collect();
            ins
        } else {
            // Its kernel's result, and the kernel's own later steps (scratch).
            BTreeSet::from([plan.kernels[*kernel].output])
        };
        for s in &steps[i + 1..join] {
            if matches!(s, Step::Collective { .. } | Step::WaitCollective { .. }) {
                continue;
            }
            let k = s.kernel();
            assert!(k != *kernel, "kernel {k} runs on before its own collective (slot {slot}) joined");
            let hit: Vec<&usize> = touched[k].intersection(&values).collect();
            assert!(hit.is_empty(), "kernel {k} touches {hit:?} while collective slot {slot} is in flight");
        }
    }
    for &g in &gradients {
        assert_eq!(covered.get(&g), Some(&1), "gradient value {g} is in {:?} buckets", covered.get(&g));
    }
    checked
}

#[test]
fn gradient_buckets_start_as_the_backward_makes_them_and_join_where_they_are_read() {
    // DDP's default 25 MB: vit_tiny's few hundred kilobytes of gradients
    // in one bucket, made in place, issued with the last gradient.
    let p = plan("quickstart/vit_tiny", &[]);
    let c = check(&p, 25 << 20);
    assert_eq!(c.buckets.iter().sum::<usize>(), c.gradients);
    assert!(c.buckets.len() < 4, "{:?}", c.buckets);
    // A wider, deeper vit_tiny (about 13 MB of gradients) in 1 MB buckets:
    // many, all but the last overlapping later backward steps.
    let wide = [
        "MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM=256",
        "MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=1024",
        "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=4",
        "MODEL.HEAD.PARAMS=[[mlp, {dims: [256, 4]}]]",
        // The quickstart's top-5 is above these 4 classes.
        "METERS.accuracy_list_meter.topk_values=[1, 4]",
        "DATA.DDP_BUCKET_CAP_MB=1",
    ];
    let p = plan("quickstart/vit_tiny", &wide);
    let c = check(&p, 1 << 20);
    eprintln!("1 MB buckets (gradients each): {:?}; steps overlapped: {:?}", c.buckets, c.overlapped);
    assert!(c.buckets.len() >= 5, "{:?}", c.buckets);
    assert!(c.buckets.iter().any(|&m| m > 1), "no bucket holds two gradients: {:?}", c.buckets);
    let overlapping = c.overlapped.iter().filter(|&&n| n > 0).count();
    assert!(overlapping + 1 >= c.buckets.len(), "steps between bucket and join: {:?}", c.overlapped);
    // SwAV with synchronised batch norm: Sinkhorn's all-reduces, the batch
    // norms' f64 sums and the gradient buckets, all joined in time.
    let p = plan("quickstart/swav_vit_tiny", &["MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=True"]);
    check(&p, 25 << 20);
}
