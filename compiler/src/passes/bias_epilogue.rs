//! Rule `bias-grad-epilogue`: the sum over the rows of a
//! `matmul_gelu_grad`'s result (the bias gradient of the MLP's first
//! linear, `sum_f32` of the bf16 gradient under AMP) becomes that kernel's
//! result 1, made by the epilogue that already reads and writes every
//! element of the result (the GELU gradient's): the gradient is not read a
//! third time for its sum. So too for `attention_packed_grad`'s result (the
//! qkv product's bias gradient), summed as its rows are written.

use super::{rebuild, Step};
use crate::ir::{Graph, IrError, Op, ValueId};
use std::collections::HashMap;

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    // sum -> the product whose result it sums (one sum per product).
    let mut joined: HashMap<ValueId, ValueId> = HashMap::new();
    let mut taken = std::collections::HashSet::new();
    for v in g.node_ids() {
        if !matches!(g.node(v).op, Op::MatmulGeluGrad { .. } | Op::AttentionPackedGrad { .. }) {
            continue;
        }
        if let Some(s) = g.users(v).into_iter().find(|&u| super::layer_norm_grad::sums_rows(g, u, v)) {
            if taken.insert(v) {
                joined.insert(s, v);
            }
        }
    }
    let count = joined.len();
    *g = rebuild(g, |old, v, new, map| {
        if taken.contains(&v) {
            let op = match old.node(v).op {
                Op::MatmulGeluGrad { transpose_a, transpose_b, gelu, .. } => {
                    Op::MatmulGeluGrad { transpose_a, transpose_b, row_sum: true, gelu }
                }
                Op::AttentionPackedGrad { heads, scale, dropout, key, .. } => {
                    Op::AttentionPackedGrad { heads, scale, dropout, key, row_sum: true }
                }
                _ => return Err(IrError::Invalid("a joined bias gradient sums a gradient with a row sum".into())),
            };
            let args: Vec<ValueId> = old.operands(v).iter().map(|o| map[o]).collect();
            return Ok(Step::Use(new.add_op(op, &args, &old.node(v).scope)?));
        }
        let Some(product) = joined.get(&v) else { return Ok(Step::Copy) };
        let part = Op::ResultPart { index: 1, dtype: old.ty(v).dtype };
        Ok(Step::Use(new.add_op(part, &[map[product]], &old.node(v).scope)?))
    })?;
    Ok(format!("{count} bias gradients summed by the kernels that write the gradient"))
}

#[cfg(test)]
mod tests {
    use crate::ir::{DType, Graph, Op, ReduceOp, Shape};

    #[test]
    fn the_hidden_bias_gradient_becomes_the_epilogues_result() {
        let mut g = Graph::new();
        let dy = g.add_input("dy", Shape::consts(&[2, 3, 4]), DType::BF16).unwrap();
        let w = g.add_input("w", Shape::consts(&[4, 8]), DType::BF16).unwrap();
        let z = g.add_input("z", Shape::consts(&[2, 3, 8]), DType::BF16).unwrap();
        let dh = g
            .add_op(
                Op::MatmulGeluGrad { transpose_a: false, transpose_b: false, row_sum: false, gelu: None },
                &[dy, w, z],
                "mlp",
            )
            .unwrap();
        let rows = Op::ReduceF32 { op: ReduceOp::Sum, axes: vec![0, 1], keepdim: false };
        let db = g.add_op(rows, &[dh], "mlp.fc1").unwrap();
        // A sum over other axes is not the bias gradient.
        let other = g.add_op(Op::Reduce { op: ReduceOp::Sum, axes: vec![2], keepdim: false }, &[dh], "x").unwrap();
        for (name, v) in [("dh", dh), ("db", db), ("other", other)] {
            g.set_output(name, v);
        }
        assert!(super::run(&mut g).unwrap().starts_with("1 bias"));
        g.verify().unwrap();
        let out = |name: &str| g.outputs().iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(g.node(out("db")).op, Op::ResultPart { index: 1, dtype: DType::F32 });
        assert_eq!(g.operands(out("db")), [out("dh")]);
        assert_eq!(
            g.node(out("dh")).op,
            Op::MatmulGeluGrad { transpose_a: false, transpose_b: false, row_sum: true, gelu: None }
        );
        assert_eq!(g.ty(out("db")).shape, Shape::consts(&[8]));
        assert_eq!(g.node(out("db")).scope, "mlp.fc1");
        assert!(matches!(g.node(out("other")).op, Op::Reduce { .. }));
    }

    #[test]
    fn the_qkv_bias_gradient_becomes_the_attention_gradients_result() {
        let mut g = Graph::new();
        let qkv = g.add_input("qkv", Shape::consts(&[2, 5, 12]), DType::BF16).unwrap();
        let dy = g.add_input("dy", Shape::consts(&[2, 5, 4]), DType::BF16).unwrap();
        let grad = Op::AttentionPackedGrad { heads: 2, scale: 0.5, dropout: 0.0, key: 3, row_sum: false };
        let d = g.add_op(grad, &[qkv, dy], "attn").unwrap();
        let rows = Op::ReduceF32 { op: ReduceOp::Sum, axes: vec![0, 1], keepdim: false };
        let db = g.add_op(rows, &[d], "attn.qkv").unwrap();
        g.set_output("d", d);
        g.set_output("db", db);
        assert!(super::run(&mut g).unwrap().starts_with("1 bias"));
        g.verify().unwrap();
        let out = |name: &str| g.outputs().iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(g.node(out("db")).op, Op::ResultPart { index: 1, dtype: DType::F32 });
        assert_eq!(g.ty(out("db")).shape, Shape::consts(&[12]));
        let joined = Op::AttentionPackedGrad { heads: 2, scale: 0.5, dropout: 0.0, key: 3, row_sum: true };
        assert_eq!(g.node(out("d")).op, joined);
    }
}
