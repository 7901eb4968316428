//! Forward FLOP counts, for reports and throughput estimates.
//!
//! Convention (fvcore / timm, the one papers quote): only matrix products
//! count, a multiply-add is 2 FLOPs, and biases, norms, softmax and
//! elementwise ops count 0. Under it ViT-B/16 at 224 is 35.1 GFLOPs
//! (fvcore's 17.6 GMACs times 2).
//!
//! - linear `x [..., I] -> [..., O]`: 2 * rows * I * O
//! - matmul `[..., M, K] x [..., K, N]`: 2 * batch * M * K * N
//! - conv2d: 2 * N * O * H' * W' * C * kh * kw
//! - attention: 2 * B*H * Nq * Nk * d (q k^T) + 2 * B*H * Nq * Nk * dv (probs v)

use super::graph::{Graph, ValueId};
use super::op::Op;
use super::types::Shape;

fn eval(s: &Shape, batch: u64) -> Vec<u64> {
    s.dims().iter().map(|d| d.eval(batch)).collect()
}

/// FLOPs of one node with the batch fixed to `batch`.
pub fn node_flops(g: &Graph, v: ValueId, batch: u64) -> u64 {
    let node = g.node(v);
    let operand = |i: usize| eval(&g.ty(g.operands(v)[i]).shape, batch);
    let out = eval(&node.ty.shape, batch);
    match node.op {
        Op::LinearResidual { .. } => 2 * out.iter().product::<u64>() * operand(1)[1],
        Op::LayerNormLinear { .. } => {
            let w = operand(3); // [O, I]
            2 * out.iter().product::<u64>() * w[1]
        }
        Op::Linear | Op::GeluLinear => {
            let w = operand(1); // [O, I]
            2 * out.iter().product::<u64>() * w[1]
        }
        Op::Matmul { transpose_a, .. }
        | Op::MatmulGeluRhs { transpose_a, .. }
        | Op::MatmulGeluGrad { transpose_a, .. }
        | Op::MatmulLayerNormRhs { transpose_a, .. } => {
            let a = operand(0);
            let k = if transpose_a { a[a.len() - 2] } else { *a.last().expect("matmul operands have rank >= 2") };
            2 * out.iter().product::<u64>() * k
        }
        Op::Conv2d { .. } => {
            let w = operand(1); // [O, C, kh, kw]
            2 * out.iter().product::<u64>() * w[1] * w[2] * w[3]
        }
        Op::Attention { .. } => {
            let (q, k) = (operand(0), operand(1));
            let r = q.len();
            let heads_and_batch: u64 = q[..r - 2].iter().product();
            let (nq, nk, d, dv) = (q[r - 2], k[r - 2], q[r - 1], out[r - 1]);
            2 * heads_and_batch * nq * nk * d + 2 * heads_and_batch * nq * nk * dv
        }
        Op::AttentionGrad { .. } => {
            // Scores again, then dv, dP, dq and dk: five products of the forward's size.
            let q = operand(0);
            let r = q.len();
            let heads_and_batch: u64 = q[..r - 2].iter().product();
            5 * 2 * heads_and_batch * q[r - 2] * q[r - 2] * q[r - 1]
        }
        // qkv [B, N, 3*H*d]: the same products, per (batch, head) of width d.
        Op::AttentionPacked { .. } => {
            let qkv = operand(0);
            2 * 2 * qkv[0] * qkv[1] * qkv[1] * (qkv[2] / 3)
        }
        Op::AttentionPackedGrad { .. } => {
            let qkv = operand(0);
            5 * 2 * qkv[0] * qkv[1] * qkv[1] * (qkv[2] / 3)
        }
        _ => 0,
    }
}

/// FLOPs of the whole graph with the batch fixed to `batch`.
pub fn total_flops(g: &Graph, batch: u64) -> u64 {
    g.node_ids().into_iter().map(|v| node_flops(g, v, batch)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, DType, Dim, Init, TensorType, UnaryOp};

    fn shape(dims: &[Dim]) -> Shape {
        Shape(dims.to_vec())
    }

    /// ViT-B/16 at 224 with one block: patch embed, cls token, qkv,
    /// 12-head attention over 197 tokens, proj, fc1, fc2.
    fn vit_b16_one_block() -> (Graph, [ValueId; 6]) {
        let (b, c) = (Dim::B, Dim::Const);
        let mut g = Graph::new();
        let param = |g: &mut Graph, name: &str, d: &[u64]| {
            g.add_param(name, TensorType::f32(Shape::consts(d)), Init::Zeros, true, "trunk").unwrap()
        };
        let x = g.add_input("images", shape(&[b, c(3), c(224), c(224)]), DType::F32).unwrap();
        let (pw, pb) = (param(&mut g, "pw", &[768, 3, 16, 16]), param(&mut g, "pb", &[768]));
        let op = |g: &mut Graph, op: Op, args: &[ValueId]| g.add_op(op, args, "trunk").unwrap();
        let patches = op(&mut g, Op::Conv2d { stride: [16, 16], padding: [0, 0] }, &[x, pw, pb]);
        let flat = op(&mut g, Op::Reshape { shape: shape(&[b, c(768), c(196)]) }, &[patches]);
        let tokens = op(&mut g, Op::Permute { perm: vec![0, 2, 1] }, &[flat]);
        let cls = param(&mut g, "cls", &[1, 1, 768]);
        let cls = op(&mut g, Op::Expand { shape: shape(&[b, c(1), c(768)]) }, &[cls]);
        let x = op(&mut g, Op::Concat { axis: 1 }, &[cls, tokens]);

        let qkv_w = param(&mut g, "qkv", &[2304, 768]);
        let qkv = op(&mut g, Op::Linear, &[x, qkv_w]);
        let qkv = op(&mut g, Op::Reshape { shape: shape(&[b, c(197), c(3), c(12), c(64)]) }, &[qkv]);
        let qkv = op(&mut g, Op::Permute { perm: vec![2, 0, 3, 1, 4] }, &[qkv]);
        let head = |g: &mut Graph, i: u64| {
            let s = op(g, Op::Slice { axis: 0, start: c(i), end: c(i + 1) }, &[qkv]);
            op(g, Op::Reshape { shape: shape(&[b, c(12), c(197), c(64)]) }, &[s])
        };
        let (q, k, v) = (head(&mut g, 0), head(&mut g, 1), head(&mut g, 2));
        let attn = op(&mut g, Op::Attention { scale: 0.125, dropout: 0.0, key: 0 }, &[q, k, v]);
        let attn = op(&mut g, Op::Permute { perm: vec![0, 2, 1, 3] }, &[attn]);
        let attn = op(&mut g, Op::Reshape { shape: shape(&[b, c(197), c(768)]) }, &[attn]);
        let proj_w = param(&mut g, "proj", &[768, 768]);
        let proj = op(&mut g, Op::Linear, &[attn, proj_w]);
        let x = op(&mut g, Op::Binary(BinaryOp::Add), &[x, proj]);

        let fc1_w = param(&mut g, "fc1", &[3072, 768]);
        let fc1 = op(&mut g, Op::Linear, &[x, fc1_w]);
        let act = op(&mut g, Op::Unary(UnaryOp::Gelu), &[fc1]);
        let fc2_w = param(&mut g, "fc2", &[768, 3072]);
        let fc2 = op(&mut g, Op::Linear, &[act, fc2_w]);
        (g, [patches, qkv_w, attn, proj, fc1, fc2])
    }

    #[test]
    fn vit_b16_block_by_hand() {
        let (g, _) = vit_b16_one_block();
        g.verify().unwrap();
        let patch = 2 * 196 * 768 * (3 * 16 * 16); //   231_211_008
        let qkv = 2 * 197 * 768 * 2304; //              697_171_968
        let attention = 2 * 12 * 197 * 197 * 64 * 2; // 119_221_248
        let proj = 2 * 197 * 768 * 768; //              232_390_656
        let mlp = 2 * (2 * 197 * 768 * 3072); //      1_859_125_248
        assert_eq!(patch + qkv + attention + proj + mlp, 3_139_120_128u64);
        assert_eq!(total_flops(&g, 1), 3_139_120_128);
        assert_eq!(total_flops(&g, 8), 8 * 3_139_120_128);

        // 12 blocks plus the 1000-class head: the quoted 35.1 GFLOPs.
        let block = total_flops(&g, 1) - patch;
        let vit_b16 = patch + 12 * block + 2 * 768 * 1000;
        assert_eq!(vit_b16, 35_127_656_448);
    }

    #[test]
    fn per_node_counts() {
        let (g, [patches, qkv_param, _, proj, fc1, fc2]) = vit_b16_one_block();
        assert_eq!(node_flops(&g, patches, 2), 2 * 231_211_008);
        assert_eq!(node_flops(&g, qkv_param, 1), 0);
        assert_eq!(node_flops(&g, proj, 1), 232_390_656);
        assert_eq!(node_flops(&g, fc1, 1), node_flops(&g, fc2, 1));
        let attention = g.operands(g.operands(g.operands(proj)[0])[0])[0];
        assert_eq!(g.node(attention).op.name(), "attention");
        assert_eq!(node_flops(&g, attention, 1), 119_221_248);
    }

    #[test]
    fn matmul_and_attention_with_different_value_dim() {
        let mut g = Graph::new();
        let a = g.add_input("a", Shape(vec![Dim::B, Dim::Const(4), Dim::Const(5)]), DType::F32).unwrap();
        let b = g.add_input("b", Shape::consts(&[5, 6]), DType::F32).unwrap();
        let m = g.add_op(Op::matmul(), &[a, b], "").unwrap();
        assert_eq!(node_flops(&g, m, 3), 2 * 3 * 4 * 5 * 6);

        let q = g.add_input("q", Shape(vec![Dim::B, Dim::Const(2), Dim::Const(7), Dim::Const(8)]), DType::F32).unwrap();
        let k = g.add_input("k", Shape(vec![Dim::B, Dim::Const(2), Dim::Const(9), Dim::Const(8)]), DType::F32).unwrap();
        let v = g.add_input("v", Shape(vec![Dim::B, Dim::Const(2), Dim::Const(9), Dim::Const(3)]), DType::F32).unwrap();
        let at = g.add_op(Op::Attention { scale: 1.0, dropout: 0.0, key: 0 }, &[q, k, v], "").unwrap();
        assert_eq!(node_flops(&g, at, 1), 2 * 2 * 7 * 9 * 8 + 2 * 2 * 7 * 9 * 3);
        assert_eq!(total_flops(&g, 1), 2 * 4 * 5 * 6 + 2 * 2 * 7 * 9 * (8 + 3));
    }
}
