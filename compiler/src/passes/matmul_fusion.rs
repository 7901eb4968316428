//! Elementwise and normalisation work moved into the matrix products
//! around it (an MLP's hidden layer, a pre-norm block's layer norms).
//!
//! Rule `prologue-into-readers`: a GELU or a layer norm whose every reader
//! is a linear layer (as its input) or, through one reshape that keeps the
//! last dim, a matrix product (as its right operand: the weight gradient) is
//! applied by those readers as they load it: `gelu_linear(z, w, b)` and
//! `matmul_gelu_rhs(a, reshape(z))`; `layer_norm_linear(x, g, b, w, bias)`
//! and `matmul_layer_norm_rhs(a, reshape(x), g, b)`. Why: the hidden
//! activation (4·D per token) and the normalised block inputs are then never
//! stored; their inputs are kept for the backward pass anyway (the
//! pre-activation for GELU's gradient, the residual for the norm's).
//!
//! Rule `gelu-grad-epilogue`: `gelu_grad(z, a @ b)`, where nothing else reads
//! the product, becomes `matmul_gelu_grad(a, b, z)`. Why: the gradient is
//! scaled by GELU'(z) as the product is written, one pass over memory fewer.

use super::{rebuild, Step};
use crate::ir::{Graph, IrError, Op, UnaryOp, ValueId};
use std::collections::{HashMap, HashSet};

/// A value its readers can compute as they load it.
#[derive(Clone, Copy)]
enum Prologue {
    Gelu,
    LayerNorm { eps: f64 },
}

fn prologue(g: &Graph, v: ValueId) -> Option<Prologue> {
    match g.node(v).op {
        Op::Unary(UnaryOp::Gelu) => Some(Prologue::Gelu),
        Op::LayerNorm { eps } => Some(Prologue::LayerNorm { eps }),
        _ => None,
    }
}

/// Whether every reader of `v` can apply its op on load: linear layers (as
/// the input) and, through a reshape keeping the last dim, right operands
/// of matrix products.
fn foldable(g: &Graph, v: ValueId, pinned: &HashSet<ValueId>) -> bool {
    if pinned.contains(&v) {
        return false;
    }
    let last = g.ty(v).shape.last();
    let users = g.users(v);
    !users.is_empty()
        && users.iter().all(|&u| match g.node(u).op {
            Op::Linear => g.operands(u)[0] == v && g.operands(u)[1..].iter().all(|&o| o != v),
            // Only a flattening of the leading dims: the products read rows.
            Op::Reshape { ref shape } => {
                shape.rank() == 2
                    && shape.last() == last
                    && !pinned.contains(&u)
                    && !g.users(u).is_empty()
                    && g.users(u).iter().all(|&m| {
                        matches!(g.node(m).op, Op::Matmul { .. })
                            && g.operands(m).len() == 2
                            && g.operands(m)[1] == u
                            && g.operands(m)[0] != u
                    })
            }
            _ => false,
        })
}

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let pinned: HashSet<ValueId> = g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect();
    let folded: HashMap<ValueId, Prologue> = g
        .node_ids()
        .into_iter()
        .filter_map(|v| prologue(g, v).filter(|_| foldable(g, v, &pinned)).map(|p| (v, p)))
        .collect();
    // Products read only by a gelu_grad as its gradient operand: epilogue candidates.
    let mut epilogue: HashMap<ValueId, ValueId> = HashMap::new(); // gelu_grad -> matmul
    for v in g.node_ids() {
        if !matches!(g.node(v).op, Op::GeluGrad) {
            continue;
        }
        let [_, d] = g.operands(v)[..] else { continue };
        // A product already taking a prologue (its right operand a folded
        // value's reshape) keeps it; one fusion per product.
        let takes_prologue = g
            .operands(d)
            .get(1)
            .is_some_and(|&b| matches!(g.node(b).op, Op::Reshape { .. }) && folded.contains_key(&g.operands(b)[0]));
        if matches!(g.node(d).op, Op::Matmul { .. }) && g.users(d) == [v] && !pinned.contains(&d) && !takes_prologue {
            epilogue.insert(v, d);
        }
    }
    let products: HashSet<ValueId> = epilogue.values().copied().collect();
    let (mut into_linear, mut into_matmul) = (0, 0);
    *g = rebuild(g, |old, v, new, map| {
        let node = old.node(v);
        if folded.contains_key(&v) || products.contains(&v) {
            return Ok(Step::Skip);
        }
        let operands = old.operands(v);
        // The folded value's own operands, in the new graph.
        let inner = |x: ValueId| -> Vec<ValueId> { old.operands(x).iter().map(|o| map[o]).collect() };
        let id = match node.op {
            Op::Linear if folded.contains_key(&operands[0]) => {
                into_linear += 1;
                let mut args = inner(operands[0]);
                args.extend(operands[1..].iter().map(|o| map[o]));
                let op = match folded[&operands[0]] {
                    Prologue::Gelu => Op::GeluLinear,
                    Prologue::LayerNorm { eps } => Op::LayerNormLinear { eps },
                };
                new.add_op(op, &args, &node.scope)?
            }
            // The products read the folded value's input as rows themselves.
            Op::Reshape { .. } if folded.contains_key(&operands[0]) => return Ok(Step::Skip),
            Op::Matmul { transpose_a, transpose_b }
                if operands.len() == 2
                    && matches!(old.node(operands[1]).op, Op::Reshape { .. })
                    && folded.contains_key(&old.operands(operands[1])[0]) =>
            {
                into_matmul += 1;
                let a = map[&operands[0]];
                let folded_value = old.operands(operands[1])[0];
                let src = inner(folded_value);
                match folded[&folded_value] {
                    Prologue::Gelu => {
                        new.add_op(Op::MatmulGeluRhs { transpose_a, transpose_b }, &[a, src[0]], &node.scope)?
                    }
                    Prologue::LayerNorm { eps } => {
                        let op = Op::MatmulLayerNormRhs { eps, transpose_a, transpose_b };
                        new.add_op(op, &[a, src[0], src[1], src[2]], &node.scope)?
                    }
                }
            }
            Op::GeluGrad if epilogue.contains_key(&v) => {
                let d = epilogue[&v];
                let Op::Matmul { transpose_a, transpose_b } = old.node(d).op else { unreachable!("checked above") };
                let ab = old.operands(d);
                let args = [map[&ab[0]], map[&ab[1]], map[&operands[0]]];
                new.add_op(
                    Op::MatmulGeluGrad { transpose_a, transpose_b, row_sum: false, gelu: None },
                    &args,
                    &node.scope,
                )?
            }
            _ => return Ok(Step::Copy),
        };
        Ok(Step::Use(id))
    })?;
    let count = |want: fn(&Prologue) -> bool| folded.values().filter(|p| want(p)).count();
    Ok(format!(
        "{} GELUs and {} layer norms applied by their readers ({into_linear} linear, {into_matmul} weight-gradient products); {} GELU gradients as product epilogues",
        count(|p| matches!(p, Prologue::Gelu)),
        count(|p| matches!(p, Prologue::LayerNorm { .. })),
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
            report.starts_with(
                "1 GELUs and 0 layer norms applied by their readers (1 linear, 1 weight-gradient products)"
            ),
            "{report}"
        );
        let ops: Vec<&str> = g.node_ids().iter().map(|&v| g.node(v).op.name()).collect();
        assert!(!ops.contains(&"gelu") && !ops.contains(&"gelu_grad"), "{ops:?}");
        for want in ["gelu_linear", "matmul_gelu_rhs", "matmul_gelu_grad"] {
            assert!(ops.contains(&want), "{want} missing: {ops:?}");
        }
    }

    /// A pre-norm linear and its weight gradient; a layer norm that is also
    /// a graph output stays.
    #[test]
    fn layer_norm_moves_into_its_readers_unless_named() {
        let build = |named: bool| {
            let mut g = Graph::new();
            let x = g.add_input("x", Shape::consts(&[2, 3, 4]), DType::F32).unwrap();
            let dy = g.add_input("dy", Shape::consts(&[6, 5]), DType::F32).unwrap();
            let p = |g: &mut Graph, n: &str, s: &[u64]| {
                g.add_param(n, TensorType::f32(Shape::consts(s)), Init::Zeros, true, "").unwrap()
            };
            let (ln_w, ln_b, w) = (p(&mut g, "ln_w", &[4]), p(&mut g, "ln_b", &[4]), p(&mut g, "w", &[5, 4]));
            let l = g.add_op(Op::LayerNorm { eps: 1e-6 }, &[x, ln_w, ln_b], "").unwrap();
            let y = g.add_op(Op::Linear, &[l, w], "").unwrap();
            let l2 = g.add_op(Op::Reshape { shape: Shape::consts(&[6, 4]) }, &[l], "").unwrap();
            let dw = g.add_op(Op::Matmul { transpose_a: true, transpose_b: false }, &[dy, l2], "").unwrap();
            g.set_output("y", y);
            g.set_output("dw", dw);
            if named {
                g.set_output("normed", l);
            }
            g
        };
        let mut g = build(false);
        let report = super::run(&mut g).unwrap();
        g.verify().unwrap();
        assert!(
            report.starts_with("0 GELUs and 1 layer norms applied by their readers (1 linear, 1 weight"),
            "{report}"
        );
        let ops: Vec<&str> = g.node_ids().iter().map(|&v| g.node(v).op.name()).collect();
        assert!(ops.contains(&"layer_norm_linear") && ops.contains(&"matmul_layer_norm_rhs"), "{ops:?}");
        assert!(!ops.contains(&"layer_norm"), "{ops:?}");
        let mut kept = build(true);
        assert!(super::run(&mut kept).unwrap().starts_with("0 GELUs and 0 layer norms"));
    }
}
