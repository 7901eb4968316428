//! GELU into the matrix products around it (an MLP's hidden layer).
//!
//! Rule `gelu-into-readers`: a GELU whose every reader is a linear layer
//! (as its input) or, through one reshape, a matrix product (as its right
//! operand, the weight gradient) is applied by those readers as they load
//! it: `gelu_linear(z, w, b)` and `matmul_gelu_rhs(a, reshape(z))`. Why: the
//! hidden activation, 4·D per token, is then never stored; its pre-activation
//! `z` is kept for the backward pass anyway.
//!
//! Rule `gelu-grad-epilogue`: `gelu_grad(z, a @ b)`, where nothing else reads
//! the product, becomes `matmul_gelu_grad(a, b, z)`. Why: the gradient is
//! scaled by GELU'(z) as the product is written, one pass over memory fewer.

use super::{rebuild, Step};
use crate::ir::{Graph, IrError, Op, UnaryOp, ValueId};
use std::collections::{HashMap, HashSet};

fn is_gelu(g: &Graph, v: ValueId) -> bool {
    matches!(g.node(v).op, Op::Unary(UnaryOp::Gelu))
}

/// Whether every reader of GELU `v` can apply it on load.
fn foldable(g: &Graph, v: ValueId, pinned: &HashSet<ValueId>) -> bool {
    if pinned.contains(&v) {
        return false;
    }
    let users = g.users(v);
    !users.is_empty()
        && users.iter().all(|&u| match g.node(u).op {
            Op::Linear => g.operands(u)[0] == v && g.operands(u)[1..].iter().all(|&o| o != v),
            Op::Reshape { .. } => {
                !pinned.contains(&u)
                    && !g.users(u).is_empty()
                    && g.users(u).iter().all(|&m| {
                        matches!(g.node(m).op, Op::Matmul { .. })
                            && g.operands(m) == [g.operands(m)[0], u]
                            && g.operands(m)[0] != u
                    })
            }
            _ => false,
        })
}

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let pinned: HashSet<ValueId> = g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect();
    let folded: HashSet<ValueId> =
        g.node_ids().into_iter().filter(|&v| is_gelu(g, v) && foldable(g, v, &pinned)).collect();
    // Products read only by a gelu_grad as its gradient operand: epilogue candidates.
    let mut epilogue: HashMap<ValueId, ValueId> = HashMap::new(); // gelu_grad -> matmul
    for v in g.node_ids() {
        if !matches!(g.node(v).op, Op::GeluGrad) {
            continue;
        }
        let [_, d] = g.operands(v)[..] else { continue };
        if matches!(g.node(d).op, Op::Matmul { .. }) && g.users(d) == [v] && !pinned.contains(&d) {
            epilogue.insert(v, d);
        }
    }
    let products: HashSet<ValueId> = epilogue.values().copied().collect();
    let (mut into_linear, mut into_matmul) = (0, 0);
    *g = rebuild(g, |old, v, new, map| {
        let node = old.node(v);
        if folded.contains(&v) || products.contains(&v) {
            return Ok(Step::Skip);
        }
        let operands = old.operands(v);
        let pre = |x: ValueId| old.operands(x)[0];
        match node.op {
            Op::Linear if folded.contains(&operands[0]) => {
                let mut args = vec![map[&pre(operands[0])]];
                args.extend(operands[1..].iter().map(|o| map[o]));
                into_linear += 1;
                Ok(Step::Use(new.add_op(Op::GeluLinear, &args, &node.scope)?))
            }
            Op::Reshape { ref shape } if folded.contains(&operands[0]) => Ok(Step::Use(new.add_op(
                Op::Reshape { shape: shape.clone() },
                &[map[&pre(operands[0])]],
                &node.scope,
            )?)),
            Op::Matmul { transpose_a, transpose_b }
                if operands.len() == 2
                    && old.node(operands[1]).op.name() == "reshape"
                    && folded.contains(&pre(operands[1])) =>
            {
                into_matmul += 1;
                let args = [map[&operands[0]], map[&operands[1]]];
                Ok(Step::Use(new.add_op(Op::MatmulGeluRhs { transpose_a, transpose_b }, &args, &node.scope)?))
            }
            Op::GeluGrad if epilogue.contains_key(&v) => {
                let d = epilogue[&v];
                let Op::Matmul { transpose_a, transpose_b } = old.node(d).op else { unreachable!("checked above") };
                let ab = old.operands(d);
                let args = [map[&ab[0]], map[&ab[1]], map[&operands[0]]];
                Ok(Step::Use(new.add_op(Op::MatmulGeluGrad { transpose_a, transpose_b }, &args, &node.scope)?))
            }
            _ => Ok(Step::Copy),
        }
    })?;
    Ok(format!(
        "{} GELUs applied by their readers ({into_linear} linear, {into_matmul} weight-gradient products); {} GELU gradients as product epilogues",
        folded.len(),
        products.len()
    ))
}

#[cfg(test)]
mod tests {
    use crate::ir::{DType, Graph, Init, Op, Shape, TensorType, UnaryOp};

    /// An MLP hidden layer and the two products of its backward.
    #[test]
    fn mlp_gelu_moves_into_its_readers() {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[2, 3, 4]), DType::F32).unwrap();
        let dy = g.add_input("dy", Shape::consts(&[6, 5]), DType::F32).unwrap();
        let w1 = g.add_param("w1", TensorType::f32(Shape::consts(&[8, 4])), Init::Zeros, true, "").unwrap();
        let w2 = g.add_param("w2", TensorType::f32(Shape::consts(&[5, 8])), Init::Zeros, true, "").unwrap();
        let z = g.add_op(Op::Linear, &[x, w1], "").unwrap();
        let h = g.add_op(Op::Unary(UnaryOp::Gelu), &[z], "").unwrap();
        let y = g.add_op(Op::Linear, &[h, w2], "").unwrap();
        let h2 = g.add_op(Op::Reshape { shape: Shape::consts(&[6, 8]) }, &[h], "").unwrap();
        let dw2 = g.add_op(Op::Matmul { transpose_a: true, transpose_b: false }, &[dy, h2], "").unwrap();
        let dh = g.add_op(Op::matmul(), &[dy, w2], "").unwrap();
        let z2 = g.add_op(Op::Reshape { shape: Shape::consts(&[6, 8]) }, &[z], "").unwrap();
        let dz = g.add_op(Op::GeluGrad, &[z2, dh], "").unwrap();
        for (n, v) in [("y", y), ("dw2", dw2), ("dz", dz)] {
            g.set_output(n, v);
        }
        let report = super::run(&mut g).unwrap();
        g.verify().unwrap();
        assert!(
            report.starts_with("1 GELUs applied by their readers (1 linear, 1 weight-gradient products); 1 GELU"),
            "{report}"
        );
        let ops: Vec<&str> = g.node_ids().iter().map(|&v| g.node(v).op.name()).collect();
        assert!(!ops.contains(&"gelu") && !ops.contains(&"gelu_grad"), "{ops:?}");
        for want in ["gelu_linear", "matmul_gelu_rhs", "matmul_gelu_grad"] {
            assert!(ops.contains(&want), "{want} missing: {ops:?}");
        }
    }
}
