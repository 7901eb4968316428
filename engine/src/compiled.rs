//! Compiled runs: everything a training run needs from the compiler, made
//! ahead of time (`tessera compile ... --emit plan`) and run exactly as is
//! (`tessera train ... --plan FILE`): the training step per batch size and
//! stage, and the eval forward per batch size, for one target.
//!
//! A compiled run records what it was made from: the plan format version,
//! the target, and a hash of each config section that shapes the plans
//! (MODEL, LOSS, the optimizer's rules, the data's transforms and collator,
//! DISTRIBUTED). A run refuses a file made from another config, another plan
//! version or another target, and says which.

use crate::stages::Stages;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::{inference_plan_for, training_plan_for};
use tessera_compiler::plan::{Plan, Target, PLAN_VERSION};

pub const FORMAT: &str = "tessera-compiled-run";

/// A training step for one batch size and stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepPlan {
    pub batch: u64,
    /// The stage's id (`Stages::id`) and its first iteration.
    pub stage: usize,
    pub first_iteration: u64,
    pub plan: Plan,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalPlan {
    pub batch: u64,
    pub plan: Plan,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompiledRun {
    pub format: String,
    pub plan_version: u32,
    pub config: String,
    /// Hashes of the config sections that shape the plans, by section.
    pub config_hashes: Vec<(String, String)>,
    pub target: Target,
    pub steps: Vec<StepPlan>,
    pub eval: Vec<EvalPlan>,
}

/// The config sections whose values shape the plans (a change elsewhere,
/// such as CHECKPOINT.DIR or the lr schedule, does not make another plan:
/// learning rates are plan inputs).
const SECTIONS: &[&str] = &[
    "MODEL",
    "LOSS",
    "OPTIMIZER.name",
    "OPTIMIZER.weight_decay",
    "OPTIMIZER.momentum",
    "OPTIMIZER.nesterov",
    "OPTIMIZER.betas",
    "OPTIMIZER.regularize_bn",
    "OPTIMIZER.regularize_bias",
    "OPTIMIZER.non_regularized_parameters",
    "OPTIMIZER.head_optimizer_params",
    "DATA.TRAIN.TRANSFORMS",
    "DATA.TRAIN.COLLATE_FUNCTION",
    "DATA.TRAIN.COLLATE_FUNCTION_PARAMS",
    "DATA.TEST.TRANSFORMS",
    "DISTRIBUTED",
];

fn get<'a>(cfg: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(cfg, |node, k| node.get(k))
}

/// FNV-1a of the section's canonical JSON (serde_json keeps key order, and
/// configs are built in the schema's order).
fn section_hash(cfg: &Value, key: &str) -> String {
    let text = get(cfg, key).map(|v| v.to_string()).unwrap_or_else(|| "null".into());
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn config_hashes(cfg: &Value) -> Vec<(String, String)> {
    SECTIONS.iter().map(|k| (k.to_string(), section_hash(cfg, k))).collect()
}

impl CompiledRun {
    /// Compiles the run of `cfg` (one replica, as the trainer compiles it)
    /// for `target`: the step for each of `batches` and every stage, the
    /// eval forward for each of `eval_batches`.
    pub fn compile(
        prog: &Program,
        name: &str,
        cfg: &Value,
        target: Target,
        batches: &[u64],
        eval_batches: &[u64],
    ) -> Result<CompiledRun, String> {
        let cfg = crate::trainer::one_replica(cfg);
        let stages = Stages::from_config(&cfg).map_err(|e| e.to_string())?;
        let mut steps = Vec::new();
        for &batch in batches {
            for start in stages.starts() {
                let staged = stages.config(&cfg, start);
                let (plan, _) = training_plan_for(prog, &staged, batch, target).map_err(|e| e.to_string())?;
                steps.push(StepPlan { batch, stage: stages.id(start), first_iteration: start, plan });
            }
        }
        let mut eval = Vec::new();
        for &batch in eval_batches {
            let (plan, _) = inference_plan_for(prog, &cfg, batch, false, target).map_err(|e| e.to_string())?;
            eval.push(EvalPlan { batch, plan });
        }
        Ok(CompiledRun {
            format: FORMAT.into(),
            plan_version: PLAN_VERSION,
            config: name.to_string(),
            config_hashes: config_hashes(&cfg),
            target,
            steps,
            eval,
        })
    }

    /// Reads a compiled run: `path` is the file, or a directory holding `run.plan`.
    pub fn read(path: &Path) -> Result<CompiledRun, String> {
        let file = if path.is_dir() { path.join("run.plan") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("{} is not a compiled run (JSON: {e})", file.display()))?;
        if v.get("format").and_then(Value::as_str) != Some(FORMAT) {
            return Err(format!(
                "{} is not a compiled run (made by `tessera compile ... --emit plan`; a single plan has no `format: {FORMAT}`)",
                file.display()
            ));
        }
        let version = v.get("plan_version").and_then(Value::as_u64).unwrap_or(0);
        if version != PLAN_VERSION as u64 {
            return Err(format!(
                "{} holds plans of version {version}; this tessera reads version {PLAN_VERSION}: compile it again",
                file.display()
            ));
        }
        let run: CompiledRun =
            serde_json::from_value(v).map_err(|e| format!("{} is not a valid compiled run: {e}", file.display()))?;
        for s in &run.steps {
            s.plan.validate().map_err(|e| format!("{}: step for batch {}: {e}", file.display(), s.batch))?;
        }
        for s in &run.eval {
            s.plan.validate().map_err(|e| format!("{}: eval for batch {}: {e}", file.display(), s.batch))?;
        }
        Ok(run)
    }

    /// Refuses a run made from another config or for another target.
    pub fn check(&self, cfg: &Value, target: Target) -> Result<(), String> {
        if self.target != target {
            return Err(format!(
                "the compiled run was made for the {} target; this run trains on {} (compile it with --target {})",
                self.target, target, target
            ));
        }
        let ours = config_hashes(&crate::trainer::one_replica(cfg));
        let differ: Vec<&str> =
            ours.iter().zip(&self.config_hashes).filter(|(a, b)| a != b).map(|(a, _)| a.0.as_str()).collect();
        if !differ.is_empty() || ours.len() != self.config_hashes.len() {
            return Err(format!(
                "the compiled run was made from config `{}` with other values of {}: compile it again from this config",
                self.config,
                if differ.is_empty() { "its sections".to_string() } else { differ.join(", ") }
            ));
        }
        Ok(())
    }

    /// The step for `batch` at stage `stage`.
    pub fn step(&self, batch: u64, stage: usize) -> Result<Plan, String> {
        self.steps.iter().find(|s| s.batch == batch && s.stage == stage).map(|s| s.plan.clone()).ok_or_else(|| {
            let have: Vec<String> = self.steps.iter().map(|s| format!("batch {} stage {}", s.batch, s.stage)).collect();
            format!(
                "the compiled run has no training step for batch {batch} at stage {stage} (it has: {}); compile with --batch listing every batch size the run takes (the last batch of an epoch is smaller unless DATA.TRAIN.DROP_LAST)",
                have.join(", ")
            )
        })
    }

    pub fn eval(&self, batch: u64) -> Result<Plan, String> {
        self.eval.iter().find(|s| s.batch == batch).map(|s| s.plan.clone()).ok_or_else(|| {
            let have: Vec<String> = self.eval.iter().map(|s| s.batch.to_string()).collect();
            format!(
                "the compiled run has no eval forward for batch {batch} (it has batches: {}); compile with --eval-batch listing the test phase's batch sizes",
                if have.is_empty() { "none".into() } else { have.join(", ") }
            )
        })
    }
}
