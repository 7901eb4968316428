//! SwAV's iteration-keyed hooks through the training loop (reference 4.2):
//! prototypes frozen for their first iterations (no update, then AdamW's
//! step count starting at their first update), prototype rows L2-normalised
//! after every step, and the embedding queue used and filled from
//! `queue.start_iter` on; a run resumed across those thresholds ends
//! bitwise where an uninterrupted one does.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_engine::checkpoint::{self, Checkpoint};
use tessera_engine::source::{Batch, InMemory, Labels};
use tessera_engine::trainer::{train, Outcome, TrainSetup};
use tessera_runtime::Tensor;

const B: usize = 8;
const PROTOS: &str = "heads.0.prototypes0.weight";

/// The quickstart's crops of B images per batch (two 32x32, two 16x16,
/// crop-major), from a fixed stream.
fn batches(n: usize) -> Vec<Batch> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut crops =
        |side: usize| Tensor::f32(vec![2 * B, 3, side, side], (0..2 * B * 3 * side * side).map(|_| rand()).collect());
    (0..n)
        .map(|_| Batch {
            images: vec![("data.0".into(), crops(32)), ("data.1".into(), crops(16))],
            labels: Labels::Hard(vec![0; B]),
            size: B,
        })
        .collect()
}

fn cfg(dir: &Path, extra: &[&str]) -> Value {
    let mut ov: Vec<String> = vec![
        format!("CHECKPOINT.DIR={}", dir.display()),
        format!("DATA.TRAIN.BATCHSIZE_PER_REPLICA={B}"),
        "OPTIMIZER.num_epochs=1".into(),
        "OPTIMIZER.weight_decay=0".into(),
        "OPTIMIZER.param_schedulers.lr.name=constant".into(),
        "OPTIMIZER.param_schedulers.lr.value=0.01".into(),
        "MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[[module.heads.0.prototypes0.weight, 2]]".into(),
    ];
    ov.extend(extra.iter().map(|s| s.to_string()));
    config::load("quickstart/swav_vit_tiny", &ov).unwrap_or_else(|e| panic!("{e}")).tree().clone()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-swav-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Trains (or resumes) up to `steps` iterations of 6 and reads the checkpoint.
fn run_to(cfg: &Value, prog: &Program, steps: u64) -> Checkpoint {
    let out = train(TrainSetup {
        cfg,
        prog,
        train: Box::new(InMemory { batches: batches(6) }),
        test: None,
        max_steps: Some(steps),
        stop: Arc::new(AtomicBool::new(false)),
        quiet: true,
        device: None,
        plans: None,
        world: None,
        origin: None,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let path = match out {
        Outcome::Stopped { checkpoint, .. } | Outcome::Finished { checkpoint } => checkpoint,
        other => panic!("{other:?}"),
    };
    checkpoint::read(&path).unwrap()
}

fn tensor<'a>(c: &'a Checkpoint, name: &str) -> Option<&'a [f32]> {
    c.model.iter().chain(&c.optimizer).find(|t| t.name == name).map(|t| t.data.as_slice())
}

fn row_norms(w: &[f32], cols: usize) -> Vec<f64> {
    w.chunks(cols).map(|r| r.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()).collect()
}

#[test]
fn prototypes_stay_frozen_then_take_adamws_first_step_and_are_normalised_after_every_step() {
    let prog = Program::load(&[]).unwrap();
    // Without normalisation the raw AdamW update is visible.
    let raw = tmpdir("raw");
    let c = cfg(&raw, &["LOSS.swav_loss.normalize_last_layer=false"]);
    let init = run_to(&c, &prog, 0);
    let after2 = run_to(&c, &prog, 2);
    let after3 = run_to(&c, &prog, 3);
    let p0 = tensor(&init, PROTOS).unwrap();
    // Frozen for iterations 0 and 1: no update, no optimizer state, while
    // the rest of the model trains.
    assert_eq!(tensor(&after2, PROTOS).unwrap(), p0);
    assert!(tensor(&after2, &format!("optim.exp_avg.{PROTOS}")).is_none());
    let head = "heads.0.projection_head.0.weight";
    assert_ne!(tensor(&after2, head).unwrap(), tensor(&init, head).unwrap());
    // Iteration 2 is the prototypes' first AdamW step (step count 1): with
    // bias correction 1 - beta^1, m_hat / sqrt(v_hat) = g / |g|, so every
    // element moves by the lr (0.01). The run's clock (step 3) would give 0.64 lr.
    let p3 = tensor(&after3, PROTOS).unwrap();
    let moved: Vec<f32> = p3.iter().zip(p0).map(|(a, b)| (a - b).abs()).collect();
    let exact = moved.iter().filter(|&&d| (d - 0.01).abs() < 2e-5).count();
    assert!(exact * 10 >= moved.len() * 9, "{exact} of {} elements moved by the lr: {:?}", moved.len(), &moved[..8]);
    assert!(moved.iter().all(|&d| d < 0.01 + 2e-5), "{:?}", moved.iter().cloned().fold(0.0f32, f32::max));
    assert!(tensor(&after3, &format!("optim.exp_avg.{PROTOS}")).is_some());
    std::fs::remove_dir_all(&raw).unwrap();

    // NormalizePrototypesHook: after every step, frozen or not, each row has
    // unit norm; the first forward used the unnormalised initial rows.
    let normed = tmpdir("normed");
    let c = cfg(&normed, &[]);
    let init = run_to(&c, &prog, 0);
    let k = 16; // embedding dim of the quickstart swav_head
    assert!(row_norms(tensor(&init, PROTOS).unwrap(), k).iter().all(|n| (n - 1.0).abs() > 1e-3));
    let after1 = run_to(&c, &prog, 1);
    let p0 = tensor(&init, PROTOS).unwrap();
    let p1 = tensor(&after1, PROTOS).unwrap();
    for (r, (a, b)) in p1.chunks(k).zip(p0.chunks(k)).enumerate() {
        let n = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - *y as f64 / n).abs() < 1e-6, "row {r}: {x} vs {}", *y as f64 / n);
        }
    }
    for steps in [2, 4] {
        let c = run_to(&c, &prog, steps);
        assert!(row_norms(tensor(&c, PROTOS).unwrap(), k).iter().all(|n| (n - 1.0).abs() < 1e-5), "step {steps}");
    }
    std::fs::remove_dir_all(&normed).unwrap();
}

#[test]
fn the_queue_starts_at_start_iter_and_resume_across_stages_is_exact() {
    let prog = Program::load(&[]).unwrap();
    let queue = ["LOSS.swav_loss.queue.queue_length=20", "LOSS.swav_loss.queue.start_iter=3"];
    let staged = tmpdir("staged");
    let c = cfg(&staged, &queue);
    // Before start_iter there is no queue.
    let at3 = run_to(&c, &prog, 3);
    assert!(at3.model.iter().all(|t| !t.name.contains("local_emb_queue")));
    // After iteration 3 each assignment crop's queue (20 rounded down to 16,
    // a multiple of the batch) holds that batch's unit-norm embeddings in
    // columns 0..8 and zeros after; its pointer is at 8.
    let at4 = run_to(&c, &prog, 4);
    for i in 0..2 {
        let q = tensor(&at4, &format!("loss.local_emb_queue.{i}.emb")).unwrap();
        assert_eq!(q.len(), 16 * 16);
        let col = |j: usize| (0..16).map(|d| (q[d * 16 + j] as f64).powi(2)).sum::<f64>().sqrt();
        for j in 0..16 {
            let want = if j < B { 1.0 } else { 0.0 };
            assert!((col(j) - want).abs() < 1e-5, "queue {i} column {j}: norm {}", col(j));
        }
        assert_eq!(at4.engine.int_state[&format!("loss.local_emb_queue.{i}.ptr")].data, vec![B as i64]);
    }
    // Resumed twice across the thresholds (prototypes unfrozen at 2, queue
    // from 3) vs straight through: the same weights, queues and losses.
    let end = run_to(&c, &prog, 6);
    let whole = tmpdir("whole");
    let straight = run_to(&cfg(&whole, &queue), &prog, 6);
    assert_eq!(end.model, straight.model);
    assert_eq!(end.optimizer, straight.optimizer);
    assert_eq!(end.engine.int_state, straight.engine.int_state);
    std::fs::remove_dir_all(&staged).unwrap();
    std::fs::remove_dir_all(&whole).unwrap();
}
