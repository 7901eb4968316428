//! Linear evaluation (MODEL.FEATURE_EVAL_SETTINGS, reference 7.2): the
//! trunk's features against their definitions (reference 1.6) and against
//! the usual trunk output; the frozen trunk (eval mode, no gradient, no
//! optimizer state); config errors; and `tessera train` runs: from a MoCo
//! checkpoint (trunk loaded bitwise and unchanged, heads trained, metrics
//! per head), and two steps of the ImageNet benchmark config on a small folder.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::training_plan;
use tessera_compiler::Compiled;
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::weights::{read_safetensors, NamedTensor};
use tessera_runtime::Tensor;

mod cli;
use cli::{ok, run, synth_folder, tmpdir};

const LINEAR_EVAL: &str = "quickstart/linear_eval_vit_tiny";
const BENCHMARK: &str = "benchmark/linear_image_classification/imagenet1k";
const BATCH: usize = 3;

fn compile(name: &str, overrides: &[&str]) -> Result<Compiled, String> {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = config::load(name, &ov).map_err(|e| e.to_string())?;
    let prog = Program::load(&[]).expect("embedded models parse");
    tessera_compiler::compile(&prog, cfg.tree()).map_err(|e| e.to_string())
}

fn error(name: &str, overrides: &[&str]) -> String {
    match compile(name, overrides) {
        Ok(_) => panic!("{name} {overrides:?} should not compile"),
        Err(e) => e,
    }
}

/// The feature map and one `mlp` head per feature, as overrides.
fn features(names: &[(&str, usize)]) -> Vec<String> {
    let map: Vec<String> = names.iter().map(|(n, _)| format!("[{n}, [Identity, []]]")).collect();
    let heads: Vec<String> = names.iter().map(|(_, d)| format!("[mlp, {{dims: [{d}, 10]}}]")).collect();
    vec![
        format!("MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP=[{}]", map.join(", ")),
        format!("MODEL.HEAD.PARAMS=[{}]", heads.join(", ")),
    ]
}

/// The trunk's outputs of `c` on `images`, with the state of `weights` when given.
fn trunk_outputs(c: &Compiled, images: &[f32], weights: Option<&CpuExecutor>) -> (Vec<Tensor>, CpuExecutor) {
    let mut g = c.graph.clone();
    for (i, v) in c.trunk_features.iter().enumerate() {
        g.set_output(&format!("feature.{i}"), *v);
    }
    g.prune(|n| n.starts_with("feature."), false);
    let plan = tessera_compiler::plan::lower(&g, BATCH as u64, false).expect("lowers");
    let mut ex = CpuExecutor::new(plan, 0).expect("executor");
    if let Some(w) = weights {
        for name in ex.state_names() {
            let t = w.state(&name).unwrap_or_else(|| panic!("{name} not in the other model")).clone();
            ex.set_state(&name, t).unwrap();
        }
    }
    let out = ex.run(&[("data", Tensor::f32(vec![BATCH, 3, 32, 32], images.to_vec()))]).expect("runs");
    let feats = (0..c.trunk_features.len()).map(|i| out[&format!("feature.{i}")].clone()).collect();
    (feats, ex)
}

fn images() -> Vec<f32> {
    (0..BATCH * 3 * 32 * 32).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect()
}

fn rows(t: &Tensor) -> Vec<&[f32]> {
    let d = t.shape[1];
    t.as_f32().unwrap().chunks(d).collect()
}

#[test]
fn features_follow_vissls_definitions() {
    let ov = features(&[
        ("concatCLS2", 128),
        ("lastCLS", 64),
        ("concatCLS1", 64),
        ("blkCLS0", 64),
        ("blkCLS1", 64),
        ("blkCLS-1", 64),
    ]);
    let ov: Vec<&str> = ov.iter().map(String::as_str).collect();
    let c = compile(LINEAR_EVAL, &ov).unwrap();
    let (f, ex) = trunk_outputs(&c, &images(), None);
    let shapes: Vec<Vec<usize>> = f.iter().map(|t| t.shape.clone()).collect();
    assert_eq!(shapes, [[BATCH, 128], [BATCH, 64], [BATCH, 64], [BATCH, 64], [BATCH, 64], [BATCH, 64]]);
    let (concat2, last, concat1, blk0, blk1, blk_last) = (&f[0], &f[1], &f[2], &f[3], &f[4], &f[5]);
    assert_eq!(concat1, last, "concatCLS1 is lastCLS");
    assert_eq!(blk1, last, "blkCLS1 is the last block's of 2");
    assert_eq!(blk_last, last, "blkCLS-1 indexes from the end");
    assert_ne!(blk0, last);
    // concatCLS2: the class tokens of both blocks side by side, in block order.
    for ((c, a), b) in rows(concat2).into_iter().zip(rows(blk0)).zip(rows(blk1)) {
        assert_eq!(c, [a, b].concat());
    }
    // Through the final norm: lastCLS is the usual trunk output with the same weights.
    let plain = compile("quickstart/vit_tiny", &[]).unwrap();
    let (usual, _) = trunk_outputs(&plain, &images(), Some(&ex));
    assert_eq!(&usual[0], last);
    // Each normed class token has mean 0 over its features (weight 1, bias 0).
    for row in rows(blk0) {
        let mean = row.iter().sum::<f32>() / row.len() as f32;
        assert!(mean.abs() < 1e-4, "blkCLS0 is not through the norm: mean {mean}");
    }
}

#[test]
fn pooled_features_of_a_trunk_without_class_token() {
    let no_cls = "MODEL.TRUNK.VISION_TRANSFORMERS.USE_CLASS_TOKEN=false";
    let mut ov = features(&[("lastPOOL", 64), ("concatPOOL2", 128)]);
    ov.push(no_cls.into());
    let ov: Vec<&str> = ov.iter().map(String::as_str).collect();
    let c = compile(LINEAR_EVAL, &ov).unwrap();
    let (f, ex) = trunk_outputs(&c, &images(), None);
    assert_eq!((f[0].shape.as_slice(), f[1].shape.as_slice()), ([BATCH, 64].as_slice(), [BATCH, 128].as_slice()));
    for (c2, last) in rows(&f[1]).into_iter().zip(rows(&f[0])) {
        assert_eq!(&c2[64..], last);
    }
    let plain = compile("quickstart/vit_tiny", &[no_cls]).unwrap();
    let (usual, _) = trunk_outputs(&plain, &images(), Some(&ex));
    assert_eq!(usual[0], f[0], "lastPOOL is the usual mean-pooled output");
}

#[test]
fn the_frozen_trunk_has_no_gradient_no_optimizer_state_and_no_dropout() {
    let drop = [
        "MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1",
        "MODEL.TRUNK.VISION_TRANSFORMERS.ATTENTION_DROPOUT_RATE=0.1",
        "MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.1",
    ];
    let c = compile(LINEAR_EVAL, &drop).unwrap();
    for (_, name, trainable) in c.graph.params() {
        assert_eq!(trainable, name.starts_with("heads."), "{name}");
    }
    let random_ops = |text: &str| -> Vec<String> {
        let ops = ["= dropout(", "= drop_path(", "dropout=0.1"];
        ops.iter().filter(|op| text.contains(*op)).map(|op| op.to_string()).collect()
    };
    assert!(random_ops(&c.graph.to_text()).is_empty(), "the frozen trunk is in eval mode");
    // The same trunk trained: dropout, drop path and attention dropout are there.
    assert_eq!(random_ops(&compile("quickstart/vit_tiny", &drop).unwrap().graph.to_text()).len(), 3);

    let state = |name: &str| -> Vec<String> {
        let cfg = config::load(name, &[]).unwrap();
        let (plan, _) = training_plan(&Program::load(&[]).unwrap(), cfg.tree(), 4).unwrap();
        let ex = CpuExecutor::new(plan, 0).unwrap();
        ex.state_names().into_iter().filter(|n| n.starts_with("optim.")).collect()
    };
    let optim = state(LINEAR_EVAL);
    assert!(optim.iter().all(|n| !n.contains("trunk.")), "{optim:?}");
    assert!(optim.iter().any(|n| n.contains("heads.3.")), "{optim:?}");
    assert!(state("quickstart/vit_tiny").iter().any(|n| n.contains("trunk.")), "a trained trunk has optimizer state");
}

#[test]
fn bad_feature_settings_are_errors_naming_the_key() {
    let e = error(
        LINEAR_EVAL,
        &["MODEL.HEAD.PARAMS=[[mlp, {dims: [128, 10]}], [mlp, {dims: [64, 10]}], [mlp, {dims: [128, 10]}]]"],
    );
    assert!(e.contains("MODEL.HEAD.PARAMS") && e.contains("3 heads") && e.contains("4 features"), "{e}");
    let feature_error = |name: &str, dim: usize| -> String {
        let ov = features(&[(name, dim)]);
        error(LINEAR_EVAL, &ov.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let e = feature_error("lastPOOL", 64);
    assert!(e.contains("USE_CLASS_TOKEN"), "{e}");
    let e = feature_error("concatCLS3", 192);
    assert!(e.contains("concatCLS3") && e.contains("the trunk has 2"), "{e}");
    let e = feature_error("blkCLS2", 64);
    assert!(e.contains("blkCLS2"), "{e}");
    let e = feature_error("lastMAP", 64);
    assert!(e.contains("LINEAR_EVAL_FEAT_POOL_OPS_MAP.0") && e.contains("lastMAP"), "{e}");
    let e = error(LINEAR_EVAL, &["MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_ONLY=false"]);
    assert!(e.contains("FREEZE_TRUNK_ONLY"), "{e}");
    let e = error(LINEAR_EVAL, &["MODEL.TRUNK.NAME=convit"]);
    assert!(e.contains("MODEL.TRUNK.NAME") && e.contains("convit"), "{e}");
}

// ---- `tessera train` ------------------------------------------------------

fn data_args(data: &Path, batch: usize) -> Vec<String> {
    vec![
        format!("DATA.TRAIN.DATA_PATHS=[{}]", data.join("train").display()),
        format!("DATA.TEST.DATA_PATHS=[{}]", data.join("val").display()),
        format!("DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}"),
        format!("DATA.TEST.BATCHSIZE_PER_REPLICA={batch}"),
        "DATA.NUM_DATALOADER_WORKERS=0".into(),
        "-q".into(),
    ]
}

fn tensors(path: &Path) -> BTreeMap<String, NamedTensor> {
    read_safetensors(path).unwrap().into_iter().map(|t| (t.name.clone(), t)).collect()
}

fn under<'a>(m: &'a BTreeMap<String, NamedTensor>, prefix: &str) -> BTreeMap<&'a str, &'a NamedTensor> {
    m.iter().filter(|(n, _)| n.starts_with(prefix)).map(|(n, t)| (n.as_str(), t)).collect()
}

#[test]
fn linear_eval_of_a_moco_checkpoint_trains_heads_on_its_unchanged_trunk() {
    let root = tmpdir("moco");
    let data = synth_folder(&root, 4, 32, 8);
    let moco = root.join("moco");
    let a = ["train", "config=quickstart/moco_vit_tiny", "OPTIMIZER.num_epochs=1", "-q"];
    let mut a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
    a.push(format!("CHECKPOINT.DIR={}", moco.display()));
    a.push(format!("DATA.TRAIN.DATA_PATHS=[{}]", data.join("train").display()));
    a.push("DATA.TRAIN.BATCHSIZE_PER_REPLICA=16".into());
    ok(&run(&a));
    let pretrained = moco.join("model_final_checkpoint_phase0");

    // heads.0's names are MoCo's projection head's with other shapes: loading
    // the file's heads would be a shape error.
    let eval = root.join("eval");
    let mut a = vec![
        "train".to_string(),
        format!("config={LINEAR_EVAL}"),
        "MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP=[[concatCLS2, [Identity, []]], [lastCLS, [Identity, []]]]".into(),
        "MODEL.HEAD.PARAMS=[[mlp, {dims: [128, 4]}], [eval_mlp, {in_channels: 64, dims: [64, 4]}]]".into(),
        // Top-5 would be above the 4 classes.
        "METERS.accuracy_list_meter.topk_values=[1, 4]".into(),
        "OPTIMIZER.num_epochs=2".into(),
        "OPTIMIZER.param_schedulers.lr.values=[0.1, 0.01]".into(),
        "OPTIMIZER.param_schedulers.lr.milestones=[1]".into(),
        format!("MODEL.WEIGHTS_INIT.PARAMS_FILE={}", pretrained.display()),
        format!("CHECKPOINT.DIR={}", eval.display()),
    ];
    a.extend(data_args(&data, 16));
    // A file without the trunk (here the optimizer state) is an error, not a random trunk.
    let mut wrong = a.clone();
    let optimizer_file = pretrained.join("optimizer.safetensors");
    wrong.push(format!("MODEL.WEIGHTS_INIT.PARAMS_FILE={}", optimizer_file.display()));
    wrong.push(format!("CHECKPOINT.DIR={}", root.join("wrong").display()));
    let o = run(&wrong);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no trunk tensor"), "{err}");
    ok(&run(&a));
    let log = std::fs::read_to_string(eval.join("log.txt")).unwrap();
    assert!(log.contains("loads the trunk only"), "{log}");

    let file = tensors(&pretrained.join("model.safetensors"));
    assert!(file.keys().any(|n| n.starts_with("loss.moco_encoder.")) && file.keys().any(|n| n.starts_with("heads.0")));
    let first = tensors(&eval.join("model_phase0").join("model.safetensors"));
    let last = tensors(&eval.join("model_final_checkpoint_phase1").join("model.safetensors"));
    // The trunk is the file's, bitwise, and stays so; the heads train.
    assert!(!under(&file, "trunk.").is_empty());
    assert_eq!(under(&first, "trunk."), under(&file, "trunk."));
    assert_eq!(under(&last, "trunk."), under(&file, "trunk."));
    assert!(!first.keys().any(|n| n.starts_with("loss.")), "no MoCo state in the linear-eval model");
    for name in ["heads.0.clf.0.weight", "heads.1.clf.clf.0.weight", "heads.1.channel_bn.running_mean"] {
        assert_ne!(first[name].data, last[name].data, "{name} did not train");
    }
    let optim = tensors(&eval.join("model_final_checkpoint_phase1").join("optimizer.safetensors"));
    assert!(optim.keys().all(|n| !n.contains("trunk.")), "{:?}", optim.keys());
    assert!(optim.keys().any(|n| n.contains("heads.1.")), "{:?}", optim.keys());

    // metrics.json: per phase, top-1 and top-4 of each head, named after its feature.
    let metrics: Vec<Value> = std::fs::read_to_string(eval.join("metrics.json"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for meter in ["train_accuracy_list_meter", "test_accuracy_list_meter"] {
        let records: Vec<&Value> = metrics.iter().filter_map(|r| r.get(meter)).collect();
        assert_eq!(records.len(), 2, "{meter}: {metrics:?}");
        for r in records {
            for k in ["top_1", "top_4"] {
                let per = r[k].as_object().unwrap_or_else(|| panic!("{meter} lacks {k}: {r}"));
                assert_eq!(per.keys().collect::<Vec<_>>(), ["concatCLS2", "lastCLS"], "{r}");
                assert!(per.values().all(|v| (0.0..=100.0).contains(&v.as_f64().unwrap())), "{r}");
            }
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn the_imagenet_benchmark_config_runs_two_steps_on_a_small_folder() {
    let root = tmpdir("bench");
    let data = synth_folder(&root, 4, 32, 8);
    let vt = "MODEL.TRUNK.VISION_TRANSFORMERS";
    let mut a = vec![
        "train".to_string(),
        format!("config={BENCHMARK}/eval_vit_8gpu_transfer_in1k_linear"),
        format!("+config/{BENCHMARK}/models=deit_tiny"),
        format!("{vt}.IMAGE_SIZE=32"),
        format!("{vt}.PATCH_SIZE=8"),
        format!("{vt}.NUM_LAYERS=4"),
        format!("{vt}.NUM_HEADS=2"),
        format!("{vt}.HIDDEN_DIM=16"),
        format!("{vt}.MLP_DIM=32"),
        "MODEL.HEAD.PARAMS=[[eval_mlp, {in_channels: 64, dims: [64, 4]}], [eval_mlp, {in_channels: 16, dims: [16, 4]}], [mlp, {dims: [64, 4]}], [mlp, {dims: [16, 4]}]]".into(),
        "METERS.accuracy_list_meter.topk_values=[1, 4]".into(),
        "DATA.TRAIN.TRANSFORMS.0.size=32".into(),
        "DATA.TEST.TRANSFORMS.0.size=36".into(),
        "DATA.TEST.TRANSFORMS.1.size=32".into(),
        "MACHINE.DEVICE=cpu".into(),
        "LOG_FREQUENCY=1".into(),
        format!("CHECKPOINT.DIR={}", root.join("run").display()),
        "--max-steps".into(),
        "2".into(),
    ];
    a.extend(data_args(&data, 8));
    ok(&run(&a));
    let records: Vec<Value> = std::fs::read_to_string(root.join("run").join("stdout.json"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records.iter().all(|r| r["loss"].as_f64().is_some_and(f64::is_finite)), "{records:?}");
    std::fs::remove_dir_all(&root).unwrap();
}
