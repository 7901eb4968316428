//! tessera's runtime: it reads plans (never the compiler's IR) and executes
//! them on a backend. It holds the counter-based random generator that every
//! backend draws masks from (`philox`), the CPU backend (`cpu`: the reference
//! executor with a kernel for every op, and the initialisers), and weight
//! files (`weights`).

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod philox;
pub mod tensor;
pub mod weights;

pub use backend::{Backend, Device, Executor};
pub use error::{KernelError, RuntimeError};
pub use tensor::{describe_type, show_shape, Data, Tensor};
