//! timm's parameter names, and the few tensors whose layout differs.
//!
//! A timm `vit_*` model is the `vision_transformer` trunk followed by a
//! single-Linear head: `cls_token` is `trunk.cls_token`, `blocks.3.mlp.fc1.weight`
//! is `trunk.blocks.3.mlp.fc1.weight`, `head.weight` is `heads.0.clf.0.weight`
//! (an `mlp` head with two dims) or `heads.0.layers.head.weight` (a
//! `vision_transformer_head` without `hidden_dim`). A timm `convit_*` model is
//! the `convit` trunk, where VISSL renamed a few things:
//!
//! | timm | tessera (VISSL) |
//! |---|---|
//! | `cls_token` [1,1,D] | `trunk.class_token` |
//! | `pos_embed` [1,N,D] | `trunk.pos_embedding` |
//! | `blocks.{i}.mlp.fc1` / `fc2` | `trunk.blocks.{i}.mlp.linear_1` / `linear_2` |
//! | `blocks.{i}.attn.gating_param` [H] | `trunk.blocks.{i}.attn.alpha` [1,H,1,1] |
//! | `blocks.{i}.attn.pos_proj` [H,3] | `trunk.blocks.{i}.attn.pos_proj` [H,3·L] |
//!
//! A timm `deit_*_distilled_*` model (VisionTransformerDistilled) is the
//! `vision_transformer` trunk with `DISTILLED: True` and two single-Linear
//! heads: `dist_token` is `trunk.dist_token`, `head` is heads.0 (class token)
//! and `head_dist` is heads.1 (distillation token).
//!
//! L is the trunk's LOCALITY_DIM. VISSL repeats each of the three relative
//! position channels L times and divides `pos_proj`'s output (bias included)
//! by L, so a timm `pos_proj` (L = 1) becomes an exact tessera one by
//! repeating each weight column L times and multiplying the bias by L; the
//! way back sums each group of L columns and divides weight and bias by L.
//! Both directions give the same attention logits. The `rel_indices` buffer
//! is derived from the token count and is never stored.

use super::NamedTensor;

/// How the tessera names of one model are spelled where timm has a single
/// spelling: the token parameters and MLP of the ViT and ConViT trunks
/// differ, and which head (if any) is timm's `head`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimmNaming {
    /// Trunk parameter for timm's `cls_token`: `cls_token` (ViT) or `class_token` (ConViT).
    pub class_token: String,
    /// Trunk parameter for timm's `pos_embed`: `pos_embed` (ViT) or `pos_embedding` (ConViT).
    pub pos_embed: String,
    /// Block MLP layers for timm's `fc1` and `fc2`: `fc1`/`fc2` (ViT) or `linear_1`/`linear_2` (ConViT).
    pub mlp: (String, String),
    /// The tessera module for timm's `head` Linear, e.g. `heads.0.clf.0`; `None` when the model's
    /// heads are not one Linear layer (a projection head, SwAV prototypes, a BN in front ...).
    pub head: Option<String>,
    /// The tessera module for timm's `head_dist` (a distilled DeiT's second classifier,
    /// `heads.1.clf.0`); `None` for a model without a distillation token.
    pub head_dist: Option<String>,
}

impl TimmNaming {
    /// The `vision_transformer` trunk with a one-layer `mlp` head.
    pub fn vit() -> Self {
        TimmNaming {
            class_token: "cls_token".into(),
            pos_embed: "pos_embed".into(),
            mlp: ("fc1".into(), "fc2".into()),
            head: Some("heads.0.clf.0".into()),
            head_dist: None,
        }
    }

    /// The `convit` trunk with a one-layer `mlp` head.
    pub fn convit() -> Self {
        TimmNaming {
            class_token: "class_token".into(),
            pos_embed: "pos_embedding".into(),
            mlp: ("linear_1".into(), "linear_2".into()),
            head: Some("heads.0.clf.0".into()),
            head_dist: None,
        }
    }

    /// Reads the spellings off a model's tessera names (parameters and buffers).
    pub fn infer<'a>(tessera_names: impl IntoIterator<Item = &'a str>) -> Self {
        let names: Vec<&str> = tessera_names.into_iter().map(strip_module).collect();
        let has = |n: &str| names.contains(&n);
        let mut naming = TimmNaming::vit();
        if has("trunk.class_token") {
            naming.class_token = "class_token".into();
        }
        if has("trunk.pos_embedding") {
            naming.pos_embed = "pos_embedding".into();
        }
        if names.iter().any(|n| n.starts_with("trunk.blocks.") && n.contains(".mlp.linear_1.")) {
            naming.mlp = ("linear_1".into(), "linear_2".into());
        }
        let heads: Vec<&str> = names.iter().copied().filter(|n| n.starts_with("heads.")).collect();
        // Head i is one Linear layer when all its tensors are that layer's weight and bias.
        let linear = |i: usize| {
            let prefix = format!("heads.{i}.");
            let mine: Vec<&str> = heads.iter().copied().filter(|n| n.starts_with(&prefix)).collect();
            [format!("heads.{i}.clf.0"), format!("heads.{i}.layers.head")].into_iter().find(|module| {
                let (weight, bias) = (format!("{module}.weight"), format!("{module}.bias"));
                mine.contains(&weight.as_str()) && mine.iter().all(|n| *n == weight || *n == bias)
            })
        };
        let count = |n: usize| heads.iter().filter(|h| h.starts_with(&format!("heads.{n}."))).count();
        // A distilled DeiT has timm's `head` and `head_dist`; other models one `head`.
        let distilled = has("trunk.dist_token");
        let head_count = if distilled { 2 } else { 1 };
        let all_counted = (0..head_count).map(count).sum::<usize>() == heads.len();
        naming.head = linear(0).filter(|_| all_counted);
        naming.head_dist = if distilled { linear(1).filter(|_| all_counted) } else { None };
        naming
    }
}

/// DistributedDataParallel prefixes every name with `module.`.
pub(crate) fn strip_module(name: &str) -> &str {
    name.strip_prefix("module.").unwrap_or(name)
}

fn is_weight_or_bias(p: &str) -> bool {
    p == "weight" || p == "bias"
}

/// `blocks.{i}.{rest}` with a decimal `i`.
fn split_block(name: &str) -> Option<(&str, &str)> {
    let (index, rest) = name.strip_prefix("blocks.")?.split_once('.')?;
    (!index.is_empty() && index.bytes().all(|b| b.is_ascii_digit())).then_some((index, rest))
}

/// The tessera name of a timm parameter, or `None` when tessera's model has
/// no such parameter (`reg_token`, `blocks.{i}.ls1.gamma`, `fc_norm`, or
/// `head` / `head_dist` when the model has no single Linear in their place).
pub fn timm_to_tessera(name: &str, naming: &TimmNaming) -> Option<String> {
    match name {
        "cls_token" => return Some(format!("trunk.{}", naming.class_token)),
        "dist_token" => return Some("trunk.dist_token".into()),
        "pos_embed" => return Some(format!("trunk.{}", naming.pos_embed)),
        _ => {}
    }
    if let Some(p) = name.strip_prefix("patch_embed.proj.").or_else(|| name.strip_prefix("norm.")) {
        return is_weight_or_bias(p).then(|| format!("trunk.{name}"));
    }
    for (timm_head, module) in [("head.", &naming.head), ("head_dist.", &naming.head_dist)] {
        if let Some(p) = name.strip_prefix(timm_head) {
            return if is_weight_or_bias(p) { module.as_ref().map(|h| format!("{h}.{p}")) } else { None };
        }
    }
    let (index, rest) = split_block(name)?;
    let (module, p) = rest.rsplit_once('.')?;
    let mapped = match (module, p) {
        ("attn", "gating_param") => "attn.alpha".to_string(),
        ("mlp.fc1", p) if is_weight_or_bias(p) => format!("mlp.{}.{p}", naming.mlp.0),
        ("mlp.fc2", p) if is_weight_or_bias(p) => format!("mlp.{}.{p}", naming.mlp.1),
        ("norm1" | "norm2" | "attn.qkv" | "attn.proj" | "attn.qk" | "attn.v" | "attn.pos_proj", p)
            if is_weight_or_bias(p) =>
        {
            rest.to_string()
        }
        _ => return None,
    };
    Some(format!("trunk.blocks.{index}.{mapped}"))
}

/// The timm name of a tessera parameter, or `None` when timm's ViT/ConViT
/// has no such tensor (derived buffers such as `rel_indices`, heads other
/// than [`TimmNaming::head`]). Both VISSL spellings of the token parameters
/// and the MLP are accepted, as is a `module.` prefix.
pub fn tessera_to_timm(name: &str, naming: &TimmNaming) -> Option<String> {
    let name = strip_module(name);
    for (timm_head, module) in [("head", &naming.head), ("head_dist", &naming.head_dist)] {
        let Some(module) = module else { continue };
        if let Some(p) = name.strip_prefix(module.as_str()).and_then(|r| r.strip_prefix('.')) {
            return is_weight_or_bias(p).then(|| format!("{timm_head}.{p}"));
        }
    }
    let name = name.strip_prefix("trunk.")?;
    match name {
        "cls_token" | "class_token" => return Some("cls_token".into()),
        "dist_token" => return Some("dist_token".into()),
        "pos_embed" | "pos_embedding" => return Some("pos_embed".into()),
        _ => {}
    }
    if let Some(p) = name.strip_prefix("patch_embed.proj.").or_else(|| name.strip_prefix("norm.")) {
        return is_weight_or_bias(p).then(|| name.to_string());
    }
    let (index, rest) = split_block(name)?;
    let (module, p) = rest.rsplit_once('.')?;
    let mapped = match (module, p) {
        ("attn", "alpha") => "attn.gating_param".to_string(),
        ("mlp.fc1" | "mlp.linear_1", p) if is_weight_or_bias(p) => format!("mlp.fc1.{p}"),
        ("mlp.fc2" | "mlp.linear_2", p) if is_weight_or_bias(p) => format!("mlp.fc2.{p}"),
        ("norm1" | "norm2" | "attn.qkv" | "attn.proj" | "attn.qk" | "attn.v" | "attn.pos_proj", p)
            if is_weight_or_bias(p) =>
        {
            rest.to_string()
        }
        _ => return None,
    };
    Some(format!("blocks.{index}.{mapped}"))
}

/// Buffers that a model derives from its configuration and that are never
/// read from (or written to) a weights file.
pub fn is_derived_buffer(tessera_name: &str) -> bool {
    // ConViT's relative positions; a ViT's position-embedding resize matrix
    // for crops of another size (`trunk.pos_resize.<side>.matrix`).
    let resize = tessera_name.ends_with(".matrix") && tessera_name.contains("pos_resize.");
    tessera_name.ends_with(".rel_indices") || tessera_name == "rel_indices" || resize
}

/// The GPSA gating parameter: timm's [H] is tessera's `alpha` [1,H,1,1].
pub fn gating_to_alpha_shape(shape: &[usize]) -> Option<Vec<usize>> {
    match shape {
        [h] => Some(vec![1, *h, 1, 1]),
        _ => None,
    }
}

/// tessera's `alpha` [1,H,1,1] is timm's `gating_param` [H].
pub fn alpha_to_gating_shape(shape: &[usize]) -> Option<Vec<usize>> {
    match shape {
        [1, h, 1, 1] => Some(vec![*h]),
        _ => None,
    }
}

/// timm `pos_proj.weight` [H,3] → tessera [H,3·L]: each column repeated L times.
pub fn expand_pos_proj_weight(data: &[f32], heads: usize, locality_dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads * 3 * locality_dim);
    for row in data.chunks_exact(3).take(heads) {
        for &w in row {
            out.extend(std::iter::repeat_n(w, locality_dim));
        }
    }
    out
}

/// tessera `pos_proj.weight` [H,3·L] → timm [H,3]: each group of L columns summed, divided by L.
pub fn collapse_pos_proj_weight(data: &[f32], heads: usize, locality_dim: usize) -> Vec<f32> {
    let l = locality_dim.max(1);
    data.chunks_exact(l).take(heads * 3).map(|group| group.iter().sum::<f32>() / l as f32).collect()
}

/// The tessera name of the `pos_proj.weight` beside a `pos_proj.bias`, if `name` is one.
pub(crate) fn pos_proj_sibling_weight(name: &str) -> Option<String> {
    name.strip_suffix(".attn.pos_proj.bias").map(|prefix| format!("{prefix}.attn.pos_proj.weight"))
}

/// Converts one tensor with a timm name to tessera's name and layout.
/// `locality_dim` is the model's L for this block's `pos_proj` (1 elsewhere);
/// a `pos_proj` that is not [H,3] is passed through untouched, so that a
/// shape check can report it.
pub fn timm_tensor_to_tessera(t: NamedTensor, naming: &TimmNaming, locality_dim: usize) -> Option<NamedTensor> {
    let name = timm_to_tessera(&t.name, naming)?;
    let NamedTensor { mut shape, mut data, .. } = t;
    if name.ends_with(".attn.alpha") {
        shape = gating_to_alpha_shape(&shape).unwrap_or(shape);
    } else if locality_dim > 1 && name.ends_with(".attn.pos_proj.weight") {
        if let [h, 3] = shape[..] {
            data = expand_pos_proj_weight(&data, h, locality_dim);
            shape = vec![h, 3 * locality_dim];
        }
    } else if locality_dim > 1 && name.ends_with(".attn.pos_proj.bias") {
        data.iter_mut().for_each(|b| *b *= locality_dim as f32);
    }
    Some(NamedTensor { name, shape, data })
}

/// Converts one tessera tensor to timm's name and layout (the inverse of
/// [`timm_tensor_to_tessera`]); `locality_dim` is L of this block's
/// `pos_proj` (the weight's column count over 3), 1 elsewhere.
pub fn tessera_tensor_to_timm(t: &NamedTensor, naming: &TimmNaming, locality_dim: usize) -> Option<NamedTensor> {
    let name = tessera_to_timm(&t.name, naming)?;
    let (mut shape, mut data) = (t.shape.clone(), t.data.clone());
    if name.ends_with(".attn.gating_param") {
        shape = alpha_to_gating_shape(&shape).unwrap_or(shape);
    } else if locality_dim > 1 && name.ends_with(".attn.pos_proj.weight") {
        if let [h, c] = shape[..] {
            if c == 3 * locality_dim {
                data = collapse_pos_proj_weight(&data, h, locality_dim);
                shape = vec![h, 3];
            }
        }
    } else if locality_dim > 1 && name.ends_with(".attn.pos_proj.bias") {
        data.iter_mut().for_each(|b| *b /= locality_dim as f32);
    }
    Some(NamedTensor { name, shape, data })
}
