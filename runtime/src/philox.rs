//! Philox4x32-10, the counter-based generator of Salmon et al., "Parallel
//! random numbers: as easy as 1, 2, 3" (SC 2011). Every random draw of a
//! training step (dropout and drop-path masks, augmentations) is a pure
//! function of (seed, step, op, element index), so the CPU and GPU backends
//! draw identical masks and a resumed run repeats its numbers.

pub use tessera_philox::philox4x32_10;

/// A stream of draws for one (seed, step, op): element `i` reads counter
/// block `i / 4`, word `i % 4`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream {
    key: [u32; 2],
    step: u64,
    op: u32,
}

impl Stream {
    pub fn new(seed: u64, step: u64, op: u32) -> Self {
        Stream { key: [seed as u32, (seed >> 32) as u32], step, op }
    }

    /// The 32-bit draw for element `index`.
    pub fn u32_at(&self, index: u64) -> u32 {
        let block = index / 4;
        let ctr = [block as u32, (block >> 32) as u32 ^ self.op, self.step as u32, (self.step >> 32) as u32];
        philox4x32_10(ctr, self.key)[(index % 4) as usize]
    }

    /// A uniform draw in [0, 1) with 24 bits of precision (exact in f32).
    pub fn uniform_at(&self, index: u64) -> f32 {
        (self.u32_at(index) >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Bernoulli(keep): true with probability `keep` (a dropout keep mask).
    pub fn keep_at(&self, index: u64, keep: f32) -> bool {
        self.uniform_at(index) < keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_keyed_by_seed_step_and_op() {
        let a = Stream::new(7, 3, 1);
        assert_eq!(a.u32_at(10), Stream::new(7, 3, 1).u32_at(10));
        assert_ne!(a.u32_at(10), Stream::new(8, 3, 1).u32_at(10));
        assert_ne!(a.u32_at(10), Stream::new(7, 4, 1).u32_at(10));
        assert_ne!(a.u32_at(10), Stream::new(7, 3, 2).u32_at(10));
        assert_ne!(a.u32_at(10), a.u32_at(11));
    }

    #[test]
    fn uniform_draws_have_the_right_mean_and_keep_rate() {
        let s = Stream::new(0, 0, 0);
        let n = 200_000u64;
        let mean: f64 = (0..n).map(|i| s.uniform_at(i) as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        let kept = (0..n).filter(|&i| s.keep_at(i, 0.9)).count() as f64 / n as f64;
        assert!((kept - 0.9).abs() < 0.005, "{kept}");
        assert!((0..n).all(|i| (0.0..1.0).contains(&s.uniform_at(i))));
    }
}
