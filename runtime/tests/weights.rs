//! Weights import/export: safetensors round trips, dtypes, corrupt files,
//! timm <-> tessera names and layouts, matching against real models'
//! parameter lists, and the error reports.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::inference_plan;
use tessera_runtime::weights::timm::{self, TimmNaming};
use tessera_runtime::weights::{
    detect_format, export, export_metadata, export_with_report, load_safetensors, load_weights, match_weights,
    match_weights_with, model_tensors, read_safetensors, tessera_to_timm, timm_to_tessera, write_safetensors,
    write_safetensors_as, DiskDtype, MatchOptions, NamedTensor, WeightsError, WeightsFormat,
};

// ---------------------------------------------------------------- helpers

/// A fresh, empty directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("weights-tests").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn tensor(name: &str, shape: &[usize], seed: u64) -> NamedTensor {
    NamedTensor::new(name, shape.to_vec(), values(shape.iter().product(), seed))
}

/// The model tensors (params and buffers) of a config, from its eval plan.
fn model(config_name: &str, overrides: &[&str]) -> Vec<(String, Vec<usize>)> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = config::load_with(config_name, &overrides, &[]).unwrap_or_else(|e| panic!("{config_name}: {e}"));
    let prog = Program::load(&[]).unwrap_or_else(|e| panic!("models: {e}"));
    let (plan, _) = inference_plan(&prog, cfg.tree(), 1, false).unwrap_or_else(|e| panic!("{config_name}: {e}"));
    model_tensors(&plan)
}

/// Random tensors for every expected (name, shape).
fn fill(expected: &[(String, Vec<usize>)]) -> Vec<NamedTensor> {
    expected.iter().enumerate().map(|(i, (n, s))| tensor(n, s, i as u64 + 7)).collect()
}

fn mismatch(result: Result<Vec<NamedTensor>, WeightsError>) -> String {
    match result {
        Err(e @ WeightsError::Mismatch(_)) => e.to_string(),
        Err(other) => panic!("expected a mismatch report, got: {other}"),
        Ok(t) => panic!("expected a mismatch report, got {} tensors", t.len()),
    }
}

fn names(ts: &[NamedTensor]) -> Vec<&str> {
    ts.iter().map(|t| t.name.as_str()).collect()
}

// ------------------------------------------------------- safetensors I/O

#[test]
fn f32_round_trip_keeps_names_shapes_values_order_and_metadata() {
    let dir = scratch("round_trip");
    let path = dir.join("w.safetensors");
    let mut special = tensor("trunk.special", &[6], 1);
    special.data = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, f32::MIN_POSITIVE / 2.0, f32::MAX];
    let tensors = vec![
        tensor("trunk.pos_embed", &[1, 17, 64], 1),
        tensor("heads.0.clf.0.weight", &[10, 64], 2),
        NamedTensor::new("trunk.scalar", vec![], vec![3.5]),
        NamedTensor::new("trunk.empty", vec![0, 3], vec![]),
        special,
        tensor("a.first.by.name", &[2, 2, 2], 3),
    ];
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("tessera.config".to_string(), "quickstart/vit_tiny".to_string()),
        ("note".to_string(), "ünïcode ✓".to_string()),
    ]);
    write_safetensors(&path, &tensors, &metadata).unwrap();

    let file = load_safetensors(&path).unwrap();
    assert_eq!(file.metadata, metadata);
    assert_eq!(names(&file.tensors), names(&tensors), "tensors come back in the order written");
    for (a, b) in file.tensors.iter().zip(&tensors) {
        assert_eq!(a.shape, b.shape, "{}", a.name);
        let bits = |t: &NamedTensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(a), bits(b), "{}: values must come back bit for bit", a.name);
    }
    assert_eq!(read_safetensors(&path).unwrap().len(), tensors.len());

    // The safetensors crate reads our file, with the same dtype, shapes and bytes.
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("heads.0.clf.0.weight").unwrap();
    assert_eq!(view.dtype(), Dtype::F32);
    assert_eq!(view.shape(), &[10, 64]);
    let first = f32::from_le_bytes(view.data()[..4].try_into().unwrap());
    assert_eq!(first, tensors[1].data[0]);
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap().get("tessera.config").unwrap(), "quickstart/vit_tiny");

    // Same contents, same bytes (metadata order does not depend on hashing).
    let again = dir.join("again.safetensors");
    write_safetensors(&again, &tensors, &metadata).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), bytes);

    // No metadata at all is fine too.
    write_safetensors(&again, &tensors[..1], &BTreeMap::new()).unwrap();
    assert!(load_safetensors(&again).unwrap().metadata.is_empty());
}

#[test]
fn writes_are_atomic_and_leave_no_temporary_files() {
    let dir = scratch("atomic");
    let path = dir.join("w.safetensors");
    write_safetensors(&path, &[tensor("trunk.a", &[4], 1)], &BTreeMap::new()).unwrap();
    write_safetensors(&path, &[tensor("trunk.b", &[5], 2)], &BTreeMap::new()).unwrap();
    assert_eq!(names(&read_safetensors(&path).unwrap()), ["trunk.b"], "the second write replaces the first");

    // A bad tensor list is refused before anything is written, and the old file stays.
    let bad = NamedTensor::new("trunk.c", vec![2, 3], vec![0.0; 5]);
    let err = write_safetensors(&path, &[bad], &BTreeMap::new()).unwrap_err().to_string();
    assert!(
        err.contains("w.safetensors") && err.contains("trunk.c") && err.contains("[2, 3]") && err.contains("5 values"),
        "{err}"
    );
    let dup = [tensor("trunk.d", &[1], 1), tensor("trunk.d", &[1], 2)];
    let err = write_safetensors(&path, &dup, &BTreeMap::new()).unwrap_err().to_string();
    assert!(err.contains("two tensors are named `trunk.d`"), "{err}");
    assert_eq!(names(&read_safetensors(&path).unwrap()), ["trunk.b"]);

    let entries: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(entries, ["w.safetensors"], "no temporary file may be left behind");

    let nowhere = dir.join("no-such-dir").join("w.safetensors");
    let err = write_safetensors(&nowhere, &[tensor("trunk.a", &[1], 1)], &BTreeMap::new()).unwrap_err().to_string();
    assert!(err.contains("cannot write weights file") && err.contains("no-such-dir"), "{err}");
}

#[test]
fn bf16_f16_f64_and_integer_files_written_by_the_safetensors_crate_read_as_f32() {
    let dir = scratch("dtypes");
    let path = dir.join("mixed.safetensors");
    let wanted: Vec<f32> = vec![0.0, 1.0, -2.5, 0.333_333_34, 1e-3, 65504.0, -7.25, 3.0e38];
    let bf16: Vec<u8> = wanted.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
    let f16: Vec<u8> = wanted[..6].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
    let f64s: Vec<u8> = [1.5f64, -1e-8, 12345.678].iter().flat_map(|v| v.to_le_bytes()).collect();
    let i64s: Vec<u8> = [0i64, 42, -3].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        ("trunk.bf16", TensorView::new(Dtype::BF16, vec![2, 4], &bf16).unwrap()),
        ("trunk.f16", TensorView::new(Dtype::F16, vec![6], &f16).unwrap()),
        ("trunk.f64", TensorView::new(Dtype::F64, vec![3, 1], &f64s).unwrap()),
        ("heads.0.bn.num_batches_tracked", TensorView::new(Dtype::I64, vec![3], &i64s).unwrap()),
    ];
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &path).unwrap();

    let file = load_safetensors(&path).unwrap();
    assert_eq!(file.metadata.get("format").map(String::as_str), Some("pt"));
    let by_name: HashMap<&str, &NamedTensor> = file.tensors.iter().map(|t| (t.name.as_str(), t)).collect();

    let t = by_name["trunk.bf16"];
    assert_eq!(t.shape, [2, 4]);
    for (&got, &want) in t.data.iter().zip(&wanted) {
        assert_eq!(got, half::bf16::from_f32(want).to_f32());
        assert!((got - want).abs() <= want.abs() * 2f32.powi(-8), "bf16 {got} vs {want}");
    }
    assert_eq!(&t.data[..3], &[0.0, 1.0, -2.5], "exactly representable values come back exactly");

    let t = by_name["trunk.f16"];
    assert_eq!(t.shape, [6]);
    for (&got, &want) in t.data.iter().zip(&wanted[..6]) {
        assert_eq!(got, half::f16::from_f32(want).to_f32());
        assert!((got - want).abs() <= want.abs() * 2f32.powi(-11), "f16 {got} vs {want}");
    }
    assert_eq!(t.data[5], 65504.0);

    assert_eq!(by_name["trunk.f64"].data, [1.5, -1e-8f64 as f32, 12345.678f64 as f32]);
    assert_eq!(by_name["heads.0.bn.num_batches_tracked"].data, [0.0, 42.0, -3.0]);
}

#[test]
fn bf16_and_f16_files_written_by_tessera() {
    let dir = scratch("write_half");
    let tensors = vec![NamedTensor::new("trunk.x", vec![2, 2], vec![1.0, -0.5, 0.1, 300.0])];
    for (dtype, name) in [(DiskDtype::BF16, Dtype::BF16), (DiskDtype::F16, Dtype::F16)] {
        let path = dir.join(format!("{}.safetensors", dtype.name()));
        write_safetensors_as(&path, &tensors, &BTreeMap::new(), dtype).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("trunk.x").unwrap().dtype(), name);
        let back = read_safetensors(&path).unwrap();
        assert_eq!(back[0].data[..2], [1.0, -0.5]);
        assert!((back[0].data[2] - 0.1).abs() < 1e-3 && (back[0].data[3] - 300.0).abs() < 2.0, "{:?}", back[0].data);
    }
}

#[test]
fn corrupt_files_are_errors_that_name_the_file_and_the_problem() {
    let dir = scratch("corrupt");
    let good = dir.join("good.safetensors");
    write_safetensors(&good, &[tensor("trunk.a", &[8, 8], 1), tensor("trunk.b", &[3], 2)], &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    let check = |file: &str, contents: &[u8], words: &[&str]| {
        let path = dir.join(file);
        std::fs::write(&path, contents).unwrap();
        let err = read_safetensors(&path).expect_err(file);
        let text = err.to_string();
        assert!(matches!(err, WeightsError::Corrupt { .. }), "{text}");
        assert!(text.contains(&path.display().to_string()), "the message must name the file: {text}");
        for w in words {
            assert!(text.contains(w), "{file}: expected {w:?} in: {text}");
        }
    };
    check("truncated.safetensors", &bytes[..bytes.len() - 10], &["truncated", &format!("{} bytes long", bytes.len())]);
    check("cut_in_header.safetensors", &bytes[..20], &["truncated", &format!("header of {header_len} bytes")]);
    check("empty.safetensors", b"", &["0 bytes long", "too short"]);
    check("tiny.safetensors", b"abc", &["3 bytes long"]);
    let mut padded = bytes.clone();
    padded.extend_from_slice(&[0; 16]);
    check("padded.safetensors", &padded, &["longer than its header says"]);
    let mut bad_json = bytes.clone();
    bad_json[8] = b'[';
    check("bad_json.safetensors", &bad_json, &["not a valid safetensors JSON header"]);
    let mut bad_utf8 = bytes.clone();
    bad_utf8[10] = 0xFF;
    check("bad_utf8.safetensors", &bad_utf8, &["UTF-8"]);
    check(
        "torch.pt",
        b"PK\x03\x04\x14\x00\x00\x00\x08\x00 some zip archive",
        &["not a safetensors file", "torch.save"],
    );
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    check("huge.safetensors", &huge, &["not a safetensors file"]);
    let lying = br#"{"trunk.a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
    let mut lie = (lying.len() as u64).to_le_bytes().to_vec();
    lie.extend_from_slice(lying);
    lie.extend_from_slice(&[0; 8]);
    check("lying.safetensors", &lie, &["does not match"]);

    // A missing file is an I/O error that names it.
    let err = read_safetensors(&dir.join("absent.safetensors")).unwrap_err().to_string();
    assert!(err.contains("cannot read weights file") && err.contains("absent.safetensors"), "{err}");

    // Any prefix, and any single-byte change, gives an error or a file, never a panic.
    for cut in 0..bytes.len() {
        let result = tessera_runtime::weights::parse_safetensors(Path::new("cut"), &bytes[..cut]);
        assert!(result.is_err(), "a file cut at {cut} bytes must not parse");
    }
    for i in 0..(8 + header_len) {
        for flip in [0x01u8, 0x80, 0xFF] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            let _ = tessera_runtime::weights::parse_safetensors(Path::new("flipped"), &b);
        }
    }
}

#[test]
fn unsupported_dtypes_are_named() {
    let dir = scratch("fp8");
    let path = dir.join("fp8.safetensors");
    let raw = [0u8; 4];
    let views = vec![("trunk.q", TensorView::new(Dtype::F8_E4M3, vec![4], &raw).unwrap())];
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let err = read_safetensors(&path).unwrap_err().to_string();
    assert!(err.contains("fp8.safetensors") && err.contains("trunk.q") && err.contains("F8_E4M3"), "{err}");
}

// ------------------------------------------------------------- timm names

/// (timm name, tessera name) for every ViT pattern.
const VIT_NAMES: &[(&str, &str)] = &[
    ("cls_token", "trunk.cls_token"),
    ("pos_embed", "trunk.pos_embed"),
    ("patch_embed.proj.weight", "trunk.patch_embed.proj.weight"),
    ("patch_embed.proj.bias", "trunk.patch_embed.proj.bias"),
    ("blocks.0.norm1.weight", "trunk.blocks.0.norm1.weight"),
    ("blocks.0.norm1.bias", "trunk.blocks.0.norm1.bias"),
    ("blocks.3.attn.qkv.weight", "trunk.blocks.3.attn.qkv.weight"),
    ("blocks.3.attn.qkv.bias", "trunk.blocks.3.attn.qkv.bias"),
    ("blocks.11.attn.proj.weight", "trunk.blocks.11.attn.proj.weight"),
    ("blocks.11.attn.proj.bias", "trunk.blocks.11.attn.proj.bias"),
    ("blocks.3.norm2.weight", "trunk.blocks.3.norm2.weight"),
    ("blocks.3.norm2.bias", "trunk.blocks.3.norm2.bias"),
    ("blocks.3.mlp.fc1.weight", "trunk.blocks.3.mlp.fc1.weight"),
    ("blocks.3.mlp.fc1.bias", "trunk.blocks.3.mlp.fc1.bias"),
    ("blocks.3.mlp.fc2.weight", "trunk.blocks.3.mlp.fc2.weight"),
    ("blocks.3.mlp.fc2.bias", "trunk.blocks.3.mlp.fc2.bias"),
    ("norm.weight", "trunk.norm.weight"),
    ("norm.bias", "trunk.norm.bias"),
    ("head.weight", "heads.0.clf.0.weight"),
    ("head.bias", "heads.0.clf.0.bias"),
];

/// (timm name, tessera name) for every ConViT pattern (GPSA block 0, MHSA block 10).
const CONVIT_NAMES: &[(&str, &str)] = &[
    ("cls_token", "trunk.class_token"),
    ("pos_embed", "trunk.pos_embedding"),
    ("patch_embed.proj.weight", "trunk.patch_embed.proj.weight"),
    ("patch_embed.proj.bias", "trunk.patch_embed.proj.bias"),
    ("blocks.0.norm1.weight", "trunk.blocks.0.norm1.weight"),
    ("blocks.0.norm1.bias", "trunk.blocks.0.norm1.bias"),
    ("blocks.0.attn.qk.weight", "trunk.blocks.0.attn.qk.weight"),
    ("blocks.0.attn.qk.bias", "trunk.blocks.0.attn.qk.bias"),
    ("blocks.0.attn.v.weight", "trunk.blocks.0.attn.v.weight"),
    ("blocks.0.attn.v.bias", "trunk.blocks.0.attn.v.bias"),
    ("blocks.0.attn.proj.weight", "trunk.blocks.0.attn.proj.weight"),
    ("blocks.0.attn.proj.bias", "trunk.blocks.0.attn.proj.bias"),
    ("blocks.0.attn.pos_proj.weight", "trunk.blocks.0.attn.pos_proj.weight"),
    ("blocks.0.attn.pos_proj.bias", "trunk.blocks.0.attn.pos_proj.bias"),
    ("blocks.0.attn.gating_param", "trunk.blocks.0.attn.alpha"),
    ("blocks.0.norm2.weight", "trunk.blocks.0.norm2.weight"),
    ("blocks.0.mlp.fc1.weight", "trunk.blocks.0.mlp.linear_1.weight"),
    ("blocks.0.mlp.fc1.bias", "trunk.blocks.0.mlp.linear_1.bias"),
    ("blocks.0.mlp.fc2.weight", "trunk.blocks.0.mlp.linear_2.weight"),
    ("blocks.0.mlp.fc2.bias", "trunk.blocks.0.mlp.linear_2.bias"),
    ("blocks.10.attn.qkv.weight", "trunk.blocks.10.attn.qkv.weight"),
    ("blocks.10.attn.proj.weight", "trunk.blocks.10.attn.proj.weight"),
    ("blocks.10.mlp.fc2.bias", "trunk.blocks.10.mlp.linear_2.bias"),
    ("norm.weight", "trunk.norm.weight"),
    ("norm.bias", "trunk.norm.bias"),
    ("head.weight", "heads.0.clf.0.weight"),
    ("head.bias", "heads.0.clf.0.bias"),
];

#[test]
fn timm_and_tessera_names_map_both_ways() {
    for (naming, table) in [(TimmNaming::vit(), VIT_NAMES), (TimmNaming::convit(), CONVIT_NAMES)] {
        for &(timm_name, tessera_name) in table {
            assert_eq!(timm_to_tessera(timm_name, &naming).as_deref(), Some(tessera_name), "{timm_name}");
            assert_eq!(tessera_to_timm(tessera_name, &naming).as_deref(), Some(timm_name), "{tessera_name}");
        }
    }
    // The vision_transformer_head's classifier is timm's head too.
    let mut naming = TimmNaming::vit();
    naming.head = Some("heads.0.layers.head".into());
    assert_eq!(timm_to_tessera("head.weight", &naming).as_deref(), Some("heads.0.layers.head.weight"));
    assert_eq!(tessera_to_timm("heads.0.layers.head.bias", &naming).as_deref(), Some("head.bias"));
    // DDP's prefix, and either VISSL spelling, export fine.
    let vit = TimmNaming::vit();
    assert_eq!(
        tessera_to_timm("module.trunk.blocks.2.attn.qkv.weight", &vit).as_deref(),
        Some("blocks.2.attn.qkv.weight")
    );
    assert_eq!(tessera_to_timm("trunk.class_token", &vit).as_deref(), Some("cls_token"));
    assert_eq!(tessera_to_timm("trunk.pos_embedding", &vit).as_deref(), Some("pos_embed"));
    // A distilled DeiT: timm's dist_token, head and head_dist.
    let mut deit = TimmNaming::vit();
    deit.head_dist = Some("heads.1.clf.0".into());
    for (timm_name, tessera_name) in [
        ("dist_token", "trunk.dist_token"),
        ("head.weight", "heads.0.clf.0.weight"),
        ("head_dist.weight", "heads.1.clf.0.weight"),
        ("head_dist.bias", "heads.1.clf.0.bias"),
    ] {
        assert_eq!(timm_to_tessera(timm_name, &deit).as_deref(), Some(tessera_name), "{timm_name}");
        assert_eq!(tessera_to_timm(tessera_name, &deit).as_deref(), Some(timm_name), "{tessera_name}");
    }
    assert_eq!(timm_to_tessera("head_dist.scale", &deit), None);
}

#[test]
fn names_without_a_counterpart_map_to_none() {
    let vit = TimmNaming::vit();
    for timm_name in [
        "reg_token",
        "head_dist.weight",
        "fc_norm.weight",
        "norm_pre.weight",
        "blocks.0.ls1.gamma",
        "blocks.0.attn.q_norm.weight",
        "blocks.x.attn.qkv.weight",
        "blocks..norm1.weight",
        "blocks.0.norm1.running_mean",
        "patch_embed.proj.scale",
        "head.weight.extra",
        "trunk.cls_token",
    ] {
        assert_eq!(timm_to_tessera(timm_name, &vit), None, "{timm_name}");
    }
    for tessera_name in [
        "trunk.blocks.0.attn.rel_indices",
        "heads.0.clf.1.weight",
        "heads.0.projection_head.0.weight",
        "heads.0.prototypes0.weight",
        "cls_token",
        "trunk.blocks.0.mlp.fc3.weight",
    ] {
        assert_eq!(tessera_to_timm(tessera_name, &vit), None, "{tessera_name}");
    }
    let mut headless = TimmNaming::vit();
    headless.head = None;
    assert_eq!(timm_to_tessera("head.weight", &headless), None);
    assert_eq!(tessera_to_timm("heads.0.clf.0.weight", &headless), None);
}

#[test]
fn naming_is_inferred_from_the_model() {
    let vit = model("quickstart/vit_tiny", &[]);
    let names = |m: &[(String, Vec<usize>)]| m.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    let infer = |m: &[(String, Vec<usize>)]| TimmNaming::infer(names(m).iter().map(String::as_str));
    assert_eq!(infer(&vit), TimmNaming::vit());
    assert_eq!(infer(&model("quickstart/convit_tiny", &[])), TimmNaming::convit());
    // 64 -> 32 -> Tanh -> 10: no single Linear, so no timm head.
    assert_eq!(infer(&model("quickstart/vit_example_head", &[])).head, None);
    assert_eq!(infer(&model("quickstart/swav_vit_tiny", &[])).head, None);
    let single = ["trunk.cls_token", "heads.0.layers.head.weight", "heads.0.layers.head.bias"];
    assert_eq!(TimmNaming::infer(single).head.as_deref(), Some("heads.0.layers.head"));
    assert_eq!(infer(&vit).head_dist, None);
    // A distilled DeiT's two Linear heads are timm's head and head_dist ...
    let deit = infer(&model("quickstart/deit_tiny_distilled", &[]));
    assert_eq!((deit.head.as_deref(), deit.head_dist.as_deref()), (Some("heads.0.clf.0"), Some("heads.1.clf.0")));
    // ... but two chained heads without a distillation token are not.
    let chained = ["trunk.cls_token", "heads.0.clf.0.weight", "heads.1.clf.0.weight"];
    assert_eq!((TimmNaming::infer(chained).head, TimmNaming::infer(chained).head_dist), (None, None));
}

#[test]
fn gating_param_and_pos_proj_layouts_convert_both_ways() {
    let convit = TimmNaming::convit();
    assert_eq!(timm::gating_to_alpha_shape(&[4]), Some(vec![1, 4, 1, 1]));
    assert_eq!(timm::alpha_to_gating_shape(&[1, 4, 1, 1]), Some(vec![4]));
    assert_eq!(timm::alpha_to_gating_shape(&[4]), None);

    let gating = NamedTensor::new("blocks.1.attn.gating_param", vec![4], vec![0.5, 1.0, -1.0, 2.0]);
    let alpha = timm::timm_tensor_to_tessera(gating.clone(), &convit, 1).unwrap();
    assert_eq!((alpha.name.as_str(), alpha.shape.as_slice()), ("trunk.blocks.1.attn.alpha", &[1, 4, 1, 1][..]));
    assert_eq!(alpha.data, gating.data);
    assert_eq!(timm::tessera_tensor_to_timm(&alpha, &convit, 1).unwrap(), gating);

    // pos_proj: a timm [H,3] layer equals a tessera [H,3L] one whose output is divided by L.
    let (h, l) = (4usize, 10usize);
    let w = NamedTensor::new("blocks.0.attn.pos_proj.weight", vec![h, 3], values(h * 3, 3));
    let b = NamedTensor::new("blocks.0.attn.pos_proj.bias", vec![h], values(h, 4));
    let tw = timm::timm_tensor_to_tessera(w.clone(), &convit, l).unwrap();
    let tb = timm::timm_tensor_to_tessera(b.clone(), &convit, l).unwrap();
    assert_eq!(tw.shape, [h, 3 * l]);
    let rel = [1.0f32, -2.0, 5.0]; // dx, dy, dx^2 + dy^2
    for head in 0..h {
        let timm_logit: f32 = (0..3).map(|c| w.data[head * 3 + c] * rel[c]).sum::<f32>() + b.data[head];
        let tessera_logit: f32 =
            ((0..3 * l).map(|c| tw.data[head * 3 * l + c] * rel[c / l]).sum::<f32>() + tb.data[head]) / l as f32;
        assert!((timm_logit - tessera_logit).abs() < 1e-5, "head {head}: {timm_logit} vs {tessera_logit}");
    }
    let back_w = timm::tessera_tensor_to_timm(&tw, &convit, l).unwrap();
    let back_b = timm::tessera_tensor_to_timm(&tb, &convit, l).unwrap();
    assert_eq!(back_w.shape, [h, 3]);
    for (x, y) in back_w.data.iter().zip(&w.data).chain(back_b.data.iter().zip(&b.data)) {
        assert!((x - y).abs() < 1e-6, "{x} vs {y}");
    }
    // With L = 1 nothing changes.
    assert_eq!(timm::timm_tensor_to_tessera(w.clone(), &convit, 1).unwrap().data, w.data);
}

#[test]
fn detect_format_tells_tessera_from_timm_names() {
    use WeightsFormat::*;
    assert_eq!(detect_format(&["trunk.cls_token", "trunk.blocks.0.norm1.weight", "heads.0.clf.0.weight"]), Tessera);
    assert_eq!(detect_format(&["module.trunk.cls_token", "module.heads.0.clf.0.weight"]), Tessera);
    assert_eq!(detect_format(&["heads.0.prototypes0.weight"]), Tessera);
    assert_eq!(detect_format(&["cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "head.weight"]), Timm);
    assert_eq!(detect_format(&["blocks.0.attn.gating_param", "norm.weight"]), Timm);
    assert_eq!(detect_format(&[]), Tessera);
    let vit = model("quickstart/vit_tiny", &[]);
    let timm_names: Vec<String> = export(&fill(&vit), Timm).into_iter().map(|t| t.name).collect();
    assert_eq!(detect_format(&timm_names.iter().map(String::as_str).collect::<Vec<_>>()), Timm);
    assert_eq!("timm".parse::<WeightsFormat>(), Ok(Timm));
    assert_eq!("VISSL".parse::<WeightsFormat>(), Ok(Tessera));
    assert!("onnx".parse::<WeightsFormat>().unwrap_err().contains("onnx"));
}

// ------------------------------------------------------------- matching

#[test]
fn timm_vit_weights_load_into_the_vit_model_and_export_back() {
    let vit = model("quickstart/vit_tiny", &[]);
    let ours = fill(&vit);
    let timm_file = export(&ours, WeightsFormat::Timm);
    assert_eq!(timm_file.len(), ours.len(), "every ViT tensor has a timm name");
    assert!(timm_file.iter().any(|t| t.name == "head.weight" && t.shape == [10, 64]));
    assert!(timm_file.iter().any(|t| t.name == "blocks.1.mlp.fc2.bias"));

    // Shuffled file order; the result follows the model's order.
    let mut shuffled = timm_file.clone();
    shuffled.reverse();
    let loaded = match_weights(&vit, shuffled, WeightsFormat::Timm).unwrap();
    assert_eq!(loaded, ours);

    // Through a file on disk, with detection, in BF16.
    let dir = scratch("timm_vit");
    let path = dir.join("vit_tiny_timm.safetensors");
    write_safetensors_as(&path, &timm_file, &export_metadata(WeightsFormat::Timm), DiskDtype::BF16).unwrap();
    let matched = load_weights(&path, &vit, None, MatchOptions::default()).unwrap();
    assert_eq!(names(&matched.tensors), names(&ours));
    for (a, b) in matched.tensors.iter().zip(&ours) {
        assert!(a.data.iter().zip(&b.data).all(|(x, y)| (x - y).abs() <= y.abs() / 128.0), "{}", a.name);
    }
}

#[test]
fn timm_distilled_deit_weights_load_into_the_distilled_model_and_export_back() {
    let deit = model("quickstart/deit_tiny_distilled", &[]);
    let ours = fill(&deit);
    let timm_file = export(&ours, WeightsFormat::Timm);
    assert_eq!(timm_file.len(), ours.len(), "every distilled DeiT tensor has a timm name");
    for (name, shape) in
        [("dist_token", [1, 1, 64].as_slice()), ("head_dist.weight", &[10, 64]), ("pos_embed", &[1, 18, 64])]
    {
        assert!(timm_file.iter().any(|t| t.name == name && t.shape == shape), "{name} {shape:?}");
    }
    let loaded = match_weights(&deit, timm_file.clone(), WeightsFormat::Timm).unwrap();
    assert_eq!(loaded, ours);
    // head and head_dist are not interchangeable: swapped, the heads get each other's values.
    let swapped: Vec<NamedTensor> = timm_file
        .iter()
        .map(|t| match t.name.strip_prefix("head.") {
            Some(p) => NamedTensor { name: format!("head_dist.{p}"), ..t.clone() },
            None => match t.name.strip_prefix("head_dist.") {
                Some(p) => NamedTensor { name: format!("head.{p}"), ..t.clone() },
                None => t.clone(),
            },
        })
        .collect();
    let loaded = match_weights(&deit, swapped, WeightsFormat::Timm).unwrap();
    let get = |ts: &[NamedTensor], n: &str| ts.iter().find(|t| t.name == n).unwrap().data.clone();
    assert_eq!(get(&loaded, "heads.0.clf.0.weight"), get(&ours, "heads.1.clf.0.weight"));

    // The same file for a model without distillation token: dist_token and head_dist are unused.
    let plain = model("quickstart/deit_tiny", &[]);
    let file: Vec<NamedTensor> = timm_file.into_iter().filter(|t| t.name != "pos_embed").collect();
    let lenient = MatchOptions { allow_missing: true, allow_unused: true };
    let matched = match_weights_with(&plain, file.clone(), WeightsFormat::Timm, lenient).unwrap();
    assert_eq!(matched.unused, ["dist_token", "head_dist.weight", "head_dist.bias"]);
    let text = mismatch(match_weights(&plain, file, WeightsFormat::Timm));
    assert!(
        text.contains("dist_token [1, 1, 64]: would be `trunk.dist_token`, which this model does not have"),
        "{text}"
    );
    assert!(text.contains("head_dist.weight [10, 64]: a distilled DeiT's second classifier"), "{text}");
}

#[test]
fn timm_convit_weights_load_into_the_convit_model() {
    for locality in ["1", "10"] {
        let convit = model("quickstart/convit_tiny", &[&format!("MODEL.TRUNK.CONVIT.LOCALITY_DIM={locality}")]);
        let l: usize = locality.parse().unwrap();
        let pos_proj = convit.iter().find(|(n, _)| n == "trunk.blocks.0.attn.pos_proj.weight").unwrap();
        assert_eq!(pos_proj.1, [4, 3 * l], "the override took effect");
        assert!(convit.iter().any(|(n, _)| n.ends_with(".attn.rel_indices")));

        // A timm-shaped file: gating_param [H], pos_proj [H,3], no rel_indices.
        let mut ours = fill(&convit);
        for t in ours.iter_mut().filter(|t| t.name.ends_with("pos_proj.weight")) {
            // Group-constant columns, so that collapsing and expanding is the identity.
            let cols: Vec<f32> = values(t.shape[0] * 3, 99);
            t.data = timm::expand_pos_proj_weight(&cols, t.shape[0], l);
        }
        let report = export_with_report(&ours, WeightsFormat::Timm);
        assert!(report.skipped.is_empty(), "{:?}", report.skipped);
        let timm_file = report.tensors;
        assert!(timm_file.iter().all(|t| !t.name.contains("rel_indices")));
        let gating = timm_file.iter().find(|t| t.name == "blocks.0.attn.gating_param").unwrap();
        assert_eq!(gating.shape, [4]);
        let pp = timm_file.iter().find(|t| t.name == "blocks.1.attn.pos_proj.weight").unwrap();
        assert_eq!(pp.shape, [4, 3]);
        assert!(timm_file.iter().any(|t| t.name == "blocks.2.attn.qkv.weight"), "the MHSA block");
        assert!(timm_file.iter().any(|t| t.name == "blocks.2.mlp.fc1.weight"));
        assert!(timm_file.iter().any(|t| t.name == "cls_token") && timm_file.iter().any(|t| t.name == "pos_embed"));

        let loaded = match_weights(&convit, timm_file, WeightsFormat::Timm).unwrap();
        let want: Vec<&NamedTensor> = ours.iter().filter(|t| !t.name.ends_with("rel_indices")).collect();
        assert_eq!(names(&loaded), want.iter().map(|t| t.name.as_str()).collect::<Vec<_>>());
        for (a, b) in loaded.iter().zip(&want) {
            assert_eq!(a.shape, b.shape, "{}", a.name);
            for (x, y) in a.data.iter().zip(&b.data) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{}: {x} vs {y}", a.name);
            }
        }
    }
}

#[test]
fn tessera_files_round_trip_and_skip_derived_buffers() {
    let convit = model("quickstart/convit_tiny", &[]);
    let ours = fill(&convit);
    let saved = export(&ours, WeightsFormat::Tessera);
    let derived = ours.iter().filter(|t| t.name.ends_with(".attn.rel_indices")).count();
    assert_eq!(derived, 2, "convit_tiny has two GPSA blocks");
    assert_eq!(saved.len(), ours.len() - derived, "the GPSA blocks' rel_indices are not saved");
    let dir = scratch("tessera_round_trip");
    let path = dir.join("convit.safetensors");
    write_safetensors(&path, &saved, &export_metadata(WeightsFormat::Tessera)).unwrap();
    let matched = load_weights(&path, &convit, None, MatchOptions::default()).unwrap();
    assert_eq!(matched.tensors, saved, "everything but the derived buffers, values exact");

    // A file that does carry rel_indices (of any shape) is fine: they are recomputed, not read.
    let mut with_buffers = ours.clone();
    with_buffers.push(tensor("trunk.blocks.0.attn.rel_indices", &[1, 4, 4, 3], 5));
    let loaded = match_weights(&convit, with_buffers, WeightsFormat::Tessera).unwrap();
    assert!(loaded.iter().all(|t| !t.name.ends_with("rel_indices")));

    // SwAV: BatchNorm buffers load; a missing num_batches_tracked is not an error.
    let swav = model("quickstart/swav_vit_tiny", &[]);
    let mut file = fill(&swav);
    assert!(file.iter().any(|t| t.name.ends_with("running_var")));
    file.retain(|t| !t.name.ends_with("num_batches_tracked"));
    let loaded = match_weights(&swav, file, WeightsFormat::Tessera).unwrap();
    assert!(loaded.iter().any(|t| t.name == "heads.0.projection_head.1.running_mean"));
    // A SwAV model's heads have no timm names; its trunk does.
    let report = export_with_report(&fill(&swav), WeightsFormat::Timm);
    assert!(report.skipped.iter().all(|n| n.starts_with("heads.")) && !report.skipped.is_empty());
    assert!(report.tensors.iter().any(|t| t.name == "blocks.1.attn.qkv.weight"));
}

#[test]
fn vissl_state_dicts_with_ddp_prefix_and_old_token_names_load() {
    let vit = model("quickstart/vit_tiny", &[]);
    let mut file = fill(&vit);
    for t in &mut file {
        t.name = match t.name.as_str() {
            "trunk.cls_token" => "module.trunk.class_token".to_string(),
            "trunk.pos_embed" => "module.trunk.pos_embedding".to_string(),
            other => format!("module.{other}"),
        };
    }
    assert_eq!(detect_format(&names(&file)), WeightsFormat::Tessera);
    let loaded = match_weights(&vit, file, WeightsFormat::Tessera).unwrap();
    assert_eq!(loaded, fill(&vit));

    // Unit dimensions may differ (the data is the same): e.g. alpha saved as [H].
    let convit = model("quickstart/convit_tiny", &[]);
    let mut file = fill(&convit);
    let alpha = file.iter_mut().find(|t| t.name == "trunk.blocks.0.attn.alpha").unwrap();
    alpha.shape = vec![4];
    let loaded = match_weights(&convit, file, WeightsFormat::Tessera).unwrap();
    assert_eq!(loaded.iter().find(|t| t.name == "trunk.blocks.0.attn.alpha").unwrap().shape, [1, 4, 1, 1]);
}

#[test]
fn mismatches_are_reported_all_at_once() {
    let vit = model("quickstart/vit_tiny", &[]);
    let mut file = export(&fill(&vit), WeightsFormat::Timm);
    // A 224-px checkpoint's position embedding, a head with 1000 classes,
    for t in file.iter_mut() {
        match t.name.as_str() {
            "pos_embed" => *t = tensor("pos_embed", &[1, 197, 64], 1),
            "head.weight" => *t = tensor("head.weight", &[1000, 64], 2),
            _ => {}
        }
    }
    // no final norm weight, a DeiT distillation token and a qkv bias this model has no place for.
    file.retain(|t| t.name != "norm.weight");
    file.push(tensor("dist_token", &[1, 1, 64], 3));
    file.push(tensor("blocks.0.attn.qkv.bias", &[192], 4));

    let text = mismatch(match_weights(&vit, file.clone(), WeightsFormat::Timm));
    for want in [
        "(timm names) do not fit the model: 2 tensors with the wrong shape, 1 model tensor missing, 2 file tensors unused",
        "trunk.pos_embed: the model expects [1, 17, 64], the file has [1, 197, 64] (as `pos_embed`)",
        "17 in the model",
        "heads.0.clf.0.weight: the model expects [10, 64], the file has [1000, 64] (as `head.weight`)",
        "missing (the model has them, the file does not):\n    trunk.norm.weight [64] (would be `norm.weight` in the file)",
        "dist_token [1, 1, 64]: would be `trunk.dist_token`, which this model does not have",
        "blocks.0.attn.qkv.bias [192]: would be `trunk.blocks.0.attn.qkv.bias`, which this model does not have",
    ] {
        assert!(text.contains(want), "expected {want:?} in:\n{text}");
    }
    assert!(!text.contains("pos_embed [1, 17, 64]\n"), "a wrong-shaped tensor is not also listed as missing:\n{text}");

    // Through load_weights the report names the file.
    let dir = scratch("mismatch");
    let path = dir.join("deit_tiny.safetensors");
    write_safetensors(&path, &file, &BTreeMap::new()).unwrap();
    let err = load_weights(&path, &vit, None, MatchOptions::default()).unwrap_err().to_string();
    assert!(err.starts_with(&format!("the weights in {} (timm names) do not fit", path.display())), "{err}");

    // Letting missing and unused tensors pass still refuses wrong shapes ...
    let lenient = MatchOptions { allow_missing: true, allow_unused: true };
    let err = match_weights_with(&vit, file.clone(), WeightsFormat::Timm, lenient).unwrap_err().to_string();
    assert!(err.contains("2 tensors with the wrong shape"), "{err}");
    // ... and otherwise reports what it let pass.
    file.retain(|t| t.name != "pos_embed" && t.name != "head.weight");
    let matched = match_weights_with(&vit, file, WeightsFormat::Timm, lenient).unwrap();
    assert_eq!(matched.missing, ["trunk.pos_embed", "trunk.norm.weight", "heads.0.clf.0.weight"]);
    assert_eq!(matched.unused, ["dist_token", "blocks.0.attn.qkv.bias"]);
    assert_eq!(matched.tensors.len(), vit.len() - 3);
}

#[test]
fn duplicates_and_wrong_format_are_explained() {
    let vit = model("quickstart/vit_tiny", &[]);
    let mut file = fill(&vit);
    file.push(NamedTensor { name: "module.trunk.norm.bias".into(), ..tensor("x", &[64], 1) });
    let text = mismatch(match_weights(&vit, file, WeightsFormat::Tessera));
    assert!(text.contains("module.trunk.norm.bias [64]: a second tensor for `trunk.norm.bias`"), "{text}");

    // Timm names read as tessera names: nothing matches, and the report says why that may be.
    let timm_file = export(&fill(&vit), WeightsFormat::Timm);
    let text = mismatch(match_weights(&vit, timm_file, WeightsFormat::Tessera));
    assert!(text.contains("(0 tensors matched)") && text.contains("a file in timm names?"), "{text}");

    // A timm classifier offered to a model whose head is not one Linear layer.
    let example = model("quickstart/vit_example_head", &[]);
    let mut file = export(&fill(&vit), WeightsFormat::Timm);
    file.retain(|t| t.name != "head.bias");
    let text = mismatch(match_weights(&example, file, WeightsFormat::Timm));
    assert!(
        text.contains("head.weight [10, 64]: timm's classifier; this model's head is not a single Linear layer"),
        "{text}"
    );
    assert!(text.contains("heads.0.layers.pre_logits.weight [32, 64]\n"), "{text}");

    // Long lists are cut.
    let big: Vec<(String, Vec<usize>)> = (0..100).map(|i| (format!("trunk.p{i}"), vec![1])).collect();
    let text = mismatch(match_weights(&big, vec![], WeightsFormat::Tessera));
    assert!(text.contains("100 model tensors missing") && text.contains("... and 70 more"), "{text}");
}
