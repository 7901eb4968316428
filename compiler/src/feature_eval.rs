//! `MODEL.FEATURE_EVAL_SETTINGS`: linear evaluation of a frozen trunk as
//! VISSL's benchmark configs run it (reference 7.2). VISSL wraps the trunk in
//! a feature extractor when `EVAL_MODE_ON` and one of the freeze flags are
//! set: the trunk then runs in eval mode, gets no gradient and returns the
//! features named in `LINEAR_EVAL_FEAT_POOL_OPS_MAP`, one per head.

use crate::compose::CompileError;
use crate::elaborate::json_get;
use crate::ir::{Graph, Op};
use serde_json::Value as J;

const KEY: &str = "MODEL.FEATURE_EVAL_SETTINGS";
const MAP: &str = "MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP";

/// What the feature-evaluation settings ask of the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeatureEval {
    /// The trunk runs in eval mode with frozen parameters.
    pub frozen_trunk: bool,
    /// The heads too (`FREEZE_TRUNK_AND_HEAD`).
    pub frozen_heads: bool,
    /// The features the trunk returns, by VISSL name, in the map's order
    /// (empty: the trunk's usual output).
    pub features: Vec<String>,
}

impl FeatureEval {
    /// Reads the settings; a freeze flag or a feature map that would have no
    /// effect (VISSL ignores them without `EVAL_MODE_ON`) is an error.
    pub fn from_config(cfg: &J) -> Result<FeatureEval, CompileError> {
        let flag = |name: &str| json_get(cfg, &format!("{KEY}.{name}")).and_then(J::as_bool).unwrap_or(false);
        let (eval_mode, trunk_only, trunk_and_head) =
            (flag("EVAL_MODE_ON"), flag("FREEZE_TRUNK_ONLY"), flag("FREEZE_TRUNK_AND_HEAD"));
        let features = feature_names(cfg)?;
        let frozen_trunk = eval_mode && (trunk_only || trunk_and_head);
        if !frozen_trunk && (trunk_only || trunk_and_head || !features.is_empty()) {
            let what = if features.is_empty() { "a freeze flag" } else { "LINEAR_EVAL_FEAT_POOL_OPS_MAP" };
            return Err(CompileError::Config(format!(
                "`{KEY}` sets {what}, which applies only to a frozen trunk: set `{KEY}.EVAL_MODE_ON: True` and `{KEY}.FREEZE_TRUNK_ONLY: True` (or FREEZE_TRUNK_AND_HEAD)"
            )));
        }
        Ok(FeatureEval { frozen_trunk, frozen_heads: frozen_trunk && trunk_and_head, features })
    }

    /// The trunk argument `out_feat_keys`: each feature as a `[kind, n, name]`
    /// triple (see `IntermediateFeatures` in models/layers.tsr).
    pub fn out_feat_keys(&self) -> Result<J, CompileError> {
        let pairs = self
            .features
            .iter()
            .enumerate()
            .map(|(i, name)| {
                parse_feature(name).map(|(kind, n)| J::from(vec![J::from(kind), J::from(n), J::from(name.as_str())])).ok_or_else(|| {
                    CompileError::Config(format!(
                        "`{MAP}.{i}` names the feature `{name}`, which tessera's trunks do not return; known: lastCLS, concatCLS<k>, blkCLS<i> (with a class token), lastPOOL, concatPOOL<k> (without)"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(J::Array(pairs))
    }
}

/// The feature names of the map, whose entries are `[name, [pool op, args]]`.
/// Only `Identity` pools: VISSL's ViT features are already [B, F].
fn feature_names(cfg: &J) -> Result<Vec<String>, CompileError> {
    let Some(J::Array(entries)) = json_get(cfg, MAP) else { return Ok(Vec::new()) };
    let mut names = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let bad = || CompileError::Config(format!("`{MAP}.{i}` must be [feature name, [pool op, [args]]], got {e}"));
        let J::Array(pair) = e else { return Err(bad()) };
        let (Some(J::String(name)), Some(J::Array(pool))) = (pair.first(), pair.get(1)) else { return Err(bad()) };
        if pair.len() != 2 {
            return Err(bad());
        }
        match pool.first() {
            Some(J::String(op)) if op == "Identity" => {}
            _ => {
                return Err(CompileError::Config(format!(
                    "`{MAP}.{i}`: the pool op of `{name}` is {}; a ViT feature is already [batch, features], so only [\"Identity\", []] is supported",
                    J::Array(pool.clone())
                )))
            }
        }
        names.push(name.clone());
    }
    Ok(names)
}

/// VISSL's feature names (get_intermediate_features): `lastCLS` is the last
/// block's class token, `concatCLS{k}` those of the last k blocks,
/// `blkCLS{i}` block i's; the POOL names average the tokens instead.
fn parse_feature(name: &str) -> Option<(&'static str, i64)> {
    let number = |rest: &str| rest.parse::<i64>().ok();
    match name {
        "lastCLS" => Some(("concatCLS", 1)),
        "lastPOOL" => Some(("concatPOOL", 1)),
        _ => [("concatCLS", "concatCLS"), ("blkCLS", "blkCLS"), ("concatPOOL", "concatPOOL")]
            .into_iter()
            .find_map(|(prefix, kind)| name.strip_prefix(prefix).and_then(number).map(|n| (kind, n))),
    }
}

/// Freezes every parameter under `prefix` (no gradient, no optimizer state).
pub fn freeze_prefix(g: &mut Graph, prefix: &str) {
    let ids: Vec<_> = g.params().into_iter().filter(|(_, n, _)| n.starts_with(prefix)).map(|(v, _, _)| v).collect();
    for v in ids {
        if let Op::Param { trainable, .. } = &mut g.node_mut(v).op {
            *trainable = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(settings: J) -> J {
        json!({"MODEL": {"FEATURE_EVAL_SETTINGS": settings}})
    }

    #[test]
    fn names_parse_as_vissl_writes_them() {
        assert_eq!(parse_feature("lastCLS"), Some(("concatCLS", 1)));
        assert_eq!(parse_feature("concatCLS4"), Some(("concatCLS", 4)));
        assert_eq!(parse_feature("blkCLS-2"), Some(("blkCLS", -2)));
        assert_eq!(parse_feature("concatPOOL3"), Some(("concatPOOL", 3)));
        assert_eq!(parse_feature("lastPOOL"), Some(("concatPOOL", 1)));
        assert_eq!(parse_feature("lastMAP"), None);
        assert_eq!(parse_feature("concatCLS"), None);
    }

    #[test]
    fn a_map_without_a_frozen_trunk_is_an_error() {
        let c = cfg(json!({"EVAL_MODE_ON": true, "LINEAR_EVAL_FEAT_POOL_OPS_MAP": [["lastCLS", ["Identity", []]]]}));
        let e = FeatureEval::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("FREEZE_TRUNK_ONLY"), "{e}");
        let c = cfg(json!({"FREEZE_TRUNK_ONLY": true}));
        assert!(FeatureEval::from_config(&c).is_err());
    }

    #[test]
    fn pool_ops_other_than_identity_and_unknown_names_are_errors() {
        let on = |map: J| {
            cfg(json!({"EVAL_MODE_ON": true, "FREEZE_TRUNK_ONLY": true, "LINEAR_EVAL_FEAT_POOL_OPS_MAP": map}))
        };
        let e = FeatureEval::from_config(&on(json!([["lastCLS", ["AvgPool2d", [[2, 2], 1, 0]]]]))).unwrap_err();
        assert!(e.to_string().contains("LINEAR_EVAL_FEAT_POOL_OPS_MAP.0"), "{e}");
        let f = FeatureEval::from_config(&on(json!([["lastCLS", ["Identity", []]], ["res5", ["Identity", []]]])))
            .expect("the map parses");
        let e = f.out_feat_keys().unwrap_err().to_string();
        assert!(e.contains("LINEAR_EVAL_FEAT_POOL_OPS_MAP.1") && e.contains("res5"), "{e}");
        let f = FeatureEval::from_config(&on(json!([["concatCLS4", ["Identity", []]], ["lastCLS", ["Identity", []]]])))
            .expect("the map parses");
        assert!(f.frozen_trunk && !f.frozen_heads);
        assert_eq!(
            f.out_feat_keys().expect("known names"),
            json!([["concatCLS", 4, "concatCLS4"], ["concatCLS", 1, "lastCLS"]])
        );
    }
}
