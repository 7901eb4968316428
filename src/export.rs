//! `tessera export SOURCE --format timm|tessera -o FILE.safetensors`: a
//! trained model's weights under timm's names (the inverse of the import
//! `MODEL.WEIGHTS_INIT` and `tessera infer` do, ConViT's and DeiT's layouts
//! included: `tessera_runtime::weights::export_with_report`), or tessera's
//! own, so a model trained here loads into timm with
//! `load_state_dict(strict=True)`.
//!
//! SOURCE is a checkpoint directory (its model file, checked against the
//! checkpoint's checksums), a run's CHECKPOINT.DIR (its newest intact
//! checkpoint, as a resume would pick it), or a safetensors file of weights
//! in tessera's names. `tessera infer --weights` reads the same sources.

use anyhow::{anyhow, bail, Result};
use std::path::Path;
use tessera_engine::checkpoint;
use tessera_runtime::weights::{
    detect_format, export_metadata, export_with_report, read_safetensors, write_safetensors, NamedTensor, WeightsFormat,
};

/// The weights of `source` (see the module), and a phrase saying where
/// they came from. Of a checkpoint, its model's state dict (`trunk.`,
/// `heads.`): not the loss's state (queues, a distillation teacher).
pub fn read_weights(source: &Path) -> Result<(Vec<NamedTensor>, String)> {
    if !source.is_dir() {
        let tensors = read_safetensors(source).map_err(|e| anyhow!("{e}"))?;
        return Ok((tensors, format!("the weights file {}", source.display())));
    }
    if source.join("model.safetensors").is_file() {
        let ckpt = checkpoint::read(source).map_err(|e| anyhow!("{e}"))?;
        return Ok((model_part(ckpt.model).0, format!("checkpoint {}", source.display())));
    }
    match checkpoint::resume_point(source).map_err(|e| anyhow!("{e}"))? {
        Some(point) => {
            for d in &point.damaged {
                tessera_engine::errln!("warning: {d}");
            }
            let from = format!("checkpoint {} (the newest in {})", point.path.display(), source.display());
            Ok((model_part(point.checkpoint.model).0, from))
        }
        None => bail!(
            "{} is a directory with no checkpoint in it: give a checkpoint directory (model_phase*, model_iteration*), a run's CHECKPOINT.DIR or a .safetensors file",
            source.display()
        ),
    }
}

/// The model's own tensors (VISSL's model state dict: `trunk.` and `heads.`);
/// the rest (a loss's queues, a teacher) is named in the second list.
fn model_part(tensors: Vec<NamedTensor>) -> (Vec<NamedTensor>, Vec<String>) {
    let model = |n: &str| {
        let n = n.strip_prefix("module.").unwrap_or(n);
        n.starts_with("trunk.") || n.starts_with("heads.")
    };
    let (kept, rest): (Vec<_>, Vec<_>) = tensors.into_iter().partition(|t| model(&t.name));
    (kept, rest.into_iter().map(|t| t.name).collect())
}

pub fn run(source: &Path, format: WeightsFormat, output: &Path) -> Result<()> {
    crate::check_output_target(output)?;
    if output.canonicalize().ok().is_some_and(|o| source.canonicalize().ok().is_some_and(|s| s == o)) {
        bail!("-o {} is the source: it would be replaced; write the export elsewhere", output.display());
    }
    let (tensors, from) = read_weights(source)?;
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    if detect_format(&names) == WeightsFormat::Timm {
        bail!(
            "{from} already uses timm's names; tessera reads it as it is (MODEL.WEIGHTS_INIT.PARAMS_FILE, `tessera infer --weights`)"
        );
    }
    let (model, not_model) = model_part(tensors);
    if model.is_empty() {
        bail!("{from} holds no model tensors (names under `trunk.` or `heads.`)");
    }
    let exported = export_with_report(&model, format);
    write_safetensors(output, &exported.tensors, &export_metadata(format)).map_err(|e| anyhow!("{e}"))?;
    let values: usize = exported.tensors.iter().map(|t| t.data.len()).sum();
    tessera_engine::errln!(
        "tessera export: wrote {} tensors ({values} values) in {format} names to {} from {from}",
        exported.tensors.len(),
        output.display()
    );
    let left: Vec<String> = exported.skipped.into_iter().chain(not_model).collect();
    if !left.is_empty() {
        tessera_engine::errln!(
            "tessera export: left out {} tensors that a {format} model's state dict does not hold: {}",
            left.len(),
            left.join(", ")
        );
    }
    Ok(())
}
