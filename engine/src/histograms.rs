//! Parameter and gradient histograms for TensorBoard, when and at which
//! step VISSL's SSLTensorboardHook writes them
//! (`HOOKS.TENSORBOARD_SETUP.LOG_PARAMS`, `LOG_PARAMS_GRADIENTS`,
//! `LOG_PARAMS_EVERY_N_ITERS`):
//! - `Parameters/<name>` once before training (step -1), before every step
//!   that starts at an iteration divisible by N (step: that iteration, the
//!   values the step reads), and at the end of each train phase (step: the
//!   phase's index);
//! - `Gradients/<name>` after every step that ends at an iteration divisible
//!   by N (step: that iteration) and at the end of each train phase, of its
//!   last step (step: the phase's index).
//!
//! N <= 0 keeps only the once-per-phase histograms. Only rank 0 writes them;
//! the gradients are the all-reduced ones the optimizer used.

use crate::logs::RunLog;
use crate::trainer::EngineError;
use serde_json::Value;
use std::collections::BTreeMap;
use tessera_runtime::{Executor, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HistogramRule {
    pub params: bool,
    pub grads: bool,
    /// `LOG_PARAMS_EVERY_N_ITERS` when above 0.
    pub every: Option<u64>,
}

impl HistogramRule {
    /// The rule of `cfg`; `writing` is whether this process writes
    /// TensorBoard events (rank 0 with `USE_TENSORBOARD`).
    pub fn of(cfg: &Value, writing: bool) -> HistogramRule {
        let key = |k: &str| cfg.pointer(&format!("/HOOKS/TENSORBOARD_SETUP/{k}"));
        let on = |k: &str| writing && key(k).and_then(Value::as_bool).unwrap_or(false);
        let every = key("LOG_PARAMS_EVERY_N_ITERS").and_then(Value::as_i64).filter(|&n| n > 0).map(|n| n as u64);
        HistogramRule { params: on("LOG_PARAMS"), grads: on("LOG_PARAMS_GRADIENTS"), every }
    }

    /// Parameters before the step that starts at `iteration` (VISSL's on_forward).
    pub fn params_before(&self, iteration: u64) -> bool {
        self.params && self.every.is_some_and(|n| iteration.is_multiple_of(n))
    }

    /// Gradients of the step that ends at iteration `done` (VISSL's on_update).
    pub fn grads_after(&self, done: u64) -> bool {
        self.grads && self.every.is_some_and(|n| done.is_multiple_of(n))
    }
}

/// `Parameters/<name>` of every parameter the active plan holds.
pub fn params(log: &mut RunLog, ex: &Executor, step: i64) -> Result<(), EngineError> {
    for (name, _) in &ex.plan().tables.params {
        let t = ex
            .read_state(name)
            .map_err(|e| EngineError::Runtime(format!("reading parameter {name} for its histogram: {e}")))?;
        if let Some(values) = t.as_ref().and_then(Tensor::as_f32) {
            log.histogram(step, &format!("Parameters/{name}"), values);
        }
    }
    Ok(())
}

/// `Gradients/<name>` of the `grad.<name>` outputs in `out`.
pub fn grads(log: &mut RunLog, out: &BTreeMap<String, Tensor>, step: i64) {
    for (key, t) in out {
        if let (Some(name), Some(values)) = (key.strip_prefix("grad."), t.as_f32()) {
            log.histogram(step, &format!("Gradients/{name}"), values);
        }
    }
}
