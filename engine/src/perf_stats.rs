//! Timing reports VISSL's `HOOKS.PERF_STATS` asks for:
//! - `MONITOR_PERF_STATS`: the average train batch time and a breakdown of
//!   the step by section (LogPerfTimeMetricsHook) in log.txt, every
//!   `PERF_STAT_FREQUENCY` batches of a phase when that is above 0, else at
//!   the phase's end. tessera's sections: `read_sample` (waiting for the
//!   batch), `train_step` (the compiled forward, backward and update: one
//!   plan, so not split further), `meters`.
//! - `ROLLING_BTIME_FREQ` N > 0: each logged step record also carries
//!   `btime(Niters)(ms)` and `rolling_eta`, from the last N batch times
//!   (LogLossLrEtaHook).

use serde_json::Value;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The parts of a training step that are timed, in report order.
#[derive(Clone, Copy, Debug)]
pub enum Section {
    ReadSample,
    TrainStep,
    Meters,
}

const SECTIONS: [&str; 3] = ["read_sample", "train_step", "meters"];

pub struct PerfStats {
    /// `Some(freq)` when MONITOR_PERF_STATS (freq None: at phase ends only).
    monitor: Option<Option<u64>>,
    rolling: Option<usize>,
    phase_start: Instant,
    batches: u64,
    totals: [(Duration, u64); 3],
    recent: VecDeque<f64>,
}

impl PerfStats {
    pub fn of(cfg: &Value) -> PerfStats {
        let key = |k: &str| cfg.pointer(&format!("/HOOKS/PERF_STATS/{k}"));
        let positive = |k: &str| key(k).and_then(Value::as_i64).filter(|&n| n > 0).map(|n| n as u64);
        let monitor = key("MONITOR_PERF_STATS")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            .then(|| positive("PERF_STAT_FREQUENCY"));
        PerfStats {
            monitor,
            rolling: positive("ROLLING_BTIME_FREQ").map(|n| n as usize),
            phase_start: Instant::now(),
            batches: 0,
            totals: [(Duration::ZERO, 0); 3],
            recent: VecDeque::new(),
        }
    }

    /// A train phase starts: the breakdown restarts (VISSL: on_phase_start).
    pub fn phase_start(&mut self) {
        self.phase_start = Instant::now();
        self.batches = 0;
        self.totals = [(Duration::ZERO, 0); 3];
    }

    /// Time spent in `section`, since `since`.
    pub fn add(&mut self, section: Section, since: Instant) {
        let (total, count) = &mut self.totals[section as usize];
        *total += since.elapsed();
        *count += 1;
    }

    /// A batch ended after `seconds`; the report when one is due now.
    pub fn batch_done(&mut self, seconds: f64) -> Option<String> {
        self.batches += 1;
        if let Some(n) = self.rolling {
            self.recent.push_back(seconds);
            if self.recent.len() > n {
                self.recent.pop_front();
            }
        }
        match self.monitor {
            Some(Some(freq)) if self.batches.is_multiple_of(freq) => Some(self.report()),
            _ => None,
        }
    }

    /// The report at a phase's end, when one is due then.
    pub fn phase_end(&self) -> Option<String> {
        (self.monitor == Some(None) && self.batches > 0).then(|| self.report())
    }

    fn report(&self) -> String {
        let avg = self.phase_start.elapsed().as_secs_f64() / self.batches.max(1) as f64;
        let mut s = format!(
            "Average train batch time (ms) for {} batches: {}\nTrain step time breakdown:",
            self.batches,
            (avg * 1e3) as u64
        );
        for (name, (total, n)) in SECTIONS.iter().zip(&self.totals) {
            let mean = total.as_secs_f64() * 1e3 / (*n).max(1) as f64;
            s.push_str(&format!("\n  {name:<12} mean {mean:9.2} ms  total {:8.2} s  ({n} times)", total.as_secs_f64()));
        }
        s
    }

    /// The rolling keys of a logged step record, once N batch times are in:
    /// (`btime(Niters)(ms)`, its value, the ETA at that rate in seconds).
    pub fn rolling(&self, steps_left: u64) -> Option<(String, u64, f64)> {
        let n = self.rolling?;
        (self.recent.len() >= n).then(|| {
            let mean = self.recent.iter().sum::<f64>() / n as f64;
            (format!("btime({n}iters)(ms)"), (mean * 1e3) as u64, mean * steps_left as f64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_come_every_n_batches_or_at_phase_ends() {
        let mut every2 = PerfStats::of(&json!({"HOOKS": {"PERF_STATS": {"MONITOR_PERF_STATS": true,
            "PERF_STAT_FREQUENCY": 2, "ROLLING_BTIME_FREQ": -1}}}));
        every2.phase_start();
        assert!(every2.batch_done(0.1).is_none());
        let r = every2.batch_done(0.1).unwrap();
        assert!(r.starts_with("Average train batch time (ms) for 2 batches: "), "{r}");
        for name in SECTIONS {
            assert!(r.contains(name), "{r}");
        }
        assert!(every2.phase_end().is_none());
        let mut at_end = PerfStats::of(&json!({"HOOKS": {"PERF_STATS": {"MONITOR_PERF_STATS": true,
            "PERF_STAT_FREQUENCY": -1, "ROLLING_BTIME_FREQ": 3}}}));
        at_end.phase_start();
        assert!(at_end.batch_done(0.010).is_none());
        assert!(at_end.rolling(10).is_none(), "fewer than 3 batch times");
        at_end.batch_done(0.020);
        at_end.batch_done(0.030);
        at_end.batch_done(0.040);
        // The last 3: 20, 30, 40 ms.
        let (key, ms, eta) = at_end.rolling(10).unwrap();
        assert_eq!((key.as_str(), ms), ("btime(3iters)(ms)", 30));
        assert!((eta - 0.3).abs() < 1e-9);
        assert!(at_end.phase_end().unwrap().contains("for 4 batches"));
        let off = PerfStats::of(&json!({}));
        assert!(off.phase_end().is_none() && off.rolling(1).is_none());
    }
}
