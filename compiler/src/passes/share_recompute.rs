//! Rule `share-recompute`: an activation the forward pass did not keep is
//! recomputed once in the backward pass, not twice. `fuse-into-matmul`
//! leaves two kernels per GELU and per layer norm that rebuild the same
//! activation from the same input:
//! - `matmul_gelu_rhs(dy, h)` (the weight gradient of the linear after the
//!   GELU) writes GELU(h) to scratch and reads it back, and
//!   `matmul_gelu_grad(dy', w, h)` reads h again for GELU'(h) in its
//!   epilogue;
//! - `matmul_layer_norm_rhs(dy, x, w, b)` (the weight gradient of the
//!   linear after the norm) normalises x into scratch, and
//!   `layer_norm_grad(dy', x, w[, r])` reads x again and recomputes the
//!   same row statistics.
//!
//! The second kernel of each pair writes the activation as its result 5
//! (`matmul_gelu_grad { gelu }`, `layer_norm_grad { normalized }`, which
//! then also reads the norm's bias), and the weight gradient becomes a plain
//! `matmul` of that result: the input is read once, the activation written
//! and read once, and no scratch pass remains (per ViT-B/16 block and
//! batch 256, 296 MiB for the GELU and 148 MiB per norm). The activation
//! is the one the replaced kernel made, in its operand type (the product's
//! left operand's: bf16 under AMP), so the products read the same numbers.
//! Issue 14: "casts folded into their producers and consumers"; the
//! products' prologues as a recomputation shared with the backward kernel.
//!
//! Matched: the backward kernel with the same input (and for a norm the
//! same weight and eps) that makes no result 5 yet. A kernel after its
//! product moves up to where the product stood, the product right after
//! it, so its operands must be made before the product (or be made from
//! values that are, such as the zero padding of a gradient of fewer rows,
//! made again there); a kernel before its product keeps its place (the
//! norm's bias must be made before it) and the product keeps its own, the
//! activation living between them. Another weight-gradient product of the
//! same activation (ConViT's norm1 feeds its qk and v linears) reads the
//! same result 5: where it stands when the kernel is made by then, else
//! right after the kernel, with the values that read it before then.

use super::{rebuild, Step};
use crate::ir::{DType, Graph, IrError, Op, ValueId};
use std::collections::HashMap;

/// A weight-gradient product's backward kernel, which will make its operand.
struct Pair {
    kernel: ValueId,
    /// The kernel's new op, with result 5 of the activation's type.
    op: Op,
    /// The norm's bias, appended to the kernel's operands.
    bias: Option<ValueId>,
    /// The kernel's operands made after the product (see `late_operands`).
    hoisted: Vec<ValueId>,
}

/// The type of result 5 of a kernel's op (`gelu` or `normalized`).
fn activation_type(op: &Op) -> Option<DType> {
    match *op {
        Op::MatmulGeluGrad { gelu, .. } => gelu,
        Op::LayerNormGrad { normalized, .. } => normalized,
        _ => None,
    }
}

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let order = g.topo_order()?;
    let position: HashMap<ValueId, usize> = order.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let mut pairs: HashMap<ValueId, Pair> = HashMap::new();
    let mut taken = std::collections::HashSet::new();
    let mut hoist_of = std::collections::HashSet::new();
    for &v in &order {
        let operands = g.operands(v);
        let found = match g.node(v).op {
            Op::MatmulGeluRhs { .. } => {
                let [a, h] = operands[..] else { continue };
                let dtype = g.ty(a).dtype;
                g.users(h).into_iter().find_map(|k| match g.node(k).op {
                    Op::MatmulGeluGrad { transpose_a: ta, transpose_b: tb, row_sum, gelu: None }
                        if g.operands(k).get(2) == Some(&h) =>
                    {
                        let op = Op::MatmulGeluGrad { transpose_a: ta, transpose_b: tb, row_sum, gelu: Some(dtype) };
                        Some(Pair { kernel: k, op, bias: None, hoisted: vec![] })
                    }
                    _ => None,
                })
            }
            Op::MatmulLayerNormRhs { eps, .. } => {
                let [a, x, w, b] = operands[..] else { continue };
                let dtype = g.ty(a).dtype;
                g.users(x).into_iter().find_map(|k| match g.node(k).op {
                    Op::LayerNormGrad { eps: e, copy, normalized: None }
                        if e == eps && g.operands(k).get(1) == Some(&x) && g.operands(k).get(2) == Some(&w) =>
                    {
                        let op = Op::LayerNormGrad { eps, copy, normalized: Some(dtype) };
                        Some(Pair { kernel: k, op, bias: Some(b), hoisted: vec![] })
                    }
                    _ => None,
                })
            }
            _ => continue,
        };
        // The product reads the activation as rows.
        let Some(mut pair) = found.filter(|p| g.ty(p.kernel).shape.as_rows().is_some()) else { continue };
        // A kernel after the product moves up to it (the bias is the
        // product's operand, made before it); one before it stays, and then
        // the bias must be made before the kernel too.
        let at = position[&v].min(position[&pair.kernel]);
        if pair.bias.is_some_and(|b| position[&b] >= at) {
            continue;
        }
        let Some(late) = super::late_operands(g, &g.operands(pair.kernel), at, &position) else { continue };
        // A node is made again for one pair, and is no pair's kernel.
        let clash = taken.contains(&pair.kernel)
            || hoist_of.contains(&pair.kernel)
            || hoist_of.contains(&v)
            || late.iter().any(|h| hoist_of.contains(h) || taken.contains(h) || pairs.contains_key(h));
        if !clash {
            taken.insert(pair.kernel);
            hoist_of.extend(late.iter().copied());
            pair.hoisted = late;
            pairs.insert(v, pair);
        }
    }
    let product_of: HashMap<ValueId, ValueId> = pairs.iter().map(|(&v, p)| (p.kernel, v)).collect();
    // Another weight gradient of the same activation (ConViT's qk and v
    // products both read norm1's output) reads the paired kernel's result 5
    // too: where it stands when the kernel is made by then, else right
    // after the kernel (its gradient operand is made before it either way).
    let mut sharers: HashMap<ValueId, ValueId> = HashMap::new();
    for &v in &order {
        if pairs.contains_key(&v) {
            continue;
        }
        let operands = g.operands(v);
        let kernel = match g.node(v).op {
            Op::MatmulGeluRhs { .. } => operands
                .get(1)
                .and_then(|&h| g.users(h).into_iter().find(|k| taken.contains(k) && g.operands(*k).get(2) == Some(&h))),
            Op::MatmulLayerNormRhs { eps, .. } => {
                let [_, x, w, b] = operands[..] else { continue };
                g.users(x).into_iter().find(|&k| {
                    let p = product_of.get(&k).map(|q| &pairs[q]);
                    let same_norm = matches!(g.node(k).op, Op::LayerNormGrad { eps: e, .. } if e == eps);
                    same_norm && p.is_some_and(|p| p.bias == Some(b)) && g.operands(k)[1..3] == [x, w]
                })
            }
            _ => continue,
        };
        let Some(k) = kernel else { continue };
        let dtype = g.ty(operands[0]).dtype;
        if activation_type(&pairs[&product_of[&k]].op) == Some(dtype) {
            sharers.insert(v, k);
        }
    }
    let (mut gelus, mut norms) = (0, 0);
    // Old kernel -> its new node, once made; the products waiting for it;
    // its result 5 viewed as rows, once made (one part per kernel).
    let mut kernels_made: HashMap<ValueId, ValueId> = HashMap::new();
    let mut waiting: HashMap<ValueId, Vec<ValueId>> = HashMap::new();
    let mut rows_of: HashMap<ValueId, ValueId> = HashMap::new();
    // Nodes skipped until a kernel is made (a sharer and its readers).
    let mut deferred: HashMap<ValueId, ValueId> = HashMap::new();
    *g = rebuild(g, |old, v, new, map| {
        if hoist_of.contains(&v) {
            // Made where its kernel moved to.
            return Ok(Step::Skip);
        }
        // What `v` is: a pair's kernel (with its first product), or a
        // product (a pair's or a sharer's) of a kernel, made or not yet.
        let kernel_of_product = match (pairs.get(&v), sharers.get(&v)) {
            (Some(p), _) => Some(p.kernel),
            (None, Some(&k)) => Some(k),
            (None, None) => None,
        };
        let made_kernel = kernel_of_product.and_then(|k| kernels_made.get(&k).copied());
        if let (Some(k), None, true) = (kernel_of_product, made_kernel, sharers.contains_key(&v)) {
            // A sharer before its kernel waits for it, and so does what
            // reads it before then (its cast to the master weight's f32).
            waiting.entry(k).or_default().push(v);
            deferred.insert(v, k);
            return Ok(Step::Skip);
        }
        if let Some(&k) = old.operands(v).iter().find_map(|o| deferred.get(o)) {
            if product_of.contains_key(&v) || pairs.contains_key(&v) {
                return Err(IrError::Invalid("share-recompute: a joined kernel or product reads a moved one".into()));
            }
            waiting.entry(k).or_default().push(v);
            deferred.insert(v, k);
            return Ok(Step::Skip);
        }
        // The weight-gradient product `w` (a pair's or a sharer's) as a
        // matmul of kernel `k`'s result 5, made as `kn`, viewed as rows.
        let mut product = |w: ValueId, k: ValueId, kn: ValueId, new: &mut Graph, map: &HashMap<ValueId, ValueId>| {
            let node = old.node(w);
            let p = &pairs[&product_of[&k]];
            let (
                Some(dtype),
                Some(shape),
                Op::MatmulGeluRhs { transpose_a, transpose_b }
                | Op::MatmulLayerNormRhs { transpose_a, transpose_b, .. },
            ) = (activation_type(&p.op), old.ty(k).shape.as_rows(), &node.op)
            else {
                return Err(IrError::Invalid("share-recompute pairs a weight-gradient product with a result 5".into()));
            };
            let rows = match rows_of.get(&k) {
                Some(&r) => r,
                None => {
                    let activation = new.add_op(Op::ResultPart { index: 5, dtype }, &[kn], &node.scope)?;
                    let r = new.add_op(Op::Reshape { shape }, &[activation], &node.scope)?;
                    rows_of.insert(k, r);
                    r
                }
            };
            let a = map[&old.operands(w)[0]];
            new.add_op(Op::Matmul { transpose_a: *transpose_a, transpose_b: *transpose_b }, &[a, rows], &node.scope)
        };
        // The kernel with its result 5, where the first of the pair stood,
        // then the products that waited for it.
        let mut make_kernel = |k: ValueId, new: &mut Graph, map: &HashMap<ValueId, ValueId>| {
            let p = &pairs[&product_of[&k]];
            let mut made = super::remake(old, &p.hoisted, new, map)?;
            let mut args: Vec<ValueId> = old.operands(k).iter().map(|&o| super::mapped_with(o, &made, map)).collect();
            args.extend(p.bias.map(|b| map[&b]));
            match p.op {
                Op::LayerNormGrad { .. } => norms += 1,
                _ => gelus += 1,
            }
            let kernel = new.add_op(p.op.clone(), &args, &old.node(k).scope)?;
            kernels_made.insert(k, kernel);
            made.push((k, kernel));
            // In their order: each reads the product or a value before it.
            for w in waiting.remove(&k).unwrap_or_default() {
                deferred.remove(&w);
                let nw = if sharers.get(&w) == Some(&k) {
                    product(w, k, kernel, new, map)?
                } else {
                    let ready = |o: &ValueId| map.contains_key(o) || made.iter().any(|(h, _)| h == o);
                    if !old.operands(w).iter().all(ready) {
                        return Err(IrError::Invalid("share-recompute: a value waits for two kernels".into()));
                    }
                    let args: Vec<ValueId> =
                        old.operands(w).iter().map(|&o| super::mapped_with(o, &made, map)).collect();
                    new.add_node_like(old.node(w), &args)?
                };
                made.push((w, nw));
            }
            Ok::<_, IrError>((kernel, made))
        };
        if let Some(first) = product_of.get(&v) {
            // A kernel that stands before its product keeps its place.
            return match map.contains_key(first) {
                true => Ok(Step::Skip),
                false => Ok(Step::Map(make_kernel(v, new, map)?.1)),
            };
        }
        let Some(k) = kernel_of_product else { return Ok(Step::Copy) };
        let (kernel, mut made) = match made_kernel {
            Some(kn) => (kn, vec![]),
            None => make_kernel(k, new, map)?,
        };
        made.push((v, product(v, k, kernel, new, map)?));
        Ok(Step::Map(made))
    })?;
    Ok(format!(
        "{gelus} GELUs and {norms} layer norms recomputed once for the backward (by the kernel of their gradient), for {} weight gradients",
        gelus + norms + sharers.len()
    ))
}

#[cfg(test)]
mod tests {
    use crate::ir::{DType, Graph, Op, Shape};

    fn out(g: &Graph, name: &str) -> crate::ir::ValueId {
        g.outputs().iter().find(|(n, _)| n == name).unwrap().1
    }

    /// An MLP's backward inputs: fc2's output gradient as rows [6, 4] and
    /// as [2, 3, 4], fc2's weight [4, 8] and the hidden pre-activation h.
    fn mlp_backward_inputs() -> (Graph, [crate::ir::ValueId; 4]) {
        let mut g = Graph::new();
        let dy = g.add_input("dy", Shape::consts(&[6, 4]), DType::BF16).unwrap();
        let dy3 = g.add_input("dy3", Shape::consts(&[2, 3, 4]), DType::BF16).unwrap();
        let w = g.add_input("w", Shape::consts(&[4, 8]), DType::BF16).unwrap();
        let h = g.add_input("h", Shape::consts(&[2, 3, 8]), DType::BF16).unwrap();
        (g, [dy, dy3, w, h])
    }

    /// The ops of `g` in order, leaves left out.
    fn kernels(g: &Graph) -> Vec<&'static str> {
        let order = g.topo_order().unwrap();
        order.into_iter().filter(|&v| !g.node(v).op.is_leaf()).map(|v| g.node(v).op.name()).collect()
    }

    /// An MLP's backward after fusion: fc2's weight gradient, then the
    /// hidden gradient with GELU' as the epilogue.
    #[test]
    fn the_gelu_gradient_writes_the_weight_gradients_operand() {
        let (mut g, [dy, dy3, w, h]) = mlp_backward_inputs();
        let rhs = Op::MatmulGeluRhs { transpose_a: true, transpose_b: false };
        let dw = g.add_op(rhs, &[dy, h], "mlp.fc2").unwrap();
        let grad = Op::MatmulGeluGrad { transpose_a: false, transpose_b: false, row_sum: true, gelu: None };
        let dh = g.add_op(grad, &[dy3, w, h], "mlp").unwrap();
        g.set_output("dw", dw);
        g.set_output("dh", dh);
        assert!(super::run(&mut g).unwrap().starts_with("1 GELUs and 0 layer norms"));
        g.verify().unwrap();
        let (dw, dh) = (out(&g, "dw"), out(&g, "dh"));
        let joined =
            Op::MatmulGeluGrad { transpose_a: false, transpose_b: false, row_sum: true, gelu: Some(DType::BF16) };
        assert_eq!(g.node(dh).op, joined);
        assert_eq!(g.node(dw).op, Op::Matmul { transpose_a: true, transpose_b: false });
        assert_eq!(g.ty(dw).shape, Shape::consts(&[4, 8]));
        // dw = dy^T @ reshape(result 5 of the gradient kernel, [6, 8]).
        let rows = g.operands(dw)[1];
        assert_eq!(g.node(rows).op, Op::Reshape { shape: Shape::consts(&[6, 8]) });
        let act = g.operands(rows)[0];
        assert_eq!(g.node(act).op, Op::ResultPart { index: 5, dtype: DType::BF16 });
        assert_eq!(g.operands(act), [dh]);
        assert_eq!(g.node(dw).scope, "mlp.fc2");
        // The gradient kernel runs first now.
        let order = g.topo_order().unwrap();
        assert!(order.iter().position(|&v| v == dh) < order.iter().position(|&v| v == dw));
    }

    /// The gradient kernel made before the product (another order of the
    /// backward): it keeps its place, its row sum still reads it, and the
    /// product reads its result 5 after it.
    #[test]
    fn a_gradient_kernel_before_its_product_keeps_its_place() {
        let (mut g, [dy, dy3, w, h]) = mlp_backward_inputs();
        let grad = Op::MatmulGeluGrad { transpose_a: false, transpose_b: false, row_sum: true, gelu: None };
        let dh = g.add_op(grad, &[dy3, w, h], "mlp").unwrap();
        let db = g.add_op(Op::ResultPart { index: 1, dtype: DType::F32 }, &[dh], "mlp.fc1").unwrap();
        let rhs = Op::MatmulGeluRhs { transpose_a: true, transpose_b: false };
        let dw = g.add_op(rhs, &[dy, h], "mlp.fc2").unwrap();
        for (name, v) in [("dw", dw), ("dh", dh), ("db", db)] {
            g.set_output(name, v);
        }
        assert!(super::run(&mut g).unwrap().starts_with("1 GELUs"));
        g.verify().unwrap();
        let order = kernels(&g);
        assert_eq!(order, ["matmul_gelu_grad", "result_part", "result_part", "reshape", "matmul"]);
        assert_eq!(g.operands(out(&g, "db")), [out(&g, "dh")]);
        let act = g.operands(g.operands(out(&g, "dw"))[1])[0];
        assert_eq!(g.node(act).op, Op::ResultPart { index: 5, dtype: DType::BF16 });
    }

    /// A pre-norm block's norm: the weight gradient of the linear after it
    /// and the norm's backward.
    fn norm_backward(eps_of_grad: f64, dy_late: bool) -> Graph {
        let mut g = Graph::new();
        let s = Shape::consts(&[2, 3, 4]);
        let a = g.add_input("a", Shape::consts(&[6, 5]), DType::BF16).unwrap();
        let x = g.add_input("x", s.clone(), DType::F32).unwrap();
        let w = g.add_input("w", Shape::consts(&[4]), DType::F32).unwrap();
        let b = g.add_input("b", Shape::consts(&[4]), DType::F32).unwrap();
        let r = g.add_input("r", s.clone(), DType::F32).unwrap();
        let mut dy = g.add_input("dy", s.clone(), DType::BF16).unwrap();
        let rhs = Op::MatmulLayerNormRhs { eps: 1e-6, transpose_a: true, transpose_b: false };
        let dw = g.add_op(rhs, &[a, x, w, b], "fc1").unwrap();
        if dy_late {
            // dy made after the product from a value made after it too: the
            // norm's backward cannot move before the product.
            let t = g.add_op(Op::Unary(crate::ir::UnaryOp::Neg), &[dy], "fc1").unwrap();
            dy = g.add_op(Op::Unary(crate::ir::UnaryOp::Neg), &[t], "fc1").unwrap();
        }
        let grad = Op::LayerNormGrad { eps: eps_of_grad, copy: Some(DType::BF16), normalized: None };
        let dx = g.add_op(grad, &[dy, x, w, r], "norm2").unwrap();
        let dgamma = g.add_op(Op::ResultPart { index: 1, dtype: DType::F32 }, &[dx], "norm2").unwrap();
        g.set_output("dw", dw);
        g.set_output("dx", dx);
        g.set_output("dgamma", dgamma);
        g
    }

    #[test]
    fn the_norm_backward_writes_the_weight_gradients_operand() {
        let mut g = norm_backward(1e-6, false);
        assert!(super::run(&mut g).unwrap().starts_with("0 GELUs and 1 layer norms"));
        g.verify().unwrap();
        let (dw, dx) = (out(&g, "dw"), out(&g, "dx"));
        let joined = Op::LayerNormGrad { eps: 1e-6, copy: Some(DType::BF16), normalized: Some(DType::BF16) };
        assert_eq!(g.node(dx).op, joined);
        // Its operands: dy, x, w, r and then the norm's bias.
        assert_eq!(g.operands(dx).len(), 5);
        assert!(matches!(g.node(g.operands(dx)[4]).op, Op::Input { ref name, .. } if name == "b"));
        assert_eq!(g.node(dw).op, Op::Matmul { transpose_a: true, transpose_b: false });
        let act = g.operands(g.operands(dw)[1])[0];
        assert_eq!(g.node(act).op, Op::ResultPart { index: 5, dtype: DType::BF16 });
        assert_eq!(g.ty(act).shape, Shape::consts(&[2, 3, 4]));
        assert_eq!(g.ty(dw).shape, Shape::consts(&[5, 4]));
        // Its other results still read it.
        assert_eq!(g.operands(out(&g, "dgamma")), [dx]);
    }

    /// A residual gradient made after the product from earlier values (the
    /// zero padding `slice-first` leaves) is made again before the kernel.
    #[test]
    fn a_late_padding_moves_up_with_the_norm_backward() {
        let mut g = Graph::new();
        let s = Shape::consts(&[2, 3, 4]);
        let a = g.add_input("a", Shape::consts(&[6, 5]), DType::BF16).unwrap();
        let x = g.add_input("x", s.clone(), DType::F32).unwrap();
        let w = g.add_input("w", Shape::consts(&[4]), DType::F32).unwrap();
        let dy = g.add_input("dy", s, DType::BF16).unwrap();
        let few = g.add_input("few", Shape::consts(&[2, 1, 4]), DType::F32).unwrap();
        let rhs = Op::MatmulLayerNormRhs { eps: 1e-6, transpose_a: true, transpose_b: false };
        let dw = g.add_op(rhs, &[a, x, w, w], "fc1").unwrap();
        let pad = Op::Pad { axis: 1, before: crate::ir::Dim::Const(0), after: crate::ir::Dim::Const(2) };
        let r = g.add_op(pad, &[few], "block").unwrap();
        let grad = Op::LayerNormGrad { eps: 1e-6, copy: None, normalized: None };
        let dx = g.add_op(grad, &[dy, x, w, r], "norm").unwrap();
        g.set_output("dw", dw);
        g.set_output("dx", dx);
        assert!(super::run(&mut g).unwrap().starts_with("0 GELUs and 1 layer norms"));
        g.verify().unwrap();
        let order = kernels(&g);
        assert_eq!(order, ["pad", "layer_norm_grad", "result_part", "reshape", "matmul"]);
        assert_eq!(
            g.operands(out(&g, "dx"))[3],
            g.topo_order().unwrap().into_iter().find(|&v| g.node(v).op.name() == "pad").unwrap()
        );
    }

    /// ConViT's norm1 feeds two linears (qk and v): the qk weight gradient
    /// (with its cast to f32) stands before the norm's backward, whose dy
    /// sums both products' input gradients and so is made after it; the v
    /// weight gradient stands after. The v product pairs with the norm's
    /// backward; the qk product reads the same result 5, moved (with its
    /// cast) to right after the kernel.
    #[test]
    fn a_second_weight_gradient_of_the_norm_reads_the_same_result() {
        let mut g = Graph::new();
        let s = Shape::consts(&[2, 3, 4]);
        let x = g.add_input("x", s.clone(), DType::F32).unwrap();
        let w = g.add_input("w", Shape::consts(&[4]), DType::F32).unwrap();
        let b = g.add_input("b", Shape::consts(&[4]), DType::F32).unwrap();
        let (d_qk, d_v) =
            (g.add_input("d_qk", s.clone(), DType::BF16).unwrap(), g.add_input("d_v", s, DType::BF16).unwrap());
        let rows = |g: &mut Graph, v| g.add_op(Op::Reshape { shape: Shape::consts(&[6, 4]) }, &[v], "").unwrap();
        let rhs = Op::MatmulLayerNormRhs { eps: 1e-6, transpose_a: true, transpose_b: false };
        let a_qk = rows(&mut g, d_qk);
        let dw_qk = g.add_op(rhs.clone(), &[a_qk, x, w, b], "qk").unwrap();
        let master_qk = g.add_op(Op::Cast { dtype: DType::F32 }, &[dw_qk], "qk").unwrap();
        let dy = g.add_op(Op::Binary(crate::ir::BinaryOp::Add), &[d_qk, d_v], "norm1").unwrap();
        let grad = Op::LayerNormGrad { eps: 1e-6, copy: None, normalized: None };
        let dx = g.add_op(grad, &[dy, x, w], "norm1").unwrap();
        let a_v = rows(&mut g, d_v);
        let dw_v = g.add_op(rhs, &[a_v, x, w, b], "v").unwrap();
        for (name, v) in [("qk", master_qk), ("v", dw_v), ("dx", dx)] {
            g.set_output(name, v);
        }
        let report = super::run(&mut g).unwrap();
        assert_eq!(
            report,
            "0 GELUs and 1 layer norms recomputed once for the backward (by the kernel of their gradient), for 2 weight gradients"
        );
        g.verify().unwrap();
        assert_eq!(
            kernels(&g),
            ["reshape", "add", "layer_norm_grad", "result_part", "reshape", "matmul", "cast", "reshape", "matmul"]
        );
        let (qk, v) = (g.operands(out(&g, "qk"))[0], out(&g, "v"));
        assert_eq!(g.operands(qk)[1], g.operands(v)[1], "both products read the one view of result 5");
        assert_eq!(g.node(qk).scope, "qk");
    }

    /// The plan of the joined norm validates; one whose layer-norm backward
    /// lost its bias operand (the backends would take r for it) does not.
    #[test]
    fn a_plan_checks_the_norm_backwards_operands() {
        let mut g = norm_backward(1e-6, false);
        super::run(&mut g).unwrap();
        let plan = crate::plan::lower(&g, 1, true).unwrap();
        plan.validate().unwrap();
        let mut bad = plan.clone();
        let k = bad.kernels.iter().position(|k| matches!(k.op, Op::LayerNormGrad { .. })).unwrap();
        bad.kernels[k].inputs.pop();
        let err = bad.validate().unwrap_err();
        assert!(err.contains("takes (dy, x, w[, r]) and the norm's bias [D], not 4 operands"), "{err}");
    }

    #[test]
    fn another_eps_or_a_late_gradient_is_left_alone() {
        for g0 in [norm_backward(1e-5, false), norm_backward(1e-6, true)] {
            let mut g = g0;
            let before = g.node_count();
            assert!(super::run(&mut g).unwrap().starts_with("0 GELUs and 0 layer norms"));
            assert_eq!(g.node_count(), before);
            assert!(matches!(g.node(out(&g, "dw")).op, Op::MatmulLayerNormRhs { .. }));
            assert!(matches!(g.node(out(&g, "dx")).op, Op::LayerNormGrad { normalized: None, .. }));
        }
    }
}
