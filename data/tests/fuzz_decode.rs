//! Property test: decoding an image file never panics (the decoder's
//! `catch_unwind` is a last guard, never reached), never hangs and never
//! allocates for a size the file cannot back beyond Pillow's bound (issue
//! 15). Inputs are random bytes and edits of PNG (RGB, gray, palette,
//! 16-bit) and JPEG (baseline, progressive, gray) files:
//! flipped bits, truncation, inserted and deleted bytes, spliced markers
//! and chunk names. Every result is an image whose data fills its size,
//! or an error naming the file.
//! `TESSERA_FUZZ_CASES=N` runs N cases per property (default 1,500).

mod common;
#[path = "../../tests/fuzz/mutate.rs"]
mod mutate;

use common::synthetic;
use mutate::{apply, cases, edits};
use proptest::prelude::*;
use std::sync::OnceLock;
use tessera_data::{decode, Error};

fn png(color: png::ColorType, depth: png::BitDepth) -> Vec<u8> {
    let img = synthetic(13, 9, 3);
    let channels = color.samples();
    let bytes_per = if depth == png::BitDepth::Sixteen { 2 } else { 1 };
    let data: Vec<u8> = img
        .as_rgb()
        .chunks(3)
        .flat_map(|p| (0..channels * bytes_per).map(move |i| p[i % 3].wrapping_add(i as u8)))
        .collect();
    let mut out = Vec::new();
    let mut e = png::Encoder::new(&mut out, 13, 9);
    e.set_color(color);
    e.set_depth(depth);
    if color == png::ColorType::Indexed {
        e.set_palette((0..=255u8).flat_map(|i| [i, 255 - i, i / 2]).collect::<Vec<u8>>());
        e.set_trns(vec![0u8, 128]);
    }
    let mut w = e.write_header().unwrap();
    w.write_image_data(&data).unwrap();
    drop(w);
    out
}

fn jpeg(color: jpeg_encoder::ColorType, progressive: bool) -> Vec<u8> {
    let img = synthetic(21, 14, 5);
    let data: Vec<u8> = match color {
        jpeg_encoder::ColorType::Luma => img.as_rgb().chunks(3).map(|p| p[0]).collect(),
        _ => img.as_rgb().to_vec(),
    };
    let mut out = Vec::new();
    let mut e = jpeg_encoder::Encoder::new(&mut out, 80);
    e.set_progressive(progressive);
    e.encode(&data, 21, 14, color).unwrap();
    out
}

fn files() -> &'static Vec<Vec<u8>> {
    static FILES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    FILES.get_or_init(|| {
        use png::{BitDepth, ColorType};
        vec![
            png(ColorType::Rgb, BitDepth::Eight),
            png(ColorType::Rgba, BitDepth::Sixteen),
            png(ColorType::Grayscale, BitDepth::Sixteen),
            png(ColorType::GrayscaleAlpha, BitDepth::Eight),
            png(ColorType::Indexed, BitDepth::Eight),
            jpeg(jpeg_encoder::ColorType::Rgb, false),
            jpeg(jpeg_encoder::ColorType::Rgb, true),
            jpeg(jpeg_encoder::ColorType::Luma, false),
        ]
    })
}

/// PNG chunk names and JPEG markers, so that edits make structure.
const TOKENS: &[&[u8]] = &[
    b"IHDR",
    b"IDAT",
    b"IEND",
    b"PLTE",
    b"tRNS",
    b"acTL",
    b"\x00\x00\xff\xff",
    b"\xff\xff\xff\xff",
    b"\x7f\xff\xff\xff",
    b"\xff\xd8",
    b"\xff\xd9",
    b"\xff\xda",
    b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff",
    b"\xff\xc2",
    b"\xff\xc4",
    b"\xff\xdb",
    b"\xff\xdd\x00\x04\x00\x01",
    b"\xff\xd0",
    b"\xff\x00",
    b"\x00",
];

fn check(bytes: &[u8]) {
    match decode(bytes, "fuzz/x.img") {
        Ok(img) => assert_eq!(img.as_rgb().len(), img.width() * img.height() * 3),
        Err(Error::Decode { path, reason }) => {
            assert_eq!(path, std::path::Path::new("fuzz/x.img"));
            assert!(!reason.contains("panicked"), "the decoder panicked: {reason}");
        }
        Err(e) => panic!("not a decode error: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1500), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn an_edited_image_decodes_or_is_refused(f in 0..8usize, e in edits(TOKENS.len(), 5)) {
        check(&apply(&files()[f], &e, TOKENS));
    }

    #[test]
    fn random_bytes_after_a_magic_are_refused(jpeg in any::<bool>(), b in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut bytes = if jpeg { vec![0xFF, 0xD8, 0xFF] } else { b"\x89PNG\r\n\x1a\n".to_vec() };
        bytes.extend(b);
        check(&bytes);
    }
}
