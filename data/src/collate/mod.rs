//! Collators: B transformed samples -> one `Batch`, by COLLATE_FUNCTION name
//! (`vissl/data/collators/`).
//!
//! Each sample holds P copies (P = `Pipeline::num_outputs()`: 1, or the
//! copies of ImgReplicatePil / ImgPilToMultiCrop). Layouts, with sample i
//! (0..B) and copy position p (0..P):
//!
//! | collator | `views` | `momentum` | labels, `data_idx`, `data_valid` |
//! |---|---|---|---|
//! | default_collate, multicrop_collator | P tensors, `views[p][i]` = copy p of sample i | none | `[P*B]`, entry `p*B + i` (position-major) |
//! | simclr_collator | P tensors as above; VISSL's one `data` tensor is their concatenation (view-major `[img1_0..imgB_0, img1_1..]`) | none | `[P*B]` position-major |
//! | moco_collator (P must be 2) | `[copy 0]` (VISSL's `data`) | copy 1 (`data_momentum`) | `[B, 2]` sample-major |
//! | cutmixup_collator | mixed per position, then laid out as above for `ssl_method` moco / simclr, else as multicrop | | soft labels with a trailing `num_classes` axis: `[P*B, K]`, or `[B, 2, K]` for moco |
//!
//! default_collate is torch's: it transposes the per-sample lists into one
//! stacked tensor per position, as multicrop_collator does (VISSL's train
//! step then insists on P = 1). Collators never reorder samples within a
//! position.

mod cutmixup;

use serde_json::Value;

pub use cutmixup::{box_lam, cutmix_box, CutMixUp, MixMode, MixUnit, SslMethod};

use crate::error::{Error, Result};
use crate::rng::SampleKey;
use crate::tensor::Tensor;

/// The collators implemented, as COLLATE_FUNCTION names them.
pub const COLLATE_FUNCTIONS: [&str; 5] =
    ["default_collate", "multicrop_collator", "moco_collator", "simclr_collator", "cutmixup_collator"];

/// A dense f32 tensor `[B, C, H, W]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchTensor {
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

impl BatchTensor {
    /// Stacks CHW tensors of one shape along a new batch axis (`torch.stack`).
    pub fn stack(items: &[&Tensor]) -> std::result::Result<BatchTensor, String> {
        let first = items.first().map_or([0; 3], |t| t.shape);
        let mut data = Vec::with_capacity(items.len() * first.iter().product::<usize>());
        for (i, t) in items.iter().enumerate() {
            if t.shape != first {
                return Err(format!(
                    "cannot stack copies of different sizes: item 0 is {:?} (C, H, W), item {i} is {:?}",
                    first, t.shape
                ));
            }
            data.extend_from_slice(&t.data);
        }
        Ok(BatchTensor { shape: [items.len(), first[0], first[1], first[2]], data })
    }

    /// Values of one sample (`[C, H, W]`).
    pub fn sample(&self, i: usize) -> &[f32] {
        let n = self.shape[1] * self.shape[2] * self.shape[3];
        &self.data[i * n..(i + 1) * n]
    }

    pub(crate) fn sample_mut(&mut self, i: usize) -> &mut [f32] {
        let n = self.shape[1] * self.shape[2] * self.shape[3];
        &mut self.data[i * n..(i + 1) * n]
    }
}

/// The batch's targets.
#[derive(Clone, Debug, PartialEq)]
pub enum Labels {
    /// Integer labels (class, sample index or 0), row-major in `shape`.
    Hard { shape: Vec<usize>, data: Vec<i64> },
    /// Soft targets from cutmixup_collator; the last axis is `num_classes`.
    Soft { shape: Vec<usize>, data: Vec<f32> },
}

impl Labels {
    pub fn shape(&self) -> &[usize] {
        match self {
            Labels::Hard { shape, .. } | Labels::Soft { shape, .. } => shape,
        }
    }
}

/// One collated batch; see the module table for the layout per collator.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The model's input, one `[B, C, H, W]` tensor per copy position.
    pub views: Vec<BatchTensor>,
    /// moco_collator: the momentum encoder's input (copy 1).
    pub momentum: Option<BatchTensor>,
    pub labels: Labels,
    /// The samples' dataset indices (VISSL's `data_idx`), laid out as `labels`
    /// without the class axis.
    pub data_idx: Vec<i64>,
    /// 1, or -1 for a gray stand-in image (VISSL's `data_valid`), as `data_idx`.
    pub data_valid: Vec<i64>,
}

/// One sample after the pipeline: its P copies, label, index and validity.
#[derive(Clone, Debug)]
pub struct CollateSample {
    pub views: Vec<Tensor>,
    pub label: i64,
    pub index: usize,
    pub valid: bool,
}

/// A collator chosen by COLLATE_FUNCTION with its COLLATE_FUNCTION_PARAMS.
#[derive(Clone, Debug)]
pub enum Collator {
    Default,
    Multicrop,
    Moco,
    Simclr,
    CutMixUp(CutMixUp),
}

impl Collator {
    /// From COLLATE_FUNCTION and COLLATE_FUNCTION_PARAMS of `DATA.<split>`.
    pub fn from_config(name: &str, params: &Value, split: &str) -> Result<Collator> {
        let key = |k: &str| format!("DATA.{split}.{k}");
        let params_key = key("COLLATE_FUNCTION_PARAMS");
        let map = match params {
            Value::Null => serde_json::Map::new(),
            Value::Object(m) => m.clone(),
            other => return Err(Error::key(params_key, format!("expected a map of collator arguments, got {other}"))),
        };
        let no_params = |collator: Collator| -> Result<Collator> {
            match map.keys().next() {
                None => Ok(collator),
                Some(k) => Err(Error::key(
                    format!("{params_key}.{k}"),
                    format!("{name} takes no parameters (VISSL would ignore or reject `{k}`); remove it"),
                )),
            }
        };
        match name {
            "default_collate" => no_params(Collator::Default),
            "moco_collator" => no_params(Collator::Moco),
            "simclr_collator" => no_params(Collator::Simclr),
            "multicrop_collator" => match map.get("create_multidimensional_tensor") {
                Some(Value::Bool(false)) if map.len() == 1 => Ok(Collator::Multicrop),
                Some(v) if map.len() == 1 => Err(Error::key(
                    format!("{params_key}.create_multidimensional_tensor"),
                    format!("only False is supported (got {v}): views of different sizes stay separate tensors"),
                )),
                _ => no_params(Collator::Multicrop),
            },
            "cutmixup_collator" => Ok(Collator::CutMixUp(CutMixUp::from_params(&map, &params_key)?)),
            other => {
                let hint = crate::config::did_you_mean(other, COLLATE_FUNCTIONS)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                Err(Error::key(
                    key("COLLATE_FUNCTION"),
                    format!("unknown collator `{other}`{hint}; supported: {}", COLLATE_FUNCTIONS.join(", ")),
                ))
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Collator::Default => "default_collate",
            Collator::Multicrop => "multicrop_collator",
            Collator::Moco => "moco_collator",
            Collator::Simclr => "simclr_collator",
            Collator::CutMixUp(_) => "cutmixup_collator",
        }
    }

    /// Collates batch number `key.index` (its randomness, for cutmixup, is a
    /// function of `key` = (seed, epoch, batch index)). Errors name the batch.
    pub fn collate(&self, samples: &[CollateSample], key: SampleKey) -> Result<Batch> {
        let batch = key.index as usize;
        let fail = |message: String| Error::Batch { batch, message };
        let positions = positions(samples).map_err(fail)?;
        let mut views = Vec::with_capacity(positions);
        for p in 0..positions {
            let items: Vec<&Tensor> = samples.iter().map(|s| &s.views[p]).collect();
            views.push(BatchTensor::stack(&items).map_err(|e| fail(format!("copy position {p}: {e}")))?);
        }
        let labels: Vec<i64> = samples.iter().map(|s| s.label).collect();
        match self {
            Collator::Default | Collator::Multicrop | Collator::Simclr => Ok(position_major(views, samples, None)),
            Collator::Moco => moco(views, samples, None).map_err(fail),
            Collator::CutMixUp(mix) => {
                let mut soft = Vec::with_capacity(positions);
                for (p, view) in views.iter_mut().enumerate() {
                    soft.push(mix.apply(view, &labels, key, p).map_err(|e| fail(format!("copy position {p}: {e}")))?);
                }
                let soft = Some((mix.num_classes, soft));
                match mix.ssl_method {
                    Some(SslMethod::Moco) => moco(views, samples, soft).map_err(fail),
                    Some(SslMethod::Simclr) | Some(SslMethod::Swav) | None => Ok(position_major(views, samples, soft)),
                }
            }
        }
    }
}

/// The number of copies per sample, the same for all samples.
fn positions(samples: &[CollateSample]) -> std::result::Result<usize, String> {
    let first = samples.first().ok_or("no samples to collate")?.views.len();
    if first == 0 {
        return Err("samples have no views".into());
    }
    match samples.iter().find(|s| s.views.len() != first) {
        Some(s) => Err(format!("sample {} has {} copies, the first has {first}", s.index, s.views.len())),
        None => Ok(first),
    }
}

/// Soft targets per position: (num_classes, `[B * K]` per position).
type Soft = Option<(usize, Vec<Vec<f32>>)>;

/// multicrop / simclr / default layout: per-sample values repeated per
/// position, position-major.
fn position_major(views: Vec<BatchTensor>, samples: &[CollateSample], soft: Soft) -> Batch {
    let p = views.len();
    let b = samples.len();
    let repeat =
        |f: &dyn Fn(&CollateSample) -> i64| -> Vec<i64> { (0..p).flat_map(|_| samples.iter().map(f)).collect() };
    let labels = match soft {
        None => Labels::Hard { shape: vec![p * b], data: repeat(&|s| s.label) },
        Some((k, per_position)) => Labels::Soft { shape: vec![p * b, k], data: per_position.concat() },
    };
    Batch {
        views,
        momentum: None,
        labels,
        data_idx: repeat(&|s| s.index as i64),
        data_valid: repeat(&|s| if s.valid { 1 } else { -1 }),
    }
}

/// moco_collator: `data` = copy 0, `data_momentum` = copy 1, per-sample
/// values `[B, 2]`. VISSL's cutmixup re-packing of data_idx/data_valid for
/// moco mixes up the indexing (reference 5.4); we keep them per sample.
fn moco(mut views: Vec<BatchTensor>, samples: &[CollateSample], soft: Soft) -> std::result::Result<Batch, String> {
    if views.len() != 2 {
        return Err(format!(
            "moco_collator needs exactly 2 copies per sample (ImgReplicatePil num_times: 2), got {}",
            views.len()
        ));
    }
    let momentum = views.pop();
    let b = samples.len();
    let pair = |f: &dyn Fn(&CollateSample) -> i64| -> Vec<i64> { samples.iter().flat_map(|s| [f(s), f(s)]).collect() };
    let labels = match soft {
        None => Labels::Hard { shape: vec![b, 2], data: pair(&|s| s.label) },
        Some((k, per_position)) => {
            // [B, 2, K]: sample i's soft target of copy 0, then of copy 1.
            let mut data = Vec::with_capacity(b * 2 * k);
            for i in 0..b {
                for pos in &per_position {
                    data.extend_from_slice(&pos[i * k..(i + 1) * k]);
                }
            }
            Labels::Soft { shape: vec![b, 2, k], data }
        }
    };
    Ok(Batch {
        views,
        momentum,
        labels,
        data_idx: pair(&|s| s.index as i64),
        data_valid: pair(&|s| if s.valid { 1 } else { -1 }),
    })
}
