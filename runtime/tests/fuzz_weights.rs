//! Property test: reading a weights file (`MODEL.WEIGHTS_INIT`, `tessera
//! infer --weights`, a checkpoint's tensors) never panics and never
//! allocates what a damaged header claims (issue 15). Inputs are random
//! bytes and edits of safetensors files tessera writes (F32, F16 and BF16;
//! tessera and timm names): byte edits anywhere, and edits of the JSON
//! header (a shape or offset of 2^60, a negative one, another dtype, a
//! field removed) with the data left as it was. A file is refused with an
//! error naming it, or read into tensors whose data fills their shapes,
//! which are then matched to a model's tensor list in both naming formats.
//! `TESSERA_FUZZ_CASES=N` runs N cases per property (default 5,000).

#[path = "../../tests/fuzz/mutate.rs"]
mod mutate;

use mutate::{apply, apply_json, cases, edits, json_edits, JsonEdit};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use tessera_runtime::weights::{
    match_weights_with, parse_safetensors, write_safetensors_as, DiskDtype, MatchOptions, NamedTensor, WeightsFormat,
};

/// The model's tensors: tessera names, with a ConViT block's `pos_proj`
/// (timm's [H, 3] becomes [H, 3L]) and an integer-valued buffer.
fn model() -> Vec<NamedTensor> {
    let t = |name: &str, shape: Vec<usize>| {
        let n = shape.iter().product();
        NamedTensor::new(name, shape, (0..n).map(|i| i as f32 * 0.5 - 1.0).collect())
    };
    vec![
        t("trunk.class_token", vec![1, 1, 4]),
        t("trunk.blocks.0.attn.pos_proj.weight", vec![2, 6]),
        t("trunk.blocks.0.attn.pos_proj.bias", vec![2]),
        t("trunk.blocks.0.attn.alpha", vec![1, 2, 1, 1]),
        t("heads.0.clf.0.weight", vec![3, 4]),
        t("heads.0.bn.num_batches_tracked", vec![]),
    ]
}

/// The same weights as timm names them.
fn timm() -> Vec<NamedTensor> {
    let t = |name: &str, shape: Vec<usize>| {
        let n = shape.iter().product();
        NamedTensor::new(name, shape, (0..n).map(|i| i as f32).collect())
    };
    vec![
        t("cls_token", vec![1, 1, 4]),
        t("blocks.0.attn.pos_proj.weight", vec![2, 3]),
        t("blocks.0.attn.pos_proj.bias", vec![2]),
        t("blocks.0.attn.gating_param", vec![2]),
        t("head.weight", vec![3, 4]),
    ]
}

/// The files edited: tessera's weights as F32, F16 and BF16, and timm's.
fn files() -> &'static Vec<Vec<u8>> {
    static FILES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tessera-fuzz-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut out = Vec::new();
        for (tensors, dtype) in
            [(model(), DiskDtype::F32), (model(), DiskDtype::F16), (model(), DiskDtype::BF16), (timm(), DiskDtype::F32)]
        {
            let path = dir.join("w.safetensors");
            write_safetensors_as(&path, &tensors, &meta, dtype).unwrap();
            out.push(std::fs::read(&path).unwrap());
        }
        std::fs::remove_dir_all(&dir).unwrap();
        out
    })
}

/// A safetensors file with its JSON header edited, the data kept.
fn header_edited(bytes: &[u8], e: &[JsonEdit]) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    apply_json(&mut header, e);
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// Tokens for byte edits: header syntax, and numbers a reader must bound.
const TOKENS: &[&[u8]] = &[
    b"\"F64\"",
    b"\"I8\"",
    b"\"F8_E4M3\"",
    b"\"BOOL\"",
    b"\"shape\":[1152921504606846976,16]",
    b"\"data_offsets\":[0,18446744073709551615]",
    b"18446744073709551615",
    b"-1",
    b"0",
    b"[]",
    b"{",
    b"}",
    b",",
    b"\"",
    b"\x00\x00\x00\x00\x00\x00\x00\x10",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
];

fn check(bytes: &[u8]) {
    let path = Path::new("fuzz/w.safetensors");
    match parse_safetensors(path, bytes) {
        Ok(file) => {
            for t in &file.tensors {
                let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                assert_eq!(numel, Some(t.data.len()), "`{}` {:?}", t.name, t.shape);
            }
            let expected: Vec<(String, Vec<usize>)> = model().into_iter().map(|t| (t.name, t.shape)).collect();
            for format in [WeightsFormat::Tessera, WeightsFormat::Timm] {
                for allow in [false, true] {
                    let options = MatchOptions { allow_missing: allow, allow_unused: allow };
                    if let Ok(m) = match_weights_with(&expected, file.tensors.clone(), format, options) {
                        for t in &m.tensors {
                            assert_eq!(t.shape.iter().product::<usize>(), t.data.len(), "`{}`", t.name);
                        }
                    }
                }
            }
        }
        Err(e) => assert!(e.to_string().contains("fuzz/w.safetensors"), "{e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(5000), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_weights_file_with_edited_bytes_is_read_or_refused(f in 0..4usize, e in edits(TOKENS.len(), 6)) {
        check(&apply(&files()[f], &e, TOKENS));
    }

    #[test]
    fn a_weights_file_with_an_edited_header_is_read_or_refused(f in 0..4usize, e in json_edits(3)) {
        check(&header_edited(&files()[f], &e));
    }

    #[test]
    fn random_bytes_are_refused(b in prop::collection::vec(any::<u8>(), 0..200)) {
        check(&b);
    }
}

/// A header whose first 8 bytes announce 2^60 bytes, or a tensor of 2^60
/// elements, is refused before anything that size is allocated.
#[test]
fn absurd_lengths_are_refused_before_allocating() {
    let mut huge = (1u64 << 60).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    assert!(parse_safetensors(Path::new("h"), &huge).unwrap_err().to_string().contains("over the 100 MB limit"));
    let header = br#"{"t":{"dtype":"F32","shape":[1152921504606846976],"data_offsets":[0,4]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0; 4]);
    assert!(parse_safetensors(Path::new("t"), &file).is_err());
}
