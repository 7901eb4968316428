//! Decoding JPEG and PNG files to `Image`, as VISSL's loader does with
//! `PIL.Image.open(path).convert("RGB")` (`vissl/data/disk_dataset.py`).
//!
//! The format is chosen from the file's magic bytes, not its extension, as
//! Pillow does (ImageNet has a PNG named `.JPEG`). Alpha is dropped, not
//! composited, and grayscale is replicated, as `.convert("RGB")` does.

use std::io::Cursor;
use std::path::Path;

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::errors::DecodeErrors;
use zune_jpeg::JpegDecoder;

use crate::error::{Error, Result};
use crate::image::Image;

/// Pillow refuses images above twice `Image.MAX_IMAGE_PIXELS` (a
/// `DecompressionBombError`); we refuse the same, before allocating.
pub const MAX_PIXELS: usize = 2 * 89_478_485;

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Decodes a JPEG or PNG file held in memory. `path` only names the file in
/// error messages. Malformed bytes give an `Err`, never a panic.
pub fn decode(bytes: &[u8], path: impl AsRef<Path>) -> Result<Image> {
    let path = path.as_ref();
    let fail = |reason: String| Error::Decode { path: path.to_path_buf(), reason };
    // Belt and braces: a decoder bug must not take a training worker down with
    // it; VISSL turns unreadable images into its gray fallback, so we report.
    let result = std::panic::catch_unwind(|| {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            decode_jpeg(bytes)
        } else if bytes.starts_with(PNG_MAGIC) {
            decode_png(bytes)
        } else if bytes.is_empty() {
            Err("empty file".to_string())
        } else {
            Err("not a JPEG or PNG file (unknown magic bytes)".to_string())
        }
    });
    match result {
        Ok(Ok(image)) => Ok(image),
        Ok(Err(reason)) => Err(fail(reason)),
        Err(_) => Err(fail("the decoder panicked on these bytes".to_string())),
    }
}

/// The largest image file read (256 MiB): a bigger file is an unreadable
/// sample, not read until memory runs out (a symlink to `/dev/zero`, a
/// runaway file).
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// Reads and decodes a file.
pub fn decode_file(path: impl AsRef<Path>) -> Result<Image> {
    let path = path.as_ref();
    let bytes = read_image_file(path).map_err(|reason| Error::Decode { path: path.to_path_buf(), reason })?;
    decode(&bytes, path)
}

/// The bytes of an image file: only a regular file (after following
/// symlinks) of at most `MAX_IMAGE_FILE_BYTES` is read. The file is opened
/// without blocking (a FIFO would wait for a writer forever) and its type is
/// checked on the opened file, so it cannot be swapped in between.
pub fn read_image_file(path: &Path) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    let t = meta.file_type();
    if !t.is_file() {
        let what = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO (named pipe)"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(format!("not a regular file ({what}); only regular files are read as images"));
    }
    if meta.len() > MAX_IMAGE_FILE_BYTES {
        return Err(format!(
            "the file is {} bytes; image files above {MAX_IMAGE_FILE_BYTES} bytes (256 MiB) are not read",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow while it is read: never more than the bound.
    file.take(MAX_IMAGE_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_IMAGE_FILE_BYTES {
        return Err(format!("the file grew past {MAX_IMAGE_FILE_BYTES} bytes (256 MiB) while it was read"));
    }
    Ok(bytes)
}

fn check_size(width: usize, height: usize) -> std::result::Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("empty image ({width}x{height})"));
    }
    if width.saturating_mul(height) > MAX_PIXELS {
        return Err(format!("{width}x{height} exceeds Pillow's decompression-bomb limit of {MAX_PIXELS} pixels"));
    }
    Ok(())
}

fn decode_jpeg(bytes: &[u8]) -> std::result::Result<Image, String> {
    // Pillow raises "image file is truncated" unless libjpeg reaches the EOI
    // marker, but libjpeg only warns about stray bytes, unexpected markers or
    // corrupt entropy data. zune-jpeg's lenient mode decodes like libjpeg
    // (missing data becomes gray), so we add the EOI check ourselves.
    let image = decode_jpeg_with(bytes).map_err(|e| format!("JPEG: {e}"))?;
    if !jpeg_reaches_eoi(bytes) {
        return Err("JPEG: image file is truncated (no end-of-image marker after the scan data)".to_string());
    }
    Ok(image)
}

/// Whether the marker structure of a JPEG reaches its EOI marker: header
/// segments are skipped by their lengths, entropy-coded data up to the next
/// marker other than RSTn (within it 0xFF is always followed by 0x00 or an
/// RST marker), stray bytes between segments are skipped as libjpeg does.
fn jpeg_reaches_eoi(b: &[u8]) -> bool {
    if b.ends_with(&[0xFF, 0xD9]) {
        return true;
    }
    let mut i = 2; // after SOI
    loop {
        // Next marker: 0xFF followed by a byte other than 0x00 and 0xFF.
        while i + 1 < b.len() && !(b[i] == 0xFF && b[i + 1] != 0x00 && b[i + 1] != 0xFF) {
            i += 1;
        }
        if i + 1 >= b.len() {
            return false;
        }
        let marker = b[i + 1];
        i += 2;
        match marker {
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => continue, // TEM, RSTn: no length
            _ => {
                let Some(len) = b.get(i..i + 2).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize) else {
                    return false;
                };
                i += len;
                if marker == 0xDA {
                    // Entropy-coded data up to a marker that is not RSTn.
                    while i + 1 < b.len() && (b[i] != 0xFF || matches!(b[i + 1], 0x00 | 0xD0..=0xD7)) {
                        i += 1;
                    }
                }
            }
        }
    }
}

fn decode_jpeg_with(bytes: &[u8]) -> std::result::Result<Image, DecodeErrors> {
    // zune-jpeg converts every JPEG colour space (gray, YCbCr, CMYK, YCCK) to RGB.
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(u16::MAX as usize)
        .set_max_height(u16::MAX as usize)
        .set_strict_mode(false);
    let mut decoder = JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    decoder.decode_headers()?;
    let info = decoder.info().ok_or(DecodeErrors::FormatStatic("no frame header"))?;
    let (width, height) = (info.width as usize, info.height as usize);
    check_size(width, height).map_err(DecodeErrors::Format)?;
    let mut data = vec![0u8; width * height * 3];
    decoder.decode_into(&mut data)?;
    Image::from_rgb(width, height, data).ok_or(DecodeErrors::FormatStatic("decoder returned a wrong-sized buffer"))
}

fn decode_png(bytes: &[u8]) -> std::result::Result<Image, String> {
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: usize::MAX / 4 });
    // EXPAND: palette -> RGB(A), 1/2/4-bit gray -> 8-bit scaled (Pillow's "1",
    // "L;2", "L;4" unpackers scale the same way), tRNS -> alpha (dropped below).
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(|e| format!("PNG: {e}"))?;
    let (source_color, source_depth) = {
        let info = reader.info();
        check_size(info.width as usize, info.height as usize)?;
        (info.color_type, info.bit_depth)
    };
    let size = reader.output_buffer_size().ok_or("PNG: image too large")?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(|e| format!("PNG: {e}"))?;
    let (width, height) = (frame.width as usize, frame.height as usize);
    let channels = frame.color_type.samples();
    let sample_bytes = if frame.bit_depth == png::BitDepth::Sixteen { 2 } else { 1 };
    let line = frame.line_size;
    // Pillow opens 16-bit grayscale as "I;16", whose conversion to RGB clips
    // at 255 (`I16_RGB` in Convert.c); every other 16-bit mode keeps the most
    // significant byte ("RGB;16B", "LA;16B" rawmodes).
    let gray16_clips = source_color == png::ColorType::Grayscale && source_depth == png::BitDepth::Sixteen;
    let sample = |row: &[u8], x: usize, c: usize| -> u8 {
        let i = (x * channels + c) * sample_bytes;
        if sample_bytes == 1 {
            row[i]
        } else if gray16_clips {
            let v = u16::from_be_bytes([row[i], row[i + 1]]);
            v.min(255) as u8
        } else {
            row[i]
        }
    };
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        let row = buf.get(y * line..(y + 1) * line).ok_or("PNG: short frame")?;
        for x in 0..width {
            if channels >= 3 {
                data.extend_from_slice(&[sample(row, x, 0), sample(row, x, 1), sample(row, x, 2)]);
            } else {
                let l = sample(row, x, 0);
                data.extend_from_slice(&[l, l, l]);
            }
        }
    }
    Image::from_rgb(width, height, data).ok_or_else(|| "PNG: wrong-sized frame".to_string())
}
