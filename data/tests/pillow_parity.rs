//! The deterministic ops against Pillow 13.0.0 on the same inputs (synthetic
//! gradients + edges + noise, odd sizes). Every op reproduces Pillow's integer
//! and C-float arithmetic step by step, and the measured difference is zero
//! in every case, so the tests demand bit-exact results (`TOLERANCE = 0`,
//! tighter than the 1-level budget); the maxima are printed with
//! `cargo test -p tessera-data --test pillow_parity -- --nocapture`.

mod common;

use common::{max_abs_diff, pillow, scratch_dir, synthetic, Case};
use serde_json::json;
use tessera_data::functional::{self as f, Filter};
use tessera_data::transforms::{AugmentOp, OpArg, RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS};
use tessera_data::Image;

/// Allowed max abs difference, in levels of 255 (measured: 0 everywhere).
const TOLERANCE: u8 = 0;

fn code(filter: Filter) -> i64 {
    match filter {
        Filter::Nearest => 0,
        Filter::Lanczos => 1,
        Filter::Bilinear => 2,
        Filter::Bicubic => 3,
        Filter::Box => 4,
        Filter::Hamming => 5,
    }
}

/// Runs the cases through Pillow, prints the measured differences and
/// asserts each is within `tol`; returns the largest.
fn check(test: &str, cases: Vec<(String, Image, Case)>, tol: u8) -> u8 {
    let dir = scratch_dir(test);
    let refs: Vec<Case> = cases
        .iter()
        .map(|(_, _, c)| Case { input: c.input.clone(), op: c.op, args: c.args.clone(), file: c.file.clone() })
        .collect();
    let theirs = pillow(&dir, &refs);
    let mut worst = 0;
    let mut failures = Vec::new();
    for ((what, ours, _), theirs) in cases.iter().zip(&theirs) {
        let d = max_abs_diff(ours, theirs, what);
        worst = worst.max(d);
        if d > tol {
            failures.push(format!("{what}: max abs diff {d} > {tol}"));
        }
    }
    println!("{test}: {} cases, max abs diff {worst}", cases.len());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{test}: differences from Pillow:\n{}", failures.join("\n"));
    worst
}

fn inputs() -> Vec<Image> {
    vec![synthetic(37, 23, 1), synthetic(500, 375, 2), synthetic(23, 41, 3), synthetic(3, 2, 4)]
}

#[test]
fn resize_matches_pillow() {
    let mut cases = Vec::new();
    let filters = [Filter::Nearest, Filter::Bilinear, Filter::Bicubic, Filter::Lanczos, Filter::Box, Filter::Hamming];
    for img in inputs() {
        let (w, h) = (img.width(), img.height());
        let sizes = [(224, 224), (w / 3 + 1, h / 2 + 1), (w * 2 + 1, h / 2 + 1), (1, 1), (w, h + 5), (37, 23)];
        for &(ow, oh) in &sizes {
            for &filter in &filters {
                let ours = f::resize(&img, &[oh, ow], filter);
                let case = Case::new(&img, "resize", json!({"size": [ow, oh], "filter": code(filter)}));
                cases.push((format!("{w}x{h} -> {ow}x{oh} filter {filter:?}"), ours, case));
            }
        }
    }
    // torchvision's int size: the shorter side becomes 256 (500x375 -> 341x256).
    let img = synthetic(500, 375, 5);
    let ours = f::resize(&img, &[256], Filter::Bilinear);
    assert_eq!((ours.width(), ours.height()), (341, 256));
    cases.push(("Resize(256)".into(), ours, Case::new(&img, "resize", json!({"size": [341, 256], "filter": 2}))));
    check("resize", cases, TOLERANCE);
}

#[test]
fn resized_crop_matches_pillow() {
    let img = synthetic(500, 375, 6);
    let mut cases = Vec::new();
    let boxes = [(0, 0, 375, 500), (10, 37, 200, 133), (100, 250, 31, 250), (374, 499, 1, 1), (50, 3, 300, 401)];
    for &(top, left, h, w) in &boxes {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Nearest] {
            for size in [[224, 224], [96, 96], [31, 57]] {
                let ours = f::resized_crop(&img, top, left, h, w, size, filter);
                let case = Case::new(
                    &img,
                    "resized_crop",
                    json!({"top": top, "left": left, "height": h, "width": w, "size": size, "filter": code(filter)}),
                );
                cases.push((format!("crop {top},{left} {h}x{w} -> {size:?} {filter:?}"), ours, case));
            }
        }
    }
    check("resized_crop", cases, TOLERANCE);
}

#[test]
fn flip_grayscale_and_center_crop_match_pillow() {
    let mut cases = Vec::new();
    for img in inputs() {
        let (w, h) = (img.width(), img.height());
        cases.push((format!("hflip {w}x{h}"), f::hflip(&img), Case::new(&img, "hflip", json!({}))));
        cases.push((format!("grayscale {w}x{h}"), f::to_grayscale(&img), Case::new(&img, "grayscale", json!({}))));
        for size in [[224, 224], [20, 10], [h, w], [h + 3, w + 4], [1, 2]] {
            let case = Case::new(&img, "center_crop", json!({"size": size}));
            cases.push((format!("center_crop {w}x{h} -> {size:?}"), f::center_crop(&img, size), case));
        }
    }
    let img = f::resize(&synthetic(500, 375, 7), &[256], Filter::Bilinear);
    let case = Case::new(&img, "center_crop", json!({"size": [224, 224]}));
    cases.push(("center_crop 341x256 -> 224".into(), f::center_crop(&img, [224, 224]), case));
    check("flip_gray_crop", cases, 0);
}

#[test]
fn color_jitter_components_match_pillow() {
    let mut cases = Vec::new();
    for img in inputs() {
        let (w, h) = (img.width(), img.height());
        for factor in [0.0, 0.6, 1.0, 1.4, 0.87654, 2.5] {
            cases.push((
                format!("brightness {factor} {w}x{h}"),
                f::adjust_brightness(&img, factor),
                Case::new(&img, "brightness", json!({"factor": factor})),
            ));
            cases.push((
                format!("contrast {factor} {w}x{h}"),
                f::adjust_contrast(&img, factor),
                Case::new(&img, "contrast", json!({"factor": factor})),
            ));
            cases.push((
                format!("saturation {factor} {w}x{h}"),
                f::adjust_saturation(&img, factor),
                Case::new(&img, "saturation", json!({"factor": factor})),
            ));
        }
        for factor in [-0.5, -0.4, -0.123, -0.001, 0.0, 0.05, 0.25, 0.4, 0.5] {
            cases.push((
                format!("hue {factor} {w}x{h}"),
                f::adjust_hue(&img, factor),
                Case::new(&img, "hue", json!({"factor": factor})),
            ));
        }
    }
    check("color_jitter", cases, TOLERANCE);
}

#[test]
fn gaussian_blur_matches_pillow() {
    let mut cases = Vec::new();
    for img in inputs() {
        let (w, h) = (img.width(), img.height());
        for radius in [0.1, 0.5, 0.77, 1.0, 1.5, 2.0, 5.0, 30.0] {
            cases.push((
                format!("blur {radius} {w}x{h}"),
                f::gaussian_blur(&img, radius),
                Case::new(&img, "gaussian_blur", json!({"radius": radius})),
            ));
        }
    }
    check("gaussian_blur", cases, TOLERANCE);
}

#[test]
fn rand_augment_ops_match_pillow() {
    let mut cases = Vec::new();
    let images = [synthetic(37, 23, 8), synthetic(224, 224, 9), synthetic(61, 80, 10)];
    let mut ops: Vec<AugmentOp> = RAND_TRANSFORMS.to_vec();
    ops.extend(RAND_INCREASING_TRANSFORMS.iter().filter(|o| !RAND_TRANSFORMS.contains(o)));
    for img in &images {
        let (w, h) = (img.width(), img.height());
        for &op in &ops {
            for magnitude in [9.0, 4.3, 10.0, 0.0] {
                for negate in [false, true] {
                    if negate && !op.negates() {
                        continue;
                    }
                    for filter in [Filter::Bilinear, Filter::Bicubic] {
                        if filter == Filter::Bicubic && !op.is_geometric() {
                            continue;
                        }
                        let arg = op.level_to_arg(magnitude, negate, 0.45);
                        let ours = op.apply(img, arg, filter);
                        let py_arg = match arg {
                            OpArg::None => json!(null),
                            OpArg::Float(x) => json!(x),
                            OpArg::Int(i) => json!(i),
                        };
                        let name = format!("{op:?}");
                        let case = Case::new(
                            img,
                            "rand_augment",
                            json!({"name": name, "arg": py_arg, "filter": code(filter)}),
                        );
                        cases.push((format!("{op:?} m={magnitude} neg={negate} {filter:?} {w}x{h}"), ours, case));
                    }
                }
            }
        }
        // Rotations past RandAugment's range (Pillow's transpose fast paths)
        // and nearest-neighbour affine (`interpolation: 0`).
        for degrees in [90.0, 180.0, 270.0, -90.0, 45.0, 360.0, -0.5] {
            for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Nearest] {
                let ours = AugmentOp::Rotate.apply(img, OpArg::Float(degrees), filter);
                let case =
                    Case::new(img, "rand_augment", json!({"name": "Rotate", "arg": degrees, "filter": code(filter)}));
                cases.push((format!("rotate {degrees} {filter:?} {w}x{h}"), ours, case));
            }
        }
        let nearest_ops = [
            (AugmentOp::ShearX, 0.27),
            (AugmentOp::ShearY, -0.3),
            (AugmentOp::TranslateXRel, 0.4),
            (AugmentOp::TranslateYRel, -0.45),
        ];
        for (op, arg) in nearest_ops {
            let ours = op.apply(img, OpArg::Float(arg), Filter::Nearest);
            let case = Case::new(img, "rand_augment", json!({"name": format!("{op:?}"), "arg": arg, "filter": 0}));
            cases.push((format!("{op:?} {arg} Nearest {w}x{h}"), ours, case));
        }
        for factor in [0.1, 0.5, 1.9] {
            cases.push((
                format!("sharpness {factor} {w}x{h}"),
                f::adjust_sharpness(img, factor),
                Case::new(img, "sharpness", json!({"factor": factor})),
            ));
        }
    }
    check("rand_augment", cases, TOLERANCE);
}
