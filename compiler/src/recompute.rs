//! Recomputation (activation checkpointing) on the training-step graph.
//!
//! A region is a module scope of the forward pass (`trunk.blocks.3`,
//! `trunk.blocks.3.mlp`). Its values that only the region itself and the
//! backward pass read are not kept: the backward pass reads clones,
//! recomputed from the region's inputs right before the first backward op
//! that needs them. Values the forward pass reads outside the region (the
//! block's output, the next block's input) are the checkpoints and are kept.
//! Dropout and drop path recompute the same masks (their random streams are
//! keyed by op, not by position).
//!
//! Regions come from the config as VISSL defines them: MODEL.TRUNK.
//! VISION_TRANSFORMERS.CHECKPOINT_BLOCK (every block) and CHECKPOINT_MLP
//! (every block's MLP), and MODEL.ACTIVATION_CHECKPOINTING
//! (USE_ACTIVATION_CHECKPOINTING with NUM_ACTIVATION_CHECKPOINTING_SPLITS:
//! the blocks cut into that many consecutive segments, all but the last
//! recomputed, as checkpoint_sequential). `--memory-budget` picks regions
//! itself. The backward pass is what depends on autodiff's gradient seed;
//! other readers outside the forward pass (BatchNorm running statistics)
//! keep what they read.

use crate::ir::flops::node_flops;
use crate::ir::{Graph, IrError, Op, ValueId};
use serde_json::Value as J;
use std::collections::{HashMap, HashSet};

/// What recomputation did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Report {
    pub regions: Vec<String>,
    /// Ops cloned into the backward pass.
    pub recomputed_ops: usize,
    /// Their FLOPs (matrix products), at the batch given to `recompute`.
    pub extra_flops: u64,
}

/// Whether `scope` lies in region `prefix` (`trunk.blocks.1` holds
/// `trunk.blocks.1` and `trunk.blocks.1.mlp.fc1`, not `trunk.blocks.10`).
fn within(scope: &str, prefix: &str) -> bool {
    scope == prefix || (scope.starts_with(prefix) && scope.as_bytes().get(prefix.len()) == Some(&b'.'))
}

/// The number of trunk blocks (`trunk.blocks.N` scopes) in `g`.
pub fn block_count(g: &Graph) -> usize {
    g.node_ids()
        .iter()
        .filter_map(|&v| g.node(v).scope.strip_prefix("trunk.blocks.")?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

/// The regions the config asks for (none when it asks for none).
pub fn regions_from_config(cfg: &J, g: &Graph) -> Vec<Vec<String>> {
    let get = |k: &str| crate::elaborate::json_get(cfg, k);
    let flag = |k: &str| get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let blocks = block_count(g);
    let vt =
        |k: &str| flag(&format!("MODEL.TRUNK.VISION_TRANSFORMERS.{k}")) || flag(&format!("MODEL.TRUNK.CONVIT.{k}"));
    if vt("CHECKPOINT_BLOCK") {
        return (0..blocks).map(|i| vec![format!("trunk.blocks.{i}")]).collect();
    }
    if vt("CHECKPOINT_MLP") {
        return (0..blocks).map(|i| vec![format!("trunk.blocks.{i}.mlp")]).collect();
    }
    if flag("MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING") && blocks > 0 {
        // torch.utils.checkpoint.checkpoint_sequential: segments of
        // blocks // splits blocks; every segment but the last is recomputed.
        let splits = get("MODEL.ACTIVATION_CHECKPOINTING.NUM_ACTIVATION_CHECKPOINTING_SPLITS")
            .and_then(|v| v.as_u64())
            .unwrap_or(2)
            .clamp(1, blocks as u64) as usize;
        let per = blocks / splits;
        return (0..splits.saturating_sub(1))
            .map(|s| (s * per..(s + 1) * per).map(|i| format!("trunk.blocks.{i}")).collect())
            .collect();
    }
    vec![]
}

/// Recomputes each region (a region is a list of scope prefixes taken
/// together) in the backward pass of the training step `g`, whose loss is
/// the output `loss`. FLOPs are counted at `batch`.
pub fn recompute(g: &mut Graph, regions: &[Vec<String>], batch: u64) -> Result<Report, IrError> {
    let mut report = Report::default();
    if regions.is_empty() {
        return Ok(report);
    }
    let loss = g
        .outputs()
        .iter()
        .find(|(n, _)| n == "loss")
        .map(|(_, v)| *v)
        .ok_or_else(|| IrError::Invalid("recomputation needs the step's `loss` output".into()))?;
    // The forward pass: the loss and everything it depends on.
    let mut forward: HashSet<ValueId> = HashSet::new();
    let mut stack = vec![loss];
    while let Some(v) = stack.pop() {
        if forward.insert(v) {
            stack.extend(g.operands(v));
        }
    }
    // The backward pass: the ops outside the forward pass downstream of the
    // gradient seed (the scalar fill of 1 that autodiff starts from; CSE may
    // have merged it with another such fill, so every one is a start), and
    // those that feed them (a layer norm's recomputed x-hat). Other readers
    // outside the forward pass (BatchNorm running statistics) count as
    // forward readers: the values they read are kept.
    let mut backward: HashSet<ValueId> = HashSet::new();
    let mut stack: Vec<ValueId> = g
        .node_ids()
        .into_iter()
        .filter(|&v| matches!(g.node(v).op, Op::Fill { value } if value == 1.0) && g.ty(v).shape.rank() == 0)
        .flat_map(|v| g.users(v))
        .collect();
    while let Some(v) = stack.pop() {
        if !forward.contains(&v) && backward.insert(v) {
            stack.extend(g.users(v));
        }
    }
    for &v in g.topo_order()?.iter().rev() {
        let feeds = !forward.contains(&v) && !g.node(v).op.is_leaf() && g.users(v).iter().any(|u| backward.contains(u));
        if feeds {
            backward.insert(v);
        }
    }
    let region_of: HashMap<ValueId, usize> = g
        .node_ids()
        .into_iter()
        .filter(|v| forward.contains(v) && !g.node(*v).op.is_leaf())
        .filter_map(|v| regions.iter().position(|r| r.iter().any(|p| within(&g.node(v).scope, p))).map(|i| (v, i)))
        .collect();
    let pinned: HashSet<ValueId> = g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect();
    // Recomputable: in a region, not named, read outside the backward pass
    // only inside its own region (else it is a checkpoint, kept), and read by
    // the backward pass.
    let recomputable = |v: ValueId| -> bool {
        let Some(&r) = region_of.get(&v) else { return false };
        !pinned.contains(&v)
            && g.users(v).iter().all(|u| backward.contains(u) || region_of.get(u) == Some(&r))
            && g.users(v).iter().any(|u| backward.contains(u))
    };
    let order = g.topo_order()?;
    let mut new = Graph::new();
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    let mut clone: HashMap<ValueId, ValueId> = HashMap::new();
    let mut cloned_regions: HashSet<usize> = HashSet::new();
    for &v in &order {
        let in_backward = backward.contains(&v) && !g.node(v).op.is_leaf();
        if in_backward {
            // Recompute, right here, every region this op reads a dropped value of.
            for o in g.operands(v) {
                if !recomputable(o) || clone.contains_key(&o) {
                    continue;
                }
                let r = region_of[&o];
                // Every dropped value of the region the backward pass reads,
                // and what they need inside the region: cloned now, in
                // forward order (inputs first).
                let mut needed: HashSet<ValueId> = HashSet::new();
                let mut stack: Vec<ValueId> =
                    region_of.iter().filter(|&(&u, &ur)| ur == r && recomputable(u)).map(|(&u, _)| u).collect();
                // Checkpoints (kept values) are read as they are, not recomputed.
                let checkpoint = |a: &ValueId| {
                    pinned.contains(a)
                        || g.users(*a).iter().any(|u| !backward.contains(u) && region_of.get(u) != Some(&r))
                };
                while let Some(u) = stack.pop() {
                    if needed.insert(u) {
                        stack.extend(
                            g.operands(u).into_iter().filter(|a| region_of.get(a) == Some(&r) && !checkpoint(a)),
                        );
                    }
                }
                for &u in order.iter().filter(|u| needed.contains(u)) {
                    if clone.contains_key(&u) {
                        continue;
                    }
                    let args: Vec<ValueId> =
                        g.operands(u).iter().map(|a| clone.get(a).copied().unwrap_or_else(|| map[a])).collect();
                    let node = g.node(u);
                    let c = new.add_node_like(node, &args)?;
                    clone.insert(u, c);
                    report.recomputed_ops += 1;
                    report.extra_flops += node_flops(g, u, batch);
                }
                cloned_regions.insert(r);
            }
        }
        let args: Vec<ValueId> =
            g.operands(v).iter().map(|a| if in_backward && recomputable(*a) { clone[a] } else { map[a] }).collect();
        map.insert(v, new.add_node_like(g.node(v), &args)?);
    }
    for (name, v) in g.outputs() {
        new.set_output(name, map[v]);
    }
    for (name, v) in g.state_updates() {
        new.add_state_update(name, map[v]);
    }
    let mut done: Vec<usize> = cloned_regions.into_iter().collect();
    done.sort_unstable();
    report.regions = done.into_iter().map(|r| regions[r].join("+")).collect();
    *g = new;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::within;

    #[test]
    fn regions_are_scope_prefixes_on_dot_boundaries() {
        assert!(within("trunk.blocks.1", "trunk.blocks.1"));
        assert!(within("trunk.blocks.1.mlp.fc1", "trunk.blocks.1"));
        assert!(!within("trunk.blocks.10", "trunk.blocks.1"));
        assert!(!within("trunk.blocks", "trunk.blocks.1"));
    }
}
