//! Parameter schedules: `OPTIMIZER.param_schedulers.{lr, lr_head}` as VISSL
//! resolves and ClassyVision / fvcore evaluate them (reference 6.3).
//!
//! A schedule is a function of `where` in [0, 1), the fraction of training
//! done (completed steps / total steps, computed before the step). With
//! `update_interval: epoch` it is only evaluated at phase boundaries.
//!
//! Auto LR scaling (`auto_lr_scaling.auto_scale`) rewrites the written
//! values from the global batch as VISSL's `infer_learning_rate` does. One
//! divergence (docs/divergences.md): on a single node VISSL computes a
//! composite's linear warmup start as its end and so deletes the warmup;
//! tessera keeps it unless `keep_single_node_warmup: False`.

use serde_json::Value;
use std::f64::consts::PI;

/// fvcore's epsilon when choosing a segment or a step by `where`.
const WHERE_EPSILON: f64 = 1e-6;

#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    Constant(f64),
    /// `end * w + start * (1 - w)`.
    Linear {
        start: f64,
        end: f64,
    },
    /// `end + (start - end) (1 + cos(pi w)) / 2`.
    Cosine {
        start: f64,
        end: f64,
    },
    /// `values[i]` from epoch `milestones[i - 1]` (epochs counted from `where`).
    MultiStep {
        values: Vec<f64>,
        milestones: Vec<u64>,
        num_epochs: u64,
    },
    /// Training split into `values.len()` equal stages.
    Step {
        values: Vec<f64>,
    },
    /// Sub-schedules over fractions of training; each sees `where` rescaled
    /// to its segment or the global one (`fixed`).
    Composite {
        parts: Vec<Segment>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub schedule: Schedule,
    pub length: f64,
    pub rescaled: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateInterval {
    Step,
    Epoch,
}

/// A resolved schedule and when it is applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSchedule {
    pub schedule: Schedule,
    pub interval: UpdateInterval,
}

impl Schedule {
    /// The value at `where` (clamped to [0, 1]).
    pub fn at(&self, w: f64) -> f64 {
        let w = w.clamp(0.0, 1.0);
        match self {
            Schedule::Constant(v) => *v,
            Schedule::Linear { start, end } => end * w + start * (1.0 - w),
            Schedule::Cosine { start, end } => end + 0.5 * (start - end) * (1.0 + (PI * w).cos()),
            Schedule::MultiStep { values, milestones, num_epochs } => {
                let epoch = ((w + WHERE_EPSILON) * *num_epochs as f64) as u64;
                // bisect_right: the number of milestones at or before this epoch.
                let i = milestones.iter().take_while(|&&m| m <= epoch).count();
                values[i.min(values.len() - 1)]
            }
            Schedule::Step { values } => {
                let i = ((w + WHERE_EPSILON) * values.len() as f64) as usize;
                values[i.min(values.len() - 1)]
            }
            Schedule::Composite { parts } => {
                let mut i = 0;
                let mut total = parts[0].length;
                while w + WHERE_EPSILON > total && i + 1 < parts.len() {
                    i += 1;
                    total += parts[i].length;
                }
                let seg = &parts[i];
                let local = if seg.rescaled { (w - (total - seg.length)) / seg.length } else { w };
                seg.schedule.at(local)
            }
        }
    }
}

impl Schedule {
    /// Whether every value the schedule can take is 0: a run under it
    /// would change no parameter.
    pub fn always_zero(&self) -> bool {
        match self {
            Schedule::Constant(v) => *v == 0.0,
            Schedule::Linear { start, end } | Schedule::Cosine { start, end } => *start == 0.0 && *end == 0.0,
            Schedule::MultiStep { values, .. } | Schedule::Step { values } => values.iter().all(|v| *v == 0.0),
            Schedule::Composite { parts } => parts.iter().all(|p| p.schedule.always_zero()),
        }
    }
}

/// What auto-scaling needs to know about the run.
#[derive(Clone, Copy, Debug)]
pub struct RunShape {
    pub batch_per_replica: u64,
    pub num_nodes: u64,
    pub procs_per_node: u64,
    pub num_epochs: u64,
}

/// A config error naming its key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ScheduleError {
    pub key: String,
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> ScheduleError {
    ScheduleError { key: key.to_string(), message: message.into() }
}

fn field<'a>(node: &'a Value, key: &str, name: &str) -> Result<&'a Value, ScheduleError> {
    node.get(name).ok_or_else(|| err(&format!("{key}.{name}"), "is missing"))
}

fn number(node: &Value, key: &str, name: &str) -> Result<f64, ScheduleError> {
    field(node, key, name)?.as_f64().ok_or_else(|| err(&format!("{key}.{name}"), "must be a number"))
}

fn numbers(node: &Value, key: &str, name: &str) -> Result<Vec<f64>, ScheduleError> {
    let k = format!("{key}.{name}");
    let list = field(node, key, name)?.as_array().ok_or_else(|| err(&k, "must be a list of numbers"))?;
    list.iter().map(|v| v.as_f64().ok_or_else(|| err(&k, "must be a list of numbers"))).collect()
}

/// A learning rate as written: a finite number, 0 or above (a negative one
/// would step up the gradient, which no optimizer means).
fn rate(node: &Value, key: &str, name: &str) -> Result<f64, ScheduleError> {
    let v = number(node, key, name)?;
    check_rate(v, &format!("{key}.{name}"))
}

fn rates(node: &Value, key: &str, name: &str) -> Result<Vec<f64>, ScheduleError> {
    let k = format!("{key}.{name}");
    numbers(node, key, name)?.into_iter().enumerate().map(|(i, v)| check_rate(v, &format!("{k}.{i}"))).collect()
}

fn check_rate(v: f64, key: &str) -> Result<f64, ScheduleError> {
    if v.is_finite() && v >= 0.0 {
        return Ok(v);
    }
    Err(err(key, format!("is {v}: a learning rate must be a finite number, 0 or above")))
}

/// Every learning rate written in a scheduler, whichever kind `name`
/// picks (a negative one is never meant, even where it is not read yet).
fn written_rates(node: &Value, key: &str) -> Result<(), ScheduleError> {
    for name in ["value", "start_value", "end_value"] {
        if node.get(name).is_some_and(|v| !v.is_null()) {
            rate(node, key, name)?;
        }
    }
    if node.get("values").is_some_and(|v| !v.is_null()) {
        rates(node, key, "values")?;
    }
    if let Some(auto) = node.get("auto_lr_scaling").filter(|a| a.get("base_value").is_some()) {
        rate(auto, &format!("{key}.auto_lr_scaling"), "base_value")?;
    }
    if let Some(Value::Array(subs)) = node.get("schedulers") {
        for (i, sub) in subs.iter().enumerate() {
            written_rates(sub, &format!("{key}.schedulers.{i}"))?;
        }
    }
    Ok(())
}

fn text<'a>(node: &'a Value, key: &str, name: &str) -> Result<&'a str, ScheduleError> {
    field(node, key, name)?.as_str().ok_or_else(|| err(&format!("{key}.{name}"), "must be a string"))
}

/// Parses one (sub-)scheduler as written, without scaling.
fn parse(node: &Value, key: &str, num_epochs: u64) -> Result<Schedule, ScheduleError> {
    let name = text(node, key, "name")?;
    Ok(match name {
        "constant" => Schedule::Constant(rate(node, key, "value")?),
        "linear" => Schedule::Linear { start: rate(node, key, "start_value")?, end: rate(node, key, "end_value")? },
        "cosine" => Schedule::Cosine { start: rate(node, key, "start_value")?, end: rate(node, key, "end_value")? },
        "multistep" => {
            let values = rates(node, key, "values")?;
            let milestones: Vec<u64> = numbers(node, key, "milestones")?.iter().map(|&m| m as u64).collect();
            if values.len() != milestones.len() + 1 {
                return Err(err(
                    &format!("{key}.values"),
                    format!("has {} values for {} milestones (needs one more value)", values.len(), milestones.len()),
                ));
            }
            if milestones.windows(2).any(|w| w[0] >= w[1]) || milestones.iter().any(|&m| m == 0 || m >= num_epochs) {
                return Err(err(
                    &format!("{key}.milestones"),
                    format!("must increase strictly within 1..{num_epochs} (OPTIMIZER.num_epochs)"),
                ));
            }
            Schedule::MultiStep { values, milestones, num_epochs }
        }
        "step" => {
            let values = rates(node, key, "values")?;
            if values.is_empty() {
                return Err(err(&format!("{key}.values"), "needs at least one value"));
            }
            Schedule::Step { values }
        }
        "composite" => {
            let subs = field(node, key, "schedulers")?
                .as_array()
                .ok_or_else(|| err(&format!("{key}.schedulers"), "must be a list of schedulers"))?;
            if subs.is_empty() {
                return Err(err(&format!("{key}.schedulers"), "a composite needs at least one scheduler"));
            }
            let lengths = numbers(node, key, "lengths")?;
            if lengths.len() != subs.len() || lengths.iter().any(|&l| l <= 0.0) {
                return Err(err(
                    &format!("{key}.lengths"),
                    format!("needs one positive length per scheduler ({} schedulers)", subs.len()),
                ));
            }
            let sum: f64 = lengths.iter().sum();
            if (sum - 1.0).abs() > 1e-3 {
                return Err(err(&format!("{key}.lengths"), format!("must add up to 1 (they add up to {sum})")));
            }
            let scaling = field(node, key, "interval_scaling")?
                .as_array()
                .ok_or_else(|| err(&format!("{key}.interval_scaling"), "must be a list"))?;
            if scaling.len() != subs.len() {
                return Err(err(
                    &format!("{key}.interval_scaling"),
                    format!("needs one of rescaled/fixed per scheduler ({} schedulers)", subs.len()),
                ));
            }
            let mut parts = Vec::with_capacity(subs.len());
            for (i, sub) in subs.iter().enumerate() {
                let rescaled = match scaling[i].as_str() {
                    Some("rescaled") => true,
                    Some("fixed") => false,
                    _ => return Err(err(&format!("{key}.interval_scaling.{i}"), "must be `rescaled` or `fixed`")),
                };
                let sub_key = format!("{key}.schedulers.{i}");
                let schedule = parse(sub, &sub_key, num_epochs)?;
                if matches!(schedule, Schedule::Composite { .. }) {
                    return Err(err(&format!("{sub_key}.name"), "composites do not nest"));
                }
                parts.push(Segment { schedule, length: lengths[i], rescaled });
            }
            // fvcore: the last length absorbs rounding so they sum to 1.
            let head: f64 = parts[..parts.len() - 1].iter().map(|p| p.length).sum();
            if let Some(last) = parts.last_mut() {
                last.length = 1.0 - head;
            }
            Schedule::Composite { parts }
        }
        other => {
            return Err(err(
                &format!("{key}.name"),
                format!("`{other}` is not a scheduler; use constant, linear, cosine, multistep, step or composite"),
            ))
        }
    })
}

/// VISSL's rewrite of one scheduler to the scaled lr (`get_scaled_lr_scheduler`).
fn scale(s: Schedule, lr: f64, key: &str) -> Result<Schedule, ScheduleError> {
    let geometric = |values: &[f64]| -> Result<Vec<f64>, ScheduleError> {
        let gamma = if values.len() > 1 {
            if values[0] == 0.0 {
                return Err(err(&format!("{key}.values"), "auto-scaling needs a non-zero first value"));
            }
            values[1] / values[0]
        } else {
            1.0
        };
        // VISSL rounds gamma to 6 decimals and each value to 8.
        let round = |x: f64, d: i32| (x * 10f64.powi(d)).round() / 10f64.powi(d);
        let gamma = round(gamma, 6);
        Ok((0..values.len()).map(|i| round(lr * gamma.powi(i as i32), 8)).collect())
    };
    Ok(match s {
        Schedule::Constant(_) => Schedule::Constant(lr),
        Schedule::Linear { start, .. } => Schedule::Linear { start, end: lr },
        Schedule::Cosine { start, end } => {
            if start == 0.0 {
                return Err(err(&format!("{key}.start_value"), "auto-scaling a cosine needs a non-zero start_value"));
            }
            Schedule::Cosine { start: lr, end: lr * end / start }
        }
        Schedule::MultiStep { values, milestones, num_epochs } => {
            Schedule::MultiStep { values: geometric(&values)?, milestones, num_epochs }
        }
        Schedule::Step { values } => Schedule::Step { values: geometric(&values)? },
        Schedule::Composite { .. } => unreachable!("composites are scaled part by part"),
    })
}

/// Resolves `OPTIMIZER.param_schedulers.<name>` (`lr` or `lr_head`).
pub fn from_config(tree: &Value, name: &str, run: RunShape) -> Result<ParamSchedule, ScheduleError> {
    let key = format!("OPTIMIZER.param_schedulers.{name}");
    let node = tree
        .get("OPTIMIZER")
        .and_then(|o| o.get("param_schedulers"))
        .and_then(|p| p.get(name))
        .ok_or_else(|| err(&key, "is missing"))?;
    let interval = match text(node, &key, "update_interval")? {
        "step" => UpdateInterval::Step,
        "epoch" => UpdateInterval::Epoch,
        _ => return Err(err(&format!("{key}.update_interval"), "must be `step` or `epoch`")),
    };
    written_rates(node, &key)?;
    let mut schedule = parse(node, &key, run.num_epochs)?;
    let auto_key = format!("{key}.auto_lr_scaling");
    let auto = field(node, &key, "auto_lr_scaling")?;
    if auto.get("auto_scale").and_then(Value::as_bool).unwrap_or(false) {
        let base = rate(auto, &auto_key, "base_value")?;
        let base_batch = number(auto, &auto_key, "base_lr_batch_size")?;
        if base_batch <= 0.0 {
            return Err(err(&format!("{auto_key}.base_lr_batch_size"), "must be positive"));
        }
        let sqrt = match text(auto, &auto_key, "scaling_type")? {
            "linear" => false,
            "sqrt" => true,
            _ => return Err(err(&format!("{auto_key}.scaling_type"), "must be `linear` or `sqrt`")),
        };
        let factor = |batch: u64| {
            let r = batch as f64 / base_batch;
            base * if sqrt { r.sqrt() } else { r }
        };
        let global = run.batch_per_replica * run.num_nodes * run.procs_per_node;
        let lr = factor(global);
        schedule = match schedule {
            Schedule::Composite { parts } => {
                let keep_warmup = node.get("keep_single_node_warmup").and_then(Value::as_bool).unwrap_or(false);
                let mut out: Vec<Segment> = Vec::with_capacity(parts.len());
                for (i, seg) in parts.into_iter().enumerate() {
                    let sub_key = format!("{key}.schedulers.{i}");
                    let schedule = match seg.schedule {
                        // A linear warmup first (`resolve_linear_schedule`): it
                        // starts at one node's scaled lr and ends at the global one.
                        Schedule::Linear { start, end } if i == 0 => {
                            if run.num_nodes == 1 {
                                if !keep_warmup {
                                    continue; // VISSL: start == end, the warmup is deleted.
                                }
                                // tessera: the written start/end ratio, as cosines keep theirs.
                                let start = if end != 0.0 { lr * start / end } else { start };
                                Schedule::Linear { start, end: lr }
                            } else {
                                Schedule::Linear { start: factor(run.batch_per_replica * run.procs_per_node), end: lr }
                            }
                        }
                        other => scale(other, lr, &sub_key)?,
                    };
                    out.push(Segment { schedule, ..seg });
                }
                if out.len() == 1 {
                    // VISSL copies the lone scheduler to the top level: it
                    // runs over the whole of training from where = 0.
                    out.pop().expect("one segment").schedule
                } else {
                    let total: f64 = out.iter().map(|s| s.length).sum();
                    out.iter_mut().for_each(|s| s.length /= total);
                    Schedule::Composite { parts: out }
                }
            }
            other => scale(other, lr, &key)?,
        };
    }
    Ok(ParamSchedule { schedule, interval })
}

/// Resolves the schedules a run uses (`lr`, and `lr_head` with
/// `OPTIMIZER.head_optimizer_params.use_different_lr`) and refuses a run
/// whose learning rate is 0 from start to end: it would train nothing.
pub fn check_config(tree: &Value, run: RunShape) -> Result<(), ScheduleError> {
    let lr = from_config(tree, "lr", run)?;
    let head = tree.pointer("/OPTIMIZER/head_optimizer_params/use_different_lr").and_then(Value::as_bool);
    let lr_head = match tree.pointer("/OPTIMIZER/param_schedulers/lr_head") {
        Some(_) if head == Some(true) => Some(from_config(tree, "lr_head", run)?),
        Some(node) => {
            written_rates(node, "OPTIMIZER.param_schedulers.lr_head")?;
            None
        }
        None => None,
    };
    if !lr.schedule.always_zero() || lr_head.as_ref().is_some_and(|h| !h.schedule.always_zero()) {
        return Ok(());
    }
    let key = match lr_head {
        Some(_) => "OPTIMIZER.param_schedulers.lr` and `lr_head",
        None => "OPTIMIZER.param_schedulers.lr",
    };
    Err(err(
        key,
        "the learning rate is 0 for the whole run, so training would change no parameter; set a positive value (to evaluate weights without training, set TEST_ONLY: True)",
    ))
}

impl ParamSchedule {
    /// The value for the step about to run: `where` is `done / total` steps,
    /// or, updated per epoch, the start of the current epoch.
    pub fn value(&self, done: u64, total: u64, steps_per_epoch: u64) -> f64 {
        let total = total.max(1);
        let done = match self.interval {
            UpdateInterval::Step => done,
            UpdateInterval::Epoch => done - done % steps_per_epoch.max(1),
        };
        self.schedule.at(done as f64 / total as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12 + 1e-9 * b.abs(), "{a} vs {b}");
    }

    fn composite_tree(auto: bool, keep: bool) -> Value {
        json!({"OPTIMIZER": {"param_schedulers": {"lr": {
            "auto_lr_scaling": {"auto_scale": auto, "base_value": 0.0005, "base_lr_batch_size": 512, "scaling_type": "linear"},
            "name": "composite",
            "schedulers": [
                {"name": "linear", "start_value": 0.00001, "end_value": 0.0005},
                {"name": "cosine", "start_value": 0.0005, "end_value": 0.000001}
            ],
            "interval_scaling": ["rescaled", "fixed"],
            "update_interval": "step",
            "lengths": [0.05, 0.95],
            "keep_single_node_warmup": keep
        }}}})
    }

    /// The resolved values of reference 6.3's table for 16gpu_deit_b_example.
    #[test]
    fn deit_b_on_two_nodes_warms_up_from_one_nodes_lr_then_steps_down_into_a_fixed_cosine() {
        let run = RunShape { batch_per_replica: 32, num_nodes: 2, procs_per_node: 8, num_epochs: 300 };
        let s = from_config(&composite_tree(true, false), "lr", run).unwrap().schedule;
        close(s.at(0.0), 2.5e-4);
        close(s.at(0.025), 3.75e-4);
        // At 5% the fixed cosine takes over at its own where = 0.05.
        let at_switch = 1e-6 + 0.5 * (5e-4 - 1e-6) * (1.0 + (PI * 0.05).cos());
        close(s.at(0.05), at_switch);
        assert!((s.at(0.05) - 4.969e-4).abs() < 1e-7);
        close(s.at(1.0), 1e-6);
    }

    #[test]
    fn on_one_node_vissl_deletes_the_warmup_and_tessera_keeps_it_when_asked() {
        let run = RunShape { batch_per_replica: 64, num_nodes: 1, procs_per_node: 8, num_epochs: 300 };
        // Global 512: scaled lr 5e-4.
        let vissl = from_config(&composite_tree(true, false), "lr", run).unwrap().schedule;
        assert_eq!(vissl, Schedule::Cosine { start: 5e-4, end: 5e-4 * 1e-6 / 5e-4 });
        close(vissl.at(0.0), 5e-4);
        let kept = from_config(&composite_tree(true, true), "lr", run).unwrap().schedule;
        close(kept.at(0.0), 5e-4 * 0.00001 / 0.0005);
        close(kept.at(0.04), 5e-4 * (0.02 + 0.98 * 0.8));
        close(kept.at(1.0), 1e-6);
    }

    #[test]
    fn written_values_are_used_without_auto_scaling() {
        let run = RunShape { batch_per_replica: 8, num_nodes: 1, procs_per_node: 1, num_epochs: 10 };
        let s = from_config(&composite_tree(false, false), "lr", run).unwrap().schedule;
        close(s.at(0.0), 1e-5);
        close(s.at(0.025), 0.5 * (1e-5 + 5e-4));
    }

    #[test]
    fn multistep_and_step_follow_epochs_and_stages() {
        let s = Schedule::MultiStep { values: vec![0.1, 0.01, 0.001], milestones: vec![30, 60], num_epochs: 90 };
        close(s.at(0.0), 0.1);
        close(s.at(29.0 / 90.0), 0.1);
        close(s.at(30.0 / 90.0), 0.01);
        close(s.at(0.99), 0.001);
        let st = Schedule::Step { values: vec![1.0, 2.0, 3.0, 4.0] };
        close(st.at(0.24), 1.0);
        close(st.at(0.25), 2.0);
        close(st.at(1.0), 4.0);
    }

    #[test]
    fn per_epoch_updates_hold_the_value_for_the_whole_epoch() {
        let p = ParamSchedule { schedule: Schedule::Linear { start: 1.0, end: 0.0 }, interval: UpdateInterval::Epoch };
        // 4 epochs of 10 steps: every step of epoch 1 sees where = 0.25.
        close(p.value(10, 40, 10), 0.75);
        close(p.value(19, 40, 10), 0.75);
        let q = ParamSchedule { interval: UpdateInterval::Step, ..p };
        close(q.value(19, 40, 10), 1.0 - 19.0 / 40.0);
    }

    #[test]
    fn sqrt_scaling_and_multistep_rescaled_geometrically() {
        let tree = json!({"OPTIMIZER": {"param_schedulers": {"lr": {
            "auto_lr_scaling": {"auto_scale": true, "base_value": 0.1, "base_lr_batch_size": 256, "scaling_type": "sqrt"},
            "name": "multistep", "values": [0.1, 0.01, 0.001], "milestones": [30, 60], "update_interval": "epoch"
        }}}});
        let run = RunShape { batch_per_replica: 256, num_nodes: 1, procs_per_node: 4, num_epochs: 90 };
        let s = from_config(&tree, "lr", run).unwrap().schedule;
        let Schedule::MultiStep { values, .. } = s else { panic!() };
        close(values[0], 0.2);
        close(values[1], 0.02);
        close(values[2], 0.002);
    }

    #[test]
    fn bad_schedules_name_their_key() {
        let run = RunShape { batch_per_replica: 8, num_nodes: 1, procs_per_node: 1, num_epochs: 10 };
        let mut tree = composite_tree(false, false);
        tree["OPTIMIZER"]["param_schedulers"]["lr"]["lengths"] = json!([0.5, 0.4]);
        let e = from_config(&tree, "lr", run).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config key `OPTIMIZER.param_schedulers.lr.lengths`: must add up to 1 (they add up to 0.9)"
        );
        let mut tree = composite_tree(false, false);
        tree["OPTIMIZER"]["param_schedulers"]["lr"]["schedulers"][1]["name"] = json!("cosin");
        let e = from_config(&tree, "lr", run).unwrap_err();
        assert_eq!(e.key, "OPTIMIZER.param_schedulers.lr.schedulers.1.name");
        assert!(e.message.contains("`cosin` is not a scheduler"), "{e}");
        let tree = json!({"OPTIMIZER": {"param_schedulers": {"lr": {
            "auto_lr_scaling": {"auto_scale": false}, "name": "multistep", "values": [0.1, 0.01],
            "milestones": [30, 60], "update_interval": "epoch"}}}});
        let e = from_config(&tree, "lr", RunShape { num_epochs: 90, ..run }).unwrap_err();
        assert_eq!(e.key, "OPTIMIZER.param_schedulers.lr.values");
    }
}
