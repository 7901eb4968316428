//! Shared helpers of the integration tests: synthetic images and the Pillow
//! oracle (`pillow_ref.py`, run with the interpreter of
//! `scripts/setup-pillow.sh`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{json, Value};
use tessera_data::{Image, SampleKey, SampleRng};

/// A deterministic test image with smooth gradients, hard edges, a disc and
/// noise, so that resampling, blurs and colour ops all see structure.
pub fn synthetic(width: usize, height: usize, seed: u64) -> Image {
    let mut rng = SampleRng::new(SampleKey::new(seed, 0, 0), 0);
    let mut data = Vec::with_capacity(width * height * 3);
    let (cx, cy, r) = (width as f64 * 0.6, height as f64 * 0.4, width.min(height) as f64 * 0.3);
    for y in 0..height {
        for x in 0..width {
            let fx = x as f64 / width.max(1) as f64;
            let fy = y as f64 / height.max(1) as f64;
            let checker = ((x / 7 + y / 5) % 2) as f64 * 60.0;
            let inside = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt() < r;
            let base = [
                40.0 + 180.0 * fx + checker,
                220.0 - 150.0 * fy + if inside { 35.0 } else { 0.0 },
                90.0 + 80.0 * (fx * 9.0 + fy * 4.0).sin() + checker * 0.5,
            ];
            for b in base {
                let noise = rng.uniform_range(-25.0, 25.0);
                data.push((b + noise).round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    // A few saturated pixels so that clipping paths run.
    if width * height > 4 {
        data[0..3].copy_from_slice(&[255, 0, 255]);
        let n = data.len();
        data[n - 3..].copy_from_slice(&[0, 255, 0]);
    }
    Image::from_rgb(width, height, data).expect("size")
}

/// A scratch directory for one test, removed and recreated.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-data-tests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The Python with Pillow 13.0.0: `TESSERA_PILLOW_PYTHON`, else what
/// `scripts/setup-pillow.sh` installs (run once per test binary). Panics, so
/// the test fails, when neither works: these tests never skip.
pub fn pillow_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        if let Some(p) = std::env::var_os("TESSERA_PILLOW_PYTHON") {
            return PathBuf::from(p);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup-pillow.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed, so the Pillow parity tests cannot run:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("export TESSERA_PILLOW_PYTHON="))
            .unwrap_or_else(|| panic!("setup-pillow.sh printed no export line: {stdout}"));
        PathBuf::from(line.trim().trim_matches('\''))
    })
}

/// One reference computation for `pillow_ref.py`.
pub struct Case {
    pub input: Option<Image>,
    pub op: &'static str,
    pub args: Value,
    /// For "encode"/"decode": the image file to write or read.
    pub file: Option<PathBuf>,
}

impl Case {
    pub fn new(input: &Image, op: &'static str, args: Value) -> Case {
        Case { input: Some(input.clone()), op, args, file: None }
    }
}

/// Runs all cases in one Python process and returns Pillow's outputs.
pub fn pillow(dir: &Path, cases: &[Case]) -> Vec<Image> {
    let mut specs = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let input = dir.join(format!("in{i}.rgb"));
        let output = dir.join(format!("out{i}.rgb"));
        let (w, h) = match &case.input {
            Some(img) => {
                std::fs::write(&input, img.as_rgb()).expect("write input");
                (img.width(), img.height())
            }
            None => (0, 0),
        };
        specs.push(json!({
            "input": input, "width": w, "height": h, "op": case.op, "args": case.args,
            "output": output, "file": case.file,
        }));
    }
    let job = dir.join("job.json");
    std::fs::write(&job, serde_json::to_vec(&json!({ "cases": specs })).unwrap()).expect("write job");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pillow_ref.py");
    let out = Command::new(pillow_python())
        .arg(&script)
        .arg(&job)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", pillow_python().display()));
    assert!(out.status.success(), "pillow_ref.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let sizes: Vec<[usize; 2]> =
        serde_json::from_slice(&std::fs::read(dir.join("job.json.out.json")).expect("sizes")).expect("sizes json");
    sizes
        .iter()
        .enumerate()
        .map(|(i, &[w, h])| {
            let data = std::fs::read(dir.join(format!("out{i}.rgb"))).expect("read output");
            Image::from_rgb(w, h, data).expect("output size")
        })
        .collect()
}

/// Largest per-value absolute difference; panics on a size mismatch.
pub fn max_abs_diff(ours: &Image, theirs: &Image, what: &str) -> u8 {
    assert_eq!((ours.width(), ours.height()), (theirs.width(), theirs.height()), "{what}: size differs from Pillow");
    ours.as_rgb().iter().zip(theirs.as_rgb()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0)
}

/// Mean absolute difference.
pub fn mean_abs_diff(ours: &Image, theirs: &Image) -> f64 {
    let n = ours.as_rgb().len().max(1);
    ours.as_rgb().iter().zip(theirs.as_rgb()).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / n as f64
}

/// Writes `img` as an 8-bit RGB PNG, creating parent directories.
pub fn write_png(path: &Path, img: &Image) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create parent");
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, img.width() as u32, img.height() as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().expect("png header");
        writer.write_image_data(img.as_rgb()).expect("png data");
    }
    std::fs::write(path, out).expect("write png");
}

/// Writes `bytes` to `path`, creating parent directories.
pub fn write_bytes(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create parent");
    }
    std::fs::write(path, bytes).expect("write file");
}

/// Asserts that `message` contains every part.
pub fn assert_contains(message: &str, parts: &[&str]) {
    for p in parts {
        assert!(message.contains(p), "message {message:?} lacks {p:?}");
    }
}

/// Every `.yaml` file under `configs/<sub>` for each of `subs`, sorted.
pub fn config_files(subs: &[&str]) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut files = Vec::new();
    let mut dirs: Vec<PathBuf> = subs.iter().map(|s| root.join(s)).collect();
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}
