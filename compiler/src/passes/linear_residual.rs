//! Rule `residual-into-linear`: `add(r, linear(x, w, b))` (or of
//! `gelu_linear`), where nothing else reads the product, becomes
//! `linear_residual(x, w, b, r)`: the product's result joins the residual
//! stream as the product writes it. Why: in a pre-norm block the attention
//! projection and the MLP's second linear each feed one residual add;
//! apart, the product writes its result and the add reads it back with the
//! stream and writes the stream again (with mixed precision, a bf16 result
//! read back into an f32 add). As one kernel the GEMM reads the stream as
//! its C operand (cuBLASLt's beta = 1) and writes the new stream: the
//! product's result is never stored. The sum is taken in f32 before any
//! rounding, as the CPU computes it.

use crate::ir::{Graph, IrError, Op};

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let folded = super::absorb_into_add(g, |op, arity| match (op, arity) {
        (Op::Linear, 3) => Some(Op::LinearResidual { gelu: false }),
        (Op::GeluLinear, 3) => Some(Op::LinearResidual { gelu: true }),
        _ => None,
    })?;
    Ok(format!("{folded} products add their result to the residual stream as they write it"))
}

#[cfg(test)]
mod tests {
    use crate::ir::{BinaryOp, DType, Graph, Init, Op, Shape, TensorType};

    /// x -> linear -> add(r, .) and z -> gelu_linear -> add(., r2); with
    /// `named`, the first product is also an output.
    fn build(named: bool) -> Graph {
        let mut g = Graph::new();
        let s = Shape::consts(&[2, 3, 4]);
        let x = g.add_input("x", s.clone(), DType::F32).unwrap();
        let r = g.add_input("r", s.clone(), DType::F32).unwrap();
        let param = |g: &mut Graph, n: &str, d: &[u64]| {
            g.add_param(n, TensorType::f32(Shape::consts(d)), Init::Zeros, true, "").unwrap()
        };
        let (w, b) = (param(&mut g, "w", &[4, 4]), param(&mut g, "b", &[4]));
        let y = g.add_op(Op::Linear, &[x, w, b], "proj").unwrap();
        let s1 = g.add_op(Op::Binary(BinaryOp::Add), &[r, y], "block").unwrap();
        let (w2, b2) = (param(&mut g, "w2", &[4, 4]), param(&mut g, "b2", &[4]));
        let y2 = g.add_op(Op::GeluLinear, &[x, w2, b2], "fc2").unwrap();
        let s2 = g.add_op(Op::Binary(BinaryOp::Add), &[y2, s1], "block").unwrap();
        g.set_output("s", s2);
        if named {
            g.set_output("y", y);
        }
        g
    }

    #[test]
    fn a_product_read_only_by_a_residual_add_writes_into_the_stream() {
        let mut g = build(false);
        let report = super::run(&mut g).unwrap();
        g.verify().unwrap();
        assert_eq!(report, "2 products add their result to the residual stream as they write it");
        let s = g.outputs()[0].1;
        assert_eq!(g.node(s).op, Op::LinearResidual { gelu: true });
        assert_eq!(g.node(s).scope, "fc2");
        let r1 = g.operands(s)[3];
        assert_eq!(g.node(r1).op, Op::LinearResidual { gelu: false });
        assert_eq!(g.operands(r1).len(), 4);
        // A product that is also read elsewhere stays a product.
        let mut g = build(true);
        assert!(super::run(&mut g).unwrap().starts_with("1 products"));
    }
}
