//! The TensorBoard events of a run, read by TensorBoard's own reader (the
//! `tensorboard` package's EventAccumulator, installed by
//! `scripts/setup-tensorboard.sh`), not by tessera's writer: VISSL's scalar
//! tags, and the parameter and gradient histograms LOG_PARAMS and
//! LOG_PARAMS_GRADIENTS ask for, at VISSL's steps, holding the values the run
//! had (the last parameters against the final checkpoint, read from its
//! safetensors file by Python).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

mod cli;
use cli::{ok, run, synth_folder, tmpdir};

/// The Python with TensorBoard's reader: `TESSERA_TENSORBOARD_PYTHON`, else
/// what `scripts/setup-tensorboard.sh` installs (once per test binary).
fn python() -> &'static PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        if let Some(p) = std::env::var_os("TESSERA_TENSORBOARD_PYTHON") {
            return PathBuf::from(p);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/setup-tensorboard.sh");
        let o = Command::new("bash").arg(&script).output().expect("run setup-tensorboard.sh");
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "setup-tensorboard.sh failed:\n{}", String::from_utf8_lossy(&o.stderr));
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("export TESSERA_TENSORBOARD_PYTHON="))
            .unwrap_or_else(|| panic!("setup-tensorboard.sh printed no export line: {stdout}"));
        PathBuf::from(line.trim_matches('\''))
    })
}

/// Reads every scalar and histogram of the events in argv[1], and the
/// tensors of the safetensors file argv[2]; prints them as JSON.
const READER: &str = r#"
import json, struct, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
acc.Reload()
tags = acc.Tags()
out = {"scalars": {}, "histograms": {}, "weights": {}}
for t in tags["scalars"]:
    out["scalars"][t] = [[e.step, e.value] for e in acc.Scalars(t)]
for t in tags["histograms"]:
    out["histograms"][t] = [
        {"step": e.step, "num": e.histogram_value.num, "sum": e.histogram_value.sum,
         "min": e.histogram_value.min, "max": e.histogram_value.max,
         "counted": sum(e.histogram_value.bucket),
         "limits_rise": all(a < b for a, b in zip(e.histogram_value.bucket_limit, e.histogram_value.bucket_limit[1:]))}
        for e in acc.Histograms(t)]
with open(sys.argv[2], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    data = f.read()
for name, info in header.items():
    if name == "__metadata__":
        continue
    assert info["dtype"] == "F32", info
    a, b = info["data_offsets"]
    xs = struct.unpack("<%df" % ((b - a) // 4), data[a:b])
    out["weights"][name] = {"num": len(xs), "sum": sum(xs), "min": min(xs), "max": max(xs)}
print(json.dumps(out))
"#;

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

fn steps(h: &Value) -> Vec<i64> {
    h.as_array().unwrap().iter().map(|e| e["step"].as_i64().unwrap()).collect()
}

#[test]
fn tensorboard_reads_vissl_tags_and_the_histograms_asked_for() {
    let root = tmpdir("tensorboard");
    // 4 classes x 8 images, batch 16: 2 steps an epoch, 3 epochs.
    let data = synth_folder(&root, 4, 8, 4);
    let ckpt = root.join("run");
    let o = run(&cli::vit_tiny_args(
        &data,
        &ckpt,
        3,
        &[
            "HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=true",
            "HOOKS.TENSORBOARD_SETUP.LOG_PARAMS=true",
            "HOOKS.TENSORBOARD_SETUP.LOG_PARAMS_GRADIENTS=true",
            "HOOKS.TENSORBOARD_SETUP.LOG_PARAMS_EVERY_N_ITERS=2",
        ],
    ));
    ok(&o);
    let latest: Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("checkpoint.json")).unwrap()).unwrap();
    let model = ckpt.join(latest["latest"].as_str().unwrap()).join("model.safetensors");
    let r = Command::new(python()).arg("-c").arg(READER).arg(ckpt.join("tensorboard")).arg(&model).output().unwrap();
    assert!(r.status.success(), "the reader failed:\n{}", String::from_utf8_lossy(&r.stderr));
    let tb: Value = serde_json::from_slice(&r.stdout).unwrap();

    // VISSL's scalars at the logged iterations (LOG_FREQUENCY=1: each).
    let scalars = tb["scalars"].as_object().unwrap();
    for tag in [
        "Training/Loss",
        "Training/Learning_rate",
        "Speed/Batch_processing_time_ms",
        "Speed/img_per_sec_per_gpu",
        "Speed/ETA_hours",
    ] {
        let s: Vec<i64> = scalars[tag].as_array().unwrap().iter().map(|p| p[0].as_i64().unwrap()).collect();
        assert_eq!(s, [1, 2, 3, 4, 5, 6], "{tag}");
    }
    let eta = scalars["Speed/ETA_hours"].as_array().unwrap();
    assert_eq!(eta.last().unwrap()[1], 0.0, "no time left after the last step");
    let loss_json: Vec<f64> = cli::records(&ckpt).iter().map(|r| r["loss"].as_f64().unwrap()).collect();
    let loss_tb: Vec<f64> =
        scalars["Training/Loss"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
    for (a, b) in loss_json.iter().zip(&loss_tb) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "stdout.json loss {a}, TensorBoard {b}");
    }
    // Accuracy per phase at the phase's index.
    for tag in ["Training/accuracy_list_meter_top_1_Output_0", "Testing/accuracy_list_meter_top_1_Output_0"] {
        let s: Vec<i64> = scalars[tag].as_array().unwrap().iter().map(|p| p[0].as_i64().unwrap()).collect();
        assert_eq!(s, [0, 1, 2], "{tag}");
    }

    let hist = tb["histograms"].as_object().unwrap();
    let weights = tb["weights"].as_object().unwrap();
    let params: Vec<&String> = hist.keys().filter(|t| t.starts_with("Parameters/")).collect();
    let grads: Vec<&String> = hist.keys().filter(|t| t.starts_with("Gradients/")).collect();
    // Every trainable weight has both (the checkpoint also holds buffers).
    assert!(params.len() >= 10, "{params:?}");
    assert_eq!(params.len(), grads.len());
    for p in &params {
        let name = &p["Parameters/".len()..];
        let w = &weights[name];
        let h = &hist[p.as_str()];
        // Before training (-1), before the steps at iterations 0, 2, 4, and
        // at the end of phases 0, 1, 2, in the order written.
        assert_eq!(steps(h), [-1, 0, 0, 2, 1, 4, 2], "{p}");
        for e in h.as_array().unwrap() {
            assert_eq!(f(&e["num"]), f(&w["num"]), "{p}");
            assert_eq!(f(&e["counted"]), f(&w["num"]), "{p}: every value in a bucket");
            assert_eq!(e["limits_rise"], true, "{p}");
        }
        // The last one is the final checkpoint's weights.
        let last = h.as_array().unwrap().last().unwrap();
        let (s, t) = (f(&last["sum"]), f(&w["sum"]));
        assert!((s - t).abs() <= 1e-4 * (1.0 + t.abs()), "{p}: histogram sum {s}, checkpoint {t}");
        assert_eq!(f(&last["min"]) as f32, f(&w["min"]) as f32, "{p}");
        assert_eq!(f(&last["max"]) as f32, f(&w["max"]) as f32, "{p}");
        // Nothing changes the weights between "before training" and the first step.
        assert_eq!(h[0]["sum"], h[1]["sum"], "{p}");
        let g = &hist[&format!("Gradients/{name}")];
        // After the steps ending at iterations 2, 4, 6, and of each phase's
        // last step at its end: the same gradients as the step before.
        assert_eq!(steps(g), [2, 0, 4, 1, 6, 2], "{name}");
        let g = g.as_array().unwrap();
        for (a, b) in [(0, 1), (2, 3), (4, 5)] {
            assert_eq!(g[a]["sum"], g[b]["sum"], "{name}: the phase's last gradients");
        }
        assert!(g.iter().all(|e| f(&e["num"]) == f(&w["num"])), "{name}");
        assert_ne!(g[0]["sum"], g[2]["sum"], "{name}: gradients of different steps");
    }
    std::fs::remove_dir_all(&root).unwrap();
}
