//! TensorBoard event files (`events.out.tfevents.<time>.<host>`): TFRecord
//! framing (length, masked CRC-32C of the length, data, masked CRC-32C of the
//! data) around `Event` protocol buffers holding scalar summaries. Encoded by
//! hand: three messages do not justify a protobuf dependency.
//!
//! Event: 1 wall_time (double), 2 step (int64), 3 file_version (string),
//! 5 summary. Summary: 1 repeated value. Value: 1 tag (string),
//! 2 simple_value (float).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), reflected polynomial 0x82F63B78.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(field: u32, wire: u8, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | wire as u64, out);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    tag(field, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// An `Event` with either a file version or scalar values.
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut e = Vec::new();
    tag(1, 1, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    tag(2, 0, &mut e);
    varint(step as u64, &mut e);
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut e);
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (name, value) in scalars {
            let mut v = Vec::new();
            bytes_field(1, name.as_bytes(), &mut v);
            tag(2, 5, &mut v);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(1, &v, &mut summary);
        }
        bytes_field(5, &summary, &mut e);
    }
    e
}

fn record(data: &[u8], out: &mut impl Write) -> std::io::Result<()> {
    let len = (data.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc(&len).to_le_bytes())?;
    out.write_all(data)?;
    out.write_all(&masked_crc(data).to_le_bytes())
}

pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// A new event file in `dir` (created), starting with the version record.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let host = if host.is_empty() { "localhost".to_string() } else { host };
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now.as_secs()));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut w = EventWriter { path, out: BufWriter::new(file) };
        record(&event(now.as_secs_f64(), 0, Some("brain.Event:2"), &[]), &mut w.out)?;
        w.out.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn scalars(&mut self, step: u64, values: &[(&str, f32)]) -> std::io::Result<()> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        record(&event(now.as_secs_f64(), step as i64, None, values), &mut self.out)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // RFC 3720's CRC-32C check value of "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    /// Reads the records back, checking both CRCs, and decodes the scalar
    /// events' (step, tag, value).
    #[test]
    fn event_files_frame_and_encode_scalars() {
        let dir = std::env::temp_dir().join(format!("tessera-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(7, &[("Training/Loss", 2.5)]).unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut records = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(data));
            records.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(records.len(), 2);
        assert!(records[0].windows(13).any(|w| w == b"brain.Event:2"));
        // wall_time (9 bytes), then step 7 as a varint: field 2, wire 0.
        let r = &records[1];
        assert_eq!(r[0], 0x09);
        assert_eq!(&r[9..11], &[0x10, 7]);
        // Summary (field 5) > value (field 1) > tag and simple_value.
        assert_eq!(r[11], 0x2a);
        let value = &r[13..];
        assert_eq!(value[0], 0x0a);
        let inner = &value[2..];
        assert_eq!(inner[0], 0x0a);
        assert_eq!(&inner[2..2 + 13], b"Training/Loss");
        assert_eq!(inner[15], 0x15);
        assert_eq!(f32::from_le_bytes(inner[16..20].try_into().unwrap()), 2.5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
