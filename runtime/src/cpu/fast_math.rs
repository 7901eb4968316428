//! Branch-free f32 `exp`, `erfc` and GELU that the compiler vectorises (the
//! GELU of a ViT MLP is 4·D values per token, forward and backward). Accuracy:
//! about 1e-7 absolute on erf and a few ulps on exp, checked against f64
//! references below.
//!
//! Each function takes `FMA`: with `true`, products and sums contract to
//! fused multiply-adds (half the instructions and a shorter dependency chain);
//! use it only where the code runs with the `fma` target feature (see
//! `simd::has_fma`), since elsewhere `mul_add` is a slow library call.

/// a * b + c, fused when `FMA`.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n * LN2_HI` is exact for |n| < 2^10 (Cody–Waite reduction).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5 * 2^23: adding and subtracting it rounds an f32 to the nearest integer.
const ROUND: f32 = 12_582_912.0;

/// e^x; 0 below -87 (e^-87 ~ 1.6e-38) and e^88 above 88, so tails are exact.
#[inline(always)]
pub fn exp_f32<const FMA: bool>(x: f32) -> f32 {
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = madd::<FMA>(x, LOG2E, ROUND);
    let n = shifted - ROUND;
    // The low mantissa bits of `shifted` hold n as a two's-complement
    // integer: an integer subtraction, which vectorises (an `as i32` cast saturates, which does not).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, x));
    // Taylor series of e^r on |r| <= ln2 / 2, to r^7 (truncation < 1e-8 relative).
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = madd::<FMA>(p, r, c);
    }
    let y = p * f32::from_bits(((n_int + 127) as u32) << 23);
    if underflow {
        0.0
    } else {
        y
    }
}

/// Coefficients of g(t) in erfc(x) = t e^{-x^2 + g(t)}, t = 1 / (1 + x/2),
/// x >= 0: our own least-squares fit on [0, 9] (relative error 1.4e-8 in f64).
const ERFC_FIT: [f32; 11] = [
    -1.265_587,
    1.002_000_5,
    0.351_624_63,
    0.240_544_8,
    -0.758_869_3,
    1.764_091_1,
    -3.683_851_2,
    4.356_218,
    -2.854_977,
    0.993_759_9,
    -0.144_954_52,
];

/// erfc(x) for x >= 0; exactly 0 from 9.5 on (erfc(9.5) ~ 7e-41).
#[inline(always)]
pub fn erfc_nonneg_f32<const FMA: bool>(x: f32) -> f32 {
    let beyond = x >= 9.5;
    let x = x.min(9.0);
    let t = 1.0 / madd::<FMA>(0.5, x, 1.0);
    let mut g = ERFC_FIT[10];
    for &c in ERFC_FIT[..10].iter().rev() {
        g = madd::<FMA>(g, t, c);
    }
    let y = t * exp_f32::<FMA>(madd::<FMA>(-x, x, g));
    if beyond {
        0.0
    } else {
        y
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// The standard normal CDF Phi(x) = 1 - erfc(x / sqrt 2) / 2 (mirrored for x < 0).
#[inline(always)]
fn normal_cdf<const FMA: bool>(x: f32) -> f32 {
    let half_tail = 0.5 * erfc_nonneg_f32::<FMA>(x.abs() * FRAC_1_SQRT_2);
    if x >= 0.0 {
        1.0 - half_tail
    } else {
        half_tail
    }
}

/// Exact (erf) GELU: x Phi(x) (reference 1.5).
#[inline(always)]
pub fn gelu_f32<const FMA: bool>(x: f32) -> f32 {
    x * normal_cdf::<FMA>(x)
}

/// d GELU / dx = Phi(x) + x phi(x).
#[inline(always)]
pub fn gelu_grad_f32<const FMA: bool>(x: f32) -> f32 {
    madd::<FMA>(x * FRAC_1_SQRT_2PI, exp_f32::<FMA>(-0.5 * x * x), normal_cdf::<FMA>(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::special::erf_precise;

    fn grid() -> impl Iterator<Item = f64> {
        (-12_000..=12_000).map(|i| i as f64 / 1000.0)
    }

    fn check_exp<const FMA: bool>() {
        for x in (-8_700..=8_800).map(|i| i as f32 / 100.0) {
            let want = (x as f64).exp();
            let got = exp_f32::<FMA>(x) as f64;
            assert!(((got - want) / want).abs() < 4e-7, "exp({x}) = {got}, want {want} (fma {FMA})");
        }
        assert_eq!(exp_f32::<FMA>(0.0), 1.0);
        assert_eq!(exp_f32::<FMA>(-1000.0), 0.0);
        assert!(exp_f32::<FMA>(1000.0).is_finite());
    }

    #[test]
    fn exp_is_accurate() {
        check_exp::<false>();
        check_exp::<true>();
    }

    fn check_gelu<const FMA: bool>() {
        for x in grid() {
            let erf = erf_precise(x / 2f64.sqrt());
            // Phi(x) without cancellation in the lower tail.
            let phi =
                if x < 0.0 { 0.5 * crate::cpu::special::erfc_precise(-x / 2f64.sqrt()) } else { 0.5 * (1.0 + erf) };
            let gelu = x * phi;
            let dgelu = phi + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let xf = x as f32;
            let cdf = normal_cdf::<FMA>(xf) as f64;
            assert!((cdf - phi).abs() < 3e-7, "Phi({x}) (fma {FMA})");
            // Relative accuracy in the lower tail too, where GELU is tiny
            // (bounded by the f32 rounding of the exponent -x^2/2 there).
            assert!(((cdf - phi) / phi).abs() < 5e-7 * (1.0 + x * x), "Phi({x}) = {cdf}, want {phi} (fma {FMA})");
            assert!((gelu_f32::<FMA>(xf) as f64 - gelu).abs() < 3e-7 * x.abs().max(1.0), "gelu({x})");
            assert!((gelu_grad_f32::<FMA>(xf) as f64 - dgelu).abs() < 5e-7 * x.abs().max(1.0), "gelu'({x})");
        }
        // The tails: GELU(x) -> x for large x, -> 0 (from below) for very negative x.
        assert_eq!(gelu_f32::<FMA>(20.0), 20.0);
        assert_eq!(gelu_f32::<FMA>(-20.0), 0.0);
        assert_eq!(gelu_grad_f32::<FMA>(-30.0), 0.0);
        assert_eq!(gelu_grad_f32::<FMA>(1e20), 1.0);
    }

    #[test]
    fn erf_and_gelu_are_accurate() {
        check_gelu::<false>();
        check_gelu::<true>();
    }
}
