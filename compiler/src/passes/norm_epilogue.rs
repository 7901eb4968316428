//! Rule `norm-grad-epilogue`: `add(r, normalize_grad(dy, x, w))`, where
//! nothing else reads the layer norm's input gradient, becomes
//! `normalize_grad(dy, x, w, r)`: the residual stream's gradient is added
//! as the norm's gradient is written. Why: in a pre-norm block every layer
//! norm's input gradient joins the residual gradient at once; written
//! apart, the sum reads both tensors and writes a third, one pass over the
//! residual width more per norm (reference 1.3's dx, then autodiff's
//! accumulation).

use crate::ir::{Graph, IrError, Op};

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let folded = super::absorb_into_add(g, |op, arity| match (op, arity) {
        (Op::NormalizeGrad { .. }, 3) => Some(op.clone()),
        _ => None,
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
