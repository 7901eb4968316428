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

pub use step::{training_step, Optimizer, StepOptions};

use crate::ir::{BinaryOp, Graph, IrError, Op, ValueId};
use rules::Builder;
use std::collections::HashMap;

/// Appends the backward pass of scalar `loss` to `g`; returns the gradient of
/// every trainable parameter that the loss depends on, by parameter name, in
/// parameter order.
pub fn backward(g: &mut Graph, loss: ValueId) -> Result<Vec<(String, ValueId)>, IrError> {
    if g.ty(loss).shape.rank() != 0 {
        return Err(IrError::Invalid(format!("the loss must be a scalar, got {}", g.ty(loss).shape)));
    }
    let order = petgraph::algo::toposort(g.petgraph(), None)
        .map_err(|_| IrError::Invalid("the forward graph has a cycle".into()))?;
    // Values that depend on a trainable parameter through differentiable ops.
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
    let mut grad: HashMap<ValueId, ValueId> = HashMap::new();
    let seed = g.add_fill(1.0, g.ty(loss).clone(), "loss");
    grad.insert(loss, seed);
    for &v in order.iter().rev() {
        let Some(&dy) = grad.get(&v) else { continue };
        if !needs[&v] || g.node(v).op.is_leaf() {
            continue;
        }
        let xs = g.operands(v);
        let scope = g.node(v).scope.clone();
        let mut b = Builder { g, scope };
        let dxs = rules::grads(&mut b, v, &xs, dy).map_err(|e| match e {
            IrError::Invalid(m) => IrError::Invalid(format!("{m} (in `{}`)", g.node(v).scope)),
            e => e,
        })?;
        for (x, dx) in xs.iter().zip(dxs) {
            let Some(dx) = dx else { continue };
            if !needs[x] {
                continue;
            }
            let acc = match grad.get(x) {
                Some(&prev) => {
                    let scope = g.node(*x).scope.clone();
                    g.add_op(Op::Binary(BinaryOp::Add), &[prev, dx], &scope)?
                }
                None => dx,
            };
            grad.insert(*x, acc);
        }
    }
    Ok(g.params()
        .into_iter()
        .filter(|(_, _, trainable)| *trainable)
        .filter_map(|(v, name, _)| grad.get(&v).map(|&d| (name.to_string(), d)))
        .collect())
}
