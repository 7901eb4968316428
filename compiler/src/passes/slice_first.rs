//! Rule `slice-before-norm` (forward graph): `slice(layer_norm(x, w, b))`
//! along an axis other than the normalised last one, the norm read by
//! nothing else, becomes `layer_norm(slice(x), w, b)` (and so for
//! `normalize`). A row's norm depends on that row alone, so normalising
//! only the rows kept gives the same numbers. Why: a classifier on the class
//! token normalises every token to keep one (timm's and VISSL's `norm`, then
//! `x[:, 0]`): the forward then normalises 1 row in 197, and the backward's
//! norm gradient covers those rows alone instead of a zero-padded tensor of
//! every token (about 1.2 GB of traffic per ViT-B/16 batch-256 step).

use super::{rebuild, Step};
use crate::ir::{Graph, IrError, Op, ValueId};
use std::collections::{HashMap, HashSet};

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let pinned: HashSet<ValueId> = g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect();
    // slice -> the norm it reads.
    let mut moved: HashMap<ValueId, ValueId> = HashMap::new();
    for v in g.node_ids() {
        let Op::Slice { axis, .. } = g.node(v).op else { continue };
        let [norm] = g.operands(v)[..] else { continue };
        let rowwise = matches!(g.node(norm).op, Op::LayerNorm { .. } | Op::Normalize { .. });
        let rank = g.ty(norm).shape.rank();
        if rowwise && axis + 1 < rank && g.users(norm) == [v] && !pinned.contains(&norm) {
            moved.insert(v, norm);
        }
    }
    let norms: HashSet<ValueId> = moved.values().copied().collect();
    let count = moved.len();
    *g = rebuild(g, |old, v, new, map| {
        if norms.contains(&v) {
            return Ok(Step::Skip);
        }
        let Some(&norm) = moved.get(&v) else { return Ok(Step::Copy) };
        let operands = old.operands(norm);
        let rows = new.add_op(old.node(v).op.clone(), &[map[&operands[0]]], &old.node(v).scope)?;
        let mut args = vec![rows];
        args.extend(operands[1..].iter().map(|o| map[o]));
        Ok(Step::Use(new.add_op(old.node(norm).op.clone(), &args, &old.node(norm).scope)?))
    })?;
    Ok(format!("{count} norms applied to the rows a slice keeps"))
}

#[cfg(test)]
mod tests {
    use crate::ir::{DType, Dim, Graph, Op, Shape};

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
        assert!(super::run(&mut g).unwrap().starts_with("1 norms"));
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
            assert!(super::run(&mut g).unwrap().starts_with("0 norms"), "named {named}, axis {axis}");
        }
    }
}
