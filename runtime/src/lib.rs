//! tessera's runtime: it reads plans (never the compiler's IR) and executes
//! them on a backend. It holds the counter-based random generator that every
//! backend draws masks from (`philox`), the CPU backend (`cpu`: the reference
//! executor with a kernel for every op, the arena executor that runs the same
//! kernels over the plan's memory plan, and the initialisers), the CUDA
//! backend (`cuda`), the memory plan's layout as one buffer that both
//! arena-style executors share (`memory_layout`), the backend seam
//! (`backend`), and weight files (`weights`).

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod dist;
pub mod error;
pub mod memory_layout;
pub mod philox;
pub mod synthetic;
pub mod tensor;
pub mod weights;

pub use backend::{Backend, Device, Executor};
pub use error::{KernelError, RuntimeError};
pub use tensor::{describe_type, show_shape, Data, Tensor};
