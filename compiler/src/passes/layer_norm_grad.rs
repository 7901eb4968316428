//! Rule `layer-norm-grad`: a layer norm's backward, as autodiff and the
//! earlier rules leave it, is up to five kernels over the same rows:
//! `normalize_grad(dy, x, w[, r])` (the input gradient), its cast to bf16
//! (what the products of the layer before read), the sum of that cast over
//! the rows (the bias gradient of the linear whose output joined the
//! residual stream there), `layer_norm_weight_grad(dy, x)` and the norm's
//! bias gradient `sum(dy)`. Each reads dy, x or dx again and recomputes the
//! rows' statistics. They become one `layer_norm_grad(dy, x, w[, r])` whose
//! other results (`result_part` 1 to 4: weight gradient, bias
//! gradient, low-precision copy, the copy's sum) the kernel writes in the
//! same pass: dy and x read once, the f32 gradient never read back. Issue
//! 14: "LayerNorm's backward ... one or two kernels"; "casts folded into
//! their producers".
//!
//! Matched: the weight gradient with the same (dy, x) and eps; the sum of
//! exactly dy over every axis but the last (`sum` or `sum_f32`); a cast of
//! the input gradient to another float type, and such a sum of that cast
//! (of the input gradient itself when there is no cast).
//! Any may be missing; with none, nothing changes. The joined kernel
//! stands where the group's first member stood, so the group is joined only
//! when the input gradient's operands all come before it in the graph's
//! order or are made from values that do (the zero padding of a gradient of
//! fewer rows, `slice-first`: made again there, `late_operands`).

use super::{rebuild, Step};
use crate::ir::{Graph, IrError, Op, ReduceOp, ValueId};
use std::collections::HashMap;

/// One norm's backward: the input gradient and the nodes joined into it.
struct Group {
    dx: ValueId,
    weight: Option<ValueId>,
    bias: Option<ValueId>,
    copy: Option<ValueId>,
    /// The sum over the rows of the copy, or of dx without one (the bias
    /// gradient of the linear whose output joined the residual stream).
    copy_sum: Option<ValueId>,
    /// Operands made after the first member from values made before it (the
    /// zero padding of a gradient of fewer rows, `slice-first`): made again
    /// just before the joined kernel.
    hoisted: Vec<ValueId>,
}

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let pulled = pull_through_pads(g)?;
    let order = g.topo_order()?;
    let position: HashMap<ValueId, usize> = order.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let mut groups: Vec<Group> = Vec::new();
    let mut taken = std::collections::HashSet::new();
    let mut hoist_of = std::collections::HashSet::new();
    for &k in &order {
        let Op::NormalizeGrad { eps } = g.node(k).op else { continue };
        let operands = g.operands(k);
        if !matches!(operands.len(), 3 | 4) {
            continue;
        }
        let (dy, x) = (operands[0], operands[1]);
        let weight = g.users(x).into_iter().find(|&u| {
            matches!(g.node(u).op, Op::LayerNormWeightGrad { eps: e } if e == eps)
                && g.operands(u) == [dy, x]
                && !taken.contains(&u)
        });
        let bias = g.users(dy).into_iter().find(|&u| sums_rows(g, u, dy) && !taken.contains(&u));
        let dtype = g.ty(k).dtype;
        let copy = g.users(k).into_iter().find(|&u| {
            matches!(g.node(u).op, Op::Cast { dtype: to } if to != dtype && to.is_float())
                && g.operands(u) == [k]
                && !taken.contains(&u)
        });
        // The linear's bias gradient: the row sum of the copy its products
        // read, or of dx itself where there is no copy (an f32 step).
        let summed = copy.unwrap_or(k);
        let copy_sum = g.users(summed).into_iter().find(|&u| sums_rows(g, u, summed) && !taken.contains(&u));
        if weight.is_none() && bias.is_none() && copy.is_none() && copy_sum.is_none() {
            continue;
        }
        // The joined kernel stands where the first member stood: every
        // operand must be made before it, or be made there from values that are.
        let first = [Some(k), weight, bias].into_iter().flatten().map(|v| position[&v]).min().unwrap_or(0);
        let Some(hoisted) = super::late_operands(g, &operands, first, &position) else { continue };
        // A node is made again for one group, and is no group's member.
        let members = [Some(k), weight, bias, copy, copy_sum];
        let clash = hoisted.iter().any(|o| hoist_of.contains(o) || taken.contains(o))
            || members.iter().flatten().any(|m| hoist_of.contains(m));
        if clash {
            continue;
        }
        hoist_of.extend(hoisted.iter().copied());
        taken.extend(members.into_iter().flatten());
        groups.push(Group { dx: k, weight, bias, copy, copy_sum, hoisted });
    }
    let joined = groups.len();
    // Old node -> its group.
    let mut member: HashMap<ValueId, usize> = HashMap::new();
    for (i, gr) in groups.iter().enumerate() {
        for v in [Some(gr.dx), gr.weight, gr.bias, gr.copy, gr.copy_sum].into_iter().flatten() {
            member.insert(v, i);
        }
    }
    let mut made: Vec<bool> = vec![false; groups.len()];
    *g = rebuild(g, |old, v, new, map| {
        if hoist_of.contains(&v) {
            // Made before its group's kernel.
            return Ok(Step::Skip);
        }
        let Some(&i) = member.get(&v) else { return Ok(Step::Copy) };
        let gr = &groups[i];
        // The copy and its sum come after the input gradient (their
        // operand, directly or not), so the kernel exists by then.
        for (index, member) in [(3, gr.copy), (4, gr.copy_sum)] {
            if Some(v) == member {
                let dtype = old.ty(v).dtype;
                let part = new.add_op(Op::ResultPart { index, dtype }, &[map[&gr.dx]], &old.node(v).scope)?;
                return Ok(Step::Use(part));
            }
        }
        if made[i] {
            return Ok(Step::Skip);
        }
        made[i] = true;
        let Op::NormalizeGrad { eps } = old.node(gr.dx).op else {
            return Err(IrError::Invalid("a layer-norm backward group starts at a normalize_grad".into()));
        };
        let mut pairs = super::remake(old, &gr.hoisted, new, map)?;
        let args: Vec<ValueId> = old.operands(gr.dx).iter().map(|&o| super::mapped_with(o, &pairs, map)).collect();
        let copy = gr.copy.map(|c| old.ty(c).dtype);
        let dx = new.add_op(Op::LayerNormGrad { eps, copy, normalized: None }, &args, &old.node(gr.dx).scope)?;
        pairs.push((gr.dx, dx));
        for (index, member) in [(1, gr.weight), (2, gr.bias)] {
            if let Some(m) = member {
                let part = new.add_op(Op::ResultPart { index, dtype: old.ty(m).dtype }, &[dx], &old.node(m).scope)?;
                pairs.push((m, part));
            }
        }
        Ok(Step::Map(pairs))
    })?;
    let pads =
        if pulled > 0 { format!(" ({pulled} casts and sums taken before a zero padding)") } else { String::new() };
    Ok(format!("{joined} layer-norm backwards joined into one kernel each{pads}"))
}

/// Where only some rows were normalised (`slice-first`), the stream's
/// gradient is the norm's, zero-padded: `cast(pad(dx))` becomes
/// `pad(cast(dx))` and a row sum of a padding (along a summed axis) the sum
/// of what it pads (zeros add nothing), so the cast and the sum read dx and
/// join its kernel. Returns how many were moved.
fn pull_through_pads(g: &mut Graph) -> Result<usize, IrError> {
    // New pad -> what it pads (new graph), for pads along a leading axis.
    let mut padded: HashMap<ValueId, ValueId> = HashMap::new();
    let mut count = 0;
    *g = rebuild(g, |old, v, new, map| {
        let node = old.node(v);
        let rank = node.ty.shape.rank();
        match &node.op {
            Op::Pad { axis, .. } if axis + 1 < rank => {
                let inner = map[&old.operands(v)[0]];
                let p = new.add_node_like(node, &[inner])?;
                padded.insert(p, inner);
                Ok(Step::Use(p))
            }
            Op::Cast { .. } => {
                let src = old.operands(v)[0];
                let is_norm_grad = |p: ValueId| matches!(old.node(p).op, Op::NormalizeGrad { .. });
                match &old.node(src).op {
                    Op::Pad { axis, .. } if axis + 1 < rank && is_norm_grad(old.operands(src)[0]) => {
                        let cast = new.add_op(node.op.clone(), &[map[&old.operands(src)[0]]], &node.scope)?;
                        let p = new.add_op(old.node(src).op.clone(), &[cast], &old.node(src).scope)?;
                        padded.insert(p, cast);
                        count += 1;
                        Ok(Step::Use(p))
                    }
                    _ => Ok(Step::Copy),
                }
            }
            Op::Reduce { op: ReduceOp::Sum, axes, keepdim: false }
            | Op::ReduceF32 { op: ReduceOp::Sum, axes, keepdim: false } => {
                let src = map[&old.operands(v)[0]];
                let leading: Vec<usize> = (0..old.ty(old.operands(v)[0]).shape.rank().saturating_sub(1)).collect();
                match padded.get(&src) {
                    Some(&inner) if *axes == leading => {
                        count += 1;
                        Ok(Step::Use(new.add_op(node.op.clone(), &[inner], &node.scope)?))
                    }
                    _ => Ok(Step::Copy),
                }
            }
            _ => Ok(Step::Copy),
        }
    })?;
    Ok(count)
}

/// Whether `u` is the sum of exactly `x` over every axis but the last (a
/// bias gradient: `sum` or `sum_f32`).
pub(super) fn sums_rows(g: &Graph, u: ValueId, x: ValueId) -> bool {
    let rank = g.ty(x).shape.rank();
    let leading: Vec<usize> = (0..rank.saturating_sub(1)).collect();
    let rows = match &g.node(u).op {
        Op::Reduce { op: ReduceOp::Sum, axes, keepdim: false }
        | Op::ReduceF32 { op: ReduceOp::Sum, axes, keepdim: false } => *axes == leading,
        _ => false,
    };
    rows && rank >= 1 && g.operands(u) == [x] && g.ty(u).dtype.is_float()
}

#[cfg(test)]
mod tests {
    use crate::ir::{DType, Graph, Op, ReduceOp, Shape};

    /// A pre-norm block's norm backward as autodiff and AMP leave it: the
    /// input gradient (plus the residual's), its bf16 cast and that cast's
    /// row sum, the weight gradient and the bias gradient.
    fn backward(with_r: bool, eps_of_weight: f64) -> Graph {
        let mut g = Graph::new();
        let s = Shape::consts(&[2, 3, 4]);
        let dy = g.add_input("dy", s.clone(), DType::BF16).unwrap();
        let x = g.add_input("x", s.clone(), DType::F32).unwrap();
        let r = g.add_input("r", s, DType::F32).unwrap();
        let w = g.add_input("w", Shape::consts(&[4]), DType::F32).unwrap();
        let dw = g.add_op(Op::LayerNormWeightGrad { eps: eps_of_weight }, &[dy, x], "norm").unwrap();
        let rows = Op::ReduceF32 { op: ReduceOp::Sum, axes: vec![0, 1], keepdim: false };
        let db = g.add_op(rows.clone(), &[dy], "norm").unwrap();
        let args: Vec<_> = if with_r { vec![dy, x, w, r] } else { vec![dy, x, w] };
        let dx = g.add_op(Op::NormalizeGrad { eps: 1e-6 }, &args, "norm").unwrap();
        let low = g.add_op(Op::Cast { dtype: DType::BF16 }, &[dx], "proj").unwrap();
        let dbias = g.add_op(rows, &[low], "proj").unwrap();
        for (name, v) in [("dx", dx), ("low", low), ("dw", dw), ("db", db), ("dbias", dbias)] {
            g.set_output(name, v);
        }
        g
    }

    fn ops(g: &Graph) -> Vec<String> {
        g.topo_order()
            .unwrap()
            .into_iter()
            .filter(|&v| !g.node(v).op.is_leaf())
            .map(|v| {
                let op = &g.node(v).op;
                format!("{}{}", op.name(), tessera_plan::op::attribute_text(op))
            })
            .collect()
    }

    #[test]
    fn the_five_kernels_become_one_with_four_parts() {
        for with_r in [false, true] {
            let mut g = backward(with_r, 1e-6);
            let types: Vec<_> = g.outputs().iter().map(|(n, v)| (n.clone(), g.ty(*v).clone())).collect();
            let report = super::run(&mut g).unwrap();
            g.verify().unwrap();
            assert!(report.starts_with("1 layer-norm"), "{report}");
            assert_eq!(
                ops(&g),
                [
                    "layer_norm_grad {eps=0.000001, copy=bf16}",
                    "result_part {index=1, dtype=f32}",
                    "result_part {index=2, dtype=f32}",
                    "result_part {index=3, dtype=bf16}",
                    "result_part {index=4, dtype=f32}",
                ]
            );
            // Every output keeps its type; the parts read the joined kernel.
            for (name, ty) in &types {
                let v = g.outputs().iter().find(|(n, _)| n == name).unwrap().1;
                assert_eq!(g.ty(v), ty, "{name}");
            }
            let dx = g.outputs().iter().find(|(n, _)| n == "dx").unwrap().1;
            assert_eq!(g.operands(dx).len(), if with_r { 4 } else { 3 });
            assert_eq!(g.node(dx).scope, "norm");
            let low = g.outputs().iter().find(|(n, _)| n == "low").unwrap().1;
            assert_eq!((g.operands(low), g.node(low).scope.as_str()), (vec![dx], "proj"));
        }
    }

    /// The residual gradient made after the weight gradient (the zero
    /// padding of a gradient of fewer rows, as `slice-first` leaves it): the
    /// padding is made again before the joined kernel, which stands where the
    /// weight gradient stood.
    #[test]
    fn a_late_residual_made_from_earlier_values_moves_up_with_the_kernel() {
        let mut g = Graph::new();
        let s = Shape::consts(&[2, 3, 4]);
        let dy = g.add_input("dy", s.clone(), DType::BF16).unwrap();
        let x = g.add_input("x", s, DType::F32).unwrap();
        let w = g.add_input("w", Shape::consts(&[4]), DType::F32).unwrap();
        let few = g.add_input("few", Shape::consts(&[2, 1, 4]), DType::F32).unwrap();
        let dw = g.add_op(Op::LayerNormWeightGrad { eps: 1e-6 }, &[dy, x], "norm").unwrap();
        let twice = g.add_op(Op::Binary(crate::ir::BinaryOp::Add), &[dw, dw], "other").unwrap();
        let pad = Op::Pad { axis: 1, before: crate::ir::Dim::Const(0), after: crate::ir::Dim::Const(2) };
        let r = g.add_op(pad, &[few], "block").unwrap();
        let dx = g.add_op(Op::NormalizeGrad { eps: 1e-6 }, &[dy, x, w, r], "norm").unwrap();
        for (name, v) in [("dx", dx), ("twice", twice), ("r", r)] {
            g.set_output(name, v);
        }
        assert!(super::run(&mut g).unwrap().starts_with("1 layer-norm"));
        g.verify().unwrap();
        assert_eq!(
            ops(&g),
            [
                "pad {axis=1, before=0, after=2}",
                "layer_norm_grad {eps=0.000001}",
                "result_part {index=1, dtype=f32}",
                "add"
            ]
        );
        let out = |name: &str| g.outputs().iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(g.operands(out("dx"))[3], out("r"));
    }

    #[test]
    fn a_weight_gradient_of_another_norm_is_left_alone() {
        // Another eps: another norm's statistics; the rest still joins.
        let mut g = backward(true, 1e-5);
        super::run(&mut g).unwrap();
        g.verify().unwrap();
        let names = ops(&g);
        assert!(names.contains(&"layer_norm_weight_grad {eps=0.00001}".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("index=1")), "{names:?}");
        assert_eq!(names.iter().filter(|n| n.starts_with("result_part")).count(), 3, "{names:?}");
    }

    #[test]
    fn a_cast_and_a_sum_of_the_padded_gradient_join_the_norms_kernel() {
        // The class token's norm: its gradient padded back to every token,
        // then cast for the products and summed for their bias.
        let mut g = Graph::new();
        let s = Shape::consts(&[2, 1, 4]);
        let dy = g.add_input("dy", s.clone(), DType::BF16).unwrap();
        let x = g.add_input("x", s, DType::F32).unwrap();
        let w = g.add_input("w", Shape::consts(&[4]), DType::F32).unwrap();
        let dx = g.add_op(Op::NormalizeGrad { eps: 1e-6 }, &[dy, x, w], "norm").unwrap();
        let pad = Op::Pad { axis: 1, before: crate::ir::Dim::Const(0), after: crate::ir::Dim::Const(4) };
        let padded = g.add_op(pad, &[dx], "block").unwrap();
        let low = g.add_op(Op::Cast { dtype: DType::BF16 }, &[padded], "fc2").unwrap();
        let rows = Op::ReduceF32 { op: ReduceOp::Sum, axes: vec![0, 1], keepdim: false };
        let bias = g.add_op(rows, &[low], "fc2").unwrap();
        for (name, v) in [("stream", padded), ("low", low), ("bias", bias)] {
            g.set_output(name, v);
        }
        let report = super::run(&mut g).unwrap();
        g.verify().unwrap();
        assert!(report.contains("2 casts and sums taken before a zero padding"), "{report}");
        let out = |name: &str| g.outputs().iter().find(|(n, _)| n == name).unwrap().1;
        // The copy is padded after the kernel made it; the sum is part 4.
        let low = out("low");
        assert!(matches!(g.node(low).op, Op::Pad { .. }), "{:?}", g.node(low).op);
        assert_eq!(g.ty(low).shape, Shape::consts(&[2, 5, 4]));
        let copy = g.operands(low)[0];
        assert_eq!(g.node(copy).op, Op::ResultPart { index: 3, dtype: DType::BF16 });
        assert_eq!(g.node(out("bias")).op, Op::ResultPart { index: 4, dtype: DType::F32 });
        assert!(matches!(g.node(out("stream")).op, Op::Pad { .. }));
    }

    #[test]
    fn nothing_to_join_changes_nothing() {
        let mut g = Graph::new();
        let s = Shape::consts(&[2, 4]);
        let dy = g.add_input("dy", s.clone(), DType::F32).unwrap();
        let x = g.add_input("x", s, DType::F32).unwrap();
        let w = g.add_input("w", Shape::consts(&[4]), DType::F32).unwrap();
        let dx = g.add_op(Op::NormalizeGrad { eps: 1e-6 }, &[dy, x, w], "norm").unwrap();
        // A sum over the wrong axes is no bias gradient.
        let s1 = g.add_op(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keepdim: false }, &[dy], "norm").unwrap();
        g.set_output("dx", dx);
        g.set_output("s1", s1);
        let before = ops(&g);
        assert!(super::run(&mut g).unwrap().starts_with("0 layer-norm"));
        assert_eq!(ops(&g), before);
    }
}
