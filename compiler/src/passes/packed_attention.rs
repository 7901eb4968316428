//! Rule `packed-attention`: self-attention whose q, k and v are the three
//! slices of one packed product, written as timm's
//! `qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)` then `q, k, v = qkv`
//! and read back by `.transpose(1, 2).reshape(B, N, C)`, becomes
//! `attention_packed(qkv)`, and its backward (`attention_grad` of those
//! slices, its dy the projection's gradient permuted the same way, its
//! stacked result permuted back into the product's layout) becomes
//! `attention_packed_grad(qkv, dy)`. Why: the permute and the three slice
//! copies write and read the whole qkv product again in each direction, and
//! the output permutes the attention's result once more; the packed kernels
//! read q, k and v where the product put them (strided rows) and write
//! where the next product reads (issue: a step that moves few bytes).
//! The numbers are the unpacked ops' (same sums in the same order; dropout
//! masks indexed as the unpacked op's).

use super::{rebuild, Step};
use crate::ir::{Dim, Graph, IrError, Op, ValueId};
use std::collections::{HashMap, HashSet};

/// The permute that splits qkv [B, N, 3, H, d] into [3, B, H, N, d].
const SPLIT: [usize; 5] = [2, 0, 3, 1, 4];
/// [B, H, N, d] <-> [B, N, H, d].
const HEADS: [usize; 4] = [0, 2, 1, 3];
/// The stacked gradients [3, B, H, N, d] back to [B, N, 3, H, d].
const JOIN: [usize; 5] = [1, 3, 0, 2, 4];

fn dims(g: &Graph, v: ValueId) -> Vec<Dim> {
    g.ty(v).shape.dims().to_vec()
}

/// The only reader of `v`, when `v` is not itself a graph output.
fn sole_user(g: &Graph, v: ValueId, pinned: &HashSet<ValueId>) -> Option<ValueId> {
    match g.users(v)[..] {
        [u] if !pinned.contains(&v) => Some(u),
        _ => None,
    }
}

/// `(qkv, heads)` when q, k and v are slices 0, 1 and 2 of one split qkv
/// product [B, N, 3*H*d].
fn packed_source(g: &Graph, qkv_slices: &[ValueId]) -> Option<(ValueId, u64)> {
    let mut split = None;
    for (i, &t) in qkv_slices.iter().enumerate() {
        let Op::Reshape { .. } = g.node(t).op else { return None };
        let s = g.operands(t)[0];
        let Op::Slice { axis: 0, start: Dim::Const(a), end: Dim::Const(b) } = g.node(s).op else { return None };
        if (a, b) != (i as u64, i as u64 + 1) {
            return None;
        }
        let p = g.operands(s)[0];
        if split.is_some_and(|q| q != p) {
            return None;
        }
        split = Some(p);
    }
    let p = split?;
    let Op::Permute { perm } = &g.node(p).op else { return None };
    let r = g.operands(p)[0];
    if perm[..] != SPLIT || !matches!(g.node(r).op, Op::Reshape { .. }) {
        return None;
    }
    let x = g.operands(r)[0];
    let (xd, rd) = (dims(g, x), dims(g, r));
    let [b, n, Dim::Const(c)] = xd[..] else { return None };
    let [rb, rn, Dim::Const(3), Dim::Const(h), Dim::Const(d)] = rd[..] else { return None };
    let q = dims(g, qkv_slices[0]);
    let ok = (rb, rn) == (b, n) && 3 * h * d == c && h > 0 && q[..] == [b, Dim::Const(h), n, Dim::Const(d)];
    ok.then_some((x, h))
}

/// Whether `v` is `reshape` to `[b, n, width]` of something of that size.
fn reshaped_to(g: &Graph, v: ValueId, b: Dim, n: Dim, width: u64) -> bool {
    matches!(g.node(v).op, Op::Reshape { .. }) && dims(g, v)[..] == [b, n, Dim::Const(width)]
}

enum Rewrite {
    /// This reshape of the output is now `attention_packed(qkv)`.
    Forward { qkv: ValueId, op: Op, scope: String },
    /// This reshape of the stacked gradients is `attention_packed_grad(qkv, dy)`.
    Backward { qkv: ValueId, dy: ValueId, op: Op, scope: String },
}

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let pinned: HashSet<ValueId> = g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect();
    let mut rewrites: HashMap<ValueId, Rewrite> = HashMap::new();
    let mut gone: HashSet<ValueId> = HashSet::new();
    let (mut forward, mut backward) = (0, 0);
    for v in g.node_ids() {
        let node = g.node(v);
        let operands = g.operands(v);
        match node.op {
            Op::Attention { scale, dropout, key } if operands.len() == 3 => {
                let Some((qkv, heads)) = packed_source(g, &operands) else { continue };
                let x = dims(g, qkv);
                let width = g.ty(v).shape.dims().last().map_or(0, |d| d.eval(1)) * heads;
                let Some(p) = sole_user(g, v, &pinned) else { continue };
                let Some(r) = sole_user(g, p, &pinned) else { continue };
                if !matches!(&g.node(p).op, Op::Permute { perm } if perm[..] == HEADS)
                    || !reshaped_to(g, r, x[0], x[1], width)
                {
                    continue;
                }
                let op = Op::AttentionPacked { heads, scale, dropout, key };
                rewrites.insert(r, Rewrite::Forward { qkv, op, scope: node.scope.clone() });
                gone.extend([v, p]);
                forward += 1;
            }
            Op::AttentionGrad { scale, dropout, key } if operands.len() == 4 => {
                let Some((qkv, heads)) = packed_source(g, &operands[..3]) else { continue };
                let x = dims(g, qkv);
                let Dim::Const(c) = x[2] else { continue };
                // dy = permute(reshape(G [B, N, H*d]) [B, N, H, d]) [B, H, N, d].
                let dp = operands[3];
                let Op::Permute { perm } = &g.node(dp).op else { continue };
                let dr = g.operands(dp)[0];
                if perm[..] != HEADS || !matches!(g.node(dr).op, Op::Reshape { .. }) {
                    continue;
                }
                let dy = g.operands(dr)[0];
                if dims(g, dy)[..] != [x[0], x[1], Dim::Const(c / 3)] {
                    continue;
                }
                let Some(p) = sole_user(g, v, &pinned) else { continue };
                let Some(r) = sole_user(g, p, &pinned) else { continue };
                if !matches!(&g.node(p).op, Op::Permute { perm } if perm[..] == JOIN)
                    || !reshaped_to(g, r, x[0], x[1], c)
                {
                    continue;
                }
                let op = Op::AttentionPackedGrad { heads, scale, dropout, key, row_sum: false };
                rewrites.insert(r, Rewrite::Backward { qkv, dy, op, scope: node.scope.clone() });
                gone.extend([v, p]);
                backward += 1;
            }
            _ => {}
        }
    }
    *g = rebuild(g, |_, v, new, map| {
        if gone.contains(&v) {
            return Ok(Step::Skip);
        }
        Ok(match rewrites.remove(&v) {
            None => Step::Copy,
            Some(Rewrite::Forward { qkv, op, scope }) => Step::Use(new.add_op(op, &[map[&qkv]], &scope)?),
            Some(Rewrite::Backward { qkv, dy, op, scope }) => {
                Step::Use(new.add_op(op, &[map[&qkv], map[&dy]], &scope)?)
            }
        })
    })?;
    // The split's permute and slices are dead where nothing else read them.
    g.prune(|_| true, true);
    Ok(format!(
        "{forward} attentions and {backward} attention gradients read q, k and v in place from their packed product"
    ))
}

#[cfg(test)]
mod tests {
    use crate::ir::{DType, Dim, Graph, Op, Shape};

    /// timm's attention core on qkv [B, 5, 3*2*4], with its backward for dy
    /// [B, 5, 8] when `grad`; `keep` also names the split permute an output.
    fn build(grad: bool, keep: bool) -> Graph {
        let mut g = Graph::new();
        let b = Dim::B;
        let qkv = g.add_input("qkv", Shape(vec![b, Dim::Const(5), Dim::Const(24)]), DType::F32).unwrap();
        let shape = |d: &[u64]| Shape(std::iter::once(b).chain(d.iter().map(|&x| Dim::Const(x))).collect());
        let r = g.add_op(Op::Reshape { shape: shape(&[5, 3, 2, 4]) }, &[qkv], "attn").unwrap();
        let p = g.add_op(Op::Permute { perm: vec![2, 0, 3, 1, 4] }, &[r], "attn").unwrap();
        let parts: Vec<_> = (0..3u64)
            .map(|i| {
                let s = g
                    .add_op(Op::Slice { axis: 0, start: Dim::Const(i), end: Dim::Const(i + 1) }, &[p], "attn")
                    .unwrap();
                g.add_op(Op::Reshape { shape: shape(&[2, 5, 4]) }, &[s], "attn").unwrap()
            })
            .collect();
        let a = g.add_op(Op::Attention { scale: 0.5, dropout: 0.25, key: 7 }, &parts, "attn").unwrap();
        let t = g.add_op(Op::Permute { perm: vec![0, 2, 1, 3] }, &[a], "attn").unwrap();
        let o = g.add_op(Op::Reshape { shape: shape(&[5, 8]) }, &[t], "attn").unwrap();
        g.set_output("out", o);
        if grad {
            let dy = g.add_input("dy", Shape(vec![b, Dim::Const(5), Dim::Const(8)]), DType::F32).unwrap();
            let dr = g.add_op(Op::Reshape { shape: shape(&[5, 2, 4]) }, &[dy], "attn").unwrap();
            let dp = g.add_op(Op::Permute { perm: vec![0, 2, 1, 3] }, &[dr], "attn").unwrap();
            let mut args = parts.clone();
            args.push(dp);
            let ag = g.add_op(Op::AttentionGrad { scale: 0.5, dropout: 0.25, key: 7 }, &args, "attn").unwrap();
            let j = g.add_op(Op::Permute { perm: vec![1, 3, 0, 2, 4] }, &[ag], "attn").unwrap();
            let dq = g.add_op(Op::Reshape { shape: shape(&[5, 24]) }, &[j], "attn").unwrap();
            g.set_output("dqkv", dq);
        }
        if keep {
            g.set_output("split", p);
        }
        g
    }

    fn ops(g: &Graph) -> Vec<&'static str> {
        g.topo_order().unwrap().into_iter().map(|v| g.node(v).op.name()).collect()
    }

    #[test]
    fn timms_split_and_its_gradient_become_the_packed_ops() {
        let mut g = build(true, false);
        let report = super::run(&mut g).unwrap();
        g.verify().unwrap();
        assert_eq!(report, "1 attentions and 1 attention gradients read q, k and v in place from their packed product");
        assert_eq!(ops(&g), ["input", "attention_packed", "input", "attention_packed_grad"]);
        let out = g.outputs().iter().find(|(n, _)| n == "out").unwrap().1;
        assert_eq!(g.node(out).op, Op::AttentionPacked { heads: 2, scale: 0.5, dropout: 0.25, key: 7 });
        assert_eq!(g.ty(out).shape.to_string(), "[B,5,8]");
        let d = g.outputs().iter().find(|(n, _)| n == "dqkv").unwrap().1;
        assert_eq!(
            g.node(d).op,
            Op::AttentionPackedGrad { heads: 2, scale: 0.5, dropout: 0.25, key: 7, row_sum: false }
        );
        assert_eq!(g.ty(d).shape.to_string(), "[B,5,24]");
    }

    #[test]
    fn a_split_read_elsewhere_stays_and_other_layouts_are_left_alone() {
        // The split permute is an output: the attention still packs, the
        // permute stays for its reader.
        let mut g = build(false, true);
        super::run(&mut g).unwrap();
        g.verify().unwrap();
        assert_eq!(ops(&g), ["input", "reshape", "permute", "attention_packed"]);
        // q, k, v swapped: not timm's split, nothing changes.
        let g = build(false, false);
        let a = g.topo_order().unwrap().into_iter().find(|&v| g.node(v).op.name() == "attention").unwrap();
        let o = g.operands(a);
        let mut h = Graph::new();
        let mut map = std::collections::HashMap::new();
        for v in g.topo_order().unwrap() {
            let mut args: Vec<_> = g.operands(v).iter().map(|x| map[x]).collect();
            if v == a {
                args = vec![map[&o[1]], map[&o[0]], map[&o[2]]];
            }
            map.insert(v, h.add_node_like(g.node(v), &args).unwrap());
        }
        h.set_output("out", map[&g.outputs()[0].1]);
        let before = ops(&h);
        let report = super::run(&mut h).unwrap();
        assert!(report.starts_with("0 attentions"), "{report}");
        assert_eq!(ops(&h), before);
    }
}
