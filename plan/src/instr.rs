//! The body of a `Fused` or `MultiTensor` op: elementwise ops as a small
//! register program. Instruction `i` defines register `i`; its operands name
//! earlier registers. The fused op's result is the last register, evaluated at
//! every element of the output with operands broadcast to the output shape.
//! (The compiler type-checks bodies, `ir/fused.rs`; backends run them.)

use crate::op::{BinaryOp, Op, UnaryOp};
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
    Cast(crate::types::DType, u32),
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
