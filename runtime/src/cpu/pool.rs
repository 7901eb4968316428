//! Reuse of large f32 buffers across kernels and steps. A training step
//! allocates the same sizes every step; a fresh multi-megabyte allocation is
//! new pages from the OS, and the page faults of first touch cost about as
//! much as a memory-bound kernel itself. The executor hands dead values back
//! (`recycle`); kernels take their outputs from here (`buffer`, `zeros`).
//! This is the CPU stand-in for the planned arena of the memory planner.

use crate::tensor::{Data, Tensor};
use std::collections::HashMap;
use std::sync::Mutex;

/// Buffers below this many elements come from the allocator directly (its
/// own free lists serve them well).
const MIN_LEN: usize = 1 << 14;
/// At most this many bytes wait in the pool; beyond it, buffers are freed.
const MAX_BYTES: usize = 1 << 30;

struct Pool {
    free: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn take(n: usize) -> Option<Vec<f32>> {
    if n < MIN_LEN {
        return None;
    }
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = guard.as_mut()?;
    let v = pool.free.get_mut(&n)?.pop()?;
    pool.bytes -= n * 4;
    Some(v)
}

/// Whether reused buffers are filled with NaN first (debug builds, or
/// `TESSERA_POOL_POISON=1`), so a kernel that leaves an element unwritten
/// shows NaN in tests instead of a stale value.
fn poison() -> bool {
    static POISON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POISON.get_or_init(|| cfg!(debug_assertions) || std::env::var("TESSERA_POOL_POISON").is_ok_and(|v| v == "1"))
}

/// A buffer of `n` f32 whose contents are unspecified (old values): for
/// kernels that write every element.
pub fn buffer(n: usize) -> Vec<f32> {
    match take(n) {
        Some(mut v) => {
            if poison() {
                v.fill(f32::NAN);
            }
            v
        }
        None => vec![0.0; n],
    }
}

/// A buffer of `n` zeros.
/// Bytes held in the pool now (for tests: a training loop in steady state
/// neither grows nor shrinks it).
pub fn held_bytes() -> usize {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |p| p.bytes)
}

/// A pooled copy of `x` (kernels that pass data through, or start from a
/// copy of an operand, allocate their result here so that it can be
/// recycled as any kernel result is).
pub fn copy(x: &[f32]) -> Vec<f32> {
    let mut v = match take(x.len()) {
        Some(v) => v,
        None => Vec::with_capacity(x.len()),
    };
    v.clear();
    v.extend_from_slice(x);
    v
}

pub fn zeros(n: usize) -> Vec<f32> {
    match take(n) {
        Some(mut v) => {
            v.fill(0.0);
            v
        }
        None => vec![0.0; n],
    }
}

/// Gives a dead tensor's storage back for reuse.
pub fn recycle(t: Tensor) {
    let Data::F32(v) = t.data else { return };
    let n = v.len();
    if n < MIN_LEN || v.capacity() != n {
        return;
    }
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = guard.get_or_insert_with(|| Pool { free: HashMap::new(), bytes: 0 });
    if pool.bytes + n * 4 <= MAX_BYTES {
        pool.bytes += n * 4;
        pool.free.entry(n).or_default().push(v);
    }
}

/// Element types with a pooled buffer (f32) or a plain one (i64), for
/// kernels generic over the element type.
pub trait Elem: Copy + Default + Send + Sync {
    /// `n` elements, contents unspecified: the caller writes every one.
    fn buffer(n: usize) -> Vec<Self>;
}

impl Elem for f32 {
    fn buffer(n: usize) -> Vec<f32> {
        buffer(n)
    }
}

impl Elem for i64 {
    fn buffer(n: usize) -> Vec<i64> {
        vec![0; n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycled_buffers_come_back_by_size_and_zeros_are_zero() {
        let n = MIN_LEN + 3;
        recycle(Tensor::f32(vec![n], vec![7.0; n]));
        let z = zeros(n);
        assert_eq!(z.len(), n);
        assert!(z.iter().all(|&v| v == 0.0));
        recycle(Tensor::f32(vec![n], z));
        let b = buffer(n);
        assert_eq!(b.len(), n);
        // Small tensors are not pooled.
        recycle(Tensor::f32(vec![4], vec![1.0; 4]));
        assert_eq!(buffer(4), vec![0.0; 4]);
    }
}

/// A copy of `t` whose f32 storage comes from the pool.
pub fn pooled_clone(t: &crate::tensor::Tensor) -> crate::tensor::Tensor {
    use crate::tensor::{Data, Tensor};
    match &t.data {
        Data::F32(v) => Tensor { shape: t.shape.clone(), data: Data::F32(copy(v)) },
        Data::I64(_) => t.clone(),
    }
}
