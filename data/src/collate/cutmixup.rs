//! `cutmixup_collator` (`vissl/data/collators/cutmixup_collator.py`, VISSL's
//! port of timm's `Mixup`): MixUp / CutMix on the stacked images of each copy
//! position, with smoothed one-hot targets (reference 5.4).
//!
//! Each position gets its own draws (its own random stream), as VISSL calls
//! the Mixup object once per position. Sample i is mixed with sample n-1-i
//! (`x.flip(0)`), so n must be even. Arithmetic is f32 as torch's: mixed
//! value = `x * f32(λ) + x_flip * f32(1-λ)`, each product rounded, then the sum.
//! In `pair`/`elem` modes λ lives in a float32 array, so `1-λ` is taken in f32.

use serde_json::{Map, Value};

use crate::collate::BatchTensor;
use crate::config::did_you_mean;
use crate::error::{Error, Result};
use crate::rng::{stream, SampleKey, SampleRng};

/// How MixUp/CutMix parameters are shared (`mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MixMode {
    /// One λ and one choice for the whole batch (position).
    Batch,
    /// One per pair (i, n-1-i); both members mixed symmetrically.
    Pair,
    /// One per sample, mixed with an unmodified copy of its partner.
    Elem,
}

/// `ssl_method`: which collator lays out the mixed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMethod {
    Moco,
    Simclr,
    Swav,
}

/// The collator's parameters (COLLATE_FUNCTION_PARAMS), with timm's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct CutMixUp {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    /// Box sides as fractions of the image, `[min, max)`; forces
    /// `cutmix_alpha = 1` and λ correction, as timm does.
    pub cutmix_minmax: Option<[f64; 2]>,
    pub prob: f64,
    pub switch_prob: f64,
    pub mode: MixMode,
    pub correct_lam: bool,
    pub label_smoothing: f64,
    pub num_classes: usize,
    pub ssl_method: Option<SslMethod>,
}

impl Default for CutMixUp {
    fn default() -> CutMixUp {
        CutMixUp {
            mixup_alpha: 1.0,
            cutmix_alpha: 0.0,
            cutmix_minmax: None,
            prob: 1.0,
            switch_prob: 0.5,
            mode: MixMode::Batch,
            correct_lam: true,
            label_smoothing: 0.1,
            num_classes: 1000,
            ssl_method: None,
        }
    }
}

/// What was drawn for one mixing unit (the batch, a pair or a sample).
#[derive(Clone, Debug, PartialEq)]
pub struct MixUnit {
    /// The weight of the sample itself (after CutMix's area correction).
    pub lam: f64,
    /// CutMix box `[y_lo, y_hi, x_lo, x_hi)` copied from the partner; `None`
    /// for MixUp (or no mixing when `lam == 1`).
    pub bbox: Option<[usize; 4]>,
}

const KEYS: [&str; 10] = [
    "mixup_alpha",
    "cutmix_alpha",
    "cutmix_minmax",
    "prob",
    "switch_prob",
    "mode",
    "correct_lam",
    "label_smoothing",
    "num_classes",
    "ssl_method",
];

/// `rand_bbox` once the centre (cy, cx) is drawn: a box of sides
/// `int(H·√(1-λ))`, `int(W·√(1-λ))` centred there, clipped to the image.
pub fn cutmix_box(height: usize, width: usize, lam: f64, center: [usize; 2]) -> [usize; 4] {
    let ratio = (1.0 - lam).max(0.0).sqrt();
    let (cut_h, cut_w) = ((height as f64 * ratio) as i64, (width as f64 * ratio) as i64);
    let (cy, cx) = (center[0] as i64, center[1] as i64);
    let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    [
        clip(cy - cut_h / 2, height),
        clip(cy + cut_h / 2, height),
        clip(cx - cut_w / 2, width),
        clip(cx + cut_w / 2, width),
    ]
}

/// CutMix's corrected λ: `1 - box area / image area`.
pub fn box_lam(height: usize, width: usize, bbox: [usize; 4]) -> f64 {
    let area = bbox[1].saturating_sub(bbox[0]) * bbox[3].saturating_sub(bbox[2]);
    1.0 - area as f64 / (height * width) as f64
}

impl CutMixUp {
    /// Reads COLLATE_FUNCTION_PARAMS; `key` is its full config path.
    pub fn from_params(map: &Map<String, Value>, key: &str) -> Result<CutMixUp> {
        let err = |k: &str, message: String| Error::key(format!("{key}.{k}"), message);
        for k in map.keys() {
            if !KEYS.contains(&k.as_str()) {
                let hint = did_you_mean(k, KEYS).map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default();
                return Err(err(
                    k,
                    format!("unknown cutmixup_collator parameter{hint}; accepted: {}", KEYS.join(", ")),
                ));
            }
        }
        let get = |k: &str| map.get(k).filter(|v| !v.is_null());
        let number = |k: &str, default: f64| -> Result<f64> {
            match get(k) {
                None => Ok(default),
                Some(v) => {
                    v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| err(k, format!("expected a number, got {v}")))
                }
            }
        };
        let in_unit = |k: &str, default: f64| -> Result<f64> {
            let v = number(k, default)?;
            if (0.0..=1.0).contains(&v) {
                Ok(v)
            } else {
                Err(err(k, format!("{v} is outside [0, 1]")))
            }
        };
        let d = CutMixUp::default();
        let mut c = CutMixUp {
            mixup_alpha: number("mixup_alpha", d.mixup_alpha)?,
            cutmix_alpha: number("cutmix_alpha", d.cutmix_alpha)?,
            cutmix_minmax: None,
            prob: in_unit("prob", d.prob)?,
            switch_prob: in_unit("switch_prob", d.switch_prob)?,
            mode: d.mode,
            correct_lam: match get("correct_lam") {
                None => d.correct_lam,
                Some(v) => v.as_bool().ok_or_else(|| err("correct_lam", format!("expected True or False, got {v}")))?,
            },
            label_smoothing: in_unit("label_smoothing", d.label_smoothing)?,
            num_classes: d.num_classes,
            ssl_method: None,
        };
        for (k, v) in [("mixup_alpha", c.mixup_alpha), ("cutmix_alpha", c.cutmix_alpha)] {
            if v < 0.0 {
                return Err(err(k, format!("must be 0 (off) or positive, got {v}")));
            }
        }
        if let Some(v) = get("cutmix_minmax") {
            let pair = v.as_array().and_then(|a| match a.as_slice() {
                [lo, hi] => Some([lo.as_f64()?, hi.as_f64()?]),
                _ => None,
            });
            match pair {
                Some([lo, hi]) if (0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi) && lo < hi => {
                    c.cutmix_minmax = Some([lo, hi]);
                    c.cutmix_alpha = 1.0; // timm: "force cutmix alpha == 1.0 when minmax active"
                }
                _ => {
                    return Err(err("cutmix_minmax", format!("expected [min, max] with 0 <= min < max <= 1, got {v}")))
                }
            }
        }
        if let Some(v) = get("mode") {
            c.mode = match v.as_str() {
                Some("batch") => MixMode::Batch,
                Some("pair") => MixMode::Pair,
                Some("elem") => MixMode::Elem,
                _ => return Err(err("mode", format!("expected \"batch\", \"pair\" or \"elem\", got {v}"))),
            };
        }
        if let Some(v) = get("num_classes") {
            c.num_classes = crate::split_config::as_int(v)
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| err("num_classes", format!("expected a positive integer, got {v}")))?;
        }
        if let Some(v) = get("ssl_method") {
            c.ssl_method = Some(match v.as_str() {
                Some("moco") => SslMethod::Moco,
                Some("simclr") => SslMethod::Simclr,
                Some("swav") => SslMethod::Swav,
                _ => return Err(err("ssl_method", format!("expected \"moco\", \"simclr\" or \"swav\", got {v}"))),
            });
        }
        // timm would fail at the first mix with neither enabled (`lam_mix` unset).
        if c.prob > 0.0 && c.mixup_alpha == 0.0 && c.cutmix_alpha == 0.0 {
            return Err(err(
                "mixup_alpha",
                "one of mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax must be set".into(),
            ));
        }
        Ok(c)
    }

    /// λ and the MixUp/CutMix choice for one unit (`_params_per_batch`, or one
    /// element of `_params_per_elem`); `None` = not mixed (λ = 1).
    fn draw_lam(&self, rng: &mut SampleRng) -> Option<(f64, bool)> {
        if rng.uniform() >= self.prob {
            return None;
        }
        let (ma, ca) = (self.mixup_alpha, self.cutmix_alpha);
        let cutmix = if ma > 0.0 && ca > 0.0 { rng.uniform() < self.switch_prob } else { ca > 0.0 };
        let alpha = if cutmix { ca } else { ma };
        Some((rng.beta(alpha, alpha), cutmix))
    }

    /// The box of a CutMix unit and its λ (`cutmix_bbox_and_lam`).
    fn draw_box(&self, rng: &mut SampleRng, h: usize, w: usize, lam: f64) -> std::result::Result<MixUnit, String> {
        let bbox = match self.cutmix_minmax {
            // rand_bbox_minmax: sides ~ randint(int(H*min), int(H*max)), corner ~ randint(0, H - side).
            Some([lo, hi]) => {
                let side = |rng: &mut SampleRng, n: usize| -> std::result::Result<usize, String> {
                    let (a, b) = ((n as f64 * lo) as usize, (n as f64 * hi) as usize);
                    if a >= b {
                        return Err(format!(
                            "cutmix_minmax [{lo}, {hi}] leaves no box side to draw for an image side of {n}"
                        ));
                    }
                    Ok(a + rng.below(b - a))
                };
                let (ch, cw) = (side(rng, h)?, side(rng, w)?);
                let (yl, xl) = (rng.below(h - ch), rng.below(w - cw));
                [yl, yl + ch, xl, xl + cw]
            }
            None => {
                let (cy, cx) = (rng.below(h), rng.below(w));
                cutmix_box(h, w, lam, [cy, cx])
            }
        };
        let lam = if self.correct_lam || self.cutmix_minmax.is_some() { box_lam(h, w, bbox) } else { lam };
        Ok(MixUnit { lam, bbox: Some(bbox) })
    }

    /// Draws the units of one position: 1 (batch), n/2 (pair) or n (elem).
    pub fn draw(&self, rng: &mut SampleRng, n: usize, h: usize, w: usize) -> std::result::Result<Vec<MixUnit>, String> {
        let units = match self.mode {
            MixMode::Batch => 1,
            MixMode::Pair => n / 2,
            MixMode::Elem => n,
        };
        let mut out = Vec::with_capacity(units);
        for _ in 0..units {
            let unit = match self.draw_lam(rng) {
                None => MixUnit { lam: 1.0, bbox: None },
                Some((lam, cutmix)) => {
                    // pair/elem keep λ in a float32 array (`lam_mix.astype(np.float32)`).
                    let lam = if self.mode == MixMode::Batch { lam } else { lam as f32 as f64 };
                    if lam == 1.0 {
                        MixUnit { lam, bbox: None }
                    } else if cutmix {
                        let mut u = self.draw_box(rng, h, w, lam)?;
                        if self.mode != MixMode::Batch {
                            u.lam = u.lam as f32 as f64;
                        }
                        u
                    } else {
                        MixUnit { lam, bbox: None }
                    }
                }
            };
            out.push(unit);
        }
        Ok(out)
    }

    /// f32 weights (λ, 1-λ) as torch applies them.
    fn weights(&self, lam: f64) -> (f32, f32) {
        match self.mode {
            MixMode::Batch => (lam as f32, (1.0 - lam) as f32),
            MixMode::Pair | MixMode::Elem => (lam as f32, 1.0f32 - lam as f32),
        }
    }

    /// `mixup_target`: `λ·onehot_s(y) + (1-λ)·onehot_s(y_flip)` with off =
    /// s/K and on = 1 - s + s/K, per sample (`lams[i]`, one per label), `[n * K]`.
    pub fn targets(&self, labels: &[i64], lams: &[f64]) -> Vec<f32> {
        let k = self.num_classes;
        let off = self.label_smoothing / k as f64;
        let (off32, on32) = (off as f32, (1.0 - self.label_smoothing + off) as f32);
        let n = labels.len();
        let mut out = Vec::with_capacity(n * k);
        for i in 0..n {
            let (a, b) = self.weights(lams[i]);
            let (y1, y2) = (labels[i], labels[n - 1 - i]);
            for c in 0..k as i64 {
                let v1 = if c == y1 { on32 } else { off32 };
                let v2 = if c == y2 { on32 } else { off32 };
                out.push(v1 * a + v2 * b);
            }
        }
        out
    }

    /// Mixes `x` (one position, `[n, C, H, W]`) with the drawn `units` and
    /// returns the soft targets `[n * K]`.
    pub fn mix(&self, x: &mut BatchTensor, labels: &[i64], units: &[MixUnit]) -> std::result::Result<Vec<f32>, String> {
        let n = x.shape[0];
        if !n.is_multiple_of(2) {
            return Err(format!(
                "cutmixup_collator pairs sample i with sample n-1-i and needs an even batch, got {n} samples \
                 (use an even BATCHSIZE_PER_REPLICA and DROP_LAST: True)"
            ));
        }
        if labels.len() != n {
            return Err(format!("{} labels for {n} samples", labels.len()));
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l < 0 || l as usize >= self.num_classes) {
            return Err(format!(
                "label {l} of sample {i} is outside num_classes {} (COLLATE_FUNCTION_PARAMS.num_classes); \
                 SSL configs use LABEL_TYPE: zero with this collator",
                self.num_classes
            ));
        }
        let expected = match self.mode {
            MixMode::Batch => 1,
            MixMode::Pair => n / 2,
            MixMode::Elem => n,
        };
        if units.len() != expected {
            return Err(format!(
                "{} mixing units for mode {:?} and {n} samples, expected {expected}",
                units.len(),
                self.mode
            ));
        }
        let (c, h, w) = (x.shape[1], x.shape[2], x.shape[3]);
        for u in units {
            if let Some(b) = u.bbox {
                if b[0] > b[1] || b[1] > h || b[2] > b[3] || b[3] > w {
                    return Err(format!("CutMix box {b:?} does not fit a {h}x{w} image"));
                }
            }
        }
        let orig = x.clone();
        // The unit of sample i and the partners it mixes into.
        let mut lams = vec![1.0; n];
        for i in 0..n {
            let u = match self.mode {
                MixMode::Batch => &units[0],
                MixMode::Elem => &units[i],
                // `_mix_pair` draws for i < n/2 and mixes both i and n-1-i with it.
                MixMode::Pair => &units[i.min(n - 1 - i)],
            };
            lams[i] = u.lam;
            if u.lam == 1.0 && u.bbox.is_none() {
                continue;
            }
            let j = n - 1 - i;
            let (src, dst) = (orig.sample(j), x.sample_mut(i));
            match u.bbox {
                Some([yl, yh, xl, xh]) => {
                    for ch in 0..c {
                        for y in yl..yh {
                            let row = (ch * h + y) * w;
                            dst[row + xl..row + xh].copy_from_slice(&src[row + xl..row + xh]);
                        }
                    }
                }
                None => {
                    let (a, b) = self.weights(u.lam);
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = *d * a + *s * b;
                    }
                }
            }
        }
        Ok(self.targets(labels, &lams))
    }

    /// One position of one batch: draws from the stream of (key, position),
    /// mixes `x` in place, returns the soft targets `[n * K]`.
    pub(crate) fn apply(
        &self,
        x: &mut BatchTensor,
        labels: &[i64],
        key: SampleKey,
        position: usize,
    ) -> std::result::Result<Vec<f32>, String> {
        if !x.shape[0].is_multiple_of(2) {
            // Checked before drawing, as timm asserts first.
            return self.mix(x, labels, &[]);
        }
        let stream = stream::COLLATE.wrapping_add(position as u16);
        let mut rng = SampleRng::new(key, stream);
        let units = self.draw(&mut rng, x.shape[0], x.shape[2], x.shape[3])?;
        self.mix(x, labels, &units)
    }
}
