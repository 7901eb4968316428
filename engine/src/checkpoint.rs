//! Checkpoints in `CHECKPOINT.DIR`, named as VISSL names them (reference
//! 8.2): `model_phase{N}`, `model_iteration{I}`, and the last one
//! `model_final_checkpoint_phase{N}`. Each is a directory:
//! - `model.safetensors`: parameters and buffers (the state dict, loadable by
//!   `MODEL.WEIGHTS_INIT` and `tessera infer`);
//! - `optimizer.safetensors`: optimizer state (`optim.*`);
//! - `engine.json`: phase, iteration, random-stream step, meters, losses,
//!   and integer state (queue pointers) exactly.
//!
//! Writing is atomic: everything goes to a temporary directory, each file is
//! flushed to disk, the directory is renamed into place, then the pointer
//! `checkpoint.json` (`{"latest": NAME}`) is replaced the same way. A crash at
//! any moment leaves the previous checkpoint and pointer intact.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use tessera_runtime::weights::{read_safetensors, write_safetensors, NamedTensor};

pub const POINTER: &str = "checkpoint.json";
pub const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const ENGINE: &str = "engine.json";

/// Bumped when `engine.json` changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// An integer tensor (queue pointers, counters), kept exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntTensor {
    pub shape: Vec<usize>,
    pub data: Vec<i64>,
}

/// Where training stands: enough to continue as if never stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    pub version: u32,
    /// Phases run so far (train and test).
    pub phase_idx: u64,
    /// Train phases (epochs) completed.
    pub train_phase_idx: u64,
    /// Optimizer steps done.
    pub iteration: u64,
    /// Steps done in the current epoch (non-zero for an iteration checkpoint).
    pub iteration_in_epoch: u64,
    /// The executor's random-stream step (dropout, drop path).
    pub rng_step: u64,
    pub seed: u64,
    /// Loss of every step so far in the current epoch (the log's rolling mean).
    pub losses: Vec<f64>,
    /// Meter state (serialised by its owner).
    pub meters: serde_json::Value,
    pub int_state: BTreeMap<String, IntTensor>,
    /// Whether training finished: the last train phase and the test phase
    /// after it are done.
    pub finished: bool,
    /// A test phase follows this checkpoint and has not run yet (a resume
    /// runs it first).
    #[serde(default)]
    pub test_pending: bool,
    /// The run's shape, checked on resume: steps per epoch, epochs, batch.
    #[serde(default)]
    pub steps_per_epoch: u64,
    #[serde(default)]
    pub num_epochs: u64,
    #[serde(default)]
    pub batch: u64,
    /// Processes of the run (data-parallel world size).
    #[serde(default = "one")]
    pub world: u64,
}

fn one() -> u64 {
    1
}

impl EngineState {
    /// What a resume relies on and a damaged or hand-edited `engine.json`
    /// could break: a pending test phase follows a train phase, the train
    /// phases done are within the run's, and every integer state's values
    /// fill its shape.
    pub fn check(&self) -> Result<(), String> {
        if self.test_pending && self.train_phase_idx == 0 {
            return Err("a test phase is recorded as pending before any train phase (train_phase_idx 0)".into());
        }
        if self.num_epochs != 0 && self.train_phase_idx > self.num_epochs {
            return Err(format!(
                "train_phase_idx {} is beyond the run's {} epochs",
                self.train_phase_idx, self.num_epochs
            ));
        }
        for (name, t) in &self.int_state {
            let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if numel != Some(t.data.len()) {
                return Err(format!("integer state `{name}` has shape {:?} but {} values", t.shape, t.data.len()));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub model: Vec<NamedTensor>,
    pub optimizer: Vec<NamedTensor>,
    pub engine: EngineState,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("could not write checkpoint `{path}`: {message} (the previous checkpoint is intact)")]
    Write { path: PathBuf, message: String },
    #[error("could not read checkpoint `{path}`: {message}")]
    Read { path: PathBuf, message: String },
}

/// Where a checkpoint's state is not finite: how many values are NaN or
/// infinite, and the first tensor (and file) holding one.
#[derive(Clone, Debug, PartialEq)]
pub struct NonFinite {
    pub count: usize,
    pub total: usize,
    pub tensor: String,
    pub file: &'static str,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of its {} values are NaN or infinite, the first in `{}` ({})",
            self.count, self.total, self.tensor, self.file
        )
    }
}

/// The non-finite values of a checkpoint's model and optimizer tensors,
/// if any.
pub fn non_finite(model: &[NamedTensor], optimizer: &[NamedTensor]) -> Option<NonFinite> {
    let (mut count, mut total, mut first) = (0, 0, None);
    for (file, tensors) in [(MODEL, model), (OPTIMIZER, optimizer)] {
        for t in tensors {
            let bad = t.data.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 && first.is_none() {
                first = Some((t.name.clone(), file));
            }
            count += bad;
            total += t.data.len();
        }
    }
    first.map(|(tensor, file)| NonFinite { count, total, tensor, file })
}

/// `model_phase{N}`, `model_iteration{I}`, `model_final_checkpoint_phase{N}`.
pub fn phase_name(train_phase_idx: u64, last: bool) -> String {
    if last {
        format!("model_final_checkpoint_phase{train_phase_idx}")
    } else {
        format!("model_phase{train_phase_idx}")
    }
}

pub fn iteration_name(iteration: u64) -> String {
    format!("model_iteration{iteration}")
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Test hook: writes into this directory fail after the model file, as a
/// full disk would. Scoped to one directory so that tests running at the
/// same time in the process are not affected.
#[doc(hidden)]
pub static FAIL_AFTER_MODEL_FILE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Writes checkpoint `name` in `dir` and points `checkpoint.json` at it.
pub fn write(dir: &Path, name: &str, ckpt: &Checkpoint) -> Result<PathBuf, CheckpointError> {
    let target = dir.join(name);
    let fail = |message: String| CheckpointError::Write { path: target.clone(), message };
    // A checkpoint is what a failed run goes back to: never a non-finite one.
    if let Some(bad) = non_finite(&ckpt.model, &ckpt.optimizer) {
        return Err(fail(format!("the state is not finite: {bad}")));
    }
    fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| -> Result<(), String> {
        fs::create_dir(&tmp).map_err(|e| e.to_string())?;
        let meta = BTreeMap::from([("format".to_string(), "tessera".to_string())]);
        write_safetensors(&tmp.join(MODEL), &ckpt.model, &meta).map_err(|e| e.to_string())?;
        if FAIL_AFTER_MODEL_FILE.lock().map(|d| d.as_deref() == Some(dir)).unwrap_or(false) {
            return Err("No space left on device (os error 28)".into());
        }
        write_safetensors(&tmp.join(OPTIMIZER), &ckpt.optimizer, &meta).map_err(|e| e.to_string())?;
        let json = serde_json::to_vec_pretty(&ckpt.engine).map_err(|e| e.to_string())?;
        write_file_atomic(&tmp.join(ENGINE), &json).map_err(|e| e.to_string())?;
        sync_dir(&tmp).map_err(|e| e.to_string())?;
        // Replace an older checkpoint of the same name (a rerun with
        // OVERWRITE_EXISTING): move it aside first, so one always exists.
        let old = dir.join(format!(".old-{name}-{}", std::process::id()));
        let had_old = target.exists();
        if had_old {
            fs::rename(&target, &old).map_err(|e| e.to_string())?;
        }
        fs::rename(&tmp, &target).map_err(|e| e.to_string())?;
        sync_dir(dir).map_err(|e| e.to_string())?;
        if had_old {
            let _ = fs::remove_dir_all(&old);
        }
        let pointer = serde_json::to_vec(&serde_json::json!({ "latest": name })).map_err(|e| e.to_string())?;
        write_file_atomic(&dir.join(POINTER), &pointer).map_err(|e| e.to_string())?;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(target),
        Err(message) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(fail(message))
        }
    }
}

/// Rewrites a checkpoint's `engine.json` through `f`, atomically (its
/// weights are unchanged): a test phase that ran after the checkpoint.
pub fn update_engine_state(path: &Path, f: impl FnOnce(&mut EngineState)) -> Result<(), CheckpointError> {
    let fail = |message: String| CheckpointError::Write { path: path.to_path_buf(), message };
    let text = fs::read(path.join(ENGINE)).map_err(|e| fail(format!("{ENGINE}: {e}")))?;
    let mut state: EngineState = serde_json::from_slice(&text).map_err(|e| fail(format!("{ENGINE}: {e}")))?;
    f(&mut state);
    let json = serde_json::to_vec_pretty(&state).map_err(|e| fail(e.to_string()))?;
    write_file_atomic(&path.join(ENGINE), &json).map_err(|e| fail(e.to_string()))
}

/// Removes the temporary directories of writes that a killed process left
/// (`.tmp-NAME-PID`, `.old-NAME-PID`); an `.old-` one is moved back first
/// when its checkpoint is missing (a crash between the two renames).
pub fn sweep_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let me = format!("-{}", std::process::id());
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        if name.ends_with(&me) || !p.is_dir() {
            continue;
        }
        if let Some(rest) = name.strip_prefix(".old-") {
            let target = rest.rsplit_once('-').map(|(n, _)| dir.join(n));
            if let Some(t) = target.filter(|t| !t.exists()) {
                if complete(&p) && fs::rename(&p, &t).is_ok() {
                    continue;
                }
            }
            let _ = fs::remove_dir_all(&p);
        } else if name.starts_with(".tmp-") {
            let _ = fs::remove_dir_all(&p);
        }
    }
}

/// Reads a checkpoint directory.
pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let fail = |message: String| CheckpointError::Read { path: path.to_path_buf(), message };
    let model = read_safetensors(&path.join(MODEL)).map_err(|e| fail(e.to_string()))?;
    let optimizer = read_safetensors(&path.join(OPTIMIZER)).map_err(|e| fail(e.to_string()))?;
    let text = fs::read(path.join(ENGINE)).map_err(|e| fail(format!("{ENGINE}: {e}")))?;
    let engine: EngineState = serde_json::from_slice(&text).map_err(|e| fail(format!("{ENGINE}: {e}")))?;
    if engine.version != FORMAT_VERSION {
        return Err(fail(format!("{ENGINE} has format {} (this build reads {FORMAT_VERSION})", engine.version)));
    }
    engine.check().map_err(|m| fail(format!("{ENGINE}: {m}")))?;
    if let Some(bad) = non_finite(&model, &optimizer) {
        return Err(fail(format!("its state is not finite ({bad}): training cannot continue from it")));
    }
    Ok(Checkpoint { model, optimizer, engine })
}

/// The checkpoint to resume from: the pointer's, else the newest complete
/// one on disk (a final checkpoint first, then the most iterations).
pub fn latest(dir: &Path) -> Option<PathBuf> {
    if let Ok(text) = fs::read(dir.join(POINTER)) {
        if let Some(name) = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("latest").and_then(|n| n.as_str()).map(String::from))
        {
            let p = dir.join(&name);
            if complete(&p) {
                return Some(p);
            }
        }
    }
    let mut best: Option<(bool, u64, PathBuf)> = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if !complete(&p) {
            continue;
        }
        let Ok(text) = fs::read(p.join(ENGINE)) else { continue };
        let Ok(state) = serde_json::from_slice::<EngineState>(&text) else { continue };
        let key = (state.finished, state.iteration, p);
        if best.as_ref().is_none_or(|b| (key.0, key.1) > (b.0, b.1)) {
            best = Some(key);
        }
    }
    best.map(|b| b.2)
}

fn complete(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    (name.starts_with("model_") || name.starts_with(".old-model_"))
        && [MODEL, OPTIMIZER, ENGINE].iter().all(|f| p.join(f).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(iteration: u64, value: f32) -> Checkpoint {
        Checkpoint {
            model: vec![NamedTensor { name: "trunk.w".into(), shape: vec![2], data: vec![value, -value] }],
            optimizer: vec![NamedTensor {
                name: "optim.exp_avg.trunk.w".into(),
                shape: vec![2],
                data: vec![0.5, 0.25],
            }],
            engine: EngineState {
                version: FORMAT_VERSION,
                phase_idx: 1,
                train_phase_idx: 0,
                iteration,
                iteration_in_epoch: 0,
                rng_step: iteration,
                seed: 0,
                losses: vec![2.5, 2.25],
                meters: serde_json::json!({}),
                int_state: BTreeMap::from([("loss.queue_ptr".into(), IntTensor { shape: vec![], data: vec![7] })]),
                finished: false,
                test_pending: false,
                steps_per_epoch: 10,
                num_epochs: 2,
                batch: 8,
                world: 1,
            },
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tessera-ckpt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trip_and_the_pointer_names_the_latest() {
        let dir = tmpdir("roundtrip");
        write(&dir, &phase_name(0, false), &ckpt(10, 1.0)).unwrap();
        write(&dir, &phase_name(1, true), &ckpt(20, 2.0)).unwrap();
        let latest = latest(&dir).unwrap();
        assert_eq!(latest, dir.join("model_final_checkpoint_phase1"));
        assert_eq!(read(&latest).unwrap(), ckpt(20, 2.0));
        // Without the pointer, the newest complete checkpoint on disk.
        fs::remove_file(dir.join(POINTER)).unwrap();
        assert_eq!(super::latest(&dir).unwrap(), dir.join("model_final_checkpoint_phase1"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_previous_checkpoint_and_pointer() {
        let dir = tmpdir("fail");
        write(&dir, "model_phase0", &ckpt(10, 1.0)).unwrap();
        *FAIL_AFTER_MODEL_FILE.lock().unwrap() = Some(dir.clone());
        let e = write(&dir, "model_phase1", &ckpt(20, 2.0)).unwrap_err();
        *FAIL_AFTER_MODEL_FILE.lock().unwrap() = None;
        let msg = e.to_string();
        assert!(
            msg.contains("model_phase1")
                && msg.contains("No space left")
                && msg.contains("previous checkpoint is intact"),
            "{msg}"
        );
        assert_eq!(latest(&dir).unwrap(), dir.join("model_phase0"));
        assert_eq!(read(&dir.join("model_phase0")).unwrap(), ckpt(10, 1.0));
        // Nothing half-written is left behind.
        let names: Vec<String> =
            fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
        assert!(names.iter().all(|n| !n.starts_with(".tmp") && n != "model_phase1"), "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_temporaries_are_swept_and_an_interrupted_replacement_restored() {
        let dir = tmpdir("sweep");
        write(&dir, "model_iteration10", &ckpt(10, 1.0)).unwrap();
        // A killed writer (another pid) left a temporary, and a replacement
        // that had moved the old copy aside before its rename.
        fs::create_dir_all(dir.join(".tmp-model_phase1-1")).unwrap();
        fs::rename(dir.join("model_iteration10"), dir.join(".old-model_iteration10-1")).unwrap();
        sweep_stale(&dir);
        let names: Vec<String> =
            fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        assert_eq!(read(&dir.join("model_iteration10")).unwrap(), ckpt(10, 1.0));
        update_engine_state(&dir.join("model_iteration10"), |s| {
            s.test_pending = true;
            s.train_phase_idx = 1;
        })
        .unwrap();
        assert!(read(&dir.join("model_iteration10")).unwrap().engine.test_pending);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_inconsistent_engine_state_is_refused_naming_the_file_and_the_field() {
        let dir = tmpdir("inconsistent");
        let cases: [(&str, fn(&mut EngineState)); 3] = [
            ("pending before any train phase", |s| {
                s.test_pending = true;
                s.train_phase_idx = 0;
            }),
            ("train_phase_idx 3 is beyond the run's 2 epochs", |s| s.train_phase_idx = 3),
            ("`loss.queue_ptr` has shape [2] but 1 values", |s| {
                s.int_state.get_mut("loss.queue_ptr").unwrap().shape = vec![2]
            }),
        ];
        for (want, damage) in cases {
            write(&dir, "model_phase0", &ckpt(10, 1.0)).unwrap();
            update_engine_state(&dir.join("model_phase0"), damage).unwrap();
            let e = read(&dir.join("model_phase0")).unwrap_err().to_string();
            assert!(e.contains("model_phase0") && e.contains("engine.json") && e.contains(want), "{e}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_non_finite_state_is_never_written_nor_resumed_from() {
        let dir = tmpdir("nonfinite");
        write(&dir, "model_iteration10", &ckpt(10, 1.0)).unwrap();
        let mut bad = ckpt(20, 2.0);
        bad.optimizer[0].data[1] = f32::INFINITY;
        let e = write(&dir, "model_iteration20", &bad).unwrap_err().to_string();
        assert!(
            e.contains("model_iteration20")
                && e.contains("1 of its 4 values are NaN or infinite, the first in `optim.exp_avg.trunk.w` (optimizer.safetensors)"),
            "{e}"
        );
        assert!(!dir.join("model_iteration20").exists());
        assert_eq!(latest(&dir).unwrap(), dir.join("model_iteration10"));
        // One written by an older build is refused on read.
        let nan = vec![NamedTensor { name: "trunk.w".into(), shape: vec![2], data: vec![f32::NAN, 1.0] }];
        write_safetensors(&dir.join("model_iteration10").join(MODEL), &nan, &BTreeMap::new()).unwrap();
        let e = read(&dir.join("model_iteration10")).unwrap_err().to_string();
        assert!(e.contains("model_iteration10") && e.contains("`trunk.w` (model.safetensors)"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_checkpoint_directory_is_never_resumed_from() {
        let dir = tmpdir("torn");
        write(&dir, "model_phase0", &ckpt(10, 1.0)).unwrap();
        // A crash between files of a non-atomic writer would leave this:
        fs::create_dir_all(dir.join("model_phase1")).unwrap();
        fs::write(dir.join("model_phase1").join(MODEL), b"partial").unwrap();
        fs::remove_file(dir.join(POINTER)).unwrap();
        assert_eq!(latest(&dir).unwrap(), dir.join("model_phase0"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
