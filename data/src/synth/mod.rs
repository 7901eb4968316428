//! `write_image_folder`: a small procedurally generated ImageFolder
//! (`train/<class>/*.png`, `val/<class>/*.png`) for end-to-end runs without
//! downloads; the backend of `tessera data synth --out DIR`.
//!
//! Deterministic: image i of class c of split s is drawn from `SampleRng`
//! keyed by (seed, s, c·2³² + i), so the same options give the same bytes.
//! Crash-safe: a marker `.tessera-synth-partial` is written before anything
//! else and removed only after the completion marker `tessera-synth.json`
//! (the options) is in place. A run finding a matching completion marker does
//! nothing; one finding a partial marker (an interrupted run) or other
//! options starts over. A directory holding anything else is never touched.

mod shapes;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub use shapes::FAMILIES;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::rng::{SampleKey, SampleRng};

/// Written last: the options of a complete tree.
pub const COMPLETE_MARKER: &str = "tessera-synth.json";
/// Written first, removed last: a tree being written (or interrupted).
pub const PARTIAL_MARKER: &str = ".tessera-synth-partial";

/// The completion marker before its atomic rename.
const TMP_MARKER: &str = "tessera-synth.json.tmp";

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthOptions {
    pub seed: u64,
    /// Side of the square images, 16..=256 (32 or 64 are typical).
    pub image_size: usize,
    /// The first `num_classes` of `FAMILIES` (1..=10).
    pub num_classes: usize,
    pub train_per_class: usize,
    pub val_per_class: usize,
    /// Largest per-image Gaussian noise std (levels); each image draws its
    /// own std in [0.2, 1] times this.
    pub max_noise_std: f64,
    /// Replace a complete tree generated with other options (without it,
    /// such a tree is an error: someone's data set is not silently redone).
    pub replace: bool,
}

impl Default for SynthOptions {
    fn default() -> SynthOptions {
        SynthOptions {
            seed: 0,
            image_size: 32,
            num_classes: 10,
            train_per_class: 500,
            val_per_class: 100,
            max_noise_std: 24.0,
            replace: false,
        }
    }
}

/// What `write_image_folder` did.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthReport {
    /// False when a complete tree with the same options was already there.
    pub written: bool,
    pub train_dir: PathBuf,
    pub val_dir: PathBuf,
    pub classes: Vec<String>,
    pub train_images: usize,
    pub val_images: usize,
}

impl SynthOptions {
    fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::key("synth", what));
        if !(16..=256).contains(&self.image_size) {
            return bad(format!("image_size {} is outside 16..=256", self.image_size));
        }
        if !(1..=FAMILIES.len()).contains(&self.num_classes) {
            return bad(format!("num_classes {} is outside 1..={}", self.num_classes, FAMILIES.len()));
        }
        if self.train_per_class == 0 || self.val_per_class == 0 {
            return bad("train_per_class and val_per_class must be positive".into());
        }
        if !(self.max_noise_std.is_finite() && self.max_noise_std >= 0.0) {
            return bad(format!("max_noise_std {} must be finite and >= 0", self.max_noise_std));
        }
        Ok(())
    }

    fn to_json(&self) -> Value {
        json!({
            "format": 1,
            "seed": self.seed,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "train_per_class": self.train_per_class,
            "val_per_class": self.val_per_class,
            "max_noise_std": self.max_noise_std,
        })
    }
}

/// Image `index` of `class` in split `split` (0 train, 1 val).
pub fn synth_image(options: &SynthOptions, split: u64, class: usize, index: usize) -> Image {
    let mut rng = SampleRng::new(SampleKey::new(options.seed, split, ((class as u64) << 32) | index as u64), 0);
    shapes::render(class, options.image_size, options.max_noise_std, &mut rng)
}

fn encode_png(img: &Image) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, img.width() as u32, img.height() as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(img.as_rgb())?;
    writer.finish()?;
    Ok(out)
}

fn remove_if_present(path: &Path) -> Result<()> {
    let result = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// Writes the tree under `out_dir` (created if needed), or finds it complete.
pub fn write_image_folder(out_dir: &Path, options: &SynthOptions) -> Result<SynthReport> {
    options.check()?;
    let expected = options.to_json();
    let classes: Vec<String> = FAMILIES[..options.num_classes].iter().map(|s| s.to_string()).collect();
    let report = |written| SynthReport {
        written,
        train_dir: out_dir.join("train"),
        val_dir: out_dir.join("val"),
        classes: classes.clone(),
        train_images: options.train_per_class * options.num_classes,
        val_images: options.val_per_class * options.num_classes,
    };
    let complete = out_dir.join(COMPLETE_MARKER);
    let partial = out_dir.join(PARTIAL_MARKER);
    let found: Option<Value> = std::fs::read(&complete).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if found.as_ref() == Some(&expected) {
        remove_if_present(&partial)?; // interrupted right after completing
        return Ok(report(false));
    }
    if let (Some(other), false) = (&found, options.replace) {
        let field = |k: &str| other.get(k).map(|v| v.to_string()).unwrap_or_else(|| "?".into());
        return Err(Error::io(
            out_dir,
            format!(
                "holds a complete folder generated with other parameters (seed {}, {} px, {} classes, {} + {} per class); replace it with --force, or choose another --out",
                field("seed"),
                field("image_size"),
                field("num_classes"),
                field("train_per_class"),
                field("val_per_class")
            ),
        ));
    }
    // Only a tree this function wrote (either marker present) or an empty
    // directory may be replaced.
    if out_dir.exists() {
        let entries = std::fs::read_dir(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let names: Vec<String> =
            entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        let ours = found.is_some() || partial.exists();
        let allowed = ["train", "val", COMPLETE_MARKER, PARTIAL_MARKER, TMP_MARKER];
        if let Some(other) = names.iter().find(|n| !ours || !allowed.contains(&n.as_str())) {
            return Err(Error::io(
                out_dir,
                format!("not empty (holds `{other}`) and not written by `tessera data synth`; choose an empty or new directory"),
            ));
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    std::fs::write(&partial, expected.to_string()).map_err(|e| Error::io(&partial, e))?;
    for name in ["train", "val", COMPLETE_MARKER, TMP_MARKER] {
        remove_if_present(&out_dir.join(name))?;
    }
    for (split, (name, per_class)) in
        [("train", options.train_per_class), ("val", options.val_per_class)].iter().enumerate()
    {
        for (class, class_name) in classes.iter().enumerate() {
            let dir = out_dir.join(name).join(class_name);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            for i in 0..*per_class {
                let img = synth_image(options, split as u64, class, i);
                let path = dir.join(format!("{class_name}_{i:05}.png"));
                let bytes = encode_png(&img).map_err(|e| Error::io(&path, e))?;
                std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
            }
        }
    }
    let tmp = out_dir.join(TMP_MARKER);
    std::fs::write(&tmp, serde_json::to_string_pretty(&expected).unwrap_or_default())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &complete).map_err(|e| Error::io(&complete, e))?;
    remove_if_present(&partial)?;
    Ok(report(true))
}
