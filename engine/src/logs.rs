//! What a run writes to `CHECKPOINT.DIR`, as VISSL names it (reference 8.3):
//! - `log.txt`: plain-language lines (also printed on a terminal);
//! - `stdout.json`: one JSON object per logged step (iteration, epoch, loss,
//!   lr, images/s, ETA, ...);
//! - `metrics.json`: one JSON line per phase with its meters;
//! - TensorBoard event files when `HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD`.
//!
//! Files are appended to, so a resumed run continues them. On a terminal a
//! progress bar shows loss, lr, images/s and ETA; otherwise standard output
//! gets the `stdout.json` records (machine-readable), and nothing else.

use crate::tensorboard::EventWriter;
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the progress bar shows.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub epoch: u64,
    pub epochs: u64,
    /// Steps done in this epoch, of `total`.
    pub done: u64,
    pub total: u64,
    pub loss: f64,
    pub lr: f64,
    pub images_per_sec: f64,
    pub eta_seconds: f64,
}

pub struct RunLog {
    log_txt: File,
    stdout_json: File,
    metrics_json: File,
    tensorboard: Option<EventWriter>,
    /// Progress on standard error (a terminal), or JSON lines on standard output.
    terminal: bool,
    quiet: bool,
    bar_shown: bool,
    /// The run files whose writes have failed (each said once).
    failed: Vec<&'static str>,
    /// The last phase's line (`phase_text`), for a run's closing summary.
    last_phase: Option<String>,
}

fn append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl RunLog {
    /// Opens the run's files in `dir`; `tensorboard` is the events
    /// directory and flush interval when TensorBoard is on.
    pub fn open(dir: &Path, tensorboard: Option<(PathBuf, Duration)>, quiet: bool) -> std::io::Result<RunLog> {
        std::fs::create_dir_all(dir)?;
        Ok(RunLog {
            log_txt: append(&dir.join("log.txt"))?,
            stdout_json: append(&dir.join("stdout.json"))?,
            metrics_json: append(&dir.join("metrics.json"))?,
            tensorboard: tensorboard.map(|(d, every)| EventWriter::create(&d, every)).transpose()?,
            terminal: std::io::stderr().is_terminal(),
            quiet,
            bar_shown: false,
            failed: Vec::new(),
            last_phase: None,
        })
    }

    /// A write to one of the run's files: a failure (a full disk) is said
    /// on standard error, once per file, and the run goes on.
    fn wrote(&mut self, file: &'static str, r: std::io::Result<()>) {
        if let Err(e) = r {
            if !self.failed.contains(&file) {
                self.failed.push(file);
                self.clear_bar();
                crate::errln!("warning: cannot write {file} in the run's folder ({e}); its lines are being lost");
            }
        }
    }

    fn clear_bar(&mut self) {
        if self.bar_shown {
            crate::err!("\r\x1b[2K");
            self.bar_shown = false;
        }
    }

    /// A plain-language line: log.txt, and standard error on a terminal.
    pub fn info(&mut self, line: &str) {
        let stamp = timestamp();
        let r = writeln!(self.log_txt, "{stamp} {line}");
        self.wrote("log.txt", r);
        if self.terminal && !self.quiet {
            self.clear_bar();
            crate::errln!("{line}");
        }
    }

    /// A warning: as `info`, and also on standard error when not a terminal.
    pub fn warn(&mut self, line: &str) {
        let r = writeln!(self.log_txt, "{} WARNING {line}", timestamp());
        self.wrote("log.txt", r);
        self.clear_bar();
        crate::errln!("warning: {line}");
    }

    /// One logged training step: stdout.json (and standard output when not on
    /// a terminal), log.txt. (Its TensorBoard scalars are `scalars`.)
    pub fn step(&mut self, record: &Value) {
        let line = record.to_string();
        let r = writeln!(self.stdout_json, "{line}");
        self.wrote("stdout.json", r);
        let r = writeln!(self.log_txt, "{} {}", timestamp(), step_text(record));
        self.wrote("log.txt", r);
        if !self.terminal && !self.quiet {
            crate::outln!("{line}");
        }
    }

    /// Whether TensorBoard events are written.
    pub fn has_tensorboard(&self) -> bool {
        self.tensorboard.is_some()
    }

    /// TensorBoard scalars at `step` (nothing when TensorBoard is off).
    pub fn scalars(&mut self, step: i64, values: &[(&str, f64)]) {
        if let Some(tb) = &mut self.tensorboard {
            let values: Vec<(&str, f32)> = values.iter().map(|&(t, v)| (t, v as f32)).collect();
            let r = tb.scalars(step, &values);
            self.wrote("the TensorBoard events", r);
        }
    }

    /// A TensorBoard histogram of `values` at `step` (nothing when off).
    pub fn histogram(&mut self, step: i64, tag: &str, values: &[f32]) {
        if let Some(tb) = &mut self.tensorboard {
            let r = tb.histogram(step, tag, values);
            self.wrote("the TensorBoard events", r);
        }
    }

    /// The progress bar (terminal only): one line redrawn in place.
    pub fn progress(&mut self, p: &Progress) {
        if !self.terminal || self.quiet {
            return;
        }
        let Progress { epoch, epochs, done, total, loss, lr, images_per_sec: ips, eta_seconds: eta } = *p;
        const WIDTH: u64 = 24;
        let filled = (done * WIDTH).checked_div(total).unwrap_or(0).min(WIDTH);
        let bar: String = (0..WIDTH).map(|i| if i < filled { '#' } else { '.' }).collect();
        crate::err!(
            "\r\x1b[2Kepoch {}/{epochs} [{bar}] {done}/{total}  loss {loss:.4}  lr {lr:.3e}  {ips:.0} img/s  ETA {}",
            epoch + 1,
            human_duration(eta)
        );
        self.bar_shown = true;
    }

    /// One phase's meters: metrics.json (one line), log.txt, TensorBoard.
    pub fn phase(&mut self, record: &Value) {
        let r = writeln!(self.metrics_json, "{record}");
        self.wrote("metrics.json", r);
        // log.txt keeps the record whole; a person reads one line.
        let r = writeln!(self.log_txt, "{} metrics: {record}", timestamp());
        self.wrote("log.txt", r);
        self.last_phase = Some(phase_text(record));
        if self.terminal && !self.quiet {
            self.clear_bar();
            crate::errln!("{}", phase_text(record));
        }
        // VISSL's tags, `{Training|Testing}/{meter}_{metric}_Output_{i}`,
        // at the train phase's index (SSLTensorboardHook.on_phase_end).
        let step = record["train_phase_idx"].as_i64().unwrap_or(0);
        let mut values = Vec::new();
        for (key, prefix) in [("train_accuracy_list_meter", "Training"), ("test_accuracy_list_meter", "Testing")] {
            if let Some(Value::Object(ks)) = record.get(key) {
                for (metric, per) in ks {
                    for (output, v) in per.as_object().into_iter().flatten() {
                        if let Some(v) = v.as_f64() {
                            values.push((format!("{prefix}/accuracy_list_meter_{metric}_Output_{output}"), v));
                        }
                    }
                }
            }
        }
        let values: Vec<(&str, f64)> = values.iter().map(|(t, v)| (t.as_str(), *v)).collect();
        self.scalars(step, &values);
    }

    /// The last phase's line, if a phase ended.
    pub fn last_phase_text(&self) -> Option<String> {
        self.last_phase.clone()
    }

    /// Flushes everything to disk (before a checkpoint and at the end).
    pub fn flush(&mut self) {
        let r = self.log_txt.flush();
        self.wrote("log.txt", r);
        let r = self.stdout_json.flush();
        self.wrote("stdout.json", r);
        let r = self.metrics_json.flush();
        self.wrote("metrics.json", r);
        if let Some(tb) = &mut self.tensorboard {
            let r = tb.flush();
            self.wrote("the TensorBoard events", r);
        }
    }

    /// Ends the progress line.
    pub fn end_progress(&mut self) {
        if self.bar_shown {
            crate::errln!();
            self.bar_shown = false;
        }
    }
}

fn step_text(r: &Value) -> String {
    format!(
        "ep {} iter {} loss {:.5} lr {:.6e} images/s {:.1} eta {}",
        r["epoch"],
        r["iteration"],
        r["loss"].as_f64().unwrap_or(f64::NAN),
        r["lr"].as_f64().unwrap_or(f64::NAN),
        r["images_per_sec"].as_f64().unwrap_or(0.0),
        human_duration(r["eta_seconds"].as_f64().unwrap_or(0.0))
    )
}

/// A phase's record as one line: `epoch 3 val top-1 84.4 %  top-5 99.9 %`,
/// `epoch 3 train loss 0.5321  top-1 80.1 %`; with several outputs (heads)
/// each value is named by its output: `top-1 84.4 % (0), 80.2 % (1)`.
pub fn phase_text(r: &Value) -> String {
    let epoch = r["train_phase_idx"].as_u64().map_or("?".to_string(), |e| (e + 1).to_string());
    let (split, meters) = match (r.get("test_accuracy_list_meter"), r.get("train_accuracy_list_meter")) {
        (Some(m), _) => ("val", Some(m)),
        (None, m) => ("train", m),
    };
    let mut parts = Vec::new();
    if let Some(loss) = r["loss"].as_f64() {
        parts.push(format!("loss {loss:.4}"));
    }
    let mut tops: Vec<(u64, String)> = meters
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, per)| {
            let k: u64 = k.strip_prefix("top_")?.parse().ok()?;
            let per = per.as_object()?;
            let values: Vec<String> = per
                .iter()
                .filter_map(|(output, v)| {
                    let v = v.as_f64()?;
                    Some(if per.len() > 1 { format!("{v:.1} % ({output})") } else { format!("{v:.1} %") })
                })
                .collect();
            Some((k, format!("top-{k} {}", values.join(", "))))
        })
        .collect();
    tops.sort();
    parts.extend(tops.into_iter().map(|(_, t)| t));
    format!("epoch {epoch} {split} {}", parts.join("  "))
}

/// Python's `str(datetime.timedelta(seconds=int(s)))`, as VISSL writes its
/// `eta`: `0:03:05`, `1 day, 2:03:04`.
pub fn vissl_eta(s: f64) -> String {
    let s = s.max(0.0) as u64;
    let (days, rest) = (s / 86400, s % 86400);
    let hms = format!("{}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60);
    match days {
        0 => hms,
        1 => format!("1 day, {hms}"),
        d => format!("{d} days, {hms}"),
    }
}

/// `1h02m`, `3m05s`, `12s`.
pub fn human_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Seconds since the epoch, UTC, as `YYYY-MM-DD HH:MM:SS`.
fn timestamp() -> String {
    utc(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

/// `YYYY-MM-DD hh:mm:ss` (UTC) of unix time `secs`.
pub(crate) fn utc(secs: u64) -> String {
    let (days, rest) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_person_writes_them() {
        assert_eq!(human_duration(12.4), "12s");
        assert_eq!(human_duration(185.0), "3m05s");
        assert_eq!(human_duration(3720.0), "1h02m");
    }

    #[test]
    fn the_eta_is_written_as_python_writes_a_timedelta() {
        assert_eq!(vissl_eta(185.7), "0:03:05");
        assert_eq!(vissl_eta(3600.0 * 25.0 + 62.0), "1 day, 1:01:02");
        assert_eq!(vissl_eta(86400.0 * 3.0), "3 days, 0:00:00");
    }

    #[test]
    fn a_phase_reads_as_one_line() {
        let test = serde_json::json!({"iteration": 80, "phase_idx": 3, "train_phase_idx": 1,
            "test_accuracy_list_meter": {"top_5": {"0": 99.9}, "top_1": {"0": 84.4321}}});
        assert_eq!(phase_text(&test), "epoch 2 val top-1 84.4 %  top-5 99.9 %");
        let train = serde_json::json!({"iteration": 40, "phase_idx": 0, "train_phase_idx": 0, "loss": 1.23456,
            "train_accuracy_list_meter": {"top_1": {"0": 50.0, "lastCLS": 25.0}}});
        assert_eq!(phase_text(&train), "epoch 1 train loss 1.2346  top-1 50.0 % (0), 25.0 % (lastCLS)");
        // A record with no meter: the loss alone.
        let bare = serde_json::json!({"train_phase_idx": 4, "loss": 0.5});
        assert_eq!(phase_text(&bare), "epoch 5 train loss 0.5000");
    }

    #[test]
    fn records_go_to_their_files() {
        let dir = std::env::temp_dir().join(format!("tessera-logs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut log = RunLog::open(&dir, Some((dir.join("tensorboard"), Duration::from_secs(300))), true).unwrap();
        log.step(&serde_json::json!({"iteration": 3, "epoch": 0, "loss": 2.0, "lr": 0.001, "images_per_sec": 10.0, "eta_seconds": 5.0}));
        log.phase(&serde_json::json!({"iteration": 3, "phase_idx": 0, "train_phase_idx": 0, "train_accuracy_list_meter": {"top_1": {"0": 50.0, "lastCLS": 25.0}}}));
        log.flush();
        let stdout: Value =
            serde_json::from_str(std::fs::read_to_string(dir.join("stdout.json")).unwrap().trim()).unwrap();
        assert_eq!(stdout["iteration"], 3);
        let metrics = std::fs::read_to_string(dir.join("metrics.json")).unwrap();
        assert_eq!(metrics.lines().count(), 1);
        let text = std::fs::read_to_string(dir.join("log.txt")).unwrap();
        assert!(text.contains("ep 0 iter 3 loss 2.00000 lr 1.000000e-3 images/s 10.0 eta 5s"), "{text}");
        let tb: Vec<_> = std::fs::read_dir(dir.join("tensorboard")).unwrap().flatten().collect();
        assert_eq!(tb.len(), 1);
        assert!(tb[0].file_name().to_string_lossy().starts_with("events.out.tfevents."));
        // One scalar per output (head) of the meter.
        let events = String::from_utf8_lossy(&std::fs::read(tb[0].path()).unwrap()).into_owned();
        for tag in ["Training/accuracy_list_meter_top_1_Output_0", "Training/accuracy_list_meter_top_1_Output_lastCLS"]
        {
            assert!(events.contains(tag), "no {tag} in the events file");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
