//! The graph IR: typed op nodes, tensor values with a symbolic batch, a
//! verifier, and stable text and Graphviz forms.
//!
//! Invariants (checked by `verify`): every node's type equals what its op's
//! shape rule infers from its operands; the graph is acyclic; parameter and
//! buffer names are unique; outputs and state updates name existing values,
//! and a state update has its buffer's type.

mod graph;
mod infer;
mod infer_grad;
/// The op vocabulary and value types live in the `plan` crate (the contract
/// with the runtime); the IR uses them as they are.
mod op {
    pub use tessera_plan::op::*;
}
mod types {
    pub use tessera_plan::types::*;
}

pub mod dce;
pub mod dot;
pub mod flops;
pub mod fused;
pub mod text;
pub mod verify;

pub use graph::{Graph, Node, Operand, ValueId};
pub(crate) use infer::infer;
pub use op::{BinaryOp, Op, ReduceOp, UnaryOp};
pub use types::{DType, Dim, Init, Shape, TensorType};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IrError {
    #[error("{op} in `{scope}`: {message}")]
    Shape { op: &'static str, scope: String, message: String },
    #[error("duplicate {what} `{name}`")]
    Duplicate { what: &'static str, name: String },
    #[error("invalid IR: {0}")]
    Invalid(String),
}
