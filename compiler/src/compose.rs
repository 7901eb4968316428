//! Model composition: from a resolved experiment config, build the graph of
//! trunk -> heads -> loss as VISSL's `BaseSSLMultiInputOutputModel` does
//! (reference sections 0, 3.1, 4), with the method's inputs (crops, views,
//! the MoCo momentum encoder).

use crate::elaborate::{did_you_mean, from_json, BlockRef, Elab, Program, Val, V};
use crate::feature_eval::{freeze_prefix, FeatureEval};
use crate::ir::{DType, Dim, Graph, Op, Shape, ValueId};
use crate::param_groups::{param_groups, ParamGroup};
use crate::syntax::ast::BlockKind;
use crate::syntax::{Diagnostic, Span};
use serde_json::Value as J;
use std::fmt;

#[derive(Debug)]
pub enum CompileError {
    /// An error located in a `.tsr` file.
    Dsl(Diagnostic),
    /// A config inconsistency found before elaboration, naming its keys.
    Config(String),
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompileError::Dsl(d) => write!(f, "{d}"),
            CompileError::Config(m) => write!(f, "error: {m}"),
        }
    }
}

impl std::error::Error for CompileError {}

impl From<Diagnostic> for CompileError {
    fn from(d: Diagnostic) -> Self {
        CompileError::Dsl(d)
    }
}

type R<T> = Result<T, CompileError>;

/// One head as written in `MODEL.HEAD.PARAMS`: its registry name, its kwargs
/// and the config key of the entry.
#[derive(Debug, Clone)]
pub struct HeadSpec {
    pub name: String,
    pub kwargs: serde_json::Map<String, J>,
    pub key: String,
}

/// The model's structure, for the summary.
#[derive(Debug, Clone)]
pub struct Composition {
    pub trunk: String,
    /// Heads by index; a chained entry holds several modules.
    pub heads: Vec<Vec<HeadSpec>>,
    pub loss: String,
    /// Images per sample that go through the online trunk (crops, views).
    pub images_per_sample: u64,
    /// The shape of the trunk's (first) feature.
    pub trunk_output: Shape,
    /// Linear evaluation: the trunk's features by VISSL name, one per head
    /// (empty: the trunk's usual output).
    pub features: Vec<String>,
}

pub struct Compiled {
    pub graph: Graph,
    /// The online trunk's output values: its features in linear evaluation
    /// (feature i feeds head i), else the one tensor the heads read.
    pub trunk_features: Vec<ValueId>,
    pub composition: Composition,
    /// Optimizer parameter groups with their weight decay (reference 6.2).
    pub param_groups: Vec<ParamGroup>,
}

fn get<'a>(cfg: &'a J, key: &str) -> Option<&'a J> {
    crate::elaborate::json_get(cfg, key)
}

fn get_str(cfg: &J, key: &str) -> R<String> {
    match get(cfg, key) {
        Some(J::String(s)) => Ok(s.clone()),
        other => Err(CompileError::Config(format!("`{key}` must be a string, got {}", show(other)))),
    }
}

fn get_u64(cfg: &J, key: &str) -> R<u64> {
    match get(cfg, key).and_then(|v| v.as_u64()) {
        Some(n) => Ok(n),
        None => {
            Err(CompileError::Config(format!("`{key}` must be a non-negative integer, got {}", show(get(cfg, key)))))
        }
    }
}

fn show(v: Option<&J>) -> String {
    v.map_or("nothing".to_string(), |v| v.to_string())
}

/// Parses `MODEL.HEAD.PARAMS` as VISSL's `_get_heads` does: each entry is a
/// `[name, kwargs]` head or a list of them chained (reference 3.1).
pub fn head_specs(cfg: &J) -> R<Vec<Vec<HeadSpec>>> {
    let key = "MODEL.HEAD.PARAMS";
    let Some(J::Array(entries)) = get(cfg, key) else {
        return Err(CompileError::Config(format!("`{key}` must be a list of heads")));
    };
    let one = |e: &J, k: String| -> R<HeadSpec> {
        match e {
            J::Array(pair) if pair.len() == 2 => match (&pair[0], &pair[1]) {
                (J::String(n), J::Object(kw)) => Ok(HeadSpec { name: n.clone(), kwargs: kw.clone(), key: k }),
                _ => Err(CompileError::Config(format!("`{k}` must be [name, {{kwargs}}], got {e}"))),
            },
            _ => Err(CompileError::Config(format!("`{k}` must be [name, {{kwargs}}], got {e}"))),
        }
    };
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let k = format!("{key}.{i}");
        match e {
            J::Array(items) if items.first().is_some_and(|f| f.is_array()) => {
                let chain =
                    items.iter().enumerate().map(|(j, it)| one(it, format!("{k}.{j}"))).collect::<R<Vec<_>>>()?;
                out.push(chain);
            }
            _ => out.push(vec![one(e, k)?]),
        }
    }
    Ok(out)
}

/// Groups of same-size crops that go through the trunk together, as
/// `multi_res_input_forward` does: (image size, crops per sample).
fn crop_groups(cfg: &J, image_size: u64) -> R<Vec<(u64, u64)>> {
    let transforms = match get(cfg, "DATA.TRAIN.TRANSFORMS") {
        Some(J::Array(t)) => t.clone(),
        _ => Vec::new(),
    };
    let find = |name: &str| transforms.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name)).cloned();
    if let Some(mc) = find("ImgPilToMultiCrop") {
        let list = |k: &str| -> R<Vec<u64>> {
            mc.get(k).and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|x| x.as_u64()).collect()).ok_or_else(
                || CompileError::Config(format!("ImgPilToMultiCrop in DATA.TRAIN.TRANSFORMS needs a list `{k}`")),
            )
        };
        let (nums, sizes) = (list("num_crops")?, list("size_crops")?);
        if nums.len() != sizes.len() {
            return Err(CompileError::Config(format!(
                "ImgPilToMultiCrop: num_crops {nums:?} and size_crops {sizes:?} must have the same length"
            )));
        }
        let mut groups: Vec<(u64, u64)> = Vec::new();
        for (n, s) in nums.into_iter().zip(sizes) {
            match groups.iter_mut().find(|(size, _)| *size == s) {
                Some(g) => g.1 += n,
                None => groups.push((s, n)),
            }
        }
        return Ok(groups);
    }
    let size = find("RandomResizedCrop").and_then(|t| t.get("size").and_then(|s| s.as_u64())).unwrap_or(image_size);
    let copies = find("ImgReplicatePil").and_then(|t| t.get("num_times").and_then(|n| n.as_u64())).unwrap_or(1);
    Ok(vec![(size, copies.max(1))])
}

/// Checks across config sections that no single block sees (reference 4.2, 5.4).
fn check_config(cfg: &J, loss: &str) -> R<()> {
    if get(cfg, "DATA.TRAIN.COLLATE_FUNCTION").and_then(|v| v.as_str()) == Some("cutmixup_collator") {
        let b = get_u64(cfg, "DATA.TRAIN.BATCHSIZE_PER_REPLICA")?;
        if b % 2 != 0 {
            return Err(CompileError::Config(format!(
                "`DATA.TRAIN.BATCHSIZE_PER_REPLICA` is {b}, but `DATA.TRAIN.COLLATE_FUNCTION: cutmixup_collator` mixes each sample with its mirror in the batch and needs an even batch"
            )));
        }
    }
    if loss == "swav_loss" {
        let transforms = get(cfg, "DATA.TRAIN.TRANSFORMS").and_then(|t| t.as_array()).cloned().unwrap_or_default();
        let Some(mc) = transforms.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("ImgPilToMultiCrop"))
        else {
            return Err(CompileError::Config(
                "`LOSS.name: swav_loss` needs an ImgPilToMultiCrop transform in `DATA.TRAIN.TRANSFORMS`".to_string(),
            ));
        };
        let total = mc.get("total_num_crops").and_then(|v| v.as_u64());
        let sum: u64 =
            mc.get("num_crops").and_then(|v| v.as_array()).map_or(0, |a| a.iter().filter_map(|x| x.as_u64()).sum());
        if total != Some(sum) {
            return Err(CompileError::Config(format!(
                "ImgPilToMultiCrop: `total_num_crops` is {} but `num_crops` adds up to {sum}",
                show(mc.get("total_num_crops"))
            )));
        }
        if let Some(J::Array(a)) = get(cfg, "LOSS.swav_loss.crops_for_assign") {
            for c in a {
                if c.as_u64().is_none_or(|c| c >= sum) {
                    return Err(CompileError::Config(format!(
                        "`LOSS.swav_loss.crops_for_assign` names crop {c}, but the ImgPilToMultiCrop transform makes {sum} crops"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Compiles the forward + loss graph of the experiment `cfg` (the resolved
/// `config` tree) with the model files of `prog`.
pub fn compile(prog: &Program, cfg: &J) -> R<Compiled> {
    let trunk_name = get_str(cfg, "MODEL.TRUNK.NAME")?;
    let loss_name = get_str(cfg, "LOSS.name")?;
    check_config(cfg, &loss_name)?;
    let registered = |kind: BlockKind, name: &str, key: &str| -> R<BlockRef> {
        prog.registered(kind, name).ok_or_else(|| {
            let names = prog.registered_names(kind);
            CompileError::Config(format!(
                "`{key}` is `{name}`, which is not a known {}{}; known: {}",
                kind.keyword(),
                did_you_mean(name, &names),
                names.join(", ")
            ))
        })
    };
    let trunk = registered(BlockKind::Trunk, &trunk_name, "MODEL.TRUNK.NAME")?;
    let loss = registered(BlockKind::Loss, &loss_name, "LOSS.name")?;
    let heads = head_specs(cfg)?;
    let eval = FeatureEval::from_config(cfg)?;
    let feat_keys = if eval.features.is_empty() { None } else { Some(eval.out_feat_keys()?) };
    if feat_keys.is_some() && !prog.block(trunk).params.iter().any(|p| p.name == "out_feat_keys") {
        return Err(CompileError::Config(format!(
            "`MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP` asks for intermediate features, which trunk `{trunk_name}` (`MODEL.TRUNK.NAME`) does not return; vision_transformer does"
        )));
    }
    let image_size = get_u64(cfg, "MODEL.TRUNK.VISION_TRANSFORMERS.IMAGE_SIZE")?;
    let groups = match loss_name.as_str() {
        "swav_loss" => crop_groups(cfg, image_size)?,
        // The two views are stacked view-major (simclr_collator, reference 4.3).
        "simclr_info_nce_loss" => vec![(crop_groups(cfg, image_size)?[0].0, 2)],
        // MoCo: one view for the query; the other goes to the momentum encoder.
        _ => vec![(crop_groups(cfg, image_size)?[0].0, 1)],
    };

    let mut el = Elab::new(prog, cfg);
    let images_per_sample: u64 = groups.iter().map(|g| g.1).sum();
    let model = |el: &mut Elab, input_prefix: &str, scope: &str| -> R<(Vec<ValueId>, Val)> {
        let span = prog.block(trunk).span;
        let named: Vec<(String, Val, Span)> = feat_keys
            .iter()
            .map(|k| {
                (
                    "out_feat_keys".to_string(),
                    from_json(k, "MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP"),
                    span,
                )
            })
            .collect();
        let mut feats = Vec::new();
        for (i, (size, count)) in groups.iter().enumerate() {
            let name = if groups.len() == 1 { input_prefix.to_string() } else { format!("{input_prefix}.{i}") };
            let shape = Shape(vec![Dim::Batch(*count), Dim::Const(3), Dim::Const(*size), Dim::Const(*size)]);
            let x = el.graph.add_input(&name, shape, DType::F32).map_err(|e| CompileError::Config(e.to_string()))?;
            // A trunk run once per crop resolution shares its weights.
            el.share_state = i > 0;
            el.eval_mode = eval.frozen_trunk;
            let f =
                el.call_block(trunk, vec![(Val::new(V::Tensor(x)), span)], named.clone(), join(scope, "trunk"), None);
            el.share_state = false;
            el.eval_mode = false;
            feats.push(f?);
        }
        let features = if feats.len() == 1 {
            match feats.pop().expect("one feature") {
                Val { v: V::List(items), .. } => items.to_vec(),
                f => vec![f],
            }
        } else {
            let Some(ts) = tensors(&feats) else {
                return Err(CompileError::Config(format!(
                    "trunk `{trunk_name}` returns several features, which is not supported for a trunk run once per crop resolution"
                )));
            };
            let env = crate::elaborate::Env { vars: Default::default(), file: trunk.file, scope: join(scope, "trunk") };
            vec![el.op(&env, crate::ir::Op::Concat { axis: 0 }, &ts, prog.block(trunk).span)?]
        };
        let Some(trunk_out) = tensors(&features).filter(|t| !t.is_empty()) else {
            let got: Vec<&str> = features.iter().map(|f| f.type_name()).collect();
            return Err(CompileError::Config(format!(
                "trunk `{trunk_name}` must return tensors, got [{}]",
                got.join(", ")
            )));
        };
        el.eval_mode = eval.frozen_heads;
        let x = route_heads(el, prog, &heads, features, scope);
        el.eval_mode = false;
        Ok((trunk_out, x?))
    };
    let (trunk_features, output) = model(&mut el, "data", "")?;
    let trunk_output = el.graph.ty(trunk_features[0]).shape.clone();

    let mut named = Vec::new();
    if loss_name == "moco_loss" {
        // The momentum encoder: a copy of trunk and heads whose weights are
        // buffers (EMA-updated, no gradient), under the loss (reference 4.1).
        // Its momentum is an input, so that the first step can copy the
        // online weights (VISSL builds the encoder as a copy on the first
        // forward and updates it on later ones): 0 then, LOSS.moco_loss.momentum after.
        let m = el
            .graph
            .add_input("loss.moco_momentum", Shape::scalar(), DType::F32)
            .map_err(|e| CompileError::Config(e.to_string()))?;
        el.params_as_buffers = true;
        el.ema = Some((m, "loss.moco_encoder.".to_string()));
        let (_, keys) = model(&mut el, "data_momentum", "loss.moco_encoder")?;
        el.params_as_buffers = false;
        el.ema = None;
        named.push(("keys".to_string(), keys, prog.block(loss).span));
    }
    if loss_name == "swav_loss" {
        // VISSL infers num_crops from the multi-crop transform (infer_losses_config).
        named.push(("num_crops".to_string(), Val::int(images_per_sample as i64), prog.block(loss).span));
    }
    set_outputs(&mut el.graph, "output", &output);
    let span = prog.block(loss).span;
    let l = el.call_block(loss, vec![(output, span)], named, "loss".to_string(), None)?;
    match l.v {
        V::Tensor(t) => el.graph.set_output("loss", t),
        _ => {
            return Err(CompileError::Config(format!("loss `{loss_name}` must return a tensor, got {}", l.type_name())))
        }
    }
    freeze(&mut el.graph, cfg)?;
    // VISSL's feature extractor: the trunk (and with FREEZE_TRUNK_AND_HEAD
    // the heads) get no gradient and no optimizer state (reference 7.2).
    if eval.frozen_trunk {
        freeze_prefix(&mut el.graph, "trunk.");
    }
    if eval.frozen_heads {
        freeze_prefix(&mut el.graph, "heads.");
    }
    el.graph.verify().map_err(|e| CompileError::Config(format!("internal error, the IR does not verify: {e}")))?;
    let composition = Composition {
        trunk: trunk_name,
        heads,
        loss: loss_name,
        images_per_sample,
        trunk_output,
        features: eval.features,
    };
    let param_groups = param_groups(&el.graph, cfg);
    Ok(Compiled { graph: el.graph, trunk_features, composition, param_groups })
}

/// `MODEL.NON_TRAINABLE_PARAMS`: exact parameter names (DDP's `module.` prefix
/// allowed) that get `requires_grad=False`. An unknown name is an error, so a
/// typo cannot silently train a parameter meant to stay fixed.
fn freeze(g: &mut Graph, cfg: &J) -> R<()> {
    let key = "MODEL.NON_TRAINABLE_PARAMS";
    let names: Vec<String> = match get(cfg, key) {
        Some(J::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => return Ok(()),
    };
    for name in names {
        let plain = name.strip_prefix("module.").unwrap_or(&name);
        let Some(v) = g.state(plain) else {
            let all: Vec<String> = g.params().into_iter().map(|(_, n, _)| n.to_string()).collect();
            let all: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
            return Err(CompileError::Config(format!(
                "`{key}` names `{name}`, which is not a parameter of this model{}",
                did_you_mean(plain, &all)
            )));
        };
        if let Op::Param { trainable, .. } = &mut g.node_mut(v).op {
            *trainable = false;
        }
    }
    Ok(())
}

/// The tensors of `vals`, if all are tensors.
fn tensors(vals: &[Val]) -> Option<Vec<ValueId>> {
    vals.iter().map(|f| if let V::Tensor(t) = f.v { Some(t) } else { None }).collect()
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}.{b}")
    }
}

fn set_outputs(g: &mut Graph, name: &str, v: &Val) {
    match &v.v {
        V::Tensor(t) => g.set_output(name, *t),
        V::List(items) => {
            for (i, it) in items.iter().enumerate() {
                set_outputs(g, &format!("{name}.{i}"), it);
            }
        }
        _ => {}
    }
}

/// Feeds the trunk's features to the heads as VISSL's `heads_forward`
/// (reference 3.1): one feature goes through the heads in sequence; as many
/// features as heads, head i takes feature i (linear evaluation of several
/// features); anything else is an error. Several outputs make a list.
fn route_heads(el: &mut Elab, prog: &Program, heads: &[Vec<HeadSpec>], features: Vec<Val>, scope: &str) -> R<Val> {
    let apply_chain = |el: &mut Elab, i: usize, chain: &[HeadSpec], mut x: Val| -> R<Val> {
        for (j, spec) in chain.iter().enumerate() {
            let hscope = if chain.len() == 1 { format!("heads.{i}") } else { format!("heads.{i}.{j}") };
            x = apply_head(el, prog, spec, x, &join(scope, &hscope))?;
        }
        Ok(x)
    };
    match <[Val; 1]>::try_from(features) {
        Ok([mut x]) => {
            for (i, chain) in heads.iter().enumerate() {
                x = apply_chain(el, i, chain, x)?;
            }
            Ok(x)
        }
        Err(features) if features.len() == heads.len() => {
            let outs = heads
                .iter()
                .zip(features)
                .enumerate()
                .map(|(i, (chain, x))| apply_chain(el, i, chain, x))
                .collect::<R<Vec<_>>>()?;
            Ok(Val::new(V::List(std::rc::Rc::new(outs))))
        }
        Err(features) => Err(CompileError::Config(format!(
            "`MODEL.HEAD.PARAMS` lists {} heads but the trunk returns {} features: give one head per feature, or one feature to heads applied in sequence",
            heads.len(),
            features.len()
        ))),
    }
}

/// Applies one head with its config kwargs; kwargs that the head does not
/// take are a config error naming the entry.
fn apply_head(el: &mut Elab, prog: &Program, spec: &HeadSpec, x: Val, scope: &str) -> R<Val> {
    let Some(r) = prog.registered(BlockKind::Head, &spec.name) else {
        let names = prog.registered_names(BlockKind::Head);
        return Err(CompileError::Config(format!(
            "`{}` names head `{}`, which is not a known head{}; known: {}",
            spec.key,
            spec.name,
            did_you_mean(&spec.name, &names),
            names.join(", ")
        )));
    };
    let def = prog.block(r);
    let params: Vec<&str> = def.params.iter().skip(1).map(|p| p.name.as_str()).collect();
    let mut named = Vec::new();
    for (k, v) in &spec.kwargs {
        if !params.contains(&k.as_str()) {
            return Err(CompileError::Config(format!(
                "`{}`: head `{}` has no argument `{k}`{}; its arguments are: {}",
                spec.key,
                spec.name,
                did_you_mean(k, &params),
                params.join(", ")
            )));
        }
        named.push((k.clone(), from_json(v, &format!("{}.1.{k}", spec.key)), def.span));
    }
    let input_shape = match &x.v {
        V::Tensor(t) => el.graph.ty(*t).shape.to_string(),
        _ => x.type_name().to_string(),
    };
    el.call_block(r, vec![(x, def.span)], named, scope.to_string(), None).map_err(|d| {
        CompileError::Dsl(d.with_note(format!(
            "while applying `{}` (`{}`, head `{}`) to its input {input_shape}",
            scope, spec.key, spec.name
        )))
    })
}
