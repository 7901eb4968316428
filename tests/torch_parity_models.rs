//! Whole tiny models against eager libtorch: the quickstart configs' trunk,
//! head and cross-entropy loss, in eval mode, with tessera's initial weights.
//!
//! tessera runs `inference_plan(.., batch 4, with_grads = true)` on the CPU
//! executor; libtorch runs the eager model of `tests/oracle/models.rs`
//! (written from the reference semantics, independent of tessera's model
//! files) with the same weights (`ex.state(name)`), images and targets.
//! Compared: logits, loss and every parameter gradient, each by its relative
//! error max |tessera - torch| / max |torch| over the tensor, at most 1e-4 in f32.
//!
//! Run: `eval "$(./scripts/setup-libtorch.sh)" && cargo test --release --features torch-oracle --test torch_parity_models -- --nocapture`
//! (`--nocapture` prints the per-tensor errors).
#![cfg(feature = "torch-oracle")]

#[path = "oracle/models.rs"]
mod models;
mod oracle;

use models::{labels, normal_values, soft_targets, ModelSpec, Params};
use oracle::{rel_err, tensor_from, to_vec};
use std::collections::{BTreeMap, BTreeSet};
use tch::Tensor as TT;
use tessera_compiler::autodiff::{Optimizer, StepOptions};
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::{inference_plan, training_plan};
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::Tensor;

/// The bound on max |tessera - torch| / max |torch| of every compared tensor.
const MAX_REL: f64 = 1e-4;
const BATCH: usize = 4;

#[derive(Clone, Copy, PartialEq)]
enum Targets {
    Hard,
    Soft,
}

/// One compared tensor.
struct Compared {
    what: String,
    /// max |tessera - torch| / max |torch|.
    rel: f64,
    max_torch: f64,
    max_tessera: f64,
}

struct Outcome {
    /// The logits, the loss and every gradient.
    compared: Vec<Compared>,
    problems: Vec<String>,
}

fn max_abs(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).abs()).fold(0.0, f64::max)
}

/// A gradient whose exact value is zero (ConViT's `pos_proj.bias`: softmax
/// over keys ignores a per-head constant) holds only rounding noise on both
/// sides, and its relative error is noise over noise. Such a tensor is
/// recognised by both sides being below `ZERO_GRAD` times the largest
/// gradient element of the model, and passes on that bound instead.
const ZERO_GRAD: f64 = 1e-6;

/// Overwrites every trainable parameter with `value + scale * N(0, 1)`, so
/// that no LayerNorm weight is 1 and no bias 0 (a stronger comparison).
fn perturb(ex: &mut CpuExecutor, names: &[String], scale: f32) {
    for (i, name) in names.iter().enumerate() {
        let t = ex.state(name).unwrap().clone();
        let noise = normal_values(7000 + i as u64, t.numel());
        let v: Vec<f32> = t.as_f32().unwrap().iter().zip(&noise).map(|(x, n)| x + scale * n).collect();
        ex.set_state(name, Tensor::f32(t.shape.clone(), v)).unwrap();
    }
}

/// Runs `config` (with `overrides`) in tessera and in the eager libtorch
/// model and compares logits, loss and every gradient.
fn compare_model(config_name: &str, overrides: &[&str], targets: Targets, perturbation: f32) -> Outcome {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = config::load(config_name, &ov).unwrap_or_else(|e| panic!("{config_name}: {e}"));
    let prog = Program::load(&[]).expect("embedded models");
    let (plan, compiled) =
        inference_plan(&prog, cfg.tree(), BATCH as u64, true).unwrap_or_else(|e| panic!("{config_name}: {e}"));
    let mut ex = CpuExecutor::new(plan, 0).unwrap();
    let spec = ModelSpec::from_config(cfg.tree());

    let all_params: Vec<(String, bool)> =
        compiled.graph.params().iter().map(|(_, n, trainable)| (n.to_string(), *trainable)).collect();
    let trainable: Vec<String> = all_params.iter().filter(|(_, t)| *t).map(|(n, _)| n.clone()).collect();
    if perturbation > 0.0 {
        perturb(&mut ex, &trainable, perturbation);
    }

    // Inputs: N(0,1) images, class indices or soft targets over K classes.
    let (_, out_v) = compiled.graph.outputs().iter().find(|(n, _)| n == "output").expect("an `output`");
    let classes = compiled.graph.ty(*out_v).shape.dims()[1].as_const().expect("a fixed class count") as usize;
    let img = spec.vit.image_size;
    let data = normal_values(11, BATCH * 3 * img * img);
    let data_t = tensor_from(&data, &[BATCH as i64, 3, img as i64, img as i64]);
    let (target, target_t) = match targets {
        Targets::Hard => {
            let l = labels(12, BATCH, classes);
            (Tensor::i64(vec![BATCH], l.clone()), TT::from_slice(&l))
        }
        Targets::Soft => {
            let s = soft_targets(13, BATCH, classes);
            (Tensor::f32(vec![BATCH, classes], s.clone()), tensor_from(&s, &[BATCH as i64, classes as i64]))
        }
    };
    let out = ex
        .run(&[("data", Tensor::f32(vec![BATCH, 3, img, img], data.clone())), ("target", target.clone())])
        .unwrap_or_else(|e| panic!("{config_name}: {e}"));

    // The same weights in libtorch, trainable ones with requires_grad.
    let mut map = BTreeMap::new();
    for (name, trainable) in &all_params {
        let t = ex.state(name).unwrap();
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        let tt = tensor_from(t.as_f32().unwrap(), &shape);
        map.insert(name.clone(), if *trainable { tt.set_requires_grad(true) } else { tt });
    }
    let params = Params::new(map);
    let logits = models::forward(&spec, &params, &data_t);
    let loss = models::loss(&spec, &logits, &target_t);
    loss.backward();

    if let (Ok(dir), Targets::Hard) = (std::env::var("TESSERA_FIXTURES_OUT"), targets) {
        let slug =
            format!("{config_name}{}{}", overrides.join(" "), if perturbation > 0.0 { " perturbed" } else { "" });
        let expected: Vec<(String, &TT)> =
            std::iter::once(("logits".to_string(), &logits)).chain([("loss".to_string(), &loss)]).collect();
        export_fixture(
            &dir,
            &slug,
            config_name,
            overrides,
            &ex,
            &all_params,
            &data,
            img,
            &target,
            &expected,
            &params,
            &trainable,
        );
    }
    let mut o = Outcome { compared: vec![], problems: vec![] };
    let check = |what: String, a: &Tensor, e: &TT, o: &mut Outcome| {
        let shape: Vec<i64> = a.shape.iter().map(|&d| d as i64).collect();
        if shape != e.size() {
            o.problems.push(format!("{what}: shape: tessera {:?}, libtorch {:?}", a.shape, e.size()));
            return;
        }
        let (a, e) = (a.as_f32().unwrap(), to_vec(e));
        o.compared.push(Compared { what, rel: rel_err(a, &e), max_torch: max_abs(&e), max_tessera: max_abs(a) });
    };
    check("logits".into(), &out["output"], &logits, &mut o);
    check("loss".into(), &out["loss"], &loss, &mut o);
    for name in &trainable {
        let Some(tg) = out.get(&format!("grad.{name}")) else {
            o.problems.push(format!("grad.{name}: tessera has no gradient"));
            continue;
        };
        let g = params.get(name).grad();
        if !g.defined() {
            o.problems.push(format!("grad.{name}: libtorch has no gradient (the eager model does not use it)"));
            continue;
        }
        check(format!("grad.{name}"), tg, &g, &mut o);
    }
    let largest = o.compared.iter().filter(|c| c.what.starts_with("grad.")).map(|c| c.max_torch).fold(0.0, f64::max);
    println!(
        "\n{config_name} {overrides:?} ({} targets, perturbation {perturbation}):",
        if targets == Targets::Hard { "hard" } else { "soft" }
    );
    println!("  loss tessera {:.6}, libtorch {:.6}", out["loss"].as_f32().unwrap()[0], f32::try_from(&loss).unwrap());
    println!("  {:<48} {:>9} {:>9} {:>9}", "tensor", "rel err", "max|torch|", "max|tessera|");
    let mut worst = (String::new(), 0.0f64);
    for c in &o.compared {
        let zero = c.what.starts_with("grad.") && c.max_torch.max(c.max_tessera) <= ZERO_GRAD * largest;
        let note = if zero { "  (exactly-zero gradient: rounding noise on both sides)" } else { "" };
        println!("  {:<48} {:>9.2e} {:>9.2e} {:>9.2e}{note}", c.what, c.rel, c.max_torch, c.max_tessera);
        if zero {
            continue;
        }
        if c.rel.is_nan() || c.rel > MAX_REL {
            o.problems.push(format!("{}: relative error {:.3e} > {MAX_REL:e}", c.what, c.rel));
        }
        if c.what.starts_with("grad.") && c.rel > worst.1 {
            worst = (c.what.clone(), c.rel);
        }
    }
    println!("  => max gradient relative error {:.2e} ({}); {} tensors compared", worst.1, worst.0, o.compared.len());
    // Both sides must have exactly the same parameters.
    let used = params.used();
    let declared: BTreeSet<String> = all_params.iter().map(|(n, _)| n.clone()).collect();
    for n in declared.difference(&used) {
        o.problems.push(format!("`{n}` is a tessera parameter the eager model does not read"));
    }
    assert!(!trainable.is_empty());
    let lv = out["loss"].as_f32().unwrap()[0];
    if !lv.is_finite() {
        o.problems.push(format!("loss {lv} is not finite"));
    }
    o
}

/// With TESSERA_FIXTURES_OUT=DIR, a compared case is also written as a
/// fixture for `tessera infer` on another device (scripts/gpu-check.sh):
/// `DIR/<case>/` holds the weights (tessera names), `input`, `target`
/// (class indices as f32), libtorch's `logits`, `loss` and `grad.<name>`
/// (expected.safetensors) and case.json (config, overrides, tolerance).
#[allow(clippy::too_many_arguments)]
fn export_fixture(
    dir: &str,
    slug: &str,
    config_name: &str,
    overrides: &[&str],
    ex: &CpuExecutor,
    all_params: &[(String, bool)],
    data: &[f32],
    img: usize,
    target: &Tensor,
    expected: &[(String, &TT)],
    params: &Params,
    trainable: &[String],
) {
    use tessera_runtime::weights::{write_safetensors, NamedTensor};
    // The config's name and a hash of the whole case: short, distinct.
    let hash = slug.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3));
    let name = format!("{}-{:08x}", config_name.replace('/', "_"), hash as u32);
    let root = std::path::Path::new(dir).join(name);
    std::fs::create_dir_all(&root).unwrap();
    let meta = BTreeMap::new();
    let weights: Vec<NamedTensor> = all_params
        .iter()
        .map(|(n, _)| {
            let t = ex.state(n).unwrap();
            NamedTensor::new(n.clone(), t.shape.clone(), t.as_f32().unwrap().to_vec())
        })
        .collect();
    write_safetensors(&root.join("weights.safetensors"), &weights, &meta).unwrap();
    let input = NamedTensor::new("input".to_string(), vec![BATCH, 3, img, img], data.to_vec());
    write_safetensors(&root.join("input.safetensors"), &[input], &meta).unwrap();
    let labels: Vec<f32> = target.as_i64().unwrap().iter().map(|&v| v as f32).collect();
    write_safetensors(
        &root.join("target.safetensors"),
        &[NamedTensor::new("target".to_string(), vec![BATCH], labels)],
        &meta,
    )
    .unwrap();
    let mut exp: Vec<NamedTensor> = expected
        .iter()
        .map(|(n, t)| NamedTensor::new(n.clone(), t.size().iter().map(|&d| d as usize).collect(), to_vec(t)))
        .collect();
    for n in trainable {
        let g = params.get(n).grad();
        if g.defined() {
            exp.push(NamedTensor::new(format!("grad.{n}"), g.size().iter().map(|&d| d as usize).collect(), to_vec(&g)));
        }
    }
    write_safetensors(&root.join("expected.safetensors"), &exp, &meta).unwrap();
    let case = serde_json::json!({
        "config": config_name,
        "overrides": overrides,
        "max_rel": MAX_REL,
        "zero_grad": ZERO_GRAD,
    });
    std::fs::write(root.join("case.json"), case.to_string()).unwrap();
}

fn assert_ok(o: Outcome, what: &str) {
    assert!(o.problems.is_empty(), "{what}: {} problems:\n{}", o.problems.len(), o.problems.join("\n"));
}

#[test]
fn vit_tiny_matches_libtorch() {
    assert_ok(compare_model("quickstart/vit_tiny", &[], Targets::Hard, 0.0), "vit_tiny");
}

#[test]
fn vit_tiny_with_perturbed_weights_matches_libtorch() {
    assert_ok(compare_model("quickstart/vit_tiny", &[], Targets::Hard, 0.1), "vit_tiny perturbed");
}

#[test]
fn deit_tiny_hard_targets_matches_libtorch() {
    let ov = ["DATA.TRAIN.COLLATE_FUNCTION=default_collate"];
    assert_ok(compare_model("quickstart/deit_tiny", &ov, Targets::Hard, 0.0), "deit_tiny hard");
}

#[test]
fn deit_tiny_soft_targets_matches_libtorch() {
    // The config's cutmixup collator gives soft targets [N, K].
    assert_ok(compare_model("quickstart/deit_tiny", &[], Targets::Soft, 0.0), "deit_tiny soft");
}

#[test]
fn convit_tiny_matches_libtorch() {
    assert_ok(compare_model("quickstart/convit_tiny", &[], Targets::Hard, 0.0), "convit_tiny");
}

/// GPSA with LOCALITY_DIM > 1 (the /L_d scaling), q/k/v biases, the `gap`
/// readout, another LayerNorm eps, and perturbed weights.
#[test]
fn convit_variant_matches_libtorch() {
    let ov = [
        "MODEL.TRUNK.CONVIT.LOCALITY_DIM=3",
        "MODEL.TRUNK.CONVIT.LAYER_NORM_EPS=1e-6",
        "MODEL.TRUNK.VISION_TRANSFORMERS.QKV_BIAS=true",
        "MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER=gap",
    ];
    assert_ok(compare_model("quickstart/convit_tiny", &ov, Targets::Hard, 0.1), "convit variant");
}

#[test]
fn vit_example_head_matches_libtorch() {
    assert_ok(compare_model("quickstart/vit_example_head", &[], Targets::Hard, 0.0), "vit_example_head");
}

/// ViT without a class token (mean over tokens), a float QK_SCALE, and a
/// label-smoothed loss with temperature.
#[test]
fn vit_variant_matches_libtorch() {
    let ov = [
        "MODEL.TRUNK.VISION_TRANSFORMERS.USE_CLASS_TOKEN=false",
        "MODEL.TRUNK.VISION_TRANSFORMERS.QK_SCALE=0.3",
        "LOSS.cross_entropy_multiple_output_single_target.label_smoothing=0.1",
        "LOSS.cross_entropy_multiple_output_single_target.temperature=0.5",
    ];
    assert_ok(compare_model("quickstart/vit_tiny", &ov, Targets::Hard, 0.1), "vit variant");
}

/// DeiT in training mode with drop path: tessera's training step gives a
/// finite loss and finite gradients, and the masks are active (the loss
/// differs from the eval-mode loss on the same weights and batch). No
/// libtorch comparison: the masks come from different generators.
#[test]
fn deit_tiny_training_mode_with_drop_path_is_finite() {
    let ov = vec!["MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.5".to_string()];
    let cfg = config::load("quickstart/deit_tiny", &ov).unwrap();
    let prog = Program::load(&[]).unwrap();
    let batch = 16usize;
    let (plan, compiled) = training_plan(&prog, cfg.tree(), batch as u64).unwrap();
    let (eval_plan, _) = inference_plan(&prog, cfg.tree(), batch as u64, true).unwrap();
    let mut train = CpuExecutor::new(plan, 0).unwrap();
    let mut eval = CpuExecutor::new(eval_plan, 0).unwrap();
    for (_, name, _) in compiled.graph.params() {
        eval.set_state(name, train.state(name).unwrap().clone()).unwrap();
    }
    let data = Tensor::f32(vec![batch, 3, 32, 32], normal_values(21, batch * 3 * 32 * 32));
    let target = Tensor::f32(vec![batch, 10], soft_targets(22, batch, 10));
    let Optimizer::AdamW { beta1, beta2, .. } = StepOptions::from_config(cfg.tree()).unwrap().optimizer else {
        panic!("deit_tiny uses AdamW")
    };
    let scalar = |v: f64| Tensor::f32(vec![], vec![v as f32]);
    let mut owned: Vec<(String, Tensor)> = vec![
        ("data".into(), data.clone()),
        ("target".into(), target.clone()),
        ("optim.bias_correction1".into(), scalar(1.0 - beta1)),
        ("optim.bias_correction2".into(), scalar(1.0 - beta2)),
    ];
    for g in &compiled.param_groups {
        owned.push((format!("optim.lr.{}", g.name), scalar(1e-3)));
        owned.push((format!("optim.weight_decay.{}", g.name), scalar(g.weight_decay)));
    }
    let inputs: Vec<(&str, Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let out = train.run(&inputs).unwrap();
    let eval_out = eval.run(&[("data", data), ("target", target)]).unwrap();
    let (lt, le) = (out["loss"].as_f32().unwrap()[0], eval_out["loss"].as_f32().unwrap()[0]);
    println!("deit_tiny drop path 0.5: training-mode loss {lt}, eval-mode loss {le}");
    assert!(lt.is_finite() && lt > 0.0, "training-mode loss {lt}");
    assert!((lt - le).abs() > 1e-4 * le.abs(), "drop path changed nothing: training loss {lt} = eval loss {le}");
    let mut n = 0;
    for (name, t) in &out {
        if name.starts_with("grad.") {
            assert!(t.as_f32().unwrap().iter().all(|v| v.is_finite()), "{name} is not finite");
            n += 1;
        }
    }
    assert_eq!(n, compiled.graph.params().len(), "a gradient for every parameter");
}

/// The comparison can fail: tessera with LAYER_NORM_EPS 0.1 against the
/// eager model with eps 1e-6 (same weights and batch) is reported, in the
/// logits and in the gradients.
#[test]
fn a_mismatched_model_is_reported() {
    let o = compare_model_mismatched();
    assert!(o.iter().any(|p| p.starts_with("logits:")), "{o:?}");
    assert!(o.iter().any(|p| p.starts_with("grad.trunk.norm.weight")), "{o:?}");
}

/// As `compare_model` for vit_tiny, but the eager model uses LAYER_NORM_EPS
/// 1e-6 while tessera uses 1e-1 (and perturbed weights): the problems found.
fn compare_model_mismatched() -> Vec<String> {
    let cfg =
        config::load("quickstart/vit_tiny", &["MODEL.TRUNK.VISION_TRANSFORMERS.LAYER_NORM_EPS=0.1".into()]).unwrap();
    let prog = Program::load(&[]).unwrap();
    let (plan, compiled) = inference_plan(&prog, cfg.tree(), BATCH as u64, true).unwrap();
    let mut ex = CpuExecutor::new(plan, 0).unwrap();
    let names: Vec<String> = compiled.graph.params().iter().map(|(_, n, _)| n.to_string()).collect();
    perturb(&mut ex, &names, 0.1);
    let mut spec = ModelSpec::from_config(cfg.tree());
    spec.vit.eps = 1e-6;
    let data = normal_values(11, BATCH * 3 * 32 * 32);
    let l = labels(12, BATCH, 10);
    let out = ex
        .run(&[
            ("data", Tensor::f32(vec![BATCH, 3, 32, 32], data.clone())),
            ("target", Tensor::i64(vec![BATCH], l.clone())),
        ])
        .unwrap();
    let mut map = BTreeMap::new();
    for n in &names {
        let t = ex.state(n).unwrap();
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        map.insert(n.clone(), tensor_from(t.as_f32().unwrap(), &shape).set_requires_grad(true));
    }
    let params = Params::new(map);
    let logits = models::forward(&spec, &params, &tensor_from(&data, &[BATCH as i64, 3, 32, 32]));
    models::loss(&spec, &logits, &TT::from_slice(&l)).backward();
    let mut problems = Vec::new();
    if rel_err(out["output"].as_f32().unwrap(), &to_vec(&logits)) > MAX_REL {
        problems.push("logits: differ".to_string());
    }
    for n in &names {
        if rel_err(out[&format!("grad.{n}")].as_f32().unwrap(), &to_vec(&params.get(n).grad())) > MAX_REL {
            problems.push(format!("grad.{n}: differs"));
        }
    }
    problems
}

/// Linear-evaluation features (reference 1.6) of the frozen tiny ViT against
/// the eager trunk's block outputs through its final norm, with perturbed
/// weights (so the norm's weight and bias count): with and without a class token.
#[test]
fn linear_eval_features_match_libtorch() {
    let cases: [(&[(&str, usize)], bool); 2] = [
        (&[("concatCLS2", 128), ("lastCLS", 64), ("blkCLS0", 64), ("blkCLS-1", 64), ("concatCLS1", 64)], true),
        (&[("lastPOOL", 64), ("concatPOOL2", 128)], false),
    ];
    for (features, class_token) in cases {
        let map: Vec<String> = features.iter().map(|(n, _)| format!("[{n}, [Identity, []]]")).collect();
        let heads: Vec<String> = features.iter().map(|(_, d)| format!("[mlp, {{dims: [{d}, 10]}}]")).collect();
        let ov = vec![
            format!("MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP=[{}]", map.join(", ")),
            format!("MODEL.HEAD.PARAMS=[{}]", heads.join(", ")),
            format!("MODEL.TRUNK.VISION_TRANSFORMERS.USE_CLASS_TOKEN={class_token}"),
        ];
        let cfg = config::load("quickstart/linear_eval_vit_tiny", &ov).unwrap();
        let c = tessera_compiler::compile(&Program::load(&[]).unwrap(), cfg.tree()).unwrap();
        let mut g = c.graph.clone();
        for (i, v) in c.trunk_features.iter().enumerate() {
            g.set_output(&format!("feature.{i}"), *v);
        }
        g.prune(|n| n.starts_with("feature."), false);
        let plan = tessera_compiler::plan::lower(&g, BATCH as u64, false).unwrap();
        let mut ex = CpuExecutor::new(plan, 0).unwrap();
        let names = ex.state_names();
        perturb(&mut ex, &names, 0.1);
        let data = normal_values(21, BATCH * 3 * 32 * 32);
        let out = ex.run(&[("data", Tensor::f32(vec![BATCH, 3, 32, 32], data.clone()))]).unwrap();

        let map: BTreeMap<String, TT> = names
            .iter()
            .map(|n| {
                let t = ex.state(n).unwrap();
                (n.clone(), tensor_from(t.as_f32().unwrap(), &t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>()))
            })
            .collect();
        let spec = ModelSpec::from_config(cfg.tree());
        let names: Vec<&str> = features.iter().map(|(n, _)| *n).collect();
        let expected =
            models::vit_features(&spec, &Params::new(map), &tensor_from(&data, &[BATCH as i64, 3, 32, 32]), &names);
        for (i, (e, (name, dim))) in expected.iter().zip(features).enumerate() {
            let a = &out[&format!("feature.{i}")];
            assert_eq!(a.shape, [BATCH, *dim], "{name}");
            let rel = rel_err(a.as_f32().unwrap(), &to_vec(e));
            println!("  {name:<12} rel err {rel:.2e}");
            assert!(rel <= MAX_REL, "{name}: relative error {rel:.3e} > {MAX_REL:e}");
        }
    }
}
