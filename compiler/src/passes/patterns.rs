//! Recognising hand-written forms of first-class ops, on the forward graph
//! (before autodiff, so the backward pass is the op's own rule):
//!
//! Rule `attention-pattern`: `softmax((q @ k^T) * s) @ v` (k^T a transpose of
//! the last two dims or a transposed product; the scale on the scores or on
//! q; optional dropout on the probabilities) is `attention(q, k, v, s, p)`.
//! Why: one kernel that never stores the N x N scores, and its backward
//! recomputes them per head instead of keeping them.
//!
//! Rule `cross-entropy-pattern`: `-mean_n sum_k t * log_softmax(x)` (either
//! order of the negation and the mean) is `cross_entropy(x, t)` with soft
//! targets. Why: one kernel (and one for its gradient) instead of five,
//! with the log-sum-exp kept in f32.
//!
//! Every intermediate value must have no other reader and must not be a
//! graph output, or the rewrite would lose it.

use super::{rebuild, Step};
use crate::ir::{BinaryOp, Graph, IrError, Op, ReduceOp, UnaryOp, ValueId};
use std::collections::{HashMap, HashSet};

/// `v` read by exactly one op and not named.
fn private(g: &Graph, v: ValueId, pinned: &HashSet<ValueId>) -> bool {
    !pinned.contains(&v) && g.users(v).len() == 1 && !g.node(v).op.is_leaf()
}

fn pinned(g: &Graph) -> HashSet<ValueId> {
    g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect()
}

/// A matched attention: its operands, attributes and the ops it replaces.
struct Attn {
    q: ValueId,
    k: ValueId,
    v: ValueId,
    scale: f64,
    dropout: f64,
    key: Option<u32>,
    replaced: Vec<ValueId>,
}

fn match_attention(g: &Graph, out: ValueId, pin: &HashSet<ValueId>) -> Option<Attn> {
    let Op::Matmul { transpose_a: false, transpose_b: false } = g.node(out).op else { return None };
    let [probs, v] = g.operands(out)[..] else { return None };
    let mut replaced = vec![];
    let (mut p, mut dropout, mut key) = (probs, 0.0, None);
    if let Op::Dropout { p: rate, key: k } = g.node(probs).op {
        if !private(g, probs, pin) {
            return None;
        }
        replaced.push(probs);
        (p, dropout, key) = (g.operands(probs)[0], rate, Some(k));
    }
    let Op::Softmax { axis } = g.node(p).op else { return None };
    if !private(g, p, pin) || axis + 1 != g.ty(p).shape.rank() {
        return None;
    }
    replaced.push(p);
    let mut scores = g.operands(p)[0];
    let mut scale = 1.0;
    if let Op::Scale { factor } = g.node(scores).op {
        if !private(g, scores, pin) {
            return None;
        }
        replaced.push(scores);
        scale = factor;
        scores = g.operands(scores)[0];
    }
    let Op::Matmul { transpose_a: false, transpose_b } = g.node(scores).op else { return None };
    if !private(g, scores, pin) {
        return None;
    }
    replaced.push(scores);
    let [mut q, kk] = g.operands(scores)[..] else { return None };
    let k = if transpose_b {
        kk
    } else {
        // k^T written as a transpose of the last two dims.
        let Op::Permute { ref perm } = g.node(kk).op else { return None };
        let r = perm.len();
        let swaps_last_two = r >= 2
            && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p)
            && perm[r - 2] == r - 1
            && perm[r - 1] == r - 2;
        if !swaps_last_two || !private(g, kk, pin) {
            return None;
        }
        replaced.push(kk);
        g.operands(kk)[0]
    };
    if let Op::Scale { factor } = g.node(q).op {
        if private(g, q, pin) {
            replaced.push(q);
            scale *= factor;
            q = g.operands(q)[0];
        }
    }
    // Only where attention's shape rule gives the product's exact type.
    let op = Op::Attention { scale, dropout, key: 0 };
    if crate::ir::infer(&op, &[g.ty(q), g.ty(k), g.ty(v)]).ok().as_ref() != Some(g.ty(out)) {
        return None;
    }
    Some(Attn { q, k, v, scale, dropout, key, replaced })
}

pub(super) fn attention(g: &mut Graph) -> Result<String, IrError> {
    let pin = pinned(g);
    let mut matches: HashMap<ValueId, Attn> = HashMap::new();
    for v in g.node_ids() {
        if let Some(m) = match_attention(g, v, &pin) {
            matches.insert(v, m);
        }
    }
    let replaced: HashSet<ValueId> = matches.values().flat_map(|m| m.replaced.iter().copied()).collect();
    // A fresh random-stream key for attention without dropout (unused, but unique).
    let mut next_key = g
        .node_ids()
        .iter()
        .filter_map(|&v| match g.node(v).op {
            Op::Dropout { key, .. } | Op::DropPath { key, .. } | Op::Attention { key, .. } => Some(key),
            _ => None,
        })
        .max()
        .map_or(1, |k| k + 1);
    let mut found = 0;
    *g = rebuild(g, |old, v, new, map| {
        if replaced.contains(&v) {
            return Ok(Step::Skip);
        }
        let Some(m) = matches.get(&v) else { return Ok(Step::Copy) };
        let key = m.key.unwrap_or_else(|| {
            next_key += 1;
            next_key - 1
        });
        let op = Op::Attention { scale: m.scale, dropout: m.dropout, key };
        found += 1;
        Ok(Step::Use(new.add_op(op, &[map[&m.q], map[&m.k], map[&m.v]], &old.node(v).scope)?))
    })?;
    Ok(format!("{found} hand-written attentions recognised"))
}

/// Whether a gradient could flow from `v` back to a trainable parameter
/// (the ops that block it are those `autodiff::backward` treats so).
fn carries_gradient(g: &Graph, v: ValueId) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![v];
    while let Some(u) = stack.pop() {
        if !seen.insert(u) {
            continue;
        }
        match g.node(u).op {
            Op::Param { trainable, .. } if trainable => return true,
            Op::StopGradient | Op::AllReduce { .. } | Op::QueuePush { .. } | Op::QueueAdvance { .. } => {}
            _ => stack.extend(g.operands(u)),
        }
    }
    false
}

/// `x` and `t` of `-mean_n sum_k t * log_softmax(x)`, and the ops it replaces.
/// The cross_entropy op gives its target no gradient, so a target that
/// would carry one (it depends on a trainable parameter) is left as written.
fn match_cross_entropy(g: &Graph, out: ValueId, pin: &HashSet<ValueId>) -> Option<(ValueId, ValueId, Vec<ValueId>)> {
    let negation = |v: ValueId| match g.node(v).op {
        Op::Unary(UnaryOp::Neg) => true,
        Op::Scale { factor } => factor == -1.0,
        _ => false,
    };
    let mean0 = |v: ValueId| matches!(g.node(v).op, Op::Reduce { op: ReduceOp::Mean, ref axes, keepdim: false } if axes == &[0]);
    // Either neg(mean(s)) or mean(neg(s)).
    let inner = g.operands(out).first().copied()?;
    let matched = (negation(out) && mean0(inner)) || (mean0(out) && negation(inner));
    if !matched || !private(g, inner, pin) {
        return None;
    }
    let sum = g.operands(inner)[0];
    let Op::Reduce { op: ReduceOp::Sum, ref axes, keepdim: false } = g.node(sum).op else { return None };
    if axes != &[1] || !private(g, sum, pin) {
        return None;
    }
    let prod = g.operands(sum)[0];
    let Op::Binary(BinaryOp::Mul) = g.node(prod).op else { return None };
    if !private(g, prod, pin) {
        return None;
    }
    let [a, b] = g.operands(prod)[..] else { return None };
    let (ls, t) = if matches!(g.node(a).op, Op::LogSoftmax { .. }) { (a, b) } else { (b, a) };
    let Op::LogSoftmax { axis: 1 } = g.node(ls).op else { return None };
    if !private(g, ls, pin) {
        return None;
    }
    let x = g.operands(ls)[0];
    let same = g.ty(x).shape.rank() == 2 && g.ty(t).shape == g.ty(x).shape && g.ty(t).dtype.is_float();
    let op = Op::CrossEntropy { label_smoothing: 0.0 };
    let fits = crate::ir::infer(&op, &[g.ty(x), g.ty(t)]).ok().as_ref() == Some(g.ty(out));
    (same && fits && !carries_gradient(g, t)).then(|| (x, t, vec![inner, sum, prod, ls]))
}

pub(super) fn cross_entropy(g: &mut Graph) -> Result<String, IrError> {
    let pin = pinned(g);
    let mut matches: HashMap<ValueId, (ValueId, ValueId)> = HashMap::new();
    let mut replaced: HashSet<ValueId> = HashSet::new();
    for v in g.node_ids() {
        if let Some((x, t, r)) = match_cross_entropy(g, v, &pin) {
            matches.insert(v, (x, t));
            replaced.extend(r);
        }
    }
    let found = matches.len();
    *g = rebuild(g, |old, v, new, map| {
        if replaced.contains(&v) {
            return Ok(Step::Skip);
        }
        let Some(&(x, t)) = matches.get(&v) else { return Ok(Step::Copy) };
        let op = Op::CrossEntropy { label_smoothing: 0.0 };
        Ok(Step::Use(new.add_op(op, &[map[&x], map[&t]], &old.node(v).scope)?))
    })?;
    Ok(format!("{found} hand-written cross-entropies recognised"))
}
