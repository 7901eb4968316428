//! Model weights in safetensors files, in tessera's own parameter names
//! (VISSL's state-dict names: `trunk.blocks.3.attn.qkv.weight`,
//! `heads.0.clf.0.weight`) or in timm's (`blocks.3.attn.qkv.weight`,
//! `head.weight`).
//!
//! Loading is three steps: [`read_safetensors`] gives the file's tensors as
//! f32, [`detect_format`] tells which names they use, and [`match_weights`]
//! fits them to the model's expected `(name, shape)` list, converting timm
//! names and layouts, and reports every problem at once. [`load_weights`]
//! does all three. Saving is [`export`] (to timm names when asked) then
//! [`write_safetensors`].

mod file;
pub mod timm;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use file::{
    load_safetensors, parse_safetensors, read_safetensors, write_safetensors, write_safetensors_as, DiskDtype,
    WeightsFile,
};
pub use timm::{tessera_to_timm, timm_to_tessera, TimmNaming};

use tessera_plan::plan::{Plan, Source};
use timm::{is_derived_buffer, pos_proj_sibling_weight, strip_module};

/// A named f32 tensor, row-major, in the shape PyTorch gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        NamedTensor { name: name.into(), shape, data }
    }

    /// The number of elements the shape calls for.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Which parameter names a weights file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightsFormat {
    /// tessera's names, which are VISSL's: `trunk.…`, `heads.{i}.…`.
    Tessera,
    /// timm's `vit_*` / `convit_*` names: `cls_token`, `blocks.{i}.…`, `head.…`.
    Timm,
}

impl fmt::Display for WeightsFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightsFormat::Tessera => "tessera",
            WeightsFormat::Timm => "timm",
        })
    }
}

impl FromStr for WeightsFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tessera" | "vissl" => Ok(WeightsFormat::Tessera),
            "timm" => Ok(WeightsFormat::Timm),
            _ => Err(format!("unknown weights format `{s}`: expected `tessera` (VISSL names) or `timm`")),
        }
    }
}

/// What can go wrong reading, writing or matching weights. Every message
/// names the file (where there is one) and says what is wrong in words.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot {action} weights file {}: {error}", path.display())]
    Io { path: PathBuf, action: &'static str, error: io::Error },
    #[error("{} is not a valid safetensors file: {problem}", path.display())]
    Corrupt { path: PathBuf, problem: String },
    #[error(
        "{}: tensor `{name}` is stored as {dtype}, which tessera cannot read (it reads F32, F16, BF16, F64, \
         integer and bool tensors)",
        path.display()
    )]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },
    #[error("cannot write weights file {}: {problem}", path.display())]
    InvalidWrite { path: PathBuf, problem: String },
    #[error("{0}")]
    Mismatch(Box<MismatchReport>),
}

impl WeightsError {
    /// Names the file a [`WeightsError::Mismatch`] came from (other errors already name theirs).
    pub fn with_file(mut self, path: &Path) -> Self {
        if let WeightsError::Mismatch(report) = &mut self {
            report.file = Some(path.to_path_buf());
        }
        self
    }
}

/// A file tensor whose shape does not fit the model's parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrongShape {
    /// The model's (tessera) name.
    pub name: String,
    /// The name in the file, when it differs.
    pub file_name: String,
    pub expected: Vec<usize>,
    /// The file's shape, after timm layout conversion.
    pub found: Vec<usize>,
}

/// Why a file tensor was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnusedReason {
    /// The name has no counterpart in tessera's models (timm `reg_token`, `ls1.gamma` ...).
    NoEquivalent,
    /// timm's classifier `head`, for a model whose heads are not one Linear layer.
    NoHead,
    /// A distilled DeiT's `head_dist`, for a model without a distillation head.
    NoDistillationHead,
    /// It would be this tessera parameter, which the model does not have.
    NotInModel(String),
    /// Another file tensor already provided this parameter.
    Duplicate(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnusedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub reason: UnusedReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingTensor {
    /// The model's (tessera) name.
    pub name: String,
    pub shape: Vec<usize>,
    /// The name the file would have used (the timm name for timm files).
    pub file_name: Option<String>,
}

/// Everything that kept a file's tensors from fitting a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MismatchReport {
    pub file: Option<PathBuf>,
    pub format: WeightsFormat,
    /// How many model tensors were found with the right shape.
    pub matched: usize,
    pub wrong_shape: Vec<WrongShape>,
    pub missing: Vec<MissingTensor>,
    pub unused: Vec<UnusedTensor>,
}

/// At most this many lines are printed per section of a report.
const REPORT_LINES: usize = 30;

fn shape_str(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn is_position_embedding(name: &str) -> bool {
    name.ends_with("pos_embed") || name.ends_with("pos_embedding")
}

impl fmt::Display for MismatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.wrong_shape.is_empty() {
            parts.push(count(self.wrong_shape.len(), "tensor with the wrong shape", "tensors with the wrong shape"));
        }
        if !self.missing.is_empty() {
            parts.push(format!("{} missing", count(self.missing.len(), "model tensor", "model tensors")));
        }
        if !self.unused.is_empty() {
            parts.push(format!("{} unused", count(self.unused.len(), "file tensor", "file tensors")));
        }
        match &self.file {
            Some(path) => write!(f, "the weights in {} ({} names)", path.display(), self.format)?,
            None => write!(f, "the weights ({} names)", self.format)?,
        }
        write!(f, " do not fit the model: {}", parts.join(", "))?;
        write!(f, " ({} matched)", count(self.matched, "tensor", "tensors"))?;

        let more = |f: &mut fmt::Formatter<'_>, total: usize| {
            if total > REPORT_LINES {
                write!(f, "\n    ... and {} more", total - REPORT_LINES)
            } else {
                Ok(())
            }
        };
        if !self.wrong_shape.is_empty() {
            write!(f, "\n  wrong shape:")?;
            for w in self.wrong_shape.iter().take(REPORT_LINES) {
                write!(
                    f,
                    "\n    {}: the model expects {}, the file has {}",
                    w.name,
                    shape_str(&w.expected),
                    shape_str(&w.found)
                )?;
                if w.file_name != w.name {
                    write!(f, " (as `{}`)", w.file_name)?;
                }
                if is_position_embedding(&w.name) && w.expected.len() == 3 && w.found.len() == 3 {
                    write!(
                        f,
                        "\n      ({} position slots in the file, {} in the model: the checkpoint was made for another \
                         image size, patch size or class-token setting; position embeddings are not resized on load)",
                        w.found[1], w.expected[1]
                    )?;
                }
            }
            more(f, self.wrong_shape.len())?;
        }
        if !self.missing.is_empty() {
            write!(f, "\n  missing (the model has them, the file does not):")?;
            for m in self.missing.iter().take(REPORT_LINES) {
                write!(f, "\n    {} {}", m.name, shape_str(&m.shape))?;
                if let Some(file_name) = m.file_name.as_ref().filter(|n| **n != m.name) {
                    write!(f, " (would be `{file_name}` in the file)")?;
                }
            }
            more(f, self.missing.len())?;
        }
        if !self.unused.is_empty() {
            write!(f, "\n  unused (the file has them, the model does not):")?;
            for u in self.unused.iter().take(REPORT_LINES) {
                write!(f, "\n    {} {}", u.name, shape_str(&u.shape))?;
                match &u.reason {
                    UnusedReason::NoEquivalent => {
                        write!(f, ": no tessera parameter corresponds to this {} name", self.format)?
                    }
                    UnusedReason::NoHead => write!(
                        f,
                        ": timm's classifier; this model's head is not a single Linear layer, so it has no place for it"
                    )?,
                    UnusedReason::NoDistillationHead => write!(
                        f,
                        ": a distilled DeiT's second classifier; this model has no distillation token and head \
                         (MODEL.TRUNK.VISION_TRANSFORMERS.DISTILLED and a second single-Linear head)"
                    )?,
                    UnusedReason::NotInModel(name) if *name != u.name => {
                        write!(f, ": would be `{name}`, which this model does not have")?
                    }
                    UnusedReason::NotInModel(_) => {}
                    UnusedReason::Duplicate(name) => write!(f, ": a second tensor for `{name}`")?,
                }
            }
            more(f, self.unused.len())?;
        }
        if self.matched == 0 && !self.missing.is_empty() && !self.unused.is_empty() {
            let other = match self.format {
                WeightsFormat::Tessera => WeightsFormat::Timm,
                WeightsFormat::Timm => WeightsFormat::Tessera,
            };
            write!(f, "\n  no tensor matched: is this a model of another kind, or a file in {other} names?")?;
        }
        Ok(())
    }
}

/// Tells which names a file uses: tessera's (VISSL's) names all start with
/// `trunk.` or `heads.` (after DDP's `module.`), timm's never do.
pub fn detect_format(names: &[&str]) -> WeightsFormat {
    let tessera = |n: &&str| {
        let n = strip_module(n);
        n.starts_with("trunk.") || n.starts_with("heads.")
    };
    if names.is_empty() || names.iter().any(tessera) {
        WeightsFormat::Tessera
    } else {
        WeightsFormat::Timm
    }
}

/// What [`match_weights_with`] may let pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatchOptions {
    /// Model tensors absent from the file keep their initial values (e.g. a new head).
    pub allow_missing: bool,
    /// File tensors the model does not use are ignored (e.g. a timm head on a SwAV model).
    pub allow_unused: bool,
}

/// The result of a match: the tensors to load, in the order of the
/// expected list and in tessera's names and layouts, plus what was let pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Matched {
    pub tensors: Vec<NamedTensor>,
    /// Model tensors the file lacks (only with `allow_missing`).
    pub missing: Vec<String>,
    /// File tensors not used (only with `allow_unused`).
    pub unused: Vec<String>,
}

/// Tensors a model may lack in a file without it being an error: derived
/// buffers, and BatchNorm's step counter, which PyTorch also tolerates.
fn optional_in_file(name: &str) -> bool {
    is_derived_buffer(name) || name.ends_with(".num_batches_tracked")
}

/// Tessera-format names a file tensor may stand for, best first: the name
/// without DDP's `module.`, then the other VISSL spelling of the token
/// parameters (renamed in Oct 2021).
fn tessera_candidates(name: &str) -> Vec<String> {
    let name = strip_module(name);
    let mut out = vec![name.to_string()];
    let alias = match name {
        "trunk.cls_token" => Some("trunk.class_token"),
        "trunk.class_token" => Some("trunk.cls_token"),
        "trunk.pos_embed" => Some("trunk.pos_embedding"),
        "trunk.pos_embedding" => Some("trunk.pos_embed"),
        _ => None,
    };
    out.extend(alias.map(String::from));
    out
}

/// Same data, shapes that differ only in dimensions of size 1.
fn same_but_unit_dims(a: &[usize], b: &[usize]) -> bool {
    let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
    squeeze(a) == squeeze(b)
}

/// Fits a file's tensors to the model's expected `(name, shape)` list (its
/// parameters and buffers, in tessera names), strictly: any missing, unused
/// or wrongly shaped tensor is an error that lists all of them. Derived
/// buffers (`rel_indices`) are never taken from a file, and a missing
/// `num_batches_tracked` is not an error. The result is in the expected
/// list's order and tessera's names and layouts.
pub fn match_weights(
    expected: &[(String, Vec<usize>)],
    file: Vec<NamedTensor>,
    format: WeightsFormat,
) -> Result<Vec<NamedTensor>, WeightsError> {
    Ok(match_weights_with(expected, file, format, MatchOptions::default())?.tensors)
}

/// [`match_weights`] with some problems let pass (shapes never are).
pub fn match_weights_with(
    expected: &[(String, Vec<usize>)],
    file: Vec<NamedTensor>,
    format: WeightsFormat,
    options: MatchOptions,
) -> Result<Matched, WeightsError> {
    let index: HashMap<&str, usize> = expected.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
    let naming = TimmNaming::infer(expected.iter().map(|(n, _)| n.as_str()));

    // A timm pos_proj [H,3] becomes [H,3L] for a model with LOCALITY_DIM L;
    // its bias is scaled only if its weight is being expanded.
    let mut locality: HashMap<String, usize> = HashMap::new();
    if format == WeightsFormat::Timm {
        for t in &file {
            if !t.name.ends_with(".attn.pos_proj.weight") || !matches!(t.shape[..], [_, 3]) {
                continue;
            }
            let Some(name) = timm_to_tessera(&t.name, &naming) else { continue };
            if let Some(&i) = index.get(name.as_str()) {
                if let [h, c] = expected[i].1[..] {
                    if c % 3 == 0 && c > 3 && h == t.shape[0] {
                        locality.insert(name, c / 3);
                    }
                }
            }
        }
    }

    let mut slots: Vec<Option<NamedTensor>> = vec![None; expected.len()];
    let mut seen = vec![false; expected.len()];
    let mut wrong_shape = Vec::new();
    let mut unused = Vec::new();
    for t in file {
        let candidates = match format {
            WeightsFormat::Tessera => tessera_candidates(&t.name),
            WeightsFormat::Timm => timm_to_tessera(&t.name, &naming).into_iter().collect(),
        };
        if candidates.first().is_some_and(|c| is_derived_buffer(c)) {
            continue;
        }
        let Some((target, i)) = candidates.iter().find_map(|c| index.get(c.as_str()).map(|&i| (c.clone(), i))) else {
            let reason = match candidates.into_iter().next() {
                Some(c) => UnusedReason::NotInModel(c),
                None if format == WeightsFormat::Timm && (t.name == "head.weight" || t.name == "head.bias") => {
                    UnusedReason::NoHead
                }
                None if format == WeightsFormat::Timm && t.name.starts_with("head_dist.") => {
                    UnusedReason::NoDistillationHead
                }
                None => UnusedReason::NoEquivalent,
            };
            unused.push(UnusedTensor { name: t.name, shape: t.shape, reason });
            continue;
        };
        if seen[i] {
            unused.push(UnusedTensor { name: t.name, shape: t.shape, reason: UnusedReason::Duplicate(target) });
            continue;
        }
        seen[i] = true;
        let file_name = t.name.clone();
        let converted = match format {
            WeightsFormat::Tessera => NamedTensor { name: target, ..t },
            WeightsFormat::Timm => {
                let weight = pos_proj_sibling_weight(&target).unwrap_or_else(|| target.clone());
                let l = locality.get(&weight).copied().unwrap_or(1);
                timm::timm_tensor_to_tessera(t, &naming, l).expect("the name mapped above")
            }
        };
        let want = &expected[i].1;
        if converted.shape == *want {
            slots[i] = Some(converted);
        } else if same_but_unit_dims(&converted.shape, want) {
            slots[i] = Some(NamedTensor { shape: want.clone(), ..converted });
        } else {
            wrong_shape.push(WrongShape {
                name: converted.name,
                file_name,
                expected: want.clone(),
                found: converted.shape,
            });
        }
    }

    let missing: Vec<MissingTensor> = expected
        .iter()
        .enumerate()
        .filter(|&(i, (name, _))| !seen[i] && !optional_in_file(name))
        .map(|(_, (name, shape))| MissingTensor {
            name: name.clone(),
            shape: shape.clone(),
            file_name: match format {
                WeightsFormat::Tessera => Some(name.clone()),
                WeightsFormat::Timm => tessera_to_timm(name, &naming),
            },
        })
        .collect();

    let fail = !wrong_shape.is_empty()
        || (!missing.is_empty() && !options.allow_missing)
        || (!unused.is_empty() && !options.allow_unused);
    if fail {
        let matched = slots.iter().filter(|s| s.is_some()).count();
        return Err(WeightsError::Mismatch(Box::new(MismatchReport {
            file: None,
            format,
            matched,
            wrong_shape,
            missing,
            unused,
        })));
    }
    let tensors = slots
        .into_iter()
        .zip(expected)
        .filter_map(|(slot, (name, _))| slot.filter(|_| !is_derived_buffer(name)))
        .collect();
    Ok(Matched {
        tensors,
        missing: missing.into_iter().map(|m| m.name).collect(),
        unused: unused.into_iter().map(|u| u.name).collect(),
    })
}

/// Reads a safetensors file and fits it to the model: the format is detected
/// unless given, and a mismatch report names the file.
pub fn load_weights(
    path: &Path,
    expected: &[(String, Vec<usize>)],
    format: Option<WeightsFormat>,
    options: MatchOptions,
) -> Result<Matched, WeightsError> {
    let tensors = read_safetensors(path)?;
    let format = format.unwrap_or_else(|| {
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        detect_format(&names)
    });
    match_weights_with(expected, tensors, format, options).map_err(|e| e.with_file(path))
}

/// What [`export_with_report`] made: the tensors to write, and the names of
/// the model's tensors that the format cannot hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exported {
    pub tensors: Vec<NamedTensor>,
    pub skipped: Vec<String>,
}

/// The model's tensors (tessera names) as they should be saved in `format`:
/// derived buffers are left out, and for timm the names and layouts are
/// converted and tensors with no timm counterpart (heads other than a
/// single Linear, BatchNorm buffers) are left out.
pub fn export(tensors: &[NamedTensor], format: WeightsFormat) -> Vec<NamedTensor> {
    export_with_report(tensors, format).tensors
}

/// [`export`], also listing the tensors left out (derived buffers excepted).
pub fn export_with_report(tensors: &[NamedTensor], format: WeightsFormat) -> Exported {
    let mut out = Exported::default();
    let naming = TimmNaming::infer(tensors.iter().map(|t| t.name.as_str()));
    let locality: HashMap<&str, usize> = tensors
        .iter()
        .filter(|t| t.name.ends_with(".attn.pos_proj.weight"))
        .filter_map(|t| match t.shape[..] {
            [_, c] if c % 3 == 0 && c > 3 => Some((strip_module(&t.name), c / 3)),
            _ => None,
        })
        .collect();
    for t in tensors {
        if is_derived_buffer(&t.name) {
            continue;
        }
        match format {
            WeightsFormat::Tessera => out.tensors.push(t.clone()),
            WeightsFormat::Timm => {
                let name = strip_module(&t.name);
                let weight = pos_proj_sibling_weight(name).unwrap_or_else(|| name.to_string());
                let l = locality.get(weight.as_str()).copied().unwrap_or(1);
                match timm::tessera_tensor_to_timm(t, &naming, l) {
                    Some(converted) => out.tensors.push(converted),
                    None => out.skipped.push(t.name.clone()),
                }
            }
        }
    }
    out
}

/// The model tensors of a plan, as [`match_weights`] expects them: its
/// parameters and buffers under `trunk.` and `heads.` (VISSL's model state
/// dict), leaving out optimizer state and loss state such as queues.
pub fn model_tensors(plan: &Plan) -> Vec<(String, Vec<usize>)> {
    plan.values
        .iter()
        .filter_map(|v| match &v.source {
            Source::Param { name, .. } | Source::Buffer { name, .. }
                if name.starts_with("trunk.") || name.starts_with("heads.") =>
            {
                Some((name.clone(), v.shape.iter().map(|&d| d as usize).collect()))
            }
            _ => None,
        })
        .collect()
}

/// Metadata worth writing beside exported weights: which names they use,
/// and `format: pt`, which Hugging Face tools expect.
pub fn export_metadata(format: WeightsFormat) -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string()), ("tessera.names".to_string(), format.to_string())])
}
