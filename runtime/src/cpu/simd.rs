//! Runtime-dispatched vector code. The crate is built for baseline x86-64
//! (SSE2), so loops only use wide vectors when they are compiled inside a
//! function with `#[target_feature]`. `vectorized(f)` runs `f` inside such a
//! function for the best level this CPU has (AVX-512, else AVX2 + FMA); the
//! closure must be `#[inline(always)]` so that its body is compiled there.
//!
//! Loops written for the vectoriser: elementwise bodies without calls or
//! branches (select with `if` on values is fine), and reductions over lane
//! arrays (`Lanes`), since LLVM never reorders a plain float sum.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Baseline x86-64 or a non-x86 target.
    Base = 1,
    /// AVX2 and FMA (x86-64-v3).
    V3 = 2,
    /// AVX-512 F/BW/DQ/VL (x86-64-v4), as the `gemm` crate's `x86-v4` feature.
    V4 = 3,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The level in use: the CPU's best, capped by `TESSERA_SIMD=base|avx2|avx512`
/// (for testing every path on one machine).
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Base,
        2 => Level::V3,
        3 => Level::V4,
        _ => {
            let l = detect();
            LEVEL.store(l as u8, Ordering::Relaxed);
            l
        }
    }
}

fn detect() -> Level {
    let cap = match std::env::var("TESSERA_SIMD").as_deref() {
        Ok("base") => Level::Base,
        Ok("avx2") => Level::V3,
        _ => Level::V4,
    };
    #[cfg(target_arch = "x86_64")]
    {
        let v4 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma");
        let v3 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let best = if v4 {
            Level::V4
        } else if v3 {
            Level::V3
        } else {
            Level::Base
        };
        if (best as u8) < (cap as u8) {
            best
        } else {
            cap
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = cap;
        Level::Base
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn run_v4<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn run_v3<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Whether `vectorized` code runs with fused multiply-add (AVX2 + FMA or
/// better), so `fast_math`'s `FMA = true` forms are fast there.
#[inline(always)]
pub fn has_fma() -> bool {
    level() != Level::Base
}

/// Runs `f` compiled for the best available vector level (see the module doc).
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            // SAFETY: `level` only reports a level whose features the CPU has.
            Level::V4 => unsafe { run_v4(f) },
            Level::V3 => unsafe { run_v3(f) },
            Level::Base => f(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        f()
    }
}

/// Lane count of the reduction accumulators: 16 f32 (one AVX-512 register)
/// or 8 f64.
pub const LANES: usize = 16;

/// sum of `x` in f64, accumulated over 8 lanes (vectorises; the order
/// differs from a sequential sum by rounding only).
#[inline(always)]
pub fn sum_f64(x: &[f32]) -> f64 {
    sum_map_f64(x, |v| v)
}

/// sum of `f(x[i])` in f64 over 8 lanes.
#[inline(always)]
pub fn sum_map_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..8 {
            acc[j] += f(c[j] as f64);
        }
    }
    let mut s = acc.iter().sum::<f64>();
    for &v in rest {
        s += f(v as f64);
    }
    s
}

/// sum of `f(x[i], y[i])` in f64 over 8 lanes.
#[inline(always)]
pub fn sum2_f64(x: &[f32], y: &[f32], f: impl Fn(f64, f64) -> f64) -> f64 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [0.0f64; 8];
    let (cx, cy) = (x.chunks_exact(8), y.chunks_exact(8));
    let (rx, ry) = (cx.remainder(), cy.remainder());
    for (a, b) in cx.zip(cy) {
        for j in 0..8 {
            acc[j] += f(a[j] as f64, b[j] as f64);
        }
    }
    let mut s = acc.iter().sum::<f64>();
    for (&a, &b) in rx.iter().zip(ry) {
        s += f(a as f64, b as f64);
    }
    s
}

/// max of `x` (NaN-ignoring like `f32::max`), over 16 lanes.
#[inline(always)]
pub fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    acc.iter().chain(rest).copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_reductions_match_sequential_ones() {
        let x: Vec<f32> = (0..203).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.25).collect();
        let y: Vec<f32> = (0..203).map(|i| (i % 7) as f32).collect();
        let seq: f64 = x.iter().map(|&v| v as f64).sum();
        assert!(
            (vectorized(
                #[inline(always)]
                || sum_f64(&x)
            ) - seq)
                .abs()
                < 1e-9
        );
        let dot: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((sum2_f64(&x, &y, |a, b| a * b) - dot).abs() < 1e-9);
        assert_eq!(max_f32(&x), x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(max_f32(&[]), f32::NEG_INFINITY);
        assert_eq!(sum_f64(&[1.0, 2.0, 3.0]), 6.0);
    }
}
