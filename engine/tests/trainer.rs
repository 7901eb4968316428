//! The training loop on the tiny quickstart ViT with batches in memory:
//! files as VISSL names them, learning, exact resume, a finished run not
//! repeated, and a non-finite loss stopping with a clear message.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_engine::checkpoint;
use tessera_engine::source::{Batch, InMemory, Labels};
use tessera_engine::trainer::{train, EngineError, Outcome, TrainSetup};
use tessera_runtime::Tensor;

/// Images whose class (0..4) is the brightest quadrant, plus noise.
fn batches(n: usize, batch: usize, salt: u64, poison: bool) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut state = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    for _ in 0..n {
        let mut data = vec![0f32; batch * 3 * 32 * 32];
        let mut labels = Vec::new();
        for s in 0..batch {
            let class = (rand() * 4.0) as usize % 4;
            labels.push(class as i64);
            for c in 0..3 {
                for y in 0..32 {
                    for x in 0..32 {
                        let q = (y / 16) * 2 + x / 16;
                        let v = if q == class { 1.0 } else { 0.0 } + 0.3 * (rand() - 0.5);
                        data[((s * 3 + c) * 32 + y) * 32 + x] = v;
                    }
                }
            }
        }
        if poison {
            data[0] = f32::NAN;
        }
        out.push(Batch {
            images: vec![("data".into(), Tensor::f32(vec![batch, 3, 32, 32], data))],
            labels: Labels::Hard(labels),
            size: batch,
        });
    }
    out
}

fn cfg(dir: &Path, extra: &[&str]) -> Value {
    let mut ov: Vec<String> = vec![
        format!("CHECKPOINT.DIR={}", dir.display()),
        "OPTIMIZER.num_epochs=3".into(),
        "DATA.TRAIN.BATCHSIZE_PER_REPLICA=8".into(),
        "LOG_FREQUENCY=1".into(),
        "MODEL.HEAD.PARAMS=[[mlp, {dims: [64, 4]}]]".into(),
        "METERS.accuracy_list_meter.topk_values=[1, 2]".into(),
    ];
    ov.extend(extra.iter().map(|s| s.to_string()));
    config::load("quickstart/vit_tiny", &ov).unwrap_or_else(|e| panic!("{e}")).tree().clone()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-trainer-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(cfg: &Value, prog: &Program, max_steps: Option<u64>, poison: bool) -> Result<Outcome, EngineError> {
    train(TrainSetup {
        cfg,
        prog,
        train: Box::new(InMemory { batches: batches(6, 8, 1, poison) }),
        test: Some(Box::new(InMemory { batches: batches(3, 8, 2, false) })),
        max_steps,
        stop: Arc::new(AtomicBool::new(false)),
        quiet: true,
        device: None,
        plans: None,
        world: None,
        origin: None,
    })
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn training_learns_and_writes_vissls_files() {
    let dir = tmpdir("learns");
    let prog = Program::load(&[]).unwrap();
    let c = cfg(&dir, &[]);
    let out = run(&c, &prog, None, false).unwrap();
    assert_eq!(out, Outcome::Finished { checkpoint: dir.join("model_final_checkpoint_phase2") });
    // One metrics line per phase: train and test for each of 3 epochs.
    let metrics = json_lines(&dir.join("metrics.json"));
    assert_eq!(metrics.len(), 6);
    assert_eq!(metrics[1]["phase_idx"], 1);
    assert!(metrics[0]["train_accuracy_list_meter"]["top_1"]["0"].is_number());
    let test_top1 = metrics[5]["test_accuracy_list_meter"]["top_1"]["0"].as_f64().unwrap();
    let test_top2 = metrics[5]["test_accuracy_list_meter"]["top_2"]["0"].as_f64().unwrap();
    assert!(test_top2 >= test_top1);
    // Logged every step (LOG_FREQUENCY 1): 18 records with falling loss.
    let steps = json_lines(&dir.join("stdout.json"));
    assert_eq!(steps.len(), 18);
    assert_eq!(steps[17]["iteration"], 18);
    let first: f64 = steps[..6].iter().map(|s| s["loss"].as_f64().unwrap()).sum::<f64>() / 6.0;
    let last: f64 = steps[12..].iter().map(|s| s["loss"].as_f64().unwrap()).sum::<f64>() / 6.0;
    assert!(last < first * 0.9, "the loss did not fall: {first} -> {last}");
    // The lr follows the config's cosine from 0.001 to 0 over the 18 steps.
    let lr0 = steps[0]["lr"].as_f64().unwrap();
    assert!((lr0 - 0.001).abs() < 1e-12, "{lr0}");
    let lr9 = steps[9]["lr"].as_f64().unwrap();
    let expect = 0.5 * 0.001 * (1.0 + (std::f64::consts::PI * 9.0 / 18.0).cos());
    assert!((lr9 - expect).abs() < 1e-12, "{lr9} vs {expect}");
    for name in ["model_phase0", "model_phase1", "model_final_checkpoint_phase2"] {
        assert!(dir.join(name).join("model.safetensors").is_file(), "{name}");
    }
    assert!(std::fs::read_to_string(dir.join("log.txt")).unwrap().contains("checkpoint"));
    // A finished run is not repeated.
    let again = run(&c, &prog, None, false).unwrap();
    assert_eq!(again, Outcome::AlreadyFinished { checkpoint: dir.join("model_final_checkpoint_phase2") });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stopped_and_resumed_run_ends_bitwise_where_an_uninterrupted_one_does() {
    let prog = Program::load(&[]).unwrap();
    let a = tmpdir("whole");
    let b = tmpdir("resumed");
    // Dropout on, so the random streams must resume too.
    let extra =
        ["MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1", "MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.2"];
    run(&cfg(&a, &extra), &prog, None, false).unwrap();
    // Stop mid-epoch (step 8 of 18, epoch 1), then finish.
    let stopped = run(&cfg(&b, &extra), &prog, Some(8), false).unwrap();
    assert_eq!(
        stopped,
        Outcome::Stopped { checkpoint: b.join("model_iteration8"), iteration: 8, reason: "step limit" }
    );
    let done = run(&cfg(&b, &extra), &prog, None, false).unwrap();
    assert!(matches!(done, Outcome::Finished { .. }));
    let wa = checkpoint::read(&a.join("model_final_checkpoint_phase2")).unwrap();
    let wb = checkpoint::read(&b.join("model_final_checkpoint_phase2")).unwrap();
    assert_eq!(wa.model, wb.model, "weights differ after resume");
    assert_eq!(wa.optimizer, wb.optimizer, "optimizer state differs after resume");
    // Same per-step losses (the resumed log has steps 1-8 then 9-18).
    let la: Vec<Value> = json_lines(&a.join("stdout.json")).iter().map(|s| s["loss"].clone()).collect();
    let lb: Vec<Value> = json_lines(&b.join("stdout.json")).iter().map(|s| s["loss"].clone()).collect();
    assert_eq!(la, lb);
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}

#[test]
fn a_nan_loss_stops_with_the_step_and_the_last_good_checkpoint() {
    let dir = tmpdir("nan");
    let prog = Program::load(&[]).unwrap();
    let e = run(&cfg(&dir, &[]), &prog, None, true).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("the loss is NaN at iteration 0 (epoch 0)") && msg.contains("No checkpoint was written yet"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A crash during a test phase (emulated: the phase checkpoint as written
/// before its test) resumes by running that test phase first: the metrics
/// and final weights equal an uninterrupted run's.
#[test]
fn a_crash_during_a_test_phase_runs_it_on_resume() {
    let prog = Program::load(&[]).unwrap();
    let whole = tmpdir("test-whole");
    run(&cfg(&whole, &[]), &prog, None, false).unwrap();
    let crashed = tmpdir("test-crash");
    std::fs::create_dir_all(&crashed).unwrap();
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy(&whole.join("model_phase0"), &crashed.join("model_phase0"));
    checkpoint::update_engine_state(&crashed.join("model_phase0"), |s| {
        s.test_pending = true;
        s.phase_idx = 1;
    })
    .unwrap();
    let out = run(&cfg(&crashed, &[]), &prog, None, false).unwrap();
    assert_eq!(out, Outcome::Finished { checkpoint: crashed.join("model_final_checkpoint_phase2") });
    let tests = |d: &Path| -> Vec<Value> {
        json_lines(&d.join("metrics.json"))
            .into_iter()
            .filter(|r| r.get("test_accuracy_list_meter").is_some())
            .map(|r| serde_json::json!([r["phase_idx"], r["train_phase_idx"], r["test_accuracy_list_meter"]]))
            .collect()
    };
    assert_eq!(tests(&crashed), tests(&whole));
    let (a, b) = (
        checkpoint::read(&whole.join("model_final_checkpoint_phase2")).unwrap(),
        checkpoint::read(&crashed.join("model_final_checkpoint_phase2")).unwrap(),
    );
    assert_eq!(a.model, b.model);
    assert!(b.engine.finished && !b.engine.test_pending);
    std::fs::remove_dir_all(&whole).unwrap();
    std::fs::remove_dir_all(&crashed).unwrap();
}

#[test]
fn iteration_checkpoints_follow_vissls_phase_rules_and_a_step_limit_at_the_end_finishes() {
    let prog = Program::load(&[]).unwrap();
    let dir = tmpdir("iter");
    // 3 epochs of 6 steps; phase checkpoints after epochs 0 and 2 (i % 2 == 0, and the last).
    let extra = ["CHECKPOINT.CHECKPOINT_FREQUENCY=2", "CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=6", "TEST_MODEL=false"];
    let out = run(&cfg(&dir, &extra), &prog, Some(18), false).unwrap();
    assert_eq!(out, Outcome::Finished { checkpoint: dir.join("model_final_checkpoint_phase2") });
    // Step 12 ends epoch 1, which has no phase checkpoint: its iteration checkpoint is kept.
    assert!(dir.join("model_phase0").is_dir());
    assert!(!dir.join("model_phase1").exists());
    assert!(dir.join("model_iteration12").is_dir());
    assert!(!dir.join("model_iteration6").exists(), "the phase checkpoint of epoch 0 holds step 6");
    // A changed run shape is refused on resume.
    let _ = std::fs::remove_dir_all(dir.join("model_final_checkpoint_phase2"));
    std::fs::remove_file(dir.join("checkpoint.json")).unwrap();
    let e = run(&cfg(&dir, &["OPTIMIZER.num_epochs=4", "TEST_MODEL=false"]), &prog, None, false).unwrap_err();
    assert!(e.to_string().contains("is of a run with 3 epochs of 6 steps of batch 8"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
