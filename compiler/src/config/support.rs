//! What tessera does with each key of `configs/defaults.yaml` that it does
//! not read: no key is accepted and then silently ignored (issue 15).
//!
//! Every key falls in one of three classes:
//! - **honoured**: read by the compiler, the engine, the data loader or a
//!   model file, and acted on as VISSL does (every key not in [`KEYS`]; the
//!   test `every_key_has_a_status` checks that each is read somewhere);
//! - **refused**: tessera does not implement what a value other than the
//!   default asks for, so setting one is an error naming the key;
//! - **no effect**: the key only tunes how VISSL's Python machinery runs
//!   (start method, allocator caches, host-memory pinning) or is a value
//!   VISSL itself replaces by one it infers; any value is accepted, and the
//!   note says what tessera does instead.
//!
//! `docs/config-keys.md` is the table made from [`KEYS`].

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// A value other than the default is an error; the text says why.
    Refused(&'static str),
    /// Any value is accepted; the text says why it changes nothing.
    NoEffect(&'static str),
}

use Support::{NoEffect, Refused};

/// The keys tessera does not read, by dotted path; `*` matches one segment
/// and a final `*` every key below (the longest match wins).
pub const KEYS: &[(&str, Support)] = &[
    ("VERBOSE", NoEffect("tessera always writes the command, the resolved config.yaml and a line per logged step")),
    ("MULTI_PROCESSING_METHOD", NoEffect("Python's process start method; tessera starts its ranks itself")),
    (
        "REPRODUCIBILITY.CUDDN_DETERMINISTIC",
        NoEffect("tessera's kernels are deterministic: the same run gives the same bits"),
    ),
    ("HOOKS.CHECK_NAN", Refused("tessera always stops at a non-finite loss and names the last finite checkpoint")),
    (
        "HOOKS.MEMORY_SUMMARY.PRINT_MEMORY_SUMMARY",
        NoEffect("the memory is planned before the run: peak_mem(M) in stdout.json, `tessera plan --memory`"),
    ),
    ("HOOKS.MEMORY_SUMMARY.LOG_ITERATION_NUM", NoEffect("read only for PRINT_MEMORY_SUMMARY (see above)")),
    ("HOOKS.MEMORY_SUMMARY.DUMP_MEMORY_ON_EXCEPTION", Refused("there is no allocator state to dump")),
    ("HOOKS.LOG_GPU_STATS", NoEffect("the device is named at the start of log.txt; nvidia-smi is not run")),
    (
        "HOOKS.MODEL_COMPLEXITY.*",
        Refused("use `tessera plan config=NAME --memory` for the FLOPs, bytes and memory of the step"),
    ),
    ("DATA.PIN_MEMORY", NoEffect("on a GPU the next batch is always copied while the step runs")),
    ("DATA.ENABLE_ASYNC_GPU_COPY", NoEffect("on a GPU the next batch is always copied while the step runs")),
    ("DATA.*.USE_DEBUGGING_SAMPLER", Refused("the debugging sampler is not implemented")),
    (
        "DATA.*.USE_STATEFUL_DISTRIBUTED_SAMPLER",
        NoEffect("a resumed run always continues its epoch at the next unseen batch, as the stateful sampler does"),
    ),
    ("DATA.*.REMOVE_IMG_PATH_PREFIX", NoEffect("read only for file lists (disk_filelist), which are refused")),
    ("DATA.*.NEW_IMG_PATH_PREFIX", NoEffect("read only for file lists (disk_filelist), which are refused")),
    ("DATA.*.BASE_DATASET", Refused("only generic_ssl is implemented")),
    ("DATA.*.LABEL_PATHS", NoEffect("read only for file-list labels (disk_filelist), which are refused")),
    ("DATA.*.MMAP_MODE", NoEffect("read only for .npy file lists (disk_filelist), which are refused")),
    ("DATA.*.COPY_DESTINATION_DIR", NoEffect("read only with COPY_TO_LOCAL_DISK, which is refused")),
    ("DATA.*.INPUT_KEY_NAMES", Refused("batches have the single input `data`")),
    ("DATA.*.TARGET_KEY_NAMES", Refused("batches have the single target `label`")),
    ("METERS.model_output_mask", Refused("masked model outputs are not implemented")),
    ("MODEL.BASE_MODEL_NAME", Refused("only multi_input_output_model is implemented")),
    ("MODEL.CUDA_CACHE.*", NoEffect("there is no allocator cache to clear: the memory of the step is planned once")),
    ("MODEL.INPUT_TYPE", Refused("only rgb inputs are implemented")),
    ("MODEL.MULTI_INPUT_HEAD_MAPPING", Refused("models with several inputs are not implemented")),
    ("MODEL.SINGLE_PASS_EVERY_CROP", Refused("crops of one size always go through the trunk in one pass")),
    ("MODEL.FEATURE_EVAL_SETTINGS.EXTRACT_TRUNK_FEATURES_ONLY", Refused("feature extraction is not implemented")),
    (
        "MODEL.FEATURE_EVAL_SETTINGS.ASSERT_HEAD_LAYER_SHAPE_INIT",
        Refused("every shape is checked when the model compiles; the check cannot be turned off"),
    ),
    ("MODEL.FEATURE_EVAL_SETTINGS.SHOULD_FLATTEN_FEATS", Refused("features are always flattened for the heads")),
    (
        "MODEL.AMP_PARAMS.AMP_TYPE",
        NoEffect("mixed precision (USE_AMP) is bf16 compute with f32 master weights whatever the library named"),
    ),
    ("MODEL.AMP_PARAMS.AMP_ARGS", NoEffect("apex's options; see AMP_TYPE")),
    (
        "MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME",
        Refused("weights are read from safetensors files and tessera checkpoints, which have no state-dict key"),
    ),
    ("LOSS.cross_entropy_multiple_output_single_target.reduction", Refused("only the mean is implemented")),
    (
        "LOSS.cross_entropy_multiple_output_single_target.ignore_index",
        Refused("labels are class indices from the data; ignoring a label value is not implemented"),
    ),
    (
        "LOSS.simclr_info_nce_loss.buffer_params.effective_batch_size",
        NoEffect("inferred, as VISSL does: 2 x batch per process x world size"),
    ),
    (
        "LOSS.swav_loss.use_double_precision",
        NoEffect("the float32 Sinkhorn gives the same codes up to rounding (docs/divergences.md)"),
    ),
    ("LOSS.swav_loss.num_prototypes", NoEffect("inferred, as VISSL does, from the prototype heads' sizes")),
    ("LOSS.swav_loss.output_dir", NoEffect("VISSL writes nothing there in training; tessera neither")),
    (
        "LOSS.swav_loss.queue.local_queue_length",
        NoEffect("inferred, as VISSL does: queue_length divided by the world size"),
    ),
    ("OPTIMIZER.use_zero", Refused("ZeRO optimizer-state sharding is not implemented")),
    ("OPTIMIZER.use_larc", Refused("LARC is not implemented")),
    ("OPTIMIZER.larc_config.*", NoEffect("read only with use_larc, which is refused")),
    ("OPTIMIZER.construct_single_param_group_only", Refused("parameter groups are always built as VISSL's default")),
    ("OPTIMIZER.param_group_constructor", Refused("only the default parameter groups are implemented")),
    ("TRAINER.TRAIN_STEP_NAME", Refused("only standard_train_step is implemented")),
    ("TRAINER.TASK_NAME", Refused("only self_supervision_task is implemented")),
    ("CHECKPOINT.APPEND_DISTR_RUN_ID", Refused("checkpoints go to CHECKPOINT.DIR as given")),
    ("CHECKPOINT.BACKEND", Refused("only the disk backend is implemented")),
    (
        "CHECKPOINT.LATEST_CHECKPOINT_RESUME_FILE_NUM",
        Refused("a run resumes from the checkpoint checkpoint.json names, or the newest intact one"),
    ),
    (
        "CHECKPOINT.USE_SYMLINK_CHECKPOINT_FOR_RESUME",
        Refused("the newest checkpoint is named by checkpoint.json, not by a symlink"),
    ),
    (
        "DISTRIBUTED.BACKEND",
        NoEffect("collectives use NCCL between GPUs and tessera's TCP ring between CPU processes, as nccl and gloo do"),
    ),
    ("DISTRIBUTED.NCCL_DEBUG", Refused("set NCCL_DEBUG=INFO in the environment instead")),
    ("DISTRIBUTED.NCCL_SOCKET_NTHREADS", Refused("set NCCL_SOCKET_NTHREADS in the environment instead")),
    (
        "SLURM.USE_SLURM",
        Refused("submitting to SLURM is not implemented; run `srun tessera train ...` (SLURM's variables are read)"),
    ),
    ("SLURM.*", NoEffect("read only with USE_SLURM, which is refused")),
];

/// The status of `path` (a leaf key's segments), if it has one.
pub fn status(path: &[&str]) -> Option<(&'static str, Support)> {
    KEYS.iter()
        .filter(|(pattern, _)| matches(pattern, path))
        .max_by_key(|(pattern, _)| pattern.len())
        .map(|&(p, s)| (p, s))
}

fn matches(pattern: &str, path: &[&str]) -> bool {
    let parts: Vec<&str> = pattern.split('.').collect();
    match parts.split_last() {
        Some((&"*", head)) if head.len() < path.len() => head.iter().zip(path).all(|(p, s)| *p == "*" || p == s),
        _ => parts.len() == path.len() && parts.iter().zip(path).all(|(p, s)| *p == "*" || p == s),
    }
}

/// Whether two config values are the same setting: `1` and `1.0` are, and
/// so are null and an empty default (VISSL files write `KEY:` for "unset").
pub(crate) fn same(a: &Value, b: &Value) -> bool {
    let empty = |v: &Value| match v {
        Value::String(s) => s.is_empty(),
        Value::Array(x) => x.is_empty(),
        Value::Object(x) => x.is_empty(),
        _ => false,
    };
    match (a, b) {
        (Value::Null, v) | (v, Value::Null) if v.is_null() || empty(v) => true,
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// The refused keys of `tree` set to something other than their default in
/// `defaults`, as (dotted key, value, default, why).
pub(crate) fn refused_settings(tree: &Value, defaults: &Value) -> Vec<(String, Value, Value, &'static str)> {
    fn walk(
        tree: &Value,
        defaults: &Value,
        path: &mut Vec<String>,
        out: &mut Vec<(String, Value, Value, &'static str)>,
    ) {
        let segments: Vec<&str> = path.iter().map(String::as_str).collect();
        if let Some((_, Refused(why))) = status(&segments) {
            if !same(tree, defaults) {
                out.push((path.join("."), tree.clone(), defaults.clone(), why));
            }
            return;
        }
        if let (Value::Object(t), Value::Object(d)) = (tree, defaults) {
            for (key, child) in t {
                if let Some(default) = d.get(key) {
                    path.push(key.clone());
                    walk(child, default, path, out);
                    path.pop();
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(tree, defaults, &mut Vec::new(), &mut out);
    out
}

/// `docs/config-keys.md`: every key that is not honoured, with what tessera
/// does.
pub fn table() -> String {
    let mut s = String::from(
        "# Config keys tessera does not read\n\n\
         Generated from `compiler/src/config/support.rs` (the test `the_docs_table_is_current` \
         checks it; `TESSERA_BLESS=1` rewrites it).\n\n\
         Every other key of `configs/defaults.yaml` is **honoured**: read and acted on as VISSL does. \
         A **refused** key set to a value other than its default is an error naming it; a key of \
         **no effect** accepts any value, for the reason given.\n\n\
         | key | status | why |\n|---|---|---|\n",
    );
    for (key, support) in KEYS {
        let (status, why) = match support {
            Refused(w) => ("refused", w),
            NoEffect(w) => ("no effect", w),
        };
        s.push_str(&format!("| `{key}` | {status} | {} |\n", why.replace('|', "\\|")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_one_segment_or_everything_below() {
        assert!(matches("DATA.*.BASE_DATASET", &["DATA", "TRAIN", "BASE_DATASET"]));
        assert!(!matches("DATA.*.BASE_DATASET", &["DATA", "BASE_DATASET"]));
        assert!(matches("SLURM.*", &["SLURM", "MEM_GB"]));
        assert!(!matches("SLURM.*", &["SLURM"]));
        assert_eq!(status(&["SLURM", "USE_SLURM"]).unwrap().0, "SLURM.USE_SLURM");
        assert_eq!(status(&["SLURM", "PARTITION"]).unwrap().0, "SLURM.*");
        assert!(status(&["OPTIMIZER", "name"]).is_none());
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(same(&serde_json::json!(1), &serde_json::json!(1.0)));
        assert!(same(&serde_json::json!({"a": [1, 2.0]}), &serde_json::json!({"a": [1.0, 2]})));
        assert!(same(&serde_json::json!(""), &serde_json::json!(null)));
        assert!(same(&serde_json::json!(null), &serde_json::json!([])));
        assert!(!same(&serde_json::json!(null), &serde_json::json!(false)));
        assert!(!same(&serde_json::json!(null), &serde_json::json!("x")));
    }
}
