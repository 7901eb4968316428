//! The body of a `Fused` op: elementwise ops as a small register program.
//! Instruction `i` defines register `i`; its operands name earlier registers.
//! The fused op's result is the last register, evaluated at every element of
//! the output with operands broadcast to the output shape (elementwise ops
//! commute with broadcasting, so a register may hold a smaller shape's values
//! evaluated at the output's positions).

use super::infer::infer;
use super::types::{Shape, TensorType};
pub use tessera_plan::instr::{body_text, Instr};

/// The type of every register of `body` over operands of types `x`,
/// checking each instruction with its unfused op's shape rule.
fn register_types(body: &[Instr], x: &[&TensorType]) -> Result<Vec<TensorType>, String> {
    if body.is_empty() {
        return Err("a fused op needs at least one instruction".into());
    }
    let mut regs: Vec<TensorType> = Vec::with_capacity(body.len());
    for (i, instr) in body.iter().enumerate() {
        let ty = match instr {
            Instr::Operand(k) => (*x
                .get(*k as usize)
                .ok_or_else(|| format!("instruction {i} reads operand {k}, but the op has {} operand(s)", x.len()))?)
            .clone(),
            _ => {
                let args = instr.args();
                if let Some(a) = args.iter().find(|&&a| a as usize >= i) {
                    return Err(format!("instruction {i} reads register {a}, which is not defined before it"));
                }
                let tys: Vec<&TensorType> = args.iter().map(|&a| &regs[a as usize]).collect();
                let op = instr.op().expect("only operands have no op");
                infer(&op, &tys).map_err(|m| format!("instruction {i} ({}): {m}", op.name()))?
            }
        };
        if !ty.dtype.is_float() {
            return Err(format!("instruction {i} is {ty}; fused ops compute on floats only"));
        }
        regs.push(ty);
    }
    Ok(regs)
}

/// The shape every operand of `x` broadcasts to: where kernels evaluate.
fn evaluation_shape(x: &[&TensorType]) -> Result<Shape, String> {
    let mut all = Shape(vec![]);
    for t in x {
        all = super::infer::broadcast(&all, &t.shape)?;
    }
    Ok(all)
}

/// Random instructions must have the evaluation shape, so that their masks
/// index the same positions as the unfused ops'.
fn check_random(body: &[Instr], regs: &[TensorType], shape: &Shape) -> Result<(), String> {
    for (i, instr) in body.iter().enumerate() {
        if instr.random() && &regs[i].shape != shape {
            return Err(format!(
                "{} at instruction {i} is {}, not the output's shape {shape}",
                instr.op().map(|o| o.name()).unwrap_or_default(),
                regs[i],
            ));
        }
    }
    Ok(())
}

/// The result type of `body` over operands of types `x`.
pub(super) fn infer_fused(body: &[Instr], x: &[&TensorType]) -> Result<TensorType, String> {
    let regs = register_types(body, x)?;
    let out = regs.last().expect("non-empty").clone();
    // Kernels evaluate at every element of the operands' broadcast shape, so
    // that must be the result's (an operand larger than the result is an error).
    let all = evaluation_shape(x)?;
    if all != out.shape {
        return Err(format!("the operands broadcast to {all}, but the result is {}", out.shape));
    }
    check_random(body, &regs, &out.shape)?;
    Ok(out)
}

/// The packed type of a `MultiTensor`: every set's registers `results` must
/// have the set's evaluation shape with constant dims, and all one dtype.
pub(super) fn infer_multi(
    body: &[Instr],
    arity: u32,
    results: &[u32],
    x: &[&TensorType],
) -> Result<TensorType, String> {
    let arity = arity as usize;
    if arity == 0 || x.is_empty() || !x.len().is_multiple_of(arity) {
        return Err(format!("{} operand(s) do not make whole sets of {arity}", x.len()));
    }
    if results.is_empty() {
        return Err("a multi-tensor op needs at least one result".into());
    }
    if body.iter().any(Instr::random) {
        return Err("a multi-tensor body has no random instructions (their masks are per tensor)".into());
    }
    let mut dtype = None;
    let mut total = 0u64;
    for (j, set) in x.chunks(arity).enumerate() {
        let regs = register_types(body, set).map_err(|m| format!("set {j}: {m}"))?;
        let shape = evaluation_shape(set).map_err(|m| format!("set {j}: {m}"))?;
        let Some(numel) = shape.0.iter().map(|d| d.as_const()).product::<Option<u64>>() else {
            return Err(format!("set {j} has shape {shape}; multi-tensor sets have constant shapes"));
        };
        for &r in results {
            let ty = regs.get(r as usize).ok_or_else(|| format!("result register {r} does not exist"))?;
            if ty.shape != shape {
                return Err(format!("set {j}: result register {r} is {ty}, not the set's shape {shape}"));
            }
            if *dtype.get_or_insert(ty.dtype) != ty.dtype {
                return Err(format!("set {j}: result register {r} is {ty}; every result has one dtype"));
            }
        }
        total += numel;
    }
    let dtype = dtype.expect("at least one set and one result");
    Ok(TensorType::new(Shape::consts(&[total * results.len() as u64]), dtype))
}
