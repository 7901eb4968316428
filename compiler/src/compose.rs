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

/// TEST_ONLY: the run evaluates and trains nothing.
fn test_only(cfg: &J) -> bool {
    get(cfg, "TEST_ONLY").and_then(|v| v.as_bool()) == Some(true)
}

/// Values that parse but mean nothing (issue 15): each is an error naming
/// its key before anything is built, so compile, plan and train refuse it.
fn check_values(cfg: &J) -> R<()> {
    // The optimizer's own settings (name, betas, gradient clipping).
    crate::autodiff::StepOptions::from_config(cfg).map_err(CompileError::Config)?;
    let key = "MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER";
    if let Some(v) = get(cfg, key).filter(|v| !matches!(v.as_str(), Some("token" | "gap"))) {
        return Err(CompileError::Config(format!(
            "`{key}` is {v}; valid values: `token` (the class token's features) or `gap` (the mean of all tokens)"
        )));
    }
    // VISSL's vision_transformer trunk never reads CLASSIFIER (only ConViT
    // does): `gap` there would be accepted and ignored.
    if get(cfg, key).and_then(|v| v.as_str()) == Some("gap")
        && get(cfg, "MODEL.TRUNK.NAME").and_then(|v| v.as_str()) == Some("vision_transformer")
    {
        return Err(CompileError::Config(format!(
            "`{key}` is \"gap\", which only the convit trunk reads; the vision_transformer trunk \
             takes the class token's features, or the mean of all tokens with \
             MODEL.TRUNK.VISION_TRANSFORMERS.USE_CLASS_TOKEN: False"
        )));
    }
    if get(cfg, "OPTIMIZER.param_schedulers.lr").is_some() {
        let count = |k: &str| get(cfg, k).and_then(|v| v.as_u64()).unwrap_or(1);
        let run = crate::schedule::RunShape {
            batch_per_replica: count("DATA.TRAIN.BATCHSIZE_PER_REPLICA"),
            num_nodes: count("DISTRIBUTED.NUM_NODES"),
            procs_per_node: count("DISTRIBUTED.NUM_PROC_PER_NODE"),
            num_epochs: count("OPTIMIZER.num_epochs"),
        };
        let checked = match test_only(cfg) {
            // An evaluation uses no learning rate, but a wrong one is still wrong.
            true => crate::schedule::from_config(cfg, "lr", run).map(|_| ()),
            false => crate::schedule::check_config(cfg, run),
        };
        checked.map_err(|e| CompileError::Config(e.to_string()))?;
    }
    Ok(())
}

/// A classification loss reads class scores from a head: with
/// `MODEL.HEAD.PARAMS: []` VISSL would pass the trunk's features to it as
/// if they were scores (and SwAV's loss has no prototypes to score).
fn check_heads(model: &ModelDef, loss: &str, trunk_output: &Shape) -> R<()> {
    if !model.heads.is_empty() {
        return Ok(());
    }
    let width = trunk_output.last().and_then(|d| d.as_const()).map_or("D".to_string(), |d| d.to_string());
    let needed = match loss {
        "cross_entropy_multiple_output_single_target" => format!(
            "needs class scores from a head: without one the trunk's {width} features would be read as {width} class scores. Add a head whose output size is the number of classes, e.g. MODEL.HEAD.PARAMS=[[mlp, {{dims: [{width}, NUM_CLASSES]}}]]"
        ),
        "swav_loss" => format!(
            "needs a swav_head, whose prototypes score the features, e.g. MODEL.HEAD.PARAMS=[[swav_head, {{dims: [{width}, 2048, 128], num_clusters: [3000]}}]]"
        ),
        _ => return Ok(()),
    };
    Err(CompileError::Config(format!("`MODEL.HEAD.PARAMS` is empty, but `LOSS.name: {loss}` {needed}")))
}

/// A training step must update something: when no trainable parameter
/// reaches the loss, PyTorch's `loss.backward()` fails and tessera's step
/// would be empty. Says which parameters are frozen and by what.
fn check_trainable(g: &Graph, cfg: &J, loss: &str) -> R<()> {
    let Some(&(_, l)) = g.outputs().iter().find(|(n, _)| n == "loss") else { return Ok(()) };
    if crate::autodiff::loss_has_gradient(g, l).map_err(|e| CompileError::Config(e.to_string()))? {
        return Ok(());
    }
    let params = g.params();
    let names = |k: &str| -> Vec<String> {
        match get(cfg, k) {
            Some(J::Array(a)) => a
                .iter()
                .filter_map(|v| match v {
                    J::String(s) => Some(s.strip_prefix("module.").unwrap_or(s).to_string()),
                    J::Array(pair) => pair.first().and_then(|n| n.as_str()).map(|s| s.to_string()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    let listed = names("MODEL.NON_TRAINABLE_PARAMS");
    let temporary = names("MODEL.TEMP_FROZEN_PARAMS_ITER_MAP");
    let eval = |k: &str| get(cfg, &format!("MODEL.FEATURE_EVAL_SETTINGS.{k}")).and_then(|v| v.as_bool()) == Some(true);
    // Why each frozen parameter is frozen, as (reason, count, an example).
    let mut why: Vec<(String, usize, String)> = Vec::new();
    for (_, name, trainable) in &params {
        if *trainable {
            continue;
        }
        let reason = if temporary.iter().any(|t| t == name) {
            "MODEL.TEMP_FROZEN_PARAMS_ITER_MAP (for its first iterations)".to_string()
        } else if listed.iter().any(|t| t == name) {
            "MODEL.NON_TRAINABLE_PARAMS".to_string()
        } else if eval("EVAL_MODE_ON") && name.starts_with("trunk.") {
            "MODEL.FEATURE_EVAL_SETTINGS (a frozen trunk)".to_string()
        } else if eval("FREEZE_TRUNK_AND_HEAD") && name.starts_with("heads.") {
            "MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_AND_HEAD".to_string()
        } else {
            "its model file (declared without a gradient)".to_string()
        };
        match why.iter_mut().find(|(r, _, _)| *r == reason) {
            Some(entry) => entry.1 += 1,
            None => why.push((reason, 1, name.to_string())),
        }
    }
    let frozen: Vec<String> = why
        .iter()
        .map(|(reason, n, example)| match n {
            1 => format!("`{example}` by {reason}"),
            _ => format!("{n} (e.g. `{example}`) by {reason}"),
        })
        .collect();
    let trainable = params.iter().filter(|p| p.2).count();
    let cause = if trainable == 0 {
        format!("all {} parameters are frozen: {}", params.len(), frozen.join("; "))
    } else {
        let example = params.iter().find(|p| p.2).map_or("", |p| p.1);
        let mut c = format!(
            "loss `{loss}` does not depend on any of the {trainable} trainable parameters (e.g. `{example}`): check what MODEL.HEAD.PARAMS feeds it"
        );
        if !frozen.is_empty() {
            c.push_str(&format!("; frozen: {}", frozen.join("; ")));
        }
        c
    };
    Err(CompileError::Config(format!(
        "no trainable parameter reaches the loss, so a training step would change nothing: {cause}. Unfreeze some parameters, or set TEST_ONLY: True to evaluate without training"
    )))
}

/// `METERS.accuracy_list_meter.topk_values`: each k counts a sample right
/// when its label is among the k highest scores, so k is 1 to the number
/// of classes the head scores.
fn check_topk(g: &Graph, cfg: &J) -> R<()> {
    let meter = "accuracy_list_meter";
    let named = |v: &J| v.as_str() == Some(meter);
    let used = get(cfg, "METERS.name").is_some_and(named)
        || get(cfg, "METERS.names").and_then(|v| v.as_array()).is_some_and(|a| a.iter().any(named));
    let key = "METERS.accuracy_list_meter.topk_values";
    let Some(J::Array(ks)) = get(cfg, key).filter(|_| used) else { return Ok(()) };
    // The heads' class scores: `output`, or `output.<i>` per head.
    let classes: Vec<(String, u64)> = g
        .outputs()
        .iter()
        .filter(|(n, _)| n == "output" || n.starts_with("output."))
        .filter_map(|(n, v)| match g.ty(*v).shape.dims() {
            [_, c] => c.as_const().map(|c| (n.clone(), c)),
            _ => None,
        })
        .collect();
    for (i, k) in ks.iter().enumerate() {
        let Some(k) = k.as_u64().filter(|&k| k > 0) else {
            return Err(CompileError::Config(format!(
                "`{key}.{i}` is {k}: a top-k accuracy needs k of 1 or more (1 is the usual accuracy)"
            )));
        };
        if let Some((name, c)) = classes.iter().find(|(_, c)| k > *c) {
            return Err(CompileError::Config(format!(
                "`{key}.{i}` is {k}, above the {c} classes the model scores (its `{name}`, the last head's output size in MODEL.HEAD.PARAMS): every sample would count as right; use a k from 1 to {c}"
            )));
        }
    }
    Ok(())
}

/// A model that the graph runs: its trunk and heads (the online model, MoCo's
/// momentum encoder, a distillation teacher).
struct ModelDef {
    trunk_name: String,
    trunk: BlockRef,
    heads: Vec<Vec<HeadSpec>>,
    /// Linear evaluation: the trunk's `out_feat_keys` argument (VISSL's
    /// intermediate features), and which parts run in eval mode.
    feat_keys: Option<J>,
    eval_trunk: bool,
    eval_heads: bool,
}

/// The trunk and heads named by `cfg` (`MODEL.TRUNK.NAME`, `MODEL.HEAD.PARAMS`).
fn model_def(prog: &Program, cfg: &J) -> R<ModelDef> {
    let trunk_name = get_str(cfg, "MODEL.TRUNK.NAME")?;
    let trunk = registered(prog, BlockKind::Trunk, &trunk_name, "MODEL.TRUNK.NAME")?;
    Ok(ModelDef { trunk_name, trunk, heads: head_specs(cfg)?, feat_keys: None, eval_trunk: false, eval_heads: false })
}

fn registered(prog: &Program, kind: BlockKind, name: &str, key: &str) -> R<BlockRef> {
    prog.registered(kind, name).ok_or_else(|| {
        let names = prog.registered_names(kind);
        CompileError::Config(format!(
            "`{key}` is `{name}`, which is not a known {}{}; known: {}",
            kind.keyword(),
            did_you_mean(name, &names),
            names.join(", ")
        ))
    })
}

/// `MODEL.TRUNK.VISION_TRANSFORMERS.DISTILLED`: a DeiT trunk with a distillation token.
fn is_distilled(cfg: &J) -> bool {
    get(cfg, DISTILLED) == Some(&J::Bool(true))
}

const DISTILLED: &str = "MODEL.TRUNK.VISION_TRANSFORMERS.DISTILLED";
const IMAGE_SIZE: &str = "MODEL.TRUNK.VISION_TRANSFORMERS.IMAGE_SIZE";

/// The images a model runs on: new inputs, one per crop group (`prefix`, or
/// `prefix.i` with several), or an input that exists already.
enum Images<'g> {
    New { groups: &'g [(u64, u64)], prefix: &'g str },
    Given(ValueId),
}

/// A model's result: its image inputs, the trunk's features, the heads' output.
struct ModelOut {
    inputs: Vec<ValueId>,
    features: Vec<ValueId>,
    output: Val,
}

/// The trunk on each input (one per crop resolution, sharing weights; their
/// features concatenated along the batch), then the heads.
fn run_model(el: &mut Elab, prog: &Program, m: &ModelDef, images: Images, scope: &str) -> R<ModelOut> {
    let span = prog.block(m.trunk).span;
    let count = match images {
        Images::New { groups, .. } => groups.len(),
        Images::Given(_) => 1,
    };
    let (mut inputs, mut feats) = (Vec::new(), Vec::new());
    for i in 0..count {
        let x = match images {
            Images::New { groups, prefix } => {
                let (size, copies) = groups[i];
                let name = if groups.len() == 1 { prefix.to_string() } else { format!("{prefix}.{i}") };
                let shape = Shape(vec![Dim::Batch(copies), Dim::Const(3), Dim::Const(size), Dim::Const(size)]);
                el.graph.add_input(&name, shape, DType::F32).map_err(|e| CompileError::Config(e.to_string()))?
            }
            Images::Given(x) => x,
        };
        inputs.push(x);
        let named: Vec<(String, Val, Span)> = m
            .feat_keys
            .iter()
            .map(|k| {
                let keys = from_json(k, "MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP");
                ("out_feat_keys".to_string(), keys, span)
            })
            .collect();
        // A trunk run once per crop resolution shares its weights.
        el.share_state = i > 0;
        let outer = el.eval_mode;
        el.eval_mode = outer || m.eval_trunk;
        let f = el.call_block(m.trunk, vec![(Val::new(V::Tensor(x)), span)], named, join(scope, "trunk"), None);
        el.eval_mode = outer;
        el.share_state = false;
        feats.push(features(f?, &m.trunk_name)?);
    }
    let features = match feats.as_slice() {
        [one] => one.clone(),
        _ if feats.iter().all(|f| f.len() == 1) => {
            let ts: Vec<ValueId> = feats.iter().map(|f| f[0]).collect();
            let env =
                crate::elaborate::Env { vars: Default::default(), file: m.trunk.file, scope: join(scope, "trunk") };
            vec![returned_tensor(el.op(&env, Op::Concat { axis: 0 }, &ts, span)?, "concat")?]
        }
        _ => {
            return Err(CompileError::Config(format!(
                "trunk `{}` returns several features, which tessera cannot combine over several crop resolutions",
                m.trunk_name
            )))
        }
    };
    let outer = el.eval_mode;
    el.eval_mode = outer || m.eval_heads;
    let output = heads_forward(el, prog, &m.heads, &features, scope);
    el.eval_mode = outer;
    Ok(ModelOut { inputs, features, output: output? })
}

/// A trunk's result as its features: one tensor, or a list of tensors.
fn features(v: Val, trunk_name: &str) -> R<Vec<ValueId>> {
    let bad = |v: &Val| {
        CompileError::Config(format!(
            "trunk `{trunk_name}` must return a tensor or a list of tensors, got {}",
            v.type_name()
        ))
    };
    match &v.v {
        V::Tensor(t) => Ok(vec![*t]),
        V::List(items) if !items.is_empty() => {
            items.iter().map(|it| if let V::Tensor(t) = it.v { Ok(t) } else { Err(bad(it)) }).collect()
        }
        _ => Err(bad(&v)),
    }
}

/// VISSL's `heads_forward` (reference 3.1): as many trunk features as heads,
/// head i gets feature i and the output is the list of the heads' outputs;
/// one feature goes through the heads in sequence; anything else is an error.
fn heads_forward(el: &mut Elab, prog: &Program, heads: &[Vec<HeadSpec>], feats: &[ValueId], scope: &str) -> R<Val> {
    let tensor = |t: ValueId| Val::new(V::Tensor(t));
    let chain = |el: &mut Elab, i: usize, mut x: Val| -> R<Val> {
        for (j, spec) in heads[i].iter().enumerate() {
            let hscope = if heads[i].len() == 1 { format!("heads.{i}") } else { format!("heads.{i}.{j}") };
            x = apply_head(el, prog, spec, x, &join(scope, &hscope))?;
        }
        Ok(x)
    };
    match feats {
        [one] => (0..heads.len()).try_fold(tensor(*one), |x, i| chain(el, i, x)),
        _ if feats.len() == heads.len() => {
            let outs = feats.iter().enumerate().map(|(i, f)| chain(el, i, tensor(*f))).collect::<R<Vec<_>>>()?;
            Ok(Val::list(outs))
        }
        _ => Err(CompileError::Config(format!(
            "the trunk returns {} features but `MODEL.HEAD.PARAMS` has {} heads: head i takes feature i when the counts are equal, or the heads run in sequence on a single feature (VISSL's heads_forward)",
            feats.len(),
            heads.len()
        ))),
    }
}

/// A distilled model's two heads' outputs: (class head, distillation head).
fn head_pair(output: &Val) -> R<(ValueId, ValueId)> {
    let pair: Option<Vec<ValueId>> = match &output.v {
        V::List(items) => items.iter().map(|i| if let V::Tensor(t) = i.v { Some(t) } else { None }).collect(),
        _ => None,
    };
    match pair.as_deref() {
        Some(&[a, b]) => Ok((a, b)),
        _ => Err(CompileError::Config(format!(
            "`{DISTILLED}` is True, so the model needs two heads' outputs (class and distillation token), got {}",
            output.type_name()
        ))),
    }
}

/// A distilled model's prediction: the mean of its class and distillation
/// heads' outputs, as timm's VisionTransformerDistilled in eval mode
/// ((x + x_dist) / 2).
fn distilled_prediction(el: &mut Elab, output: &Val, scope: &str) -> R<ValueId> {
    let (a, b) = head_pair(output)?;
    let ir = |e: crate::ir::IrError| CompileError::Config(format!("{DISTILLED}: {e}"));
    let sum = el.graph.add_op(Op::Binary(crate::ir::BinaryOp::Add), &[a, b], scope).map_err(ir)?;
    el.graph.add_op(Op::Scale { factor: 0.5 }, &[sum], scope).map_err(ir)
}

/// The tensor a block returned (`what` names the block for the error).
fn returned_tensor(v: Val, what: &str) -> R<ValueId> {
    match v.v {
        V::Tensor(t) => Ok(t),
        _ => Err(CompileError::Config(format!("{what} must return a tensor, got {}", v.type_name()))),
    }
}

/// `LOSS.distillation.type` (none | soft | hard).
fn distillation_kind(cfg: &J, distilled: bool) -> R<String> {
    let key = "LOSS.distillation.type";
    let kind = get_str(cfg, key)?;
    match kind.as_str() {
        "none" => Ok(kind),
        "soft" | "hard" if distilled => Ok(kind),
        "soft" | "hard" => Err(CompileError::Config(format!(
            "`{key}` is {kind}, which trains a distillation head: set `{DISTILLED}: True` (and give MODEL.HEAD.PARAMS a second head)"
        ))),
        _ => Err(CompileError::Config(format!("`{key}` must be none, soft or hard, got `{kind}`"))),
    }
}

/// The teacher's config tree (`LOSS.distillation.teacher_config`), checked
/// against the student: the teacher reads the student's batch.
fn teacher_config(cfg: &J) -> R<J> {
    let key = "LOSS.distillation.teacher_config";
    let name = get_str(cfg, key)?;
    if name.is_empty() {
        return Err(CompileError::Config(format!(
            "`{key}` is empty: soft and hard distillation need a teacher (a config name or path)"
        )));
    }
    let teacher = crate::config::load(&name, &[])
        .map_err(|e| CompileError::Config(format!("`{key}` is `{name}`, which cannot be loaded: {e}")))?;
    let tree = teacher.tree().clone();
    let (student_size, teacher_size) = (get_u64(cfg, IMAGE_SIZE)?, get_u64(&tree, IMAGE_SIZE)?);
    if student_size != teacher_size {
        return Err(CompileError::Config(format!(
            "the teacher's `{IMAGE_SIZE}` is {teacher_size} (in `{key}` `{name}`) but the student's `{IMAGE_SIZE}` is {student_size}: the teacher sees the student's images, so the two must be equal"
        )));
    }
    Ok(tree)
}

/// The teacher's logits on `x`: its trunk and heads in eval mode, with
/// weights as buffers under `loss.teacher` (no gradient; loaded by the
/// engine from LOSS.distillation.teacher_weights).
fn teacher_logits<'a>(el: &mut Elab<'a>, prog: &Program, tcfg: &'a J, x: ValueId) -> R<ValueId> {
    let within = |e: CompileError| match e {
        CompileError::Config(m) => {
            CompileError::Config(format!("in the teacher (LOSS.distillation.teacher_config): {m}"))
        }
        d => d,
    };
    let def = model_def(prog, tcfg).map_err(within)?;
    // The teacher's blocks read their defaults (`cfg.…`) from its own config.
    let student_cfg = std::mem::replace(&mut el.cfg, tcfg);
    (el.params_as_buffers, el.eval_mode) = (true, true);
    let result = run_model(el, prog, &def, Images::Given(x), "loss.teacher");
    (el.params_as_buffers, el.eval_mode) = (false, false);
    el.cfg = student_cfg;
    let out = result.map_err(within)?.output;
    match out.v {
        V::Tensor(t) => Ok(t),
        V::List(_) if is_distilled(tcfg) => distilled_prediction(el, &out, "loss.teacher").map_err(within),
        _ => Err(CompileError::Config(format!(
            "the teacher (LOSS.distillation.teacher_config) must output one logits tensor, its heads give a {}",
            out.type_name()
        ))),
    }
}

/// Compiles the forward + loss graph of the experiment `cfg` (the resolved
/// `config` tree) with the model files of `prog`.
pub fn compile(prog: &Program, cfg: &J) -> R<Compiled> {
    let loss_name = get_str(cfg, "LOSS.name")?;
    check_config(cfg, &loss_name)?;
    check_values(cfg)?;
    let online = model_def(prog, cfg)?;
    let loss = registered(prog, BlockKind::Loss, &loss_name, "LOSS.name")?;
    let distilled = is_distilled(cfg);
    if distilled && online.trunk_name != "vision_transformer" {
        return Err(CompileError::Config(format!(
            "`{DISTILLED}` is True, but only the vision_transformer trunk has a distillation token (`MODEL.TRUNK.NAME` is `{}`)",
            online.trunk_name
        )));
    }
    let kind = distillation_kind(cfg, distilled)?;
    let teacher_cfg = if kind == "none" { None } else { Some(teacher_config(cfg)?) };
    let image_size = get_u64(cfg, IMAGE_SIZE)?;
    let eval = FeatureEval::from_config(cfg)?;
    let feat_keys = if eval.features.is_empty() { None } else { Some(eval.out_feat_keys()?) };
    if feat_keys.is_some() && !prog.block(online.trunk).params.iter().any(|p| p.name == "out_feat_keys") {
        return Err(CompileError::Config(format!(
            "`MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP` asks for intermediate features, which trunk `{}` (`MODEL.TRUNK.NAME`) does not return; vision_transformer does",
            online.trunk_name
        )));
    }
    let online = ModelDef { feat_keys, eval_trunk: eval.frozen_trunk, eval_heads: eval.frozen_heads, ..online };
    let groups = match loss_name.as_str() {
        "swav_loss" => crop_groups(cfg, image_size)?,
        // The two views are stacked view-major (simclr_collator, reference 4.3).
        "simclr_info_nce_loss" => vec![(crop_groups(cfg, image_size)?[0].0, 2)],
        // MoCo: one view for the query; the other goes to the momentum encoder.
        _ => vec![(crop_groups(cfg, image_size)?[0].0, 1)],
    };

    let mut el = Elab::new(prog, cfg);
    let images_per_sample: u64 = groups.iter().map(|g| g.1).sum();
    let ModelOut { inputs: data, features: trunk_features, output } =
        run_model(&mut el, prog, &online, Images::New { groups: &groups, prefix: "data" }, "")?;
    let trunk_output = el.graph.ty(trunk_features[0]).shape.clone();
    check_heads(&online, &loss_name, &trunk_output)?;

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
        let momentum = Images::New { groups: &groups, prefix: "data_momentum" };
        let keys = run_model(&mut el, prog, &online, momentum, "loss.moco_encoder")?.output;
        el.params_as_buffers = false;
        el.ema = None;
        named.push(("keys".to_string(), keys, prog.block(loss).span));
    }
    if loss_name == "swav_loss" {
        // VISSL infers num_crops from the multi-crop transform (infer_losses_config).
        named.push(("num_crops".to_string(), Val::int(images_per_sample as i64), prog.block(loss).span));
        // The queue is scored by the current prototypes (SwAVUpdateQueueScoresHook).
        let protos = prototypes(&el.graph);
        let list = protos.into_iter().map(|v| Val::new(V::Tensor(v))).collect();
        named.push(("prototypes".to_string(), Val::list(list), prog.block(loss).span));
    }
    set_outputs(&mut el.graph, "output", &output);
    // A distilled model predicts with both heads; its loss sees each head on its own.
    let (loss_input, dist_output) = if distilled {
        let prediction = distilled_prediction(&mut el, &output, "")?;
        el.graph.set_output("output", prediction);
        let (class_head, dist_head) = head_pair(&output)?;
        (Val::new(V::Tensor(class_head)), Some(dist_head))
    } else {
        (output, None)
    };
    let span = prog.block(loss).span;
    let l = el.call_block(loss, vec![(loss_input, span)], named, "loss".to_string(), None)?;
    let mut l = returned_tensor(l, &format!("loss `{loss_name}`"))?;
    if let (Some(tcfg), Some(dist)) = (&teacher_cfg, dist_output) {
        // DeiT's DistillationLoss: (1 - alpha) base + alpha distillation term.
        let [x] = data[..] else {
            return Err(CompileError::Config("distillation needs a single image input (no multi-crop)".to_string()));
        };
        let teacher = teacher_logits(&mut el, prog, tcfg, x)?;
        let block = library_block(prog, "models/losses/distillation.tsr", "deit_distillation")?;
        let args = [l, dist, teacher].map(|t| (Val::new(V::Tensor(t)), prog.block(block).span));
        let total = el.call_block(block, args.into(), vec![], "loss".to_string(), None)?;
        l = returned_tensor(total, "deit_distillation")?;
    }
    el.graph.set_output("loss", l);
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
    if !test_only(cfg) {
        check_trainable(&el.graph, cfg, &loss_name)?;
    }
    check_topk(&el.graph, cfg)?;
    let composition = Composition {
        trunk: online.trunk_name,
        heads: online.heads,
        loss: loss_name,
        images_per_sample,
        trunk_output,
        features: eval.features,
    };
    let param_groups = param_groups(&el.graph, cfg);
    Ok(Compiled { graph: el.graph, trunk_features, composition, param_groups })
}

/// The prototype weights of a swav_head (`heads.<i>[.<j>].prototypes<k>.weight`),
/// in the order of their index k.
pub fn prototypes(g: &Graph) -> Vec<ValueId> {
    let mut found: Vec<(u64, ValueId)> = g
        .params()
        .into_iter()
        .filter(|(_, name, _)| name.starts_with("heads."))
        .filter_map(|(v, name, _)| {
            let last = name.strip_suffix(".weight")?.rsplit('.').next()?;
            Some((last.strip_prefix("prototypes")?.parse().ok()?, v))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, v)| v).collect()
}

/// A block of one of the embedded model files (not registered by name).
fn library_block(prog: &Program, file: &str, name: &str) -> R<BlockRef> {
    prog.map
        .find(file)
        .and_then(|f| prog.lookup(f, name))
        .ok_or_else(|| CompileError::Config(format!("internal error: no block `{name}` in {file}")))
}

/// `MODEL.NON_TRAINABLE_PARAMS`: exact parameter names (DDP's `module.` prefix
/// allowed) that get `requires_grad=False`. An unknown name is an error, so a
/// typo cannot silently train a parameter meant to stay fixed.
fn freeze(g: &mut Graph, cfg: &J) -> R<()> {
    // The parameter `name` (as written under `key`) of this model, or an error.
    let param = |g: &Graph, key: &str, name: &str| -> R<ValueId> {
        let plain = name.strip_prefix("module.").unwrap_or(name);
        match g.state(plain) {
            Some(v) if matches!(g.node(v).op, Op::Param { .. }) => Ok(v),
            _ => {
                let all: Vec<String> = g.params().into_iter().map(|(_, n, _)| n.to_string()).collect();
                let all: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
                Err(CompileError::Config(format!(
                    "`{key}` names `{name}`, which is not a parameter of this model{}",
                    did_you_mean(plain, &all)
                )))
            }
        }
    };
    // Parameters frozen for their first iterations must exist too; the
    // engine freezes them (NON_TRAINABLE_PARAMS) in the plan of those iterations.
    for (name, _) in crate::autodiff::temp_frozen(cfg).map_err(CompileError::Config)? {
        param(g, "MODEL.TEMP_FROZEN_PARAMS_ITER_MAP", &name)?;
    }
    let key = "MODEL.NON_TRAINABLE_PARAMS";
    let names: Vec<String> = match get(cfg, key) {
        Some(J::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => return Ok(()),
    };
    for name in names {
        let v = param(g, key, &name)?;
        if let Op::Param { trainable, .. } = &mut g.node_mut(v).op {
            *trainable = false;
        }
    }
    Ok(())
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
