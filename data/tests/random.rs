//! The random parts: RandomResizedCrop's sampled boxes, determinism per
//! (seed, epoch, index), independence from threads, and sampling rates.

mod common;

use common::synthetic;
use serde_json::json;
use tessera_data::transforms::{RandomErasing, RandomResizedCrop};
use tessera_data::{Image, Pipeline, SampleKey, SampleRng, Tensor};

fn pipeline(list: serde_json::Value) -> Pipeline {
    Pipeline::from_config(&list).unwrap_or_else(|e| panic!("{e}"))
}

fn deit_train() -> Pipeline {
    pipeline(json!([
        {"name": "RandomResizedCrop", "size": 224},
        {"name": "RandomHorizontalFlip"},
        {"name": "RandAugment", "magnitude": 9, "magnitude_std": 0.5, "increasing_severity": true},
        {"name": "ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.4},
        {"name": "ToTensor"},
        {"name": "RandomErasing", "p": 0.25},
        {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    ]))
}

fn moco_train() -> Pipeline {
    pipeline(json!([
        {"name": "ImgReplicatePil", "num_times": 2},
        {"name": "RandomResizedCrop", "size": 224},
        {"name": "RandomHorizontalFlip", "p": 0.5},
        {"name": "ImgPilColorDistortion", "strength": 1.0},
        {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0},
        {"name": "ToTensor"},
        {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    ]))
}

#[test]
fn random_resized_crop_boxes_respect_scale_and_ratio() {
    let (scale, ratio) = ([0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0]);
    for (w, h) in [(500usize, 375usize), (37, 23), (224, 224), (1000, 300)] {
        let area = (w * h) as f64;
        let fallback = RandomResizedCrop::fallback(w, h, ratio);
        let mut fallbacks = 0;
        for i in 0..3000 {
            let mut rng = SampleRng::new(SampleKey::new(1, 0, i), 0);
            let b = RandomResizedCrop::get_params(w, h, scale, ratio, &mut rng);
            assert!(b.width > 0 && b.height > 0 && b.left + b.width <= w && b.top + b.height <= h, "{b:?} in {w}x{h}");
            if b == fallback {
                fallbacks += 1;
                continue;
            }
            // Sides are rounded, so allow half a pixel either way.
            let (bw, bh) = (b.width as f64, b.height as f64);
            assert!((bw + 0.5) * (bh + 0.5) >= scale[0] * area, "{b:?} too small for {w}x{h}");
            assert!((bw - 0.5) * (bh - 0.5) <= scale[1] * area, "{b:?} too large for {w}x{h}");
            assert!((bw + 0.5) / (bh - 0.5) >= ratio[0] && (bw - 0.5) / (bh + 0.5) <= ratio[1], "{b:?} ratio");
        }
        // 10 failed tries are rare unless the image is far from square
        // (1000x300 falls back about 5% of the time, as torchvision does).
        if w as f64 / h as f64 <= 1.7 {
            assert!(fallbacks < 30, "{w}x{h}: {fallbacks} fallbacks in 3000");
        }
    }
}

#[test]
fn random_resized_crop_falls_back_like_torchvision() {
    let ratio = [3.0 / 4.0, 4.0 / 3.0];
    let mut rng = SampleRng::new(SampleKey::new(2, 0, 0), 0);
    // Too narrow for any sampled box: width kept, height = round(10 / (3/4)) = 13.
    let b = RandomResizedCrop::get_params(10, 1000, [0.9, 1.0], ratio, &mut rng);
    assert_eq!((b.top, b.left, b.height, b.width), ((1000 - 13) / 2, 0, 13, 10));
    // Too wide: height kept, width = round(10 * 4/3) = 13.
    let b = RandomResizedCrop::get_params(1000, 10, [0.9, 1.0], ratio, &mut rng);
    assert_eq!((b.top, b.left, b.height, b.width), (0, (1000 - 13) / 2, 10, 13));
    // Scale above 1 never fits: the whole image (its ratio is within range).
    let b = RandomResizedCrop::get_params(300, 250, [1.5, 2.0], ratio, &mut rng);
    assert_eq!((b.top, b.left, b.height, b.width), (0, 0, 250, 300));
    // A feasible request never falls back: a 100x100 image with scale (0.5, 0.5)
    // and ratio 1 always gives round(sqrt(5000)) = 71.
    for i in 0..100 {
        let mut rng = SampleRng::new(SampleKey::new(3, 0, i), 0);
        let b = RandomResizedCrop::get_params(100, 100, [0.5, 0.5], [1.0, 1.0], &mut rng);
        assert_eq!((b.height, b.width), (71, 71));
    }
}

#[test]
fn same_key_same_output_different_keys_differ() {
    let img = synthetic(500, 375, 21);
    for p in [deit_train(), moco_train()] {
        let a = p.apply(&img, SampleKey::new(0, 3, 17));
        let b = p.apply(&img, SampleKey::new(0, 3, 17));
        assert_eq!(a, b);
        assert_eq!(a.len(), p.num_outputs());
        for other in [SampleKey::new(0, 3, 18), SampleKey::new(0, 4, 17), SampleKey::new(1, 3, 17)] {
            assert_ne!(a, p.apply(&img, other), "{other:?}");
        }
        for t in &a {
            assert_eq!(t.shape, [3, 224, 224]);
            assert!(t.data.iter().all(|v| v.is_finite()));
        }
    }
    // The two MoCo views of one sample are augmented independently.
    let views = moco_train().apply(&img, SampleKey::new(0, 0, 5));
    assert_eq!(views.len(), 2);
    assert_ne!(views[0], views[1]);
}

#[test]
fn results_do_not_depend_on_threads_or_order() {
    let img = synthetic(200, 150, 22);
    let p = deit_train();
    let keys: Vec<SampleKey> = (0..24).map(|i| SampleKey::new(7, 1, i)).collect();
    let sequential: Vec<Vec<Tensor>> = keys.iter().map(|&k| p.apply(&img, k)).collect();
    // Four threads, each taking every fourth key in reverse order.
    let parallel: Vec<(usize, Vec<Tensor>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (p, img, keys) = (&p, &img, &keys);
                s.spawn(move || {
                    (0..keys.len()).rev().filter(|i| i % 4 == t).map(|i| (i, p.apply(img, keys[i]))).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    for (i, out) in parallel {
        assert_eq!(out, sequential[i], "key {i}");
    }
}

/// Fraction of `n` keys for which `pred` holds on the pipeline output.
fn rate(p: &Pipeline, img: &Image, n: u64, pred: impl Fn(&Tensor) -> bool) -> f64 {
    (0..n).filter(|&i| pred(&p.apply(img, SampleKey::new(11, 0, i))[0])).count() as f64 / n as f64
}

#[test]
fn sampling_rates_match_probabilities() {
    // A 2x1 image whose left pixel is black and right white: flipped iff the
    // first value is white.
    let img = Image::from_rgb(2, 1, vec![0, 0, 0, 255, 255, 255]).unwrap();
    let n = 4000;
    let sd = |p: f64| (p * (1.0 - p) / n as f64).sqrt();
    for p in [0.5, 0.2, 0.9] {
        let flips = pipeline(json!([{"name": "RandomHorizontalFlip", "p": p}, {"name": "ToTensor"}]));
        let r = rate(&flips, &img, n, |t| t.data[0] > 0.5);
        assert!((r - p).abs() < 4.0 * sd(p), "flip rate {r} for p={p}");
    }
    // RandomGrayscale on a pure red pixel: gray makes G equal to R.
    let red = Image::from_rgb(1, 1, vec![255, 0, 0]).unwrap();
    let gray = pipeline(json!([{"name": "RandomGrayscale", "p": 0.3}, {"name": "ToTensor"}]));
    let r = rate(&gray, &red, n, |t| t.data[1] > 0.0);
    assert!((r - 0.3).abs() < 4.0 * sd(0.3), "grayscale rate {r}");
    // ImgPilGaussianBlur(p=0.5) on a 1-pixel line of black|white: blur mixes them.
    let edge = Image::from_rgb(4, 1, vec![0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255]).unwrap();
    let blur = pipeline(
        json!([{"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 1.0, "radius_max": 2.0}, {"name": "ToTensor"}]),
    );
    let r = rate(&blur, &edge, n, |t| t.data[1] > 0.0);
    assert!((r - 0.5).abs() < 4.0 * sd(0.5), "blur rate {r}");
}

#[test]
fn random_erasing_writes_zero_before_normalize() {
    let img = Image::filled(64, 48, [200, 200, 200]);
    let p = pipeline(json!([
        {"name": "ToTensor"},
        {"name": "RandomErasing", "p": 1.0},
        {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    ]));
    let erased_value = (0.0f32 - 0.485) / 0.229;
    let kept_value = (200.0f32 / 255.0 - 0.485) / 0.229;
    let mut erased_any = 0;
    for i in 0..200 {
        let t = &p.apply(&img, SampleKey::new(5, 0, i))[0];
        let plane = &t.data[..64 * 48];
        assert!(plane.iter().all(|&v| v == erased_value || v == kept_value));
        let rows: Vec<usize> = (0..48).filter(|&y| (0..64).any(|x| plane[y * 64 + x] == erased_value)).collect();
        let cols: Vec<usize> = (0..64).filter(|&x| (0..48).any(|y| plane[y * 64 + x] == erased_value)).collect();
        let count = plane.iter().filter(|&&v| v == erased_value).count();
        if count > 0 {
            erased_any += 1;
            // One rectangle, of area within the scale range (rounding allowed).
            assert_eq!(count, rows.len() * cols.len());
            let frac = count as f64 / (64.0 * 48.0);
            assert!((0.01..=0.36).contains(&frac), "erased fraction {frac}");
        }
    }
    // With p = 1 only the 10-tries failure leaves an image untouched.
    assert!(erased_any >= 190, "{erased_any} of 200 erased");
    // On a 1x1 tensor only an empty box passes torchvision's `h < H and w < W`.
    for i in 0..50 {
        let mut rng = SampleRng::new(SampleKey::new(0, 0, i), 0);
        if let Some([_, _, h, w]) = RandomErasing::get_params(1, 1, [0.02, 0.33], [0.3, 3.3], &mut rng) {
            assert_eq!(h * w, 0);
        }
    }
}

#[test]
fn multicrop_and_eval_pipelines_give_the_right_shapes() {
    let img = synthetic(500, 375, 23);
    let swav = pipeline(json!([
        {"name": "ImgPilToMultiCrop", "total_num_crops": 4, "size_crops": [224, 96], "num_crops": [2, 2],
         "crop_scales": [[0.14, 1], [0.05, 0.14]]},
        {"name": "RandomHorizontalFlip"},
        {"name": "ToTensor"}
    ]));
    let out = swav.apply(&img, SampleKey::new(0, 0, 1));
    let shapes: Vec<[usize; 3]> = out.iter().map(|t| t.shape).collect();
    assert_eq!(shapes, vec![[3, 224, 224], [3, 224, 224], [3, 96, 96], [3, 96, 96]]);
    let eval = pipeline(json!([
        {"name": "Resize", "size": 256}, {"name": "CenterCrop", "size": 224}, {"name": "ToTensor"},
        {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    ]));
    let a = eval.apply(&img, SampleKey::new(0, 0, 1));
    // Deterministic: every key gives the same tensor.
    assert_eq!(a, eval.apply(&img, SampleKey::new(9, 9, 9)));
    assert_eq!(a[0].shape, [3, 224, 224]);
    // ToTensor + Normalize arithmetic: (v / 255 - mean) / std in f32.
    let px = Image::from_rgb(1, 1, vec![10, 128, 250]).unwrap();
    let t = pipeline(json!([{"name": "ToTensor"}, {"name": "Normalize", "mean": [0.5], "std": [0.25]}]))
        .apply(&px, SampleKey::new(0, 0, 0));
    assert_eq!(
        t[0].data,
        vec![(10.0f32 / 255.0 - 0.5) / 0.25, (128.0f32 / 255.0 - 0.5) / 0.25, (250.0f32 / 255.0 - 0.5) / 0.25]
    );
}

#[test]
fn degenerate_images_do_not_panic() {
    let swav = pipeline(json!([
        {"name": "ImgPilToMultiCrop", "total_num_crops": 2, "size_crops": [32, 16], "num_crops": [1, 1],
         "crop_scales": [[0.14, 1], [0.05, 0.14]]},
        {"name": "RandomHorizontalFlip"},
        {"name": "ImgPilColorDistortion", "strength": 1.0},
        {"name": "ImgPilGaussianBlur", "p": 1.0, "radius_min": 0.1, "radius_max": 2.0},
        {"name": "RandAugment", "magnitude": 9, "magnitude_std": 0.5, "increasing_severity": true, "num_layers": 4},
        {"name": "ToTensor"},
        {"name": "RandomErasing", "p": 1.0},
        {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    ]));
    let eval =
        pipeline(json!([{"name": "Resize", "size": 256}, {"name": "CenterCrop", "size": 224}, {"name": "ToTensor"}]));
    for (w, h) in [(0, 0), (1, 1), (1, 300), (300, 1), (2, 3)] {
        let img = if w * h == 0 { Image::filled(w, h, [0; 3]) } else { synthetic(w, h, 40) };
        for i in 0..20 {
            let key = SampleKey::new(0, 0, i);
            let shapes: Vec<[usize; 3]> = deit_train().apply(&img, key).iter().map(|t| t.shape).collect();
            assert_eq!(shapes, vec![[3, 224, 224]], "{w}x{h}");
            let shapes: Vec<[usize; 3]> = swav.apply(&img, key).iter().map(|t| t.shape).collect();
            assert_eq!(shapes, vec![[3, 32, 32], [3, 16, 16]], "{w}x{h}");
        }
        // Resize(256) of a 1-pixel-wide image is 256 x 76800, as in torchvision.
        assert_eq!(eval.apply(&img, SampleKey::new(0, 0, 0))[0].shape, [3, 224, 224], "{w}x{h}");
    }
}
