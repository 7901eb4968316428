//! The training loop (reference sections 0, 6 and 8): phases (train, then
//! test when `TEST_MODEL`, every `TEST_EVERY_NUM_EPOCH`), epochs of
//! `OPTIMIZER.num_epochs`, the lr of each param group from its schedule with
//! `where = done / total` before each step, meters, logs and checkpoints.
//!
//! Plans: one training step per batch size (the last batch of an epoch may
//! be smaller without DROP_LAST) and one eval forward per batch size; every
//! executor holds the state by name and the active one's state is copied
//! into the next one used, so they train one model.
//!
//! Determinism: dropout and drop path draw from streams keyed by (seed,
//! step, key), data augmentation from (seed, epoch, sample): a run resumed
//! from a checkpoint computes exactly the steps an uninterrupted run does.

use crate::checkpoint::{self, Checkpoint, EngineState, IntTensor, FORMAT_VERSION};
use crate::distributed::{Share, World};
use crate::histograms::{self, HistogramRule};
use crate::lock::DirLock;
use crate::logs::{Progress, RunLog};
use crate::meters::{AccuracyListMeter, Target};
use crate::perf_stats::{PerfStats, Section};
use crate::schedule::{self, ParamSchedule, RunShape};
use crate::source::{Batch, DataSource, Labels};
use crate::stages::Stages;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_compiler::autodiff::{bias_correction_inputs, Optimizer, StepOptions};
use tessera_compiler::elaborate::Program;
use tessera_compiler::ir::DType;
use tessera_compiler::param_groups::ParamGroup;
use tessera_compiler::pipeline::{inference_plan_for, training_plan_for};
use tessera_compiler::plan::{Source, Target as PlanTarget};
use tessera_runtime::weights::{
    detect_format, load_weights, match_weights_with, model_tensors, MatchOptions, NamedTensor, WeightsFormat,
};
use tessera_runtime::{Backend, Device, Executor, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Data(String),
    #[error(
        "the loss is {loss} at iteration {iteration} (epoch {epoch}); training stopped. {}",
        match last_checkpoint { Some(p) => format!("The last good checkpoint is {}.", p.display()), None => "No checkpoint was written yet.".into() }
    )]
    NonFinite { loss: f32, iteration: u64, epoch: u64, last_checkpoint: Option<PathBuf> },
    #[error(
        "the model's state is not finite after iteration {iteration}: {detail}. Checkpoint {checkpoint} was not written and training stopped. {}",
        match last_checkpoint { Some(p) => format!("The last good checkpoint is {}.", p.display()), None => "No checkpoint was written yet.".into() }
    )]
    NonFiniteState { iteration: u64, detail: String, checkpoint: String, last_checkpoint: Option<PathBuf> },
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("{0}")]
    Runtime(String),
    #[error("cannot write the run's logs in {dir}: {message}")]
    Logs { dir: PathBuf, message: String },
}

/// Advances a counter of the engine state, never past `MAX_COUNTER`
/// (`engine.json` is checked against the same bound, so only a bug reaches
/// the error; it names the counter instead of wrapping).
fn advance(counter: &mut u64, field: &str) -> Result<(), EngineError> {
    match counter.checked_add(1).filter(|&n| n <= checkpoint::MAX_COUNTER) {
        Some(n) => {
            *counter = n;
            Ok(())
        }
        None => Err(EngineError::Runtime(format!(
            "the engine state's `{field}` ({counter}) would pass its bound of {}",
            checkpoint::MAX_COUNTER
        ))),
    }
}

/// How a run ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Every epoch ran; the final checkpoint.
    Finished { checkpoint: PathBuf },
    /// A final checkpoint already existed (and OVERWRITE_EXISTING is off).
    AlreadyFinished { checkpoint: PathBuf },
    /// Stopped by a signal or the step limit, after checkpointing.
    Stopped { checkpoint: PathBuf, iteration: u64, reason: &'static str },
    /// TEST_ONLY: one test phase of these weights, no training, no checkpoint.
    Evaluated { weights: String, summary: String },
}

pub struct TrainSetup<'a> {
    pub cfg: &'a Value,
    pub prog: &'a Program,
    pub train: Box<dyn DataSource + 'a>,
    pub test: Option<Box<dyn DataSource + 'a>>,
    /// Stop (with a checkpoint) after this many steps in total.
    pub max_steps: Option<u64>,
    /// Set by SIGINT/SIGTERM: finish the step, checkpoint, stop.
    pub stop: Arc<AtomicBool>,
    /// No progress bar and nothing on standard output.
    pub quiet: bool,
    /// Where to train; `None`: as MACHINE.DEVICE says (cpu, or gpu: GPU 0).
    pub device: Option<Device>,
    /// Plans compiled ahead of time (`tessera compile --emit plan`), run as
    /// they are instead of compiling; checked against the config and target.
    pub plans: Option<crate::compiled::CompiledRun>,
    /// The data-parallel run this process is one rank of (`None`: alone).
    /// The data sources must be this rank's shards.
    pub world: Option<&'a World>,
    /// What the run was started from, written to the run folder by rank 0:
    /// the resolved config (`config.yaml`, as timm's args.yaml) and the
    /// command's config name and overrides (the top of this run's log.txt).
    pub origin: Option<RunOrigin>,
}

/// See `TrainSetup::origin`.
#[derive(Clone, Debug, Default)]
pub struct RunOrigin {
    /// `config=NAME` and the overrides, as given.
    pub command: Vec<String>,
    /// The resolved config, VISSL's YAML layout.
    pub config_yaml: String,
}

/// The config the trainer compiles: one replica (DISTRIBUTED 1 x 1; its
/// collectives are identities, MoCo's queue takes one replica's keys).
pub fn one_replica(cfg: &Value) -> Value {
    let mut c = cfg.clone();
    c["DISTRIBUTED"]["NUM_NODES"] = 1.into();
    c["DISTRIBUTED"]["NUM_PROC_PER_NODE"] = 1.into();
    c
}

/// The config a rank of a data-parallel run compiles: DISTRIBUTED as the
/// run's actual shape (what the launcher started), which the losses'
/// collectives, MoCo's queue and the learning-rate scaling read.
pub fn for_world(cfg: &Value, num_nodes: usize, procs_per_node: usize) -> Value {
    let mut c = cfg.clone();
    c["DISTRIBUTED"]["NUM_NODES"] = (num_nodes as u64).into();
    c["DISTRIBUTED"]["NUM_PROC_PER_NODE"] = (procs_per_node as u64).into();
    c
}

fn get<'a>(cfg: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(cfg, |node, k| node.get(k))
}

fn get_u64(cfg: &Value, key: &str) -> Result<u64, EngineError> {
    get(cfg, key)
        .and_then(Value::as_u64)
        .ok_or_else(|| EngineError::Config(format!("config key `{key}` must be a non-negative integer")))
}

fn get_i64(cfg: &Value, key: &str) -> Result<i64, EngineError> {
    get(cfg, key)
        .and_then(Value::as_i64)
        .ok_or_else(|| EngineError::Config(format!("config key `{key}` must be an integer")))
}

fn get_bool(cfg: &Value, key: &str) -> bool {
    get(cfg, key).and_then(Value::as_bool).unwrap_or(false)
}

fn get_str<'a>(cfg: &'a Value, key: &str) -> &'a str {
    get(cfg, key).and_then(Value::as_str).unwrap_or("")
}

/// The momentum of MoCo's key-encoder update, a plan input.
const MOCO_MOMENTUM: &str = "loss.moco_momentum";

/// VISSL's log steps: iteration 1, every 5 up to 100, then every LOG_FREQUENCY.
fn is_log_step(iteration: u64, freq: u64) -> bool {
    iteration == 1 || (iteration <= 100 && iteration.is_multiple_of(5)) || (freq > 0 && iteration.is_multiple_of(freq))
}

/// Moves every state both executors hold from `from` into `to` (executors
/// of one model hand its buffers over: moved on the CPU, copied device to
/// device on a GPU).
fn move_state(from: &mut Executor, to: &mut Executor) -> Result<(), EngineError> {
    from.move_state_to(to).map_err(|e| EngineError::Runtime(e.to_string()))
}

/// The plan dtype of state `name` of `ex`.
fn state_dtype(ex: &Executor, name: &str) -> Option<DType> {
    ex.plan().state(name).map(|v| ex.plan().values[v].dtype)
}

/// Training executors per (batch size, stage), sharing one model.
struct Steps<'a> {
    prog: &'a Program,
    cfg: &'a Value,
    stages: Stages,
    seed: u64,
    backend: Backend,
    target: PlanTarget,
    compiled: Option<&'a crate::compiled::CompiledRun>,
    by_key: HashMap<(u64, usize), Executor>,
    /// The executor that holds the current state.
    current: (u64, usize),
    share: Share,
}

impl Steps<'_> {
    /// The executor for a batch of `batch` at `iteration`, holding the state.
    fn get(&mut self, batch: u64, iteration: u64) -> Result<&mut Executor, EngineError> {
        let key = (batch, self.stages.id(iteration));
        if !self.by_key.contains_key(&key) {
            let plan = match self.compiled {
                Some(run) => run.step(batch, key.1).map_err(EngineError::Config)?,
                None => {
                    let cfg = self.stages.config(self.cfg, iteration);
                    training_plan_for(self.prog, &cfg, batch, self.target)
                        .map_err(|e| EngineError::Config(e.to_string()))?
                        .0
                }
            };
            let mut ex = self.backend.executor(plan, self.seed).map_err(|e| EngineError::Runtime(e.to_string()))?;
            self.share.attach(&mut ex)?;
            self.by_key.insert(key, ex);
        }
        if key != self.current {
            let mut to = self.by_key.remove(&key).expect("made above");
            let from = self.by_key.get_mut(&self.current).expect("the current executor");
            move_state(from, &mut to)?;
            to.set_step(from.step());
            self.by_key.insert(key, to);
            self.current = key;
        }
        Ok(self.by_key.get_mut(&key).expect("present"))
    }

    fn active(&self) -> &Executor {
        &self.by_key[&self.current]
    }

    fn active_mut(&mut self) -> &mut Executor {
        self.by_key.get_mut(&self.current).expect("present")
    }
}

/// The meter of a config (`METERS.name: accuracy_list_meter`), if any. In
/// linear evaluation (`features` not empty) VISSL sets one meter per
/// feature, named after it (infer_and_assert_hydra_config); tessera appends
/// the head index to a name that repeats, so that no meter hides another.
fn meter_of(cfg: &Value, features: &[String]) -> Result<Option<AccuracyListMeter>, EngineError> {
    let names: Vec<&str> = match get(cfg, "METERS.names").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![get_str(cfg, "METERS.name")],
    };
    match names.as_slice() {
        [""] | [] => Ok(None),
        ["accuracy_list_meter"] => {
            let topk: Vec<usize> = get(cfg, "METERS.accuracy_list_meter.topk_values")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).map(|k| k as usize).collect())
                .unwrap_or_else(|| vec![1]);
            let given: Vec<String> = get(cfg, "METERS.accuracy_list_meter.meter_names")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default();
            let names = if given.is_empty() { feature_meter_names(features) } else { given };
            let n = if features.is_empty() {
                get_u64(cfg, "METERS.accuracy_list_meter.num_meters")? as usize
            } else {
                features.len()
            };
            let meter = AccuracyListMeter::new(n, topk);
            match names.len() {
                0 => Ok(Some(meter)),
                k if k == n => Ok(Some(meter.with_names(names))),
                k => Err(EngineError::Config(format!(
                    "config key `METERS.accuracy_list_meter.meter_names` lists {k} names for {n} meters"
                ))),
            }
        }
        other => Err(EngineError::Config(format!(
            "config key `METERS.name`: {other:?} is not supported; tessera has accuracy_list_meter (or \"\" for none)"
        ))),
    }
}

/// Meter names of linear evaluation: the feature names, with `_head{i}`
/// appended to those that several heads share (VISSL's vit_b16 evaluates
/// each feature with two heads).
fn feature_meter_names(features: &[String]) -> Vec<String> {
    features
        .iter()
        .enumerate()
        .map(|(i, f)| if features.iter().filter(|g| *g == f).count() > 1 { format!("{f}_head{i}") } else { f.clone() })
        .collect()
}

/// Feeds one batch's model outputs to the meter.
fn update_meter(
    meter: &mut AccuracyListMeter,
    outputs: &BTreeMap<String, Tensor>,
    labels: &Labels,
) -> Result<(), EngineError> {
    let mut heads: Vec<&Tensor> = Vec::new();
    if let Some(t) = outputs.get("output") {
        heads.push(t);
    }
    let mut i = 0;
    while let Some(t) = outputs.get(&format!("output.{i}")) {
        heads.push(t);
        i += 1;
    }
    if heads.len() < meter.num_meters() {
        return Err(EngineError::Config(format!(
            "config key `METERS.accuracy_list_meter.num_meters` is {} but the model has {} outputs (one per head of MODEL.HEAD.PARAMS)",
            meter.num_meters(),
            heads.len()
        )));
    }
    for (m, out) in heads.iter().take(meter.num_meters()).enumerate() {
        let (Some(logits), &[n, k]) = (out.as_f32(), &out.shape[..]) else {
            return Err(EngineError::Config(format!(
                "accuracy_list_meter needs [batch, classes] logits, the model's output {m} is {:?}",
                out.shape
            )));
        };
        let targets: Vec<Target> = match labels {
            Labels::Hard(y) => y.iter().map(|&c| Target::Class(c.max(0) as usize)).collect(),
            Labels::Soft { classes, data } if *classes == k => data.chunks(k).map(Target::Soft).collect(),
            Labels::Soft { classes, .. } => {
                return Err(EngineError::Data(format!(
                "soft targets over {classes} classes for a model output of {k} (COLLATE_FUNCTION_PARAMS.num_classes)"
            )))
            }
        };
        if targets.len() != n {
            return Err(EngineError::Data(format!("{} labels for a batch of {n}", targets.len())));
        }
        meter.update(m, logits, k, &targets);
    }
    Ok(())
}

/// Everything a checkpoint holds, from the active executor (read back from
/// the device, so a checkpoint is the same files whatever trained).
fn snapshot(ex: &Executor, engine: EngineState) -> Result<Checkpoint, EngineError> {
    let (mut model, mut optimizer) = (Vec::new(), Vec::new());
    let mut engine = engine;
    for name in ex.state_names() {
        let t = ex
            .read_state(&name)
            .map_err(|e| EngineError::Runtime(e.to_string()))?
            .ok_or_else(|| EngineError::Runtime(format!("state `{name}` is not held by the active plan")))?;
        match t.data {
            tessera_runtime::Data::F32(v) => {
                let nt = NamedTensor::new(name.clone(), t.shape.clone(), v);
                if name.starts_with("optim.") {
                    optimizer.push(nt)
                } else {
                    model.push(nt)
                }
            }
            tessera_runtime::Data::I64(v) => {
                engine.int_state.insert(name.clone(), IntTensor { shape: t.shape.clone(), data: v });
            }
        }
    }
    Ok(Checkpoint { model, optimizer, engine })
}

/// Loads a checkpoint's tensors into `ex` (every state of the plan must be
/// there); a rank-local state (a checkpoint holds every rank's, as column
/// blocks) takes rank `rank`'s block of `world`.
fn restore(ex: &mut Executor, ckpt: &Checkpoint, path: &Path, rank: usize, world: usize) -> Result<(), EngineError> {
    let local = ex.plan().rank_local_states();
    let mut have: HashMap<&str, Tensor> = HashMap::new();
    for t in ckpt.model.iter().chain(&ckpt.optimizer) {
        let tensor = match (&t.shape[..], local.contains(&t.name)) {
            ([e, wl], true) if wl % world == 0 => {
                let l = wl / world;
                let data = (0..*e).flat_map(|row| t.data[row * wl + rank * l..][..l].iter().copied()).collect();
                Tensor::f32(vec![*e, l], data)
            }
            _ => Tensor::f32(t.shape.clone(), t.data.clone()),
        };
        have.insert(&t.name, tensor);
    }
    for (name, t) in &ckpt.engine.int_state {
        let tensor = Tensor::new(t.shape.clone(), tessera_runtime::Data::I64(t.data.clone())).map_err(|e| {
            EngineError::Config(format!(
                "checkpoint {}: integer state `{name}` in engine.json is damaged: {e}",
                path.display()
            ))
        })?;
        have.insert(name, tensor);
    }
    let mut missing = Vec::new();
    for name in ex.state_names() {
        match have.remove(name.as_str()) {
            Some(t) => ex.write_state(&name, t).map_err(|e| {
                EngineError::Config(format!("checkpoint {} does not fit this model: {e}", path.display()))
            })?,
            None => missing.push(name),
        }
    }
    if !missing.is_empty() {
        return Err(EngineError::Config(format!(
            "checkpoint {} does not fit this model: it lacks {} (was it written by another config?)",
            path.display(),
            missing.join(", ")
        )));
    }
    ex.set_step(ckpt.engine.rng_step);
    Ok(())
}

/// MODEL.WEIGHTS_INIT: parameters from a file (tessera or timm names), with
/// SKIP_LAYERS (substrings), REMOVE_PREFIX then APPEND_PREFIX applied to the
/// file's names (reference 8.2). Model tensors the file lacks keep their
/// initial values, and are listed.
fn weights_init(ex: &mut Executor, cfg: &Value, log: &mut RunLog) -> Result<(), EngineError> {
    let file = get_str(cfg, "MODEL.WEIGHTS_INIT.PARAMS_FILE");
    if file.is_empty() {
        return Ok(());
    }
    // A checkpoint directory stands for its model.safetensors, checked
    // against the checkpoint's manifest.
    let path = match Path::new(file) {
        p if p.is_dir() => {
            checkpoint::verify_file(p, checkpoint::MODEL)
                .map_err(|e| EngineError::Config(format!("MODEL.WEIGHTS_INIT.PARAMS_FILE: {e}")))?;
            p.join(checkpoint::MODEL)
        }
        p => p.to_path_buf(),
    };
    let skip: Vec<&str> = get(cfg, "MODEL.WEIGHTS_INIT.SKIP_LAYERS")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let remove = get_str(cfg, "MODEL.WEIGHTS_INIT.REMOVE_PREFIX");
    let append = get_str(cfg, "MODEL.WEIGHTS_INIT.APPEND_PREFIX");
    // VISSL loads a file's heads only when fine-tuning or with
    // EVAL_TRUNK_AND_HEAD (checkpoint.py should_init_head_weights): linear
    // evaluation trains new heads on the file's trunk.
    let eval = |k: &str| get_bool(cfg, &format!("MODEL.FEATURE_EVAL_SETTINGS.{k}"));
    let trunk_only = eval("EVAL_MODE_ON") && !eval("EVAL_TRUNK_AND_HEAD");
    let expected: Vec<(String, Vec<usize>)> =
        model_tensors(ex.plan()).into_iter().filter(|(n, _)| !trunk_only || n.starts_with("trunk.")).collect();
    let renamed = |name: &str| -> String {
        let n = name.strip_prefix(remove).filter(|_| !remove.is_empty()).unwrap_or(name);
        format!("{append}{n}")
    };
    let mut tensors = tessera_runtime::weights::read_safetensors(&path)
        .map_err(|e| EngineError::Config(format!("MODEL.WEIGHTS_INIT.PARAMS_FILE: {e}")))?;
    let before = tensors.len();
    tensors.retain(|t| !skip.iter().any(|s| !s.is_empty() && t.name.contains(s)));
    let skipped = before - tensors.len();
    for t in &mut tensors {
        t.name = renamed(&t.name);
    }
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    let format = detect_format(&names);
    // For the message when nothing matches: a few names on each side.
    let file_names: Vec<String> = names.iter().take(3).map(|n| format!("`{n}`")).collect();
    let model_names: Vec<String> = expected.iter().take(3).map(|(n, _)| format!("`{n}`")).collect();
    let options = MatchOptions { allow_missing: true, allow_unused: true };
    let matched = match_weights_with(&expected, tensors, format, options)
        .map_err(|e| EngineError::Config(format!("MODEL.WEIGHTS_INIT.PARAMS_FILE {file}: {e}")))?;
    let loaded = matched.tensors.len();
    // A file that initialises nothing trains from random values while the
    // user believes it fine-tunes: refused, as `tessera infer` refuses it.
    if loaded == 0 && !expected.is_empty() && !trunk_only {
        let mut how = Vec::new();
        if skipped > 0 {
            how.push(format!("SKIP_LAYERS {skip:?} dropped {skipped} of its {before} tensors"));
        }
        if !remove.is_empty() {
            how.push(format!("REMOVE_PREFIX `{remove}` was taken off the front of its names"));
        }
        if !append.is_empty() {
            how.push(format!("APPEND_PREFIX `{append}` was put in front of them"));
        }
        let how = if how.is_empty() { String::new() } else { format!(" after {}", how.join(", then ")) };
        return Err(EngineError::Config(format!(
            "MODEL.WEIGHTS_INIT.PARAMS_FILE {file}: none of the file's tensors matches a tensor of this model{how} (the file: {} ...; the model: {} ...), so the run would start from random weights; fix MODEL.WEIGHTS_INIT.REMOVE_PREFIX / APPEND_PREFIX / SKIP_LAYERS, or set PARAMS_FILE to '' to train from scratch",
            if file_names.is_empty() { "no tensor".to_string() } else { file_names.join(", ") },
            model_names.join(", ")
        )));
    }
    // A frozen trunk that keeps its random values is never what linear
    // evaluation means: none loaded is an error, some missing a warning.
    if trunk_only && loaded == 0 && !expected.is_empty() {
        return Err(EngineError::Config(format!(
            "MODEL.WEIGHTS_INIT.PARAMS_FILE {file}: no trunk tensor of the file fits this model's trunk, which linear evaluation (MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON) would then evaluate at random initialisation; check the file, REMOVE_PREFIX / APPEND_PREFIX and SKIP_LAYERS"
        )));
    }
    set_loaded(ex, matched.tensors, "", "MODEL.WEIGHTS_INIT")?;
    log.info(&format!(
        "initialised {loaded} tensors from {file} ({skipped} skipped by SKIP_LAYERS, {} not in the file, {} unused{})",
        matched.missing.len(),
        matched.unused.len(),
        if trunk_only { ": linear evaluation loads the trunk only" } else { "" }
    ));
    if !matched.missing.is_empty() {
        let kept = format!("  kept their initial values: {}", matched.missing.join(", "));
        if trunk_only {
            log.warn(&kept);
        } else {
            log.info(&kept);
        }
    }
    Ok(())
}

/// Puts tensors read from a file into the model's state as `{prefix}{name}`
/// (integer buffers, such as BatchNorm's counter, come back from files as f32).
fn set_loaded(ex: &mut Executor, tensors: Vec<NamedTensor>, prefix: &str, key: &str) -> Result<(), EngineError> {
    for t in tensors {
        let name = format!("{prefix}{}", t.name);
        let value = match state_dtype(ex, &name) {
            Some(DType::I64) => Tensor::i64(t.shape.clone(), t.data.iter().map(|&v| v as i64).collect()),
            _ => Tensor::f32(t.shape.clone(), t.data),
        };
        ex.write_state(&name, value).map_err(|e| EngineError::Config(format!("{key}: {e}")))?;
    }
    Ok(())
}

/// The distillation teacher's weights (the `loss.teacher.*` buffers, DeiT's
/// frozen teacher) from LOSS.distillation.teacher_weights, in the teacher's
/// own names (tessera or timm): every teacher tensor must be in the file.
fn teacher_init(ex: &mut Executor, cfg: &Value, log: &mut RunLog) -> Result<(), EngineError> {
    const PREFIX: &str = "loss.teacher.";
    let key = "LOSS.distillation.teacher_weights";
    let expected: Vec<(String, Vec<usize>)> = ex
        .plan()
        .values
        .iter()
        .filter_map(|v| match &v.source {
            Source::Buffer { name, .. } => {
                name.strip_prefix(PREFIX).map(|n| (n.to_string(), v.shape.iter().map(|&d| d as usize).collect()))
            }
            _ => None,
        })
        .collect();
    if expected.is_empty() {
        return Ok(());
    }
    let file = get_str(cfg, key);
    if file.is_empty() {
        return Err(EngineError::Config(format!(
            "config key `{key}` is empty: LOSS.distillation.type {} needs the teacher's weights (a safetensors file)",
            get_str(cfg, "LOSS.distillation.type")
        )));
    }
    let format_key = "LOSS.distillation.teacher_weights_format";
    let format: WeightsFormat =
        get_str(cfg, format_key).parse().map_err(|e| EngineError::Config(format!("config key `{format_key}`: {e}")))?;
    let options = MatchOptions { allow_missing: false, allow_unused: true };
    let matched = load_weights(Path::new(file), &expected, Some(format), options)
        .map_err(|e| EngineError::Config(format!("config key `{key}`: {e}")))?;
    let loaded = matched.tensors.len();
    set_loaded(ex, matched.tensors, PREFIX, key)?;
    log.info(&format!("distillation teacher: {loaded} tensors from {file} ({} unused)", matched.unused.len()));
    Ok(())
}

/// Lr and weight-decay inputs of every param group.
struct Optim {
    groups: Vec<ParamGroup>,
    lr: ParamSchedule,
    lr_head: Option<ParamSchedule>,
    adam: Option<(f64, f64)>,
    /// First iterations of temporarily frozen parameters (their step clocks).
    late_starts: Vec<u64>,
}

impl Optim {
    fn scalars(&self, iteration: u64, total: u64, per_epoch: u64) -> (Vec<(String, Tensor)>, f64) {
        let lr = self.lr.value(iteration, total, per_epoch);
        let head = self.lr_head.as_ref().map(|s| s.value(iteration, total, per_epoch)).unwrap_or(lr);
        let mut out = Vec::new();
        for g in &self.groups {
            let v = if g.head_lr { head } else { lr };
            out.push((format!("optim.lr.{}", g.name), Tensor::scalar_f32(v as f32)));
            out.push((format!("optim.weight_decay.{}", g.name), Tensor::scalar_f32(g.weight_decay as f32)));
        }
        if let Some((b1, b2)) = self.adam {
            // torch.optim.AdamW's step count starts at 1, at a parameter's
            // first update (a later one for temporarily frozen parameters).
            for &start in std::iter::once(&0).chain(&self.late_starts) {
                if iteration < start {
                    continue;
                }
                // Beyond i32 the corrections are 1 to f32 precision anyway.
                let t = i32::try_from(iteration - start + 1).unwrap_or(i32::MAX);
                let (n1, n2) = bias_correction_inputs(start);
                out.push((n1, Tensor::scalar_f32((1.0 - b1.powi(t)) as f32)));
                out.push((n2, Tensor::scalar_f32((1.0 - b2.powi(t)) as f32)));
            }
        }
        (out, lr)
    }
}

/// The inputs of the training step at `iteration` besides the images: the
/// optimizer's scalars, the targets when the plan takes them, MoCo's
/// momentum (0 at the first step: the key encoder starts as a copy of the
/// online model, reference 4.1); and the lr, for the logs.
fn step_scalars(
    optim: &Optim,
    iteration: u64,
    total: u64,
    per_epoch: u64,
    labels: &Labels,
    needs: &dyn Fn(&str) -> bool,
    moco_momentum: f64,
) -> (Vec<(String, Tensor)>, f64) {
    let (mut inputs, lr_now) = optim.scalars(iteration, total, per_epoch);
    if needs("target") {
        inputs.push((
            "target".into(),
            match labels {
                Labels::Hard(y) => Tensor::i64(vec![y.len()], y.clone()),
                Labels::Soft { classes, data } => Tensor::f32(vec![data.len() / classes, *classes], data.clone()),
            },
        ));
    }
    if needs(MOCO_MOMENTUM) {
        let m = if iteration == 0 { 0.0 } else { moco_momentum };
        inputs.push((MOCO_MOMENTUM.into(), Tensor::scalar_f32(m as f32)));
    }
    (inputs, lr_now)
}

/// What a test phase needs besides the model.
struct TestPhase<'a, 'b> {
    prog: &'a Program,
    cfg: &'a Value,
    seed: u64,
    eval: &'b mut HashMap<u64, Executor>,
    log: &'b mut RunLog,
}

impl TestPhase<'_, '_> {
    /// The test phase after train phase `epoch`: the eval forward of every
    /// test batch, one metrics.json record. The eval executors borrow the
    /// model's state for the phase (moved, not copied) and give it back.
    fn run(
        &mut self,
        test: &mut dyn DataSource,
        steps: &mut Steps,
        meter: &AccuracyListMeter,
        state: &mut EngineState,
        epoch: u64,
    ) -> Result<(), EngineError> {
        let mut m = meter.clone();
        m.reset();
        // DDP's BROADCAST_BUFFERS: every forward uses rank 0's buffers (batch
        // norm's running statistics). Training forwards read batch
        // statistics, so only the evaluation sees them: they are broadcast
        // before it (rank 0's, which checkpoints hold, are never changed).
        if get(self.cfg, "DISTRIBUTED.BROADCAST_BUFFERS").and_then(Value::as_bool).unwrap_or(true) {
            let ex = steps.active_mut();
            let buffers: Vec<String> = ex
                .plan()
                .values
                .iter()
                .filter_map(|v| match &v.source {
                    Source::Buffer { name, .. } if !name.starts_with("loss.") && !name.starts_with("optim.") => {
                        Some(name.clone())
                    }
                    _ => None,
                })
                .collect();
            let share = steps.share.clone();
            share.broadcast_states(steps.active_mut(), &buffers)?;
        }
        let mut holder: Option<u64> = None;
        let mut result = Ok(());
        for b in test.epoch(epoch, 0) {
            let step = (|| -> Result<(), EngineError> {
                let b = b.map_err(EngineError::Data)?;
                let size = b.size as u64;
                if let std::collections::hash_map::Entry::Vacant(v) = self.eval.entry(size) {
                    let plan = match steps.compiled {
                        Some(run) => run.eval(size).map_err(EngineError::Config)?,
                        None => {
                            inference_plan_for(self.prog, self.cfg, size, false, steps.target)
                                .map_err(|e| EngineError::Config(e.to_string()))?
                                .0
                        }
                    };
                    let mut ex =
                        steps.backend.executor(plan, self.seed).map_err(|e| EngineError::Runtime(e.to_string()))?;
                    steps.share.attach(&mut ex)?;
                    v.insert(ex);
                }
                if holder != Some(size) {
                    match holder {
                        None => move_state(steps.active_mut(), self.eval.get_mut(&size).expect("made above"))?,
                        Some(prev) => {
                            let mut from = self.eval.remove(&prev).expect("the holder exists");
                            let moved = move_state(&mut from, self.eval.get_mut(&size).expect("made above"));
                            self.eval.insert(prev, from);
                            moved?;
                        }
                    }
                    holder = Some(size);
                }
                let ex = self.eval.get_mut(&size).expect("made above");
                let (names, tensors): (Vec<String>, Vec<Tensor>) = b.images.into_iter().unzip();
                let given: Vec<(&str, Tensor)> = names.iter().map(String::as_str).zip(tensors).collect();
                let wanted = |name: &str| name.starts_with("output");
                let out =
                    ex.run(&given, Some(&wanted)).map_err(|e| EngineError::Runtime(format!("test phase: {e}")))?;
                update_meter(&mut m, &out, &b.labels)
            })();
            if step.is_err() {
                result = step;
                break;
            }
        }
        // The model's state goes back to the training executor, error or not.
        if let Some(h) = holder {
            move_state(self.eval.get_mut(&h).expect("the holder exists"), steps.active_mut())?;
        }
        result?;
        for w in test.take_warnings() {
            self.log.warn(&w);
        }
        // Every rank evaluated its shard of the test set.
        let m = steps.share.meter(&m)?;
        self.log.phase(&json!({
            "iteration": state.iteration,
            "phase_idx": state.phase_idx,
            "train_phase_idx": epoch,
            "test_accuracy_list_meter": m.to_json(),
        }));
        advance(&mut state.phase_idx, "phase_idx")?;
        Ok(())
    }
}

/// After the test phase that followed checkpoint `last`: the checkpoint now
/// records it as done (and, after the last epoch, the run as finished), so
/// a resume neither repeats nor skips it.
fn finish_test(
    last: &Option<PathBuf>,
    state: &mut EngineState,
    num_epochs: u64,
    main: bool,
) -> Result<(), EngineError> {
    state.test_pending = false;
    state.finished = state.train_phase_idx == num_epochs;
    if let (Some(path), true) = (last, main) {
        checkpoint::update_engine_state(path, |s| {
            s.test_pending = false;
            s.phase_idx = state.phase_idx;
            s.finished = state.finished;
        })?;
    }
    Ok(())
}

/// Runs training as the config says. Returns how it ended; a checkpoint
/// exists for every outcome.
pub fn train(mut setup: TrainSetup) -> Result<Outcome, EngineError> {
    // Alone, the model is compiled for one replica (its collectives are
    // identities, MoCo's queue takes one replica's keys); a rank of a
    // data-parallel run compiles it for the run's actual shape.
    let replicas = get_u64(setup.cfg, "DISTRIBUTED.NUM_NODES")? * get_u64(setup.cfg, "DISTRIBUTED.NUM_PROC_PER_NODE")?;
    let share = match setup.world {
        Some(w) => Share { comm: Some(w.comm.clone()), rank: w.rank(), size: w.size() },
        None => Share { comm: None, rank: 0, size: 1 },
    };
    let shaped = match setup.world {
        Some(w) => for_world(setup.cfg, w.place.num_nodes(), w.place.local_world),
        None => one_replica(setup.cfg),
    };
    let cfg = &shaped;
    let device = get_str(cfg, "MACHINE.DEVICE");
    if device != "cpu" && device != "gpu" {
        return Err(EngineError::Config(format!("config key `MACHINE.DEVICE` is `{device}`; use cpu or gpu")));
    }
    // The device: MACHINE.DEVICE (gpu: GPU 0), unless the caller chose one.
    let device = match &setup.device {
        Some(d) => d.clone(),
        None if device == "gpu" => Device::Cuda { ordinal: setup.world.map_or(0, |w| w.place.local_rank) },
        None => Device::Cpu,
    };
    if share.size > 1 {
        if setup.plans.is_some() {
            return Err(EngineError::Config(
                "a compiled run (--plan) holds one process's plans; a data-parallel run compiles its own (drop --plan)"
                    .into(),
            ));
        }
    }
    let target = if matches!(device, Device::Cpu | Device::CpuArena) { PlanTarget::Cpu } else { PlanTarget::Cuda };
    // A compiled run that does not fit is refused before anything else.
    if let Some(run) = &setup.plans {
        run.check(cfg, target).map_err(EngineError::Config)?;
    }
    let dir = PathBuf::from(get_str(cfg, "CHECKPOINT.DIR"));
    if dir.as_os_str().is_empty() {
        return Err(EngineError::Config(
            "config key `CHECKPOINT.DIR` is empty: give the run's directory (`.` for the working directory)".into(),
        ));
    }
    let num_epochs = get_u64(cfg, "OPTIMIZER.num_epochs")?;
    if num_epochs == 0 {
        return Err(EngineError::Config("config key `OPTIMIZER.num_epochs` must be at least 1".into()));
    }
    let batch = get_u64(cfg, "DATA.TRAIN.BATCHSIZE_PER_REPLICA")?;
    let per_epoch = setup.train.batches_per_epoch();
    if per_epoch == 0 {
        return Err(EngineError::Data(format!(
            "the training data gives no batch: {} samples for DATA.TRAIN.BATCHSIZE_PER_REPLICA {batch}{}",
            setup.train.samples(),
            if get_bool(cfg, "DATA.TRAIN.DROP_LAST") { " with DATA.TRAIN.DROP_LAST" } else { "" }
        )));
    }
    let total = num_epochs * per_epoch;
    let seed = get_u64(cfg, "SEED_VALUE")?;
    let tb_dir = get_bool(cfg, "HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD").then(|| {
        let base = get_str(cfg, "HOOKS.TENSORBOARD_SETUP.LOG_DIR");
        let base = if base.is_empty() || base == "." { dir.clone() } else { PathBuf::from(base) };
        base.join(get_str(cfg, "HOOKS.TENSORBOARD_SETUP.EXPERIMENT_LOG_DIR"))
    });
    let tb_dir = match tb_dir {
        Some(d) => Some((d, Duration::from_secs(get_u64(cfg, "HOOKS.TENSORBOARD_SETUP.FLUSH_EVERY_N_MIN")? * 60))),
        None => None,
    };

    // One run at a time in a checkpoint directory: rank 0, the run's only
    // writer, locks it until `train` returns (the lock is released when
    // dropped: finished, stopped, failed). Then what a killed writer left
    // behind is swept (a replacement interrupted between its two renames is
    // restored), which only the lock's holder may do. The other ranks wait
    // for it (checkpoints are on a file system every node shares, as in
    // VISSL) and stop with it when it could not lock.
    let lock = if share.main() {
        let lock = DirLock::acquire(&dir);
        if lock.is_ok() {
            checkpoint::sweep_stale(&dir);
        }
        Some(lock)
    } else {
        None
    };
    let refused = matches!(lock, Some(Err(_)));
    if share.any(refused)? && !refused {
        return Err(EngineError::Config(format!(
            "rank 0 could not lock the checkpoint directory {} (its error says why)",
            dir.display()
        )));
    }
    let (_lock, took_over) = match lock.transpose().map_err(|e| EngineError::Config(e.to_string()))? {
        Some((l, note)) => (Some(l), note),
        None => (None, None),
    };
    // A finished run is not repeated (VISSL: a final checkpoint means done).
    let overwrite = get_bool(cfg, "CHECKPOINT.OVERWRITE_EXISTING");
    // The newest intact checkpoint: each file checked against its manifest;
    // a damaged one is passed over, with a warning naming it and why.
    let point =
        if get_bool(cfg, "CHECKPOINT.AUTO_RESUME") && !overwrite { checkpoint::resume_point(&dir)? } else { None };
    let mut resume_warnings = Vec::new();
    let (resume_from, resumed) = match point {
        Some(r) => {
            resume_warnings = r.damaged;
            if r.verified == checkpoint::Verified::Unverified {
                resume_warnings.push(format!(
                    "checkpoint {} was written before checkpoints carried checksums (format 1): its files are not verified",
                    r.path.display()
                ));
            }
            (Some(r.path), Some(r.checkpoint))
        }
        None => (None, None),
    };
    // TEST_ONLY (VISSL): the test phase alone, of the weights of
    // MODEL.WEIGHTS_INIT or of the run in CHECKPOINT.DIR; nothing trained
    // or written but the logs and metrics.
    let test_only = get_bool(cfg, "TEST_ONLY");
    if test_only && (!get_bool(cfg, "TEST_MODEL") || setup.test.is_none()) {
        return Err(EngineError::Config(
            "config key `TEST_ONLY` runs the test phase alone: it needs TEST_MODEL=True and DATA.TEST".into(),
        ));
    }
    let init_file = get_str(cfg, "MODEL.WEIGHTS_INIT.PARAMS_FILE").to_string();
    if test_only && resumed.is_none() && init_file.is_empty() {
        return Err(EngineError::Config(format!(
            "config key `TEST_ONLY` evaluates trained weights: set MODEL.WEIGHTS_INIT.PARAMS_FILE (a checkpoint or weights file), or CHECKPOINT.DIR to a run's directory ({} has no checkpoint)",
            dir.display()
        )));
    }
    if let (Some(c), Some(p), false) = (&resumed, &resume_from, test_only) {
        if c.engine.finished {
            if share.main() {
                for w in &resume_warnings {
                    crate::errln!("warning: {w}");
                }
            }
            return Ok(Outcome::AlreadyFinished { checkpoint: p.clone() });
        }
    }
    // A GPU that cannot be opened is an error naming what is missing, never
    // a silent CPU run.
    let backend = Backend::open(&device).map_err(|e| EngineError::Runtime(e.to_string()))?;
    // Rank 0 writes the run's files; every other rank keeps its own log
    // (ranks/<rank>/log.txt) for debugging, and prints nothing.
    let mut log = if share.main() {
        RunLog::open(&dir, tb_dir, setup.quiet)
    } else {
        RunLog::open(&dir.join("ranks").join(share.rank.to_string()), None, true)
    }
    .map_err(|e| EngineError::Logs { dir: dir.clone(), message: e.to_string() })?;
    let hist = HistogramRule::of(cfg, log.has_tensorboard());
    let mut perf = PerfStats::of(cfg);
    if let (Some(o), true) = (&setup.origin, share.main()) {
        log.info(&format!("tessera train {}", o.command.join(" ")));
        let path = dir.join("config.yaml");
        let tmp = dir.join(format!(".config.yaml.{}", std::process::id()));
        let written = std::fs::write(&tmp, &o.config_yaml).and_then(|()| std::fs::rename(&tmp, &path));
        match written {
            Ok(()) => log.info(&format!("resolved config: {}", path.display())),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                log.warn(&format!("cannot write the resolved config to {}: {e}", path.display()));
            }
        }
    }
    if let Some(note) = took_over {
        log.warn(&note);
    }
    for w in &resume_warnings {
        log.warn(w);
    }
    match setup.world {
        Some(w) => {
            let p = &w.place;
            let me = format!("{} (node {}, local rank {})", backend.describe(), p.node(), p.local_rank);
            w.store.set(&format!("device/{}", p.rank), me.as_bytes()).map_err(Share::failed)?;
            log.info(&format!(
                "world size {}: {} node(s) x {} process(es) per node; this is rank {}",
                p.world,
                p.num_nodes(),
                p.local_world,
                p.rank
            ));
            if replicas != p.world as u64 {
                log.info(&format!(
                    "DISTRIBUTED asks for {replicas} process(es); the launcher started {}: its shape is the run's (global batch, learning-rate scaling, collectives)",
                    p.world
                ));
            }
            if share.main() {
                for r in 0..p.world {
                    let d = w.store.get(&format!("device/{r}")).map_err(Share::failed)?;
                    log.info(&format!("rank {r}: {}", String::from_utf8_lossy(&d)));
                }
            }
        }
        None => log.info(&format!("device: {}", backend.describe())),
    }

    // The model: a training step for the batch size, and the optimizer's inputs.
    // The first plan is the one of the iteration the run starts at (a
    // checkpoint holds the state of the plan that ran its last iteration).
    let opts = StepOptions::from_config(cfg).map_err(EngineError::Config)?;
    let stages = Stages::from_config(cfg)?;
    let start_at = resumed.as_ref().map_or(0, |c| c.engine.iteration.saturating_sub(1));
    let staged = stages.config(cfg, start_at);
    let (plan, mut compiled) = match &setup.plans {
        Some(run) => {
            let plan = run.step(batch, stages.id(start_at)).map_err(EngineError::Config)?;
            let composed = tessera_compiler::compose::compile(setup.prog, &staged)
                .map_err(|e| EngineError::Config(e.to_string()))?;
            (plan, composed)
        }
        None => {
            training_plan_for(setup.prog, &staged, batch, target).map_err(|e| EngineError::Config(e.to_string()))?
        }
    };
    if staged != *cfg {
        // The optimizer's groups are the full model's (every parameter
        // trainable), which the composition alone gives.
        compiled.param_groups = tessera_compiler::compose::compile(setup.prog, cfg)
            .map_err(|e| EngineError::Config(e.to_string()))?
            .param_groups;
    }
    // The global batch is one replica's, and auto-scaled learning rates
    // follow it (reference 6.3).
    if replicas > 1 && setup.world.is_none() {
        log.warn(&format!(
            "DISTRIBUTED asks for {replicas} replicas; this run is one process, so the global batch is {batch} (auto-scaled learning rates use it)"
        ));
    }
    let world = RunShape {
        batch_per_replica: batch,
        num_nodes: get_u64(cfg, "DISTRIBUTED.NUM_NODES")?,
        procs_per_node: get_u64(cfg, "DISTRIBUTED.NUM_PROC_PER_NODE")?,
        num_epochs,
    };
    let lr = schedule::from_config(cfg, "lr", world).map_err(|e| EngineError::Config(e.to_string()))?;
    let lr_head = if get_bool(cfg, "OPTIMIZER.head_optimizer_params.use_different_lr") {
        Some(schedule::from_config(cfg, "lr_head", world).map_err(|e| EngineError::Config(e.to_string()))?)
    } else {
        None
    };
    let adam = match opts.optimizer {
        Optimizer::AdamW { beta1, beta2, .. } => Some((beta1, beta2)),
        Optimizer::Sgd { .. } => None,
    };
    let mut late_starts: Vec<u64> = opts.late_start.iter().map(|(_, n)| *n).filter(|&n| n > 0).collect();
    late_starts.sort();
    late_starts.dedup();
    let optim = Optim { groups: compiled.param_groups.clone(), lr, lr_head, adam, late_starts };
    // A step that cannot fit in the memory there is is refused before
    // anything (the parameters first) is allocated.
    let available = match backend.memory() {
        Some((free, _)) => {
            Some(crate::memory_check::Available { bytes: free, source: "the device's free memory".to_string() })
        }
        None => crate::memory_check::host_available(),
    };
    if let Some(available) = &available {
        let step = || {
            tessera_compiler::pipeline::training_graph(
                setup.prog,
                &staged,
                tessera_compiler::pipeline::PassChoice::for_target(&staged, target),
            )
            .map(|(g, _, _)| g)
            .map_err(|e| e.to_string())
        };
        crate::memory_check::check(&plan, batch, available, &step, &compiled.graph).map_err(EngineError::Config)?;
    }
    let mut first = backend.executor(plan, seed).map_err(|e| EngineError::Runtime(e.to_string()))?;
    share.attach(&mut first)?;
    let key = (batch, stages.id(start_at));
    let mut steps = Steps {
        prog: setup.prog,
        cfg,
        stages,
        seed,
        backend,
        target,
        compiled: setup.plans.as_ref(),
        by_key: HashMap::from([(key, first)]),
        current: key,
        share: share.clone(),
    };

    let mut meter = meter_of(cfg, &compiled.composition.features)?;
    let train_meter = get_bool(cfg, "METERS.enable_training_meter");
    let mut state = EngineState {
        version: FORMAT_VERSION,
        phase_idx: 0,
        train_phase_idx: 0,
        iteration: 0,
        iteration_in_epoch: 0,
        rng_step: 0,
        seed,
        losses: Vec::new(),
        meters: Value::Null,
        int_state: BTreeMap::new(),
        finished: false,
        test_pending: false,
        steps_per_epoch: per_epoch,
        num_epochs,
        batch,
        world: share.size as u64,
    };
    let mut last_checkpoint: Option<PathBuf> = None;
    if let (Some(c), Some(p)) = (resumed, &resume_from) {
        let e = &c.engine;
        if e.world != share.size as u64 {
            return Err(EngineError::Config(format!(
                "checkpoint {} was written by a run of {} process(es); this run has {}. The data each process saw and its position in the epoch depend on the world size: resume with the same DISTRIBUTED.NUM_NODES x NUM_PROC_PER_NODE, or set CHECKPOINT.OVERWRITE_EXISTING=true (or another CHECKPOINT.DIR) to start over (MODEL.WEIGHTS_INIT.PARAMS_FILE can take the checkpoint's weights)",
                p.display(),
                e.world,
                share.size
            )));
        }
        if e.steps_per_epoch != 0 && (e.steps_per_epoch, e.num_epochs, e.batch) != (per_epoch, num_epochs, batch) {
            return Err(EngineError::Config(format!(
                "checkpoint {} is of a run with {} epochs of {} steps of batch {}; this config makes {num_epochs} epochs of {per_epoch} steps of batch {batch}. Resume with the same data and OPTIMIZER.num_epochs / BATCHSIZE_PER_REPLICA, or set CHECKPOINT.OVERWRITE_EXISTING=true (or another CHECKPOINT.DIR) to start over",
                p.display(),
                e.num_epochs,
                e.steps_per_epoch,
                e.batch
            )));
        }
        restore(steps.active_mut(), &c, p, share.rank, share.size)?;
        state = c.engine;
        state.int_state.clear();
        // The saved meter holds every rank's counts: rank 0 takes it over.
        if let (Some(m), Ok(saved), true) =
            (&mut meter, serde_json::from_value::<AccuracyListMeter>(state.meters.clone()), share.main())
        {
            if saved.topk == m.topk && saved.num_meters() == m.num_meters() && saved.is_consistent() {
                *m = saved;
            } else if state.iteration_in_epoch > 0 {
                log.warn(&format!(
                    "checkpoint {}: its meter state does not fit this run's meter (METERS); the epoch's training meter restarts from zero",
                    p.display()
                ));
            }
        }
        log.info(&format!(
            "resuming from {} (epoch {}, iteration {})",
            p.display(),
            state.train_phase_idx,
            state.iteration
        ));
        last_checkpoint = Some(p.clone());
    } else {
        log.info(&format!(
            "training {} on {}: {num_epochs} epochs of {per_epoch} steps, batch {batch}, checkpoints in {}",
            get_str(cfg, "MODEL.TRUNK.NAME"),
            if target == PlanTarget::Cpu { "the CPU" } else { "the GPU" },
            dir.display()
        ));
        weights_init(steps.active_mut(), cfg, &mut log)?;
        teacher_init(steps.active_mut(), cfg, &mut log)?;
    }
    // Every rank starts from rank 0's model (as DDP broadcasts it): the
    // same seed initialises the same values, and this makes sure of it.
    // Rank-local states (SwAV's queues) stay each rank's own.
    if share.size > 1 {
        let local = steps.active().plan().rank_local_states();
        let names: Vec<String> = steps.active().state_names().into_iter().filter(|n| !local.contains(n)).collect();
        share.broadcast_states(steps.active_mut(), &names)?;
    }

    if test_only {
        let Some(m) = meter.as_ref() else {
            return Err(EngineError::Config(
                "config key `TEST_ONLY` runs the test phase: it needs a meter (METERS.name: accuracy_list_meter)"
                    .into(),
            ));
        };
        let weights = match &last_checkpoint {
            Some(p) => format!("checkpoint {}", p.display()),
            None => init_file.clone(),
        };
        log.info(&format!("TEST_ONLY: the test phase of {weights}"));
        let epoch = state.train_phase_idx.saturating_sub(1);
        let mut ctx = TestPhase { prog: setup.prog, cfg, seed, eval: &mut HashMap::new(), log: &mut log };
        let test = setup.test.as_mut().expect("checked above");
        ctx.run(test.as_mut(), &mut steps, m, &mut state, epoch)?;
        let summary = log.last_phase_text().unwrap_or_default();
        log.flush();
        share.any(false)?;
        return Ok(Outcome::Evaluated { weights, summary });
    }
    let moco_momentum = get(cfg, "LOSS.moco_loss.momentum").and_then(Value::as_f64).unwrap_or(0.999);
    let ckpt_freq = get_u64(cfg, "CHECKPOINT.CHECKPOINT_FREQUENCY")?.max(1);
    let iter_freq = get_i64(cfg, "CHECKPOINT.CHECKPOINT_ITER_FREQUENCY")?;
    // tessera's key: keep only the newest K iteration checkpoints (-1: all).
    let keep_iterations = match get_i64(cfg, "CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS")? {
        -1 => None,
        k if k >= 1 => Some(k as usize),
        k => {
            return Err(EngineError::Config(format!(
                "config key `CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS` is {k}: give how many iteration checkpoints to keep (at least 1), or -1 to keep them all"
            )))
        }
    };
    let log_freq = get_u64(cfg, "LOG_FREQUENCY")?;
    let test_model = get_bool(cfg, "TEST_MODEL") && setup.test.is_some() && meter.is_some();
    if get_bool(cfg, "TEST_MODEL") && meter.is_none() {
        log.info("TEST_MODEL is set but no meter is configured (METERS.name): no test phase");
    }
    let test_every = get_u64(cfg, "TEST_EVERY_NUM_EPOCH")?.max(1);
    let mut eval: HashMap<u64, Executor> = HashMap::new();

    // Rank 0 writes (with every rank's meter counts); the others name the
    // file it writes.
    let write_checkpoint = |steps: &Steps,
                            state: &EngineState,
                            meter: &Option<AccuracyListMeter>,
                            name: String,
                            log: &mut RunLog,
                            last: &Option<PathBuf>| {
        let mut s = state.clone();
        s.rng_step = steps.active().step();
        let meter = meter.as_ref().map(|m| share.meter(m)).transpose()?;
        let local = share.gather_local(steps.active())?;
        // Rank 0 writes, and only a finite state: a checkpoint is what a
        // failed run goes back to. Every rank learns whether it did, so
        // all stop together when it could not.
        let written = if share.main() {
            (|| {
                s.meters =
                    meter.as_ref().map(|m| serde_json::to_value(m).expect("meters serialise")).unwrap_or(Value::Null);
                log.flush();
                let mut ckpt = snapshot(steps.active(), s)?;
                for t in ckpt.model.iter_mut() {
                    if let Some((shape, data)) = local.get(&t.name) {
                        (t.shape, t.data) = (shape.clone(), data.clone());
                    }
                }
                if let Some(bad) = checkpoint::non_finite(&ckpt.model, &ckpt.optimizer) {
                    return Err(EngineError::NonFiniteState {
                        iteration: ckpt.engine.iteration,
                        detail: bad.to_string(),
                        checkpoint: name.clone(),
                        last_checkpoint: last.clone(),
                    });
                }
                let path = checkpoint::write(&dir, &name, &ckpt)?;
                log.info(&format!("checkpoint {}", path.display()));
                if let Some(keep) = keep_iterations {
                    let removed = checkpoint::prune_iterations(&dir, keep, &path);
                    if !removed.is_empty() {
                        log.info(&format!(
                            "removed {} (CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS={keep})",
                            removed.join(", ")
                        ));
                    }
                }
                Ok::<PathBuf, EngineError>(path)
            })()
        } else {
            Ok(dir.join(&name))
        };
        if share.any(written.is_err())? && written.is_ok() {
            return Err(EngineError::Runtime(format!(
                "rank 0 could not write checkpoint {name} (its error says why); every rank stops"
            )));
        }
        written
    };

    let started = Instant::now();
    let start_iteration = state.iteration;
    // VISSL's phase rules (reference 8.2; `_build_phases`): checkpoint after
    // train phase i when i % CHECKPOINT_FREQUENCY == 0 and after the last;
    // test after train phase i when i % TEST_EVERY_NUM_EPOCH == 0 and after the last.
    let checkpoint_after = |epoch: u64| epoch.is_multiple_of(ckpt_freq) || epoch + 1 == num_epochs;
    let test_after = |epoch: u64| test_model && (epoch.is_multiple_of(test_every) || epoch + 1 == num_epochs);
    // A test phase the last checkpoint was written before (a crash during
    // it, or a test phase that failed). A run that does not test (VISSL
    // builds its phases from the config: with TEST_MODEL off there are none)
    // skips it with a warning; the checkpoint keeps it pending, so a later
    // run with testing on still runs it.
    if state.test_pending {
        // `checkpoint::read` refuses a pending test phase before any epoch.
        let epoch = state.train_phase_idx.saturating_sub(1);
        match (test_model, setup.test.as_mut(), meter.as_ref()) {
            (true, Some(test), Some(m)) => {
                let mut ctx = TestPhase { prog: setup.prog, cfg, seed, eval: &mut eval, log: &mut log };
                ctx.run(test.as_mut(), &mut steps, m, &mut state, epoch)?;
                finish_test(&last_checkpoint, &mut state, num_epochs, share.main())?;
            }
            (_, test, m) => {
                let why = if !get_bool(cfg, "TEST_MODEL") {
                    "TEST_MODEL is off"
                } else if m.is_none() {
                    "no meter is configured (METERS.name is empty)"
                } else if test.is_none() {
                    "no test data was given"
                } else {
                    "this run does not test"
                };
                let at = last_checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                log.warn(&format!(
                    "the test phase after epoch {epoch} did not finish before checkpoint {at} was written; {why}, so it is skipped (the checkpoint still records it as pending: a run with testing on runs it)"
                ));
                state.test_pending = false;
                state.finished = state.train_phase_idx == num_epochs;
            }
        }
    }
    // With several ranks, whether any asks to stop travels with each step's
    // loss (one collective a step); the first step of the run asks alone.
    let mut agreed_stop: Option<bool> = None;
    // Alone, a signal cuts a blocked wait for a batch short (the run then
    // stops at once). With several ranks every rank must stop after the
    // same step, which they agree on through the step's collective: a rank
    // whose wait ended early would leave the others waiting in it, so ranks
    // wait for their batch (a FIFO or device named like an image is refused
    // without blocking either way).
    if share.size == 1 {
        setup.train.interrupt_on(setup.stop.clone());
        if let Some(t) = setup.test.as_mut() {
            t.interrupt_on(setup.stop.clone());
        }
    }
    for epoch in state.train_phase_idx..num_epochs {
        let skip = state.iteration_in_epoch;
        if skip == 0 {
            state.losses.clear();
            if let Some(m) = &mut meter {
                m.reset();
            }
        }
        let mut window = (Instant::now(), 0u64);
        if hist.params && epoch == 0 && skip == 0 {
            // Before training (VISSL: on_phase_start of train phase 0).
            histograms::params(&mut log, steps.active(), -1)?;
        }
        // The epoch's last gradients, for its phase-end histograms.
        let mut last_grads = BTreeMap::new();
        let mut batches = setup.train.epoch(epoch, skip).peekable();
        perf.phase_start();
        let mut batch_start = Instant::now();
        loop {
            let waited = Instant::now();
            let Some(b) = batches.next() else { break };
            perf.add(Section::ReadSample, waited);
            let signalled = setup.stop.load(Ordering::SeqCst);
            let stopping = match agreed_stop.take() {
                Some(agreed) => agreed,
                None => share.any(signalled)?,
            };
            if stopping || setup.max_steps.is_some_and(|m| state.iteration >= m) {
                let reason = if stopping { "signal" } else { "step limit" };
                drop(batches);
                log.end_progress();
                let name = checkpoint::iteration_name(state.iteration);
                let path = if last_checkpoint.as_ref().is_some_and(|p| p.ends_with(&name)) {
                    last_checkpoint.clone().expect("checked")
                } else {
                    write_checkpoint(&steps, &state, &meter, name, &mut log, &last_checkpoint)?
                };
                log.info(&format!("stopped ({reason}) at iteration {}", state.iteration));
                log.flush();
                // No rank leaves while another still reports to the store
                // (rank 0 may host it).
                share.any(false)?;
                return Ok(Outcome::Stopped { checkpoint: path, iteration: state.iteration, reason });
            }
            let Batch { images, labels, size } = b.map_err(EngineError::Data)?;
            let same_stage_next =
                steps.stages.id(state.iteration.saturating_add(1)) == steps.stages.id(state.iteration);
            let ex = steps.get(size as u64, state.iteration)?;
            let planned_peak = ex.plan().memory.as_ref().map_or(0, |m| m.peak_bytes);
            let needs = |name: &str| ex.plan().input(name).is_some();
            let iteration = state.iteration;
            let (mut inputs, lr_now) =
                step_scalars(&optim, iteration, total, per_epoch, &labels, &needs, moco_momentum);
            inputs.extend(images);
            let (names, tensors): (Vec<String>, Vec<Tensor>) = inputs.into_iter().unzip();
            let given: Vec<(&str, Tensor)> = names.iter().map(String::as_str).zip(tensors).collect();
            // The next step's inputs when the same plan runs it (same batch
            // size and stage): a GPU copies them over while this step
            // computes (the CPU backends have nothing to overlap).
            let overlaps = matches!(ex, Executor::Cuda(_));
            let grads_at_end = hist.grads && batches.peek().is_none();
            let next_scalars = match batches.peek() {
                Some(Ok(nb)) if overlaps && nb.size == size && same_stage_next => {
                    let (s, _) = step_scalars(
                        &optim,
                        iteration.saturating_add(1),
                        total,
                        per_epoch,
                        &nb.labels,
                        &needs,
                        moco_momentum,
                    );
                    Some(s)
                }
                _ => None,
            };
            let next: Option<Vec<(&str, &Tensor)>> = match (batches.peek(), &next_scalars) {
                (Some(Ok(nb)), Some(s)) => Some(s.iter().chain(&nb.images).map(|(n, t)| (n.as_str(), t)).collect()),
                _ => None,
            };
            // Read back only what the loop uses: the loss, and the model's
            // outputs when the training meter is on (not the gradients).
            let meter_on = meter.is_some() && train_meter;
            // ... and the gradients on the steps whose histograms are written.
            let grads_now = hist.grads_after(iteration.saturating_add(1));
            let grads_on = grads_now || grads_at_end;
            let wanted = |name: &str| {
                name == "loss" || (meter_on && name.starts_with("output")) || (grads_on && name.starts_with("grad."))
            };
            if hist.params_before(iteration) {
                histograms::params(&mut log, ex, iteration as i64)?;
            }
            let stepped = Instant::now();
            let out = ex
                .run_next(&given, next.as_deref(), Some(&wanted))
                .map_err(|e| EngineError::Runtime(format!("iteration {}: {e}", state.iteration)))?;
            perf.add(Section::TrainStep, stepped);
            let loss = out.get("loss").and_then(|t| t.as_f32()).map(|v| v[0]).unwrap_or(f32::NAN);
            // The logged loss is the mean of every rank's (each a mean over
            // its own samples), the global batch's loss.
            // A signal reaches the ranks at different steps; all stop after
            // the same one.
            let loss = if share.size > 1 {
                let mut v = [loss as f64, f64::from(u8::from(setup.stop.load(Ordering::SeqCst)))];
                share.sum(&mut v)?;
                agreed_stop = Some(v[1] > 0.0);
                (v[0] / share.size as f64) as f32
            } else {
                loss
            };
            if !loss.is_finite() {
                log.end_progress();
                log.flush();
                return Err(EngineError::NonFinite { loss, iteration: state.iteration, epoch, last_checkpoint });
            }
            if let (Some(m), true) = (&mut meter, train_meter) {
                let metered = Instant::now();
                update_meter(m, &out, &labels)?;
                perf.add(Section::Meters, metered);
            }
            if let Some(report) = perf.batch_done(batch_start.elapsed().as_secs_f64()) {
                log.info(&report);
            }
            batch_start = Instant::now();
            advance(&mut state.iteration, "iteration")?;
            advance(&mut state.iteration_in_epoch, "iteration_in_epoch")?;
            if grads_now {
                histograms::grads(&mut log, &out, state.iteration as i64);
            }
            if grads_at_end {
                last_grads = out;
            }
            // The launcher names a failed rank's last step from this.
            if let Some(w) = setup.world {
                w.store
                    .set(&format!("step/{}", w.rank()), state.iteration.to_string().as_bytes())
                    .map_err(Share::failed)?;
            }
            state.losses.push(loss as f64);
            window.1 += size as u64 * share.size as u64;
            let elapsed = started.elapsed().as_secs_f64();
            let done_here = (state.iteration - start_iteration).max(1);
            let eta = elapsed / done_here as f64 * total.saturating_sub(state.iteration) as f64;
            let ips = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
            log.progress(&Progress {
                epoch,
                epochs: num_epochs,
                done: state.iteration_in_epoch,
                total: per_epoch,
                loss: loss as f64,
                lr: lr_now,
                images_per_sec: ips,
                eta_seconds: eta,
            });
            if is_log_step(state.iteration, log_freq) {
                // VISSL's keys (LogLossLrEtaHook, so its log parsers read
                // these files), then tessera's. peak_mem(M): the step's
                // planned peak in MiB (VISSL: CUDA's peak allocation).
                let window_steps = (window.1 / (size as u64 * share.size as u64).max(1)).max(1);
                let btime_ms = window.0.elapsed().as_secs_f64() * 1e3 / window_steps as f64;
                let mut record = json!({
                    "Rank": share.rank,
                    "ep": epoch,
                    "iter": state.iteration,
                    "lr": lr_now,
                    "loss": loss,
                    "btime(ms)": btime_ms.round() as u64,
                    "eta": crate::logs::vissl_eta(eta),
                    "peak_mem(M)": planned_peak >> 20,
                    "weight_decay": optim.groups.first().map_or(0.0, |g| g.weight_decay),
                    "iteration": state.iteration,
                    "epoch": epoch,
                    "images_per_sec": ips,
                    "eta_seconds": eta,
                    "elapsed_seconds": elapsed,
                });
                if let Some((key, ms, eta)) = perf.rolling(total.saturating_sub(state.iteration)) {
                    record[key] = json!(ms);
                    record["rolling_eta"] = json!(crate::logs::vissl_eta(eta));
                }
                log.step(&record);
                // VISSL's TensorBoard scalars (SSLTensorboardHook.on_update);
                // Speed/images_per_sec, the whole world's, is tessera's.
                let mut scalars = vec![
                    ("Training/Loss", loss as f64),
                    ("Training/Learning_rate", lr_now),
                    ("Speed/Batch_processing_time_ms", btime_ms.round()),
                    ("Speed/img_per_sec_per_gpu", (size as f64 * 1e3 / btime_ms.max(1e-9)).floor()),
                    ("Speed/ETA_hours", eta / 3600.0),
                    ("Speed/images_per_sec", ips),
                ];
                if overlaps {
                    // On a GPU the arena is allocated once, at the plan's peak.
                    scalars.push(("Memory/Peak_GPU_Memory_allocated_MiB", planned_peak as f64 / (1 << 20) as f64));
                }
                log.scalars(state.iteration as i64, &scalars);
                window = (Instant::now(), 0);
            }
            // An iteration checkpoint, unless the phase checkpoint right after
            // this step (the epoch's last) will hold the same state.
            let epoch_end = state.iteration_in_epoch >= per_epoch;
            if iter_freq > 0
                && state.iteration.is_multiple_of(iter_freq as u64)
                && !(epoch_end && checkpoint_after(epoch))
            {
                log.end_progress();
                last_checkpoint = Some(write_checkpoint(
                    &steps,
                    &state,
                    &meter,
                    checkpoint::iteration_name(state.iteration),
                    &mut log,
                    &last_checkpoint,
                )?);
            }
        }
        drop(batches);
        log.end_progress();
        for w in setup.train.take_warnings() {
            log.warn(&w);
        }
        // End of the train phase.
        state.train_phase_idx = epoch + 1;
        state.iteration_in_epoch = 0;
        let mean_loss = state.losses.iter().sum::<f64>() / state.losses.len().max(1) as f64;
        let mut record = json!({
            "iteration": state.iteration,
            "phase_idx": state.phase_idx,
            "train_phase_idx": epoch,
            "loss": mean_loss,
        });
        if let (Some(m), true) = (&meter, train_meter) {
            record["train_accuracy_list_meter"] = share.meter(m)?.to_json();
        }
        if let Some(report) = perf.phase_end() {
            log.info(&report);
        }
        log.phase(&record);
        if hist.params {
            histograms::params(&mut log, steps.active(), epoch as i64)?;
        }
        if hist.grads {
            histograms::grads(&mut log, &last_grads, epoch as i64);
        }
        advance(&mut state.phase_idx, "phase_idx")?;
        let last = epoch + 1 == num_epochs;
        // The run is finished once its last test phase (if any) is done too.
        state.test_pending = test_after(epoch);
        state.finished = last && !state.test_pending;
        if checkpoint_after(epoch) {
            last_checkpoint = Some(write_checkpoint(
                &steps,
                &state,
                &meter,
                checkpoint::phase_name(epoch, last),
                &mut log,
                &last_checkpoint,
            )?);
        }
        if test_after(epoch) {
            let mut ctx = TestPhase { prog: setup.prog, cfg, seed, eval: &mut eval, log: &mut log };
            let test = setup.test.as_mut().expect("test_model implies a test source");
            ctx.run(test.as_mut(), &mut steps, meter.as_ref().expect("test phases need a meter"), &mut state, epoch)?;
            if checkpoint_after(epoch) {
                finish_test(&last_checkpoint, &mut state, num_epochs, share.main())?;
            } else {
                state.test_pending = false;
            }
        }
    }
    log.flush();
    if share.main() {
        match crate::curves::draw(&dir) {
            Ok(p) => log.info(&format!("loss and accuracy curves: {}", p.display())),
            Err(e) => log.warn(&format!("cannot draw the curves to {}: {e}", dir.join("curves.svg").display())),
        }
    }
    let checkpoint = last_checkpoint.expect("the last epoch writes the final checkpoint");
    log.info(&format!("done: {} iterations; final checkpoint {}", state.iteration, checkpoint.display()));
    share.any(false)?;
    Ok(Outcome::Finished { checkpoint })
}
