//! The training engine: what `tessera train` runs. VISSL's trainer
//! (reference sections 0, 6 and 8) over compiled plans: phases and epochs,
//! parameter schedules, meters, logs and checkpoints.

pub mod checkpoint;
pub mod compiled;
pub mod console;
pub mod curves;
pub mod data_source;
pub mod distributed;
pub mod histograms;
pub mod lock;
pub mod logs;
pub mod memory_check;
pub mod meters;
pub mod perf_stats;
/// Parameter schedules live in the compiler, which validates them at compile time.
pub use tessera_compiler::schedule;
pub mod source;
pub mod stages;
pub mod tensorboard;
pub mod trainer;
