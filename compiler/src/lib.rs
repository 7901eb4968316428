//! tessera's compiler: parse -> elaborate -> graph IR (-> autodiff -> passes -> plan).
//! It never depends on the runtime crate.

pub mod config;
pub mod elaborate;
pub mod ir;
pub mod syntax;
