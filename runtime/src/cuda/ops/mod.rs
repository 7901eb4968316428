//! The op families of the CUDA backend, one module (and template) each.
//! Each `lower(l, k, op)` appends the launches of plan kernel `k` to the
//! launch list; see `lower.rs` for which op goes where.

pub mod attention;
pub mod elementwise;
pub mod layout;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod softmax;
pub mod state;
