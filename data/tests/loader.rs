//! `Loader`: batches identical for any worker count, epochs differ, prompt
//! shutdown without leaked threads, checks before training, and every
//! quickstart DATA section loads.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::{assert_contains, scratch_dir};
use serde_json::{json, Value};
use tessera_data::{write_image_folder, Batch, Labels, Loader, LoaderOptions, SynthOptions};

/// Tests that count threads run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small synthetic ImageFolder shared by the tests of this file.
fn tree() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch_dir("loader-tree");
        let options = SynthOptions { train_per_class: 5, val_per_class: 2, num_classes: 4, ..SynthOptions::default() };
        write_image_folder(&dir, &options).unwrap();
        dir
    })
}

fn no_catalog() -> PathBuf {
    PathBuf::from("/nonexistent/dataset_catalog.json")
}

/// DATA with a MoCo-style TRAIN split over the tree, MixUp/CutMix on top.
fn data(workers: usize, extra: Value) -> Value {
    let mut train = json!({
        "DATA_SOURCES": ["disk_folder"], "LABEL_SOURCES": ["disk_folder"], "DATASET_NAMES": ["synth"],
        "DATA_PATHS": [tree().join("train")],
        "BATCHSIZE_PER_REPLICA": 4, "DROP_LAST": false,
        "TRANSFORMS": [
            {"name": "ImgReplicatePil", "num_times": 2},
            {"name": "RandomResizedCrop", "size": 24},
            {"name": "RandomHorizontalFlip"},
            {"name": "ImgPilColorDistortion", "strength": 1.0},
            {"name": "ToTensor"},
            {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
        ],
        "COLLATE_FUNCTION": "cutmixup_collator",
        "COLLATE_FUNCTION_PARAMS": {"mixup_alpha": 1.0, "cutmix_alpha": 1.0, "num_classes": 4}
    });
    for (k, v) in extra.as_object().unwrap() {
        train[k] = v.clone();
    }
    json!({"NUM_DATALOADER_WORKERS": workers, "TRAIN": train})
}

fn loader(data: &Value, options: &LoaderOptions) -> Loader {
    Loader::from_config(data, "TRAIN", &no_catalog(), options).unwrap_or_else(|e| panic!("{e}"))
}

fn epoch(loader: &Loader, e: u64) -> Vec<Batch> {
    loader.epoch(e).map(|b| b.unwrap()).collect()
}

#[test]
fn batches_are_identical_for_any_worker_count() {
    let _guard = serial();
    let options = LoaderOptions { seed: 11, ..LoaderOptions::default() };
    let reference = loader(&data(0, json!({})), &options);
    assert_eq!(reference.num_workers(), 0);
    assert_eq!(reference.num_batches(), 5, "20 images in batches of 4");
    let (e0, e1) = (epoch(&reference, 0), epoch(&reference, 1));
    assert_eq!(e0.len(), 5);
    let b = &e0[0];
    assert_eq!((b.views.len(), b.views[0].shape), (2, [4, 3, 24, 24]));
    assert_eq!(b.labels.shape(), [8, 4], "soft targets, position-major");
    assert!(matches!(&b.labels, Labels::Soft { .. }));
    for workers in [1, 3] {
        let l = loader(&data(workers, json!({})), &options);
        assert_eq!(l.num_workers(), workers);
        assert_eq!(epoch(&l, 0), e0, "{workers} workers, epoch 0");
        assert_eq!(epoch(&l, 1), e1, "{workers} workers, epoch 1");
    }
    // NUM_DATALOADER_WORKERS can be overridden by the options.
    let l = loader(&data(0, json!({})), &LoaderOptions { num_workers: Some(2), ..options.clone() });
    assert_eq!((l.num_workers(), epoch(&l, 0) == e0), (2, true));
    // The epoch and the seed change the batches; every sample appears once per epoch.
    assert_ne!(e0, e1);
    assert_ne!(epoch(&loader(&data(0, json!({})), &LoaderOptions { seed: 12, ..options.clone() }), 0), e0);
    let mut seen: Vec<i64> = e0.iter().flat_map(|b| b.data_idx[..b.data_idx.len() / 2].to_vec()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<i64>>());
}

/// A resumed epoch starts at its batch: the same batches as a whole epoch's
/// tail, for any worker count, without loading the ones before.
#[test]
fn an_epoch_started_mid_way_gives_the_whole_epochs_tail() {
    let _guard = serial();
    let options = LoaderOptions { seed: 5, ..LoaderOptions::default() };
    let whole = epoch(&loader(&data(0, json!({})), &options), 1);
    for workers in [0, 1, 3] {
        let l = loader(&data(workers, json!({})), &options);
        for start in [0, 2, 4, 5, 9] {
            let tail: Vec<Batch> = l.epoch_from(1, start).map(|b| b.unwrap()).collect();
            let want: Vec<Batch> = whole.iter().skip(start).cloned().collect();
            assert_eq!(tail, want, "workers {workers}, start {start}");
        }
    }
}

#[test]
fn world_size_splits_the_epoch_between_ranks() {
    let _guard = serial();
    let d = data(0, json!({"COLLATE_FUNCTION": "default_collate", "COLLATE_FUNCTION_PARAMS": {}, "DROP_LAST": true}));
    let mut all = Vec::new();
    for rank in 0..3 {
        let l = loader(&d, &LoaderOptions { world_size: 3, rank, ..LoaderOptions::default() });
        // ceil(20 / 3) = 7 per rank, batches of 4 with DROP_LAST: 1.
        assert_eq!(l.num_batches(), 1);
        let batches = epoch(&l, 0);
        assert_eq!(batches.len(), 1);
        all.extend(batches[0].data_idx[..4].to_vec());
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 12, "ranks take disjoint positions of one permutation");
}

fn data_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with("tessera-data-"))
                .count()
        })
        .unwrap_or(0)
}

/// The loader's threads still listed after up to 2 s: a joined thread can
/// linger in /proc for a moment while the kernel reaps it.
fn settled_data_threads() -> usize {
    let start = Instant::now();
    loop {
        let n = data_threads();
        if n == 0 || start.elapsed() > Duration::from_secs(2) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn dropping_an_epoch_mid_way_returns_promptly_and_joins_workers() {
    let _guard = serial();
    // Larger images so that a batch takes a while: 64 samples of 64x64 -> 224x224 crops.
    let d = data(
        3,
        json!({
            "COLLATE_FUNCTION": "moco_collator", "COLLATE_FUNCTION_PARAMS": {}, "BATCHSIZE_PER_REPLICA": 2,
            "LABEL_SOURCES": [], "LABEL_TYPE": "sample_index",
            "TRANSFORMS": [
                {"name": "ImgReplicatePil", "num_times": 2},
                {"name": "RandomResizedCrop", "size": 224},
                {"name": "ImgPilGaussianBlur", "p": 1.0, "radius_min": 2.0, "radius_max": 3.0},
                {"name": "ToTensor"}
            ]
        }),
    );
    let l = loader(&d, &LoaderOptions::default());
    assert!(l.num_batches() >= 10);
    let linux = cfg!(target_os = "linux");
    assert_eq!(settled_data_threads(), 0, "threads of earlier tests");
    let mut e = l.epoch(0);
    let first = e.next().unwrap().unwrap();
    assert_eq!(first.views[0].shape, [2, 3, 224, 224]);
    assert_eq!(first.labels.shape(), [2, 2], "moco: [B, 2] labels");
    assert!(!linux || data_threads() == 3, "three workers are running");
    let start = Instant::now();
    drop(e);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "drop took {took:?}");
    assert_eq!(settled_data_threads(), 0, "worker threads left behind");
    // An epoch never iterated is dropped just as cleanly.
    drop(l.epoch(1));
    assert_eq!(settled_data_threads(), 0);
}

#[test]
fn collation_problems_are_caught_before_training() {
    let _guard = serial();
    let error =
        |extra: Value| match Loader::from_config(&data(0, extra), "TRAIN", &no_catalog(), &LoaderOptions::default()) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
    // 20 samples in batches of 6: a last batch of 2 is fine, of 20 % 8 = 4 too; 20 % 6 = 2; use 3 ranks.
    assert_contains(&error(json!({"BATCHSIZE_PER_REPLICA": 5})), &["DATA.TRAIN.BATCHSIZE_PER_REPLICA", "5 is odd"]);
    let odd_tail = Loader::from_config(
        &data(0, json!({"BATCHSIZE_PER_REPLICA": 6})),
        "TRAIN",
        &no_catalog(),
        &LoaderOptions { world_size: 3, ..LoaderOptions::default() },
    )
    .err()
    .expect("7 per rank leaves a batch of 1")
    .to_string();
    assert_contains(&odd_tail, &["DATA.TRAIN.DROP_LAST", "last batch of 1", "set DROP_LAST: True"]);
    assert!(Loader::from_config(
        &data(0, json!({"BATCHSIZE_PER_REPLICA": 6, "DROP_LAST": true})),
        "TRAIN",
        &no_catalog(),
        &LoaderOptions { world_size: 3, ..LoaderOptions::default() },
    )
    .is_ok());
    assert_contains(
        &error(json!({"LABEL_SOURCES": [], "LABEL_TYPE": "sample_index"})),
        &["DATA.TRAIN.COLLATE_FUNCTION_PARAMS.num_classes", "labels up to 19", "LABEL_TYPE: zero"],
    );
    assert!(Loader::from_config(
        &data(0, json!({"LABEL_SOURCES": [], "LABEL_TYPE": "zero"})),
        "TRAIN",
        &no_catalog(),
        &LoaderOptions::default()
    )
    .is_ok());
    assert_contains(
        &error(
            json!({"COLLATE_FUNCTION": "moco_collator", "COLLATE_FUNCTION_PARAMS": {}, "TRANSFORMS": [{"name": "ToTensor"}]}),
        ),
        &["DATA.TRAIN.TRANSFORMS", "2 copies", "make 1"],
    );
    assert_contains(
        &error(json!({"TRANSFORMS": [{"name": "Flip"}]})),
        &["DATA.TRAIN.TRANSFORMS", "TRANSFORMS[0]", "unknown transform"],
    );
    assert_contains(&error(json!({"BATCHSIZE_PER_REPLICA": 0})), &["DATA.TRAIN.BATCHSIZE_PER_REPLICA", "positive"]);
    let m = Loader::from_config(
        &json!({"NUM_DATALOADER_WORKERS": -1, "TRAIN": data(0, json!({}))["TRAIN"]}),
        "TRAIN",
        &no_catalog(),
        &LoaderOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert_contains(&m, &["DATA.NUM_DATALOADER_WORKERS"]);
    let m =
        Loader::from_config(&json!({}), "TEST", &no_catalog(), &LoaderOptions::default()).err().unwrap().to_string();
    assert_contains(&m, &["DATA.TEST", "missing"]);
}

/// The DATA sections of the quickstart configs, read from the YAML files.
fn quickstart_data() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/quickstart");
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let v: Value = serde_saphyr::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        if let Some(d) = v.pointer("/config/DATA") {
            out.push((f.file_name().unwrap().to_string_lossy().into_owned(), d.clone()));
        }
    }
    out
}

#[test]
fn quickstart_configs_load() {
    let _guard = serial();
    let configs = quickstart_data();
    assert!(configs.len() >= 5, "{configs:?}");
    let catalog = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/dataset_catalog.json");
    for (name, data) in configs {
        for (split, sub) in [("TRAIN", "train"), ("TEST", "val")] {
            let Some(node) = data.get(split) else { continue };
            // Image-folder configs read the generated quickstart folder
            // (`tessera data synth`); here the small test tree stands in.
            let mut data = data.clone();
            if node["DATA_SOURCES"] == json!(["disk_folder"]) {
                data[split]["DATA_PATHS"] = json!([tree().join(sub)]);
                data[split]["BATCHSIZE_PER_REPLICA"] = json!(4);
            }
            let l = Loader::from_config(&data, split, &catalog, &LoaderOptions::default())
                .unwrap_or_else(|e| panic!("{name} {split}: {e}"));
            let b = l.epoch(0).next().unwrap().unwrap_or_else(|e| panic!("{name} {split}: {e}"));
            let rows = b.views[0].shape[0];
            assert_eq!(rows, l.batch_size(), "{name} {split}");
            assert!(b.views.iter().all(|v| v.shape[1] == 3 && v.data.iter().all(|x| x.is_finite())), "{name}");
            eprintln!(
                "{name} {split}: {} views of {:?}, labels {:?}",
                b.views.len(),
                b.views[0].shape,
                b.labels.shape()
            );
        }
    }
}

#[test]
fn pretrain_configs_load_with_their_collators() {
    let _guard = serial();
    let files = common::config_files(&["pretrain"]);
    assert!(files.len() >= 13);
    let mut collators = std::collections::BTreeSet::new();
    for f in files {
        let v: Value = serde_saphyr::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let Some(data) = v.pointer("/config/DATA") else { continue };
        for (split, sub) in [("TRAIN", "train"), ("TEST", "val")] {
            let Some(node) = data.get(split) else { continue };
            // The configs' data on ImageNet, here on the small tree with batches of 4.
            let mut node = node.clone();
            node["DATA_PATHS"] = json!([tree().join(sub)]);
            node["BATCHSIZE_PER_REPLICA"] = json!(4);
            let d = json!({"NUM_DATALOADER_WORKERS": 0, split: node});
            let what = format!("{} {split}", f.display());
            let l = Loader::from_config(&d, split, &no_catalog(), &LoaderOptions::default())
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            collators.insert(l.collator().name());
            let b = l.epoch(0).next().unwrap().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(b.views[0].shape[0], 4, "{what}");
            assert!(
                b.views.iter().chain(&b.momentum).all(|v| v.shape[2] == 224 && v.data.iter().all(|x| x.is_finite())),
                "{what}"
            );
        }
    }
    assert_eq!(
        collators.into_iter().collect::<Vec<_>>(),
        ["cutmixup_collator", "default_collate", "moco_collator", "simclr_collator"]
    );
}

#[test]
fn the_gray_stand_in_of_another_size_is_named_with_its_file_and_key() {
    // The images are 32x32 and no transform resizes them; the stand-in for
    // an unreadable one is DEFAULT_GRAY_IMG_SIZE (224) unless set.
    let dir = scratch_dir("gray-stand-in");
    std::fs::create_dir_all(dir.join("a")).unwrap();
    let first = |d: &Path| d.read_dir().unwrap().flatten().map(|e| e.path()).min().unwrap();
    let image = first(&first(&tree().join("train")));
    for i in 0..3 {
        std::fs::copy(&image, dir.join(format!("a/{i}.png"))).unwrap();
    }
    let broken = dir.join("a/1.png");
    std::fs::write(&broken, b"not an image").unwrap();
    let split = |gray: Option<u64>| {
        let mut train = json!({
            "DATA_SOURCES": ["disk_folder"], "LABEL_SOURCES": ["disk_folder"], "DATASET_NAMES": ["synth"],
            "DATA_PATHS": [dir], "BATCHSIZE_PER_REPLICA": 3,
            "TRANSFORMS": [{"name": "ToTensor"}]
        });
        if let Some(g) = gray {
            train["DEFAULT_GRAY_IMG_SIZE"] = json!(g);
        }
        json!({"NUM_DATALOADER_WORKERS": 0, "TRAIN": train})
    };
    let options = LoaderOptions { shuffle: false, ..LoaderOptions::default() };
    let l = loader(&split(None), &options);
    let e = l.epoch(0).next().unwrap().unwrap_err().to_string();
    assert_contains(
        &e,
        &[
            "batch 0: copy position 0: cannot stack copies of different sizes",
            &format!("({}) is [3, 32, 32]", dir.join("a/0.png").display()),
            &format!("({}, unreadable: the gray stand-in) is [3, 224, 224]", broken.display()),
            "set DATA.TRAIN.DEFAULT_GRAY_IMG_SIZE: 32",
            "DATA.TRAIN.TRANSFORMS",
        ],
    );
    // The fix the message names works: the stand-in joins the batch, marked invalid.
    let batch = loader(&split(Some(32)), &options).epoch(0).next().unwrap().unwrap();
    assert_eq!(batch.views[0].shape, [3, 3, 32, 32]);
    assert_eq!(batch.data_valid, [1, -1, 1]);
}
