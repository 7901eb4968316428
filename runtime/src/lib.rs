//! tessera's runtime: it reads plans (never the compiler's IR) and executes
//! them on a backend. So far it holds the counter-based random generator that
//! every backend draws masks from.

pub mod philox;
