//! Per-sample randomness that does not depend on worker threads or order.
//!
//! A counter-based generator, Philox4x32-10 (Salmon et al., "Parallel random
//! numbers: as easy as 1, 2, 3", SC 2011; the `tessera-philox` crate, checked
//! against Random123's known-answer vectors). Every (seed, epoch, sample index, stream) owns
//! its own sequence, so the augmentation of a sample is a pure function of its
//! key whatever thread computes it and in whatever order.
//!
//! Layout: Philox key = `seed + (epoch >> 16) * φ64`; counter =
//! `[draw, (epoch & 0xFFFF) << 16 | stream, index_lo, index_hi]`. For
//! epochs below 65536 and streams below 65536, distinct keys give disjoint
//! sequences; each sequence has 2^32 blocks of 4 words.

pub use tessera_philox::philox4x32_10;

/// Streams of `SampleRng` reserved for the data crate's own draws. A sample's
/// pipeline uses streams 0, 1, 2, ... (one per copy) of its key; these sit at
/// the top of the 16-bit stream space so that they never meet.
pub(crate) mod stream {
    /// MixUp/CutMix of copy position p of a batch: `COLLATE + p`.
    pub const COLLATE: u16 = 0x8000;
    /// DATA_LIMIT subset selection (key: DATA_LIMIT_SAMPLING.SEED).
    pub const DATA_LIMIT: u16 = 0xFFFD;
    /// Images of the `synthetic` data source (key: sample index only).
    pub const SYNTHETIC: u16 = 0xFFFE;
    /// The sampler's per-epoch permutation (key: sampler seed, epoch).
    pub const SAMPLER: u16 = 0xFFFF;
}

/// Identifies one sample of one epoch of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub seed: u64,
    pub epoch: u64,
    pub index: u64,
}

impl SampleKey {
    pub fn new(seed: u64, epoch: u64, index: u64) -> SampleKey {
        SampleKey { seed, epoch, index }
    }
}

/// The random stream of one copy of one sample (stream 0 is the decoded image;
/// copies made by ImgReplicatePil / ImgPilToMultiCrop get their own streams).
#[derive(Clone, Debug)]
pub struct SampleRng {
    key: [u32; 2],
    counter: [u32; 4],
    block: [u32; 4],
    used: usize,
}

impl SampleRng {
    pub fn new(key: SampleKey, stream: u16) -> SampleRng {
        let k = key.seed.wrapping_add((key.epoch >> 16).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let c1 = ((key.epoch as u32 & 0xFFFF) << 16) | stream as u32;
        SampleRng {
            key: [k as u32, (k >> 32) as u32],
            counter: [0, c1, key.index as u32, (key.index >> 32) as u32],
            block: [0; 4],
            used: 4,
        }
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            self.block = philox4x32_10(self.counter, self.key);
            self.counter[0] = self.counter[0].wrapping_add(1);
            self.used = 0;
        }
        let v = self.block[self.used];
        self.used += 1;
        v
    }

    pub fn next_u64(&mut self) -> u64 {
        (self.next_u32() as u64) << 32 | self.next_u32() as u64
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi) (`random.uniform` / `torch.empty(1).uniform_(lo, hi)`).
    pub fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [lo, hi] inclusive (`torch.randint(lo, hi + 1)`),
    /// unbiased (rejection sampling). `lo > hi` returns `lo`.
    pub fn int_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        let span = (hi - lo) as u64 + 1;
        // Reject the top partial bucket of 2^64 so every value is equally likely.
        let zone = u64::MAX - (u64::MAX % span + 1) % span;
        loop {
            let v = self.next_u64();
            if v <= zone {
                return lo + (v % span) as i64;
            }
        }
    }

    /// Uniform index in [0, n); `n == 0` returns 0.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.int_inclusive(0, n as i64 - 1) as usize
        }
    }

    /// Standard normal (Box–Muller; the second value is discarded so that
    /// every call consumes the same number of draws).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// N(mean, std²) (`random.gauss`).
    pub fn gauss(&mut self, mean: f64, std: f64) -> f64 {
        mean + std * self.normal()
    }

    /// Gamma(shape, 1) by Marsaglia and Tsang (2000); shape < 1 uses the
    /// `Gamma(a+1) * U^(1/a)` boost. Non-positive or non-finite shape gives NaN.
    pub fn gamma(&mut self, shape: f64) -> f64 {
        if !(shape > 0.0 && shape.is_finite()) {
            return f64::NAN;
        }
        if shape < 1.0 {
            let u = 1.0 - self.uniform();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = 1.0 - self.uniform();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// Beta(a, b) as X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b)
    /// (`np.random.beta`, used by the MixUp/CutMix collator).
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        if x + y == 0.0 {
            // Both underflowed (tiny shapes): the mass sits at 0 or 1 equally.
            return if self.uniform() < a / (a + b) { 1.0 } else { 0.0 };
        }
        x / (x + y)
    }

    /// A uniformly chosen element; `None` for an empty slice.
    pub fn choice<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len())])
        }
    }

    /// Fisher–Yates shuffle (every permutation equally likely, as `torch.randperm`).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_have_the_right_moments() {
        let mut rng = SampleRng::new(SampleKey::new(7, 0, 0), 0);
        let n = 200_000;
        let (mut su, mut sn, mut sn2, mut sb) = (0.0, 0.0, 0.0, 0.0);
        for _ in 0..n {
            su += rng.uniform();
            let z = rng.normal();
            sn += z;
            sn2 += z * z;
            sb += rng.beta(0.8, 0.8);
        }
        let n = n as f64;
        assert!((su / n - 0.5).abs() < 0.005, "uniform mean {}", su / n);
        assert!((sn / n).abs() < 0.01, "normal mean {}", sn / n);
        assert!((sn2 / n - 1.0).abs() < 0.02, "normal var {}", sn2 / n);
        assert!((sb / n - 0.5).abs() < 0.005, "beta mean {}", sb / n);
        let mut g = 0.0;
        for _ in 0..100_000 {
            g += rng.gamma(0.3);
        }
        assert!((g / 100_000.0 - 0.3).abs() < 0.01, "gamma(0.3) mean {}", g / 100_000.0);
    }

    #[test]
    fn integers_cover_the_range_uniformly() {
        let mut rng = SampleRng::new(SampleKey::new(1, 2, 3), 4);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            let v = rng.int_inclusive(3, 9);
            counts[(v - 3) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }
}
