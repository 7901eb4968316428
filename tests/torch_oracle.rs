//! Smoke tests of the libtorch oracle (`tests/oracle/`): libtorch loads and
//! computes what we compute by hand, autograd works, and our closeness
//! assertions do fail on wrong numbers. Needs `--features torch-oracle` and
//! libtorch from `scripts/setup-libtorch.sh` (scripts/test.sh does both).
#![cfg(feature = "torch-oracle")]

mod oracle;

use oracle::{assert_close, assert_close_f64, check_close, tensor_from, tensor_from_f64, to_vec, to_vec_f64};
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::Kind;

/// erf by its Maclaurin series, summed in f64 until the terms vanish; exact to
/// a few ulps for |x| <= 2 (the series alternates with terms shrinking fast).
fn erf(x: f64) -> f64 {
    assert!(x.abs() <= 2.0, "series erf is only used for |x| <= 2");
    let (mut sum, mut power, mut n) = (0.0f64, x, 0u32); // power = (-1)^n x^(2n+1) / n!
    loop {
        let term = power / (2 * n + 1) as f64;
        sum += term;
        if term.abs() <= 1e-18 * sum.abs() {
            break; // also ends erf(0) = 0 at once
        }
        n += 1;
        assert!(n < 100, "erf series did not converge for x = {x}");
        power *= -x * x / n as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p.downcast_ref::<&str>().map(|s| s.to_string()).unwrap_or_default(),
    }
}

const A: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2x3
const B: [f32; 6] = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0]; // 3x2
/// A @ B by hand: [[1*7+2*9+3*11, 1*8+2*10+3*12], [4*7+5*9+6*11, 4*8+5*10+6*12]].
const AB: [f32; 4] = [58.0, 64.0, 139.0, 154.0];

#[test]
fn libtorch_runs_single_threaded_on_cpu() {
    oracle::init();
    assert_eq!(tch::get_num_threads(), 1, "the oracle pins libtorch to 1 thread");
    let t = tensor_from(&A, &[2, 3]);
    assert_eq!(oracle::shape(&t), vec![2, 3]);
    assert_eq!(t.device(), tch::Device::Cpu);
    // Row-major round trip, including a non-contiguous (transposed) view.
    assert_eq!(to_vec(&t), A.to_vec());
    assert_eq!(to_vec(&t.tr()), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
}

#[test]
fn matmul_matches_hand_computed_product() {
    let c = tensor_from(&A, &[2, 3]).matmul(&tensor_from(&B, &[3, 2]));
    assert_eq!(c.size(), vec![2, 2]);
    assert_eq!(c.kind(), Kind::Float);
    // Small integers: f32 matmul is exact whatever the summation order.
    assert_eq!(to_vec(&c), AB.to_vec());
    assert_close(&to_vec(&c), &AB, 0.0, 0.0, "A @ B");
}

#[test]
fn assert_close_fails_on_a_perturbed_value() {
    let c = to_vec(&tensor_from(&A, &[2, 3]).matmul(&tensor_from(&B, &[3, 2])));
    let mut wrong = c.clone();
    wrong[2] *= 1.0 + 1e-3; // 139 -> 139.139

    // Within tolerance: passes; a loose enough tolerance accepts the change.
    assert_close(&c, &AB, 1e-6, 1e-6, "exact");
    assert_close(&wrong, &AB, 2e-3, 0.0, "loose");

    let err = catch_unwind(AssertUnwindSafe(|| assert_close(&wrong, &AB, 1e-5, 1e-5, "perturbed A @ B")))
        .expect_err("assert_close must panic on a 1e-3 relative error with rtol 1e-5");
    let msg = panic_message(err);
    for part in [
        "perturbed A @ B",
        "1 of 4 elements",
        "worst at index 2",
        "actual 139.13",
        "expected 139.0",
        "max rel err",
        "(index 2)",
    ] {
        assert!(msg.contains(part), "{part:?} missing from the report:\n{msg}");
    }

    // The worst element is the one furthest out of tolerance, not the first.
    let mut two = AB.to_vec();
    two[0] += 0.01;
    two[3] += 1.0;
    let msg = check_close(&two, &AB, 1e-5, 1e-5, "two").unwrap_err();
    assert!(msg.contains("2 of 4 elements"), "{msg}");
    assert!(msg.contains("worst at index 3"), "{msg}");

    // Lengths, NaN and infinities.
    assert!(check_close(&c[..3], &AB, 1.0, 1.0, "short").is_err());
    let nan = [f32::NAN, 64.0, 139.0, 154.0];
    assert!(check_close(&nan, &AB, 1.0, 1.0, "nan").is_err());
    assert!(check_close(&nan, &nan, 0.0, 0.0, "nan == nan").is_ok());
    let inf = [f32::INFINITY, 64.0, 139.0, 154.0];
    assert!(check_close(&inf, &AB, 1.0, 1.0, "inf").is_err());
    assert!(check_close(&inf, &inf, 0.0, 0.0, "inf == inf").is_ok());
}

#[test]
fn series_erf_matches_reference_values() {
    // erf(1/sqrt 2) = P(|Z| < 1) and erf(1), to 17 significant digits.
    assert_close_f64(
        &[erf(std::f64::consts::FRAC_1_SQRT_2), erf(1.0), erf(0.0)],
        &[0.682_689_492_137_085_9, 0.842_700_792_949_714_9, 0.0],
        1e-15,
        0.0,
        "series erf",
    );
}

#[test]
fn gelu_matches_erf_formula() {
    // Exact (erf) GELU: x/2 (1 + erf(x / sqrt 2)), computed here in f64.
    let xs = [1.0f64, -1.0, 0.5, 2.0, 0.0, -0.25];
    let expected: Vec<f64> = xs.iter().map(|&x| 0.5 * x * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2))).collect();
    assert!((expected[0] - 0.841_344_746_068_542_9).abs() < 1e-15, "gelu(1) = {}", expected[0]);

    // libtorch in f64: agrees to a few ulps.
    let g64 = to_vec_f64(&tensor_from_f64(&xs, &[6]).gelu("none"));
    assert_close_f64(&g64, &expected, 1e-14, 1e-15, "gelu f64");

    // libtorch in f32: agrees to f32 rounding.
    let xs32: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    let exp32: Vec<f32> = expected.iter().map(|&x| x as f32).collect();
    let g32 = to_vec(&tensor_from(&xs32, &[6]).gelu("none"));
    assert_close(&g32, &exp32, 1e-6, 1e-7, "gelu f32");

    // The tanh approximation is a different function: it must not pass at
    // the tolerance above (it is off by ~1e-4 at x = 1).
    let tanh = to_vec(&tensor_from(&xs32, &[6]).gelu("tanh"));
    assert!(check_close(&tanh, &exp32, 1e-6, 1e-7, "gelu tanh vs erf").is_err());
}

#[test]
fn backward_of_sum_of_squares_is_twice_x() {
    let xs = [-1.5f32, 0.0, 0.25, 2.0, 3.0, -0.125];
    let x = tensor_from(&xs, &[2, 3]).set_requires_grad(true);
    let y = (&x * &x).sum(Kind::Float);
    // 2.25 + 0 + 0.0625 + 4 + 9 + 0.015625, exact in f32.
    assert_eq!(to_vec(&y), vec![15.328125]);
    y.backward();
    let grad = x.grad();
    assert_eq!(grad.size(), vec![2, 3]);
    let twice: Vec<f32> = xs.iter().map(|&v| 2.0 * v).collect();
    assert_close(&to_vec(&grad), &twice, 0.0, 0.0, "d/dx sum(x^2)");
}
