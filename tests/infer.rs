//! `tessera infer` end to end: weights written in timm's names (and in
//! tessera's) load by name, and the logits, loss and gradients it writes equal
//! those of the same model run directly; bad weights fail with a clear list.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use tessera_compiler::{config, elaborate::Program, pipeline::inference_plan};
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::philox::Stream;
use tessera_runtime::weights::{
    export, model_tensors, read_safetensors, write_safetensors, NamedTensor, WeightsFormat,
};
use tessera_runtime::Tensor;

const B: usize = 2;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let s = Stream::new(seed, 0, 0);
    (0..n as u64).map(|i| s.uniform_at(i) * 2.0 - 1.0).collect()
}

/// Runs the model directly with seed-`seed` initial weights; returns the
/// weights (tessera names) and the outputs.
fn direct(name: &str, seed: u64, x: &Tensor, target: &Tensor) -> (Vec<NamedTensor>, BTreeMap<String, Tensor>) {
    let cfg = config::load(name, &["DATA.TRAIN.COLLATE_FUNCTION=default_collate".into()]).unwrap();
    let prog = Program::load(&[]).unwrap();
    let (plan, _) = inference_plan(&prog, cfg.tree(), B as u64, true).unwrap();
    let names = model_tensors(&plan);
    let mut ex = CpuExecutor::new(plan, seed).unwrap();
    let weights = names
        .iter()
        .filter_map(|(n, shape)| {
            let t = ex.state(n)?;
            let data = t
                .as_f32()
                .map(|d| d.to_vec())
                .unwrap_or_else(|| t.as_i64().unwrap().iter().map(|&v| v as f32).collect());
            Some(NamedTensor::new(n, shape.clone(), data))
        })
        .collect();
    let out = ex.run(&[("data", x.clone()), ("target", target.clone())]).unwrap();
    (weights, out)
}

/// `x` as the `input` tensor of a safetensors file, as `tessera infer --input` reads it.
fn write_input(path: &Path, x: &Tensor) {
    let input = NamedTensor::new("input", x.shape.clone(), x.as_f32().unwrap().to_vec());
    write_safetensors(path, &[input], &BTreeMap::new()).unwrap();
}

fn tessera(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().expect("run tessera");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn check(config_name: &str, format: WeightsFormat, dir: &Path) {
    let x = Tensor::f32(vec![B, 3, 32, 32], random(B * 3 * 32 * 32, 3));
    let target = Tensor::i64(vec![B], vec![3, 7]);
    let (weights, want) = direct(config_name, 11, &x, &target);
    let file = export(&weights, format);
    let tag = format!("{}-{format}", config_name.replace('/', "_"));
    let (w, xin, tin, y) = (
        dir.join(format!("{tag}-w.safetensors")),
        dir.join(format!("{tag}-x.safetensors")),
        dir.join(format!("{tag}-t.safetensors")),
        dir.join(format!("{tag}-y.safetensors")),
    );
    write_safetensors(&w, &file, &BTreeMap::new()).unwrap();
    write_input(&xin, &x);
    write_safetensors(&tin, &[NamedTensor::new("target", vec![B], vec![3.0, 7.0])], &BTreeMap::new()).unwrap();
    let (ok, err) = tessera(&[
        "infer",
        &format!("config={config_name}"),
        "--weights",
        w.to_str().unwrap(),
        "--input",
        xin.to_str().unwrap(),
        "--target",
        tin.to_str().unwrap(),
        "--output",
        y.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got: BTreeMap<String, NamedTensor> =
        read_safetensors(&y).unwrap().into_iter().map(|t| (t.name.clone(), t)).collect();
    assert_eq!(got["logits"].data, want["output"].as_f32().unwrap(), "{config_name}: logits");
    assert_eq!(got["loss"].data, want["loss"].as_f32().unwrap(), "{config_name}: loss");
    // Every gradient, named as in the weights file.
    let grads: Vec<NamedTensor> = want
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("grad.")
                .map(|n| NamedTensor::new(n.to_string(), t.shape.clone(), t.as_f32().unwrap().to_vec()))
        })
        .collect();
    let grads = export(&grads, format);
    assert!(!grads.is_empty());
    for g in grads {
        let key = format!("grad.{}", g.name);
        let have = got
            .get(&key)
            .unwrap_or_else(|| panic!("{config_name}: {key} missing; have {:?}", got.keys().collect::<Vec<_>>()));
        assert_eq!(have.data, g.data, "{config_name}: {key}");
    }
}

#[test]
fn infer_with_timm_and_tessera_weights() {
    let dir = std::env::temp_dir().join(format!("tessera-infer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    check("quickstart/vit_tiny", WeightsFormat::Timm, &dir);
    check("quickstart/vit_tiny", WeightsFormat::Tessera, &dir);
    check("quickstart/convit_tiny", WeightsFormat::Timm, &dir);
    // timm names really are timm's.
    let names: Vec<String> = read_safetensors(&dir.join("quickstart_convit_tiny-timm-w.safetensors"))
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    for want in [
        "cls_token",
        "pos_embed",
        "blocks.0.attn.qk.weight",
        "blocks.0.attn.gating_param",
        "blocks.2.attn.qkv.weight",
        "head.weight",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn infer_reports_weights_that_do_not_fit() {
    let dir = std::env::temp_dir().join(format!("tessera-infer-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let x = Tensor::f32(vec![B, 3, 32, 32], random(B * 3 * 32 * 32, 3));
    let (mut weights, _) = direct("quickstart/vit_tiny", 1, &x, &Tensor::i64(vec![B], vec![0, 1]));
    let i = weights.iter().position(|t| t.name == "trunk.blocks.0.mlp.fc1.weight").unwrap();
    weights[i] = NamedTensor::new(weights[i].name.clone(), vec![64, 64], vec![0.0; 64 * 64]);
    weights.push(NamedTensor::new("trunk.extra", vec![3], vec![0.0; 3]));
    weights.retain(|t| t.name != "trunk.norm.bias");
    let w = dir.join("w.safetensors");
    write_safetensors(&w, &weights, &BTreeMap::new()).unwrap();
    let xin = dir.join("x.safetensors");
    write_input(&xin, &x);
    let (ok, err) = tessera(&[
        "infer",
        "config=quickstart/vit_tiny",
        "--weights",
        w.to_str().unwrap(),
        "--input",
        xin.to_str().unwrap(),
        "--output",
        dir.join("y.safetensors").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("trunk.blocks.0.mlp.fc1.weight") && err.contains("[64, 64]") && err.contains("[128, 64]"),
        "{err}"
    );
    assert!(err.contains("trunk.extra"), "{err}");
    assert!(err.contains("trunk.norm.bias"), "{err}");
    // --output naming the weights (or the input) would replace them with
    // logits: refused, and the file is left as it was.
    let before = std::fs::read(&w).unwrap();
    for same in [&w, &xin] {
        let (ok, err) = tessera(&[
            "infer",
            "config=quickstart/vit_tiny",
            "--weights",
            w.to_str().unwrap(),
            "--input",
            xin.to_str().unwrap(),
            "--output",
            same.to_str().unwrap(),
        ]);
        assert!(!ok && err.contains("the results would replace it"), "{err}");
    }
    assert_eq!(std::fs::read(&w).unwrap(), before);
    std::fs::remove_dir_all(&dir).ok();
}

/// `tessera export`: a run's checkpoint written in timm's names (and in
/// tessera's) loads back through `tessera infer` to bitwise the logits of
/// the checkpoint itself, for ViT, ConViT (its qk / pos_proj / gating
/// layouts) and DeiT distilled (dist_token, head_dist); ViT's file holds
/// exactly timm's state dict keys (what `load_state_dict(strict=True)`
/// needs). Bad sources are refused with the reason.
#[test]
fn export_writes_a_checkpoint_that_loads_back_bitwise_in_timm_and_tessera_names() {
    let dir = std::env::temp_dir().join(format!("tessera-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let x = Tensor::f32(vec![B, 3, 32, 32], random(B * 3 * 32 * 32, 5));
    write_input(Path::new(&p("x.safetensors")), &x);
    let logits = |config: &str, weights: &str, out: &str| {
        let (ok, err) = tessera(&[
            "infer",
            &format!("config={config}"),
            "--weights",
            weights,
            "--input",
            &p("x.safetensors"),
            "--output",
            &p(out),
        ]);
        assert!(ok, "{config} with {weights}: {err}");
        read_safetensors(Path::new(&p(out))).unwrap().into_iter().find(|t| t.name == "logits").unwrap().data
    };
    // The ViT exported below (tessera names) teaches the distilled DeiT.
    let teacher = format!("LOSS.distillation.teacher_weights={}", p("vit-tessera.safetensors"));
    for (config, tag, extra) in [
        ("quickstart/vit_tiny", "vit", None),
        ("quickstart/convit_tiny", "convit", None),
        ("quickstart/deit_tiny_distilled", "deit", Some(teacher.as_str())),
    ] {
        let run = p(&format!("run-{tag}"));
        let mut args = vec![
            "train".to_string(),
            format!("config={config}"),
            "DATA.TRAIN.DATA_SOURCES=[synthetic]".into(),
            "DATA.TRAIN.LABEL_SOURCES=[synthetic]".into(),
            "TEST_MODEL=false".into(),
            format!("CHECKPOINT.DIR={run}"),
            "--max-steps".into(),
            "1".into(),
            "-q".into(),
        ];
        args.extend(extra.map(String::from));
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (ok, err) = tessera(&args);
        assert!(ok, "{config}: {err}");
        let want = logits(config, &run, &format!("{tag}-ckpt.safetensors"));
        for format in ["timm", "tessera"] {
            let file = p(&format!("{tag}-{format}.safetensors"));
            let (ok, err) = tessera(&["export", &run, "--format", format, "-o", &file]);
            assert!(ok, "{config} --format {format}: {err}");
            assert!(err.contains(&format!("in {format} names to {file}")), "{err}");
            assert_eq!(logits(config, &file, &format!("{tag}-{format}-y.safetensors")), want, "{config}, {format}");
        }
        let names: Vec<String> = read_safetensors(Path::new(&p(&format!("{tag}-timm.safetensors"))))
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        match tag {
            "vit" => {
                let mut timm: Vec<String> =
                    ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight"]
                        .iter()
                        .chain(&["norm.bias", "head.weight", "head.bias"])
                        .map(|s| s.to_string())
                        .collect();
                for b in 0..2 {
                    for t in [
                        "norm1.weight",
                        "norm1.bias",
                        "attn.qkv.weight",
                        "attn.proj.weight",
                        "attn.proj.bias",
                        "norm2.weight",
                        "norm2.bias",
                        "mlp.fc1.weight",
                        "mlp.fc1.bias",
                        "mlp.fc2.weight",
                        "mlp.fc2.bias",
                    ] {
                        timm.push(format!("blocks.{b}.{t}"));
                    }
                }
                let (mut have, mut timm) = (names.clone(), timm);
                have.sort();
                timm.sort();
                assert_eq!(have, timm, "timm's vit state dict keys");
            }
            "convit" => {
                for n in ["blocks.0.attn.qk.weight", "blocks.0.attn.pos_proj.weight", "blocks.0.attn.gating_param"] {
                    assert!(names.iter().any(|h| h == n), "{n} not in {names:?}");
                }
            }
            _ => {
                for n in ["dist_token", "head_dist.weight", "head.weight"] {
                    assert!(names.iter().any(|h| h == n), "{n} not in {names:?}");
                }
            }
        }
    }
    // Refused: a file already in timm's names, a directory with no
    // checkpoint, and -o naming the source.
    let (ok, err) = tessera(&["export", &p("vit-timm.safetensors"), "--format", "timm", "-o", &p("again.safetensors")]);
    assert!(!ok && err.contains("already uses timm's names"), "{err}");
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let (ok, err) = tessera(&["export", &p("empty"), "--format", "timm", "-o", &p("e.safetensors")]);
    assert!(!ok && err.contains("no checkpoint in it"), "{err}");
    let src = p("vit-tessera.safetensors");
    let (ok, err) = tessera(&["export", &src, "--format", "timm", "-o", &src]);
    assert!(!ok && err.contains("is the source"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `tessera infer` plans the forward for the input's size: a 64-pixel input
/// with IMAGE_SIZE=64 runs on a config whose transforms crop 32, giving
/// the logits of the model planned for 64-pixel crops.
#[test]
fn infer_takes_the_input_size_from_the_input_file() {
    let dir = std::env::temp_dir().join(format!("tessera-infer-size-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image_size = "MODEL.TRUNK.VISION_TRANSFORMERS.IMAGE_SIZE=64".to_string();
    let crop = "DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 64}, {name: ToTensor}]".to_string();
    let cfg = config::load("quickstart/vit_tiny", &[image_size.clone(), crop]).unwrap();
    let prog = Program::load(&[]).unwrap();
    let (plan, _) = inference_plan(&prog, cfg.tree(), B as u64, false).unwrap();
    let names = model_tensors(&plan);
    let mut ex = CpuExecutor::new(plan, 5).unwrap();
    let weights: Vec<NamedTensor> = names
        .iter()
        .map(|(n, shape)| NamedTensor::new(n, shape.clone(), ex.state(n).unwrap().as_f32().unwrap().to_vec()))
        .collect();
    let x = Tensor::f32(vec![B, 3, 64, 64], random(B * 3 * 64 * 64, 9));
    let want = ex.run(&[("data", x.clone())]).unwrap();
    let (w, xin, y) = (dir.join("w.safetensors"), dir.join("x.safetensors"), dir.join("y.safetensors"));
    write_safetensors(&w, &weights, &BTreeMap::new()).unwrap();
    write_input(&xin, &x);
    let (ok, err) = tessera(&[
        "infer",
        "config=quickstart/vit_tiny",
        &image_size,
        "--weights",
        w.to_str().unwrap(),
        "--input",
        xin.to_str().unwrap(),
        "--output",
        y.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = read_safetensors(&y).unwrap().into_iter().find(|t| t.name == "logits").unwrap();
    assert_eq!(got.data, want["output"].as_f32().unwrap());
    std::fs::remove_dir_all(&dir).ok();
}

/// Targets are class indices. A file may hold them as f32 (safetensors
/// writers often do); whole numbers within the classes are used as such,
/// and any other value (a soft target, -1 for "no label", a class the head
/// does not score) is an error naming the file and the sample instead of a
/// silent cast into another class (issue 15, defect 11).
#[test]
fn infer_refuses_targets_that_are_not_class_indices() {
    let dir = std::env::temp_dir().join(format!("tessera-infer-targets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let name = "quickstart/vit_tiny";
    let x = Tensor::f32(vec![B, 3, 32, 32], random(B * 3 * 32 * 32, 5));
    let (weights, _) = direct(name, 2, &x, &Tensor::i64(vec![B], vec![0, 1]));
    let (w, xin, y) = (dir.join("w.safetensors"), dir.join("x.safetensors"), dir.join("y.safetensors"));
    write_safetensors(&w, &weights, &BTreeMap::new()).unwrap();
    write_input(&xin, &x);
    let infer = |targets: &[f32]| {
        let tin = dir.join("t.safetensors");
        write_safetensors(&tin, &[NamedTensor::new("target", vec![B], targets.to_vec())], &BTreeMap::new()).unwrap();
        let args = ["infer", "config=quickstart/vit_tiny", "--weights", w.to_str().unwrap(), "--input"];
        let mut a: Vec<&str> = args.to_vec();
        a.extend([xin.to_str().unwrap(), "--target", tin.to_str().unwrap(), "--output", y.to_str().unwrap()]);
        tessera(&a)
    };
    let (ok, err) = infer(&[3.0, 9.0]);
    assert!(ok, "{err}");
    for (targets, part) in [
        (vec![3.0, 2.5], "holds 2.5 for sample 1"),
        (vec![-1.0, 2.0], "holds -1 for sample 0"),
        (vec![3.0, 10.0], "holds 10 for sample 1"),
    ] {
        let (ok, err) = infer(&targets);
        assert!(!ok, "{targets:?}");
        assert!(err.contains(&format!("{}: `target` {part}", dir.join("t.safetensors").display())), "{err}");
        assert!(err.contains("whole numbers from 0 to 9 (the model scores 10 classes)"), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
