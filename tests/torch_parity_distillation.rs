//! DeiT distillation against libtorch (Touvron et al. 2021; timm's
//! VisionTransformerDistilled, facebookresearch/deit losses.py):
//! - timm-named random weights of a tiny distilled DeiT, loaded by `tessera
//!   infer --weights-format timm`, give timm's eval forward: `logits.0`
//!   (head), `logits.1` (head_dist) and `logits`, their mean, from an eager
//!   model that reads the timm names directly (tests/oracle/models.rs);
//! - the soft and hard distillation losses, with the teacher in the graph,
//!   and every student gradient equal libtorch's (F.kl_div with log_target,
//!   sum, times tau^2 / numel; cross-entropy to the teacher's argmax), with a
//!   ViT and a ConViT teacher.
//!
//! Run: `eval "$(./scripts/setup-libtorch.sh)" && cargo test --release --features torch-oracle --test torch_parity_distillation -- --nocapture`
#![cfg(feature = "torch-oracle")]

#[path = "oracle/models.rs"]
mod models;
mod oracle;

use models::{labels, normal_values, soft_targets, ModelSpec, Params};
use oracle::{rel_err, tensor_from, to_vec};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use tch::{Kind, Reduction, Tensor as TT};
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::inference_plan;
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::weights::{read_safetensors, write_safetensors, NamedTensor};
use tessera_runtime::Tensor;

/// The bound on max |tessera - torch| / max |torch| of every compared tensor.
const MAX_REL: f64 = 1e-4;
const BATCH: usize = 4;
const STUDENT: &str = "quickstart/deit_tiny_distilled";

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-parity-distill-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// timm's deit_*_distilled_* state dict for the quickstart student (D 64, 2
/// blocks, MLP 128, 8-px patches of 32-px images, 10 classes), written from
/// timm's module layout, not from tessera's names.
fn timm_shapes() -> Vec<(String, Vec<usize>)> {
    let (d, n, mlp, k) = (64, 16, 128, 10);
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("cls_token".into(), vec![1, 1, d]),
        ("dist_token".into(), vec![1, 1, d]),
        ("pos_embed".into(), vec![1, n + 2, d]),
        ("patch_embed.proj.weight".into(), vec![d, 3, 8, 8]),
        ("patch_embed.proj.bias".into(), vec![d]),
    ];
    for i in 0..2 {
        for (m, shape) in [
            ("norm1.weight", vec![d]),
            ("norm1.bias", vec![d]),
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.qkv.bias", vec![3 * d]),
            ("attn.proj.weight", vec![d, d]),
            ("attn.proj.bias", vec![d]),
            ("norm2.weight", vec![d]),
            ("norm2.bias", vec![d]),
            ("mlp.fc1.weight", vec![mlp, d]),
            ("mlp.fc1.bias", vec![mlp]),
            ("mlp.fc2.weight", vec![d, mlp]),
            ("mlp.fc2.bias", vec![d]),
        ] {
            v.push((format!("blocks.{i}.{m}"), shape));
        }
    }
    for (m, shape) in [
        ("norm.weight", vec![d]),
        ("norm.bias", vec![d]),
        ("head.weight", vec![k, d]),
        ("head.bias", vec![k]),
        ("head_dist.weight", vec![k, d]),
        ("head_dist.bias", vec![k]),
    ] {
        v.push((m.to_string(), shape));
    }
    v
}

/// Random timm weights: N(0, 0.2²), LayerNorm weights around 1.
fn timm_weights() -> Vec<NamedTensor> {
    timm_shapes()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let around = if name.contains("norm") && name.ends_with("weight") { 1.0 } else { 0.0 };
            let data = normal_values(500 + i as u64, shape.iter().product()).iter().map(|x| around + 0.2 * x).collect();
            NamedTensor::new(name, shape, data)
        })
        .collect()
}

fn timm_params(weights: &[NamedTensor]) -> Params {
    let map = weights
        .iter()
        .map(|t| {
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            (t.name.clone(), tensor_from(&t.data, &shape))
        })
        .collect();
    Params::new(map)
}

#[test]
fn timm_distilled_weights_through_tessera_infer_give_timms_eval_output() {
    let dir = tmpdir("infer");
    let weights = timm_weights();
    let (w, xin, y) = (dir.join("w.safetensors"), dir.join("x.safetensors"), dir.join("y.safetensors"));
    write_safetensors(&w, &weights, &BTreeMap::new()).unwrap();
    let x = normal_values(31, BATCH * 3 * 32 * 32);
    write_safetensors(&xin, &[NamedTensor::new("input", vec![BATCH, 3, 32, 32], x.clone())], &BTreeMap::new()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["infer", &format!("config={STUDENT}"), "LOSS.distillation.type=none", "--weights-format", "timm"])
        .args(["--weights".as_ref(), w.as_os_str(), "--input".as_ref(), xin.as_os_str()])
        .args(["--output".as_ref(), y.as_os_str()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: BTreeMap<String, Vec<f32>> = read_safetensors(&y).unwrap().into_iter().map(|t| (t.name, t.data)).collect();

    let cfg = config::load(STUDENT, &[]).unwrap();
    let spec = ModelSpec::from_config(cfg.tree());
    let params = timm_params(&weights);
    let (head, head_dist, mean) =
        models::timm_distilled_forward(&spec.vit, &params, &tensor_from(&x, &[BATCH as i64, 3, 32, 32]));
    let mut worst = 0.0f64;
    for (name, want) in [("logits.0", &head), ("logits.1", &head_dist), ("logits", &mean)] {
        let e = rel_err(&got[name], &to_vec(want));
        println!("{name}: relative error {e:.2e}");
        assert!(e <= MAX_REL, "{name}: relative error {e:.3e} > {MAX_REL:e}");
        worst = worst.max(e);
    }
    // Every timm tensor was read by the eager model, and the comparison
    // tells the heads apart: head_dist's logits are not head's.
    assert_eq!(params.used().len(), weights.len());
    assert!(rel_err(&got["logits.0"], &to_vec(&head_dist)) > 100.0 * MAX_REL.max(worst));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Compiles the student with `overrides`, perturbs its parameters and the
/// teacher's buffers, runs loss and gradients in eval mode, and compares
/// them with libtorch: student and teacher (its teacher_config) eager,
/// DeiT's DistillationLoss written with torch's own functions.
fn compare_distillation(overrides: &[&str], soft_labels: bool) {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = config::load(STUDENT, &ov).unwrap();
    let prog = Program::load(&[]).unwrap();
    let (plan, compiled) = inference_plan(&prog, cfg.tree(), BATCH as u64, true).unwrap();
    let mut ex = CpuExecutor::new(plan, 3).unwrap();
    let params: Vec<String> = compiled.graph.params().iter().map(|(_, n, _)| n.to_string()).collect();
    let teacher: Vec<String> = ex.state_names().into_iter().filter(|n| n.starts_with("loss.teacher.")).collect();
    assert!(!teacher.is_empty(), "the teacher is in the graph");
    // ConViT's rel_indices is derived from the token grid (never loaded), so it stays as built.
    let weights = teacher.iter().filter(|n| !n.ends_with(".rel_indices"));
    for (i, name) in params.iter().chain(weights).enumerate() {
        let t = ex.state(name).unwrap().clone();
        let noise = normal_values(900 + i as u64, t.numel());
        let v: Vec<f32> = t.as_f32().unwrap().iter().zip(&noise).map(|(x, n)| x + 0.1 * n).collect();
        ex.set_state(name, Tensor::f32(t.shape.clone(), v)).unwrap();
    }
    let data = normal_values(41, BATCH * 3 * 32 * 32);
    let data_t = tensor_from(&data, &[BATCH as i64, 3, 32, 32]);
    let (target, target_t) = if soft_labels {
        let s = soft_targets(42, BATCH, 10);
        (Tensor::f32(vec![BATCH, 10], s.clone()), tensor_from(&s, &[BATCH as i64, 10]))
    } else {
        let l = labels(43, BATCH, 10);
        (Tensor::i64(vec![BATCH], l.clone()), TT::from_slice(&l))
    };
    let out = ex.run(&[("data", Tensor::f32(vec![BATCH, 3, 32, 32], data)), ("target", target)]).unwrap();

    let from_state = |name: &str, grad: bool| {
        let t = ex.state(name).unwrap();
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        tensor_from(t.as_f32().unwrap(), &shape).set_requires_grad(grad)
    };
    let student = Params::new(params.iter().map(|n| (n.clone(), from_state(n, true))).collect());
    let teacher_params = Params::new(
        teacher.iter().map(|n| (n.strip_prefix("loss.teacher.").unwrap().to_string(), from_state(n, false))).collect(),
    );
    let spec = ModelSpec::from_config(cfg.tree());
    let teacher_name = cfg.tree().pointer("/LOSS/distillation/teacher_config").and_then(|v| v.as_str()).unwrap();
    let teacher_cfg = config::load(teacher_name, &[]).unwrap();
    let teacher_logits = models::forward(&ModelSpec::from_config(teacher_cfg.tree()), &teacher_params, &data_t);
    let (cls, dist) = models::forward_distilled(&spec, &student, &data_t);
    let get = |k: &str| cfg.tree().pointer(&format!("/LOSS/distillation/{k}")).cloned().unwrap();
    let (kind, alpha, tau) = (get("type"), get("alpha").as_f64().unwrap(), get("tau").as_f64().unwrap());
    let base = models::loss(&spec, &cls, &target_t);
    let term = match kind.as_str() {
        // deit losses.py: F.kl_div(log_softmax(s / T), log_softmax(t / T), reduction="sum", log_target=True) * T * T / s.numel()
        Some("soft") => {
            let (s, t) =
                ((&dist / tau).log_softmax(1, Kind::Float), (&teacher_logits / tau).log_softmax(1, Kind::Float));
            s.kl_div(&t, Reduction::Sum, true) * (tau * tau) / dist.numel() as f64
        }
        Some("hard") => dist.cross_entropy_for_logits(&teacher_logits.argmax(1, false)),
        other => panic!("type {other:?}"),
    };
    let loss = &base * (1.0 - alpha) + &term * alpha;
    loss.backward();

    let mut problems = Vec::new();
    let check = |what: &str, a: &[f32], e: &TT, problems: &mut Vec<String>| {
        let err = rel_err(a, &to_vec(e));
        println!("  {what:<44} {err:.2e}");
        if err.is_nan() || err > MAX_REL {
            problems.push(format!("{what}: relative error {err:.3e}"));
        }
    };
    println!(
        "{overrides:?}: loss tessera {}, libtorch {}",
        out["loss"].as_f32().unwrap()[0],
        f64::try_from(&loss).unwrap()
    );
    check("loss", out["loss"].as_f32().unwrap(), &loss, &mut problems);
    check("output (mean of the heads)", out["output"].as_f32().unwrap(), &((&cls + &dist) / 2.0), &mut problems);
    for n in &params {
        let g = student.get(n).grad();
        match out.get(&format!("grad.{n}")) {
            Some(t) if g.defined() => check(&format!("grad.{n}"), t.as_f32().unwrap(), &g, &mut problems),
            _ => problems.push(format!("grad.{n}: missing on one side")),
        }
    }
    assert!(!teacher.iter().any(|n| out.contains_key(&format!("grad.{n}"))), "the teacher has no gradient");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn soft_distillation_loss_and_gradients_match_libtorch() {
    // tau 3 (the T^2 factor and the numel divisor matter), alpha 0.3, cutmixup soft labels.
    compare_distillation(
        &["LOSS.distillation.type=soft", "LOSS.distillation.tau=3.0", "LOSS.distillation.alpha=0.3"],
        true,
    );
}

#[test]
fn hard_distillation_loss_and_gradients_match_libtorch() {
    let ov = ["LOSS.distillation.alpha=0.7", "DATA.TRAIN.COLLATE_FUNCTION=default_collate"];
    compare_distillation(&ov, false);
}

/// A ConViT teacher (gated positional attention, its own config's
/// defaults), with the soft term, which depends on every teacher logit.
#[test]
fn soft_distillation_from_a_convit_teacher_matches_libtorch() {
    let ov = [
        "LOSS.distillation.type=soft",
        "LOSS.distillation.tau=2.0",
        "LOSS.distillation.teacher_config=quickstart/convit_tiny",
        "DATA.TRAIN.COLLATE_FUNCTION=default_collate",
    ];
    compare_distillation(&ov, false);
}
