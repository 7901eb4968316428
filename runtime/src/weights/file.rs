//! Reading and writing safetensors files.
//!
//! Reading goes through the `safetensors` crate, which validates the header
//! (offsets, sizes, dtypes) before any byte is interpreted; every tensor is
//! converted to f32 in memory, whatever its dtype on disk. Writing builds the
//! header itself so that the bytes of a file depend only on its contents (the
//! crate writes `__metadata__` from a `HashMap`, whose order changes from one
//! process to the next), and it is atomic: a temporary file in the same
//! directory, flushed to disk, then renamed over the target.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::{Dtype, SafeTensorError, SafeTensors};

use super::{NamedTensor, WeightsError};

/// The element type a tensor is stored as on disk. In memory tensors are
/// always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiskDtype {
    F32,
    F16,
    BF16,
}

impl DiskDtype {
    /// The dtype's name in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            DiskDtype::F32 => "F32",
            DiskDtype::F16 => "F16",
            DiskDtype::BF16 => "BF16",
        }
    }

    fn size(self) -> usize {
        match self {
            DiskDtype::F32 => 4,
            DiskDtype::F16 | DiskDtype::BF16 => 2,
        }
    }
}

/// Everything a safetensors file holds: its tensors, in the order of their
/// bytes in the file, and the string-to-string `__metadata__` table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WeightsFile {
    pub tensors: Vec<NamedTensor>,
    pub metadata: BTreeMap<String, String>,
}

/// Reads every tensor of a safetensors file as f32 (F32, F16, BF16 and F64
/// are converted, as are integer and bool tensors such as BatchNorm's
/// `num_batches_tracked`). A missing, truncated or malformed file is an
/// error that names the file and says what is wrong.
pub fn read_safetensors(path: &Path) -> Result<Vec<NamedTensor>, WeightsError> {
    Ok(load_safetensors(path)?.tensors)
}

/// [`read_safetensors`], with the file's `__metadata__` table too.
pub fn load_safetensors(path: &Path) -> Result<WeightsFile, WeightsError> {
    let bytes = fs::read(path).map_err(|error| WeightsError::Io { path: path.to_path_buf(), action: "read", error })?;
    parse_safetensors(path, &bytes)
}

/// Decodes the bytes of a safetensors file; `path` is used in messages only.
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<WeightsFile, WeightsError> {
    let corrupt = |problem: String| WeightsError::Corrupt { path: path.to_path_buf(), problem };
    let (header_len, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| corrupt(describe_corruption(&e, bytes)))?;
    // `read_metadata` checked that the header and every tensor's bytes lie
    // inside the buffer and that the data section ends where the file ends.
    let data = &bytes[8 + header_len..];
    let mut tensors = Vec::new();
    for name in header.offset_keys() {
        let Some(info) = header.info(&name) else {
            return Err(corrupt(format!("the header lists tensor `{name}` twice or not at all")));
        };
        let (start, end) = info.data_offsets;
        let raw = data.get(start..end).ok_or_else(|| {
            corrupt(format!("the bytes of tensor `{name}` ({start}..{end}) lie outside the data section"))
        })?;
        let values = decode(info.dtype, raw).ok_or_else(|| WeightsError::UnsupportedDtype {
            path: path.to_path_buf(),
            name: name.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        tensors.push(NamedTensor { name, shape: info.shape.clone(), data: values });
    }
    let metadata = header.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    Ok(WeightsFile { tensors, metadata: metadata.unwrap_or_default() })
}

/// Converts little-endian elements of `dtype` to f32; `None` for the dtypes
/// tessera does not read (sub-byte and 8-bit floats, complex numbers).
fn decode(dtype: Dtype, raw: &[u8]) -> Option<Vec<f32>> {
    fn each<const N: usize>(raw: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        raw.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact yields N bytes"))).collect()
    }
    Some(match dtype {
        Dtype::F32 => each(raw, f32::from_le_bytes),
        Dtype::F16 => each(raw, |b| half::f16::from_le_bytes(b).to_f32()),
        Dtype::BF16 => each(raw, |b| half::bf16::from_le_bytes(b).to_f32()),
        Dtype::F64 => each(raw, |b| f64::from_le_bytes(b) as f32),
        Dtype::BOOL => raw.iter().map(|&b| if b != 0 { 1.0 } else { 0.0 }).collect(),
        Dtype::U8 => raw.iter().map(|&b| b as f32).collect(),
        Dtype::I8 => raw.iter().map(|&b| b as i8 as f32).collect(),
        Dtype::I16 => each(raw, |b| i16::from_le_bytes(b) as f32),
        Dtype::U16 => each(raw, |b| u16::from_le_bytes(b) as f32),
        Dtype::I32 => each(raw, |b| i32::from_le_bytes(b) as f32),
        Dtype::U32 => each(raw, |b| u32::from_le_bytes(b) as f32),
        Dtype::I64 => each(raw, |b| i64::from_le_bytes(b) as f32),
        Dtype::U64 => each(raw, |b| u64::from_le_bytes(b) as f32),
        _ => return None,
    })
}

/// Explains, in words, why the safetensors crate rejected a file.
fn describe_corruption(err: &SafeTensorError, bytes: &[u8]) -> String {
    let len = bytes.len();
    let announced = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let n = announced.unwrap_or(0);
    let guess = if bytes.starts_with(b"PK\x03\x04") {
        " (it looks like a zip archive, which is what torch.save writes: convert the checkpoint to safetensors first)"
    } else if bytes.first() == Some(&0x80) {
        " (it looks like a Python pickle, e.g. an old PyTorch checkpoint: convert it to safetensors first)"
    } else {
        ""
    };
    match err {
        SafeTensorError::HeaderTooSmall => format!(
            "it is {len} bytes long, too short to hold even the 8-byte header length that starts every \
             safetensors file (an empty or truncated file?)"
        ),
        SafeTensorError::HeaderTooLarge => format!(
            "its first 8 bytes announce a header of {n} bytes, over the 100 MB limit of the format, so it is \
             not a safetensors file{guess}"
        ),
        SafeTensorError::InvalidHeaderLength => format!(
            "its first 8 bytes announce a header of {n} bytes but the whole file is {len} bytes: it is truncated, \
             or not a safetensors file{guess}"
        ),
        SafeTensorError::InvalidHeader(e) => format!("its header is not valid UTF-8 ({e}){guess}"),
        SafeTensorError::InvalidHeaderDeserialization(e) | SafeTensorError::JsonError(e) => {
            format!("its header is not a valid safetensors JSON header ({e}){guess}")
        }
        SafeTensorError::MetadataIncompleteBuffer => match declared_data_len(bytes, n) {
            Some(data_len) => {
                let want = 8 + n as u128 + data_len as u128;
                let (have, what) =
                    (len as u128, if (len as u128) < want { "truncated" } else { "longer than its header says" });
                format!(
                    "it is {what}: its header describes {data_len} bytes of tensor data, so the file should be \
                     {want} bytes long, but it is {have} bytes"
                )
            }
            None => format!("its tensor data does not fill the {len}-byte file exactly (truncated, or extra bytes)"),
        },
        SafeTensorError::InvalidOffset(name) => format!(
            "the byte range of tensor `{name}` does not start where the previous tensor's ends (overlapping or \
             gapped data offsets)"
        ),
        SafeTensorError::TensorInvalidInfo => {
            "the byte range of one of its tensors does not match that tensor's shape and dtype".to_string()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape is too large to address (size overflow)".to_string(),
        other => other.to_string(),
    }
}

/// The end of the last tensor's bytes, read from a header that parsed as
/// JSON (used only to explain a size mismatch).
fn declared_data_len(bytes: &[u8], header_len: u64) -> Option<u64> {
    let header = bytes.get(8..8usize.checked_add(usize::try_from(header_len).ok()?)?)?;
    let value: serde_json::Value = serde_json::from_slice(header).ok()?;
    let mut end = 0;
    for (name, info) in value.as_object()? {
        if name != "__metadata__" {
            end = end.max(info.get("data_offsets")?.get(1)?.as_u64()?);
        }
    }
    Some(end)
}

/// Writes `tensors` as F32 with `metadata` as the `__metadata__` table, in the
/// order given. The file appears complete or not at all.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<(), WeightsError> {
    write_safetensors_as(path, tensors, metadata, DiskDtype::F32)
}

/// [`write_safetensors`], storing every tensor as `dtype` (F16 and BF16
/// round to nearest even).
pub fn write_safetensors_as(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: &BTreeMap<String, String>,
    dtype: DiskDtype,
) -> Result<(), WeightsError> {
    let header = build_header(path, tensors, metadata, dtype)?;
    atomic_write(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        let mut buf = Vec::new();
        for t in tensors {
            for chunk in t.data.chunks(1 << 16) {
                buf.clear();
                encode(chunk, dtype, &mut buf);
                w.write_all(&buf)?;
            }
        }
        Ok(())
    })
}

/// The JSON header, padded with spaces to a multiple of 8 bytes.
fn build_header(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: &BTreeMap<String, String>,
    dtype: DiskDtype,
) -> Result<Vec<u8>, WeightsError> {
    let invalid = |problem: String| WeightsError::InvalidWrite { path: path.to_path_buf(), problem };
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let table = metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        header.insert("__metadata__".to_string(), serde_json::Value::Object(table));
    }
    let mut seen = HashSet::new();
    let mut offset = 0usize;
    for t in tensors {
        if t.name == "__metadata__" {
            return Err(invalid("a tensor cannot be named `__metadata__` (the name is reserved)".to_string()));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(invalid(format!("two tensors are named `{}`", t.name)));
        }
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(t.data.len()) {
            return Err(invalid(format!("tensor `{}` has shape {:?} but {} values", t.name, t.shape, t.data.len())));
        }
        let end = offset + t.data.len() * dtype.size();
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": dtype.name(), "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| invalid(e.to_string()))?;
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    Ok(bytes)
}

fn encode(values: &[f32], dtype: DiskDtype, out: &mut Vec<u8>) {
    match dtype {
        DiskDtype::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DiskDtype::F16 => values.iter().for_each(|&v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())),
        DiskDtype::BF16 => values.iter().for_each(|&v| out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes through `fill` into a fresh temporary file next to `path`, syncs it
/// to disk, renames it over `path` and syncs the directory. On any failure
/// the temporary file is removed and `path` is left as it was.
fn atomic_write(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>) -> Result<(), WeightsError> {
    let fail = |error: io::Error| WeightsError::Io { path: path.to_path_buf(), action: "write", error };
    let Some(file_name) = path.file_name() else {
        return Err(fail(io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file")));
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let file = OpenOptions::new().write(true).create_new(true).open(&temp)?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        fill(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, path)
    })();
    if let Err(error) = result {
        let _ = fs::remove_file(&temp);
        return Err(fail(error));
    }
    // Make the rename itself durable. Not every platform can open a
    // directory, and the file is complete either way, so this is best effort.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
