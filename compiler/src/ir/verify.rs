//! The IR verifier: the invariants listed in `ir/mod.rs`, checked after
//! building a graph and after every pass (tinygrad-style spec checks), so a
//! broken pass fails at the pass and not three stages later.

use super::graph::{Graph, ValueId};
use super::infer::infer;
use super::op::Op;
use super::IrError;
use petgraph::Direction;
use std::collections::HashMap;

pub fn verify(g: &Graph) -> Result<(), IrError> {
    let pg = g.petgraph();
    if let Err(cycle) = petgraph::algo::toposort(pg, None) {
        let v = cycle.node_id();
        let node = g.node(v);
        return Err(IrError::Invalid(format!(
            "the graph has a cycle through {} ({} in `{}`)",
            g.value_name(v),
            node.op.name(),
            node.scope
        )));
    }
    let mut inputs: HashMap<&str, ValueId> = HashMap::new();
    let mut states: HashMap<&str, ValueId> = HashMap::new();
    for v in pg.node_indices() {
        let node = g.node(v);
        let duplicate = match &node.op {
            Op::Input { name } => inputs.insert(name, v).map(|_| ("input", name)),
            Op::Param { name, .. } | Op::Buffer { name, .. } => {
                states.insert(name, v).map(|_| ("parameter or buffer", name))
            }
            _ => None,
        };
        if let Some((what, name)) = duplicate {
            return Err(IrError::Duplicate { what, name: name.clone() });
        }
        check_node(g, v)?;
    }
    check_outputs(g)?;
    check_state_updates(g, &states)
}

/// Operand positions are exactly 0..n; leaves have none; the stored type is
/// what the op's shape rule infers.
fn check_node(g: &Graph, v: ValueId) -> Result<(), IrError> {
    let node = g.node(v);
    let mut positions: Vec<u32> =
        g.petgraph().edges_directed(v, Direction::Incoming).map(|e| e.weight().index).collect();
    positions.sort_unstable();
    // Naming needs a print order, so it is only computed for a message.
    let name = || g.value_name(v);
    if node.op.is_leaf() {
        if !positions.is_empty() {
            return Err(IrError::Invalid(format!("{} is a {} but has operands", name(), node.op.name())));
        }
        return Ok(());
    }
    if positions.iter().enumerate().any(|(i, &p)| p as usize != i) {
        return Err(IrError::Invalid(format!(
            "{} ({}) has operand positions {positions:?}; expected 0..{}",
            name(),
            node.op.name(),
            positions.len()
        )));
    }
    let operands = g.operands(v);
    let tys: Vec<_> = operands.iter().map(|&a| g.ty(a)).collect();
    let shape_error = |message: String| IrError::Shape { op: node.op.name(), scope: node.scope.clone(), message };
    let inferred = infer(&node.op, &tys).map_err(|e| shape_error(format!("{}: {e}", name())))?;
    if inferred != node.ty {
        return Err(shape_error(format!("{} is typed {} but its operands give {inferred}", name(), node.ty)));
    }
    Ok(())
}

fn check_outputs(g: &Graph) -> Result<(), IrError> {
    let mut seen = std::collections::HashSet::new();
    for (name, v) in g.outputs() {
        if !seen.insert(name) {
            return Err(IrError::Duplicate { what: "output", name: name.clone() });
        }
        if !g.petgraph().contains_node(*v) {
            return Err(IrError::Invalid(format!("output \"{name}\" refers to removed node {}", v.index())));
        }
    }
    Ok(())
}

/// Each update names an existing parameter or buffer, at most once, with exactly its type.
fn check_state_updates(g: &Graph, states: &HashMap<&str, ValueId>) -> Result<(), IrError> {
    let mut seen = std::collections::HashSet::new();
    for (buffer, v) in g.state_updates() {
        if !seen.insert(buffer) {
            return Err(IrError::Duplicate { what: "state update of buffer", name: buffer.clone() });
        }
        if !g.petgraph().contains_node(*v) {
            return Err(IrError::Invalid(format!("state update of @{buffer} refers to removed node {}", v.index())));
        }
        let target = match states.get(buffer.as_str()) {
            // Buffers take new values (queues, running stats); parameters take the
            // optimizer's update.
            Some(&b) => b,
            None => {
                return Err(IrError::Invalid(format!(
                    "state update targets @{buffer}, which is not a parameter or buffer of this graph"
                )))
            }
        };
        if g.ty(*v) != g.ty(target) {
            return Err(IrError::Invalid(format!(
                "state update of @{buffer} has type {} but the buffer is {}",
                g.ty(*v),
                g.ty(target)
            )));
        }
    }
    Ok(())
}

impl Graph {
    /// Checks the IR invariants; see [`verify`].
    pub fn verify(&self) -> Result<(), IrError> {
        verify(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::graph::Operand;
    use crate::ir::{BinaryOp, DType, Dim, Init, Shape, TensorType, UnaryOp};

    struct Ids {
        x: ValueId,
        w: ValueId,
        lin: ValueId,
        act: ValueId,
        pushed: ValueId,
    }

    /// input -> linear -> gelu, and a queue updated from the result.
    fn valid() -> (Graph, Ids) {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape(vec![Dim::B, Dim::Const(8)]), DType::F32).unwrap();
        let w = g
            .add_param("head.weight", TensorType::f32(Shape::consts(&[4, 8])), Init::LecunNormal, true, "head")
            .unwrap();
        let lin = g.add_op(Op::Linear, &[x, w], "head").unwrap();
        let act = g.add_op(Op::Unary(UnaryOp::Gelu), &[lin], "head").unwrap();
        let queue = g.add_buffer("loss.queue", TensorType::f32(Shape::consts(&[4, 32])), Init::Zeros, "loss").unwrap();
        let ptr = g.add_fill(0.0, TensorType::new(Shape::scalar(), DType::I64), "loss");
        let pushed = g.add_op(Op::QueuePush { world: 1 }, &[queue, ptr, act], "loss").unwrap();
        g.set_output("out", act);
        g.add_state_update("loss.queue", pushed);
        (g, Ids { x, w, lin, act, pushed })
    }

    fn message(g: &Graph) -> String {
        g.verify().expect_err("verify accepted a corrupt graph").to_string()
    }

    #[test]
    fn valid_graph_passes() {
        let (g, _) = valid();
        assert_eq!(g.verify(), Ok(()));
        assert_eq!(verify(&Graph::new()), Ok(()));
    }

    #[test]
    fn wrong_stored_type() {
        let (mut g, ids) = valid();
        g.node_mut(ids.act).ty = TensorType::f32(Shape(vec![Dim::B, Dim::Const(5)]));
        assert_eq!(message(&g), "gelu in `head`: %2 is typed [B,5] f32 but its operands give [B,4] f32");
    }

    #[test]
    fn operand_no_longer_fits() {
        let (mut g, ids) = valid();
        g.node_mut(ids.w).ty = TensorType::f32(Shape::consts(&[4, 9]));
        assert_eq!(
            message(&g),
            "linear in `head`: %1: input last dim 8 does not match weight in_features 9 (input [B,8], weight [4,9])"
        );
    }

    #[test]
    fn duplicate_names() {
        let (mut g, ids) = valid();
        g.node_mut(ids.w).op = Op::Buffer { name: "loss.queue".into(), init: Init::Zeros };
        assert_eq!(message(&g), "duplicate parameter or buffer `loss.queue`");

        let (mut g, _) = valid();
        let node = g.node(g.inputs()[0].0).clone();
        g.g.add_node(node);
        assert_eq!(message(&g), "duplicate input `x`");
    }

    #[test]
    fn cycle() {
        let (mut g, ids) = valid();
        g.g.add_edge(ids.act, ids.lin, Operand { index: 2 });
        assert_eq!(message(&g), "invalid IR: the graph has a cycle through %3 (gelu in `head`)");
    }

    #[test]
    fn operand_positions_and_leaf_operands() {
        let (mut g, ids) = valid();
        let edge = g.g.find_edge(ids.x, ids.lin).unwrap();
        g.g[edge].index = 2;
        assert_eq!(message(&g), "invalid IR: %1 (linear) has operand positions [1, 2]; expected 0..2");

        let (mut g, ids) = valid();
        g.g.add_edge(ids.x, ids.w, Operand { index: 0 });
        assert_eq!(message(&g), "invalid IR: @head.weight is a param but has operands");
    }

    #[test]
    fn outputs_must_be_live_and_unique() {
        let (mut g, ids) = valid();
        g.set_output("out", ids.lin);
        assert_eq!(message(&g), "duplicate output `out`");

        let (mut g, ids) = valid();
        g.set_output("dead", ids.pushed);
        g.state_updates.clear();
        g.remove_node(ids.pushed);
        assert_eq!(message(&g), "invalid IR: output \"dead\" refers to removed node 6");
    }

    #[test]
    fn bad_state_updates() {
        let (mut g, ids) = valid();
        g.add_state_update("loss.missing", ids.pushed);
        assert_eq!(
            message(&g),
            "invalid IR: state update targets @loss.missing, which is not a parameter or buffer of this graph"
        );

        let (mut g, ids) = valid();
        g.add_state_update("head.weight", ids.pushed);
        assert_eq!(
            message(&g),
            "invalid IR: state update of @head.weight has type [4,32] f32 but the buffer is [4,8] f32"
        );

        let (mut g, ids) = valid();
        g.state_updates.clear();
        g.add_state_update("loss.queue", ids.act);
        assert_eq!(
            message(&g),
            "invalid IR: state update of @loss.queue has type [B,4] f32 but the buffer is [4,32] f32"
        );

        let (mut g, ids) = valid();
        g.add_state_update("loss.queue", ids.pushed);
        assert_eq!(message(&g), "duplicate state update of buffer `loss.queue`");

        let (mut g, ids) = valid();
        let doubled = g.add_op(Op::Binary(BinaryOp::Add), &[ids.pushed, ids.pushed], "loss").unwrap();
        g.remove_node(doubled);
        g.state_updates[0].1 = doubled;
        assert_eq!(message(&g), "invalid IR: state update of @loss.queue refers to removed node 7");
    }
}
