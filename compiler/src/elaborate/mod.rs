//! Elaboration: instantiate DSL blocks with config values, unroll loops and
//! conditionals, resolve parameters and their init specs, and build the IR.
//!
//! Invariants: every IR node is created through `Graph::add_op`, so shapes are
//! checked as the graph is built; a parameter name is declared once per
//! compilation unless sharing is asked for; every error is a `Diagnostic`
//! pointing at DSL source, with the block call stack as notes and the config
//! key of every config-derived value involved.

mod arith;
mod builtins;
mod elab;
mod index;
mod program;
mod value;

pub use elab::{did_you_mean, Elab, Env, R};
pub use program::{BlockRef, Program};
pub use value::{from_json, json_get, Val, V};
