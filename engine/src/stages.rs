//! Stages: what VISSL's iteration-keyed hooks change in the training step
//! becomes a change of plan. Each span of iterations between two thresholds
//! (a parameter of MODEL.TEMP_FROZEN_PARAMS_ITER_MAP starting to train,
//! SwAV's queue starting at `queue.start_iter`) has its own plan.

use crate::trainer::EngineError;
use serde_json::Value;

fn get<'a>(cfg: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(cfg, |node, k| node.get(k))
}

fn get_str<'a>(cfg: &'a Value, key: &str) -> &'a str {
    get(cfg, key).and_then(Value::as_str).unwrap_or("")
}

/// What VISSL's iteration-keyed hooks change in the training step, as plans:
/// a parameter in `MODEL.TEMP_FROZEN_PARAMS_ITER_MAP` gets no update before
/// its iteration (FreezeParametersHook: grad None, so AdamW skips it), and
/// SwAV's queue is neither used nor filled before `queue.start_iter`
/// (reference 4.2). Each span of iterations between two such thresholds has
/// its own plan; the state moves between them.
pub struct Stages {
    pub frozen: Vec<(String, u64)>,
    pub queue_start: Option<u64>,
}

impl Stages {
    pub fn from_config(cfg: &Value) -> Result<Stages, EngineError> {
        let frozen = tessera_compiler::autodiff::temp_frozen(cfg).map_err(EngineError::Config)?;
        let swav_queue = get_str(cfg, "LOSS.name") == "swav_loss"
            && get(cfg, "LOSS.swav_loss.queue.queue_length").and_then(Value::as_u64).unwrap_or(0) > 0;
        let start = get(cfg, "LOSS.swav_loss.queue.start_iter").and_then(Value::as_u64).unwrap_or(0);
        Ok(Stages { frozen, queue_start: (swav_queue && start > 0).then_some(start) })
    }

    /// Which plan iteration `iteration` runs: the thresholds it has reached.
    pub fn id(&self, iteration: u64) -> usize {
        self.frozen.iter().map(|(_, n)| *n).chain(self.queue_start).filter(|&n| n <= iteration).count()
    }

    /// The config of that plan.
    pub fn config(&self, cfg: &Value, iteration: u64) -> Value {
        let mut c = cfg.clone();
        let still: Vec<Value> =
            self.frozen.iter().filter(|(_, n)| iteration < *n).map(|(p, _)| Value::String(p.clone())).collect();
        if !still.is_empty() {
            if let Some(Value::Array(a)) = c.pointer_mut("/MODEL/NON_TRAINABLE_PARAMS") {
                a.extend(still);
            } else {
                c["MODEL"]["NON_TRAINABLE_PARAMS"] = Value::Array(still);
            }
        }
        if self.queue_start.is_some_and(|s| iteration < s) {
            c["LOSS"]["swav_loss"]["queue"]["queue_length"] = 0.into();
        }
        c
    }
}

impl Stages {
    /// The first iteration of every stage, in order (stage i starts at the i-th).
    pub fn starts(&self) -> Vec<u64> {
        let mut t: Vec<u64> = self.frozen.iter().map(|(_, n)| *n).chain(self.queue_start).filter(|&n| n > 0).collect();
        t.sort();
        t.dedup();
        let mut starts = vec![0];
        starts.extend(t);
        starts
    }
}
