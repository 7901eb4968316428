//! The `tessera` binary as the command-line tests run it: scratch
//! directories, generated image folders, runs and their JSON step records.
//!
//! ```ignore
//! mod cli;
//! use cli::{run, synth_folder, tmpdir};
//! ```
#![allow(dead_code)] // each test file uses a different subset

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The binary under test, not started yet.
pub fn command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// Runs `tessera ARGS` to completion.
pub fn run(args: &[String]) -> Output {
    command().args(args).output().expect("run tessera")
}

/// A run's stdout and stderr, for messages.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Asserts that a run succeeded, showing its output if not.
pub fn ok(o: &Output) {
    assert!(o.status.success(), "{}", text(o));
}

/// An empty scratch directory for this test process and `tag`.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `tessera data synth` into `root/data`: `classes` classes with
/// `train` and `val` images each (`data/train`, `data/val`).
pub fn synth_folder(root: &Path, classes: u32, train: u32, val: u32) -> PathBuf {
    let out = root.join("data");
    let mut args = vec!["data".to_string(), "synth".into(), "--out".into(), out.display().to_string()];
    for (flag, n) in [("--classes", classes), ("--train-per-class", train), ("--val-per-class", val)] {
        args.extend([flag.to_string(), n.to_string()]);
    }
    ok(&run(&args));
    out
}

/// The step records a run wrote to `dir/stdout.json` (none if absent).
pub fn records(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("stdout.json"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until `dir` has `n` step records of the running `child`.
pub fn wait_for_records(child: &mut Child, dir: &Path, n: usize) {
    let start = Instant::now();
    while records(dir).len() < n {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The quickstart ViT on `data`, 4 classes (top-1 and top-4 accuracy),
/// batch 16, everything logged.
pub fn vit_tiny_args(data: &Path, ckpt: &Path, epochs: u32, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "train".to_string(),
        "config=quickstart/vit_tiny".into(),
        format!("DATA.TRAIN.DATA_PATHS=[{}]", data.join("train").display()),
        format!("DATA.TEST.DATA_PATHS=[{}]", data.join("val").display()),
        "DATA.TRAIN.BATCHSIZE_PER_REPLICA=16".into(),
        "DATA.TEST.BATCHSIZE_PER_REPLICA=16".into(),
        "MODEL.HEAD.PARAMS=[[mlp, {dims: [64, 4]}]]".into(),
        // The quickstart's top-5 is above these 4 classes, which is refused.
        "METERS.accuracy_list_meter.topk_values=[1, 4]".into(),
        format!("OPTIMIZER.num_epochs={epochs}"),
        format!("CHECKPOINT.DIR={}", ckpt.display()),
        "LOG_FREQUENCY=1".into(),
        "-q".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}
