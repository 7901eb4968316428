//! `Dataset::from_config`: ImageFolder order and labels, the catalog, label
//! rules, DATA_LIMIT, the synthetic source, unreadable images, and the
//! message of every configuration error.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_contains, scratch_dir, synthetic, write_bytes, write_png};
use serde_json::{json, Value};
use tessera_data::{Dataset, DatasetOptions, Error, Image, Loader, LoaderOptions, MEAN_GRAY};

fn build(node: &Value, catalog: &Path) -> tessera_data::Result<Dataset> {
    Dataset::from_config(node, "TRAIN", catalog, &DatasetOptions::default())
}

fn error(node: Value, catalog: &Path) -> String {
    match build(&node, catalog) {
        Ok(_) => panic!("expected an error for {node}"),
        Err(e) => e.to_string(),
    }
}

fn folder(path: &Path) -> Value {
    json!({"DATA_SOURCES": ["disk_folder"], "LABEL_SOURCES": ["disk_folder"], "DATASET_NAMES": ["x"], "DATA_PATHS": [path]})
}

fn no_catalog() -> PathBuf {
    PathBuf::from("/nonexistent/dataset_catalog.json")
}

/// A tree whose torchvision order is known by hand (see `expected_order`).
fn ordered_tree(root: &Path) {
    let img = synthetic(8, 6, 1);
    // Classes created out of order; "Zebra" sorts first (byte order).
    for f in [
        "dog/x.png",
        "cat/b.png",
        "cat/a.PNG",
        "cat/A.png",
        "cat/sub/c.jpg",
        "cat/sub-x/d.png",
        "cat/sub/deeper/e.png",
        "Zebra/z.webp",
    ] {
        write_png(&root.join(f), &img);
    }
    // Not images: skipped.
    write_bytes(&root.join("cat/notes.txt"), b"hello");
    write_bytes(&root.join("cat/sub/archive.png.bak"), b"x");
    // A loose file at the root is not a class.
    write_bytes(&root.join("README"), b"x");
}

fn expected_order() -> Vec<(&'static str, i64)> {
    vec![
        ("Zebra/z.webp", 0),
        // sorted(os.walk(cat)): "cat" < "cat/sub" < "cat/sub-x" < "cat/sub/deeper".
        ("cat/A.png", 1),
        ("cat/a.PNG", 1),
        ("cat/b.png", 1),
        ("cat/sub/c.jpg", 1),
        ("cat/sub-x/d.png", 1),
        ("cat/sub/deeper/e.png", 1),
        ("dog/x.png", 2),
    ]
}

#[test]
fn image_folder_order_and_labels_follow_torchvision() {
    let root = scratch_dir("ds-order");
    ordered_tree(&root);
    let ds = build(&folder(&root), &no_catalog()).unwrap();
    assert_eq!(ds.classes(), ["Zebra", "cat", "dog"]);
    let got: Vec<(String, i64)> = (0..ds.len())
        .map(|i| {
            let rel = ds.path(i).unwrap().strip_prefix(&root).unwrap().to_string_lossy().into_owned();
            (rel, ds.label(i).unwrap())
        })
        .collect();
    let want: Vec<(String, i64)> = expected_order().into_iter().map(|(p, l)| (p.to_string(), l)).collect();
    assert_eq!(got, want);
    // Reading a sample decodes it; the label and index come with it.
    let s = ds.get(6).unwrap();
    assert_eq!((s.label, s.index, s.valid), (1, 6, true));
    assert_eq!(s.image, synthetic(8, 6, 1));
    assert!(s.warning.is_none());
}

#[test]
fn label_sources_win_over_label_type() {
    let root = scratch_dir("ds-labels");
    ordered_tree(&root);
    let labels = |node: Value| {
        let ds = build(&node, &no_catalog()).unwrap();
        (0..ds.len()).map(|i| ds.label(i).unwrap()).collect::<Vec<_>>()
    };
    let folder_labels = vec![0, 1, 1, 1, 1, 1, 1, 2];
    // 1gpu_vit_example: LABEL_TYPE sample_index, LABEL_SOURCES [disk_folder] -> folder labels.
    let mut node = folder(&root);
    node["LABEL_TYPE"] = json!("sample_index");
    assert_eq!(labels(node.clone()), folder_labels);
    node["LABEL_TYPE"] = json!("zero");
    assert_eq!(labels(node.clone()), folder_labels);
    // No label source: zero -> 0; standard and sample_index -> the index.
    node["LABEL_SOURCES"] = json!([]);
    assert_eq!(labels(node.clone()), vec![0; 8]);
    for t in ["standard", "sample_index"] {
        node["LABEL_TYPE"] = json!(t);
        assert_eq!(labels(node.clone()), (0..8).collect::<Vec<i64>>(), "{t}");
    }
}

#[test]
fn catalog_resolves_dataset_names_per_split() {
    let dir = scratch_dir("ds-catalog");
    let (train, val) = (dir.join("toy/train"), dir.join("toy/val"));
    write_png(&train.join("a/1.png"), &synthetic(4, 4, 0));
    write_png(&train.join("b/1.png"), &synthetic(4, 4, 0));
    write_png(&val.join("a/1.png"), &synthetic(4, 4, 0));
    let catalog = dir.join("dataset_catalog.json");
    let entry = json!({"toy": {"train": [train, train], "val": [val, val]}, "other": {"train": ["/x", "/x"]}});
    std::fs::write(&catalog, entry.to_string()).unwrap();
    let node = json!({"DATA_SOURCES": ["disk_folder"], "LABEL_SOURCES": ["disk_folder"], "DATASET_NAMES": ["toy"]});
    let ds = Dataset::from_config(&node, "TRAIN", &catalog, &DatasetOptions::default()).unwrap();
    assert_eq!((ds.len(), ds.classes().len()), (2, 2));
    assert!(ds.path(0).unwrap().starts_with(&train));
    let ds = Dataset::from_config(&node, "TEST", &catalog, &DatasetOptions::default()).unwrap();
    assert_eq!((ds.len(), ds.classes().len()), (1, 1));
    assert!(ds.path(0).unwrap().starts_with(&val));
    // DATA_PATHS wins over the catalog.
    let mut with_path = node.clone();
    with_path["DATA_PATHS"] = json!([val]);
    assert_eq!(build(&with_path, &catalog).unwrap().len(), 1);

    // A name missing from the catalog lists the known ones.
    let mut bad = node.clone();
    bad["DATASET_NAMES"] = json!(["tyo"]);
    let m = error(bad, &catalog);
    assert_contains(
        &m,
        &[
            "DATA.TRAIN.DATASET_NAMES[0]",
            "`tyo` is not in the catalog",
            "did you mean `toy`",
            "known datasets: other, toy",
        ],
    );
    // A catalog path that does not exist names the key, the dataset and the catalog.
    let mut missing = node.clone();
    missing["DATASET_NAMES"] = json!(["other"]);
    let m = error(missing, &catalog);
    assert_contains(
        &m,
        &[
            "DATA.TRAIN.DATASET_NAMES[0]",
            "/x",
            "does not exist",
            "dataset `other`",
            "dataset_catalog.json",
            "DATA.TRAIN.DATA_PATHS",
        ],
    );
    // No "val" list for the TEST split.
    let m = Dataset::from_config(
        &json!({"DATA_SOURCES": ["disk_folder"], "DATASET_NAMES": ["other"]}),
        "TEST",
        &catalog,
        &DatasetOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert_contains(&m, &["DATA.TEST.DATASET_NAMES[0]", "no \"val\" list"]);
    // An unreadable catalog names its path.
    let m = error(node, &no_catalog());
    assert_contains(&m, &["/nonexistent/dataset_catalog.json", "cannot read the dataset catalog"]);
}

#[test]
fn folder_errors_name_the_key_and_the_path() {
    let dir = scratch_dir("ds-errors");
    let cat = no_catalog();
    let missing = dir.join("nope");
    assert_contains(
        &error(folder(&missing), &cat),
        &["DATA.TRAIN.DATA_PATHS[0]", &missing.display().to_string(), "does not exist"],
    );
    let file = dir.join("file.png");
    write_bytes(&file, b"x");
    assert_contains(&error(folder(&file), &cat), &["DATA.TRAIN.DATA_PATHS[0]", "file.png", "is not a directory"]);
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    write_bytes(&empty.join("loose.png"), b"x");
    assert_contains(&error(folder(&empty), &cat), &["DATA.TRAIN.DATA_PATHS[0]", "empty", "found no class folder"]);
    let holes = dir.join("holes");
    write_png(&holes.join("full/1.png"), &synthetic(4, 4, 0));
    write_bytes(&holes.join("text_only/readme.txt"), b"x");
    std::fs::create_dir_all(holes.join("void/deeper")).unwrap();
    assert_contains(
        &error(folder(&holes), &cat),
        &["DATA.TRAIN.DATA_PATHS[0]", "holes", "`text_only`, `void`", "hold no image file", ".jpeg"],
    );
}

#[test]
fn config_errors_name_the_key() {
    let root = scratch_dir("ds-config-errors");
    ordered_tree(&root);
    let cat = no_catalog();
    let with = |key: &str, value: Value| {
        let mut n = folder(&root);
        n[key] = value;
        n
    };
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (with("DATA_SOURCES", json!([])), vec!["DATA.TRAIN.DATA_SOURCES", "is empty", "disk_folder, synthetic"]),
        (
            with("DATA_SOURCES", json!(["disk_filelist"])),
            vec!["DATA.TRAIN.DATA_SOURCES[0]", "unknown data source `disk_filelist`"],
        ),
        (
            with("DATA_SOURCES", json!(["disk_folder", "disk_folder"])),
            vec!["DATA.TRAIN.DATA_SOURCES", "one data source per split"],
        ),
        (with("DATASET_NAMES", json!([])), vec!["DATA.TRAIN.DATASET_NAMES", "has 0 entries but DATA_SOURCES has 1"]),
        (with("DATA_PATHS", json!(["/a", "/b"])), vec!["DATA.TRAIN.DATA_PATHS", "has 2 entries"]),
        (with("LABEL_TYPE", json!("onehot")), vec!["DATA.TRAIN.LABEL_TYPE", "unknown label type `onehot`"]),
        (
            with("LABEL_SOURCES", json!(["synthetic"])),
            vec!["DATA.TRAIN.LABEL_SOURCES[0]", "needs the data source `synthetic`"],
        ),
        (with("LABEL_SOURCES", json!(["disk_filelist"])), vec!["DATA.TRAIN.LABEL_SOURCES[0]", "unknown label source"]),
        (with("DATA_LIMIT", json!(9)), vec!["DATA.TRAIN.DATA_LIMIT", "9", "only 8", "8 images in"]),
        (with("DATA_LIMIT", json!(-2)), vec!["DATA.TRAIN.DATA_LIMIT", "-1 (all samples)"]),
        (with("DATA_LIMIT", json!("all")), vec!["DATA.TRAIN.DATA_LIMIT", "expected an integer"]),
        (with("DEFAULT_GRAY_IMG_SIZE", json!(0)), vec!["DATA.TRAIN.DEFAULT_GRAY_IMG_SIZE", "must be positive"]),
        (with("ENABLE_QUEUE_DATASET", json!(true)), vec!["DATA.TRAIN.ENABLE_QUEUE_DATASET", "not supported"]),
        (with("COPY_TO_LOCAL_DISK", json!(true)), vec!["DATA.TRAIN.COPY_TO_LOCAL_DISK", "not supported"]),
        (with("DATA_PATHS", json!("/a")), vec!["DATA.TRAIN.DATA_PATHS", "expected a list of strings"]),
        (
            with("DATA_LIMIT_SAMPLING", json!({"IS_BALANCED": true, "SEED": 0, "SKIP_NUM_SAMPLES": 0})),
            // 8 samples over 3 classes cannot give 2 of "Zebra" (it has 1).
            vec!["DATA.TRAIN.DATA_LIMIT", "class 0 has 1 samples"],
        ),
    ];
    for (node, parts) in cases {
        let node = if parts[0] == "DATA.TRAIN.DATA_LIMIT" && node["DATA_LIMIT_SAMPLING"].is_object() {
            let mut n = node;
            n["DATA_LIMIT"] = json!(6);
            n
        } else {
            node
        };
        assert_contains(&error(node, &cat), &parts);
    }
    let m = Dataset::from_config(&json!([1]), "TEST", &cat, &DatasetOptions::default()).unwrap_err().to_string();
    assert_contains(&m, &["DATA.TEST", "expected a map"]);
}

#[test]
fn data_limit_takes_a_seeded_subset() {
    let root = scratch_dir("ds-limit");
    for c in 0..3 {
        for i in 0..6 {
            write_png(&root.join(format!("c{c}/{i}.png")), &synthetic(4, 4, (c * 10 + i) as u64));
        }
    }
    let paths = |node: &Value| {
        let ds = build(node, &no_catalog()).unwrap();
        (0..ds.len()).map(|i| (ds.path(i).unwrap().to_path_buf(), ds.label(i).unwrap())).collect::<Vec<_>>()
    };
    let mut node = folder(&root);
    let all = paths(&node);
    assert_eq!(all.len(), 18);
    node["DATA_LIMIT"] = json!(7);
    let a = paths(&node);
    assert_eq!(a.len(), 7);
    let mut unique = a.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 7, "drawn without replacement");
    assert_ne!(a, all[..7].to_vec(), "a random subset, not the first 7 (VISSL's np.random.choice)");
    assert_eq!(a, paths(&node), "same seed, same subset");
    // Labels travel with the files.
    for (p, l) in &a {
        assert_eq!(all.iter().find(|(q, _)| q == p).unwrap().1, *l);
    }
    node["DATA_LIMIT_SAMPLING"] = json!({"SEED": 1, "IS_BALANCED": false, "SKIP_NUM_SAMPLES": 0});
    assert_ne!(paths(&node), a, "another seed, another subset");
    node["DATA_LIMIT_SAMPLING"] = json!({"SEED": 0, "IS_BALANCED": false, "SKIP_NUM_SAMPLES": 2});
    assert_eq!(paths(&node)[..5], a[2..], "skipping slides the window");
    node["DATA_LIMIT"] = json!(6);
    node["DATA_LIMIT_SAMPLING"] = json!({"SEED": 0, "IS_BALANCED": true, "SKIP_NUM_SAMPLES": 0});
    let labels: Vec<i64> = paths(&node).iter().map(|(_, l)| *l).collect();
    assert_eq!(labels, [0, 0, 1, 1, 2, 2], "balanced: 2 per class, classes in order");
    // sample_index labels are the limited dataset's indices (VISSL's data_idx).
    node["DATA_LIMIT_SAMPLING"] = json!({"SEED": 0, "IS_BALANCED": false, "SKIP_NUM_SAMPLES": 0});
    node["LABEL_SOURCES"] = json!([]);
    node["LABEL_TYPE"] = json!("sample_index");
    assert_eq!(paths(&node).iter().map(|(_, l)| *l).collect::<Vec<_>>(), (0..6).collect::<Vec<i64>>());
}

#[test]
fn synthetic_source_follows_vissl() {
    let quickstart = json!({
        "DATA_SOURCES": ["synthetic"], "LABEL_SOURCES": ["synthetic"], "DATASET_NAMES": ["synthetic"],
        "RANDOM_SYNTHETIC_IMAGES": true, "RANDOM_SYNTHETIC_LABELS": 10, "DEFAULT_GRAY_IMG_SIZE": 32, "DATA_LIMIT": 64
    });
    let ds = build(&quickstart, &no_catalog()).unwrap();
    assert_eq!(ds.len(), 64);
    assert!(ds.classes().is_empty() && ds.path(0).is_none());
    let mut labels = std::collections::BTreeSet::new();
    let (a, b) = (ds.get(0).unwrap(), ds.get(1).unwrap());
    assert_eq!((a.image.width(), a.image.height()), (32, 32));
    assert_ne!(a.image, b.image, "images differ per sample");
    assert_eq!(a.image, ds.get(0).unwrap().image, "and are a function of the index");
    // Smooth: neighbouring pixels are close (blurred upsampled noise).
    let rgb = a.image.as_rgb();
    let mut steepest = 0;
    for row in rgb.chunks(32 * 3) {
        for x in 0..31 {
            steepest = steepest.max(row[x * 3].abs_diff(row[x * 3 + 3]));
        }
    }
    assert!(steepest < 30, "steepest step between neighbours {steepest}");
    let (lo, hi) = (rgb.iter().min().unwrap(), rgb.iter().max().unwrap());
    assert!(hi - lo > 40, "not a flat image: values {lo}..{hi}");
    for i in 0..64 {
        let l = ds.label(i).unwrap();
        assert!((0..10).contains(&l));
        labels.insert(l);
    }
    assert!(labels.len() >= 5, "labels are index % 10 of a random subset: {labels:?}");
    // Without RANDOM_SYNTHETIC_IMAGES: the mean-gray image; without labels: 0.
    let gray = build(
        &json!({"DATA_SOURCES": ["synthetic"], "LABEL_SOURCES": ["synthetic"], "DATASET_NAMES": ["synthetic"], "DEFAULT_GRAY_IMG_SIZE": 20}),
        &no_catalog(),
    )
    .unwrap();
    assert_eq!(gray.len(), 50_000, "SyntheticImageDataset.DEFAULT_SIZE");
    let s = gray.get(123).unwrap();
    assert_eq!((s.image, s.label, s.valid), (Image::mean_gray(20), 0, true));
}

/// A class with one good image and three unreadable ones.
fn broken_tree(root: &Path) {
    let img = synthetic(12, 10, 3);
    write_png(&root.join("a/good.png"), &img);
    let mut png = Vec::new();
    {
        let mut e = png::Encoder::new(&mut png, 12, 10);
        e.set_color(png::ColorType::Rgb);
        e.write_header().unwrap().write_image_data(img.as_rgb()).unwrap();
    }
    write_bytes(&root.join("a/truncated.png"), &png[..png.len() / 2]);
    write_bytes(&root.join("b/corrupt.jpg"), b"\xFF\xD8\xFFthis is not a jpeg at all");
    write_bytes(&root.join("b/empty.jpeg"), b"");
}

#[test]
fn unreadable_images_become_gray_with_a_warning() {
    let root = scratch_dir("ds-broken");
    broken_tree(&root);
    let mut node = folder(&root);
    node["DEFAULT_GRAY_IMG_SIZE"] = json!(40);
    let ds = build(&node, &no_catalog()).unwrap();
    let names: Vec<String> =
        (0..4).map(|i| ds.path(i).unwrap().file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["good.png", "truncated.png", "corrupt.jpg", "empty.jpeg"]);
    assert!(ds.get(0).unwrap().valid);
    for (i, name) in names.iter().enumerate().skip(1) {
        let s = ds.get(i).unwrap();
        assert!(!s.valid);
        assert_eq!(s.image, Image::mean_gray(40));
        assert!(s.image.as_rgb().iter().all(|&v| v == MEAN_GRAY));
        let w = s.warning.unwrap();
        assert_eq!((w.index, w.path.file_name().unwrap().to_string_lossy()), (i, name.as_str().into()));
        assert!(!w.reason.is_empty());
        assert!(w.to_string().contains(name.as_str()), "{w}");
    }
    assert!(ds.get(3).unwrap().warning.unwrap().reason.contains("empty file"));

    // Through the loader: counted per epoch, data_valid -1 for them.
    node["TRANSFORMS"] = json!([{"name": "Resize", "size": [8, 8]}, {"name": "ToTensor"}]);
    node["BATCHSIZE_PER_REPLICA"] = json!(2);
    let data = json!({"TRAIN": node, "NUM_DATALOADER_WORKERS": 1});
    let loader = Loader::from_config(&data, "TRAIN", &no_catalog(), &LoaderOptions::default()).unwrap();
    for epoch in 0..2 {
        let mut batches = loader.epoch(epoch);
        let mut invalid = 0;
        for b in batches.by_ref() {
            let b = b.unwrap();
            invalid += b.data_valid.iter().filter(|&&v| v == -1).count();
            for (i, &idx) in b.data_idx.iter().enumerate() {
                assert_eq!(b.data_valid[i] == -1, idx != 0, "sample {idx}");
            }
        }
        let report = batches.report();
        assert_eq!((invalid, report.gray_images, report.warnings.len(), report.batches), (3, 3, 3, 2), "epoch {epoch}");
        let mut warned: Vec<usize> = report.warnings.iter().map(|w| w.index).collect();
        warned.sort_unstable();
        assert_eq!(warned, [1, 2, 3]);
    }
}

#[test]
fn error_mode_makes_unreadable_images_errors() {
    let root = scratch_dir("ds-broken-strict");
    broken_tree(&root);
    let strict = DatasetOptions { error_on_unreadable_image: true };
    let ds = Dataset::from_config(&folder(&root), "TRAIN", &no_catalog(), &strict).unwrap();
    assert!(ds.get(0).is_ok());
    match ds.get(1) {
        Err(Error::Decode { path, .. }) => assert!(path.ends_with("a/truncated.png")),
        other => panic!("expected a decode error, got {other:?}"),
    }
    // The config key overrides the option either way.
    let mut node = folder(&root);
    node["ERROR_ON_UNREADABLE_IMAGE"] = json!(true);
    let ds = build(&node, &no_catalog()).unwrap();
    let m = ds.get(2).unwrap_err().to_string();
    assert_contains(&m, &["corrupt.jpg", "cannot decode"]);
    node["ERROR_ON_UNREADABLE_IMAGE"] = json!(false);
    assert!(Dataset::from_config(&node, "TRAIN", &no_catalog(), &strict).unwrap().get(2).unwrap().warning.is_some());
    node["ERROR_ON_UNREADABLE_IMAGE"] = json!("yes");
    assert_contains(
        &error(node.clone(), &no_catalog()),
        &["DATA.TRAIN.ERROR_ON_UNREADABLE_IMAGE", "expected True or False"],
    );

    // Through the loader: the epoch yields the error, then ends.
    node["ERROR_ON_UNREADABLE_IMAGE"] = json!(true);
    node["TRANSFORMS"] = json!([{"name": "Resize", "size": [8, 8]}, {"name": "ToTensor"}]);
    node["BATCHSIZE_PER_REPLICA"] = json!(1);
    let options = LoaderOptions { shuffle: false, num_workers: Some(2), ..LoaderOptions::default() };
    let loader = Loader::from_config(&json!({"TRAIN": node}), "TRAIN", &no_catalog(), &options).unwrap();
    let results: Vec<_> = loader.epoch(0).collect();
    assert_eq!(results.len(), 2, "one good batch, then the error ends the epoch");
    assert!(results[0].is_ok());
    assert_contains(&results[1].as_ref().unwrap_err().to_string(), &["truncated.png"]);
}

#[cfg(unix)]
#[test]
fn symlinked_classes_and_files_are_followed() {
    let dir = scratch_dir("ds-symlinks");
    let (real, root) = (dir.join("real"), dir.join("root"));
    write_png(&real.join("1.png"), &synthetic(4, 4, 0));
    write_png(&root.join("a/2.png"), &synthetic(4, 4, 1));
    std::os::unix::fs::symlink(&real, root.join("b")).unwrap();
    std::os::unix::fs::symlink(real.join("1.png"), root.join("a/3.png")).unwrap();
    std::os::unix::fs::symlink(dir.join("missing.png"), root.join("a/4.png")).unwrap();
    let ds = build(&folder(&root), &no_catalog()).unwrap();
    assert_eq!(ds.classes(), ["a", "b"]);
    let files: Vec<String> =
        (0..ds.len()).map(|i| ds.path(i).unwrap().strip_prefix(&root).unwrap().display().to_string()).collect();
    assert_eq!(files, ["a/2.png", "a/3.png", "a/4.png", "b/1.png"]);
    assert!(ds.get(1).unwrap().valid, "a symlinked file is read");
    assert!(!ds.get(2).unwrap().valid, "a dangling link is an unreadable image");
}
