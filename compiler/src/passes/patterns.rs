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
//! Rule `gated-attention-pattern`: ConViT's gated positional self-attention
//! `((1 - g) softmax(q k^T s) + g P) / sum(...) @ v` (no attention dropout)
//! is `(1 - g) attention(q, k, v, s) + g (P @ v)`: the product distributes
//! over the mix, and the renormalising sum is (1 - g) + g = 1 up to
//! rounding. Why: the N x N content probabilities are never stored (the
//! positional ones are per head, not per sample), so it costs about what
//! ViT attention costs.
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
    let (q, k, scale) = match_probabilities(g, p, pin, &mut replaced)?;
    // Only where attention's shape rule gives the product's exact type.
    let op = Op::Attention { scale, dropout, key: 0 };
    if crate::ir::infer(&op, &[g.ty(q), g.ty(k), g.ty(v)]).ok().as_ref() != Some(g.ty(out)) {
        return None;
    }
    Some(Attn { q, k, v, scale, dropout, key, replaced })
}

/// `p = softmax((q @ k^T) * s)` over the last axis, all private: (q, k, s),
/// with the matched ops appended to `replaced`.
fn match_probabilities(
    g: &Graph,
    p: ValueId,
    pin: &HashSet<ValueId>,
    replaced: &mut Vec<ValueId>,
) -> Option<(ValueId, ValueId, f64)> {
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
    Some((q, k, scale))
}

/// A random-stream key no op of `g` uses (new attention ops take one even
/// without dropout, so keys stay unique).
fn unused_key(g: &Graph) -> u32 {
    g.node_ids()
        .iter()
        .filter_map(|&v| match g.node(v).op {
            Op::Dropout { key, .. } | Op::DropPath { key, .. } | Op::Attention { key, .. } => Some(key),
            _ => None,
        })
        .max()
        .map_or(1, |k| k + 1)
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
    let mut next_key = unused_key(g);
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

/// A matched gated attention (ConViT's GPSA without attention dropout).
struct Gated {
    q: ValueId,
    k: ValueId,
    v: ValueId,
    scale: f64,
    /// The gate g ([.., H, 1, 1]) and 1 - g, as they are in the graph.
    gate: ValueId,
    one_minus_gate: ValueId,
    /// The positional probabilities ([1, H, N, N]).
    positional: ValueId,
    replaced: Vec<ValueId>,
}

/// `((1 - g) * softmax(q k^T s) + g * P) / sum(...) @ v`, ConViT's gated
/// positional self-attention, with no dropout on the mixed probabilities.
fn match_gated(g: &Graph, out: ValueId, pin: &HashSet<ValueId>) -> Option<Gated> {
    let Op::Matmul { transpose_a: false, transpose_b: false } = g.node(out).op else { return None };
    let [normed, v] = g.operands(out)[..] else { return None };
    let Op::Binary(BinaryOp::Div) = g.node(normed).op else { return None };
    let [mixed, total] = g.operands(normed)[..] else { return None };
    let r = g.ty(mixed).shape.rank();
    let sums_last =
        matches!(g.node(total).op, Op::Reduce { op: ReduceOp::Sum, ref axes, keepdim: true } if axes == &[r - 1]);
    if !private(g, normed, pin) || !sums_last || !private(g, total, pin) || g.operands(total) != [mixed] {
        return None;
    }
    // `mixed` is read by the sum and the division only.
    if pin.contains(&mixed) || g.users(mixed).len() != 2 {
        return None;
    }
    let Op::Binary(BinaryOp::Add) = g.node(mixed).op else { return None };
    let [t1, t2] = g.operands(mixed)[..] else { return None };
    let mut replaced = vec![normed, total, mixed];
    // Which product holds the content probabilities (a softmax of scores)?
    let factors = |t: ValueId| -> Option<(ValueId, ValueId)> {
        let Op::Binary(BinaryOp::Mul) = g.node(t).op else { return None };
        let [a, b] = g.operands(t)[..] else { return None };
        Some((a, b))
    };
    let ((c1, c2), (p1, p2)) = (factors(t1)?, factors(t2)?);
    for t in [t1, t2] {
        if !private(g, t, pin) {
            return None;
        }
        replaced.push(t);
    }
    let is_probs = |v: ValueId| matches!(g.node(v).op, Op::Softmax { .. });
    // Content term: (1 - g) * softmax(scores); positional: g * P.
    let (content_terms, positional_terms) =
        if is_probs(c1) || is_probs(c2) { ((c1, c2), (p1, p2)) } else { ((p1, p2), (c1, c2)) };
    let (one_minus_gate, probs) =
        if is_probs(content_terms.1) { content_terms } else { (content_terms.1, content_terms.0) };
    let (q, k, scale) = match_probabilities(g, probs, pin, &mut replaced)?;
    // 1 - g written as add_scalar(1, neg(g)) or add_scalar(1, scale(-1, g)).
    let Op::AddScalar { value } = g.node(one_minus_gate).op else { return None };
    let negated = g.operands(one_minus_gate)[0];
    let negates = matches!(g.node(negated).op, Op::Unary(UnaryOp::Neg))
        || matches!(g.node(negated).op, Op::Scale { factor } if factor == -1.0);
    if value != 1.0 || !negates {
        return None;
    }
    let gate = g.operands(negated)[0];
    let (pa, pb) = positional_terms;
    let positional = if pa == gate {
        pb
    } else if pb == gate {
        pa
    } else {
        return None;
    };
    // Shapes: content attention as the op takes it, the positional product
    // broadcasting over the batch, the gate over tokens.
    let op = Op::Attention { scale, dropout: 0.0, key: 0 };
    let content = crate::ir::infer(&op, &[g.ty(q), g.ty(k), g.ty(v)]).ok()?;
    let pos = crate::ir::infer(&Op::matmul(), &[g.ty(positional), g.ty(v)]).ok()?;
    if &content != g.ty(out) || &pos != g.ty(out) {
        return None;
    }
    Some(Gated { q, k, v, scale, gate, one_minus_gate, positional, replaced })
}

pub(super) fn gated_attention(g: &mut Graph) -> Result<String, IrError> {
    let pin = pinned(g);
    let mut matches: HashMap<ValueId, Gated> = HashMap::new();
    for v in g.node_ids() {
        if let Some(m) = match_gated(g, v, &pin) {
            matches.insert(v, m);
        }
    }
    let replaced: HashSet<ValueId> = matches.values().flat_map(|m| m.replaced.iter().copied()).collect();
    let mut next_key = unused_key(g);
    let found = matches.len();
    *g = rebuild(g, |old, v, new, map| {
        if replaced.contains(&v) {
            return Ok(Step::Skip);
        }
        let Some(m) = matches.get(&v) else { return Ok(Step::Copy) };
        let scope = old.node(v).scope.clone();
        next_key += 1;
        let op = Op::Attention { scale: m.scale, dropout: 0.0, key: next_key - 1 };
        let content = new.add_op(op, &[map[&m.q], map[&m.k], map[&m.v]], &scope)?;
        let positional = new.add_op(Op::matmul(), &[map[&m.positional], map[&m.v]], &scope)?;
        let a = new.add_op(Op::Binary(BinaryOp::Mul), &[map[&m.one_minus_gate], content], &scope)?;
        let b = new.add_op(Op::Binary(BinaryOp::Mul), &[map[&m.gate], positional], &scope)?;
        Ok(Step::Use(new.add_op(Op::Binary(BinaryOp::Add), &[a, b], &scope)?))
    })?;
    Ok(format!("{found} gated attentions split into content attention and positional product"))
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
