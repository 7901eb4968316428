//! Collators: MixUp/CutMix arithmetic against hand computations, soft
//! targets, modes, odd batches, the moco/simclr/multicrop layouts, and
//! COLLATE_FUNCTION(_PARAMS) errors.

mod common;

use common::assert_contains;
use serde_json::{json, Value};
use tessera_data::{
    box_lam, cutmix_box, BatchTensor, CollateSample, Collator, CutMixUp, Labels, MixMode, MixUnit, SampleKey,
    SampleRng, SslMethod, Tensor,
};

/// `[n, 3, h, w]` with distinct values per sample and position.
fn batch(n: usize, h: usize, w: usize, seed: u64) -> BatchTensor {
    let mut rng = SampleRng::new(SampleKey::new(seed, 0, 0), 0);
    let data = (0..n * 3 * h * w).map(|_| rng.uniform_range(-2.0, 2.0) as f32).collect();
    BatchTensor { shape: [n, 3, h, w], data }
}

fn mixer(mode: MixMode) -> CutMixUp {
    CutMixUp { mode, label_smoothing: 0.0, num_classes: 10, ..CutMixUp::default() }
}

#[test]
fn mixup_is_lambda_x_plus_one_minus_lambda_x_flipped() {
    let x = batch(4, 5, 6, 1);
    let mut y = x.clone();
    let lam = 0.2917356427;
    let soft = mixer(MixMode::Batch).mix(&mut y, &[0, 1, 2, 3], &[MixUnit { lam, bbox: None }]).unwrap();
    let (a, b) = (lam as f32, (1.0 - lam) as f32);
    for i in 0..4 {
        let (xi, xj) = (x.sample(i), x.sample(3 - i));
        for (k, v) in y.sample(i).iter().enumerate() {
            assert_eq!(v.to_bits(), (xi[k] * a + xj[k] * b).to_bits(), "sample {i} value {k}");
        }
        // No smoothing: the target is λ on the own class, 1-λ on the partner's.
        assert_eq!(soft[i * 10 + i], a);
        assert_eq!(soft[i * 10 + 3 - i], b);
    }
    // λ = 1 leaves the batch untouched.
    let mut z = x.clone();
    mixer(MixMode::Batch).mix(&mut z, &[0, 1, 2, 3], &[MixUnit { lam: 1.0, bbox: None }]).unwrap();
    assert_eq!(z, x);
}

#[test]
fn cutmix_box_and_corrected_lambda_by_hand() {
    // λ = 0.64: r = 0.6, cut 6x6 on 10x10; centre (1, 8): rows [1-3, 1+3) -> [0, 4),
    // columns [8-3, 8+3) -> [5, 10) after clipping; area 20 -> λ = 1 - 20/100.
    let bbox = cutmix_box(10, 10, 0.64, [1, 8]);
    assert_eq!(bbox, [0, 4, 5, 10]);
    assert_eq!(box_lam(10, 10, bbox), 0.8);
    // Unclipped: λ = 0.75 on 8x12, r = 0.5: cut 4x6 at (4, 6) -> [2,6) x [3,9), area 24.
    assert_eq!(cutmix_box(8, 12, 0.75, [4, 6]), [2, 6, 3, 9]);
    assert_eq!(box_lam(8, 12, [2, 6, 3, 9]), 0.75);
    // Odd cut: int(10 * sqrt(0.5)) = 7, 7 // 2 = 3 on each side (the box is 6 wide, as timm).
    assert_eq!(cutmix_box(10, 10, 0.5, [5, 5]), [2, 8, 2, 8]);

    let x = batch(2, 10, 10, 2);
    let mut y = x.clone();
    let soft = mixer(MixMode::Batch).mix(&mut y, &[4, 7], &[MixUnit { lam: 0.8, bbox: Some(bbox) }]).unwrap();
    for i in 0..2 {
        for c in 0..3 {
            for r in 0..10 {
                for col in 0..10 {
                    let k = (c * 10 + r) * 10 + col;
                    let inside = (0..4).contains(&r) && (5..10).contains(&col);
                    let want = if inside { x.sample(1 - i)[k] } else { x.sample(i)[k] };
                    assert_eq!(y.sample(i)[k], want, "sample {i} c{c} ({r}, {col})");
                }
            }
        }
    }
    assert_eq!(soft[4], 0.8f32);
    assert_eq!(soft[7], (1.0f64 - 0.8) as f32);
    assert_eq!(soft[10 + 7], 0.8f32);
}

#[test]
fn drawn_boxes_fit_and_lambda_is_the_area_share() {
    let mix = CutMixUp { mixup_alpha: 0.8, cutmix_alpha: 1.0, switch_prob: 0.5, ..CutMixUp::default() };
    let (mut cutmix, mut mixed, n) = (0, 0, 4000);
    for i in 0..n {
        let mut rng = SampleRng::new(SampleKey::new(9, 0, i), 0x8000);
        let units = mix.draw(&mut rng, 8, 13, 17).unwrap();
        assert_eq!(units.len(), 1);
        let u = &units[0];
        assert!((0.0..=1.0).contains(&u.lam));
        if let Some(b) = u.bbox {
            cutmix += 1;
            assert!(b[0] <= b[1] && b[1] <= 13 && b[2] <= b[3] && b[3] <= 17, "{b:?}");
            assert_eq!(u.lam, box_lam(13, 17, b));
        } else if u.lam < 1.0 {
            mixed += 1;
        }
    }
    let share = cutmix as f64 / n as f64;
    assert!((share - 0.5).abs() < 0.04, "switch_prob 0.5, got {share}");
    assert!(cutmix + mixed > n as usize * 99 / 100, "prob 1: nearly every batch is mixed");
    // prob 0: never mixed; cutmix_minmax: box sides within [min, max) of the image.
    let off = CutMixUp { prob: 0.0, ..mix.clone() };
    let minmax = CutMixUp { cutmix_minmax: Some([0.2, 0.5]), mixup_alpha: 0.0, ..mix.clone() };
    for i in 0..500 {
        let mut rng = SampleRng::new(SampleKey::new(1, 2, i), 0x8000);
        assert_eq!(off.draw(&mut rng, 8, 20, 20).unwrap(), [MixUnit { lam: 1.0, bbox: None }]);
        let u = &minmax.draw(&mut rng, 8, 20, 30).unwrap()[0];
        if u.lam < 1.0 || u.bbox.is_some() {
            let b = u.bbox.expect("cutmix only");
            assert!((4..10).contains(&(b[1] - b[0])) && (6..15).contains(&(b[3] - b[2])), "{b:?}");
            assert_eq!(u.lam, box_lam(20, 30, b));
        }
    }
}

#[test]
fn soft_targets_are_mixed_smoothed_one_hots() {
    let (s, k) = (0.1, 5);
    let mix = CutMixUp { label_smoothing: s, num_classes: k, ..CutMixUp::default() };
    let labels = [0, 1, 1, 4];
    let lam = 0.37;
    let t = mix.targets(&labels, &[lam; 4]);
    let (off, on) = (s / k as f64, 1.0 - s + s / k as f64);
    let smooth = |y: i64, c: usize| if c as i64 == y { on } else { off };
    for i in 0..4 {
        let mut row_sum = 0.0;
        for c in 0..k {
            let want = lam * smooth(labels[i], c) + (1.0 - lam) * smooth(labels[3 - i], c);
            let got = t[i * k + c] as f64;
            assert!((got - want).abs() < 1e-6, "sample {i} class {c}: {got} vs {want}");
            row_sum += got;
        }
        assert!((row_sum - 1.0).abs() < 1e-6);
    }
    // λ = 1: the smoothed one-hot itself (what un-mixed batches get).
    let t = mix.targets(&labels, &[1.0; 4]);
    assert_eq!(t[..5], [on as f32, off as f32, off as f32, off as f32, off as f32]);
}

#[test]
fn pair_and_elem_modes_use_per_sample_lambdas() {
    let x = batch(4, 3, 3, 3);
    let labels = [0, 1, 2, 3];
    // pair: units for pairs (0, 3) and (1, 2), both members mixed symmetrically.
    let (la, lb) = (0.25f32 as f64, 0.625f32 as f64);
    let mut y = x.clone();
    let units = [MixUnit { lam: la, bbox: None }, MixUnit { lam: lb, bbox: None }];
    let soft = mixer(MixMode::Pair).mix(&mut y, &labels, &units).unwrap();
    for (i, lam) in [(0, la), (1, lb), (2, lb), (3, la)] {
        let (a, b) = (lam as f32, 1.0f32 - lam as f32);
        for (k, v) in y.sample(i).iter().enumerate() {
            assert_eq!(*v, x.sample(i)[k] * a + x.sample(3 - i)[k] * b, "pair, sample {i}");
        }
        assert_eq!(soft[i * 10 + i], a, "per-sample λ in the target of sample {i}");
    }
    // elem: each sample its own λ, partner from the unmodified batch; a CutMix
    // unit and a no-mix unit in the same batch.
    let mut y = x.clone();
    let units = [
        MixUnit { lam: 0.5, bbox: None },
        MixUnit { lam: 1.0, bbox: None },
        MixUnit { lam: 1.0 - 4.0 / 9.0, bbox: Some([0, 2, 1, 3]) },
        MixUnit { lam: 0.75, bbox: None },
    ];
    let soft = mixer(MixMode::Elem).mix(&mut y, &labels, &units).unwrap();
    for (k, v) in y.sample(3).iter().enumerate() {
        assert_eq!(*v, x.sample(3)[k] * 0.75 + x.sample(0)[k] * 0.25, "elem mixes with the original sample 0");
    }
    assert_eq!(y.sample(1), x.sample(1));
    let (o2, p2) = (x.sample(2), x.sample(1));
    for (k, v) in y.sample(2).iter().enumerate() {
        let (r, c) = ((k % 9) / 3, k % 3);
        assert_eq!(*v, if r < 2 && (1..3).contains(&c) { p2[k] } else { o2[k] });
    }
    let lams: Vec<f32> = (0..4).map(|i| soft[i * 10 + i]).collect();
    assert_eq!(lams, [0.5, 1.0, (1.0 - 4.0 / 9.0) as f32, 0.75]);
    // The wrong number of units is an error, not a panic.
    assert!(mixer(MixMode::Elem).mix(&mut x.clone(), &labels, &units[..2]).is_err());
}

fn sample(index: usize, label: i64, copies: usize, h: usize) -> CollateSample {
    // Every value encodes (sample, copy): 10 * index + copy.
    let views =
        (0..copies).map(|c| Tensor { shape: [3, h, h], data: vec![(10 * index + c) as f32; 3 * h * h] }).collect();
    CollateSample { views, label, index, valid: index != 2 }
}

fn samples(n: usize, copies: usize) -> Vec<CollateSample> {
    (0..n).map(|i| sample(100 + i, (i % 2) as i64, copies, 2)).collect()
}

fn firsts(t: &BatchTensor) -> Vec<f32> {
    (0..t.shape[0]).map(|i| t.sample(i)[0]).collect()
}

#[test]
fn odd_batches_are_errors_for_cutmixup() {
    let c = Collator::CutMixUp(CutMixUp { num_classes: 2, ..CutMixUp::default() });
    let m = c.collate(&samples(3, 1), SampleKey::new(0, 0, 7)).unwrap_err().to_string();
    assert_contains(&m, &["batch 7", "even batch", "got 3 samples", "DROP_LAST"]);
    let m = c.collate(&[sample(0, 5, 1, 2), sample(1, 0, 1, 2)], SampleKey::new(0, 0, 0)).unwrap_err().to_string();
    assert_contains(&m, &["label 5", "num_classes 2", "LABEL_TYPE: zero"]);
}

#[test]
fn moco_simclr_and_multicrop_layouts() {
    let key = SampleKey::new(0, 0, 0);
    let s = samples(3, 2);
    let moco = Collator::Moco.collate(&s, key).unwrap();
    assert_eq!(moco.views.len(), 1);
    assert_eq!(moco.views[0].shape, [3, 3, 2, 2]);
    assert_eq!(firsts(&moco.views[0]), [1000.0, 1010.0, 1020.0], "data = copy 0 of each sample");
    assert_eq!(firsts(moco.momentum.as_ref().unwrap()), [1001.0, 1011.0, 1021.0], "data_momentum = copy 1");
    assert_eq!(moco.labels, Labels::Hard { shape: vec![3, 2], data: vec![0, 0, 1, 1, 0, 0] });
    assert_eq!(moco.data_idx, [100, 100, 101, 101, 102, 102]);
    let m = Collator::Moco.collate(&samples(2, 3), key).unwrap_err().to_string();
    assert_contains(&m, &["exactly 2 copies", "got 3"]);

    for c in [Collator::Simclr, Collator::Multicrop, Collator::Default] {
        let b = c.collate(&s, key).unwrap();
        assert!(b.momentum.is_none());
        assert_eq!(b.views.len(), 2, "{}", c.name());
        assert_eq!(firsts(&b.views[0]), [1000.0, 1010.0, 1020.0]);
        assert_eq!(firsts(&b.views[1]), [1001.0, 1011.0, 1021.0]);
        // Position-major: [img1_0, img2_0, img3_0, img1_1, img2_1, img3_1].
        assert_eq!(b.labels, Labels::Hard { shape: vec![6], data: vec![0, 1, 0, 0, 1, 0] });
        assert_eq!(b.data_idx, [100, 101, 102, 100, 101, 102]);
        assert_eq!(b.data_valid, [1, 1, 1, 1, 1, 1]);
    }
    let mut bad = samples(2, 1);
    bad[1].valid = false;
    assert_eq!(Collator::Default.collate(&bad, key).unwrap().data_valid, [1, -1]);
    // Multi-crop views of different sizes stay separate tensors.
    let mixed: Vec<CollateSample> = (0..2)
        .map(|i| {
            let mut s = sample(i, 0, 2, 4);
            s.views[1] = Tensor { shape: [3, 2, 2], data: vec![0.0; 12] };
            s
        })
        .collect();
    let b = Collator::Multicrop.collate(&mixed, key).unwrap();
    assert_eq!((b.views[0].shape, b.views[1].shape), ([2, 3, 4, 4], [2, 3, 2, 2]));
    // Within a position they must agree (torch.stack).
    let mut uneven = samples(2, 1);
    uneven[1].views[0] = Tensor { shape: [3, 5, 5], data: vec![0.0; 75] };
    assert_contains(
        &Collator::Default.collate(&uneven, key).unwrap_err().to_string(),
        &["copy position 0", "different sizes"],
    );
}

#[test]
fn cutmixup_hands_over_to_the_ssl_layouts() {
    let key = SampleKey::new(3, 1, 5);
    let base = CutMixUp { num_classes: 2, cutmix_alpha: 1.0, ..CutMixUp::default() };
    let s: Vec<CollateSample> = (0..4).map(|i| sample(i, 0, 2, 4)).collect();
    let moco =
        Collator::CutMixUp(CutMixUp { ssl_method: Some(SslMethod::Moco), ..base.clone() }).collate(&s, key).unwrap();
    assert!(moco.momentum.is_some());
    assert_eq!(moco.labels.shape(), [4, 2, 2]);
    let swav =
        Collator::CutMixUp(CutMixUp { ssl_method: Some(SslMethod::Swav), ..base.clone() }).collate(&s, key).unwrap();
    assert_eq!((swav.views.len(), swav.labels.shape()), (2, &[8usize, 2][..]));
    let simclr =
        Collator::CutMixUp(CutMixUp { ssl_method: Some(SslMethod::Simclr), ..base.clone() }).collate(&s, key).unwrap();
    assert_eq!(simclr.views, swav.views, "same draws, same mixed views");
    // moco's view 0 and momentum are swav's positions 0 and 1; labels regrouped per sample.
    assert_eq!((&moco.views[0], moco.momentum.as_ref().unwrap()), (&swav.views[0], &swav.views[1]));
    let (Labels::Soft { data: m, .. }, Labels::Soft { data: w, .. }) = (&moco.labels, &swav.labels) else {
        panic!("soft labels expected")
    };
    for i in 0..4 {
        assert_eq!(m[i * 4..i * 4 + 2], w[i * 2..i * 2 + 2], "sample {i} copy 0");
        assert_eq!(m[i * 4 + 2..i * 4 + 4], w[8 + i * 2..8 + i * 2 + 2], "sample {i} copy 1");
    }
    // Positions draw independently: over a few batches their λ differ.
    let differs = (0..5).any(|b| {
        let out = Collator::CutMixUp(base.clone()).collate(&s, SampleKey::new(3, 1, b)).unwrap();
        let Labels::Soft { data, .. } = out.labels else { return false };
        data[0] != data[8]
    });
    assert!(differs, "copy positions share their mixing parameters");
    // Same key, same batch; another batch index, other draws.
    let again = Collator::CutMixUp(base.clone()).collate(&s, key).unwrap();
    assert_eq!(again, Collator::CutMixUp(base.clone()).collate(&s, key).unwrap());
}

fn collator_error(name: &str, params: Value) -> String {
    match Collator::from_config(name, &params, "TRAIN") {
        Ok(c) => panic!("expected an error for {name} {params}, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn collator_config_errors_name_the_key() {
    assert_contains(
        &collator_error("cutmix_collator", json!({})),
        &[
            "DATA.TRAIN.COLLATE_FUNCTION",
            "unknown collator `cutmix_collator`",
            "did you mean `cutmixup_collator`",
            "moco_collator",
        ],
    );
    let p = "DATA.TRAIN.COLLATE_FUNCTION_PARAMS";
    let cases = [
        (json!({"mixup_alpah": 1.0}), "mixup_alpah", "did you mean `mixup_alpha`"),
        (json!({"mode": "batches"}), "mode", "\"batch\", \"pair\" or \"elem\""),
        (json!({"prob": 1.5}), "prob", "outside [0, 1]"),
        (json!({"switch_prob": "half"}), "switch_prob", "expected a number"),
        (json!({"num_classes": 0}), "num_classes", "positive integer"),
        (json!({"cutmix_minmax": [0.8, 0.2]}), "cutmix_minmax", "min < max"),
        (json!({"ssl_method": "byol"}), "ssl_method", "\"moco\", \"simclr\" or \"swav\""),
        (json!({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}), "mixup_alpha", "must be set"),
        (json!({"cutmix_alpha": -1.0}), "cutmix_alpha", "positive"),
        (json!({"correct_lam": 1}), "correct_lam", "True or False"),
    ];
    for (params, key, part) in cases {
        assert_contains(&collator_error("cutmixup_collator", params), &[&format!("{p}.{key}"), part]);
    }
    assert_contains(
        &collator_error("moco_collator", json!({"num_classes": 2})),
        &[&format!("{p}.num_classes"), "takes no parameters"],
    );
    assert_contains(
        &collator_error("multicrop_collator", json!({"create_multidimensional_tensor": true})),
        &["create_multidimensional_tensor", "only False"],
    );
    assert_contains(&collator_error("default_collate", json!([1])), &[p, "expected a map"]);
    // The configs' parameter sets parse, with timm's defaults for the rest.
    let c = Collator::from_config(
        "cutmixup_collator",
        &json!({"ssl_method": "moco", "mixup_alpha": 1.0, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5,
                "mode": "batch", "correct_lam": true, "label_smoothing": 0.1, "num_classes": 2}),
        "TRAIN",
    )
    .unwrap();
    let Collator::CutMixUp(m) = c else { panic!() };
    assert_eq!((m.ssl_method, m.num_classes, m.cutmix_minmax), (Some(SslMethod::Moco), 2, None));
    let Collator::CutMixUp(d) = Collator::from_config("cutmixup_collator", &json!({}), "TRAIN").unwrap() else {
        panic!()
    };
    assert_eq!(d, CutMixUp::default());
    assert_eq!((d.mixup_alpha, d.cutmix_alpha, d.label_smoothing, d.num_classes), (1.0, 0.0, 0.1, 1000));
}
