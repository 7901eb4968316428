//! The body of a `Fused` op: elementwise ops as a small register program.
//! Instruction `i` defines register `i`; its operands name earlier registers.
//! The fused op's result is the last register, evaluated at every element of
//! the output with operands broadcast to the output shape (elementwise ops
//! commute with broadcasting, so a register may hold a smaller shape's values
//! evaluated at the output's positions).

use super::infer::infer;
use super::op::{BinaryOp, Op, UnaryOp};
use super::types::{Shape, TensorType};
use serde::{Deserialize, Serialize};

#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub enum Instr {
    /// The fused op's operand `i`.
    Operand(u32),
    Unary(UnaryOp, u32),
    Binary(BinaryOp, u32, u32),
    Scale(f64, u32),
    AddScalar(f64, u32),
    PowScalar(f64, u32),
    /// `(x, dy)`: dy * GELU'(x).
    GeluGrad(u32, u32),
    /// A float-to-float cast (the storage dtype of mixed precision).
    Cast(super::types::DType, u32),
    /// Dropout of a register of the output's full shape (its mask is indexed
    /// by the flat output index, as the unfused op's).
    Dropout {
        p: f64,
        key: u32,
        x: u32,
    },
    /// Drop path of a register of the output's full shape (one draw per
    /// index along axis 0, as the unfused op's).
    DropPath {
        p: f64,
        key: u32,
        x: u32,
    },
}

impl Instr {
    /// The unfused op this instruction stands for (`None` for operands).
    pub fn op(&self) -> Option<Op> {
        Some(match *self {
            Instr::Operand(_) => return None,
            Instr::Unary(u, _) => Op::Unary(u),
            Instr::Binary(b, _, _) => Op::Binary(b),
            Instr::Scale(factor, _) => Op::Scale { factor },
            Instr::AddScalar(value, _) => Op::AddScalar { value },
            Instr::PowScalar(exponent, _) => Op::PowScalar { exponent },
            Instr::GeluGrad(..) => Op::GeluGrad,
            Instr::Cast(dtype, _) => Op::Cast { dtype },
            Instr::Dropout { p, key, .. } => Op::Dropout { p, key },
            Instr::DropPath { p, key, .. } => Op::DropPath { p, key },
        })
    }

    /// Whether its value depends on the element's position (random masks).
    pub fn random(&self) -> bool {
        matches!(self, Instr::Dropout { .. } | Instr::DropPath { .. })
    }

    /// The same instruction reading register `f(r)` for each register r it
    /// reads (operands unchanged).
    pub fn renumbered(&self, f: impl Fn(u32) -> u32) -> Instr {
        match *self {
            Instr::Operand(k) => Instr::Operand(k),
            Instr::Unary(u, x) => Instr::Unary(u, f(x)),
            Instr::Binary(b, x, y) => Instr::Binary(b, f(x), f(y)),
            Instr::Scale(c, x) => Instr::Scale(c, f(x)),
            Instr::AddScalar(c, x) => Instr::AddScalar(c, f(x)),
            Instr::PowScalar(e, x) => Instr::PowScalar(e, f(x)),
            Instr::GeluGrad(x, y) => Instr::GeluGrad(f(x), f(y)),
            Instr::Cast(d, x) => Instr::Cast(d, f(x)),
            Instr::Dropout { p, key, x } => Instr::Dropout { p, key, x: f(x) },
            Instr::DropPath { p, key, x } => Instr::DropPath { p, key, x: f(x) },
        }
    }

    /// The registers it reads.
    pub fn args(&self) -> Vec<u32> {
        match *self {
            Instr::Operand(_) => vec![],
            Instr::Unary(_, a)
            | Instr::Scale(_, a)
            | Instr::AddScalar(_, a)
            | Instr::PowScalar(_, a)
            | Instr::Cast(_, a)
            | Instr::Dropout { x: a, .. }
            | Instr::DropPath { x: a, .. } => vec![a],
            Instr::Binary(_, a, b) | Instr::GeluGrad(a, b) => vec![a, b],
        }
    }
}

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

/// One line per register, e.g. `r2 = scale 0.9 (r0)`.
pub fn body_text(body: &[Instr]) -> String {
    let mut parts = Vec::with_capacity(body.len());
    for (i, instr) in body.iter().enumerate() {
        let rhs = match instr {
            Instr::Operand(k) => format!("%{k}"),
            _ => {
                let op = instr.op().expect("only operands have no op");
                let attr = match *instr {
                    Instr::Scale(v, _) | Instr::AddScalar(v, _) | Instr::PowScalar(v, _) => format!(" {v}"),
                    Instr::Cast(d, _) => format!(" {d}"),
                    Instr::Dropout { p, key, .. } | Instr::DropPath { p, key, .. } => format!(" p={p} key={key}"),
                    _ => String::new(),
                };
                let args: Vec<String> = instr.args().iter().map(|a| format!("r{a}")).collect();
                format!("{}{attr}({})", op.name(), args.join(", "))
            }
        };
        parts.push(format!("r{i}={rhs}"));
    }
    parts.join("; ")
}
