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
//! rounding, as the CPU computes it. So too for a matmul read only by an
//! add with another value of its type (ConViT's two input gradients of
//! norm1's output, from its qk and v linears): `matmul(a, b, c)`, the GEMM
//! reading c as C.

use crate::ir::{Graph, IrError, Op};

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let folded = super::absorb_into_add(g, |op, arity| match (op, arity) {
        (Op::Linear, 3) => Some(Op::LinearResidual { gelu: false }),
        (Op::GeluLinear, 3) => Some(Op::LinearResidual { gelu: true }),
        // Two products summed (ConViT's norm1 gradient from its qk and v
        // linears; v's gradient from the content attention and the
        // positional product): the later GEMM reads the other as C.
        (Op::Matmul { transpose_a, transpose_b }, 2) => {
            Some(Op::Matmul { transpose_a: *transpose_a, transpose_b: *transpose_b })
        }
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

    /// Two input gradients of one value, each a product read only by their
    /// sum: the sum is one product with the other as its addend.
    #[test]
    fn two_products_summed_are_one_with_an_addend() {
        let mut g = Graph::new();
        let (dy1, dy2) = (
            g.add_input("dy1", Shape::consts(&[6, 8]), DType::F32).unwrap(),
            g.add_input("dy2", Shape::consts(&[6, 4]), DType::F32).unwrap(),
        );
        let (w1, w2) = (
            g.add_input("w1", Shape::consts(&[8, 5]), DType::F32).unwrap(),
            g.add_input("w2", Shape::consts(&[4, 5]), DType::F32).unwrap(),
        );
        let m1 = g.add_op(Op::matmul(), &[dy1, w1], "qk").unwrap();
        let m2 = g.add_op(Op::matmul(), &[dy2, w2], "v").unwrap();
        let dx = g.add_op(Op::Binary(BinaryOp::Add), &[m1, m2], "norm1").unwrap();
        g.set_output("dx", dx);
        assert!(super::run(&mut g).unwrap().starts_with("1 products"));
        g.verify().unwrap();
        let dx = g.outputs()[0].1;
        assert_eq!(g.node(dx).op, Op::matmul());
        assert_eq!(g.node(dx).scope, "v");
        let [a, b, c] = g.operands(dx)[..] else { panic!("a @ b + c") };
        assert_eq!((a, b), (dy2, w2));
        assert_eq!(g.node(c).op, Op::matmul());
        assert_eq!(g.operands(c), [dy1, w1]);
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
