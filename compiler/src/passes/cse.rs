//! Common-subexpression elimination: nodes with the same op (attributes
//! included), the same operands and the same type are one value. Every op is
//! a pure function of its operands (random ops of their key too, which is an
//! attribute), so merging never changes a result. Parameters, buffers and
//! inputs are unique by name and are never merged.

use super::{mapped, rebuild, Step};
use crate::ir::{Graph, IrError, Op, ValueId};
use std::collections::HashMap;

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let mut seen: HashMap<String, ValueId> = HashMap::new();
    let mut merged = 0;
    *g = rebuild(g, |old, v, new, map| {
        let node = old.node(v);
        if matches!(node.op, Op::Input { .. } | Op::Param { .. } | Op::Buffer { .. }) {
            return Ok(Step::Copy);
        }
        let operands = mapped(old, v, map)?;
        // Debug forms print f64 attributes exactly (shortest round trip).
        let ids: Vec<usize> = operands.iter().map(|o| o.index()).collect();
        let key = format!("{:?}|{ids:?}|{}", node.op, node.ty);
        if let Some(&existing) = seen.get(&key) {
            merged += 1;
            return Ok(Step::Use(existing));
        }
        let nv = new.add_node_like(node, &operands)?;
        seen.insert(key, nv);
        Ok(Step::Use(nv))
    })?;
    Ok(format!("merged {merged} duplicate nodes"))
}

#[cfg(test)]
mod tests {
    use crate::ir::{BinaryOp, DType, Graph, Op, Shape, UnaryOp};

    #[test]
    fn duplicates_merge_and_distinct_attributes_do_not() {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[4]), DType::F32).unwrap();
        let a = g.add_op(Op::Unary(UnaryOp::Exp), &[x], "").unwrap();
        let b = g.add_op(Op::Unary(UnaryOp::Exp), &[x], "").unwrap();
        let c = g.add_op(Op::Scale { factor: 2.0 }, &[a], "").unwrap();
        let d = g.add_op(Op::Scale { factor: 2.0 }, &[b], "").unwrap();
        let e = g.add_op(Op::Scale { factor: 3.0 }, &[b], "").unwrap();
        let s = g.add_op(Op::Binary(BinaryOp::Add), &[c, d], "").unwrap();
        let t = g.add_op(Op::Binary(BinaryOp::Add), &[s, e], "").unwrap();
        g.set_output("y", t);
        let report = super::run(&mut g).unwrap();
        assert_eq!(report, "merged 2 duplicate nodes");
        // x, exp, scale 2, scale 3, add, add.
        assert_eq!(g.node_count(), 6);
        g.verify().unwrap();
    }
}
