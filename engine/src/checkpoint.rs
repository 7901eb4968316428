//! Checkpoints in `CHECKPOINT.DIR`, named as VISSL names them (reference
//! 8.2): `model_phase{N}`, `model_iteration{I}`, and the last one
//! `model_final_checkpoint_phase{N}`. Each is a directory:
//! - `model.safetensors`: parameters and buffers (the state dict, loadable by
//!   `MODEL.WEIGHTS_INIT` and `tessera infer`);
//! - `optimizer.safetensors`: optimizer state (`optim.*`);
//! - `engine.json`: phase, iteration, random-stream step, meters, losses,
//!   and integer state (queue pointers) exactly;
//! - `manifest.json`: the iteration the checkpoint belongs to and, for each
//!   of the three files above, its size and [`checksum`] (FNV-1a 64 over
//!   1 MiB blocks) as written. The tensor files' metadata also name their
//!   iteration.
//!
//! Writing is atomic: everything goes to a temporary directory, each file is
//! flushed to disk, the directory is renamed into place, then the pointer
//! `checkpoint.json` (`{"latest": NAME}`) is replaced the same way. A crash at
//! any moment leaves the previous checkpoint and pointer intact. Only a
//! finite state is written.
//!
//! Reading verifies: every file against the manifest before it is decoded,
//! then `engine.json`'s consistency and the values' finiteness; an error
//! names the file and what is wrong (unreadable, checksum mismatch, another
//! iteration's file, a converted copy). A resume ([`resume_point`]) falls
//! back from a damaged checkpoint to the newest intact one, naming the
//! damaged ones. A checkpoint of format 1 (before manifests) is read
//! without verification, which the trainer says in a warning.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use tessera_runtime::weights::{parse_safetensors, write_safetensors, NamedTensor};

pub const POINTER: &str = "checkpoint.json";
pub const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const ENGINE: &str = "engine.json";
const MANIFEST: &str = "manifest.json";

/// Bumped when `engine.json` changes incompatibly. Format 2 added the
/// manifest (checksums); a checkpoint of format 1 is still read, unverified.
pub const FORMAT_VERSION: u32 = 2;

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

/// The largest counter `engine.json` may hold (2^53 steps, phases, ...):
/// far beyond any run, and small enough that the trainer's sums and
/// products of counters never overflow (and stay exact as f64).
pub const MAX_COUNTER: u64 = 1 << 53;

impl EngineState {
    /// What a resume relies on and a damaged or hand-edited `engine.json`
    /// could break: every counter in range (no later arithmetic on it can
    /// overflow), the step counts within the run's shape, a pending test
    /// phase after a train phase, finite losses, a meter whose lists agree
    /// in length, and every integer state's values filling its shape. The
    /// message names the field.
    pub fn check(&self) -> Result<(), String> {
        let counters = [
            ("phase_idx", self.phase_idx),
            ("train_phase_idx", self.train_phase_idx),
            ("iteration", self.iteration),
            ("iteration_in_epoch", self.iteration_in_epoch),
            ("rng_step", self.rng_step),
            ("steps_per_epoch", self.steps_per_epoch),
            ("num_epochs", self.num_epochs),
            ("batch", self.batch),
            ("world", self.world),
        ];
        for (field, v) in counters {
            if v > MAX_COUNTER {
                return Err(format!("field `{field}` is {v}, above the bound of {MAX_COUNTER}"));
            }
        }
        if self.world == 0 {
            return Err("field `world` is 0 (a run has at least one process)".into());
        }
        if self.test_pending && self.train_phase_idx == 0 {
            return Err("a test phase is recorded as pending before any train phase (train_phase_idx 0)".into());
        }
        if self.finished && self.test_pending {
            return Err("field `finished` is true while a test phase is pending (`test_pending`)".into());
        }
        if self.num_epochs != 0 && self.train_phase_idx > self.num_epochs {
            return Err(format!(
                "train_phase_idx {} is beyond the run's {} epochs",
                self.train_phase_idx, self.num_epochs
            ));
        }
        if self.train_phase_idx > self.phase_idx {
            return Err(format!(
                "field `train_phase_idx` is {} but `phase_idx` (train and test phases) is {}",
                self.train_phase_idx, self.phase_idx
            ));
        }
        if self.iteration_in_epoch > self.iteration {
            return Err(format!(
                "field `iteration_in_epoch` is {} but `iteration` is {}",
                self.iteration_in_epoch, self.iteration
            ));
        }
        if self.steps_per_epoch != 0 {
            let steps = self.num_epochs.checked_mul(self.steps_per_epoch).filter(|&s| s <= MAX_COUNTER);
            let Some(steps) = steps else {
                return Err(format!(
                    "fields `num_epochs` {} x `steps_per_epoch` {} are above the bound of {MAX_COUNTER} steps",
                    self.num_epochs, self.steps_per_epoch
                ));
            };
            if self.iteration_in_epoch > self.steps_per_epoch {
                return Err(format!(
                    "field `iteration_in_epoch` is {}, beyond the run's {} steps per epoch",
                    self.iteration_in_epoch, self.steps_per_epoch
                ));
            }
            if self.num_epochs != 0 && self.iteration > steps {
                return Err(format!("field `iteration` is {}, beyond the run's {steps} steps", self.iteration));
            }
            if self.losses.len() as u64 > self.steps_per_epoch {
                return Err(format!(
                    "field `losses` holds {} values, more than the run's {} steps per epoch",
                    self.losses.len(),
                    self.steps_per_epoch
                ));
            }
        }
        if let Some(i) = self.losses.iter().position(|l| !l.is_finite()) {
            return Err(format!("field `losses` holds a value that is not finite (item {i})"));
        }
        // No meter: null (or `{}`, as tests and older builds wrote it).
        let no_meter = self.meters.is_null() || self.meters.as_object().is_some_and(|m| m.is_empty());
        if !no_meter {
            let meter = serde_json::from_value::<crate::meters::AccuracyListMeter>(self.meters.clone())
                .map_err(|e| format!("field `meters` is not a meter's state: {e}"))?;
            if !meter.is_consistent() {
                return Err("field `meters`: its topk, scores, samples and names lists do not agree in length".into());
            }
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

/// A checkpoint's manifest (`manifest.json`): the iteration it belongs to
/// and the size and checksum of each of its files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Manifest {
    iteration: u64,
    files: BTreeMap<String, FileSum>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    /// [`checksum`], 16 hex digits.
    fnv1a64: String,
}

impl FileSum {
    fn of(bytes: &[u8]) -> FileSum {
        FileSum { bytes: bytes.len() as u64, fnv1a64: format!("{:016x}", checksum(bytes)) }
    }

    fn of_file(path: &Path) -> std::io::Result<FileSum> {
        Ok(FileSum::of(&fs::read(path)?))
    }
}

impl Manifest {
    fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest serialises")
    }

    /// Whether file `name`'s `bytes` are what was written; the message
    /// names the file and says how it differs.
    fn check(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let Some(want) = self.files.get(name) else {
            return Err(format!("{MANIFEST} records no checksum of {name}"));
        };
        let got = FileSum::of(bytes);
        if got == *want {
            return Ok(());
        }
        let what = if got.bytes != want.bytes {
            format!("it is {} bytes, the manifest records {}", got.bytes, want.bytes)
        } else {
            format!("checksum mismatch: fnv1a64 {}, the manifest records {}", got.fnv1a64, want.fnv1a64)
        };
        Err(format!("{name} is not the file written with this checkpoint ({what}{})", self.hint(bytes)))
    }

    /// What a tensor file that fails its checksum looks like: another
    /// iteration's file, or a converted copy.
    fn hint(&self, bytes: &[u8]) -> String {
        let Some(header) = safetensors_header(bytes) else { return String::new() };
        let mut hints = Vec::new();
        let iteration = header.get("__metadata__").and_then(|m| m.get("iteration")).and_then(|i| i.as_str());
        if let Some(i) = iteration.filter(|i| *i != self.iteration.to_string()) {
            hints.push(format!("it was written at iteration {i}, this checkpoint is of iteration {}", self.iteration));
        }
        let mut dtypes: Vec<&str> = header
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| (k != "__metadata__").then(|| v.get("dtype").and_then(|d| d.as_str())).flatten())
            .filter(|d| *d != "F32")
            .collect();
        dtypes.sort();
        dtypes.dedup();
        if !dtypes.is_empty() {
            hints.push(format!("it stores {} values, checkpoints store F32 (a converted copy?)", dtypes.join(", ")));
        }
        hints.iter().map(|h| format!("; {h}")).collect()
    }
}

/// The JSON header of a safetensors file's bytes, if it parses.
fn safetensors_header(bytes: &[u8]) -> Option<serde_json::Value> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()
}

/// Bytes per block of [`checksum`].
const BLOCK: usize = 1 << 20;

/// FNV-1a, 64-bit, continuing from `h`.
fn fnv1a64(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A checkpoint file's checksum: the FNV-1a (64-bit) of each 1 MiB block,
/// then the FNV-1a of those digests (little-endian, in order). Blocks are
/// hashed on several threads: a large checkpoint is checked in a fraction
/// of the time of one serial FNV pass. Any change to the bytes (a flipped
/// bit, another file, a truncation) changes it but with probability 2^-64.
pub fn checksum(bytes: &[u8]) -> u64 {
    let blocks: Vec<&[u8]> = bytes.chunks(BLOCK).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(blocks.len() / 4).max(1);
    let mut digests = vec![0u64; blocks.len()];
    if threads == 1 {
        for (d, b) in digests.iter_mut().zip(&blocks) {
            *d = fnv1a64(FNV_OFFSET, b);
        }
    } else {
        let per = blocks.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for (ds, bs) in digests.chunks_mut(per).zip(blocks.chunks(per)) {
                scope.spawn(move || {
                    for (d, b) in ds.iter_mut().zip(bs) {
                        *d = fnv1a64(FNV_OFFSET, b);
                    }
                });
            }
        });
    }
    digests.iter().fold(FNV_OFFSET, |h, d| fnv1a64(h, &d.to_le_bytes()))
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

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename);
/// `point` runs between the fsync and the rename (see [`kill_point`]).
fn write_file_atomic(path: &Path, bytes: &[u8], point: impl Fn()) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        point();
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

/// Test hook: with `TESSERA_CHECKPOINT_KILL_AT=NAME:J` the process kills
/// itself (SIGKILL) at the J-th step of writing checkpoint NAME (each file
/// written, synced or renamed, 1-based), so that a test can crash a write
/// at every point of it and check what a resume makes of what is left.
fn kill_point(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static AT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        let spec = std::env::var("TESSERA_CHECKPOINT_KILL_AT").ok()?;
        let (n, j) = spec.rsplit_once(':')?;
        Some((n.to_string(), j.parse().ok()?))
    });
    if let Some((n, j)) = at {
        if n == name && SEEN.fetch_add(1, Ordering::SeqCst) + 1 == *j {
            // SAFETY: kill(2) on our own pid; nothing runs after it.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}

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
        let point = || kill_point(name);
        fs::create_dir(&tmp).map_err(|e| e.to_string())?;
        point();
        // The tensor files say which iteration they belong to, so a file
        // copied from another checkpoint is named as such on load.
        let meta = BTreeMap::from([
            ("format".to_string(), "tessera".to_string()),
            ("iteration".to_string(), ckpt.engine.iteration.to_string()),
        ]);
        write_safetensors(&tmp.join(MODEL), &ckpt.model, &meta).map_err(|e| e.to_string())?;
        point();
        if FAIL_AFTER_MODEL_FILE.lock().map(|d| d.as_deref() == Some(dir)).unwrap_or(false) {
            return Err("No space left on device (os error 28)".into());
        }
        write_safetensors(&tmp.join(OPTIMIZER), &ckpt.optimizer, &meta).map_err(|e| e.to_string())?;
        point();
        let json = serde_json::to_vec_pretty(&ckpt.engine).map_err(|e| e.to_string())?;
        write_file_atomic(&tmp.join(ENGINE), &json, point).map_err(|e| e.to_string())?;
        point();
        // The checksums of the files as they are on disk.
        let mut files = BTreeMap::new();
        for f in [MODEL, OPTIMIZER, ENGINE] {
            let sum = FileSum::of_file(&tmp.join(f)).map_err(|e| format!("{f}: {e}"))?;
            files.insert(f.to_string(), sum);
        }
        let manifest = Manifest { iteration: ckpt.engine.iteration, files };
        write_file_atomic(&tmp.join(MANIFEST), &manifest.to_json(), point).map_err(|e| e.to_string())?;
        point();
        sync_dir(&tmp).map_err(|e| e.to_string())?;
        point();
        install(dir, &tmp, name, point)?;
        point();
        let pointer = serde_json::to_vec(&serde_json::json!({ "latest": name })).map_err(|e| e.to_string())?;
        write_file_atomic(&dir.join(POINTER), &pointer, point).map_err(|e| e.to_string())?;
        point();
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

/// Puts the complete directory `tmp` in place as checkpoint `name` of
/// `dir`, replacing one of that name (a rerun with OVERWRITE_EXISTING, or
/// an updated `engine.json`): the old one is moved aside first, so one
/// always exists (`sweep_stale` restores it after a crash in between).
fn install(dir: &Path, tmp: &Path, name: &str, point: impl Fn()) -> Result<(), String> {
    let target = dir.join(name);
    let old = dir.join(format!(".old-{name}-{}", std::process::id()));
    let had_old = target.exists();
    if had_old {
        let _ = fs::remove_dir_all(&old);
        fs::rename(&target, &old).map_err(|e| e.to_string())?;
        point();
    }
    fs::rename(tmp, &target).map_err(|e| e.to_string())?;
    sync_dir(dir).map_err(|e| e.to_string())?;
    if had_old {
        let _ = fs::remove_dir_all(&old);
    }
    Ok(())
}

/// Rewrites a checkpoint's `engine.json` through `f` (its tensors are
/// unchanged): a test phase that ran after the checkpoint. With a manifest,
/// the checkpoint is replaced as a whole (its tensor files linked, or
/// copied, into a new directory with the new `engine.json` and manifest),
/// so a crash leaves the old or the new one, never a mismatch; the tensor
/// files keep the checksums recorded when they were written.
pub fn update_engine_state(path: &Path, f: impl FnOnce(&mut EngineState)) -> Result<(), CheckpointError> {
    let fail = |message: String| CheckpointError::Write { path: path.to_path_buf(), message };
    let text = fs::read(path.join(ENGINE)).map_err(|e| fail(format!("{ENGINE}: {e}")))?;
    let mut state: EngineState = serde_json::from_slice(&text).map_err(|e| fail(format!("{ENGINE}: {e}")))?;
    f(&mut state);
    let json = serde_json::to_vec_pretty(&state).map_err(|e| fail(e.to_string()))?;
    let manifest = match fs::read(path.join(MANIFEST)) {
        Ok(bytes) => Manifest::parse(&bytes).map_err(|e| fail(format!("{MANIFEST}: {e}")))?,
        // A checkpoint of format 1 has no manifest: its engine.json alone.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return write_file_atomic(&path.join(ENGINE), &json, || ()).map_err(|e| fail(e.to_string()))
        }
        Err(e) => return Err(fail(format!("{MANIFEST}: {e}"))),
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(fail("not a checkpoint directory".into()));
    };
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| -> Result<(), String> {
        fs::create_dir(&tmp).map_err(|e| e.to_string())?;
        for f in [MODEL, OPTIMIZER] {
            if fs::hard_link(path.join(f), tmp.join(f)).is_err() {
                fs::copy(path.join(f), tmp.join(f)).map_err(|e| format!("{f}: {e}"))?;
                fs::File::open(tmp.join(f)).and_then(|h| h.sync_all()).map_err(|e| format!("{f}: {e}"))?;
            }
        }
        write_file_atomic(&tmp.join(ENGINE), &json, || ()).map_err(|e| e.to_string())?;
        let mut manifest = manifest;
        manifest.iteration = state.iteration;
        manifest.files.insert(ENGINE.to_string(), FileSum::of(&json));
        write_file_atomic(&tmp.join(MANIFEST), &manifest.to_json(), || ()).map_err(|e| e.to_string())?;
        sync_dir(&tmp).map_err(|e| e.to_string())?;
        install(dir, &tmp, name, || ())
    })();
    result.map_err(|message| {
        let _ = fs::remove_dir_all(&tmp);
        fail(message)
    })
}

/// Removes all but the newest `keep` iteration checkpoints of `dir`
/// (`model_iteration{I}`, newest by I), never `current` (the one just
/// written, which the pointer names); phase checkpoints are never removed.
/// Each is first renamed to a `.tmp-` name, so a process killed while
/// removing it leaves a temporary that the next run sweeps, not a partial
/// checkpoint. Returns the names removed.
pub fn prune_iterations(dir: &Path, keep: usize, current: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(u64, String)> = entries
        .flatten()
        .filter(|e| e.path().is_dir() && e.path() != current)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let i = name.strip_prefix("model_iteration")?.parse().ok()?;
            Some((i, name))
        })
        .collect();
    found.sort_unstable_by(|a, b| b.0.cmp(&a.0));
    // `current` is one of the `keep` newest.
    let keep_others = keep.saturating_sub(1);
    let mut removed = Vec::new();
    for (_, name) in found.into_iter().skip(keep_others) {
        let doomed = dir.join(format!(".tmp-prune-{name}-{}", std::process::id()));
        if fs::rename(dir.join(&name), &doomed).is_ok() {
            let _ = fs::remove_dir_all(&doomed);
            removed.push(name);
        }
    }
    removed
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

/// Reads a checkpoint directory, verifying it (see [`read_verified`]).
pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
    read_verified(path).map(|(c, _)| c)
}

/// How a checkpoint read was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verified {
    /// Every file against the checksums and iteration of its manifest.
    Checksums,
    /// Written before checkpoints carried checksums (format 1): read
    /// without verifying its files.
    Unverified,
}

/// Reads a checkpoint directory: every file is checked against the
/// manifest's size and checksum before it is decoded, the tensor files
/// against the iteration they were written at, then `engine.json`'s
/// consistency and the finiteness of every value. An error names the file
/// and what is wrong with it (unreadable, checksum mismatch, another
/// iteration's file, not finite).
pub fn read_verified(path: &Path) -> Result<(Checkpoint, Verified), CheckpointError> {
    let fail = |message: String| CheckpointError::Read { path: path.to_path_buf(), message };
    let load = |f: &str| fs::read(path.join(f)).map_err(|e| fail(format!("{f} is unreadable: {e}")));
    let manifest = match fs::read(path.join(MANIFEST)) {
        Ok(bytes) => Some(Manifest::parse(&bytes).map_err(|e| fail(format!("{MANIFEST} is damaged: {e}")))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(fail(format!("{MANIFEST} is unreadable: {e}"))),
    };
    let text = load(ENGINE)?;
    if let Some(m) = &manifest {
        m.check(ENGINE, &text).map_err(fail)?;
    }
    let engine: EngineState = serde_json::from_slice(&text).map_err(|e| fail(format!("{ENGINE} is damaged: {e}")))?;
    let verified = match (&manifest, engine.version) {
        (_, v) if v != FORMAT_VERSION && v != 1 => {
            return Err(fail(format!(
                "{ENGINE} has format {v} (this build reads {FORMAT_VERSION}, and 1 without checksums)"
            )))
        }
        (Some(m), _) if m.iteration != engine.iteration => {
            return Err(fail(format!(
                "{ENGINE} is of iteration {}, but the checkpoint's manifest is of iteration {} (a file of another checkpoint?)",
                engine.iteration, m.iteration
            )))
        }
        (Some(_), _) => Verified::Checksums,
        (None, 1) => Verified::Unverified,
        (None, _) => {
            return Err(fail(format!(
                "{MANIFEST} is missing: a checkpoint of format {FORMAT_VERSION} records its files' checksums there"
            )))
        }
    };
    let mut tensors = Vec::new();
    for f in [MODEL, OPTIMIZER] {
        let bytes = load(f)?;
        if let Some(m) = &manifest {
            m.check(f, &bytes).map_err(fail)?;
        }
        let file = parse_safetensors(&path.join(f), &bytes).map_err(|e| fail(format!("{f} is damaged: {e}")))?;
        tensors.push(file.tensors);
    }
    let optimizer = tensors.pop().unwrap_or_default();
    let model = tensors.pop().unwrap_or_default();
    engine.check().map_err(|m| fail(format!("{ENGINE}: {m}")))?;
    if let Some(bad) = non_finite(&model, &optimizer) {
        return Err(fail(format!("its state is not finite ({bad}): training cannot continue from it")));
    }
    Ok((Checkpoint { model, optimizer, engine }, verified))
}

/// Where a resume starts: the checkpoint, how it was checked, and a line
/// for each newer checkpoint passed over as damaged (which, and why).
#[derive(Debug)]
pub struct ResumePoint {
    pub path: PathBuf,
    pub checkpoint: Checkpoint,
    pub verified: Verified,
    pub damaged: Vec<String>,
}

/// The checkpoint a run resumes from: the pointer's, else the newest one
/// on disk (a final checkpoint first, then the most iterations), falling
/// back from a damaged one to the newest intact one. `None` when `dir`
/// holds no checkpoint; an error naming each one and why when none is
/// intact (training from scratch over them is never silent).
pub fn resume_point(dir: &Path) -> Result<Option<ResumePoint>, CheckpointError> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(None) };
    let pointed = pointed(dir);
    // Newest first: the pointer's, then by (finished, iteration), read from
    // engine.json or, when that is damaged, the manifest.
    let mut candidates: Vec<((bool, bool, u64), PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        // Every checkpoint directory: one with a file missing is damaged
        // (writes are atomic), and said so when it is the newest.
        .filter(|p| {
            complete(p) || (p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("model_")))
        })
        .map(|p| {
            let state = fs::read(p.join(ENGINE)).ok().and_then(|t| serde_json::from_slice::<EngineState>(&t).ok());
            let (finished, iteration) = match state {
                Some(s) => (s.finished, s.iteration),
                None => {
                    let m = fs::read(p.join(MANIFEST)).ok().and_then(|b| Manifest::parse(&b).ok());
                    (false, m.map_or(0, |m| m.iteration))
                }
            };
            ((pointed.as_ref() == Some(&p), finished, iteration), p)
        })
        .collect();
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut skipped: Vec<(PathBuf, String)> = Vec::new();
    for (_, p) in candidates {
        match read_verified(&p) {
            Ok((checkpoint, verified)) => {
                let damaged = skipped
                    .iter()
                    .map(|(d, why)| {
                        format!(
                            "checkpoint {} is damaged ({why}); resuming from {}, the newest intact checkpoint",
                            d.display(),
                            p.display()
                        )
                    })
                    .collect();
                return Ok(Some(ResumePoint { path: p, checkpoint, verified, damaged }));
            }
            Err(CheckpointError::Read { message, .. } | CheckpointError::Write { message, .. }) => {
                skipped.push((p, message))
            }
        }
    }
    if skipped.is_empty() {
        return Ok(None);
    }
    let list: Vec<String> = skipped.iter().map(|(p, why)| format!("{}: {why}", p.display())).collect();
    Err(CheckpointError::Read {
        path: dir.to_path_buf(),
        message: format!(
            "no checkpoint there is intact, so none can be resumed from ({}). Set CHECKPOINT.OVERWRITE_EXISTING=true (or another CHECKPOINT.DIR) to start over",
            list.join("; ")
        ),
    })
}

/// The checkpoint `checkpoint.json` of `dir` names, if it names one in
/// `dir`: a plain directory name, never `../other` or an absolute path.
fn pointed(dir: &Path) -> Option<PathBuf> {
    let text = fs::read(dir.join(POINTER)).ok()?;
    let v = serde_json::from_slice::<serde_json::Value>(&text).ok()?;
    let name = Path::new(v.get("latest")?.as_str()?);
    let mut parts = name.components();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(n)), None) => Some(dir.join(n)),
        _ => None,
    }
}

/// Checks one file of checkpoint directory `path` against its manifest
/// (`MODEL.WEIGHTS_INIT` naming a checkpoint directory); `Ok(false)` when
/// the checkpoint has no manifest (format 1).
pub fn verify_file(path: &Path, file: &str) -> Result<bool, CheckpointError> {
    let fail = |message: String| CheckpointError::Read { path: path.to_path_buf(), message };
    let manifest = match fs::read(path.join(MANIFEST)) {
        Ok(bytes) => Manifest::parse(&bytes).map_err(|e| fail(format!("{MANIFEST} is damaged: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(fail(format!("{MANIFEST} is unreadable: {e}"))),
    };
    let bytes = fs::read(path.join(file)).map_err(|e| fail(format!("{file} is unreadable: {e}")))?;
    manifest.check(file, &bytes).map_err(fail)?;
    Ok(true)
}

/// The checkpoint to resume from: the pointer's, else the newest complete
/// one on disk (a final checkpoint first, then the most iterations).
pub fn latest(dir: &Path) -> Option<PathBuf> {
    if let Some(p) = pointed(dir).filter(|p| complete(p)) {
        return Some(p);
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
    use tessera_runtime::weights::{read_safetensors, write_safetensors_as, DiskDtype};

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
        type Damage = fn(&mut EngineState);
        let cases: [(&str, Damage); 15] = [
            ("pending before any train phase", |s| {
                s.test_pending = true;
                s.train_phase_idx = 0;
            }),
            ("train_phase_idx 3 is beyond the run's 2 epochs", |s| s.train_phase_idx = 3),
            ("`loss.queue_ptr` has shape [2] but 1 values", |s| {
                s.int_state.get_mut("loss.queue_ptr").unwrap().shape = vec![2]
            }),
            // Counters that would wrap when the trainer advances them.
            ("field `iteration` is 18446744073709551615, above the bound of 9007199254740992", |s| {
                s.iteration = u64::MAX
            }),
            ("field `rng_step` is 18446744073709551615, above the bound", |s| s.rng_step = u64::MAX),
            ("field `phase_idx` is 18446744073709551615, above the bound", |s| s.phase_idx = u64::MAX),
            ("fields `num_epochs` 4294967296 x `steps_per_epoch` 4294967296 are above the bound", |s| {
                (s.num_epochs, s.steps_per_epoch) = (1 << 32, 1 << 32)
            }),
            ("field `iteration_in_epoch` is 11, beyond the run's 10 steps per epoch", |s| {
                (s.iteration, s.iteration_in_epoch) = (15, 11)
            }),
            ("field `iteration` is 25, beyond the run's 20 steps", |s| s.iteration = 25),
            ("field `iteration_in_epoch` is 12 but `iteration` is 10", |s| s.iteration_in_epoch = 12),
            ("field `world` is 0", |s| s.world = 0),
            ("field `finished` is true while a test phase is pending", |s| {
                (s.finished, s.test_pending, s.train_phase_idx) = (true, true, 1)
            }),
            // The meter's sample and score lists of different lengths.
            ("field `meters`: its topk, scores, samples and names lists do not agree in length", |s| {
                s.meters = serde_json::json!({"topk": [1, 5], "scores": [[1.0, 2.0]], "samples": [3, 4]})
            }),
            ("field `meters`: its topk", |s| {
                s.meters = serde_json::json!({"topk": [1], "scores": [[1.0, 2.0]], "samples": [3]})
            }),
            ("field `meters` is not a meter's state", |s| s.meters = serde_json::json!("top_1")),
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
        // One written by an older build (format 1: no manifest) is refused on read.
        let nan = vec![NamedTensor { name: "trunk.w".into(), shape: vec![2], data: vec![f32::NAN, 1.0] }];
        write_safetensors(&dir.join("model_iteration10").join(MODEL), &nan, &BTreeMap::new()).unwrap();
        fs::remove_file(dir.join("model_iteration10").join(MANIFEST)).unwrap();
        update_engine_state(&dir.join("model_iteration10"), |s| s.version = 1).unwrap();
        let e = read(&dir.join("model_iteration10")).unwrap_err().to_string();
        assert!(e.contains("model_iteration10") && e.contains("`trunk.w` (model.safetensors)"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    fn flip_last_bit(file: &Path) {
        let mut b = fs::read(file).unwrap();
        *b.last_mut().unwrap() ^= 1;
        fs::write(file, b).unwrap();
    }

    #[test]
    fn a_pointer_naming_a_checkpoint_outside_the_directory_is_not_followed() {
        let root = tmpdir("pointer-out");
        let (dir, other) = (root.join("run"), root.join("other"));
        write(&dir, "model_iteration3", &ckpt(3, 1.0)).unwrap();
        write(&other, "model_iteration9", &ckpt(9, 2.0)).unwrap();
        for outside in ["../other/model_iteration9".to_string(), other.join("model_iteration9").display().to_string()] {
            fs::write(dir.join(POINTER), serde_json::json!({ "latest": outside }).to_string()).unwrap();
            let point = resume_point(&dir).unwrap().expect("the run's own checkpoint");
            assert_eq!(point.path, dir.join("model_iteration3"), "pointer {outside}");
            assert_eq!(point.checkpoint.engine.iteration, 3);
            assert_eq!(latest(&dir), Some(dir.join("model_iteration3")), "pointer {outside}");
        }
        fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn every_kind_of_damage_is_named_and_the_newest_intact_checkpoint_is_resumed_from() {
        let dir = tmpdir("damage");
        write(&dir, "model_iteration10", &ckpt(10, 1.0)).unwrap();
        let (newest, older) = (dir.join("model_iteration20"), dir.join("model_iteration10"));
        type Damage = Box<dyn Fn()>;
        let cases: Vec<(&str, Damage)> =
            vec![
            ("model.safetensors is not the file written with this checkpoint (checksum mismatch", {
                let f = newest.join(MODEL);
                Box::new(move || flip_last_bit(&f))
            }),
            ("optimizer.safetensors is not the file written with this checkpoint (checksum mismatch", {
                let f = newest.join(OPTIMIZER);
                Box::new(move || flip_last_bit(&f))
            }),
            ("it was written at iteration 10, this checkpoint is of iteration 20", {
                let (from, to) = (older.join(MODEL), newest.join(MODEL));
                Box::new(move || {
                    fs::copy(&from, &to).unwrap();
                })
            }),
            ("it stores F16 values, checkpoints store F32 (a converted copy?)", {
                let f = newest.join(MODEL);
                Box::new(move || {
                    let t = read_safetensors(&f).unwrap();
                    let meta = BTreeMap::from([("iteration".to_string(), "20".to_string())]);
                    write_safetensors_as(&f, &t, &meta, DiskDtype::F16).unwrap();
                })
            }),
            ("model.safetensors is not the file written with this checkpoint (it is 100 bytes, the manifest records", {
                let f = newest.join(MODEL);
                Box::new(move || {
                    let b = fs::read(&f).unwrap();
                    fs::write(&f, &b[..100]).unwrap();
                })
            }),
            ("engine.json is not the file written with this checkpoint", {
                let (from, to) = (older.join(ENGINE), newest.join(ENGINE));
                Box::new(move || {
                    fs::copy(&from, &to).unwrap();
                })
            }),
            ("manifest.json is missing", {
                let f = newest.join(MANIFEST);
                Box::new(move || fs::remove_file(&f).unwrap())
            }),
            ("manifest.json is damaged", {
                let f = newest.join(MANIFEST);
                Box::new(move || fs::write(&f, b"{\"iteration\": 20").unwrap())
            }),
            ("model.safetensors is unreadable", {
                let f = newest.join(MODEL);
                Box::new(move || {
                    fs::remove_file(&f).unwrap();
                    fs::create_dir(&f).unwrap();
                })
            }),
        ];
        for (want, damage) in &cases {
            let _ = fs::remove_dir_all(&newest);
            write(&dir, "model_iteration20", &ckpt(20, 2.0)).unwrap();
            let intact = resume_point(&dir).unwrap().unwrap();
            assert_eq!((intact.path, intact.verified, intact.damaged.len()), (newest.clone(), Verified::Checksums, 0));
            damage();
            let e = read(&newest).unwrap_err().to_string();
            assert!(e.contains("model_iteration20") && e.contains(want), "{want}: {e}");
            let r = resume_point(&dir).unwrap().unwrap();
            assert_eq!(r.path, older, "{want}");
            assert_eq!(r.checkpoint, ckpt(10, 1.0));
            assert_eq!(r.damaged.len(), 1, "{want}");
            let w = &r.damaged[0];
            assert!(
                w.contains(&format!("checkpoint {} is damaged (", newest.display()))
                    && w.contains(want)
                    && w.contains(&format!("resuming from {}", older.display())),
                "{w}"
            );
        }
        // Nothing intact: an error naming each checkpoint, never a silent fresh start.
        flip_last_bit(&older.join(MODEL));
        let e = resume_point(&dir).unwrap_err().to_string();
        assert!(
            e.contains("no checkpoint there is intact")
                && e.contains("model_iteration10")
                && e.contains("model_iteration20")
                && e.contains("OVERWRITE_EXISTING"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
        assert!(resume_point(&dir).unwrap().is_none());
    }

    #[test]
    fn a_checkpoint_of_format_1_is_read_unverified_and_an_updated_one_stays_verified() {
        let dir = tmpdir("legacy");
        write(&dir, "model_phase0", &ckpt(10, 1.0)).unwrap();
        let p = dir.join("model_phase0");
        // engine.json rewritten with its manifest: still verified.
        update_engine_state(&p, |s| s.phase_idx = 2).unwrap();
        let (c, v) = read_verified(&p).unwrap();
        assert_eq!((c.engine.phase_idx, v), (2, Verified::Checksums));
        fs::remove_file(p.join(MANIFEST)).unwrap();
        update_engine_state(&p, |s| s.version = 1).unwrap();
        let (c, v) = read_verified(&p).unwrap();
        assert_eq!((c.model, v), (ckpt(10, 1.0).model, Verified::Unverified));
        assert_eq!(resume_point(&dir).unwrap().unwrap().verified, Verified::Unverified);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_checksum_is_one_function_of_the_bytes_whatever_the_threads() {
        let bytes: Vec<u8> =
            (0..(9 * BLOCK + 12345) as u64).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let serial = bytes.chunks(BLOCK).fold(FNV_OFFSET, |h, b| fnv1a64(h, &fnv1a64(FNV_OFFSET, b).to_le_bytes()));
        assert_eq!(checksum(&bytes), serial);
        // FNV-1a's published test vector.
        assert_eq!(fnv1a64(FNV_OFFSET, b"a"), 0xaf63dc4c8601ec8c);
        let mut flipped = bytes.clone();
        flipped[5 * BLOCK + 7] ^= 0x10;
        assert_ne!(checksum(&flipped), checksum(&bytes));
        assert_ne!(checksum(&bytes[..bytes.len() - 1]), checksum(&bytes));
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
