//! Property test: reading a checkpoint directory never panics, whatever its
//! files hold (issue 15). Each case damages one file of a checkpoint that
//! `checkpoint::write` made (`engine.json`, `manifest.json`, the tensor
//! files, the pointer `checkpoint.json`) with byte edits, JSON edits or
//! random bytes, optionally recording the damaged file's checksum in the
//! manifest so that the damage reaches the file's parser instead of
//! stopping at the checksum. `read_verified`, `resume_point` and `latest`
//! then return a checkpoint, nothing, or an error naming the checkpoint,
//! and a resume never leaves the run's directory.
//! `TESSERA_FUZZ_CASES=N` runs N cases per property (default 600).

#[path = "../../tests/fuzz/mutate.rs"]
mod mutate;

use mutate::{apply, apply_json, cases, edits, json_edits, Edit, JsonEdit, JSON_TOKENS};
use proptest::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use tessera_engine::checkpoint::{
    self, checksum, Checkpoint, CheckpointError, EngineState, IntTensor, FORMAT_VERSION, POINTER,
};
use tessera_engine::meters::AccuracyListMeter;
use tessera_runtime::weights::NamedTensor;

const FILES: [&str; 5] = ["engine.json", "manifest.json", "model.safetensors", "optimizer.safetensors", POINTER];

fn state(iteration: u64) -> Checkpoint {
    let t = |name: &str, shape: Vec<usize>, v: f32| {
        let n = shape.iter().product();
        NamedTensor::new(name, shape, (0..n).map(|i| v + i as f32).collect())
    };
    Checkpoint {
        model: vec![t("trunk.w", vec![2, 3], 1.0), t("trunk.b", vec![3], 0.5)],
        optimizer: vec![t("optim.exp_avg.trunk.w", vec![2, 3], 0.25)],
        engine: EngineState {
            version: FORMAT_VERSION,
            phase_idx: 1,
            train_phase_idx: 1,
            iteration,
            iteration_in_epoch: iteration - 10,
            rng_step: iteration,
            seed: 7,
            losses: vec![2.5, 2.25],
            meters: serde_json::to_value(AccuracyListMeter::new(2, vec![1, 5])).unwrap(),
            int_state: BTreeMap::from([("loss.queue_ptr".into(), IntTensor { shape: vec![2], data: vec![7, 3] })]),
            finished: false,
            test_pending: false,
            steps_per_epoch: 10,
            num_epochs: 3,
            batch: 8,
            world: 1,
        },
    }
}

/// The files of an intact run directory (checkpoints at iterations 12 and
/// 15, the pointer at 15), as (path relative to the run, bytes).
fn intact() -> &'static Vec<(PathBuf, Vec<u8>)> {
    static INTACT: OnceLock<Vec<(PathBuf, Vec<u8>)>> = OnceLock::new();
    INTACT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tessera-fuzz-ckpt-base-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        checkpoint::write(&dir, "model_iteration12", &state(12)).unwrap();
        checkpoint::write(&dir, "model_iteration15", &state(15)).unwrap();
        let mut out = Vec::new();
        for name in ["model_iteration12", "model_iteration15"] {
            for f in &FILES[..4] {
                let rel = Path::new(name).join(f);
                out.push((rel.clone(), std::fs::read(dir.join(&rel)).unwrap()));
            }
        }
        out.push((PathBuf::from(POINTER), std::fs::read(dir.join(POINTER)).unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
        out
    })
}

/// How one case damages the newest checkpoint's file `FILES[file]`.
#[derive(Clone, Debug)]
enum Damage {
    Bytes(Vec<Edit>),
    Json(Vec<JsonEdit>),
    Random(Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        2 => edits(JSON_TOKENS.len(), 6).prop_map(Damage::Bytes),
        3 => json_edits(4).prop_map(Damage::Json),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Damage::Random),
    ]
}

fn damaged(bytes: &[u8], d: &Damage) -> Vec<u8> {
    match d {
        Damage::Bytes(e) => apply(bytes, e, JSON_TOKENS),
        Damage::Json(e) => {
            // Tensor files: edit the JSON header, keeping the data after it.
            let (head, tail) = match bytes.get(..8).map(|n| u64::from_le_bytes(n.try_into().unwrap()) as usize) {
                Some(n) if !bytes.starts_with(b"{") => (&bytes[8..8 + n], &bytes[8 + n..]),
                _ => (bytes, &[][..]),
            };
            let mut v: Value = serde_json::from_slice(head).unwrap();
            apply_json(&mut v, e);
            let text = serde_json::to_vec(&v).unwrap();
            if tail.is_empty() && bytes.starts_with(b"{") {
                return text;
            }
            let mut out = (text.len() as u64).to_le_bytes().to_vec();
            out.extend(text);
            out.extend_from_slice(tail);
            out
        }
        Damage::Random(b) => b.clone(),
    }
}

/// Records `file`'s checksum and size in `ckpt`'s manifest, as a writer
/// that damaged the file before checksumming it would have.
fn reseal(ckpt: &Path, file: &str) {
    let Ok(text) = std::fs::read(ckpt.join("manifest.json")) else { return };
    let Ok(mut m) = serde_json::from_slice::<Value>(&text) else { return };
    let bytes = std::fs::read(ckpt.join(file)).unwrap();
    if let Some(sum) = m.get_mut("files").and_then(|f| f.get_mut(file)) {
        *sum = serde_json::json!({ "bytes": bytes.len(), "fnv1a64": format!("{:016x}", checksum(&bytes)) });
    }
    // The manifest names the iteration engine.json holds, if it can be read.
    let iteration = std::fs::read(ckpt.join("engine.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
        .and_then(|e| e.get("iteration").cloned());
    if let (Some(i), Some(obj)) = (iteration, m.as_object_mut()) {
        obj.insert("iteration".into(), i);
    }
    std::fs::write(ckpt.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
}

fn check(file: usize, d: &Damage, reseal_it: bool) {
    static CASE: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tessera-fuzz-ckpt-{}-{}",
        std::process::id(),
        CASE.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    for (rel, bytes) in intact() {
        std::fs::create_dir_all(dir.join(rel).parent().unwrap()).unwrap();
        std::fs::write(dir.join(rel), bytes).unwrap();
    }
    let newest = dir.join("model_iteration15");
    let target = if FILES[file] == POINTER { dir.join(POINTER) } else { newest.join(FILES[file]) };
    let bytes = std::fs::read(&target).unwrap();
    std::fs::write(&target, damaged(&bytes, d)).unwrap();
    if reseal_it && FILES[file] != POINTER && FILES[file] != "manifest.json" {
        reseal(&newest, FILES[file]);
    }

    match checkpoint::read_verified(&newest) {
        Ok((c, _)) => {
            // What was read passed every check a resume relies on.
            c.engine.check().unwrap();
            assert!(c.model.iter().chain(&c.optimizer).all(|t| t.numel() == t.data.len()));
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(matches!(e, CheckpointError::Read { .. }), "{shown}");
            assert!(shown.contains("model_iteration15"), "{shown}");
        }
    }
    match checkpoint::resume_point(&dir) {
        Ok(Some(p)) => {
            assert_eq!(p.path.parent(), Some(dir.as_path()), "resumed outside the run: {}", p.path.display());
            let older = dir.join("model_iteration12");
            if p.path == older {
                assert_eq!(p.checkpoint, state(12));
            }
        }
        Ok(None) => panic!("the run's intact checkpoint 12 was not found"),
        Err(e) => panic!("checkpoint 12 is intact, yet no resume point: {e}"),
    }
    if let Some(p) = checkpoint::latest(&dir) {
        assert_eq!(p.parent(), Some(dir.as_path()), "latest outside the run: {}", p.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(600), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_damaged_checkpoint_file_is_an_error_or_a_fallback_never_a_panic(
        file in 0..FILES.len(),
        d in damage(),
        reseal_it in prop::bool::weighted(0.7),
    ) {
        check(file, &d, reseal_it);
    }
}
