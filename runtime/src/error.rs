//! Errors of the runtime's backends. Every message names the thing at fault (an
//! input, a state, a kernel with its op and scope) and, for type errors, the
//! expected and the actual shape.

/// What went wrong inside one kernel; the executor wraps it with the kernel's
/// index, op and scope.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{op} over {world} ranks needs the run's collective, and this executor has none \
         (it runs one process; start the run with DISTRIBUTED.NUM_PROC_PER_NODE or a launcher)"
    )]
    NeedsCollectives { op: &'static str, world: u64 },
    /// A collective failed (a peer exited, hangs, or runs another plan).
    #[error("{0}")]
    Collective(String),
}

/// Shorthand for a kernel's precondition failure.
pub fn invalid(message: impl Into<String>) -> KernelError {
    KernelError::Invalid(message.into())
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    #[error("missing input `{name}` (the plan's inputs are: {expected})")]
    MissingInput { name: String, expected: String },
    #[error("unknown input `{name}` (the plan's inputs are: {expected})")]
    UnknownInput { name: String, expected: String },
    #[error("input `{name}` is given twice")]
    DuplicateInput { name: String },
    #[error("unknown state `{name}` (not a parameter or buffer of the plan)")]
    UnknownState { name: String },
    /// `what` is e.g. "input `images`" or "state `blocks.0.attn.qkv.weight`".
    #[error("{what}: expected {expected}, got {got}")]
    TypeMismatch { what: String, expected: String, got: String },
    #[error("tensor data has {len} elements, but shape {shape:?} needs {numel}")]
    DataLength { shape: Vec<usize>, len: usize, numel: usize },
    #[error("cannot initialise `{name}` with {init}: {message}")]
    Init { name: String, init: String, message: String },
    /// A device (CUDA or its host emulation) failed, or is missing.
    #[error("{0}")]
    Device(String),
    #[error("kernel {index} ({op}) in `{scope}`: {source}")]
    Kernel {
        index: usize,
        op: &'static str,
        scope: String,
        #[source]
        source: KernelError,
    },
}
