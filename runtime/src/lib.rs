//! tessera's runtime: it reads plans (never the compiler's IR) and executes
//! them on a backend. It holds the counter-based random generator that every
//! backend draws masks from (`philox`), the CPU backend (`cpu`: the reference
//! executor with a kernel for every op, and the initialisers), and weight
//! files (`weights`).

pub mod cpu;
pub mod philox;
pub mod weights;
