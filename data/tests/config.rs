//! Building pipelines from TRANSFORMS lists: every list in the repository's
//! configs builds and runs, and mistakes give messages that name the list
//! index, the transform, the key and the accepted keys.

mod common;

use serde_json::{json, Value};
use tessera_data::{Pipeline, SampleKey};

fn error(list: Value) -> String {
    match Pipeline::from_config(&list) {
        Ok(_) => panic!("expected an error for {list}"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(message: &str, parts: &[&str]) {
    for p in parts {
        assert!(message.contains(p), "message {message:?} lacks {p:?}");
    }
}

fn tail() -> Value {
    json!({"name": "ToTensor"})
}

#[test]
fn unknown_transform_name() {
    let m = error(
        json!([{"name": "RandomHorizontalFlip"}, {"name": "RandomResizeCrop", "size": 224}, {"name": "ToTensor"}]),
    );
    assert_contains(
        &m,
        &[
            "TRANSFORMS[1]",
            "unknown transform `RandomResizeCrop`",
            "did you mean `RandomResizedCrop`",
            "known transforms: ",
            "ImgPilToMultiCrop",
        ],
    );
    let m = error(json!([{"size": 224}]));
    assert_contains(&m, &["TRANSFORMS[0]", "missing `name`"]);
    let m = error(json!({"name": "ToTensor"}));
    assert_contains(&m, &["expected a list of transforms"]);
}

#[test]
fn unknown_key_lists_accepted_keys() {
    let m = error(json!([{"name": "ColorJitter", "brightnes": 0.4}, tail()]));
    assert_contains(
        &m,
        &[
            "TRANSFORMS[0] (ColorJitter)",
            "unknown key `brightnes`",
            "did you mean `brightness`",
            "accepted keys: brightness, contrast, saturation, hue",
        ],
    );
    // VISSL's ImgPilColorDistortion.from_config reads only `strength`.
    let m = error(
        json!([{"name": "ImgReplicatePil"}, {"name": "ImgPilColorDistortion", "strength": 1.0, "hue": 0.1}, tail()]),
    );
    assert_contains(&m, &["TRANSFORMS[1] (ImgPilColorDistortion)", "unknown key `hue`", "accepted keys: strength"]);
    let m = error(json!([{"name": "ToTensor", "inplace": true}]));
    assert_contains(&m, &["TRANSFORMS[0] (ToTensor)", "unknown key `inplace`", "accepted keys: none"]);
}

#[test]
fn mistyped_and_invalid_values() {
    let m = error(json!([{"name": "RandomHorizontalFlip", "p": "half"}, tail()]));
    assert_contains(
        &m,
        &["TRANSFORMS[0] (RandomHorizontalFlip)", "key `p`", "expected a number", "\"half\"", "accepted keys: p"],
    );
    let m = error(json!([{"name": "RandomHorizontalFlip", "p": 1.5}, tail()]));
    assert_contains(&m, &["key `p`", "outside [0, 1]"]);
    let m = error(json!([{"name": "RandomResizedCrop", "size": 224, "scale": [0.08]}, tail()]));
    assert_contains(
        &m,
        &[
            "(RandomResizedCrop)",
            "key `scale`",
            "a list of 2 numbers",
            "accepted keys: size, scale, ratio, interpolation",
        ],
    );
    let m = error(json!([{"name": "RandomResizedCrop", "size": 224, "interpolation": 7}, tail()]));
    assert_contains(&m, &["key `interpolation`", "unknown interpolation 7"]);
    let m = error(json!([{"name": "RandomResizedCrop", "size": -3}, tail()]));
    assert_contains(&m, &["key `size`", "a positive integer or a [height, width] list"]);
    let m = error(json!([{"name": "RandomResizedCrop"}, tail()]));
    assert_contains(&m, &["missing required key `size`"]);
    let m = error(json!([{"name": "RandAugment", "increasing_severity": "yes"}, tail()]));
    assert_contains(&m, &["(RandAugment)", "key `increasing_severity`", "expected true or false", "magnitude_std"]);
    let m = error(json!([{"name": "ColorJitter", "hue": 0.7}, tail()]));
    assert_contains(&m, &["key `hue`", "[-0.5, 0.5]"]);
    let m = error(
        json!([{"name": "ImgPilToMultiCrop", "total_num_crops": 3, "size_crops": [224], "num_crops": [2], "crop_scales": [[0.14, 1]]}, tail()]),
    );
    assert_contains(&m, &["(ImgPilToMultiCrop)", "key `total_num_crops`", "not the sum of num_crops"]);
    let m = error(json!([tail(), {"name": "Normalize", "mean": [0.5, 0.5, 0.5]}]));
    assert_contains(
        &m,
        &["TRANSFORMS[1] (Normalize)", "missing required key `std`", "accepted keys: mean, std, inplace"],
    );
}

#[test]
fn stage_order_is_checked() {
    let m = error(json!([{"name": "Normalize", "mean": [0.5], "std": [0.5]}, tail()]));
    assert_contains(&m, &["TRANSFORMS[0] (Normalize)", "before ToTensor"]);
    let m = error(json!([tail(), {"name": "RandomHorizontalFlip"}]));
    assert_contains(&m, &["TRANSFORMS[1] (RandomHorizontalFlip)", "after ToTensor"]);
    let m = error(json!([{"name": "RandomHorizontalFlip"}]));
    assert_contains(&m, &["no ToTensor"]);
}

/// Every TRANSFORMS list under configs/ (DATA.TRAIN and DATA.TEST), parsed
/// from the YAML files.
fn config_lists() -> Vec<(String, Value)> {
    let files = common::config_files(&["benchmark", "pretrain", "quickstart"]);
    let mut lists = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let v: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for split in ["TRAIN", "TEST"] {
            if let Some(list) = v.pointer(&format!("/config/DATA/{split}/TRANSFORMS")) {
                lists.push((format!("{} {split}", f.display()), list.clone()));
            }
        }
    }
    lists
}

#[test]
fn every_config_in_the_repository_builds_and_runs() {
    let lists = config_lists();
    assert!(lists.len() >= 20, "found only {} TRANSFORMS lists", lists.len());
    let img = common::synthetic(120, 90, 31);
    for (what, list) in lists {
        let p = Pipeline::from_config(&list).unwrap_or_else(|e| panic!("{what}: {e}"));
        let out = p.apply(&img, SampleKey::new(0, 0, 0));
        assert_eq!(out.len(), p.num_outputs(), "{what}");
        assert!(out.iter().all(|t| t.shape[0] == 3 && t.data.iter().all(|v| v.is_finite())), "{what}");
    }
}
