//! Graph -> graph passes around autodiff and before lowering. Each pass
//! returns a one-line report; `run` verifies the graph after every pass in
//! debug builds and tests (and whenever asked), so a broken pass fails at
//! that pass.
//!
//! Order (`DEFAULT`): the pattern rules on the forward graph (`FORWARD`,
//! before autodiff); then dead code, common subexpressions and constant
//! folding (each exposes work for the next), dead code again; recomputation
//! (`crate::recompute`, after CSE, which would merge recomputed ops back);
//! then the fusion rules (and `amp-bf16` before elementwise fusion when the
//! config uses AMP: `default_for`). The CPU backend's pipeline is
//! `default_for_cpu`.

mod bias_epilogue;
mod cse;
mod fold;
mod fuse;
mod layer_norm_grad;
mod linear_residual;
mod matmul_fusion;
mod norm_epilogue;
mod optimizer;
mod packed_attention;
mod patch_linear;
mod patterns;
mod precision;
mod schedule;
mod share_recompute;
mod slice_first;

pub use schedule::plain_topological;

use crate::ir::{Graph, IrError, Op, ValueId};
use std::collections::HashMap;

/// A named pass with the reason it exists.
pub struct Pass {
    pub name: &'static str,
    pub why: &'static str,
    run: fn(&mut Graph) -> Result<String, IrError>,
}

/// Every pass, in the default order.
pub const PASSES: &[Pass] = &[
    Pass { name: "dce", why: "drop values no output, state update or input needs (autodiff leaves some)", run: dce },
    Pass { name: "cse", why: "compute each distinct (op, operands) once", run: cse::run },
    Pass {
        name: "attention-pattern",
        why: "softmax(q k^T * s) v written out by hand becomes one attention op (forward graph, before autodiff)",
        run: patterns::attention,
    },
    Pass {
        name: "gated-attention-pattern",
        why: "ConViT's gated attention as one content attention plus a positional product sharing v (forward graph)",
        run: patterns::gated_attention,
    },
    Pass {
        name: "cross-entropy-pattern",
        why: "-mean(sum(t * log_softmax(x))) written out by hand becomes one cross_entropy op (forward graph)",
        run: patterns::cross_entropy,
    },
    Pass {
        name: "patch-linear",
        why: "a convolution whose stride is its kernel (a ViT's patch embedding), read as tokens, is a linear over the patches: the tokens written in place, no permuted copies or im2col scratch (forward graph)",
        run: patch_linear::run,
    },
    Pass {
        name: "slice-first",
        why: "row-wise ops (norms, linears, elementwise) read only through a slice of their rows (the class token) compute only those rows, back to the attention that mixes them (forward graph)",
        run: slice_first::run,
    },
    Pass { name: "fold", why: "evaluate elementwise ops on constants at compile time", run: fold::run },
    Pass {
        name: "packed-attention",
        why: "self-attention and its gradient read q, k and v in place from the qkv product and write in the projection's layout (no permute or slice copies)",
        run: packed_attention::run,
    },
    Pass {
        name: "fuse-into-matmul",
        why: "GELU and layer norm applied by the matmuls that read them (never stored); GELU's gradient as a matmul epilogue",
        run: matmul_fusion::run,
    },
    Pass {
        name: "residual-into-linear",
        why: "a product read only by a residual add writes into the stream (the GEMM reads the stream as C): its result is never stored and read back; so too a product summed with another (two input gradients of one value)",
        run: linear_residual::run,
    },
    Pass {
        name: "norm-grad-epilogue",
        why: "a layer norm's input gradient adds the residual gradient as it is written (one pass over the residual width fewer)",
        run: norm_epilogue::run,
    },
    Pass {
        name: "layer-norm-grad",
        why: "a layer norm's input, weight and bias gradients and the input gradient's bf16 copy as one kernel (dy and x read once)",
        run: layer_norm_grad::run,
    },
    Pass {
        name: "bias-grad-epilogue",
        why: "the MLP's hidden and the qkv product's bias gradients summed by the kernels that write the gradient (not read again for the sum)",
        run: bias_epilogue::run,
    },
    Pass {
        name: "share-recompute",
        why: "GELU(h) and a norm's output, recomputed for a weight gradient, are written by the backward kernel that reads h or x anyway (recomputed once, no scratch pass)",
        run: share_recompute::run,
    },
    Pass {
        name: "amp-bf16",
        why: "mixed precision (MODEL.AMP_PARAMS.USE_AMP): bf16 matmuls and attention, f32 norms, softmax, losses, master weights",
        run: precision::run_bf16,
    },
    Pass {
        name: "fuse-elementwise",
        why: "chains of elementwise ops as one kernel: one pass over memory, no temporaries",
        run: fuse::run,
    },
    Pass {
        name: "fuse-optimizer",
        why: "every parameter's optimizer update (p, m, v) as one multi-tensor kernel over the flat parameter, gradient and state regions",
        run: optimizer::run,
    },
    Pass {
        name: "schedule",
        why: "an execution order that frees memory before allocating more (lower peak than plain topological order)",
        run: schedule::run,
    },
];

/// The default pipeline: DCE again after folding (folded fills leave their
/// constant operands unread), then the fusion rules.
///
/// `schedule` is not in it: on the reference models the creation order
/// (forward, then each gradient as soon as it can be computed, in reverse)
/// already plans 9-21% below a plain topological order, and the greedy
/// reordering moved real peaks by +-0.5% only (`--passes` can add it).
pub const DEFAULT: &[&str] = &[
    "gated-attention-pattern",
    "attention-pattern",
    "cross-entropy-pattern",
    "patch-linear",
    "slice-first",
    "dce",
    "cse",
    "fold",
    "dce",
    "packed-attention",
    "fuse-into-matmul",
    "residual-into-linear",
    "norm-grad-epilogue",
    "layer-norm-grad",
    "bias-grad-epilogue",
    "share-recompute",
    "fuse-elementwise",
    "fuse-optimizer",
];

/// Passes that run on the forward graph before autodiff when chosen (the
/// pipeline takes them out of the list; after autodiff the backward reads
/// the intermediates, so they would not match there).
pub const FORWARD: &[&str] =
    &["gated-attention-pattern", "attention-pattern", "cross-entropy-pattern", "patch-linear", "slice-first"];

/// The default pipeline for a config: with MODEL.AMP_PARAMS.USE_AMP, the
/// precision pass runs before fusion (so its casts fuse into elementwise chains).
pub fn default_for(amp: bool) -> Vec<&'static str> {
    let mut p = DEFAULT.to_vec();
    if amp {
        // Before elementwise fusion (its casts fuse); DCE after it:
        // full-precision views that only fed casts are dead.
        // Also before the layer-norm backward is joined: the casts it joins are its.
        let at = p.iter().position(|&n| n == "layer-norm-grad").expect("in DEFAULT");
        p.splice(at..at, ["amp-bf16", "dce"]);
    }
    p
}

/// The pipeline for the CPU backend: `DEFAULT` without `fuse-into-matmul`
/// and without mixed precision. Both trade arithmetic for memory (GELU and
/// layer norm recomputed inside two products each; bf16 values the CPU
/// computes in f32 and rounds, paying for the casts without the bandwidth
/// they save), a trade that pays on a GPU's memory but not on a CPU whose
/// tensors of this size sit in cache.
pub fn default_for_cpu() -> Vec<&'static str> {
    DEFAULT.iter().copied().filter(|&p| p != "fuse-into-matmul").collect()
}

/// The names of every pass.
pub fn default_passes() -> Vec<&'static str> {
    PASSES.iter().map(|p| p.name).collect()
}

/// What one pass did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub pass: &'static str,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub detail: String,
}

/// Looks a pass up by name; the error lists the known ones.
pub fn find(name: &str) -> Result<&'static Pass, String> {
    PASSES
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| format!("unknown pass `{name}`; the passes are: {}", default_passes().join(", ")))
}

/// Runs the named passes in order. The verifier runs after each pass when
/// `verify_each` or in debug builds; `after` sees the graph after each pass.
pub fn run(
    g: &mut Graph,
    names: &[&str],
    verify_each: bool,
    mut after: impl FnMut(&str, &Graph),
) -> Result<Vec<Report>, IrError> {
    let mut reports = Vec::with_capacity(names.len());
    for name in names {
        let pass = find(name).map_err(IrError::Invalid)?;
        let nodes_before = g.node_count();
        let detail = (pass.run)(g)?;
        if verify_each || cfg!(debug_assertions) {
            g.verify().map_err(|e| IrError::Invalid(format!("after pass `{}`: {e}", pass.name)))?;
        }
        after(pass.name, g);
        reports.push(Report { pass: pass.name, nodes_before, nodes_after: g.node_count(), detail });
    }
    Ok(reports)
}

fn dce(g: &mut Graph) -> Result<String, IrError> {
    let before = g.node_count();
    g.prune(|_| true, true);
    Ok(format!("removed {} nodes", before - g.node_count()))
}

/// The epilogue rules' mechanism: `add(r, p)` (either order), where `p` is
/// read by nothing else, is no graph output, and `p`, `r` and the sum share
/// one type, becomes `absorb(p's op, p's arity)` applied to p's operands and
/// then `r`, in p's scope (`None`: p is not absorbed). Returns how many.
pub(crate) fn absorb_into_add(g: &mut Graph, absorb: impl Fn(&Op, usize) -> Option<Op>) -> Result<usize, IrError> {
    use crate::ir::BinaryOp;
    use std::collections::HashSet;
    let pinned: HashSet<ValueId> = g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect();
    // add -> (the absorbed operand, its new op, the other operand).
    let mut fold: HashMap<ValueId, (ValueId, Op, ValueId)> = HashMap::new();
    let mut absorbed: HashSet<ValueId> = HashSet::new();
    for v in g.node_ids() {
        if !matches!(g.node(v).op, Op::Binary(BinaryOp::Add)) {
            continue;
        }
        let [a, b] = g.operands(v)[..] else { continue };
        let candidate = |p: ValueId, r: ValueId| {
            let ok = g.users(p) == [v]
                && !pinned.contains(&p)
                && !absorbed.contains(&p)
                && p != r
                && g.ty(p) == g.ty(v)
                && g.ty(r) == g.ty(v);
            ok.then(|| absorb(&g.node(p).op, g.operands(p).len())).flatten().map(|op| (p, op, r))
        };
        if let Some((p, op, r)) = candidate(b, a).or_else(|| candidate(a, b)) {
            absorbed.insert(p);
            fold.insert(v, (p, op, r));
        }
    }
    let folded = fold.len();
    *g = rebuild(g, |old, v, new, map| {
        if absorbed.contains(&v) {
            return Ok(Step::Skip);
        }
        let Some((p, op, r)) = fold.get(&v) else { return Ok(Step::Copy) };
        let mut args: Vec<ValueId> = old.operands(*p).iter().map(|o| map[o]).collect();
        args.push(map[r]);
        Ok(Step::Use(new.add_op(op.clone(), &args, &old.node(*p).scope)?))
    })?;
    Ok(folded)
}

/// What a rebuilding pass does with one node of the old graph.
pub(crate) enum Step {
    /// Copy it (operands mapped).
    Copy,
    /// It is now this node of the new graph.
    Use(ValueId),
    /// It has no counterpart (no one may read it in the new graph).
    Skip,
    /// These old nodes (it, and others skipped before it) are now these new ones.
    Map(Vec<(ValueId, ValueId)>),
}

/// Rebuilds `g` in topological order, node by node as `step` says; outputs
/// and state updates follow their values. `step` gets the old graph, the
/// node, the new graph and the old -> new map so far.
pub(crate) fn rebuild(
    g: &Graph,
    mut step: impl FnMut(&Graph, ValueId, &mut Graph, &HashMap<ValueId, ValueId>) -> Result<Step, IrError>,
) -> Result<Graph, IrError> {
    let mut out = Graph::new();
    let mut map: HashMap<ValueId, ValueId> = HashMap::with_capacity(g.node_count());
    for v in g.topo_order()? {
        match step(g, v, &mut out, &map)? {
            Step::Copy => {
                let operands = mapped(g, v, &map)?;
                let nv = out.add_node_like(g.node(v), &operands)?;
                map.insert(v, nv);
            }
            Step::Use(nv) => {
                map.insert(v, nv);
            }
            Step::Skip => {}
            Step::Map(pairs) => map.extend(pairs),
        }
    }
    let lookup = |v: &ValueId, what: &str| {
        map.get(v).copied().ok_or_else(|| IrError::Invalid(format!("{what} lost its value in a rebuild")))
    };
    for (name, v) in g.outputs() {
        out.set_output(name, lookup(v, name)?);
    }
    for (name, v) in g.state_updates() {
        out.add_state_update(name, lookup(v, name)?);
    }
    Ok(out)
}

/// Of `operands`, those made at or after position `at` of `position` (the
/// graph's order), when each is made from values made before `at`, so that
/// it can be made again there (a kernel that moves up to `at` then finds its
/// operands); `None` when one is not (or is a leaf).
pub(crate) fn late_operands(
    g: &Graph,
    operands: &[ValueId],
    at: usize,
    position: &HashMap<ValueId, usize>,
) -> Option<Vec<ValueId>> {
    let mut late: Vec<ValueId> = operands.iter().copied().filter(|o| position[o] >= at).collect();
    // Once each, however often it is read.
    late.sort_unstable_by_key(|o| position[o]);
    late.dedup();
    let movable = |o: &ValueId| !g.node(*o).op.is_leaf() && g.operands(*o).iter().all(|i| position[i] < at);
    late.iter().all(movable).then_some(late)
}

/// Makes `late` (see `late_operands`) again in `new`, operands mapped;
/// returns the (old, new) pairs, for a rebuild that skips them where they
/// stood.
pub(crate) fn remake(
    old: &Graph,
    late: &[ValueId],
    new: &mut Graph,
    map: &HashMap<ValueId, ValueId>,
) -> Result<Vec<(ValueId, ValueId)>, IrError> {
    late.iter().map(|&h| Ok((h, new.add_node_like(old.node(h), &mapped(old, h, map)?)?))).collect()
}

/// `o`'s new id: from `pairs` (made in this step) or the map.
pub(crate) fn mapped_with(o: ValueId, pairs: &[(ValueId, ValueId)], map: &HashMap<ValueId, ValueId>) -> ValueId {
    pairs.iter().find(|(h, _)| *h == o).map_or_else(|| map[&o], |&(_, n)| n)
}

/// The new ids of `v`'s operands.
pub(crate) fn mapped(g: &Graph, v: ValueId, map: &HashMap<ValueId, ValueId>) -> Result<Vec<ValueId>, IrError> {
    g.operands(v)
        .iter()
        .map(|o| {
            map.get(o).copied().ok_or_else(|| {
                IrError::Invalid(format!("{} reads a value that was skipped in a rebuild", g.node(v).op.name()))
            })
        })
        .collect()
}
