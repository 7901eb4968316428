//! `tessera infer`: the eval-mode forward (and, with targets, the loss and
//! the gradients) of a config's model on a batch read from a file, with
//! weights in tessera's or timm's names. This is how a port is checked
//! against PyTorch: same weights, same input, compare the files.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::inference_plan_for;
use tessera_compiler::plan::Target;
use tessera_runtime::weights::{
    detect_format, export, match_weights_with, model_tensors, read_safetensors, write_safetensors, MatchOptions,
    NamedTensor, WeightsFormat,
};
use tessera_runtime::{Backend, Device, Tensor};

/// The one tensor called `name` in a safetensors file.
fn read_one(path: &Path, name: &str) -> Result<NamedTensor> {
    let tensors = read_safetensors(path)?;
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    let joined = names.join(", ");
    tensors
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| anyhow!("{} has no tensor `{name}` (it has: {joined})", path.display()))
}

pub fn run(
    name: &str,
    overrides: &mut Vec<String>,
    weights: &Path,
    format: Option<WeightsFormat>,
    input: &Path,
    target: Option<&Path>,
    output: &Path,
    device: &Device,
) -> Result<()> {
    // Targets given here are class indices: the loss takes them as such, not
    // as the soft targets a cutmixup collator would make during training.
    if target.is_some() {
        overrides.push("DATA.TRAIN.COLLATE_FUNCTION=default_collate".into());
    }
    crate::check_output_target(output)?;
    let same = |a: &Path, b: &Path| a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y);
    for (given, role) in [(weights, "--weights"), (input, "--input")] {
        if same(output, given) {
            bail!(
                "--output {} is the {role} file: the results would replace it; write them elsewhere",
                output.display()
            );
        }
    }
    let cfg = config::load(name, overrides).map_err(|e| anyhow!("{e}"))?;
    let x = read_one(input, "input")?;
    if x.shape.len() != 4 || x.shape[1] != 3 {
        bail!("{}: `input` must be [B, 3, H, W], got {:?}", input.display(), x.shape);
    }
    let batch = x.shape[0] as u64;
    let prog = Program::load(&[]).map_err(|e| anyhow!("{e}"))?;
    let backend = Backend::open(device).map_err(|e| anyhow!("{e}"))?;
    let plan_target = if matches!(device, Device::Cpu | Device::CpuArena) { Target::Cpu } else { Target::Cuda };
    let tree = sized_for_input(cfg.tree(), x.shape[2], x.shape[3]);
    let (plan, _) =
        inference_plan_for(&prog, &tree, batch, target.is_some(), plan_target).map_err(|e| anyhow!("{e}"))?;
    let expected = model_tensors(&plan);
    let has_teacher = plan.values.iter().any(
        |v| matches!(&v.source, tessera_compiler::plan::Source::Buffer { name, .. } if name.starts_with("loss.teacher.")),
    );
    if has_teacher {
        bail!("`tessera infer --target` does not load a distillation teacher, so it cannot compute this loss: add LOSS.distillation.type=none for the class head's loss alone");
    }

    let (file, _) = crate::export::read_weights(weights)?;
    let names: Vec<&str> = file.iter().map(|t| t.name.as_str()).collect();
    let format = format.unwrap_or_else(|| detect_format(&names));
    let matched = match_weights_with(&expected, file, format, MatchOptions::default())
        .with_context(|| format!("loading {}", weights.display()))?;
    let mut ex = backend.executor(plan, 0).map_err(|e| anyhow!("{e}"))?;
    for t in matched.tensors {
        let v = ex.plan().state(&t.name).ok_or_else(|| anyhow!("the model has no tensor `{}`", t.name))?;
        // Integer buffers (BatchNorm's num_batches_tracked) come back from files as f32.
        let value = match ex.plan().values[v].dtype {
            tessera_compiler::ir::DType::I64 => {
                Tensor::i64(t.shape.clone(), t.data.iter().map(|&v| v as i64).collect())
            }
            _ => Tensor::f32(t.shape.clone(), t.data),
        };
        ex.write_state(&t.name, value).map_err(|e| anyhow!("{e}"))?;
    }

    let mut inputs = vec![("data", Tensor::f32(x.shape.clone(), x.data))];
    if let Some(tp) = target {
        let t = read_one(tp, "target")?;
        if t.shape != [x.shape[0]] {
            bail!("{}: `target` must be [{}] class indices, got {:?}", tp.display(), x.shape[0], t.shape);
        }
        let classes = ex.plan().output("output").map(|v| ex.plan().values[v].shape.clone());
        let labels = class_indices(&t.data, classes.as_ref().and_then(|s| s.get(1).copied()))
            .map_err(|e| anyhow!("{}: `target` {e}", tp.display()))?;
        inputs.push(("target", Tensor::i64(t.shape, labels)));
    }
    let wanted: Vec<String> = ex
        .plan()
        .values
        .iter()
        .filter_map(|v| match &v.source {
            tessera_compiler::plan::Source::Input { name } => Some(name.clone()),
            _ => None,
        })
        .collect();
    for w in &wanted {
        if !inputs.iter().any(|(n, _)| n == w) {
            bail!("the model of `{name}` needs an input `{w}` that `tessera infer` cannot provide (its loss is not a classification loss)");
        }
    }
    let out = ex.run(&inputs, None).map_err(|e| anyhow!("{e}"))?;

    let mut results = Vec::new();
    let mut grads = Vec::new();
    for (k, t) in out {
        let shape = t.shape.clone();
        let data = t.into_f32().ok_or_else(|| anyhow!("output `{k}` is not a float tensor"))?;
        if let Some(rest) = k.strip_prefix("output") {
            results.push(NamedTensor::new(format!("logits{rest}"), shape, data));
        } else if let Some(p) = k.strip_prefix("grad.") {
            grads.push(NamedTensor::new(p.to_string(), shape, data));
        } else {
            results.push(NamedTensor::new(k, shape, data));
        }
    }
    // Gradients carry the names (and layouts) of the weights file.
    for g in export(&grads, format) {
        results.push(NamedTensor::new(format!("grad.{}", g.name), g.shape, g.data));
    }
    let mut meta = BTreeMap::new();
    meta.insert("tessera.config".to_string(), cfg.name().to_string());
    meta.insert("tessera.weights_format".to_string(), format.to_string());
    write_safetensors(output, &results, &meta)?;
    tessera_engine::errln!(
        "tessera infer: wrote {} tensors to {} ({} weights in {format} names)",
        results.len(),
        output.display(),
        expected.len()
    );
    Ok(())
}

/// Targets as class indices. Files hold them as any dtype (read as f32):
/// a value that is not a whole number from 0 to `classes - 1` (a soft
/// target, a probability, -1 for "no label") would be cast silently into
/// another class, so it is an error naming the sample.
fn class_indices(values: &[f32], classes: Option<u64>) -> Result<Vec<i64>, String> {
    let range = classes.map_or("0 or above".to_string(), |c| format!("from 0 to {}", c.saturating_sub(1)));
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let whole = v.is_finite() && v.fract() == 0.0 && v >= 0.0;
            match classes {
                _ if !whole => {}
                Some(c) if v as u64 >= c => {}
                _ => return Ok(v as i64),
            }
            Err(format!(
                "holds {v} for sample {i}: targets are class indices, whole numbers {range} (the model scores {} classes); write them as integers (int64)",
                classes.map_or("?".to_string(), |c| c.to_string())
            ))
        })
        .collect()
}

/// The config with its training crop set to the input's size: the eval
/// forward is planned for the images given (a config whose transforms crop
/// 224 runs a 32-pixel input with IMAGE_SIZE=32 without rewriting its
/// transforms). Square inputs only; a non-square one keeps the config's.
fn sized_for_input(tree: &serde_json::Value, h: usize, w: usize) -> serde_json::Value {
    let mut tree = tree.clone();
    if h != w {
        return tree;
    }
    if let Some(serde_json::Value::Array(ts)) = tree.pointer_mut("/DATA/TRAIN/TRANSFORMS") {
        for t in ts.iter_mut() {
            if t.get("name").and_then(|n| n.as_str()) == Some("RandomResizedCrop") {
                t["size"] = serde_json::json!(h);
            }
        }
    }
    tree
}
