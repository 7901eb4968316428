//! TensorBoard event files (`events.out.tfevents.<time>.<host>`): TFRecord
//! framing (length, masked CRC-32C of the length, data, masked CRC-32C of the
//! data) around `Event` protocol buffers holding scalar and histogram
//! summaries. Encoded by hand: four messages do not justify a protobuf
//! dependency.
//!
//! Event: 1 wall_time (double), 2 step (int64), 3 file_version (string),
//! 5 summary. Summary: 1 repeated value. Value: 1 tag (string),
//! 2 simple_value (float), 5 histo. HistogramProto: 1 min, 2 max, 3 num,
//! 4 sum, 5 sum_squares (doubles), 6 bucket_limit, 7 bucket (packed doubles).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// An `Event` with a file version or a summary (its encoded values).
fn event(wall_time: f64, step: i64, file_version: Option<&str>, values: &[Vec<u8>]) -> Vec<u8> {
    let mut e = Vec::new();
    tag(1, 1, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    tag(2, 0, &mut e);
    // int64 as a varint: a negative step (VISSL's -1) is its two's complement.
    varint(step as u64, &mut e);
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut e);
    }
    if !values.is_empty() {
        let mut summary = Vec::new();
        for v in values {
            bytes_field(1, v, &mut summary);
        }
        bytes_field(5, &summary, &mut e);
    }
    e
}

/// A summary value holding a scalar.
fn scalar_value(name: &str, value: f32) -> Vec<u8> {
    let mut v = Vec::new();
    bytes_field(1, name.as_bytes(), &mut v);
    tag(2, 5, &mut v);
    v.extend_from_slice(&value.to_le_bytes());
    v
}

fn double_field(field: u32, x: f64, out: &mut Vec<u8>) {
    tag(field, 1, out);
    out.extend_from_slice(&x.to_le_bytes());
}

fn packed_doubles(field: u32, xs: &[f64], out: &mut Vec<u8>) {
    let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    bytes_field(field, &bytes, out);
}

/// TensorFlow's default histogram bucket edges, which TensorBoard's
/// histogram and distribution dashboards expect: 0 and ±1e-12 * 1.1^k up to
/// 1e20 (as `torch.utils.tensorboard`'s `add_histogram(bins="tensorflow")`,
/// VISSL's writer).
fn default_edges() -> &'static [f64] {
    static EDGES: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    EDGES.get_or_init(|| {
        let mut pos = Vec::new();
        let mut v = 1e-12f64;
        while v < 1e20 {
            pos.push(v);
            v *= 1.1;
        }
        let mut edges: Vec<f64> = pos.iter().rev().map(|v| -v).collect();
        edges.push(0.0);
        edges.extend(pos);
        edges
    })
}

/// The histogram of `values` (finite ones; a non-finite value has no bucket)
/// over the default edges: bucket i counts [edge i, edge i+1) and is reported
/// with its right edge as limit, the last edge's bucket closed. Empty buckets
/// at either end are left out, keeping one to mark where counting starts.
/// `None` when no value is finite (VISSL skips such a histogram too).
pub fn histogram(values: &[f32]) -> Option<Histogram> {
    let edges = default_edges();
    let mut counts = vec![0f64; edges.len() - 1];
    let (mut min, mut max, mut num, mut sum, mut sum_squares) = (f64::INFINITY, f64::NEG_INFINITY, 0f64, 0f64, 0f64);
    for &x in values {
        let x = x as f64;
        if !x.is_finite() {
            continue;
        }
        min = min.min(x);
        max = max.max(x);
        num += 1.0;
        sum += x;
        sum_squares += x * x;
        // The first edge above x, less one; values at or beyond the outer
        // edges (|x| >= 1e20) go to the outer buckets.
        let i = edges.partition_point(|&e| e <= x).saturating_sub(1).min(counts.len() - 1);
        counts[i] += 1.0;
    }
    if num == 0.0 {
        return None;
    }
    let first = counts.iter().position(|&c| c > 0.0).unwrap_or(0).saturating_sub(1);
    let last = counts.iter().rposition(|&c| c > 0.0).unwrap_or(0);
    Some(Histogram {
        min,
        max,
        num,
        sum,
        sum_squares,
        limits: edges[first + 1..=last + 1].to_vec(),
        counts: counts[first..=last].to_vec(),
    })
}

/// A `HistogramProto`'s fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub min: f64,
    pub max: f64,
    pub num: f64,
    pub sum: f64,
    pub sum_squares: f64,
    /// Each bucket's right edge.
    pub limits: Vec<f64>,
    pub counts: Vec<f64>,
}

/// A summary value holding a histogram.
fn histogram_value(name: &str, h: &Histogram) -> Vec<u8> {
    let mut p = Vec::new();
    double_field(1, h.min, &mut p);
    double_field(2, h.max, &mut p);
    double_field(3, h.num, &mut p);
    double_field(4, h.sum, &mut p);
    double_field(5, h.sum_squares, &mut p);
    packed_doubles(6, &h.limits, &mut p);
    packed_doubles(7, &h.counts, &mut p);
    let mut v = Vec::new();
    bytes_field(1, name.as_bytes(), &mut v);
    bytes_field(5, &p, &mut v);
    v
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
    /// `HOOKS.TENSORBOARD_SETUP.FLUSH_EVERY_N_MIN` (VISSL's SummaryWriter
    /// `flush_secs`): events reach the file at most this long after written.
    flush_every: Duration,
    flushed: Instant,
}

fn now() -> Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

impl EventWriter {
    /// A new event file in `dir` (created), starting with the version record.
    pub fn create(dir: &Path, flush_every: Duration) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let now = now();
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let host = if host.is_empty() { "localhost".to_string() } else { host };
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now.as_secs()));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut w = EventWriter { path, out: BufWriter::new(file), flush_every, flushed: Instant::now() };
        record(&event(now.as_secs_f64(), 0, Some("brain.Event:2"), &[]), &mut w.out)?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, step: i64, values: &[Vec<u8>]) -> std::io::Result<()> {
        record(&event(now().as_secs_f64(), step, None, values), &mut self.out)?;
        if self.flushed.elapsed() >= self.flush_every {
            self.flush()?;
        }
        Ok(())
    }

    /// Scalars at `step`, in one event.
    pub fn scalars(&mut self, step: i64, values: &[(&str, f32)]) -> std::io::Result<()> {
        let values: Vec<Vec<u8>> = values.iter().map(|(n, v)| scalar_value(n, *v)).collect();
        self.write(step, &values)
    }

    /// The histogram of `values` at `step` (one event per tensor, as
    /// `add_histogram` writes them); nothing when no value is finite.
    pub fn histogram(&mut self, step: i64, name: &str, values: &[f32]) -> std::io::Result<()> {
        match histogram(values) {
            Some(h) => self.write(step, &[histogram_value(name, &h)]),
            None => Ok(()),
        }
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.flushed = Instant::now();
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
        let mut w = EventWriter::create(&dir, Duration::from_secs(300)).unwrap();
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

    /// Closed-form moments, and every value counted once in the bucket whose
    /// edges enclose it.
    #[test]
    fn histograms_count_each_value_between_its_edges() {
        let values = [0.5f32, -0.5, 0.0, 2.0, 2.0, 1e-3, f32::NAN, -7.25];
        let h = histogram(&values).unwrap();
        assert_eq!((h.min, h.max, h.num), (-7.25, 2.0, 7.0));
        let milli = 1e-3f32 as f64;
        assert!((h.sum - (0.5 - 0.5 + 2.0 + 2.0 + milli - 7.25)).abs() < 1e-12);
        assert!((h.sum_squares - (0.25 + 0.25 + 8.0 + milli * milli + 52.5625)).abs() < 1e-12);
        assert_eq!(h.counts.iter().sum::<f64>(), 7.0);
        assert_eq!(h.limits.len(), h.counts.len());
        // Bucket i spans [limit i-1, limit i); the first one only marks the start.
        assert_eq!(h.counts[0], 0.0);
        for &x in values.iter().filter(|x| x.is_finite()) {
            let x = x as f64;
            let i = h.limits.iter().position(|&l| x < l).unwrap();
            assert!(i > 0 && h.limits[i - 1] <= x, "{x}");
            assert!(h.counts[i] >= 1.0, "{x} not counted");
        }
        let i = h.limits.iter().position(|&l| 2.0 < l).unwrap();
        assert_eq!(h.counts[i], 2.0);
        assert!(h.limits.windows(2).all(|w| w[0] < w[1]));
        assert!(histogram(&[f32::NAN, f32::INFINITY]).is_none());
        assert!(histogram(&[]).is_none());
    }

    /// FLUSH_EVERY_N_MIN: an event reaches the file once the interval has
    /// passed since the last flush, and not before.
    #[test]
    fn events_are_flushed_at_the_configured_interval() {
        let dir = std::env::temp_dir().join(format!("tessera-tb-flush-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let size = |w: &EventWriter| std::fs::metadata(w.path()).unwrap().len();
        let mut lazy = EventWriter::create(&dir.join("lazy"), Duration::from_secs(300)).unwrap();
        let start = size(&lazy);
        lazy.scalars(1, &[("Training/Loss", 1.0)]).unwrap();
        assert_eq!(size(&lazy), start, "written before the interval passed");
        lazy.flush().unwrap();
        assert!(size(&lazy) > start);
        let mut eager = EventWriter::create(&dir.join("eager"), Duration::ZERO).unwrap();
        let start = size(&eager);
        eager.scalars(1, &[("Training/Loss", 1.0)]).unwrap();
        assert!(size(&eager) > start, "not written although the interval passed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
