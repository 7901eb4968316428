//! DeiT's distillation through attention, end to end: a tiny distilled
//! student trains through `tessera train` with a tiny teacher whose weights
//! come from a file (tessera and timm names), the teacher's buffers stay as
//! loaded, and config mistakes are errors that name the key or file; the
//! eval prediction is the mean of the two heads; the full-size timm config
//! runs under `tessera infer`.
//! The numbers themselves (losses, gradients, timm's eval forward) are
//! checked against libtorch in `tests/torch_parity_distillation.rs`.

use std::path::{Path, PathBuf};
use tessera_compiler::{compose::compile, config, elaborate::Program, pipeline::inference_plan, plan::Source};
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::weights::{
    export, model_tensors, read_safetensors, write_safetensors, NamedTensor, WeightsFormat,
};
use tessera_runtime::Tensor;

mod cli;
use cli::{run, synth_folder, text, tmpdir};

/// A teacher unlike the student (one block, width 32), on 4 classes.
const TEACHER: &str = "# @package _global_
config:
  MODEL:
    TRUNK:
      NAME: vision_transformer
      VISION_TRANSFORMERS:
        IMAGE_SIZE: 32
        PATCH_SIZE: 8
        NUM_LAYERS: 1
        NUM_HEADS: 2
        HIDDEN_DIM: 32
        MLP_DIM: 64
        QKV_BIAS: True
        DROP_PATH_RATE: 0.5
        DROPOUT_RATE: 0.5
    HEAD:
      PARAMS: [[mlp, {dims: [32, 4]}]]
";

/// Writes the teacher config and seed-`seed` random teacher weights in
/// `format`'s names; returns (config path, weights path, weights in tessera names).
fn teacher(dir: &Path, format: WeightsFormat, seed: u64) -> (PathBuf, PathBuf, Vec<NamedTensor>) {
    let cfg_path = dir.join("teacher.yaml");
    std::fs::write(&cfg_path, TEACHER).unwrap();
    let cfg = config::load(cfg_path.to_str().unwrap(), &[]).unwrap();
    let prog = Program::load(&[]).unwrap();
    let (plan, _) = inference_plan(&prog, cfg.tree(), 1, false).unwrap();
    let names = model_tensors(&plan);
    let ex = CpuExecutor::new(plan, seed).unwrap();
    let weights: Vec<NamedTensor> = names
        .iter()
        .map(|(n, shape)| NamedTensor::new(n, shape.clone(), ex.state(n).unwrap().as_f32().unwrap().to_vec()))
        .collect();
    let path = dir.join(format!("teacher-{format}.safetensors"));
    write_safetensors(&path, &export(&weights, format), &Default::default()).unwrap();
    (cfg_path, path, weights)
}

/// The quickstart distilled DeiT on `data` with 4 classes: one epoch of 2 steps of batch 16, then a test phase.
fn train_args(data: &Path, ckpt: &Path, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "config=quickstart/deit_tiny_distilled",
        "MODEL.HEAD.PARAMS=[[mlp, {dims: [64, 4]}], [mlp, {dims: [64, 4]}]]",
        "DATA.TRAIN.COLLATE_FUNCTION_PARAMS.num_classes=4",
        "DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
        "DATA.TEST.BATCHSIZE_PER_REPLICA=16",
        "DATA.NUM_DATALOADER_WORKERS=1",
        "OPTIMIZER.num_epochs=1",
        "LOG_FREQUENCY=1",
        "METERS.accuracy_list_meter.topk_values=[1]",
        "-q",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("DATA.TRAIN.DATA_PATHS=[{}]", data.join("train").display()));
    a.push(format!("DATA.TEST.DATA_PATHS=[{}]", data.join("val").display()));
    a.push(format!("CHECKPOINT.DIR={}", ckpt.display()));
    a.extend(extra.iter().cloned());
    a
}

fn teacher_overrides(cfg: &Path, weights: &Path, kind: &str, format: WeightsFormat) -> Vec<String> {
    vec![
        format!("LOSS.distillation.type={kind}"),
        format!("LOSS.distillation.teacher_config={}", cfg.display()),
        format!("LOSS.distillation.teacher_weights={}", weights.display()),
        format!("LOSS.distillation.teacher_weights_format={format}"),
    ]
}

/// Per-step losses from stdout.json.
fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("stdout.json"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

/// Trains with `kind` distillation from a teacher in `format`'s names and
/// checks: finite losses for both steps, a test phase, student weights
/// changed, teacher buffers exactly the file's.
fn trains_with_a_frozen_teacher(kind: &str, format: WeightsFormat) {
    let root = tmpdir(&format!("{kind}-{format}"));
    let data = synth_folder(&root, 4, 8, 4);
    let (tcfg, tweights, want) = teacher(&root, format, 5);
    let ckpt = root.join("run");
    let o = run(&train_args(&data, &ckpt, &teacher_overrides(&tcfg, &tweights, kind, format)));
    assert!(o.status.success(), "{}", text(&o));
    let l = losses(&ckpt);
    assert_eq!(l.len(), 2, "two steps logged: {l:?}");
    assert!(l.iter().all(|v| v.is_finite() && *v > 0.0), "losses {l:?}");
    let log = std::fs::read_to_string(ckpt.join("log.txt")).unwrap();
    assert!(log.contains(&format!("distillation teacher: {} tensors from", want.len())), "{log}");
    let metrics = std::fs::read_to_string(ckpt.join("metrics.json")).unwrap();
    assert!(metrics.contains("test_accuracy_list_meter"), "no test phase: {metrics}");

    let state = read_safetensors(&ckpt.join("model_final_checkpoint_phase0").join("model.safetensors")).unwrap();
    let get = |n: &str| state.iter().find(|t| t.name == n).unwrap_or_else(|| panic!("no {n} in the checkpoint"));
    for t in &want {
        assert_eq!(get(&format!("loss.teacher.{}", t.name)).data, t.data, "teacher {} changed", t.name);
    }
    // The student trained, its distillation head and token included.
    let cfg = config::load("quickstart/deit_tiny_distilled", &[]).unwrap();
    let (plan, _) = inference_plan(&Program::load(&[]).unwrap(), cfg.tree(), 1, false).unwrap();
    let initial = CpuExecutor::new(plan, 0).unwrap();
    for n in ["trunk.dist_token", "heads.1.clf.0.bias", "trunk.blocks.0.attn.qkv.weight"] {
        assert_ne!(get(n).data, initial.state(n).unwrap().as_f32().unwrap(), "{n} did not train");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn hard_distillation_trains_with_a_frozen_tessera_teacher() {
    trains_with_a_frozen_teacher("hard", WeightsFormat::Tessera);
}

#[test]
fn soft_distillation_trains_with_a_frozen_timm_teacher() {
    trains_with_a_frozen_teacher("soft", WeightsFormat::Timm);
}

#[test]
fn a_missing_teacher_file_names_the_key_and_the_file() {
    let root = tmpdir("missing");
    let data = synth_folder(&root, 4, 8, 4);
    let (tcfg, _, _) = teacher(&root, WeightsFormat::Tessera, 5);
    let absent = root.join("no-such-teacher.safetensors");
    let ov = teacher_overrides(&tcfg, &absent, "hard", WeightsFormat::Tessera);
    let o = run(&train_args(&data, &root.join("run"), &ov));
    assert!(!o.status.success());
    let err = text(&o);
    assert!(err.contains("LOSS.distillation.teacher_weights"), "{err}");
    assert!(err.contains(&absent.display().to_string()), "{err}");
    // An empty key is refused too, before any step.
    let ov = teacher_overrides(&tcfg, Path::new(""), "soft", WeightsFormat::Tessera);
    let o = run(&train_args(&data, &root.join("run2"), &ov));
    assert!(!o.status.success());
    assert!(text(&o).contains("`LOSS.distillation.teacher_weights` is empty"), "{}", text(&o));
    std::fs::remove_dir_all(&root).unwrap();
}

fn compile_error(overrides: &[String]) -> String {
    let cfg = config::load("quickstart/deit_tiny_distilled", overrides).unwrap();
    match compile(&Program::load(&[]).unwrap(), cfg.tree()) {
        Ok(_) => panic!("{overrides:?} compiled"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_mistakes_name_their_keys() {
    let root = tmpdir("config");
    // The teacher at another image size.
    let big = root.join("teacher64.yaml");
    std::fs::write(&big, TEACHER.replace("IMAGE_SIZE: 32", "IMAGE_SIZE: 64")).unwrap();
    let err = compile_error(&[format!("LOSS.distillation.teacher_config={}", big.display())]);
    assert!(
        err.contains("the teacher's `MODEL.TRUNK.VISION_TRANSFORMERS.IMAGE_SIZE` is 64")
            && err.contains("the student's `MODEL.TRUNK.VISION_TRANSFORMERS.IMAGE_SIZE` is 32")
            && err.contains(&big.display().to_string()),
        "{err}"
    );
    // A teacher config that does not exist.
    let err = compile_error(&["LOSS.distillation.teacher_config=no/such_teacher".into()]);
    assert!(err.contains("`LOSS.distillation.teacher_config` is `no/such_teacher`, which cannot be loaded"), "{err}");
    // Distillation without a distillation token.
    let err = compile_error(&[
        "MODEL.TRUNK.VISION_TRANSFORMERS.DISTILLED=false".into(),
        "MODEL.HEAD.PARAMS=[[mlp, {dims: [64, 10]}]]".into(),
    ]);
    assert!(err.contains("`LOSS.distillation.type` is hard") && err.contains("DISTILLED: True"), "{err}");
    // Two features but one head (VISSL's routing rule).
    let err = compile_error(&["MODEL.HEAD.PARAMS=[[mlp, {dims: [64, 10]}]]".into()]);
    assert!(err.contains("the trunk returns 2 features but `MODEL.HEAD.PARAMS` has 1 heads"), "{err}");
    let err = compile_error(&["LOSS.distillation.type=medium".into()]);
    assert!(err.contains("`LOSS.distillation.type` must be none, soft or hard, got `medium`"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// The eval prediction (`output`, what the meters and `tessera infer` read)
/// is the mean of the two heads; with type none, the loss is the class
/// head's cross-entropy alone and the distillation head gets no gradient
/// (as DeiT's DistillationLoss with distillation_type none).
#[test]
fn the_prediction_averages_the_heads_and_none_trains_the_class_head_only() {
    let ov = ["LOSS.distillation.type=none".to_string(), "DATA.TRAIN.COLLATE_FUNCTION=default_collate".into()];
    let cfg = config::load("quickstart/deit_tiny_distilled", &ov).unwrap();
    let (plan, _) = inference_plan(&Program::load(&[]).unwrap(), cfg.tree(), 3, true).unwrap();
    let teacher =
        plan.values.iter().any(|v| matches!(&v.source, Source::Buffer { name, .. } if name.starts_with("loss.")));
    assert!(!teacher, "no teacher with type none");
    let mut ex = CpuExecutor::new(plan, 1).unwrap();
    let x: Vec<f32> = (0..3 * 3 * 32 * 32).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let out = ex
        .run(&[("data", Tensor::f32(vec![3, 3, 32, 32], x)), ("target", Tensor::i64(vec![3], vec![1, 4, 9]))])
        .unwrap();
    let (avg, a, b) = (&out["output"], out["output.0"].as_f32().unwrap(), out["output.1"].as_f32().unwrap());
    let want: Vec<f32> = a.iter().zip(b).map(|(x, y)| (x + y) * 0.5).collect();
    assert_eq!(avg.as_f32().unwrap(), want.as_slice());
    assert_ne!(a, b, "two different heads");
    // The distillation token still reaches the class token through attention.
    assert!(out.contains_key("grad.heads.0.clf.0.weight") && out.contains_key("grad.trunk.dist_token"));
    assert!(!out.contains_key("grad.heads.1.clf.0.weight"), "the distillation head gets no gradient with type none");
}

/// Writes the seed-`seed` initial weights of `config_name`'s model in
/// `format`'s names and an input batch; returns (weights, input) paths.
fn weights_and_input(dir: &Path, config_name: &str, format: WeightsFormat, size: usize) -> (PathBuf, PathBuf) {
    let cfg = config::load(config_name, &["LOSS.distillation.type=none".into()]).unwrap();
    let (plan, _) = inference_plan(&Program::load(&[]).unwrap(), cfg.tree(), 1, false).unwrap();
    let names = model_tensors(&plan);
    let ex = CpuExecutor::new(plan, 9).unwrap();
    let weights: Vec<NamedTensor> = names
        .iter()
        .map(|(n, shape)| NamedTensor::new(n, shape.clone(), ex.state(n).unwrap().as_f32().unwrap().to_vec()))
        .collect();
    let (w, x) = (dir.join("w.safetensors"), dir.join("x.safetensors"));
    write_safetensors(&w, &export(&weights, format), &Default::default()).unwrap();
    let input: Vec<f32> = (0..3 * size * size).map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0).collect();
    write_safetensors(&x, &[NamedTensor::new("input", vec![1, 3, size, size], input)], &Default::default()).unwrap();
    (w, x)
}

/// The timm config runs under `tessera infer` with timm-named weights of the
/// real size (12 blocks, 192 wide, 1000 classes): `logits` is the mean of
/// `logits.0` and `logits.1`.
#[test]
fn the_timm_deit_tiny_distilled_config_runs_under_tessera_infer() {
    let dir = tmpdir("timm-config");
    let name = "timm/deit_tiny_distilled_patch16_224";
    let (w, x) = weights_and_input(&dir, name, WeightsFormat::Timm, 224);
    assert!(read_safetensors(&w).unwrap().iter().any(|t| t.name == "head_dist.weight" && t.shape == [1000, 192]));
    let y = dir.join("y.safetensors");
    let args = ["infer", &format!("config={name}"), "--weights-format", "timm", "--weights"];
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.extend([w.display().to_string(), "--input".into(), x.display().to_string(), "--output".into()]);
    a.push(y.display().to_string());
    let o = run(&a);
    assert!(o.status.success(), "{}", text(&o));
    let got: std::collections::BTreeMap<String, NamedTensor> =
        read_safetensors(&y).unwrap().into_iter().map(|t| (t.name.clone(), t)).collect();
    assert_eq!(got["logits"].shape, [1, 1000]);
    let mean: Vec<f32> = got["logits.0"].data.iter().zip(&got["logits.1"].data).map(|(a, b)| (a + b) * 0.5).collect();
    assert_eq!(got["logits"].data, mean);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `tessera infer --target` has no teacher weights, so a distillation loss is refused with a way out.
#[test]
fn infer_with_targets_refuses_a_distillation_loss() {
    let dir = tmpdir("infer-target");
    let (w, x) = weights_and_input(&dir, "quickstart/deit_tiny_distilled", WeightsFormat::Tessera, 32);
    let t = dir.join("t.safetensors");
    write_safetensors(&t, &[NamedTensor::new("target", vec![1], vec![3.0])], &Default::default()).unwrap();
    let mut a: Vec<String> = ["infer", "config=quickstart/deit_tiny_distilled", "--weights"].map(String::from).into();
    for (flag, p) in [("", &w), ("--input", &x), ("--target", &t), ("--output", &dir.join("y.safetensors"))] {
        if !flag.is_empty() {
            a.push(flag.into());
        }
        a.push(p.display().to_string());
    }
    let o = run(&a);
    assert!(!o.status.success());
    assert!(text(&o).contains("add LOSS.distillation.type=none"), "{}", text(&o));
    // With the suggested override, the class head's loss is computed.
    a.insert(2, "LOSS.distillation.type=none".into());
    let o = run(&a);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}
