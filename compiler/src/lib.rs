//! tessera's compiler: parse -> elaborate -> graph IR (-> autodiff -> passes -> plan).
//! It never depends on the runtime crate.

pub mod autodiff;
pub mod compose;
pub mod config;
pub mod elaborate;
pub mod feature_eval;
pub mod ir;
pub mod memory;
pub mod param_groups;
pub mod passes;
pub mod pipeline;
pub mod plan;
pub mod recompute;
pub mod schedule;
pub mod summary;
pub mod syntax;

pub use compose::{compile, CompileError, Compiled};
