//! Data parallelism's communication: a rendezvous store and collectives
//! across the processes of one run (PyTorch's TCPStore and process group).
//!
//! `store` is a key-value server that rank 0 (or the launcher) hosts: ranks
//! exchange their addresses and NCCL's unique id through it and wait at
//! barriers. `ring` is the CPU collective: every rank talks to its two ring
//! neighbours over TCP (loopback or the network), so no rank is a
//! bottleneck. The executor's collective ops (`all_reduce`, `all_gather`,
//! the gradient all-reduce the compiler inserts) run through `Collective`.
//!
//! Invariants: every call either completes on every rank with the same
//! result (bitwise: each reduced element is computed once and forwarded), or
//! fails on every rank within the timeout. A peer that exits closes its
//! sockets, which its neighbours see at once; one that hangs is noticed
//! when a read waits longer than `timeout`. Ranks that disagree on a
//! message's size (they run different plans) get an error, never a hang.

pub mod ring;
pub mod store;
mod wire;

use std::time::Duration;

pub use ring::RingCollective;
pub use store::{StoreClient, StoreServer};

/// A failed collective or rendezvous; the message names the peer rank and
/// the operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DistError(pub String);

impl DistError {
    pub fn new(message: impl Into<String>) -> DistError {
        DistError(message.into())
    }
}

/// Element-wise reduction across ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    Sum,
    /// The sum divided by the world size (DDP's gradient average).
    Mean,
    Max,
}

/// The numbers collectives carry (f32 tensors, f64 metric sums).
///
/// # Safety
/// Implemented only for plain floats: messages reinterpret a slice of them
/// as bytes and back, so every bit pattern must be a valid value.
pub unsafe trait Element: Copy + Default + Send + Sync + 'static {
    const BYTES: usize;
    fn write_le(self, out: &mut [u8]);
    fn read_le(b: &[u8]) -> Self;
    fn combine(self, other: Self, r: Reduction) -> Self;
    fn divide(self, n: usize) -> Self;
}

/// `Element` for a float type of `$bytes` bytes.
macro_rules! float_element {
    ($t:ty, $bytes:expr) => {
        // SAFETY: a plain float.
        unsafe impl Element for $t {
            const BYTES: usize = $bytes;
            fn write_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn read_le(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().expect("one element's bytes"))
            }
            fn combine(self, other: Self, r: Reduction) -> Self {
                match r {
                    Reduction::Sum | Reduction::Mean => self + other,
                    // NaN wins, as torch.max propagates it.
                    Reduction::Max if self.is_nan() || other.is_nan() => <$t>::NAN,
                    Reduction::Max => self.max(other),
                }
            }
            fn divide(self, n: usize) -> Self {
                self / n as $t
            }
        }
    };
}

float_element!(f32, 4);
float_element!(f64, 8);

/// The collectives a data-parallel step needs, the same on every backend.
/// Results are in rank order (`all_gather`: rank 0's block first).
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn all_reduce_f32(&self, data: &mut [f32], op: Reduction) -> Result<(), DistError>;
    fn all_reduce_f64(&self, data: &mut [f64], op: Reduction) -> Result<(), DistError>;
    /// Every rank's `data` (all the same length), concatenated in rank order.
    fn all_gather_f32(&self, data: &[f32]) -> Result<Vec<f32>, DistError>;
    /// Rank `root`'s `data` on every rank.
    fn broadcast_f32(&self, data: &mut [f32], root: usize) -> Result<(), DistError>;
    /// The element-wise sum over the ranks of `data` (W blocks of equal
    /// length), block `rank` of it.
    fn reduce_scatter_f32(&self, data: &[f32]) -> Result<Vec<f32>, DistError>;
    /// Rank 0's `bytes` on every rank (ids such as NCCL's unique id).
    fn broadcast_bytes(&self, bytes: &mut [u8]) -> Result<(), DistError> {
        // Carried as floats: the ring moves their bytes unchanged.
        let mut words: Vec<f32> = bytes
            .chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                f32::from_ne_bytes(w)
            })
            .collect();
        self.broadcast_f32(&mut words, 0)?;
        for (c, w) in bytes.chunks_mut(4).zip(&words) {
            c.copy_from_slice(&w.to_ne_bytes()[..c.len()]);
        }
        Ok(())
    }
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), DistError> {
        self.all_reduce_f32(&mut [0.0], Reduction::Sum)
    }
}

/// One process alone: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _: &mut [f32], _: Reduction) -> Result<(), DistError> {
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64], _: Reduction) -> Result<(), DistError> {
        Ok(())
    }
    fn all_gather_f32(&self, data: &[f32]) -> Result<Vec<f32>, DistError> {
        Ok(data.to_vec())
    }
    fn broadcast_f32(&self, _: &mut [f32], _: usize) -> Result<(), DistError> {
        Ok(())
    }
    fn reduce_scatter_f32(&self, data: &[f32]) -> Result<Vec<f32>, DistError> {
        Ok(data.to_vec())
    }
}

/// How long a collective or rendezvous waits for a peer before it gives up:
/// `TESSERA_DIST_TIMEOUT` seconds, else `default`.
pub fn timeout_from_env(default: Duration) -> Result<Duration, DistError> {
    match std::env::var("TESSERA_DIST_TIMEOUT") {
        Err(_) => Ok(default),
        Ok(s) => match s.trim().parse::<f64>() {
            Ok(t) if t > 0.0 && t.is_finite() => Ok(Duration::from_secs_f64(t)),
            _ => Err(DistError::new(format!("TESSERA_DIST_TIMEOUT is `{s}`; it must be a positive number of seconds"))),
        },
    }
}
