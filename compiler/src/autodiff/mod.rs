//! Reverse-mode autodiff as a graph transform, and the training step built
//! on it: forward + loss + backward + gradient clipping + optimizer update,
//! all in ONE graph (the brief's "training-step graph").
//!
//! Invariants: the forward graph is left as it was and the backward is
//! appended; only trainable parameters get gradients, and no gradient op is
//! created for a value that does not lead from a trainable parameter to the
//! loss (frozen parameters cost no backward work); the result verifies.

mod rules;
mod step;

pub use step::{bias_correction_inputs, temp_frozen, training_step, Optimizer, StepOptions};

use crate::ir::{BinaryOp, Dim, Graph, IrError, Op, ValueId};
use rules::Builder;
use std::collections::HashMap;

/// Appends the backward pass of scalar `loss` to `g`; returns the gradient of
/// every trainable parameter that the loss depends on, by parameter name, in
/// parameter order.
pub fn backward(g: &mut Graph, loss: ValueId) -> Result<Vec<(String, ValueId)>, IrError> {
    if g.ty(loss).shape.rank() != 0 {
        return Err(IrError::Invalid(format!("the loss must be a scalar, got {}", g.ty(loss).shape)));
    }
    let (order, needs) = gradient_flow(g)?;
    let mut parts: HashMap<ValueId, Vec<Part>> = HashMap::new();
    let mut grad: HashMap<ValueId, ValueId> = HashMap::new();
    let seed = g.add_fill(1.0, g.ty(loss).clone(), "loss");
    parts.insert(loss, vec![Part::Full(seed)]);
    for &v in order.iter().rev() {
        let Some(ps) = parts.remove(&v) else { continue };
        let dy = gather(g, v, ps)?;
        grad.insert(v, dy);
        if !needs[&v] || g.node(v).op.is_leaf() {
            continue;
        }
        let xs = g.operands(v);
        // A slice's gradient waits for its siblings: slices that tile their input
        // become one concat instead of zero-padded pieces added together.
        if let Op::Slice { axis, start, end } = g.node(v).op {
            if needs[&xs[0]] {
                parts.entry(xs[0]).or_default().push(Part::Slice { axis, start, end, dy });
            }
            continue;
        }
        let scope = g.node(v).scope.clone();
        let mut b = Builder { g, scope };
        let dxs = rules::grads(&mut b, v, &xs, dy).map_err(|e| match e {
            IrError::Invalid(m) => IrError::Invalid(format!("{m} (in `{}`)", g.node(v).scope)),
            e => e,
        })?;
        for (x, dx) in xs.iter().zip(dxs) {
            if let Some(dx) = dx.filter(|_| needs[x]) {
                parts.entry(*x).or_default().push(Part::Full(dx));
            }
        }
    }
    Ok(g.params()
        .into_iter()
        .filter(|(_, _, trainable)| *trainable)
        .filter_map(|(v, name, _)| grad.get(&v).map(|&d| (name.to_string(), d)))
        .collect())
}

/// The forward graph in topological order, and for each value whether it
/// depends on a trainable parameter through differentiable ops.
fn gradient_flow(g: &Graph) -> Result<(Vec<ValueId>, HashMap<ValueId, bool>), IrError> {
    let order = petgraph::algo::toposort(g.petgraph(), None)
        .map_err(|_| IrError::Invalid("the forward graph has a cycle".into()))?;
    let mut needs: HashMap<ValueId, bool> = HashMap::new();
    for &v in &order {
        let n = g.node(v);
        let flows = match &n.op {
            Op::Param { trainable, .. } => *trainable,
            Op::StopGradient | Op::AllReduce { .. } | Op::QueuePush { .. } | Op::QueueAdvance { .. } => false,
            Op::Input { .. } | Op::Buffer { .. } | Op::Fill { .. } => false,
            _ => g.operands(v).iter().any(|o| needs[o]),
        };
        needs.insert(v, flows);
    }
    Ok((order, needs))
}

/// Whether some trainable parameter reaches `loss` through differentiable
/// ops, i.e. whether a training step would update anything.
pub fn loss_has_gradient(g: &Graph, loss: ValueId) -> Result<bool, IrError> {
    Ok(gradient_flow(g)?.1.get(&loss).copied().unwrap_or(false))
}

/// One contribution to a value's gradient.
enum Part {
    Full(ValueId),
    /// The gradient of `x[start..end]` along `axis`.
    Slice {
        axis: usize,
        start: Dim,
        end: Dim,
        dy: ValueId,
    },
}

/// Sums the contributions to the gradient of `x`. Slices along one axis that
/// tile it exactly are concatenated (the backward of a qkv split is one copy,
/// not three zero-padded tensors added); any other mix is padded and added.
fn gather(g: &mut Graph, x: ValueId, mut ps: Vec<Part>) -> Result<ValueId, IrError> {
    let scope = g.node(x).scope.clone();
    let full_dim = |g: &Graph, axis: usize| g.ty(x).shape.0[axis];
    let tiles = ps.len() > 1
        && match &ps[0] {
            Part::Slice { axis, .. } => {
                let axis = *axis;
                let mut pieces: Vec<(Dim, Dim)> = Vec::new();
                for p in &ps {
                    match p {
                        Part::Slice { axis: a, start, end, .. } if *a == axis => pieces.push((*start, *end)),
                        _ => return gather_added(g, x, ps, &scope),
                    }
                }
                pieces.sort();
                let mut at = Dim::Const(0);
                let covered = pieces.iter().all(|(s, e)| {
                    let ok = *s == at;
                    at = *e;
                    ok
                });
                covered && at == full_dim(g, axis)
            }
            Part::Full(_) => false,
        };
    if tiles {
        ps.sort_by_key(|p| match p {
            Part::Slice { start, .. } => *start,
            Part::Full(_) => Dim::Const(0),
        });
        let axis = match ps[0] {
            Part::Slice { axis, .. } => axis,
            Part::Full(_) => 0,
        };
        if let Some(whole) = restacked(g, x, &ps) {
            return Ok(whole);
        }
        let pieces: Vec<ValueId> = ps
            .iter()
            .map(|p| match p {
                Part::Slice { dy, .. } | Part::Full(dy) => *dy,
            })
            .collect();
        return g.add_op(Op::Concat { axis }, &pieces, &scope);
    }
    gather_added(g, x, ps, &scope)
}

/// When every piece's gradient is, through reshapes only, the same slice of
/// one tensor `s` of `x`'s type (the stacked dq, dk, dv of `AttentionGrad`
/// for a split qkv), the concatenation is `s` itself: no copy.
fn restacked(g: &Graph, x: ValueId, ps: &[Part]) -> Option<ValueId> {
    let mut whole = None;
    for p in ps {
        let Part::Slice { axis, start, end, dy } = *p else { return None };
        let mut v = dy;
        while let Op::Reshape { .. } = g.node(v).op {
            v = g.operands(v)[0];
        }
        let Op::Slice { axis: a, start: s, end: e } = g.node(v).op else { return None };
        let source = g.operands(v)[0];
        let same = a == axis && s == start && e == end && g.ty(v) == g.ty(dy) && g.ty(source) == g.ty(x);
        if !same || whole.is_some_and(|w| w != source) {
            return None;
        }
        whole = Some(source);
    }
    whole
}

fn gather_added(g: &mut Graph, x: ValueId, ps: Vec<Part>, scope: &str) -> Result<ValueId, IrError> {
    let mut total: Option<ValueId> = None;
    for p in ps {
        let d = match p {
            Part::Full(d) => d,
            Part::Slice { axis, start, end, dy } => {
                let full = g.ty(x).shape.0[axis];
                let after = full.sub(end).ok_or_else(|| IrError::Invalid("slice end past its dim".into()))?;
                g.add_op(Op::Pad { axis, before: start, after }, &[dy], scope)?
            }
        };
        total = Some(match total {
            None => d,
            Some(t) => g.add_op(Op::Binary(BinaryOp::Add), &[t, d], scope)?,
        });
    }
    total.ok_or_else(|| IrError::Invalid("a gradient with no contribution".into()))
}
