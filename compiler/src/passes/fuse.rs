//! Elementwise fusion. Rule `elementwise-chain`: an elementwise op joins the
//! fused kernel of its consumers when every consumer is in that kernel and no
//! output or state update names it (so the value never needs to exist in
//! memory). Why: each unfused op reads and writes its whole tensor; fused,
//! the chain runs per block of elements in registers (residual adds, scaling,
//! dropout, GELU's gradient, AdamW's per-parameter arithmetic).
//!
//! Clusters grow from their last op (the root) backwards; a producer is only
//! considered after all its later users are decided (a max-heap on position),
//! so "every consumer is in the cluster" is final when it is checked.
//!
//! Rule `recompute-in-each`: a one-operand, deterministic elementwise op
//! (a cast, a unary op, a scale) left out because its readers sit in
//! different fused kernels joins each of them: each recomputes it in
//! registers from its operand, bitwise the same value, and it is never
//! stored. Why: ConViT's gated attention casts the attention output's
//! gradient to f32 once for two products (the gate's two terms); stored,
//! that is a kernel writing an f32 copy the two kernels read back, twice
//! the bf16 bytes each.

use super::{rebuild, Step};
use crate::ir::fused::Instr;
use crate::ir::{Graph, IrError, Op, ValueId};
use std::collections::{BinaryHeap, HashMap, HashSet};

/// Elementwise ops a fused program has an instruction for (not a fused op
/// itself, nor `div_count`, whose count is fixed only at lowering).
pub(super) fn fusible(op: &Op) -> bool {
    op.is_elementwise() && !matches!(op, Op::Fused { .. } | Op::DivCount { .. })
}

fn candidate(g: &Graph, v: ValueId) -> bool {
    fusible(&g.node(v).op) && g.ty(v).dtype.is_float() && g.operands(v).iter().all(|&o| g.ty(o).dtype.is_float())
}

/// The clusters of `g` (members in topological order), roots last; a value
/// `recompute-in-each` moves leaves an empty cluster.
fn clusters(g: &Graph, order: &[ValueId]) -> Vec<Vec<ValueId>> {
    let pos: HashMap<ValueId, usize> = order.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let pinned: HashSet<ValueId> = g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect();
    // Listed once: a value read by every layer (a schedule's scalar) is
    // reached from every cluster, and listing its users each time is
    // quadratic in the depth.
    let users: HashMap<ValueId, Vec<ValueId>> = order.iter().map(|&v| (v, g.users(v))).collect();
    let mut cluster_of: HashMap<ValueId, usize> = HashMap::new();
    let mut out = Vec::new();
    for &root in order.iter().rev() {
        if cluster_of.contains_key(&root) || !candidate(g, root) {
            continue;
        }
        let id = out.len();
        cluster_of.insert(root, id);
        let mut members = vec![root];
        let mut heap: BinaryHeap<(usize, ValueId)> = g.operands(root).iter().map(|&o| (pos[&o], o)).collect();
        while let Some((_, o)) = heap.pop() {
            if cluster_of.contains_key(&o) || pinned.contains(&o) || !candidate(g, o) {
                continue;
            }
            // Random masks are indexed by positions in the op's own shape.
            if matches!(g.node(o).op, Op::Dropout { .. } | Op::DropPath { .. }) && g.ty(o).shape != g.ty(root).shape {
                continue;
            }
            if users[&o].iter().all(|u| cluster_of.get(u) == Some(&id)) {
                cluster_of.insert(o, id);
                members.push(o);
                heap.extend(g.operands(o).iter().map(|&x| (pos[&x], x)));
            }
        }
        members.sort_by_key(|v| pos[v]);
        out.push(members);
    }
    // recompute-in-each: a value left alone (its own one-op cluster) whose
    // readers are all in clusters, several of them, joins each. In order,
    // joining at once: a reader that was alone and is joined by its operand
    // is no longer alone, so it stays where that operand is recomputed.
    for &v in order {
        let alone = cluster_of.get(&v).is_some_and(|&id| out[id].len() == 1);
        // A scalar (the optimizer's step sizes) costs nothing to read, and a
        // value its readers broadcast (a gate per head) would be recomputed
        // per element they write: only values read element for element.
        let scalar = g.ty(v).shape.const_numel() == Some(1);
        let same_shape = users[&v].iter().all(|&u| g.ty(u).shape == g.ty(v).shape);
        if !alone || scalar || !same_shape || pinned.contains(&v) || !recomputable(&g.node(v).op) {
            continue;
        }
        let kernels: Option<HashSet<usize>> = users[&v].iter().map(|u| cluster_of.get(u).copied()).collect();
        match kernels {
            Some(ids) if ids.len() >= 2 => {
                out[cluster_of[&v]].clear();
                for id in ids {
                    out[id].push(v);
                    out[id].sort_by_key(|m| pos[m]);
                }
            }
            _ => {}
        }
    }
    out
}

/// Ops `recompute-in-each` may compute in several kernels: one operand,
/// no random stream (a dropout mask is drawn once).
fn recomputable(op: &Op) -> bool {
    matches!(op, Op::Cast { .. } | Op::Unary(_) | Op::Scale { .. } | Op::AddScalar { .. } | Op::PowScalar { .. })
}

/// The register program of one cluster and its external operands (old ids).
fn body(g: &Graph, members: &[ValueId]) -> (Vec<Instr>, Vec<ValueId>) {
    let inside: HashSet<ValueId> = members.iter().copied().collect();
    let mut externals: Vec<ValueId> = Vec::new();
    for &m in members {
        for o in g.operands(m) {
            if !inside.contains(&o) && !externals.contains(&o) {
                externals.push(o);
            }
        }
    }
    let mut body: Vec<Instr> = (0..externals.len() as u32).map(Instr::Operand).collect();
    let mut reg: HashMap<ValueId, u32> = externals.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
    for &m in members {
        let a: Vec<u32> = g.operands(m).iter().map(|o| reg[o]).collect();
        let instr =
            instr_of(&g.node(m).op, &a).unwrap_or_else(|| unreachable!("{} is not fusible", g.node(m).op.name()));
        reg.insert(m, body.len() as u32);
        body.push(instr);
    }
    (body, externals)
}

/// The instruction of a fusible op over registers `a` (`None` for others).
pub(super) fn instr_of(op: &Op, a: &[u32]) -> Option<Instr> {
    Some(match *op {
        Op::Unary(u) => Instr::Unary(u, a[0]),
        Op::Binary(b) => Instr::Binary(b, a[0], a[1]),
        Op::Scale { factor } => Instr::Scale(factor, a[0]),
        Op::AddScalar { value } => Instr::AddScalar(value, a[0]),
        Op::PowScalar { exponent } => Instr::PowScalar(exponent, a[0]),
        Op::GeluGrad => Instr::GeluGrad(a[0], a[1]),
        Op::Cast { dtype } => Instr::Cast(dtype, a[0]),
        Op::Dropout { p, key } => Instr::Dropout { p, key, x: a[0] },
        Op::DropPath { p, key } => Instr::DropPath { p, key, x: a[0] },
        _ => return None,
    })
}

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let order = g.topo_order()?;
    let found: Vec<Vec<ValueId>> = clusters(g, &order).into_iter().filter(|c| c.len() >= 2).collect();
    let mut root_of: HashMap<ValueId, usize> = HashMap::new();
    let mut member: HashSet<ValueId> = HashSet::new();
    for (i, c) in found.iter().enumerate() {
        root_of.insert(*c.last().expect("clusters are non-empty"), i);
        member.extend(c.iter().copied());
    }
    let fused_ops: usize = found.iter().map(|c| c.len()).sum();
    *g = rebuild(g, |old, v, new, map| {
        if let Some(&i) = root_of.get(&v) {
            let (body, externals) = body(old, &found[i]);
            let operands: Vec<ValueId> = externals.iter().map(|o| map[o]).collect();
            let node = old.node(v);
            let nv = new.add_op(Op::Fused { body }, &operands, &node.scope)?;
            if new.ty(nv) != &node.ty {
                return Err(IrError::Invalid(format!(
                    "fusing into `{}` changed its type from {} to {}",
                    node.scope,
                    node.ty,
                    new.ty(nv)
                )));
            }
            return Ok(Step::Use(nv));
        }
        if member.contains(&v) {
            return Ok(Step::Skip);
        }
        Ok(Step::Copy)
    })?;
    Ok(format!("fused {fused_ops} elementwise ops into {} kernels", found.len()))
}

#[cfg(test)]
mod tests {
    use crate::ir::fused::Instr;
    use crate::ir::{BinaryOp, DType, Graph, Op, Shape, UnaryOp};

    /// y = gelu(x) * 2 + x, with `x + 1` also an output (so it stays).
    #[test]
    fn chains_fuse_and_shared_or_named_values_stay() {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[2, 3]), DType::F32).unwrap();
        let b = g.add_input("b", Shape::consts(&[3]), DType::F32).unwrap();
        let ge = g.add_op(Op::Unary(UnaryOp::Gelu), &[x], "m").unwrap();
        let s = g.add_op(Op::Scale { factor: 2.0 }, &[ge], "m").unwrap();
        let y = g.add_op(Op::Binary(BinaryOp::Add), &[s, b], "m").unwrap();
        let named = g.add_op(Op::AddScalar { value: 1.0 }, &[x], "m").unwrap();
        let z = g.add_op(Op::Binary(BinaryOp::Mul), &[y, named], "m").unwrap();
        g.set_output("z", z);
        g.set_output("named", named);
        assert_eq!(super::run(&mut g).unwrap(), "fused 4 elementwise ops into 1 kernels");
        g.verify().unwrap();
        let z = g.outputs()[0].1;
        let Op::Fused { body } = &g.node(z).op else { panic!("z is not fused: {}", g.node(z).op.name()) };
        assert_eq!(
            body,
            &vec![
                Instr::Operand(0),
                Instr::Operand(1),
                Instr::Operand(2),
                Instr::Unary(UnaryOp::Gelu, 0),
                Instr::Scale(2.0, 3),
                Instr::Binary(BinaryOp::Add, 4, 1),
                Instr::Binary(BinaryOp::Mul, 5, 2),
            ]
        );
        // Operands: x, b, and the named value (its own add_scalar node).
        let ops: Vec<&str> = g.operands(z).iter().map(|&o| g.node(o).op.name()).collect();
        assert_eq!(ops, ["input", "input", "add_scalar"]);
    }

    /// ConViT's gate gradient: c = cast(dy) read by two scaled chains, and
    /// e = exp(x) read by a chain and a reduction.
    #[test]
    fn a_cast_read_by_two_fused_kernels_is_recomputed_in_each() {
        let mut g = Graph::new();
        let dy = g.add_input("dy", Shape::consts(&[2, 3]), DType::BF16).unwrap();
        let a = g.add_input("a", Shape::consts(&[1, 3]), DType::F32).unwrap();
        let c = g.add_op(Op::Cast { dtype: DType::F32 }, &[dy], "").unwrap();
        let mut outs = Vec::new();
        for factor in [2.0, 3.0] {
            let m = g.add_op(Op::Binary(BinaryOp::Mul), &[c, a], "").unwrap();
            outs.push(g.add_op(Op::Scale { factor }, &[m], "").unwrap());
        }
        let x = g.add_input("x", Shape::consts(&[4]), DType::F32).unwrap();
        let e = g.add_op(Op::Unary(UnaryOp::Exp), &[x], "").unwrap();
        let r = g.add_op(Op::Reduce { op: crate::ir::ReduceOp::Sum, axes: vec![0], keepdim: true }, &[e], "").unwrap();
        let y = g.add_op(Op::Scale { factor: 2.0 }, &[e], "").unwrap();
        g.set_output("y0", outs[0]);
        g.set_output("y1", outs[1]);
        g.set_output("r", r);
        g.set_output("y", y);
        assert_eq!(super::run(&mut g).unwrap(), "fused 6 elementwise ops into 2 kernels");
        g.verify().unwrap();
        for (name, v) in g.outputs().iter().take(2) {
            let Op::Fused { body } = &g.node(*v).op else { panic!("{name} is not fused") };
            assert_eq!(body[2], Instr::Cast(DType::F32, 0), "{name} casts dy itself");
            assert_eq!(g.operands(*v), vec![dy, a], "{name} reads dy in bf16");
        }
        assert!(g.node_ids().iter().all(|&v| !matches!(g.node(v).op, Op::Cast { .. })), "no f32 copy of dy is stored");
        // exp(x) is read by a reduction too: stored once, not recomputed.
        let y = g.outputs()[3].1;
        assert!(matches!(g.node(g.operands(y)[0]).op, Op::Unary(UnaryOp::Exp)));
    }

    /// x -> cast c -> scale s, where c is also read by a chain and s by two:
    /// s is alone until c joins it, and then stays its kernel's root (read
    /// by the two chains), c recomputed in both kernels that read it (found
    /// by the random-graph memory tests: s moved on and left c behind).
    #[test]
    fn a_reader_joined_by_its_operand_stays_where_it_is() {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[2, 3]), DType::BF16).unwrap();
        let c = g.add_op(Op::Cast { dtype: DType::F32 }, &[x], "").unwrap();
        let s = g.add_op(Op::Scale { factor: 2.0 }, &[c], "").unwrap();
        let y0 = g.add_op(Op::Unary(UnaryOp::Exp), &[c], "").unwrap();
        let y1 = g.add_op(Op::Unary(UnaryOp::Neg), &[s], "").unwrap();
        let y2 = g.add_op(Op::Unary(UnaryOp::Tanh), &[s], "").unwrap();
        for (name, v) in [("y0", y0), ("y1", y1), ("y2", y2)] {
            g.set_output(name, v);
        }
        super::run(&mut g).unwrap();
        g.verify().unwrap();
        // Every kernel reads x or the stored s, never a value no kernel makes.
        let s = g.operands(g.outputs()[1].1)[0];
        assert!(matches!(&g.node(s).op, Op::Fused { body } if body.contains(&Instr::Scale(2.0, 1))));
        assert_eq!(g.operands(s), [x]);
        assert_eq!(g.operands(g.outputs()[0].1), [x]);
    }

    #[test]
    fn a_value_read_outside_the_chain_is_not_fused() {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[4]), DType::F32).unwrap();
        let e = g.add_op(Op::Unary(UnaryOp::Exp), &[x], "").unwrap();
        let r = g.add_op(Op::Reduce { op: crate::ir::ReduceOp::Sum, axes: vec![0], keepdim: true }, &[e], "").unwrap();
        let y = g.add_op(Op::Binary(BinaryOp::Div), &[e, r], "").unwrap();
        g.set_output("y", y);
        assert_eq!(super::run(&mut g).unwrap(), "fused 0 elementwise ops into 0 kernels");
    }
}
