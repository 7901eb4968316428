//! libtorch (through `tch`) as a numerical oracle for parity tests.
//!
//! Use from an integration test that only builds with the feature:
//!
//! ```ignore
//! #![cfg(feature = "torch-oracle")]
//! mod oracle;
//! use oracle::{assert_close, tensor_from, to_vec};
//! ```
//!
//! Build and run with libtorch installed by `scripts/setup-libtorch.sh`:
//! `eval "$(./scripts/setup-libtorch.sh)" && cargo test --release --features torch-oracle`.
//! `scripts/test.sh` does both. Every helper calls [`init`], which pins libtorch
//! to one intra-op thread (tests already run in parallel) and seeds its RNG.
#![allow(dead_code)] // each test file uses a different subset

use std::fmt::Write as _;
use std::sync::Once;
use tch::{Device, Kind, Tensor};

/// libtorch's intra-op threads; `TESSERA_ORACLE_THREADS` (1 or 2) overrides.
const DEFAULT_THREADS: i32 = 1;
/// Seed of libtorch's generator (for tests that draw random inputs from it).
pub const SEED: i64 = 0x7e55e7a;

/// One-time libtorch setup: thread count and seed. Idempotent and cheap.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let threads = std::env::var("TESSERA_ORACLE_THREADS")
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|n| (1..=2).contains(n))
            .unwrap_or(DEFAULT_THREADS);
        tch::set_num_threads(threads);
        tch::manual_seed(SEED);
    });
}

fn check_shape(len: usize, shape: &[i64]) {
    assert!(shape.iter().all(|&d| d >= 0), "oracle: negative dimension in shape {shape:?}");
    let numel: i64 = shape.iter().product();
    assert_eq!(numel as usize, len, "oracle: {len} values do not fill shape {shape:?} ({numel} elements)");
}

/// A CPU f32 tensor of `shape` holding `data` in row-major order.
pub fn tensor_from(data: &[f32], shape: &[i64]) -> Tensor {
    init();
    check_shape(data.len(), shape);
    Tensor::from_slice(data).reshape(shape)
}

/// A CPU f64 tensor of `shape` holding `data` in row-major order.
pub fn tensor_from_f64(data: &[f64], shape: &[i64]) -> Tensor {
    init();
    check_shape(data.len(), shape);
    Tensor::from_slice(data).reshape(shape)
}

/// All elements of `t` (any shape, layout, device or float kind) in row-major
/// order, as f32.
pub fn to_vec(t: &Tensor) -> Vec<f32> {
    init();
    let flat = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().reshape([-1]);
    Vec::<f32>::try_from(&flat).expect("oracle: tensor to Vec<f32>")
}

/// As [`to_vec`], in f64.
pub fn to_vec_f64(t: &Tensor) -> Vec<f64> {
    init();
    let flat = t.detach().to_device(Device::Cpu).to_kind(Kind::Double).contiguous().reshape([-1]);
    Vec::<f64>::try_from(&flat).expect("oracle: tensor to Vec<f64>")
}

/// The relative error of a whole tensor, max |a - e| / max |e| (0 when both
/// are all zeros; infinite when only `e` is).
pub fn rel_err(a: &[f32], e: &[f32]) -> f64 {
    assert_eq!(a.len(), e.len());
    let diff = a.iter().zip(e).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max);
    let scale = e.iter().map(|y| (*y as f64).abs()).fold(0.0, f64::max);
    if diff == 0.0 {
        0.0
    } else if scale == 0.0 || !diff.is_finite() {
        f64::INFINITY
    } else {
        diff / scale
    }
}

/// The shape of `t`.
pub fn shape(t: &Tensor) -> Vec<i64> {
    t.size()
}

/// `Ok` when every element satisfies `|a - e| <= atol + rtol * |e|` (the rule
/// of `torch.allclose`; NaN matches only NaN, an infinity only itself);
/// otherwise the report that [`assert_close`] panics with.
pub fn check_close(actual: &[f32], expected: &[f32], rtol: f32, atol: f32, what: &str) -> Result<(), String> {
    let a: Vec<f64> = actual.iter().map(|&x| x as f64).collect();
    let e: Vec<f64> = expected.iter().map(|&x| x as f64).collect();
    check_close_f64(&a, &e, rtol as f64, atol as f64, what)
}

/// As [`check_close`], in f64.
pub fn check_close_f64(actual: &[f64], expected: &[f64], rtol: f64, atol: f64, what: &str) -> Result<(), String> {
    if actual.len() != expected.len() {
        return Err(format!(
            "{what}: length mismatch: actual has {} elements, expected {}",
            actual.len(),
            expected.len()
        ));
    }
    let mut bad = 0usize;
    // Worst element: the largest excess of |a - e| over its tolerance.
    let mut worst: Option<(usize, f64)> = None;
    let mut max_abs = 0.0f64;
    let mut max_rel = 0.0f64;
    let mut max_rel_at = None;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let (ok, excess) = if a.is_nan() || e.is_nan() {
            (a.is_nan() && e.is_nan(), f64::INFINITY)
        } else if a.is_infinite() || e.is_infinite() {
            (a == e, f64::INFINITY)
        } else {
            let diff = (a - e).abs();
            max_abs = max_abs.max(diff);
            if e != 0.0 && diff / e.abs() > max_rel {
                max_rel = diff / e.abs();
                max_rel_at = Some(i);
            }
            let tol = atol + rtol * e.abs();
            (diff <= tol, diff - tol)
        };
        if !ok {
            bad += 1;
            if worst.is_none_or(|(_, w)| excess > w) {
                worst = Some((i, excess));
            }
        }
    }
    let Some((i, _)) = worst else {
        return Ok(());
    };
    let (a, e) = (actual[i], expected[i]);
    let mut msg = format!(
        "{what}: {bad} of {} elements differ beyond rtol={rtol:e}, atol={atol:e}\n  \
         worst at index {i}: actual {a:?}, expected {e:?}, |diff| {:e}, tolerance {:e}, rel err {:e}\n  \
         max |diff| {max_abs:e}; max rel err {max_rel:e}",
        actual.len(),
        (a - e).abs(),
        atol + rtol * e.abs(),
        if e != 0.0 { (a - e).abs() / e.abs() } else { f64::INFINITY },
    );
    if let Some(j) = max_rel_at {
        let _ = write!(msg, " (index {j})");
    }
    Err(msg)
}

/// Panics with a report of the worst element (index, both values, its error
/// and tolerance) and the max absolute and relative errors unless
/// `|actual - expected| <= atol + rtol * |expected|` holds elementwise.
#[track_caller]
pub fn assert_close(actual: &[f32], expected: &[f32], rtol: f32, atol: f32, what: &str) {
    if let Err(msg) = check_close(actual, expected, rtol, atol, what) {
        panic!("{msg}");
    }
}

/// As [`assert_close`], in f64.
#[track_caller]
pub fn assert_close_f64(actual: &[f64], expected: &[f64], rtol: f64, atol: f64, what: &str) {
    if let Err(msg) = check_close_f64(actual, expected, rtol, atol, what) {
        panic!("{msg}");
    }
}

/// [`assert_close`] of a tensor against the oracle's tensor: shapes must match
/// too.
#[track_caller]
pub fn assert_tensor_close(actual: &Tensor, expected: &Tensor, rtol: f32, atol: f32, what: &str) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape mismatch");
    assert_close(&to_vec(actual), &to_vec(expected), rtol, atol, what);
}
