//! Rule `patch-linear` (forward graph): a convolution whose stride is its
//! kernel and which has no padding (a ViT's patch embedding, timm's
//! `PatchEmbed`), read only as tokens, `transpose(flatten(conv2d(x, w, b),
//! 2), 1, 2)`, becomes a linear over the patches:
//!
//! ```text
//! patches = reshape(permute(reshape(x, [N, C, h, k0, w, k1]), [0, 2, 4, 1, 3, 5]), [N, h w, C k0 k1])
//! tokens  = linear(patches, reshape(w, [O, C k0 k1]), b)
//! ```
//!
//! Each output pixel of such a convolution sees one patch, so the
//! convolution is that product, summed over (channel, row, column) in the
//! order im2col lays a patch out: the same numbers.
//!
//! Why: the convolution wrote [N, O, h, w] and the tokens were a permuted
//! copy of it; its backward permuted the tokens' gradient back and laid it
//! out again as the GPU's GEMM reads it (scratch), and laid the image out
//! as patches a second time. As a linear, the product writes the tokens in
//! place; its weight gradient reads the tokens' gradient and the patches
//! (kept from the forward pass instead of the image, the same bytes) as
//! they are; with mixed precision the image is cast to bf16 before it is
//! laid out (`amp-bf16` moves a narrowing cast above a permute).

use super::{rebuild, Step};
use crate::ir::{Dim, Graph, IrError, Op, Shape, ValueId};
use std::collections::{HashMap, HashSet};

/// The convolution `c` as tokens: the permute that makes them, when c is a
/// patch embedding read only through the flatten and that permute.
fn tokens_of(g: &Graph, c: ValueId, pinned: &HashSet<ValueId>) -> Option<ValueId> {
    let Op::Conv2d { stride, padding: [0, 0] } = g.node(c).op else { return None };
    let (x, w) = (g.operands(c)[0], g.operands(c)[1]);
    let kernel = [g.ty(w).shape.dims()[2].as_const()?, g.ty(w).shape.dims()[3].as_const()?];
    let [_, _, h, wd] = *g.ty(x).shape.dims() else { return None };
    let (h, wd) = (h.as_const()?, wd.as_const()?);
    if kernel != stride || h % kernel[0] != 0 || wd % kernel[1] != 0 {
        return None;
    }
    let only_user = |v: ValueId| match g.users(v)[..] {
        [u] if !pinned.contains(&v) => Some(u),
        _ => None,
    };
    let flat = only_user(c)?;
    let [n, o, ..] = *g.ty(c).shape.dims() else { return None };
    let hw = Dim::Const((h / kernel[0]) * (wd / kernel[1]));
    let flattened = matches!(&g.node(flat).op, Op::Reshape { shape } if *shape == Shape(vec![n, o, hw]));
    let tokens = only_user(flat)?;
    let transposed = matches!(&g.node(tokens).op, Op::Permute { perm } if *perm == [0, 2, 1]);
    (flattened && transposed).then_some(tokens)
}

/// The linear over `x`'s patches that makes the tokens of conv2d(x, w, b).
fn patch_linear(
    new: &mut Graph,
    x: ValueId,
    w: ValueId,
    bias: Option<ValueId>,
    scope: &str,
) -> Result<ValueId, IrError> {
    let [n, c, h, wd] = *new.ty(x).shape.dims() else { unreachable!("conv2d's input is [N, C, H, W]") };
    let [o, _, k0, k1] = *new.ty(w).shape.dims() else { unreachable!("conv2d's weight is [O, C, kh, kw]") };
    let konst = |d: Dim| d.as_const().expect("checked by tokens_of");
    let (c, k0, k1) = (konst(c), konst(k0), konst(k1));
    let (gh, gw) = (konst(h) / k0, konst(wd) / k1);
    let cut = Shape(vec![n, Dim::Const(c), Dim::Const(gh), Dim::Const(k0), Dim::Const(gw), Dim::Const(k1)]);
    let cut = new.add_op(Op::Reshape { shape: cut }, &[x], scope)?;
    let grouped = new.add_op(Op::Permute { perm: vec![0, 2, 4, 1, 3, 5] }, &[cut], scope)?;
    let rows = Shape(vec![n, Dim::Const(gh * gw), Dim::Const(c * k0 * k1)]);
    let patches = new.add_op(Op::Reshape { shape: rows }, &[grouped], scope)?;
    let weight = new.add_op(Op::Reshape { shape: Shape(vec![o, Dim::Const(c * k0 * k1)]) }, &[w], scope)?;
    let mut operands = vec![patches, weight];
    operands.extend(bias);
    new.add_op(Op::Linear, &operands, scope)
}

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let pinned: HashSet<ValueId> = g.outputs().iter().chain(g.state_updates()).map(|(_, v)| *v).collect();
    // conv -> its tokens permute, for every patch embedding.
    let embeds: HashMap<ValueId, ValueId> =
        g.node_ids().into_iter().filter_map(|c| Some((c, tokens_of(g, c, &pinned)?))).collect();
    let count = embeds.len();
    let replaced: HashSet<ValueId> = embeds.iter().flat_map(|(&c, &t)| [c, g.operands(t)[0]]).collect();
    let mut made: HashMap<ValueId, ValueId> = HashMap::new();
    *g = rebuild(g, |old, v, new, map| {
        if let Some(&tokens) = embeds.get(&v) {
            let operands: Vec<ValueId> = old.operands(v).iter().map(|o| map[o]).collect();
            let lin = patch_linear(new, operands[0], operands[1], operands.get(2).copied(), &old.node(v).scope)?;
            made.insert(tokens, lin);
            return Ok(Step::Skip);
        }
        if replaced.contains(&v) {
            return Ok(Step::Skip);
        }
        Ok(made.get(&v).map_or(Step::Copy, |&lin| Step::Use(lin)))
    })?;
    Ok(format!("{count} patch embeddings as a linear over the patches"))
}

#[cfg(test)]
mod tests {
    use crate::ir::{DType, Dim, Graph, Init, Op, Shape, TensorType};

    /// timm's PatchEmbed on [B, 3, 8, 12] with 4x4 patches into 5 channels;
    /// `stride` and `padding` of the convolution, the tokens an output, the
    /// convolution too when `named`.
    fn embed(stride: u64, padding: u64, named: bool) -> Graph {
        let mut g = Graph::new();
        let x =
            g.add_input("x", Shape(vec![Dim::B, Dim::Const(3), Dim::Const(8), Dim::Const(12)]), DType::F32).unwrap();
        let w = g.add_param("w", TensorType::f32(Shape::consts(&[5, 3, 4, 4])), Init::Zeros, true, "").unwrap();
        let b = g.add_param("b", TensorType::f32(Shape::consts(&[5])), Init::Zeros, true, "").unwrap();
        let conv = Op::Conv2d { stride: [stride; 2], padding: [padding; 2] };
        let c = g.add_op(conv, &[x, w, b], "trunk.patch_embed.proj").unwrap();
        let [n, o, h, wd] = *g.ty(c).shape.dims() else { unreachable!() };
        let hw = h.mul(wd).unwrap();
        let f = g.add_op(Op::Reshape { shape: Shape(vec![n, o, hw]) }, &[c], "trunk.patch_embed.proj").unwrap();
        let t = g.add_op(Op::Permute { perm: vec![0, 2, 1] }, &[f], "trunk.patch_embed.proj").unwrap();
        g.set_output("tokens", t);
        if named {
            g.set_output("conv", c);
        }
        g
    }

    #[test]
    fn a_patch_embedding_becomes_a_linear_over_the_patches() {
        let mut g = embed(4, 0, false);
        assert_eq!(super::run(&mut g).unwrap(), "1 patch embeddings as a linear over the patches");
        g.verify().unwrap();
        let out = g.outputs()[0].1;
        assert_eq!(g.node(out).op, Op::Linear);
        assert_eq!(g.node(out).scope, "trunk.patch_embed.proj");
        assert_eq!(g.ty(out).shape, Shape(vec![Dim::B, Dim::Const(6), Dim::Const(5)]));
        let [patches, weight, _bias] = g.operands(out)[..] else { panic!("linear(x, w, b)") };
        assert_eq!(g.ty(weight).shape, Shape::consts(&[5, 48]));
        assert_eq!(g.ty(patches).shape, Shape(vec![Dim::B, Dim::Const(6), Dim::Const(48)]));
        let grouped = g.operands(patches)[0];
        assert_eq!(g.node(grouped).op, Op::Permute { perm: vec![0, 2, 4, 1, 3, 5] });
        let cut = g.operands(grouped)[0];
        let want = Shape(vec![Dim::B, Dim::Const(3), Dim::Const(2), Dim::Const(4), Dim::Const(3), Dim::Const(4)]);
        assert_eq!(g.ty(cut).shape, want);
        assert!(g.node_ids().iter().all(|&v| !matches!(g.node(v).op, Op::Conv2d { .. })));
    }

    #[test]
    fn overlapping_padded_or_otherwise_read_convolutions_stay() {
        for (stride, padding, named) in [(2, 0, false), (4, 1, false), (4, 0, true)] {
            let mut g = embed(stride, padding, named);
            assert!(
                super::run(&mut g).unwrap().starts_with("0 patch"),
                "stride {stride}, padding {padding}, named {named}"
            );
        }
    }
}
