//! Constant folding: an elementwise op whose operands are all fills (uniform
//! constants) is a fill of its result, computed here in f64. GELU is left to
//! the kernels (it needs erf, and no graph applies it to a constant).

use super::{rebuild, Step};
use crate::ir::{BinaryOp, Graph, IrError, Op, UnaryOp};

fn unary(u: UnaryOp, x: f64) -> Option<f64> {
    Some(match u {
        UnaryOp::Gelu => return None,
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Neg => -x,
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Square => x * x,
        UnaryOp::Heaviside => f64::from(x > 0.0),
    })
}

fn binary(b: BinaryOp, x: f64, y: f64) -> f64 {
    match b {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
        // NaN-propagating, as torch.maximum / minimum.
        BinaryOp::Max => {
            if x.is_nan() || x > y {
                x
            } else {
                y
            }
        }
        BinaryOp::Min => {
            if x.is_nan() || x < y {
                x
            } else {
                y
            }
        }
    }
}

/// The folded value of `op` on constants `c`, if it is an elementwise op this pass folds.
fn fold(op: &Op, c: &[f64]) -> Option<f64> {
    match (op, c) {
        (Op::Unary(u), [x]) => unary(*u, *x),
        (Op::Binary(b), [x, y]) => Some(binary(*b, *x, *y)),
        (Op::Scale { factor }, [x]) => Some(x * factor),
        (Op::AddScalar { value }, [x]) => Some(x + value),
        (Op::PowScalar { exponent }, [x]) => Some(x.powf(*exponent)),
        _ => None,
    }
}

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let mut folded = 0;
    *g = rebuild(g, |old, v, new, map| {
        let node = old.node(v);
        if node.op.is_leaf() || !node.ty.dtype.is_float() {
            return Ok(Step::Copy);
        }
        let consts: Option<Vec<f64>> = old
            .operands(v)
            .iter()
            .map(|o| match new.node(map[o]).op {
                Op::Fill { value } => Some(value),
                _ => None,
            })
            .collect();
        match consts.and_then(|c| fold(&node.op, &c)) {
            Some(value) => {
                folded += 1;
                Ok(Step::Use(new.add_fill(value, node.ty.clone(), &node.scope)))
            }
            None => Ok(Step::Copy),
        }
    })?;
    Ok(format!("folded {folded} ops on constants"))
}

#[cfg(test)]
mod tests {
    use crate::ir::{BinaryOp, DType, Graph, Op, Shape, TensorType, UnaryOp};

    #[test]
    fn ops_on_fills_become_fills() {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[3]), DType::F32).unwrap();
        let two = g.add_fill(2.0, TensorType::f32(Shape::scalar()), "");
        let sq = g.add_op(Op::Unary(UnaryOp::Sqrt), &[two], "").unwrap();
        let inv = g.add_op(Op::Unary(UnaryOp::Recip), &[sq], "").unwrap();
        let y = g.add_op(Op::Binary(BinaryOp::Mul), &[x, inv], "").unwrap();
        g.set_output("y", y);
        assert_eq!(super::run(&mut g).unwrap(), "folded 2 ops on constants");
        let out = g.outputs()[0].1;
        let c = g.operands(out)[1];
        match g.node(c).op {
            Op::Fill { value } => assert!((value - 0.5f64.sqrt()).abs() < 1e-15),
            ref op => panic!("expected a fill, got {}", op.name()),
        }
    }
}
