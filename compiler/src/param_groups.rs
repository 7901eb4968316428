//! Optimizer parameter groups with VISSL's weight-decay rules (reference 6.2,
//! `vissl/optimizers/param_groups/default.py`), read off the IR: a parameter's
//! kind (linear/conv weight or bias, norm weight or bias, other) is the op
//! that consumes it, and it is a head parameter if its module name contains
//! "head".

use crate::ir::{Graph, Op};
use serde::Serialize;
use serde_json::Value as J;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamGroup {
    /// `trunk_regularized`, `trunk_unregularized`, `head_regularized`, ...
    pub name: String,
    pub weight_decay: f64,
    /// Heads follow `param_schedulers.lr_head` when `use_different_lr`.
    pub head_lr: bool,
    pub params: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Weight or bias of a Linear or Conv (`bias` true for the bias).
    Affine { bias: bool },
    /// Weight or bias of a LayerNorm or BatchNorm.
    Norm { bias: bool },
    /// Any other module's own parameter: tokens, ConViT's `alpha`.
    Other,
}

fn kind(g: &Graph, v: crate::ir::ValueId) -> Kind {
    for user in g.users(v) {
        let pos = g.operands(user).iter().position(|&o| o == v);
        match (&g.node(user).op, pos) {
            (Op::Linear | Op::Conv2d { .. }, Some(1)) => return Kind::Affine { bias: false },
            (Op::Linear | Op::Conv2d { .. }, Some(2)) => return Kind::Affine { bias: true },
            (Op::LayerNorm { .. } | Op::BatchNorm { .. }, Some(1)) => return Kind::Norm { bias: false },
            (Op::LayerNorm { .. } | Op::BatchNorm { .. }, Some(2)) => return Kind::Norm { bias: true },
            _ => {}
        }
    }
    Kind::Other
}

/// The two spellings of ViT's token parameters across VISSL versions. VISSL
/// matches `non_regularized_parameters` by substring only, so the configs'
/// `[pos_embedding, class_token]` misses current ViT's `pos_embed`/`cls_token`;
/// tessera matches either (docs/divergences.md).
const TOKEN_ALIASES: &[(&str, &str)] = &[("pos_embedding", "pos_embed"), ("class_token", "cls_token")];

fn matches_non_regularized(name: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| {
        name.contains(p.as_str())
            || TOKEN_ALIASES.iter().any(|(a, b)| {
                (p == a && name.split('.').any(|s| s == *b)) || (p == b && name.split('.').any(|s| s == *a))
            })
    })
}

fn f64_at(cfg: &J, key: &str, default: f64) -> f64 {
    crate::elaborate::json_get(cfg, key).and_then(|v| v.as_f64()).unwrap_or(default)
}

fn bool_at(cfg: &J, key: &str, default: bool) -> bool {
    crate::elaborate::json_get(cfg, key).and_then(|v| v.as_bool()).unwrap_or(default)
}

/// Groups of the trainable parameters of `g`, in VISSL's order: trunk
/// regularized, trunk unregularized, head regularized, head unregularized,
/// then the remaining ones (only when non-empty).
pub fn param_groups(g: &Graph, cfg: &J) -> Vec<ParamGroup> {
    let wd = f64_at(cfg, "OPTIMIZER.weight_decay", 0.0);
    let wd_head = if bool_at(cfg, "OPTIMIZER.head_optimizer_params.use_different_wd", false) {
        f64_at(cfg, "OPTIMIZER.head_optimizer_params.weight_decay", wd)
    } else {
        wd
    };
    let head_lr = bool_at(cfg, "OPTIMIZER.head_optimizer_params.use_different_lr", false);
    let reg_bn = bool_at(cfg, "OPTIMIZER.regularize_bn", false);
    let reg_bias = bool_at(cfg, "OPTIMIZER.regularize_bias", true);
    let non_reg: Vec<String> = crate::elaborate::json_get(cfg, "OPTIMIZER.non_regularized_parameters")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default();

    // [trunk reg, trunk unreg, head reg, head unreg, remaining reg, remaining unreg]
    let mut lists: [Vec<String>; 6] = Default::default();
    for (v, name, trainable) in g.params() {
        if !trainable {
            continue;
        }
        let module = name.rsplit_once('.').map_or("", |(m, _)| m);
        let head = module.contains("head");
        let kind = kind(g, v);
        let regularized = match kind {
            Kind::Affine { bias } => !bias || reg_bias,
            Kind::Norm { bias } => reg_bn && (!bias || reg_bias),
            Kind::Other => true,
        } && !matches_non_regularized(name, &non_reg);
        let slot = match kind {
            Kind::Other => 4,
            _ if head => 2,
            _ => 0,
        } + usize::from(!regularized);
        lists[slot].push(name.to_string());
    }
    let spec = [
        ("trunk_regularized", wd, false),
        ("trunk_unregularized", 0.0, false),
        ("head_regularized", wd_head, head_lr),
        ("head_unregularized", 0.0, head_lr),
        ("remaining_regularized", wd, false),
        ("remaining_unregularized", 0.0, false),
    ];
    spec.iter()
        .zip(lists)
        .enumerate()
        .filter(|(i, (_, params))| *i < 4 || !params.is_empty())
        .map(|(_, ((name, weight_decay, head_lr), params))| ParamGroup {
            name: name.to_string(),
            weight_decay: *weight_decay,
            head_lr: *head_lr,
            params,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_spellings_match_each_other() {
        let p = vec!["pos_embedding".to_string(), "class_token".to_string()];
        for name in ["trunk.pos_embed", "trunk.cls_token", "trunk.pos_embedding", "trunk.class_token"] {
            assert!(matches_non_regularized(name, &p), "{name}");
        }
        assert!(!matches_non_regularized("trunk.blocks.0.attn.qkv.weight", &p));
        // A substring as in VISSL still matches.
        assert!(matches_non_regularized("trunk.blocks.0.norm1.bias", &["norm1".to_string()]));
    }
}
