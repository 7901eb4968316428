//! `write_image_folder`: layout, counts, determinism, crash recovery, and a
//! nearest-class-mean baseline showing the task is learnable but not trivial.

mod common;

use std::path::Path;
use std::time::Instant;

use common::scratch_dir;
use tessera_data::synth::{COMPLETE_MARKER, FAMILIES, PARTIAL_MARKER};
use tessera_data::{decode_file, write_image_folder, Image, SynthOptions};

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Polarity-free features of the luma plane on an 8x8 grid of cells: the
/// mean distance to the image's median (where the shape is) and the mean
/// horizontal and vertical differences (edges and their orientation), each
/// group scaled to unit norm so that colour and contrast do not count.
fn features(img: &Image) -> Vec<f64> {
    let s = img.width();
    let cells = 8;
    let block = s / cells;
    let luma: Vec<f64> = img.to_luma().iter().map(|&v| v as f64).collect();
    let mut sorted = luma.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let cell = |x: usize, y: usize| (y / block).min(cells - 1) * cells + (x / block).min(cells - 1);
    let mut groups = vec![vec![0.0; cells * cells]; 3];
    for y in 0..s {
        for x in 0..s {
            let v = luma[y * s + x];
            groups[0][cell(x, y)] += (v - median).abs();
            if x + 1 < s {
                groups[1][cell(x, y)] += (v - luma[y * s + x + 1]).abs();
            }
            if y + 1 < s {
                groups[2][cell(x, y)] += (v - luma[(y + 1) * s + x]).abs();
            }
        }
    }
    let total: f64 = groups.iter().flatten().map(|v| v * v).sum::<f64>().sqrt().max(1e-9);
    groups.into_iter().flatten().map(|v| v / total).collect()
}

fn load_split(dir: &Path, classes: &[String]) -> Vec<(Vec<f64>, usize)> {
    let mut out = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        for p in files_under(&dir.join(class)) {
            out.push((features(&decode_file(&p).unwrap()), label));
        }
    }
    out
}

#[test]
fn nearest_class_mean_beats_chance_but_is_not_perfect() {
    let dir = scratch_dir("synth-ncm");
    let options = SynthOptions { train_per_class: 150, val_per_class: 60, ..SynthOptions::default() };
    let report = write_image_folder(&dir, &options).unwrap();
    let train = load_split(&report.train_dir, &report.classes);
    let val = load_split(&report.val_dir, &report.classes);
    let k = report.classes.len();
    let dim = train[0].0.len();
    let mut means = vec![vec![0.0; dim]; k];
    let mut counts = vec![0usize; k];
    for (f, l) in &train {
        counts[*l] += 1;
        for (m, v) in means[*l].iter_mut().zip(f) {
            *m += v;
        }
    }
    for (m, c) in means.iter_mut().zip(&counts) {
        m.iter_mut().for_each(|v| *v /= *c as f64);
    }
    let mut correct = 0;
    for (f, l) in &val {
        let dist = |m: &Vec<f64>| m.iter().zip(f).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
        let best = (0..k).min_by(|&a, &b| dist(&means[a]).total_cmp(&dist(&means[b]))).unwrap();
        correct += usize::from(best == *l);
    }
    let accuracy = correct as f64 / val.len() as f64;
    eprintln!("nearest class mean: {:.1}% on {} val images", 100.0 * accuracy, val.len());
    assert!(accuracy > 0.35, "accuracy {accuracy} is too close to chance (0.1): the task is not learnable");
    assert!(accuracy < 0.95, "accuracy {accuracy}: a class-mean classifier nearly solves it, too easy");
    let _ = std::fs::remove_dir_all(&dir);
}

fn small() -> SynthOptions {
    SynthOptions { train_per_class: 6, val_per_class: 3, ..SynthOptions::default() }
}

#[test]
fn layout_and_counts() {
    let dir = scratch_dir("synth-layout");
    let report = write_image_folder(&dir, &small()).unwrap();
    assert!(report.written);
    assert_eq!(report.classes, FAMILIES.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    for (split, per_class) in [("train", 6), ("val", 3)] {
        let mut classes: Vec<String> = std::fs::read_dir(dir.join(split))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        classes.sort();
        assert_eq!(classes.len(), 10, "{split}: {classes:?}");
        for class in &classes {
            let files = files_under(&dir.join(split).join(class));
            assert_eq!(files.len(), per_class, "{split}/{class}");
            for f in files {
                let img = decode_file(&f).unwrap();
                assert_eq!((img.width(), img.height()), (32, 32), "{}", f.display());
            }
        }
    }
    assert!(dir.join(COMPLETE_MARKER).is_file());
    assert!(!dir.join(PARTIAL_MARKER).exists());
    // Fewer classes and 64-pixel images.
    let dir64 = scratch_dir("synth-64");
    let opts = SynthOptions { image_size: 64, num_classes: 3, ..small() };
    let report = write_image_folder(&dir64, &opts).unwrap();
    assert_eq!(report.classes, ["checkerboard", "circle", "cross"]);
    assert_eq!(files_under(&dir64.join("train")).len(), 18);
    let img = decode_file(&files_under(&dir64.join("val"))[0]).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let (a, b, c) = (scratch_dir("synth-det-a"), scratch_dir("synth-det-b"), scratch_dir("synth-det-c"));
    write_image_folder(&a, &small()).unwrap();
    write_image_folder(&b, &small()).unwrap();
    write_image_folder(&c, &SynthOptions { seed: 1, ..small() }).unwrap();
    let (fa, fb, fc) = (files_under(&a), files_under(&b), files_under(&c));
    assert_eq!(fa.len(), fb.len());
    let mut differ = 0;
    for ((x, y), z) in fa.iter().zip(&fb).zip(&fc) {
        assert_eq!(x.strip_prefix(&a).unwrap(), y.strip_prefix(&b).unwrap());
        assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap(), "{}", x.display());
        if x.extension().is_some_and(|e| e == "png") && std::fs::read(x).unwrap() != std::fs::read(z).unwrap() {
            differ += 1;
        }
    }
    assert_eq!(differ, 90, "every image changes with the seed");
}

#[test]
fn complete_tree_is_kept_and_interrupted_one_is_redone() {
    let dir = scratch_dir("synth-redo");
    assert!(write_image_folder(&dir, &small()).unwrap().written);
    let before = files_under(&dir);
    // Complete with the same options: nothing to do.
    assert!(!write_image_folder(&dir, &small()).unwrap().written);
    // An interrupted run: partial marker present, a class half written.
    std::fs::write(dir.join(PARTIAL_MARKER), "{}").unwrap();
    std::fs::remove_file(dir.join(COMPLETE_MARKER)).unwrap();
    let victim = dir.join("train/circle/circle_00003.png");
    std::fs::write(&victim, b"\x89PNG\r\n\x1a\ntruncated").unwrap();
    assert!(write_image_folder(&dir, &small()).unwrap().written);
    assert_eq!(files_under(&dir), before);
    assert!(decode_file(&victim).is_ok());
    // Other options: refused unless asked to replace the tree.
    let err = write_image_folder(&dir, &SynthOptions { num_classes: 2, ..small() }).unwrap_err().to_string();
    assert!(
        err.contains("other parameters (seed 0, 32 px, 10 classes, 6 + 3 per class)") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(files_under(&dir), before, "nothing was touched");
    let report = write_image_folder(&dir, &SynthOptions { num_classes: 2, replace: true, ..small() }).unwrap();
    assert!(report.written);
    assert_eq!(std::fs::read_dir(dir.join("train")).unwrap().count(), 2);
}

#[test]
fn foreign_directories_are_never_touched() {
    let dir = scratch_dir("synth-foreign");
    std::fs::create_dir_all(dir.join("train/n01440764")).unwrap();
    std::fs::write(dir.join("train/n01440764/x.JPEG"), b"data").unwrap();
    let err = write_image_folder(&dir, &small()).unwrap_err().to_string();
    assert!(err.contains("not written by `tessera data synth`") && err.contains("train"), "{err}");
    assert!(dir.join("train/n01440764/x.JPEG").exists());
    let err = write_image_folder(&dir, &SynthOptions { num_classes: 11, ..small() }).unwrap_err().to_string();
    assert!(err.contains("num_classes 11"), "{err}");
}

#[test]
fn defaults_take_well_under_a_minute() {
    let dir = scratch_dir("synth-defaults");
    let start = Instant::now();
    let report = write_image_folder(&dir, &SynthOptions::default()).unwrap();
    let took = start.elapsed().as_secs_f64();
    eprintln!("defaults: {} + {} images in {took:.1} s", report.train_images, report.val_images);
    assert_eq!((report.train_images, report.val_images), (5000, 1000));
    assert_eq!(files_under(&dir.join("train")).len(), 5000);
    assert!(took < 30.0, "{took} s");
    let _ = std::fs::remove_dir_all(&dir);
}
