//! The compiler's entry points from an experiment config to plans: the
//! training step, and the eval-mode forward (optionally with loss and
//! gradients, for checking a port against another framework).

use crate::autodiff::{backward, training_step, StepOptions};
use crate::compose::{compile, CompileError, Compiled};
use crate::elaborate::Program;
use crate::ir::Graph;
use crate::passes;
use crate::plan::{Plan, Target};
use serde_json::Value as J;

/// Called with each pass's name and the graph after it (`--emit ir-after`).
pub type AfterPass<'a> = Box<dyn FnMut(&str, &Graph) + 'a>;

/// Which passes run, which regions are recomputed, and a look at the graph
/// after each pass.
pub struct PassChoice<'a> {
    pub passes: Vec<&'a str>,
    /// Recomputed regions (see `recompute`); `None`: as the config says.
    pub regions: Option<Vec<Vec<String>>>,
    pub after: AfterPass<'a>,
}

impl Default for PassChoice<'_> {
    fn default() -> Self {
        PassChoice { passes: passes::DEFAULT.to_vec(), regions: None, after: Box::new(|_, _| {}) }
    }
}

impl PassChoice<'_> {
    /// The default pipeline for an experiment config (mixed precision when
    /// MODEL.AMP_PARAMS.USE_AMP).
    pub fn for_config(cfg: &J) -> Self {
        PassChoice { passes: passes::default_for(uses_amp(cfg)), regions: None, after: Box::new(|_, _| {}) }
    }

    /// The CPU backend's pipeline (`passes::default_for_cpu`).
    pub fn for_cpu() -> Self {
        PassChoice { passes: passes::default_for_cpu(), regions: None, after: Box::new(|_, _| {}) }
    }

    /// The pipeline of `target`: the CPU's, or the config's GPU pipeline.
    pub fn for_target(cfg: &J, target: Target) -> Self {
        match target {
            Target::Cpu => PassChoice::for_cpu(),
            Target::Cuda => PassChoice::for_config(cfg),
        }
    }

    /// These passes, the config's recomputation, no callback.
    pub fn passes<'b>(names: Vec<&'b str>) -> PassChoice<'b> {
        PassChoice { passes: names, regions: None, after: Box::new(|_, _| {}) }
    }
}

/// DATA.DDP_BUCKET_CAP_MB in bytes: the size of the gradient buckets a
/// data-parallel step sends (DDP's bucket_cap_mb, 25 by default).
pub fn gradient_bucket_bytes(cfg: &J) -> Result<u64, String> {
    match crate::elaborate::json_get(cfg, "DATA.DDP_BUCKET_CAP_MB") {
        None => Ok(25 << 20),
        Some(v) => match v.as_f64() {
            Some(mb) if mb > 0.0 && mb.is_finite() => Ok((mb * (1u64 << 20) as f64) as u64),
            _ => Err(format!("`DATA.DDP_BUCKET_CAP_MB` is {v}; it must be a positive number of megabytes")),
        },
    }
}

/// The ranks each batch norm takes its statistics over (reference 6.6,
/// `convert_sync_bn`): 0 without CONVERT_BN_TO_SYNC_BN or with one process;
/// GROUP_SIZE -1: a node's processes, 0: every rank, N: min(N, world).
pub fn sync_batch_norm_group(cfg: &J) -> Result<u64, String> {
    let get = |k: &str| crate::elaborate::json_get(cfg, k);
    if get("MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN").and_then(|v| v.as_bool()) != Some(true) {
        return Ok(0);
    }
    match get("MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE").and_then(|v| v.as_str()).unwrap_or("pytorch") {
        "pytorch" | "apex" => {}
        other => {
            return Err(format!(
                "`MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE` is `{other}`; use pytorch or apex (the statistics are the same)"
            ))
        }
    }
    let count = |k: &str| get(k).and_then(|v| v.as_u64()).unwrap_or(1);
    let per_node = count("DISTRIBUTED.NUM_PROC_PER_NODE");
    let world = count("DISTRIBUTED.NUM_NODES") * per_node;
    let group = match get("MODEL.SYNC_BN_CONFIG.GROUP_SIZE").and_then(|v| v.as_i64()).unwrap_or(-1) {
        -1 => per_node,
        0 => world,
        n if n > 0 => (n as u64).min(world),
        n => {
            return Err(format!(
                "`MODEL.SYNC_BN_CONFIG.GROUP_SIZE` is {n}; use -1 (a node), 0 (every rank) or a positive size"
            ))
        }
    };
    if !world.is_multiple_of(group) {
        return Err(format!(
            "`MODEL.SYNC_BN_CONFIG.GROUP_SIZE` {group} does not divide the world size {world} into whole groups"
        ));
    }
    Ok(if group > 1 { group } else { 0 })
}

/// MODEL.AMP_PARAMS.USE_AMP.
pub fn uses_amp(cfg: &J) -> bool {
    crate::elaborate::json_get(cfg, "MODEL.AMP_PARAMS.USE_AMP").and_then(|v| v.as_bool()).unwrap_or(false)
}

fn internal(e: impl std::fmt::Display) -> CompileError {
    CompileError::Config(e.to_string())
}

/// The training step (forward, loss, backward, clipping, optimizer update)
/// of the experiment, lowered for `batch` samples per replica and compiled
/// for the CPU backend (`training_plan_for` picks the target).
pub fn training_plan(prog: &Program, cfg: &J, batch: u64) -> Result<(Plan, Compiled), CompileError> {
    training_plan_for(prog, cfg, batch, Target::Cpu)
}

/// The training step compiled with `target`'s pass pipeline, memory planned.
pub fn training_plan_for(
    prog: &Program,
    cfg: &J,
    batch: u64,
    target: Target,
) -> Result<(Plan, Compiled), CompileError> {
    training_plan_with(prog, cfg, batch, PassChoice::for_target(cfg, target)).map(|(p, c, _)| (p, c))
}

/// `training_plan` with a choice of passes; also returns each pass's report.
pub fn training_plan_with(
    prog: &Program,
    cfg: &J,
    batch: u64,
    choice: PassChoice,
) -> Result<(Plan, Compiled, Vec<passes::Report>), CompileError> {
    let (step, c, reports) = training_graph(prog, cfg, choice)?;
    let mut plan = lower_training(&step, batch)?;
    plan.sync_batch_norm = sync_batch_norm_group(cfg).map_err(CompileError::Config)?;
    plan.gradient_bucket_bytes = gradient_bucket_bytes(cfg).map_err(CompileError::Config)?;
    if plan.sync_batch_norm > 1 {
        // The group sums of synchronised batch norm take scratch.
        plan.memory = Some(crate::memory::plan_memory(&plan));
    }
    Ok((plan, c, reports))
}

/// The training-step graph after the chosen passes, still symbolic in the
/// batch (lower it once per batch size with `lower_training`).
pub fn training_graph(
    prog: &Program,
    cfg: &J,
    mut choice: PassChoice,
) -> Result<(Graph, Compiled, Vec<passes::Report>), CompileError> {
    let c = compile(prog, cfg)?;
    let opts = StepOptions::from_config(cfg).map_err(CompileError::Config)?;
    let mut forward = c.graph.clone();
    let (before, after): (Vec<&str>, Vec<&str>) = choice.passes.iter().partition(|p| passes::FORWARD.contains(p));
    let mut reports = passes::run(&mut forward, &before, false, &mut choice.after).map_err(internal)?;
    let mut step = training_step(forward, &c.param_groups, &opts).map_err(internal)?;
    let regions = choice.regions.take().unwrap_or_else(|| crate::recompute::regions_from_config(cfg, &step));
    // Recomputation goes after the cleanup passes: CSE would merge each
    // recomputed op back into the forward op it copies.
    let cleanup = after.iter().take_while(|p| matches!(**p, "dce" | "cse" | "fold")).count();
    reports.extend(passes::run(&mut step, &after[..cleanup], false, &mut choice.after).map_err(internal)?);
    if !regions.is_empty() {
        let nodes_before = step.node_count();
        let r = crate::recompute::recompute(&mut step, &regions, 1).map_err(internal)?;
        reports.push(passes::Report {
            pass: "recompute",
            nodes_before,
            nodes_after: step.node_count(),
            detail: format!(
                "{} regions recomputed in the backward pass ({} ops, {:.3} GFLOPs per sample)",
                r.regions.len(),
                r.recomputed_ops,
                r.extra_flops as f64 / 1e9
            ),
        });
    }
    reports.extend(passes::run(&mut step, &after[cleanup..], false, &mut choice.after).map_err(internal)?);
    Ok((step, c, reports))
}

/// Lowers a training-step graph for `batch` and plans its memory.
pub fn lower_training(step: &Graph, batch: u64) -> Result<Plan, CompileError> {
    let mut plan = crate::plan::lower(step, batch, true).map_err(CompileError::Config)?;
    plan.memory = Some(crate::memory::plan_memory(&plan));
    Ok(plan)
}

/// The largest batch whose planned peak is at most `budget` bytes, and that
/// peak (`(0, None)` if not even batch 1 fits), found by doubling then
/// bisection: peaks grow with the batch. `tessera plan --max-batch` and the
/// trainer's memory check (which names it when a run does not fit) use it.
pub fn max_batch(step: &Graph, budget: u64) -> Result<(u64, Option<u64>), CompileError> {
    let peak = |b: u64| -> Result<u64, CompileError> {
        Ok(lower_training(step, b)?.memory.as_ref().map_or(0, |m| m.peak_bytes))
    };
    if peak(1)? > budget {
        return Ok((0, None));
    }
    let (mut lo, mut hi) = (1u64, 2u64);
    while peak(hi)? <= budget {
        lo = hi;
        hi *= 2;
        if hi > 1 << 24 {
            return Ok((lo, Some(peak(lo)?)));
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if peak(mid)? <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok((lo, Some(peak(lo)?)))
}

/// The eval-mode forward of trunk and heads (outputs `output`, `output.0`,
/// ...). With `with_grads`, also the loss and `grad.<param>` of every
/// trainable parameter, still in eval mode (no dropout, BatchNorm on running
/// statistics) and without any update. For the CPU target (`inference_plan_for`
/// picks one).
pub fn inference_plan(prog: &Program, cfg: &J, batch: u64, with_grads: bool) -> Result<(Plan, Compiled), CompileError> {
    inference_plan_for(prog, cfg, batch, with_grads, Target::Cpu)
}

/// `inference_plan` for `target` (the GPU pipeline adds mixed precision when
/// the config asks for it), memory planned.
pub fn inference_plan_for(
    prog: &Program,
    cfg: &J,
    batch: u64,
    with_grads: bool,
    target: Target,
) -> Result<(Plan, Compiled), CompileError> {
    let c = compile(prog, cfg)?;
    let mut g = c.graph.clone();
    passes::run(&mut g, passes::FORWARD, false, |_, _| {}).map_err(internal)?;
    if with_grads {
        let loss = g.outputs().iter().find(|(n, _)| n == "loss").map(|(_, v)| *v);
        let loss = loss.ok_or_else(|| internal("the model has no loss output"))?;
        for (name, d) in backward(&mut g, loss).map_err(internal)? {
            g.set_output(&format!("grad.{name}"), d);
        }
        g.prune(|n| n.starts_with("output") || n == "loss" || n.starts_with("grad."), false);
    } else {
        g.prune(|n| n.starts_with("output"), false);
    }
    let pipeline = match target {
        Target::Cpu => passes::DEFAULT.to_vec(),
        Target::Cuda => passes::default_for(uses_amp(cfg)),
    };
    passes::run(&mut g, &pipeline, false, |_, _| {}).map_err(internal)?;
    g.verify().map_err(internal)?;
    let mut plan = crate::plan::lower(&g, batch, false).map_err(CompileError::Config)?;
    plan.memory = Some(crate::memory::plan_memory(&plan));
    Ok((plan, c))
}
