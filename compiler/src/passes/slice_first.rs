//! Rule `slice-first` (forward graph): a slice of rows (along any axis but
//! the last) of a row-wise op read only through that slice becomes the op
//! applied to the slice of its operands, and again above it, until an op
//! that mixes rows (attention, a reshape) or a value read elsewhere stops
//! it. One pass, readers before what they read (linear in the graph): an
//! op moves when each of its readers is a slice of it or an op that moved
//! and slices it, to the rows that cover what they all read when those are
//! fewer than it has (the same rows, or a span of numbered rows: a
//! distilled DeiT reads its class and distillation tokens, rows 0..2); a
//! reader that wants fewer rows than it moved to slices them out. Row-wise: `layer_norm` and `normalize` (a row's statistics are its
//! own), `linear` (a row of the product is that row times the weights),
//! elementwise ops (an operand broadcast along the sliced axis is read
//! whole), casts, and `drop_path` along an axis other than the sample axis
//! (its draw is per sample). The rows kept get the same numbers.
//!
//! Why: a classifier on the class token normalises every token to keep one
//! (timm's and VISSL's `norm`, then `x[:, 0]`), and so the last block's
//! residual adds, its MLP and its attention projection all serve one token
//! in 197: only the attention (whose keys are every token) needs them all.
//! With the slice first, the last block's MLP and projection run on the
//! class token alone, forward and backward (ViT-B/16, batch 256: 5.6 GiB
//! of traffic and 6% of the step's FLOPs), and the backward's gradients of
//! those rows are not zero-padded tensors of every token.

use super::{rebuild, Step};
use crate::ir::{Dim, Graph, IrError, Op, ValueId};
use std::collections::{HashMap, HashSet};

/// A slice along `axis` of rows `start..end`.
type Rows = (usize, Dim, Dim);

fn slice_of(op: &Op) -> Option<Rows> {
    match *op {
        Op::Slice { axis, start, end } => Some((axis, start, end)),
        _ => None,
    }
}

/// For each operand of `p`, whether the slice `rows` of p's result reads a
/// slice of it (`Some(axis)`, its own axis) or all of it (`None`, an
/// operand that is the same for every row); `None` overall when p is not
/// row-wise along `rows`.
fn sliced_operands(g: &Graph, p: ValueId, (axis, _, _): Rows) -> Option<Vec<Option<usize>>> {
    let rank = g.ty(p).shape.rank();
    if axis + 1 >= rank {
        return None;
    }
    let n = g.operands(p).len();
    let first_only = || Some((0..n).map(|i| (i == 0).then_some(axis)).collect());
    match g.node(p).op {
        Op::LayerNorm { .. } | Op::Normalize { .. } | Op::Linear => first_only(),
        Op::Unary(_) | Op::Cast { .. } => first_only(),
        Op::DropPath { .. } if axis > 0 => first_only(),
        // Broadcast from the right: an operand's dim at the sliced axis
        // either is the result's (sliced too) or 1 or absent (read whole).
        Op::Binary(_) => {
            let out = g.ty(p).shape.dims().to_vec();
            let per = |o: ValueId| {
                let dims = g.ty(o).shape.dims();
                let at = (axis + dims.len()).checked_sub(rank)?;
                (dims[at] == out[axis] && dims[at] != Dim::Const(1)).then_some(at)
            };
            Some(g.operands(p).into_iter().map(per).collect())
        }
        _ => None,
    }
}

/// The rows user `u` reads of `p`: a slice's own; for an op that moves
/// (`moved`), the rows it asks of p where it slices every use of p; `None`
/// when u reads p whole.
fn rows_read(g: &Graph, u: ValueId, p: ValueId, moved: &HashMap<ValueId, (Rows, Vec<Option<usize>>)>) -> Option<Rows> {
    if let Some(rows) = slice_of(&g.node(u).op) {
        return Some(rows);
    }
    let ((_, start, end), which) = moved.get(&u)?;
    let mut asked = None;
    for (&o, at) in g.operands(u).iter().zip(which) {
        if o == p {
            let rows = (at.as_ref().copied()?, *start, *end);
            if asked.is_some_and(|a| a != rows) {
                return None;
            }
            asked = Some(rows);
        }
    }
    asked
}

/// The rows that cover every one `asked` (one axis): those rows when all
/// ask the same, else the span from the first start to the last end when
/// the bounds are numbers (a distilled DeiT's class and distillation
/// tokens, rows 0 and 1: rows 0..2).
fn covering(asked: &[Rows]) -> Option<Rows> {
    let (&first, rest) = asked.split_first()?;
    if rest.iter().all(|&r| r == first) {
        return Some(first);
    }
    let bound = |d: Dim| d.as_const();
    let mut span = (bound(first.1)?, bound(first.2)?);
    for &(axis, start, end) in rest {
        if axis != first.0 {
            return None;
        }
        span = (span.0.min(bound(start)?), span.1.max(bound(end)?));
    }
    Some((first.0, Dim::Const(span.0), Dim::Const(span.1)))
}

/// `x`'s rows `want` (along `want`'s axis), where x holds rows `has` of
/// that axis (`None`: all of them): x itself when they are those rows, else
/// a slice of x rebased to where its rows start.
fn rows_of_value(new: &mut Graph, x: ValueId, has: Option<Rows>, want: Rows, scope: &str) -> Result<ValueId, IrError> {
    let (axis, start, end) = want;
    let (start, end) = match has {
        Some(h) if h == want => return Ok(x),
        Some((_, from, _)) => match (start.sub(from), end.sub(from)) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(IrError::Invalid("slice-first: rows outside the rows an op was moved to".into())),
        },
        None => (start, end),
    };
    new.add_op(Op::Slice { axis, start, end }, &[x], scope)
}

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let pinned: HashSet<ValueId> = g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect();
    // Readers before what they read: an op moves when every reader asks
    // rows of it (a slice, or an op that moved and slices it) and the rows
    // that cover them all are fewer than the op has.
    // op -> (its rows, which operands it slices).
    let mut moved: HashMap<ValueId, (Rows, Vec<Option<usize>>)> = HashMap::new();
    for p in g.topo_order()?.into_iter().rev() {
        if pinned.contains(&p) || g.node(p).op.is_leaf() {
            continue;
        }
        let asked: Option<Vec<Rows>> = g.users(p).into_iter().map(|u| rows_read(g, u, p, &moved)).collect();
        let Some(rows) = asked.as_deref().and_then(covering) else { continue };
        let (axis, start, end) = rows;
        let every = g.ty(p).shape.dims().get(axis).is_some_and(|&d| start == Dim::Const(0) && end == d);
        if every {
            continue;
        }
        if let Some(which) = sliced_operands(g, p, rows) {
            moved.insert(p, (rows, which));
        }
    }
    let count = moved.len();
    let rows_held = |o: &ValueId| moved.get(o).map(|m| m.0);
    *g = rebuild(g, |old, v, new, map| {
        // A moved op on its rows, where it stood; an operand that moved
        // holds rows already (all of these, or more).
        if let Some(((_, start, end), which)) = moved.get(&v) {
            let scope = &old.node(v).scope;
            let mut args = Vec::with_capacity(which.len());
            for (&o, at) in old.operands(v).iter().zip(which) {
                args.push(match at {
                    Some(axis) => rows_of_value(new, map[&o], rows_held(&o), (*axis, *start, *end), scope)?,
                    None => map[&o],
                });
            }
            return Ok(Step::Use(new.add_op(old.node(v).op.clone(), &args, scope)?));
        }
        // A slice of a moved op: that op, or a slice of its rows.
        match (old.operands(v).first(), slice_of(&old.node(v).op)) {
            (Some(p), Some(want)) if moved.contains_key(p) => {
                Ok(Step::Use(rows_of_value(new, map[p], rows_held(p), want, &old.node(v).scope)?))
            }
            _ => Ok(Step::Copy),
        }
    })?;
    Ok(format!("{count} row-wise ops applied to the rows a slice keeps"))
}

#[cfg(test)]
mod tests {
    use crate::ir::{BinaryOp, DType, Dim, Graph, Op, Shape, UnaryOp};

    fn cls_norm(named_norm: bool, axis: usize) -> Graph {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[2, 5, 4]), DType::F32).unwrap();
        let w = g.add_input("w", Shape::consts(&[4]), DType::F32).unwrap();
        let b = g.add_input("b", Shape::consts(&[4]), DType::F32).unwrap();
        let n = g.add_op(Op::LayerNorm { eps: 1e-6 }, &[x, w, b], "trunk.norm").unwrap();
        let end = Dim::Const(if axis == 1 { 1 } else { 2 });
        let s = g.add_op(Op::Slice { axis, start: Dim::Const(0), end }, &[n], "trunk").unwrap();
        g.set_output("cls", s);
        if named_norm {
            g.set_output("all", n);
        }
        g
    }

    #[test]
    fn the_norm_moves_after_a_slice_of_rows() {
        let mut g = cls_norm(false, 1);
        assert!(super::run(&mut g).unwrap().starts_with("1 row-wise"));
        g.verify().unwrap();
        let out = g.outputs()[0].1;
        assert!(matches!(g.node(out).op, Op::LayerNorm { .. }));
        assert_eq!(g.node(out).scope, "trunk.norm");
        let rows = g.operands(out)[0];
        assert_eq!(g.node(rows).op, Op::Slice { axis: 1, start: Dim::Const(0), end: Dim::Const(1) });
        assert_eq!(g.ty(rows).shape, Shape::consts(&[2, 1, 4]));
        assert_eq!(g.ty(out).shape, Shape::consts(&[2, 1, 4]));
    }

    #[test]
    fn a_slice_of_the_normalised_axis_or_a_norm_read_elsewhere_stays() {
        for (named, axis) in [(false, 2), (true, 1)] {
            let mut g = cls_norm(named, axis);
            assert!(super::run(&mut g).unwrap().starts_with("0 row-wise"), "named {named}, axis {axis}");
        }
    }

    /// A pre-norm block's tail as the class token reads it: x1 = x0 +
    /// proj(mix(x0)), out = x1 + fc2(gelu(fc1(ln(x1)))), then
    /// ln(out)[:, 0:1]. Everything after the row-mixing op moves behind the
    /// slice; x0, read by the mixing op too, is sliced, not moved.
    #[test]
    fn a_blocks_mlp_and_residuals_run_on_the_kept_rows() {
        let mut g = Graph::new();
        let s = Shape::consts(&[2, 5, 4]);
        let x0 = g.add_input("x0", s.clone(), DType::F32).unwrap();
        let pos = g.add_input("pos", Shape::consts(&[1, 5, 4]), DType::F32).unwrap();
        let w = g.add_input("w", Shape::consts(&[4, 4]), DType::F32).unwrap();
        let bias = g.add_input("bias", Shape::consts(&[4]), DType::F32).unwrap();
        let (ln_w, ln_b) = (bias, bias);
        let x = g.add_op(Op::Binary(BinaryOp::Add), &[x0, pos], "trunk").unwrap();
        // Rows mixed: a reshape round trip stands for attention.
        let flat = g.add_op(Op::Reshape { shape: Shape::consts(&[2, 20]) }, &[x], "attn").unwrap();
        let mixed = g.add_op(Op::Reshape { shape: s.clone() }, &[flat], "attn").unwrap();
        let proj = g.add_op(Op::Linear, &[mixed, w, bias], "attn.proj").unwrap();
        let x1 = g.add_op(Op::Binary(BinaryOp::Add), &[x, proj], "block").unwrap();
        let n2 = g.add_op(Op::LayerNorm { eps: 1e-6 }, &[x1, ln_w, ln_b], "norm2").unwrap();
        let h = g.add_op(Op::Linear, &[n2, w, bias], "fc1").unwrap();
        let a = g.add_op(Op::Unary(UnaryOp::Gelu), &[h], "mlp").unwrap();
        let y = g.add_op(Op::Linear, &[a, w, bias], "fc2").unwrap();
        let out = g.add_op(Op::Binary(BinaryOp::Add), &[x1, y], "block").unwrap();
        let n = g.add_op(Op::LayerNorm { eps: 1e-6 }, &[out, ln_w, ln_b], "norm").unwrap();
        let cls = g.add_op(Op::Slice { axis: 1, start: Dim::Const(0), end: Dim::Const(1) }, &[n], "trunk").unwrap();
        g.set_output("cls", cls);
        let report = super::run(&mut g).unwrap();
        g.verify().unwrap();
        // norm, add, fc2, gelu, fc1, norm2, x1's add, proj; x0 + pos is read
        // by the mixing op too, so its rows are sliced instead.
        assert!(report.starts_with("8 row-wise"), "{report}");
        let one_row = Shape::consts(&[2, 1, 4]);
        let mut linears = 0;
        for v in g.node_ids() {
            match g.node(v).op {
                Op::Linear => {
                    linears += 1;
                    assert_eq!(g.ty(v).shape, one_row, "{}", g.node(v).scope);
                }
                Op::LayerNorm { .. } | Op::Unary(_) => assert_eq!(g.ty(v).shape, one_row),
                _ => {}
            }
        }
        assert_eq!(linears, 3);
        // The slices left: of x (for x1's add) and of the mixed rows (for proj).
        let slices: Vec<_> = g.node_ids().into_iter().filter(|&v| matches!(g.node(v).op, Op::Slice { .. })).collect();
        assert_eq!(slices.len(), 2);
        let sliced: Vec<&str> = slices.iter().map(|&v| g.node(g.operands(v)[0]).op.name()).collect();
        assert!(sliced.contains(&"add") && sliced.contains(&"reshape"), "{sliced:?}");
    }

    /// A distilled DeiT reads two tokens, rows 0 and 1, through two slices:
    /// the norm and the add before it run on rows 0..2, and each slice takes
    /// its row of that. Slices that cover every row move nothing.
    #[test]
    fn two_slices_move_the_op_to_the_rows_that_cover_both() {
        let build = |second: (u64, u64)| {
            let mut g = Graph::new();
            let x = g.add_input("x", Shape::consts(&[2, 5, 4]), DType::F32).unwrap();
            let pos = g.add_input("pos", Shape::consts(&[1, 5, 4]), DType::F32).unwrap();
            let w = g.add_input("w", Shape::consts(&[4]), DType::F32).unwrap();
            let a = g.add_op(Op::Binary(BinaryOp::Add), &[x, pos], "trunk").unwrap();
            let n = g.add_op(Op::LayerNorm { eps: 1e-6 }, &[a, w, w], "trunk.norm").unwrap();
            let rows = |s: u64, e: u64| Op::Slice { axis: 1, start: Dim::Const(s), end: Dim::Const(e) };
            let cls = g.add_op(rows(0, 1), &[n], "cls").unwrap();
            let dist = g.add_op(rows(second.0, second.1), &[n], "dist").unwrap();
            g.set_output("cls", cls);
            g.set_output("dist", dist);
            g
        };
        let mut g = build((1, 2));
        assert!(super::run(&mut g).unwrap().starts_with("2 row-wise"));
        g.verify().unwrap();
        let out = |g: &Graph, name: &str| g.outputs().iter().find(|(n, _)| n == name).unwrap().1;
        let (cls, dist) = (out(&g, "cls"), out(&g, "dist"));
        assert_eq!(g.node(cls).op, Op::Slice { axis: 1, start: Dim::Const(0), end: Dim::Const(1) });
        assert_eq!(g.node(dist).op, Op::Slice { axis: 1, start: Dim::Const(1), end: Dim::Const(2) });
        let norm = g.operands(cls)[0];
        assert_eq!(g.operands(dist), [norm]);
        assert!(matches!(g.node(norm).op, Op::LayerNorm { .. }));
        assert_eq!(g.ty(norm).shape, Shape::consts(&[2, 2, 4]));
        let add = g.operands(norm)[0];
        for o in g.operands(add) {
            assert_eq!(g.node(o).op, Op::Slice { axis: 1, start: Dim::Const(0), end: Dim::Const(2) });
        }
        // Rows 0..1 and 1..5 cover all five: nothing moves.
        let mut g = build((1, 5));
        assert!(super::run(&mut g).unwrap().starts_with("0 row-wise"));
    }

    /// An operand broadcast along the sliced axis is read whole; one with
    /// the axis is sliced too.
    #[test]
    fn broadcast_operands_are_sliced_only_along_their_own_rows() {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[2, 5, 4]), DType::F32).unwrap();
        let pos = g.add_input("pos", Shape::consts(&[1, 5, 4]), DType::F32).unwrap();
        let per_sample = g.add_input("s", Shape::consts(&[2, 1, 4]), DType::F32).unwrap();
        let a = g.add_op(Op::Binary(BinaryOp::Add), &[x, pos], "").unwrap();
        let m = g.add_op(Op::Binary(BinaryOp::Mul), &[a, per_sample], "").unwrap();
        let cls = g.add_op(Op::Slice { axis: 1, start: Dim::Const(1), end: Dim::Const(3) }, &[m], "").unwrap();
        g.set_output("cls", cls);
        assert!(super::run(&mut g).unwrap().starts_with("2 row-wise"));
        g.verify().unwrap();
        let out = g.outputs()[0].1;
        assert_eq!(g.ty(out).shape, Shape::consts(&[2, 2, 4]));
        let [sum, scale] = g.operands(out)[..] else { panic!() };
        assert_eq!(scale, per_sample, "a per-sample factor is read whole");
        for o in g.operands(sum) {
            assert_eq!(g.node(o).op, Op::Slice { axis: 1, start: Dim::Const(1), end: Dim::Const(3) });
        }
        assert_eq!(g.ty(g.operands(sum)[1]).shape, Shape::consts(&[1, 2, 4]));
    }
}
