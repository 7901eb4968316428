//! tessera's plans: the only thing the compiler and the runtime share.
//!
//! A plan (`Plan`) is a static, versioned, serde-serialisable program for one
//! batch size: values with fixed shapes and dtypes, kernels in execution
//! order (each an `Op` of the vocabulary in `op`, fused bodies as `Instr`
//! register programs), the tables of parameters, gradients, optimizer state
//! and buffers, and the memory plan (`memory::MemoryPlan`): where every value
//! lives. The compiler makes plans (`tessera_compiler::plan::lower`,
//! `tessera_compiler::memory::plan_memory`); backends run them.
//!
//! Invariants: this crate depends on nothing of tessera's; it holds no
//! graph, no device pointer and no weights; `Plan::validate` and
//! `MemoryPlan::check` are what a backend calls on a plan it did not make.

pub mod cost;
pub mod instr;
pub mod memory;
pub mod op;
pub mod plan;
pub mod scratch;
pub mod types;

pub use instr::Instr;
pub use memory::{MemoryPlan, Placement, Region};
pub use op::{BinaryOp, Op, ReduceOp, UnaryOp};
pub use plan::{Kernel, Plan, Source, Tables, Target, Value, GRADIENT_ALL_REDUCE_SCOPE, PLAN_VERSION};
pub use types::{DType, Dim, Init, Shape, TensorType};
