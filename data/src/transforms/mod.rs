//! The transforms of VISSL's TRANSFORMS lists, each a struct with
//! torchvision's / VISSL's parameter names and defaults, and `Transform`, the
//! enum the pipeline runs, built from one config entry.

mod basic;
mod color_jitter;
mod crop;
mod rand_augment;
mod tensor_ops;

pub use basic::{ImgPilGaussianBlur, ImgReplicatePil, RandomGrayscale, RandomHorizontalFlip};
pub use color_jitter::{ColorJitter, ImgPilColorDistortion};
pub use crop::{CenterCrop, CropBox, ImgPilToMultiCrop, RandomResizedCrop, Resize};
pub use rand_augment::{AugmentOp, OpArg, RandAugment, RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS};
pub use tensor_ops::{EraseValue, Normalize, RandomErasing};

use serde_json::Value;

use crate::config::{did_you_mean, Params};
use crate::error::Error;

/// One entry of a TRANSFORMS list.
#[derive(Clone, Debug)]
pub enum Transform {
    ImgReplicatePil(ImgReplicatePil),
    ImgPilToMultiCrop(ImgPilToMultiCrop),
    RandomResizedCrop(RandomResizedCrop),
    RandomHorizontalFlip(RandomHorizontalFlip),
    ColorJitter(ColorJitter),
    ImgPilColorDistortion(ImgPilColorDistortion),
    ImgPilGaussianBlur(ImgPilGaussianBlur),
    RandomGrayscale(RandomGrayscale),
    RandAugment(RandAugment),
    Resize(Resize),
    CenterCrop(CenterCrop),
    ToTensor,
    Normalize(Normalize),
    RandomErasing(RandomErasing),
}

/// Where a transform runs: on PIL images, the conversion, or on tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Pil,
    ToTensor,
    Tensor,
}

/// The transform names this crate implements, as written in configs.
pub const TRANSFORM_NAMES: [&str; 14] = [
    "ImgReplicatePil",
    "ImgPilToMultiCrop",
    "RandomResizedCrop",
    "RandomHorizontalFlip",
    "ColorJitter",
    "ImgPilColorDistortion",
    "ImgPilGaussianBlur",
    "RandomGrayscale",
    "RandAugment",
    "Resize",
    "CenterCrop",
    "ToTensor",
    "Normalize",
    "RandomErasing",
];

impl Transform {
    pub fn stage(&self) -> Stage {
        match self {
            Transform::ToTensor => Stage::ToTensor,
            Transform::Normalize(_) | Transform::RandomErasing(_) => Stage::Tensor,
            _ => Stage::Pil,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Transform::ImgReplicatePil(_) => "ImgReplicatePil",
            Transform::ImgPilToMultiCrop(_) => "ImgPilToMultiCrop",
            Transform::RandomResizedCrop(_) => "RandomResizedCrop",
            Transform::RandomHorizontalFlip(_) => "RandomHorizontalFlip",
            Transform::ColorJitter(_) => "ColorJitter",
            Transform::ImgPilColorDistortion(_) => "ImgPilColorDistortion",
            Transform::ImgPilGaussianBlur(_) => "ImgPilGaussianBlur",
            Transform::RandomGrayscale(_) => "RandomGrayscale",
            Transform::RandAugment(_) => "RandAugment",
            Transform::Resize(_) => "Resize",
            Transform::CenterCrop(_) => "CenterCrop",
            Transform::ToTensor => "ToTensor",
            Transform::Normalize(_) => "Normalize",
            Transform::RandomErasing(_) => "RandomErasing",
        }
    }

    /// Builds the transform of `TRANSFORMS[index]` from its config map.
    pub fn from_config(index: usize, entry: &Value) -> Result<Transform, Error> {
        let err = |name: &str, message: String| Error::Config { index, name: name.to_string(), message };
        let map =
            entry.as_object().ok_or_else(|| err("?", format!("expected a map with a `name` key, got {entry}")))?;
        let name = match map.get("name") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(err("?", format!("`name` must be a string, got {other}"))),
            None => return Err(err("?", "missing `name`".to_string())),
        };
        let known = || TRANSFORM_NAMES.join(", ");
        let build = |accepted: &'static [&'static str]| Params::new(index, name, map, accepted);
        Ok(match name {
            "ImgReplicatePil" => {
                let p = build(&["num_times"])?;
                let n = p.int_or("num_times", 2)?;
                if n <= 0 {
                    return Err(p.invalid("num_times", &format!("must be greater than zero, got {n}")));
                }
                p.count_bounded("num_times", n, crate::config::MAX_VIEWS, "views per sample")?;
                Transform::ImgReplicatePil(ImgReplicatePil { num_times: n as usize })
            }
            "ImgPilToMultiCrop" => {
                let p = build(&["total_num_crops", "num_crops", "size_crops", "crop_scales"])?;
                let total = p.int_or("total_num_crops", -1)?;
                let required = |k: &str| p.error(format!("missing required key `{k}`"));
                let num_crops = p.int_list("num_crops")?.ok_or_else(|| required("num_crops"))?;
                let size_crops = p.int_list("size_crops")?.ok_or_else(|| required("size_crops"))?;
                let scales_value = p.raw("crop_scales").ok_or_else(|| required("crop_scales"))?;
                let crop_scales = parse_scales(scales_value).ok_or_else(|| {
                    p.invalid("crop_scales", &format!("expected a list of [min, max] pairs, got {scales_value}"))
                })?;
                if !p.has("total_num_crops") {
                    return Err(required("total_num_crops"));
                }
                if num_crops.iter().sum::<usize>() as i64 != total {
                    return Err(
                        p.invalid("total_num_crops", &format!("{total} is not the sum of num_crops {num_crops:?}"))
                    );
                }
                p.sides_bounded("size_crops", &size_crops)?;
                p.count_bounded("total_num_crops", total, crate::config::MAX_VIEWS, "views per sample")?;
                if size_crops.len() != num_crops.len() || crop_scales.len() != num_crops.len() {
                    return Err(
                        p.invalid("size_crops", "num_crops, size_crops and crop_scales must have the same length")
                    );
                }
                Transform::ImgPilToMultiCrop(ImgPilToMultiCrop {
                    total_num_crops: total as usize,
                    num_crops,
                    size_crops,
                    crop_scales,
                })
            }
            "RandomResizedCrop" => {
                let p = build(&["size", "scale", "ratio", "interpolation"])?;
                let size = square_or_pair(p.size_required("size")?);
                let scale = p.range_or("scale", [0.08, 1.0])?;
                let ratio = p.range_or("ratio", [3.0 / 4.0, 4.0 / 3.0])?;
                if ratio[0] <= 0.0 {
                    return Err(p.invalid("ratio", "must be positive"));
                }
                let interpolation = p.interpolation_or("interpolation", 2)?;
                Transform::RandomResizedCrop(RandomResizedCrop { size, scale, ratio, interpolation })
            }
            "RandomHorizontalFlip" => {
                let p = build(&["p"])?;
                Transform::RandomHorizontalFlip(RandomHorizontalFlip { p: p.prob_or("p", 0.5)? })
            }
            "RandomGrayscale" => {
                let p = build(&["p"])?;
                Transform::RandomGrayscale(RandomGrayscale { p: p.prob_or("p", 0.1)? })
            }
            "ColorJitter" => {
                let p = build(&["brightness", "contrast", "saturation", "hue"])?;
                let factor = |k: &str| -> Result<Option<[f64; 2]>, Error> {
                    match p.raw(k) {
                        Some(Value::Array(_)) => {
                            let r = p.range_or(k, [1.0, 1.0])?;
                            if r[0] < 0.0 {
                                return Err(p.invalid(k, "factors must be non-negative"));
                            }
                            Ok((r != [1.0, 1.0]).then_some(r))
                        }
                        _ => {
                            let v = p.f64_or(k, 0.0)?;
                            if v < 0.0 {
                                return Err(p.invalid(k, "must be non-negative"));
                            }
                            Ok(ColorJitter::factor_range(v))
                        }
                    }
                };
                let hue = match p.raw("hue") {
                    Some(Value::Array(_)) => Some(p.range_or("hue", [0.0, 0.0])?),
                    _ => {
                        let v = p.f64_or("hue", 0.0)?;
                        if v < 0.0 {
                            return Err(p.invalid("hue", "must be non-negative"));
                        }
                        Some([-v, v])
                    }
                };
                let hue = hue.filter(|r| *r != [0.0, 0.0]);
                if let Some([lo, hi]) = hue {
                    if lo < -0.5 || hi > 0.5 {
                        return Err(p.invalid("hue", "must lie within [-0.5, 0.5]"));
                    }
                }
                Transform::ColorJitter(ColorJitter {
                    brightness: factor("brightness")?,
                    contrast: factor("contrast")?,
                    saturation: factor("saturation")?,
                    hue,
                })
            }
            "ImgPilColorDistortion" => {
                let p = build(&["strength"])?;
                let s = p.f64_or("strength", 1.0)?;
                if !(0.0..=2.5).contains(&s) {
                    return Err(p.invalid("strength", "must be in [0, 2.5] (hue jitter 0.2 * strength must be <= 0.5)"));
                }
                Transform::ImgPilColorDistortion(ImgPilColorDistortion::new(s))
            }
            "ImgPilGaussianBlur" => {
                let p = build(&["p", "radius_min", "radius_max"])?;
                let (lo, hi) = (p.f64_or("radius_min", 0.1)?, p.f64_or("radius_max", 2.0)?);
                if lo < 0.0 || hi < lo {
                    return Err(p.invalid("radius_min", "need 0 <= radius_min <= radius_max"));
                }
                Transform::ImgPilGaussianBlur(ImgPilGaussianBlur {
                    p: p.prob_or("p", 0.5)?,
                    radius_min: lo,
                    radius_max: hi,
                })
            }
            "RandAugment" => {
                let p = build(&[
                    "magnitude",
                    "magnitude_std",
                    "num_layers",
                    "increasing_severity",
                    "weight_choice",
                    "translate_pct",
                    "interpolation",
                ])?;
                let num_layers = p.int_or("num_layers", 2)?;
                if num_layers < 0 {
                    return Err(p.invalid("num_layers", "must be non-negative"));
                }
                p.count_bounded("num_layers", num_layers, crate::config::MAX_RAND_AUGMENT_LAYERS, "ops per sample")?;
                let weight_choice = match p.raw("weight_choice") {
                    None => None,
                    Some(_) => match p.int_or("weight_choice", 0)? {
                        0 if num_layers <= 13 => Some(0),
                        0 => {
                            return Err(p.invalid(
                                "weight_choice",
                                "weight table 0 has 13 ops with non-zero weight; num_layers must be <= 13",
                            ))
                        }
                        w => return Err(p.invalid("weight_choice", &format!("only weight table 0 exists, got {w}"))),
                    },
                };
                let interpolation = match p.has("interpolation") {
                    true => Some(p.interpolation_or("interpolation", 2)?),
                    false => None,
                };
                if let Some(f) = interpolation {
                    if !matches!(
                        f,
                        crate::resample::Filter::Nearest
                            | crate::resample::Filter::Bilinear
                            | crate::resample::Filter::Bicubic
                    ) {
                        return Err(p.invalid(
                            "interpolation",
                            "PIL's transform takes only 0 (nearest), 2 (bilinear) or 3 (bicubic)",
                        ));
                    }
                }
                Transform::RandAugment(RandAugment {
                    magnitude: p.f64_or("magnitude", 10.0)?,
                    magnitude_std: p.f64_or("magnitude_std", 0.0)?,
                    num_layers: num_layers as usize,
                    increasing_severity: p.bool_or("increasing_severity", false)?,
                    weight_choice,
                    translate_pct: p.f64_or("translate_pct", 0.45)?,
                    interpolation,
                })
            }
            "Resize" => {
                let p = build(&["size", "interpolation"])?;
                let size = p.size_required("size")?;
                Transform::Resize(Resize { size, interpolation: p.interpolation_or("interpolation", 2)? })
            }
            "CenterCrop" => {
                let p = build(&["size"])?;
                Transform::CenterCrop(CenterCrop { size: square_or_pair(p.size_required("size")?) })
            }
            "ToTensor" => {
                build(&[])?;
                Transform::ToTensor
            }
            "Normalize" => {
                let p = build(&["mean", "std", "inplace"])?;
                let required = |k: &str| p.error(format!("missing required key `{k}`"));
                let mean = p.f64_list("mean", None)?.ok_or_else(|| required("mean"))?;
                let std = p.f64_list("std", None)?.ok_or_else(|| required("std"))?;
                p.bool_or("inplace", false)?;
                for (k, v) in [("mean", &mean), ("std", &std)] {
                    if v.len() != 1 && v.len() != 3 {
                        return Err(p.invalid(k, &format!("needs 1 or 3 values (one per channel), got {}", v.len())));
                    }
                }
                if std.contains(&0.0) {
                    return Err(p.invalid("std", "contains 0, which would divide by zero"));
                }
                Transform::Normalize(Normalize {
                    mean: mean.iter().map(|&x| x as f32).collect(),
                    std: std.iter().map(|&x| x as f32).collect(),
                })
            }
            "RandomErasing" => {
                let p = build(&["p", "scale", "ratio", "value", "inplace"])?;
                let value = match p.raw("value") {
                    None => EraseValue::Constant(vec![0.0]),
                    Some(Value::String(s)) if s == "random" => EraseValue::Random,
                    Some(Value::Array(_)) => {
                        let v = p.f64_list("value", None)?.unwrap_or_default();
                        if v.len() != 1 && v.len() != 3 {
                            return Err(p.invalid("value", "a list needs 1 or 3 values"));
                        }
                        EraseValue::Constant(v.iter().map(|&x| x as f32).collect())
                    }
                    Some(_) => EraseValue::Constant(vec![p.f64_or("value", 0.0)? as f32]),
                };
                p.bool_or("inplace", false)?;
                let scale = p.range_or("scale", [0.02, 0.33])?;
                let ratio = p.range_or("ratio", [0.3, 3.3])?;
                if ratio[0] <= 0.0 || scale[0] < 0.0 || scale[1] > 1.0 {
                    return Err(p.invalid("scale", "scale must lie in [0, 1] and ratio be positive"));
                }
                Transform::RandomErasing(RandomErasing { p: p.prob_or("p", 0.5)?, scale, ratio, value })
            }
            other => {
                let hint =
                    did_you_mean(other, TRANSFORM_NAMES).map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default();
                return Err(err(other, format!("unknown transform `{other}`{hint}; known transforms: {}", known())));
            }
        })
    }
}

fn square_or_pair(size: Vec<usize>) -> [usize; 2] {
    match size[..] {
        [h, w] => [h, w],
        [s, ..] => [s, s],
        [] => [0, 0],
    }
}

fn parse_scales(v: &Value) -> Option<Vec<[f64; 2]>> {
    v.as_array()?
        .iter()
        .map(|pair| {
            let p = pair.as_array()?;
            match p[..] {
                [ref a, ref b] => {
                    let (a, b) = (a.as_f64()?, b.as_f64()?);
                    (0.0 <= a && a <= b && b <= 1.0).then_some([a, b])
                }
                _ => None,
            }
        })
        .collect()
}
