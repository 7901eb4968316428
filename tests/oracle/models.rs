//! Eager libtorch implementations of the quickstart models (trunk, heads,
//! cross-entropy loss), written from the reference semantics
//! (/work/shared/reference/vissl-semantics.md sections 1, 2, 3.2, 3.3, 4.4)
//! and independent of tessera's model files: only the hyper-parameters are
//! read from the experiment config, and the weights come from a name ->
//! tensor map with VISSL's state-dict names (without `module.`).
//!
//! Used by `tests/torch_parity_models.rs`, `tests/torch_parity_optim.rs` and
//! `examples/bench_train_step.rs`; depends only on `tch` and `serde_json`.
//! Eval-mode forward only (no dropout, drop path or attention dropout); the
//! `mlp` head's BatchNorm is not implemented (no quickstart model uses it).
#![allow(dead_code)] // each user needs a different subset

use serde_json::Value as J;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use tch::{Kind, Tensor};

/// The value at a dotted key of a config tree (`MODEL.TRUNK.NAME`).
pub fn cfg_at<'a>(cfg: &'a J, key: &str) -> Option<&'a J> {
    key.split('.').try_fold(cfg, |v, k| match v {
        J::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => v.get(k),
    })
}

fn req<'a>(cfg: &'a J, key: &str) -> &'a J {
    cfg_at(cfg, key).unwrap_or_else(|| panic!("oracle model: config has no `{key}`"))
}

fn usize_at(cfg: &J, key: &str) -> usize {
    req(cfg, key).as_u64().unwrap_or_else(|| panic!("oracle model: `{key}` is not an integer")) as usize
}

fn f64_at(cfg: &J, key: &str) -> f64 {
    req(cfg, key).as_f64().unwrap_or_else(|| panic!("oracle model: `{key}` is not a number"))
}

fn bool_at(cfg: &J, key: &str, default: bool) -> bool {
    cfg_at(cfg, key).and_then(|v| v.as_bool()).unwrap_or(default)
}

/// Hyper-parameters shared by both trunks (`MODEL.TRUNK.VISION_TRANSFORMERS`).
#[derive(Clone, Debug)]
pub struct VitSpec {
    pub image_size: usize,
    pub patch_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub dim: usize,
    pub mlp_dim: usize,
    pub qkv_bias: bool,
    /// The attention scale: QK_SCALE when truthy, else 1/sqrt(head dim) (reference 1.4).
    pub scale: f64,
    pub eps: f64,
    pub class_token: bool,
    /// DeiT's distillation token (`DISTILLED`): tokens [cls, dist, patches], two features.
    pub distilled: bool,
}

#[derive(Clone, Debug)]
pub struct ConvitSpec {
    pub n_gpsa: usize,
    pub class_token_in_local_layers: bool,
    pub locality_dim: usize,
    /// `token` (x[:, 0]) or `gap` (mean over all tokens).
    pub gap: bool,
}

#[derive(Clone, Debug)]
pub enum Trunk {
    Vit,
    Convit(ConvitSpec),
}

#[derive(Clone, Debug)]
pub enum Head {
    /// VISSL's `mlp` (reference 3.2).
    Mlp { dims: Vec<usize>, use_relu: bool, use_bias: bool, skip_last_layer_relu_bn: bool },
    /// VISSL's `vision_transformer_head` (reference 3.3).
    VitHead { hidden_dim: Option<usize> },
}

/// `cross_entropy_multiple_output_single_target` (reference 4.4).
#[derive(Clone, Debug)]
pub struct LossSpec {
    pub temperature: f64,
    pub normalize_output: bool,
    pub label_smoothing: f64,
    pub ignore_index: i64,
}

#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub vit: VitSpec,
    pub trunk: Trunk,
    /// Heads applied in sequence (one trunk feature), as `heads.<i>`.
    pub heads: Vec<Head>,
    pub loss: LossSpec,
}

impl ModelSpec {
    /// Reads the model of a resolved experiment config (the tree under `config:`).
    pub fn from_config(cfg: &J) -> ModelSpec {
        let vt = "MODEL.TRUNK.VISION_TRANSFORMERS";
        let name = req(cfg, "MODEL.TRUNK.NAME").as_str().expect("MODEL.TRUNK.NAME is a string");
        let dim = usize_at(cfg, &format!("{vt}.HIDDEN_DIM"));
        let heads = usize_at(cfg, &format!("{vt}.NUM_HEADS"));
        let scale = match cfg_at(cfg, &format!("{vt}.QK_SCALE")) {
            Some(J::Number(x)) if x.as_f64() != Some(0.0) => x.as_f64().unwrap(),
            Some(J::Bool(true)) => panic!("oracle model: QK_SCALE true is not a number"),
            _ => ((dim / heads) as f64).powf(-0.5),
        };
        let trunk = match name {
            "vision_transformer" => Trunk::Vit,
            "convit" => {
                let cv = "MODEL.TRUNK.CONVIT";
                let classifier = req(cfg, &format!("{vt}.CLASSIFIER")).as_str().unwrap_or("token");
                Trunk::Convit(ConvitSpec {
                    n_gpsa: usize_at(cfg, &format!("{cv}.N_GPSA_LAYERS")),
                    class_token_in_local_layers: bool_at(cfg, &format!("{cv}.CLASS_TOKEN_IN_LOCAL_LAYERS"), false),
                    locality_dim: usize_at(cfg, &format!("{cv}.LOCALITY_DIM")),
                    gap: classifier == "gap",
                })
            }
            other => panic!("oracle model: no eager trunk `{other}`"),
        };
        let eps = match trunk {
            Trunk::Vit => f64_at(cfg, &format!("{vt}.LAYER_NORM_EPS")),
            Trunk::Convit(_) => f64_at(cfg, "MODEL.TRUNK.CONVIT.LAYER_NORM_EPS"),
        };
        let vit = VitSpec {
            image_size: usize_at(cfg, &format!("{vt}.IMAGE_SIZE")),
            patch_size: usize_at(cfg, &format!("{vt}.PATCH_SIZE")),
            layers: usize_at(cfg, &format!("{vt}.NUM_LAYERS")),
            heads,
            dim,
            mlp_dim: usize_at(cfg, &format!("{vt}.MLP_DIM")),
            qkv_bias: bool_at(cfg, &format!("{vt}.QKV_BIAS"), false),
            scale,
            eps,
            class_token: bool_at(cfg, &format!("{vt}.USE_CLASS_TOKEN"), true),
            distilled: bool_at(cfg, &format!("{vt}.DISTILLED"), false),
        };
        let params = req(cfg, "MODEL.HEAD.PARAMS").as_array().expect("MODEL.HEAD.PARAMS is a list");
        let heads = params
            .iter()
            .map(|h| {
                let (name, kw) = match h.as_array().map(|a| a.as_slice()) {
                    Some([J::String(n), kw]) => (n.as_str(), kw),
                    _ => panic!("oracle model: only single-module heads [name, kwargs] are implemented, got {h}"),
                };
                let b = |k: &str, d: bool| kw.get(k).and_then(|v| v.as_bool()).unwrap_or(d);
                match name {
                    "mlp" => {
                        assert!(!b("use_bn", false), "oracle model: the mlp head's BatchNorm is not implemented");
                        let dims = kw["dims"].as_array().expect("dims").iter().map(|d| d.as_u64().unwrap() as usize);
                        Head::Mlp {
                            dims: dims.collect(),
                            use_relu: b("use_relu", false),
                            use_bias: b("use_bias", true),
                            skip_last_layer_relu_bn: b("skip_last_layer_relu_bn", true),
                        }
                    }
                    "vision_transformer_head" => {
                        Head::VitHead { hidden_dim: kw.get("hidden_dim").and_then(|v| v.as_u64()).map(|v| v as usize) }
                    }
                    other => panic!("oracle model: no eager head `{other}`"),
                }
            })
            .collect();
        let lk = "LOSS.cross_entropy_multiple_output_single_target";
        assert_eq!(
            req(cfg, "LOSS.name").as_str(),
            Some("cross_entropy_multiple_output_single_target"),
            "oracle model: only the cross-entropy loss is implemented"
        );
        let loss = LossSpec {
            temperature: cfg_at(cfg, &format!("{lk}.temperature")).and_then(|v| v.as_f64()).unwrap_or(1.0),
            normalize_output: bool_at(cfg, &format!("{lk}.normalize_output"), false),
            label_smoothing: cfg_at(cfg, &format!("{lk}.label_smoothing")).and_then(|v| v.as_f64()).unwrap_or(0.0),
            ignore_index: cfg_at(cfg, &format!("{lk}.ignore_index")).and_then(|v| v.as_i64()).unwrap_or(-1),
        };
        ModelSpec { vit, trunk, heads, loss }
    }
}

/// Parameters by state-dict name; remembers which ones the model read, so
/// a test can check that the oracle and tessera have the same parameters.
pub struct Params {
    map: BTreeMap<String, Tensor>,
    used: RefCell<BTreeSet<String>>,
}

impl Params {
    pub fn new(map: BTreeMap<String, Tensor>) -> Params {
        Params { map, used: RefCell::new(BTreeSet::new()) }
    }

    /// Trainable variables of `vs` (a libtorch optimizer's), one per
    /// (state-dict name, initial value), at the path the dotted name spells.
    pub fn in_var_store(vs: &tch::nn::VarStore, initial: impl IntoIterator<Item = (String, Tensor)>) -> Params {
        let mut map = BTreeMap::new();
        for (name, value) in initial {
            let segs: Vec<&str> = name.split('.').collect();
            let path = segs[..segs.len() - 1].iter().fold(vs.root(), |p, s| p.sub(*s));
            map.insert(name.clone(), path.var_copy(segs[segs.len() - 1], &value));
        }
        Params::new(map)
    }

    pub fn get(&self, name: &str) -> &Tensor {
        self.used.borrow_mut().insert(name.to_string());
        self.map.get(name).unwrap_or_else(|| {
            panic!("oracle model: no parameter `{name}`; have {:?}", self.map.keys().collect::<Vec<_>>())
        })
    }

    pub fn opt(&self, name: &str, present: bool) -> Option<&Tensor> {
        present.then(|| self.get(name))
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.map
    }

    /// Names the forward read so far.
    pub fn used(&self) -> BTreeSet<String> {
        self.used.borrow().clone()
    }
}

fn linear(p: &Params, x: &Tensor, name: &str, bias: bool) -> Tensor {
    x.linear(p.get(&format!("{name}.weight")), p.opt(&format!("{name}.bias"), bias))
}

fn layer_norm(p: &Params, x: &Tensor, name: &str, eps: f64) -> Tensor {
    let d = *x.size().last().unwrap();
    x.layer_norm([d], Some(p.get(&format!("{name}.weight"))), Some(p.get(&format!("{name}.bias"))), eps, false)
}

/// `[B, N, 3|2, H, d]` -> the `i`-th of q, k(, v) as `[B, H, N, d]` (layout [3][H][d], reference 1.1).
fn split_heads(t: &Tensor, parts: i64, heads: i64, i: i64) -> Tensor {
    let (b, n, c) = t.size3().unwrap();
    let d = c / parts / heads;
    t.reshape([b, n, parts, heads, d]).permute([2, 0, 3, 1, 4]).get(i)
}

/// `[B, H, N, d]` -> `[B, N, H * d]`.
fn merge_heads(t: &Tensor) -> Tensor {
    let (b, h, n, d) = t.size4().unwrap();
    t.transpose(1, 2).reshape([b, n, h * d])
}

/// Multi-head self-attention (reference 1.4): qkv Linear, softmax(q k^T * scale) v, proj.
fn attention(s: &VitSpec, p: &Params, x: &Tensor, name: &str) -> Tensor {
    let qkv = linear(p, x, &format!("{name}.qkv"), s.qkv_bias);
    let h = s.heads as i64;
    let (q, k, v) = (split_heads(&qkv, 3, h, 0), split_heads(&qkv, 3, h, 1), split_heads(&qkv, 3, h, 2));
    let a = (q.matmul(&k.transpose(-2, -1)) * s.scale).softmax(-1, Kind::Float);
    linear(p, &merge_heads(&a.matmul(&v)), &format!("{name}.proj"), true)
}

/// ConViT's relative positions (reference 2.2): `[1, N, N, 3 L_d]`, channels
/// Δx (L_d times), Δy, Δx² + Δy², with x = index mod S, y = index div S and
/// Δ = key - query.
pub fn relative_positions(n: usize, locality_dim: usize) -> Tensor {
    let s = (n as f64).sqrt() as usize;
    assert_eq!(s * s, n, "GPSA needs a square grid");
    let ld = locality_dim;
    let mut v = vec![0f32; n * n * 3 * ld];
    for i in 0..n {
        for j in 0..n {
            let dx = (j % s) as f32 - (i % s) as f32;
            let dy = (j / s) as f32 - (i / s) as f32;
            let at = (i * n + j) * 3 * ld;
            for c in 0..ld {
                v[at + c] = dx;
                v[at + ld + c] = dy;
                v[at + 2 * ld + c] = dx * dx + dy * dy;
            }
        }
    }
    Tensor::from_slice(&v).reshape([1, n as i64, n as i64, 3 * ld as i64])
}

/// Gated positional self-attention (reference 2.2).
fn gpsa(s: &VitSpec, c: &ConvitSpec, p: &Params, x: &Tensor, name: &str) -> Tensor {
    let (_, n, _) = x.size3().unwrap();
    let h = s.heads as i64;
    let qk = linear(p, x, &format!("{name}.qk"), s.qkv_bias);
    let (q, k) = (split_heads(&qk, 2, h, 0), split_heads(&qk, 2, h, 1));
    let patch_score = (q.matmul(&k.transpose(-2, -1)) * s.scale).softmax(-1, Kind::Float);
    let rel = relative_positions(n as usize, c.locality_dim);
    let pos_logits = linear(p, &rel, &format!("{name}.pos_proj"), true).permute([0, 3, 1, 2]) / c.locality_dim as f64;
    let pos_score = pos_logits.softmax(-1, Kind::Float);
    let gate = p.get(&format!("{name}.alpha")).sigmoid();
    let attn = (-&gate + 1.0) * patch_score + &gate * pos_score;
    let attn = &attn / attn.sum_dim_intlist([-1i64].as_slice(), true, Kind::Float);
    let v = linear(p, x, &format!("{name}.v"), s.qkv_bias);
    let (b, _, d) = v.size3().unwrap();
    let v = v.reshape([b, n, h, d / h]).permute([0, 2, 1, 3]);
    linear(p, &merge_heads(&attn.matmul(&v)), &format!("{name}.proj"), true)
}

/// Pre-norm block (reference 1.5) in eval mode: x + attn(LN1 x), then x + MLP(LN2 x).
fn block(s: &VitSpec, conv: Option<&ConvitSpec>, p: &Params, x: &Tensor, name: &str, mlp: [&str; 2]) -> Tensor {
    let h = layer_norm(p, x, &format!("{name}.norm1"), s.eps);
    let a = match conv {
        Some(c) => gpsa(s, c, p, &h, &format!("{name}.attn")),
        None => attention(s, p, &h, &format!("{name}.attn")),
    };
    let x = x + a;
    let h = layer_norm(p, &x, &format!("{name}.norm2"), s.eps);
    let h = linear(p, &h, &format!("{name}.mlp.{}", mlp[0]), true).gelu("none");
    &x + linear(p, &h, &format!("{name}.mlp.{}", mlp[1]), true)
}

/// Patch embedding `name` (`trunk.patch_embed.proj`, timm's `patch_embed.proj`):
/// Conv2d(kernel = stride = P), flattened row-major to `[B, N, D]`.
fn patch_embed(s: &VitSpec, p: &Params, x: &Tensor, name: &str) -> Tensor {
    let ps = s.patch_size as i64;
    let y =
        x.conv2d(p.get(&format!("{name}.weight")), Some(p.get(&format!("{name}.bias"))), [ps, ps], [0, 0], [1, 1], 1);
    y.flatten(2, -1).transpose(1, 2)
}

fn prepend(token: &Tensor, x: &Tensor) -> Tensor {
    let (b, _, d) = x.size3().unwrap();
    Tensor::cat(&[&token.expand([b, 1, d], false), x], 1)
}

/// The ViT trunk's block outputs `[B, N, D]`, before the final norm.
pub fn vit_blocks(spec: &ModelSpec, p: &Params, x: &Tensor) -> Vec<Tensor> {
    let s = &spec.vit;
    let mut t = patch_embed(s, p, x, "trunk.patch_embed.proj");
    // Reference 1.6: class token, then pos_embed over all tokens.
    if s.class_token {
        t = prepend(p.get("trunk.cls_token"), &t);
    }
    t = &t + p.get("trunk.pos_embed");
    let mut outs = Vec::new();
    for i in 0..s.layers {
        t = block(s, None, p, &t, &format!("trunk.blocks.{i}"), ["fc1", "fc2"]);
        outs.push(t.shallow_clone());
    }
    outs
}

/// VISSL's linear-evaluation features of the ViT trunk (reference 1.6), by
/// name: the class token (or the token mean) of the chosen blocks' outputs,
/// each through the final norm, concatenated in block order.
pub fn vit_features(spec: &ModelSpec, p: &Params, x: &Tensor, names: &[&str]) -> Vec<Tensor> {
    let blocks = vit_blocks(spec, p, x);
    let l = blocks.len();
    let normed = |t: &Tensor, pool: bool| {
        let t = layer_norm(p, t, "trunk.norm", spec.vit.eps);
        if pool {
            t.mean_dim([1i64].as_slice(), false, Kind::Float)
        } else {
            t.select(1, 0)
        }
    };
    let last = |k: usize, pool: bool| {
        let parts: Vec<Tensor> = blocks[l - k..].iter().map(|t| normed(t, pool)).collect();
        Tensor::cat(&parts, 1)
    };
    names
        .iter()
        .map(|name| match *name {
            "lastCLS" => last(1, false),
            "lastPOOL" => last(1, true),
            n if n.starts_with("concatCLS") => last(n["concatCLS".len()..].parse().unwrap(), false),
            n if n.starts_with("concatPOOL") => last(n["concatPOOL".len()..].parse().unwrap(), true),
            n if n.starts_with("blkCLS") => {
                let i: i64 = n["blkCLS".len()..].parse().unwrap();
                normed(&blocks[if i < 0 { (l as i64 + i) as usize } else { i as usize }], false)
            }
            n => panic!("oracle model: feature {n} is not implemented"),
        })
        .collect()
}

/// The trunk's feature `[B, D]` (a distilled trunk's class token).
pub fn trunk(spec: &ModelSpec, p: &Params, x: &Tensor) -> Tensor {
    trunk_features(spec, p, x).swap_remove(0)
}

/// timm's VisionTransformer(Distilled) tokens, eval mode, with parameters
/// named `{prefix}cls_token`, `{prefix}dist_token`, `{prefix}blocks.{i}...`:
/// [cls, (dist,) patches] + pos_embed, the blocks, the final norm.
fn vit_tokens(s: &VitSpec, p: &Params, x: &Tensor, prefix: &str) -> Tensor {
    let mut t = patch_embed(s, p, x, &format!("{prefix}patch_embed.proj"));
    if s.distilled {
        t = prepend(p.get(&format!("{prefix}dist_token")), &t);
    }
    if s.class_token {
        t = prepend(p.get(&format!("{prefix}cls_token")), &t);
    }
    t = &t + p.get(&format!("{prefix}pos_embed"));
    for i in 0..s.layers {
        t = block(s, None, p, &t, &format!("{prefix}blocks.{i}"), ["fc1", "fc2"]);
    }
    layer_norm(p, &t, &format!("{prefix}norm"), s.eps)
}

/// timm's `deit_*_distilled_*` in eval mode, from timm-named parameters
/// (`head`, `head_dist`): (head on the class token, head_dist on the
/// distillation token, their mean (x + x_dist) / 2, timm's eval output).
pub fn timm_distilled_forward(s: &VitSpec, p: &Params, x: &Tensor) -> (Tensor, Tensor, Tensor) {
    assert!(s.distilled, "oracle model: timm_distilled_forward needs a distilled spec");
    let t = vit_tokens(s, p, x, "");
    let (a, b) = (linear(p, &t.select(1, 0), "head", true), linear(p, &t.select(1, 1), "head_dist", true));
    let mean = (&a + &b) / 2.0;
    (a, b, mean)
}

/// The trunk's features: one `[B, D]`, or a distilled trunk's class and
/// distillation tokens.
pub fn trunk_features(spec: &ModelSpec, p: &Params, x: &Tensor) -> Vec<Tensor> {
    let s = &spec.vit;
    match &spec.trunk {
        Trunk::Vit => {
            // Reference 1.6: class token, then pos_embed over all tokens.
            let t = vit_tokens(s, p, x, "trunk.");
            if s.distilled {
                vec![t.select(1, 0), t.select(1, 1)]
            } else if s.class_token {
                vec![t.select(1, 0)]
            } else {
                vec![t.mean_dim([1i64].as_slice(), false, Kind::Float)]
            }
        }
        Trunk::Convit(c) => {
            // Reference 2.3: pos_embedding on patches only; the class token
            // joins before block N_GPSA (or before the first block).
            let mut t = patch_embed(s, p, x, "trunk.patch_embed.proj");
            t = &t + p.get("trunk.pos_embedding");
            for i in 0..s.layers {
                if (i == 0 && c.class_token_in_local_layers) || (i == c.n_gpsa && !c.class_token_in_local_layers) {
                    t = prepend(p.get("trunk.class_token"), &t);
                }
                let conv = (i < c.n_gpsa).then_some(c);
                t = block(s, conv, p, &t, &format!("trunk.blocks.{i}"), ["linear_1", "linear_2"]);
            }
            let t = layer_norm(p, &t, "trunk.norm", s.eps);
            if c.gap {
                vec![t.mean_dim([1i64].as_slice(), false, Kind::Float)]
            } else {
                vec![t.select(1, 0)]
            }
        }
    }
}

/// The heads in sequence (reference 3.1-3.3), eval mode.
pub fn heads(spec: &ModelSpec, p: &Params, feature: &Tensor) -> Tensor {
    (0..spec.heads.len()).fold(feature.shallow_clone(), |x, i| head(spec, p, i, &x))
}

/// A distilled model (reference 3.1's routing: head i on feature i): the
/// class head's and the distillation head's logits.
pub fn forward_distilled(spec: &ModelSpec, p: &Params, x: &Tensor) -> (Tensor, Tensor) {
    let f = trunk_features(spec, p, x);
    assert!(f.len() == 2 && spec.heads.len() == 2, "oracle model: a distilled model has two features and two heads");
    (head(spec, p, 0, &f[0]), head(spec, p, 1, &f[1]))
}

/// Head `i` (`heads.{i}`) on `x`, eval mode.
fn head(spec: &ModelSpec, p: &Params, i: usize, x: &Tensor) -> Tensor {
    let pre = format!("heads.{i}");
    match &spec.heads[i] {
        Head::Mlp { dims, use_relu, use_bias, skip_last_layer_relu_bn } => {
            let mut h = x.flatten(1, -1);
            let mut k = 0;
            for j in 0..dims.len() - 1 {
                h = linear(p, &h, &format!("{pre}.clf.{k}"), *use_bias);
                k += 1;
                let last = j == dims.len() - 2;
                if !(last && *skip_last_layer_relu_bn) && *use_relu {
                    h = h.relu();
                    k += 1;
                }
            }
            h
        }
        Head::VitHead { hidden_dim } => {
            let h = match hidden_dim {
                Some(_) => linear(p, x, &format!("{pre}.layers.pre_logits"), true).tanh(),
                None => x.shallow_clone(),
            };
            linear(p, &h, &format!("{pre}.layers.head"), true)
        }
    }
}

/// Trunk then heads: the logits `[B, K]`.
pub fn forward(spec: &ModelSpec, p: &Params, x: &Tensor) -> Tensor {
    heads(spec, p, &trunk(spec, p, x))
}

/// Cross-entropy of one output (reference 4.4): soft targets `[N, K]` give
/// -mean_n sum_k t log_softmax(x); class indices `[N]` use F.cross_entropy
/// with ignore_index and label smoothing.
pub fn loss(spec: &ModelSpec, logits: &Tensor, target: &Tensor) -> Tensor {
    let l = &spec.loss;
    let mut x = logits.shallow_clone();
    if l.normalize_output {
        x = &x / x.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12);
    }
    if l.temperature != 1.0 {
        // Not `/=`: that would divide the caller's logits in place.
        x = &x / l.temperature;
    }
    if target.dim() == 2 {
        -(target * x.log_softmax(1, Kind::Float))
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
            .mean(Kind::Float)
    } else {
        x.cross_entropy_loss::<Tensor>(target, None, tch::Reduction::Mean, l.ignore_index, l.label_smoothing)
    }
}

/// Deterministic N(0, 1) draws (SplitMix64 + Box-Muller), independent of
/// libtorch's generator, for inputs shared by tessera and libtorch.
pub fn normal_values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| {
            let (u1, u2) = (next(), next());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// Deterministic class indices in `0..k`.
pub fn labels(seed: u64, n: usize, k: usize) -> Vec<i64> {
    normal_values(seed ^ 0x5eed, n).iter().map(|v| ((v.abs() * 7919.0) as i64).rem_euclid(k as i64)).collect()
}

/// Deterministic soft targets `[n, k]` (rows sum to 1), like a mixed and
/// smoothed cutmixup batch.
pub fn soft_targets(seed: u64, n: usize, k: usize) -> Vec<f32> {
    let mut v: Vec<f32> = normal_values(seed ^ 0x50f7, n * k).iter().map(|x| (1.5 * x).exp()).collect();
    for row in v.chunks_mut(k) {
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|x| *x /= s);
    }
    v
}
