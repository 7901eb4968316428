//! `accuracy_list_meter` (reference 8.3): one ClassyVision AccuracyMeter per
//! model output, top-k for each k of `topk_values`.
//!
//! A sample scores, for each k, the largest target mass among its k highest
//! predictions: 1 or 0 for hard labels (standard top-k), and a fraction for
//! MixUp/CutMix soft targets, as VISSL's training meter does. The value is
//! `round(score / samples, 6) * 100`.
//!
//! Meters are keyed by output index, or by name when the config gives names
//! (VISSL names them after the linear-evaluation features).

use serde_json::{json, Map, Value};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AccuracyListMeter {
    pub topk: Vec<usize>,
    /// Per output, per k: summed scores.
    scores: Vec<Vec<f64>>,
    samples: Vec<u64>,
    /// One key per meter in the JSON form (empty: the output index).
    #[serde(default)]
    names: Vec<String>,
}

/// What one sample's target is.
pub enum Target<'a> {
    /// A class index.
    Class(usize),
    /// A distribution over classes (soft, mixed or smoothed labels).
    Soft(&'a [f32]),
}

impl AccuracyListMeter {
    pub fn new(num_meters: usize, topk: Vec<usize>) -> Self {
        AccuracyListMeter {
            scores: vec![vec![0.0; topk.len()]; num_meters],
            samples: vec![0; num_meters],
            topk,
            names: Vec::new(),
        }
    }

    /// Names the meters (one name each) in the JSON form.
    pub fn with_names(mut self, names: Vec<String>) -> Self {
        assert_eq!(names.len(), self.num_meters(), "one name per meter");
        self.names = names;
        self
    }

    /// The JSON key of meter `m`.
    pub fn key(&self, m: usize) -> String {
        self.names.get(m).cloned().unwrap_or_else(|| m.to_string())
    }

    /// Whether the counts have the meter's layout (one score per k for each
    /// output, one sample count per output, no name or one per output) and
    /// every score is a finite count: a meter read from a checkpoint is
    /// checked before it is used.
    pub fn is_consistent(&self) -> bool {
        self.samples.len() == self.scores.len()
            && self.scores.iter().all(|s| s.len() == self.topk.len())
            && (self.names.is_empty() || self.names.len() == self.scores.len())
            && self.scores.iter().flatten().all(|s| s.is_finite() && *s >= 0.0)
    }

    pub fn num_meters(&self) -> usize {
        self.scores.len()
    }

    /// Every count as one vector (for a sum across the ranks of a run).
    pub fn counts(&self) -> Vec<f64> {
        self.scores.iter().flatten().copied().chain(self.samples.iter().map(|&n| n as f64)).collect()
    }

    /// Puts back counts from `counts` (the same layout).
    pub fn set_counts(&mut self, counts: &[f64]) {
        let mut it = counts.iter();
        for s in self.scores.iter_mut().flatten() {
            *s = *it.next().expect("counts of this meter");
        }
        for n in &mut self.samples {
            *n = it.next().expect("counts of this meter").round() as u64;
        }
    }

    pub fn reset(&mut self) {
        self.scores.iter_mut().for_each(|s| s.fill(0.0));
        self.samples.fill(0);
    }

    /// Adds a batch of `logits` [n, classes] (row-major) of output `meter`
    /// with one target per row.
    pub fn update(&mut self, meter: usize, logits: &[f32], classes: usize, targets: &[Target]) {
        assert_eq!(logits.len(), classes * targets.len(), "one row of logits per target");
        let kmax = self.topk.iter().copied().max().unwrap_or(0).min(classes);
        let mut order: Vec<usize> = (0..classes).collect();
        for (row, target) in logits.chunks(classes).zip(targets) {
            // torch.topk: highest first; equal values keep the lower index first.
            order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let mass = |c: usize| -> f64 {
                match target {
                    Target::Class(t) => f64::from(u8::from(c == *t)),
                    Target::Soft(p) => p[c] as f64,
                }
            };
            let mut best = f64::NEG_INFINITY;
            let mut best_at = Vec::with_capacity(kmax);
            for &c in &order[..kmax] {
                best = best.max(mass(c));
                best_at.push(best);
            }
            for (i, &k) in self.topk.iter().enumerate() {
                let k = k.min(classes);
                if k > 0 {
                    self.scores[meter][i] += best_at[k - 1];
                }
            }
            self.samples[meter] += 1;
        }
    }

    /// Percent per output and k.
    pub fn value(&self, meter: usize, k_index: usize) -> f64 {
        let n = self.samples[meter];
        if n == 0 {
            return 0.0;
        }
        let frac = self.scores[meter][k_index] / n as f64;
        // VISSL's round(frac, 6) * 100, without its binary noise (81.89999...).
        (frac * 1e6).round() / 1e4
    }

    /// `{"top_1": {"0": 87.5}, "top_5": {"0": 99.0}}`, VISSL's metrics.json form.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        for (i, k) in self.topk.iter().enumerate() {
            let per: Map<String, Value> =
                (0..self.num_meters()).map(|m| (self.key(m), json!(self.value(m, i)))).collect();
            out.insert(format!("top_{k}"), Value::Object(per));
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_labels_give_standard_top_k() {
        let mut m = AccuracyListMeter::new(1, vec![1, 2]);
        // Row 0: best is class 2 (target 2): top-1 hit. Row 1: best 0, second 1 (target 1): top-2 hit only.
        // Row 2: target 0 ranks last: no hit.
        let logits = [0.1, 0.2, 0.9, 0.8, 0.5, 0.1, 0.3, 0.5, 0.4];
        m.update(0, &logits, 3, &[Target::Class(2), Target::Class(1), Target::Class(0)]);
        assert_eq!(m.value(0, 0), 33.3333);
        assert_eq!(m.value(0, 1), 66.6667);
        assert_eq!(m.to_json(), json!({"top_1": {"0": 33.3333}, "top_2": {"0": 66.6667}}));
    }

    #[test]
    fn soft_targets_score_the_largest_mass_among_the_top_k() {
        let mut m = AccuracyListMeter::new(1, vec![1, 5]);
        let mix = [0.7f32, 0.0, 0.3];
        // Predicts class 2 first (mass 0.3), class 0 second (0.7).
        m.update(0, &[0.2, 0.1, 0.9], 3, &[Target::Soft(&mix)]);
        assert!((m.value(0, 0) - 30.0).abs() < 1e-9);
        // k = 5 > 3 classes: every class counts.
        assert!((m.value(0, 1) - 70.0).abs() < 1e-9);
    }

    #[test]
    fn named_meters_report_under_their_names() {
        let mut m = AccuracyListMeter::new(2, vec![1]).with_names(vec!["concatCLS4".into(), "lastCLS".into()]);
        m.update(0, &[0.9, 0.1], 2, &[Target::Class(0)]);
        m.update(1, &[0.9, 0.1], 2, &[Target::Class(1)]);
        assert_eq!(m.to_json(), json!({"top_1": {"concatCLS4": 100.0, "lastCLS": 0.0}}));
    }

    #[test]
    fn ties_rank_the_lower_class_first() {
        let mut m = AccuracyListMeter::new(2, vec![1]);
        m.update(1, &[0.5, 0.5], 2, &[Target::Class(0)]);
        m.update(1, &[0.5, 0.5], 2, &[Target::Class(1)]);
        assert_eq!(m.value(1, 0), 50.0);
        assert_eq!(m.value(0, 0), 0.0);
        m.reset();
        assert_eq!(m.value(1, 0), 0.0);
    }
}
