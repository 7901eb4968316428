//! Rule `norm-grad-epilogue`: `add(r, normalize_grad(dy, x, w))`, where
//! nothing else reads the layer norm's input gradient, becomes
//! `normalize_grad(dy, x, w, r)`: the residual stream's gradient is added
//! as the norm's gradient is written. Why: in a pre-norm block every layer
//! norm's input gradient joins the residual gradient at once; written
//! apart, the sum reads both tensors and writes a third, one pass over the
//! residual width more per norm (reference 1.3's dx, then autodiff's
//! accumulation).

use super::{rebuild, Step};
use crate::ir::{BinaryOp, Graph, IrError, Op, ValueId};
use std::collections::{HashMap, HashSet};

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let pinned: HashSet<ValueId> = g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect();
    // add -> (the norm gradient it absorbs, the other operand).
    let mut fold: HashMap<ValueId, (ValueId, ValueId)> = HashMap::new();
    let mut absorbed: HashSet<ValueId> = HashSet::new();
    for v in g.node_ids() {
        if !matches!(g.node(v).op, Op::Binary(BinaryOp::Add)) {
            continue;
        }
        let [a, b] = g.operands(v)[..] else { continue };
        let candidate = |n: ValueId, other: ValueId| {
            matches!(g.node(n).op, Op::NormalizeGrad { .. })
                && g.operands(n).len() == 3
                && g.users(n) == [v]
                && !pinned.contains(&n)
                && !absorbed.contains(&n)
                && n != other
                && g.ty(n) == g.ty(v)
                && g.ty(other) == g.ty(v)
        };
        let pick = if candidate(b, a) {
            Some((b, a))
        } else if candidate(a, b) {
            Some((a, b))
        } else {
            None
        };
        if let Some((n, r)) = pick {
            absorbed.insert(n);
            fold.insert(v, (n, r));
        }
    }
    let folded = fold.len();
    *g = rebuild(g, |old, v, new, map| {
        if absorbed.contains(&v) {
            return Ok(Step::Skip);
        }
        let Some(&(n, r)) = fold.get(&v) else { return Ok(Step::Copy) };
        let mut args: Vec<ValueId> = old.operands(n).iter().map(|o| map[o]).collect();
        args.push(map[&r]);
        let node = old.node(n);
        Ok(Step::Use(new.add_op(node.op.clone(), &args, &node.scope)?))
    })?;
    Ok(format!("{folded} layer-norm input gradients add the residual gradient as they are written"))
}

#[cfg(test)]
mod tests {
    use crate::ir::{BinaryOp, DType, Graph, Op, Shape};

    #[test]
    fn the_residual_add_joins_the_norm_gradient_unless_it_is_read_elsewhere() {
        let build = |named: bool| {
            let mut g = Graph::new();
            let s = Shape::consts(&[2, 3, 4]);
            let dy = g.add_input("dy", s.clone(), DType::F32).unwrap();
            let x = g.add_input("x", s.clone(), DType::F32).unwrap();
            let r = g.add_input("r", s, DType::F32).unwrap();
            let w = g.add_input("w", Shape::consts(&[4]), DType::F32).unwrap();
            let dx = g.add_op(Op::NormalizeGrad { eps: 1e-6 }, &[dy, x, w], "norm").unwrap();
            let sum = g.add_op(Op::Binary(BinaryOp::Add), &[r, dx], "block").unwrap();
            g.set_output("sum", sum);
            if named {
                g.set_output("dx", dx);
            }
            g
        };
        let mut g = build(false);
        let report = super::run(&mut g).unwrap();
        g.verify().unwrap();
        assert!(report.starts_with("1 layer-norm"), "{report}");
        let sum = g.outputs()[0].1;
        assert!(matches!(g.node(sum).op, Op::NormalizeGrad { .. }));
        assert_eq!(g.operands(sum).len(), 4);
        assert_eq!(g.node(sum).scope, "norm");
        let mut g = build(true);
        assert!(super::run(&mut g).unwrap().starts_with("0 layer-norm"));
    }
}
