//! Mixed precision (MODEL.AMP_PARAMS.USE_AMP): assigns every value its
//! storage and compute dtype with explicit casts, as PyTorch's autocast does
//! for apex O1 / torch.amp, in bf16 (tessera's AMP type on GPUs):
//! - matrix products, convolutions and attention (and their gradients) run
//!   on bf16 operands and produce bf16;
//! - LayerNorm / BatchNorm and their gradients, softmax, L2 normalisation,
//!   losses and reductions run in f32 (statistics and sums in f32); a
//!   reduction of a bf16 tensor reads it as bf16 and sums in f32
//!   (`reduce_f32`), so no f32 copy of a bf16 gradient is made for a bias;
//! - elementwise ops promote to the widest float of their non-scalar
//!   operands (scalars such as the lr never widen a tensor);
//! - parameters, gradients handed to the optimizer, and optimizer state stay
//!   f32 (master weights): every output and state update keeps its dtype;
//! - the optimizer step (gradient clipping and the update, every op
//!   `autodiff::step` scopes under `optim`) runs in f32 on the f32 copy of
//!   each gradient, as PyTorch's clip_grad_norm_ and optimizer.step run
//!   outside autocast on the f32 .grad: a bf16 gradient is cast to f32 once,
//!   and the clip's sum of squares, coefficient and products read that cast.
//!
//! Each (value, dtype) is cast once and the cast is shared by its readers.
//! The CPU backend holds bf16 values as f32 numbers rounded to bf16, so it
//! computes what a backend storing bf16 in 2 bytes does; the memory plan
//! counts bf16 as 2 bytes.

use super::{mapped, rebuild, Step};
use crate::ir::{DType, Graph, IrError, Op, ValueId};
use std::collections::HashMap;

enum Class {
    /// Computes in the low precision.
    Low,
    /// Computes in f32.
    Full,
    /// Promotes its float operands to their widest dtype.
    Promote,
    /// A matrix product reading a layer norm of an f32 input: the operands at
    /// these positions stay f32 (statistics), the others go low.
    NormProduct(&'static [usize]),
    /// A matrix product whose operands at these positions keep their dtype:
    /// an addend read as the GEMM's C (`matmul(a, b, c)`), which the add it
    /// replaced promoted with the product (an f32 addend is summed in f32
    /// and the sum stays f32, as under autocast).
    AddendProduct(&'static [usize]),
}

fn class(op: &Op, arity: usize) -> Class {
    match op {
        Op::Matmul { .. } if arity == 3 => Class::AddendProduct(&[2]),
        Op::Linear
        | Op::GeluLinear
        | Op::Matmul { .. }
        | Op::MatmulGeluRhs { .. }
        | Op::MatmulGeluGrad { .. }
        | Op::Conv2d { .. }
        | Op::Attention { .. }
        | Op::AttentionGrad { .. }
        | Op::AttentionPacked { .. }
        | Op::AttentionPackedGrad { .. }
        | Op::Conv2dGradInput { .. }
        | Op::Conv2dGradWeight { .. } => Class::Low,
        Op::LayerNormLinear { .. } => Class::NormProduct(&[0, 1, 2]),
        Op::MatmulLayerNormRhs { .. } => Class::NormProduct(&[1, 2, 3]),
        // The bias and the residual stream stay full; the product reads low.
        Op::LinearResidual { .. } => Class::NormProduct(&[2, 3]),
        Op::LayerNorm { .. }
        | Op::Normalize { .. }
        | Op::NormalizeGrad { .. }
        | Op::LayerNormGrad { .. }
        | Op::LayerNormWeightGrad { .. }
        | Op::BatchNorm { .. }
        | Op::BatchStandardize { .. }
        | Op::BatchStandardizeGrad { .. }
        | Op::RunningStat { .. }
        | Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::L2Normalize { .. }
        | Op::CrossEntropy { .. }
        | Op::CrossEntropyGrad { .. }
        | Op::Reduce { .. }
        | Op::SumOfSquares
        | Op::AllReduce { .. } => Class::Full,
        _ => Class::Promote,
    }
}

/// Whether an op belongs to the optimizer step: `autodiff::step` builds
/// clipping in scope `optim.clip` and each update (and SwAV's prototype
/// renormalisation) in `optim.<param>`; no model scope starts with `optim`
/// (they are `trunk`, `heads`, `loss`).
fn in_optimizer_step(scope: &str) -> bool {
    scope.split('.').next() == Some("optim")
}

fn rank_of_float(dt: DType) -> u8 {
    match dt {
        DType::F32 => 2,
        DType::BF16 | DType::F16 => 1,
        DType::I64 => 0,
    }
}

/// `v` as `dtype`, through one shared cast per (value, dtype). A reshape is
/// looked through: `cast(reshape(x))` is `reshape(cast(x))`, so a layer
/// norm's output read by a linear and (reshaped) by its weight gradient is
/// cast once, and only the narrow copy is kept for the backward pass. A
/// narrowing cast is also taken before a permute (the copy then moves the
/// narrow bytes: an image laid out as patches, `patch-linear`) and before
/// a slice that keeps most of its operand (`narrow_first`).
fn cast(
    new: &mut Graph,
    casts: &mut HashMap<(ValueId, DType), ValueId>,
    v: ValueId,
    dtype: DType,
    scope: &str,
) -> Result<ValueId, IrError> {
    let have = new.ty(v).dtype;
    if have == dtype || !have.is_float() {
        return Ok(v);
    }
    if let Some(&c) = casts.get(&(v, dtype)) {
        return Ok(c);
    }
    let op = new.node(v).op.clone();
    let through = match op {
        Op::Reshape { .. } => true,
        Op::Permute { .. } | Op::Slice { .. } => narrow_first(new, v, dtype),
        _ => false,
    };
    let c = if through {
        let source = new.operands(v)[0];
        let node_scope = new.node(v).scope.clone();
        let narrow = cast(new, casts, source, dtype, scope)?;
        new.add_op(op, &[narrow], &node_scope)?
    } else {
        new.add_op(Op::Cast { dtype }, &[v], scope)?
    };
    casts.insert((v, dtype), c);
    Ok(c)
}

/// Whether casting layout op `v` (a permute or a slice) to `dtype` moves
/// fewer bytes as the layout op of the cast operand. Only a narrowing cast:
/// a permute then copies narrow elements; a slice then casts its whole
/// operand, which pays when it keeps at least 3/4 of it (the patch tokens'
/// 196 rows of 197 in a ViT's input gradient: the cast of the whole is the
/// layer norm backward's bf16 copy, `layer-norm-grad`), not for a class
/// token's row.
fn narrow_first(g: &Graph, v: ValueId, dtype: DType) -> bool {
    let source = g.operands(v)[0];
    if dtype.size_bytes() >= g.ty(source).dtype.size_bytes() {
        return false;
    }
    match g.node(v).op {
        Op::Slice { .. } => {
            let kept = |t: ValueId| g.ty(t).shape.numel(1);
            4 * kept(v) >= 3 * kept(source)
        }
        _ => true,
    }
}

pub(super) fn run_bf16(g: &mut Graph) -> Result<String, IrError> {
    run(g, DType::BF16)
}

fn run(g: &mut Graph, low: DType) -> Result<String, IrError> {
    let mut casts: HashMap<(ValueId, DType), ValueId> = HashMap::new();
    let mut low_ops = 0;
    // The dtype each output and state update must keep.
    let named: HashMap<ValueId, DType> =
        g.outputs().iter().chain(g.state_updates()).map(|(_, v)| (*v, g.ty(*v).dtype)).collect();
    let mut new = rebuild(g, |old, v, new, map| {
        let nv = assign(old, v, new, map, &mut casts, &mut low_ops, low)?;
        // A named value made in low precision is cast back right where it is
        // made (a weight gradient: its bf16 copy dies at once), not at the
        // end, and its readers read the cast: the optimizer sees the f32
        // gradient, as PyTorch's .grad of an f32 parameter is.
        if let Some(&want) = named.get(&v) {
            let scope = old.node(v).scope.clone();
            return Ok(Step::Use(cast(new, &mut casts, nv, want, &scope)?));
        }
        Ok(Step::Use(nv))
    })?;
    // Outputs and state updates keep their dtypes: gradients and new weights
    // go back to f32 (the master copy) where a low-precision op made them
    // (the casts made above).
    let old_types: HashMap<String, DType> =
        g.outputs().iter().chain(g.state_updates()).map(|(n, v)| (n.clone(), g.ty(*v).dtype)).collect();
    let mut restored = 0;
    let mut retyped = |new: &mut Graph, named: Vec<(String, ValueId)>| -> Result<Vec<(String, ValueId)>, IrError> {
        named
            .into_iter()
            .map(|(name, v)| {
                let scope = new.node(v).scope.clone();
                let c = cast(new, &mut casts, v, old_types[&name], &scope)?;
                restored += usize::from(c != v);
                Ok((name, c))
            })
            .collect()
    };
    let (outputs, updates) = (std::mem::take(&mut new.outputs), std::mem::take(&mut new.state_updates));
    new.outputs = retyped(&mut new, outputs)?;
    new.state_updates = retyped(&mut new, updates)?;
    let casts_made = casts.len();
    *g = new;
    let narrowed = narrow_bias_sums(g, low)?;
    Ok(format!(
        "{low_ops} ops in {low}, {casts_made} casts ({restored} back to the outputs' dtypes), {narrowed} bias sums read the {low} copy"
    ))
}

/// A bias gradient (a sum over every axis but the last) of a layer norm's
/// input gradient (the residual stream's gradient, f32) that is also cast
/// to `low` for the products that read it becomes `reduce_f32` of that
/// cast: the bias gradient of the linear whose output joined the stream is
/// the sum of the low-precision gradient the linear's products read, as
/// under PyTorch's autocast (the add's backward casts the gradient to the
/// linear's bf16 output type), summed in f32; one read of half the bytes
/// instead of the f32 tensor. So too for that gradient zero-padded (the
/// stream's gradient where only some rows were normalised: `slice-first`),
/// and for a slice of it that is also taken of the cast (the patch tokens'
/// gradient, which a patch embedding's product reads: `patch-linear`).
/// Other sums of the stream's gradient (a position embedding's, over the
/// batch) stay f32, as the gradient of an f32 parameter added to the f32
/// stream is.
fn narrow_bias_sums(g: &mut Graph, low: DType) -> Result<usize, IrError> {
    // An f32 value -> its low copy (a cast, or a slice of one).
    let mut narrow: HashMap<ValueId, ValueId> = HashMap::new();
    let norm_grad = |v: ValueId| matches!(g.node(v).op, Op::NormalizeGrad { .. });
    for v in g.node_ids() {
        if matches!(g.node(v).op, Op::Cast { dtype } if dtype == low) {
            let src = g.operands(v)[0];
            let padded = matches!(g.node(src).op, Op::Pad { .. }) && norm_grad(g.operands(src)[0]);
            if (norm_grad(src) || padded) && g.ty(src).dtype == DType::F32 {
                narrow.entry(src).or_insert(v);
            }
        }
    }
    let copies: Vec<(ValueId, ValueId)> = narrow.iter().map(|(&w, &c)| (w, c)).collect();
    for (wide, copy) in copies {
        for t in g.users(copy).into_iter().filter(|&t| matches!(g.node(t).op, Op::Slice { .. })) {
            if let Some(s) = g.users(wide).into_iter().find(|&s| g.node(s).op == g.node(t).op) {
                narrow.entry(s).or_insert(t);
            }
        }
    }
    let copies: std::collections::HashSet<ValueId> = narrow.values().copied().collect();
    // Copies made early, for a sum that came before them in the order.
    let mut made: HashMap<ValueId, ValueId> = HashMap::new();
    let mut count = 0;
    *g = rebuild(g, |old, v, new, map| {
        if copies.contains(&v) {
            return Ok(Step::Use(make_early(old, v, new, map, &copies, &mut made)?));
        }
        let node = old.node(v);
        let Op::Reduce { op: op @ crate::ir::ReduceOp::Sum, axes, keepdim } = &node.op else { return Ok(Step::Copy) };
        let Some(&copy) = narrow.get(&old.operands(v)[0]) else { return Ok(Step::Copy) };
        let leading: Vec<usize> = (0..old.ty(copy).shape.rank().saturating_sub(1)).collect();
        let bias_like = !leading.is_empty() && *axes == leading;
        if in_optimizer_step(&node.scope) || !bias_like {
            return Ok(Step::Copy);
        }
        count += 1;
        let c = make_early(old, copy, new, map, &copies, &mut made)?;
        let wide = Op::ReduceF32 { op: *op, axes: axes.clone(), keepdim: *keepdim };
        Ok(Step::Use(new.add_op(wide, &[c], &node.scope)?))
    })?;
    Ok(count)
}

/// `v`, one of the low copies `narrow_bias_sums` reads, in `new`: made once,
/// where it is first needed (its operands that are copies too before it).
fn make_early(
    old: &Graph,
    v: ValueId,
    new: &mut Graph,
    map: &HashMap<ValueId, ValueId>,
    copies: &std::collections::HashSet<ValueId>,
    made: &mut HashMap<ValueId, ValueId>,
) -> Result<ValueId, IrError> {
    if let Some(&c) = made.get(&v) {
        return Ok(c);
    }
    let mut operands = Vec::new();
    for o in old.operands(v) {
        operands.push(match map.get(&o) {
            Some(&n) => n,
            None if copies.contains(&o) => make_early(old, o, new, map, copies, made)?,
            None => return Err(IrError::Invalid("amp-bf16: a low copy's operand is not made yet".into())),
        });
    }
    let c = new.add_node_like(old.node(v), &operands)?;
    made.insert(v, c);
    Ok(c)
}

/// Node `v` of `old` added to `new`, its float operands cast as its class says.
fn assign(
    old: &Graph,
    v: ValueId,
    new: &mut Graph,
    map: &HashMap<ValueId, ValueId>,
    casts: &mut HashMap<(ValueId, DType), ValueId>,
    low_ops: &mut usize,
    low: DType,
) -> Result<ValueId, IrError> {
    let node = old.node(v);
    let operands = mapped(old, v, map)?;
    // A cast, or a layer-norm backward's part, has the type its op names.
    if node.op.is_leaf() || matches!(node.op, Op::Cast { .. } | Op::ResultPart { .. }) {
        return new.add_node_like(node, &operands);
    }
    let floats: Vec<usize> = (0..operands.len()).filter(|&i| new.ty(operands[i]).dtype.is_float()).collect();
    let mut args = operands.clone();
    let class = if in_optimizer_step(&node.scope) { Class::Full } else { class(&node.op, operands.len()) };
    // LayerNorm's input and weight gradients read a low-precision dy as it
    // is (statistics and results stay f32): no f32 copy of dy.
    let reads_dy_as_is = match node.op {
        Op::NormalizeGrad { .. } | Op::LayerNormGrad { .. } => matches!(operands.len(), 3 | 4),
        Op::LayerNormWeightGrad { .. } => true,
        _ => false,
    };
    if matches!(class, Class::Full) && reads_dy_as_is {
        for &i in &floats {
            if i != 0 {
                args[i] = cast(new, casts, operands[i], DType::F32, &node.scope)?;
            }
        }
        return new.add_op(node.op.clone(), &args, &node.scope);
    }
    // A reduction of a low-precision tensor reads it as it is and sums in
    // f32 (a bias gradient from a bf16 product's gradient): no f32 copy.
    if let (Class::Full, Op::Reduce { op, axes, keepdim }) = (&class, &node.op) {
        if floats.len() == 1 && new.ty(operands[0]).dtype == low {
            let wide = Op::ReduceF32 { op: *op, axes: axes.clone(), keepdim: *keepdim };
            return new.add_op(wide, &operands, &node.scope);
        }
    }
    match class {
        Class::NormProduct(full) => {
            *low_ops += 1;
            for &i in &floats {
                let want = if full.contains(&i) { DType::F32 } else { low };
                args[i] = cast(new, casts, operands[i], want, &node.scope)?;
            }
        }
        Class::AddendProduct(kept) => {
            *low_ops += 1;
            for &i in floats.iter().filter(|i| !kept.contains(i)) {
                args[i] = cast(new, casts, operands[i], low, &node.scope)?;
            }
        }
        c => {
            let target = match c {
                Class::Low => {
                    *low_ops += 1;
                    Some(low)
                }
                Class::Full => Some(DType::F32),
                // Non-scalar operands decide; scalars follow (lr, eps, counts).
                _ => {
                    let tensors: Vec<usize> =
                        floats.iter().copied().filter(|&i| new.ty(operands[i]).shape.rank() > 0).collect();
                    let deciding = if tensors.is_empty() { &floats } else { &tensors };
                    deciding.iter().map(|&i| new.ty(operands[i]).dtype).max_by_key(|&d| rank_of_float(d))
                }
            };
            if let Some(target) = target {
                for &i in &floats {
                    args[i] = cast(new, casts, operands[i], target, &node.scope)?;
                }
            }
        }
    }
    new.add_op(node.op.clone(), &args, &node.scope)
}

#[cfg(test)]
mod tests {
    use crate::ir::{BinaryOp, DType, Graph, Op, Shape, TensorType, UnaryOp};

    #[test]
    fn matmuls_go_low_norms_full_and_elementwise_promotes() {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[4, 8]), DType::F32).unwrap();
        let w = g.add_param("w", TensorType::f32(Shape::consts(&[8, 8])), crate::ir::Init::Zeros, true, "").unwrap();
        let lr = g.add_input("lr", Shape::scalar(), DType::F32).unwrap();
        let y = g.add_op(Op::Linear, &[x, w], "").unwrap();
        let a = g.add_op(Op::Unary(UnaryOp::Gelu), &[y], "").unwrap();
        let s = g.add_op(Op::Binary(BinaryOp::Mul), &[a, lr], "").unwrap();
        let r = g.add_op(Op::Binary(BinaryOp::Add), &[s, x], "").unwrap();
        let n = g.add_op(Op::Normalize { eps: 1e-6 }, &[s], "").unwrap();
        g.set_output("r", r);
        g.set_output("n", n);
        g.set_output("s", s);
        let report = super::run_bf16(&mut g).unwrap();
        g.verify().unwrap();
        let dtype_of = |name: &str| {
            let v = g.outputs().iter().find(|(n, _)| n == name).unwrap().1;
            g.ty(v).dtype
        };
        // Outputs keep their f32 type; inside, gelu and the scaled value are bf16.
        assert_eq!((dtype_of("r"), dtype_of("n"), dtype_of("s")), (DType::F32, DType::F32, DType::F32));
        let ops: Vec<String> =
            g.node_ids().iter().map(|&v| format!("{} {}", g.node(v).op.name(), g.ty(v).dtype)).collect();
        for want in ["linear bf16", "gelu bf16", "mul bf16", "add f32", "normalize f32"] {
            assert!(ops.iter().any(|o| o == want), "{want} missing: {ops:?}");
        }
        assert!(report.starts_with("1 ops in bf16"), "{report}");
    }

    /// `matmul(a, b, c)` stands for add(matmul(a, b), c), which promoted:
    /// an f32 addend (the contrastive losses' gradient sums) is not rounded
    /// to bf16 and the sum stays f32; a bf16 addend gives a bf16 sum.
    #[test]
    fn a_products_addend_keeps_its_dtype() {
        let mut g = Graph::new();
        let a = g.add_input("a", Shape::consts(&[4, 8]), DType::F32).unwrap();
        let b = g.add_input("b", Shape::consts(&[8, 5]), DType::F32).unwrap();
        let c = g.add_input("c", Shape::consts(&[4, 5]), DType::F32).unwrap();
        let wide = g.add_op(Op::matmul(), &[a, b, c], "").unwrap();
        let p = g.add_op(Op::matmul(), &[a, b], "").unwrap();
        let narrow = g.add_op(Op::matmul(), &[a, b, p], "").unwrap();
        g.set_output("wide", wide);
        g.set_output("narrow", narrow);
        super::run_bf16(&mut g).unwrap();
        g.verify().unwrap();
        let made = |name: &str| g.outputs().iter().find(|(n, _)| n == name).unwrap().1;
        // The f32 addend's sum: f32, made by the product itself (no cast
        // back), reading c itself and a, b in bf16.
        let w = made("wide");
        assert!(matches!(g.node(w).op, Op::Matmul { .. }), "{}", g.node(w).op.name());
        let reads: Vec<DType> = g.operands(w).iter().map(|&o| g.ty(o).dtype).collect();
        assert_eq!(reads, [DType::BF16, DType::BF16, DType::F32]);
        assert_eq!(g.operands(w)[2], g.inputs().iter().find(|(_, n)| *n == "c").unwrap().0);
        // The bf16 addend's sum: bf16, cast back to the output's f32.
        let n = made("narrow");
        assert!(matches!(g.node(n).op, Op::Cast { dtype: DType::F32 }));
        assert_eq!(g.ty(g.operands(n)[0]).dtype, DType::BF16);
    }

    /// The residual stream's gradient (a layer norm's input gradient, f32)
    /// is cast to bf16 for a product; its bias sum reads that cast (made
    /// before the sum even when the product comes later), and a sum of an
    /// f32 value that no product reads stays f32.
    #[test]
    fn a_bias_sum_of_the_residual_gradient_reads_its_bf16_copy() {
        use crate::ir::ReduceOp;
        let mut g = Graph::new();
        let s3 = Shape::consts(&[2, 4, 8]);
        let (dy, x) = (g.add_input("dy", s3.clone(), DType::F32).unwrap(), g.add_input("x", s3, DType::F32).unwrap());
        let w = g.add_param("w", TensorType::f32(Shape::consts(&[8])), crate::ir::Init::Zeros, true, "").unwrap();
        let dx = g.add_op(Op::NormalizeGrad { eps: 1e-6 }, &[dy, x, w], "").unwrap();
        let sum =
            |g: &mut Graph, v| g.add_op(Op::Reduce { op: ReduceOp::Sum, axes: vec![0, 1], keepdim: false }, &[v], "");
        let db = sum(&mut g, dx).unwrap();
        let m = g.add_param("m", TensorType::f32(Shape::consts(&[8, 8])), crate::ir::Init::Zeros, true, "").unwrap();
        let y = g.add_op(Op::Matmul { transpose_a: false, transpose_b: false }, &[dx, m], "").unwrap();
        let other = sum(&mut g, x).unwrap();
        g.set_output("db", db);
        g.set_output("y", y);
        g.set_output("other", other);
        let report = super::run_bf16(&mut g).unwrap();
        g.verify().unwrap();
        assert!(report.ends_with("1 bias sums read the bf16 copy"), "{report}");
        let out = |name: &str| g.outputs().iter().find(|(n, _)| n == name).unwrap().1;
        let db = out("db");
        assert!(matches!(g.node(db).op, Op::ReduceF32 { .. }), "{}", g.node(db).op.name());
        let read = g.operands(db)[0];
        assert_eq!((g.ty(db).dtype, g.node(read).op.name(), g.ty(read).dtype), (DType::F32, "cast", DType::BF16));
        // The product reads the same cast.
        let product = g.node_ids().into_iter().find(|&v| matches!(g.node(v).op, Op::Matmul { .. })).unwrap();
        assert_eq!(g.operands(product)[0], read);
        assert!(matches!(g.node(out("other")).op, Op::Reduce { .. }));
    }

    #[test]
    fn a_sum_of_a_bf16_tensor_reads_it_as_it_is_and_sums_in_f32() {
        use crate::ir::ReduceOp;
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[4, 8]), DType::F32).unwrap();
        let w = g.add_param("w", TensorType::f32(Shape::consts(&[8, 8])), crate::ir::Init::Zeros, true, "").unwrap();
        let y = g.add_op(Op::Linear, &[x, w], "").unwrap();
        // A bias gradient's sum over the rows of a product's (bf16) result.
        let s = g.add_op(Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keepdim: false }, &[y], "").unwrap();
        g.set_output("s", s);
        super::run_bf16(&mut g).unwrap();
        g.verify().unwrap();
        let s = g.outputs()[0].1;
        assert!(matches!(g.node(s).op, Op::ReduceF32 { op: ReduceOp::Sum, .. }), "{}", g.node(s).op.name());
        assert_eq!((g.ty(s).dtype, g.ty(g.operands(s)[0]).dtype), (DType::F32, DType::BF16));
        let casts =
            g.node_ids().into_iter().filter(|&v| matches!(g.node(v).op, Op::Cast { dtype: DType::F32 })).count();
        assert_eq!(casts, 0, "no f32 copy of the product");
    }

    #[test]
    fn gradient_clipping_stays_in_f32_on_the_f32_gradients() {
        use crate::autodiff::{training_step, Optimizer, StepOptions};
        use crate::ir::ReduceOp;
        use crate::param_groups::ParamGroup;
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[4, 8]), DType::F32).unwrap();
        let w = g.add_param("w", TensorType::f32(Shape::consts(&[8, 8])), crate::ir::Init::Zeros, true, "").unwrap();
        let y = g.add_op(Op::Linear, &[x, w], "").unwrap();
        let loss = g.add_op(Op::Reduce { op: ReduceOp::Sum, axes: vec![0, 1], keepdim: false }, &[y], "").unwrap();
        g.set_output("loss", loss);
        let groups = [ParamGroup { name: "all".into(), weight_decay: 0.0, head_lr: false, params: vec!["w".into()] }];
        let opts = StepOptions {
            optimizer: Optimizer::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            clip_max_norm: Some(1.0),
            late_start: vec![],
            normalize_prototypes: false,
            world: 1,
        };
        let mut g = training_step(g, &groups, &opts).unwrap();
        super::run_bf16(&mut g).unwrap();
        g.verify().unwrap();
        // The weight gradient is a bf16 product; clipping reads its f32 cast.
        let clipped = g.outputs().iter().find(|(n, _)| n == "grad.w").unwrap().1;
        assert!(matches!(g.node(clipped).op, Op::Binary(BinaryOp::Mul)), "{}", g.node(clipped).op.name());
        let [grad, coef] = g.operands(clipped)[..] else { panic!("a mul of two operands") };
        let types = (g.ty(clipped).dtype, g.ty(grad).dtype, g.ty(coef).dtype);
        assert_eq!(types, (DType::F32, DType::F32, DType::F32));
        assert!(matches!(g.node(grad).op, Op::Cast { dtype: DType::F32 }));
        assert_eq!(g.ty(g.operands(grad)[0]).dtype, DType::BF16, "the gradient itself is made in bf16");
        // The norm reads the same f32 gradient, and nothing of the step is bf16.
        let norm = g.node_ids().into_iter().find(|&v| matches!(g.node(v).op, Op::SumOfSquares)).unwrap();
        assert_eq!(g.operands(norm), vec![grad]);
        for v in g.node_ids() {
            let node = g.node(v);
            if node.scope.starts_with("optim") {
                assert_eq!(g.ty(v).dtype, DType::F32, "{} in {} is {}", node.op.name(), node.scope, g.ty(v).dtype);
            }
        }
    }
}
