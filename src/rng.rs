//! Counter-based randomness: every random choice is a pure function of
//! `(run seed, stream, index)`, so the global step alone says where a run is and a resumed
//! run draws exactly what an uninterrupted one would. No RNG state needs saving.

/// Independent purposes draw from separate streams so adding one never shifts another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Model initialisation.
    Init = 1,
    /// Order of training samples within an epoch.
    Shuffle = 2,
    /// Start offset of text windows within an epoch.
    WindowOffset = 3,
    /// Backend RNG (dropout) re-seeded at every optimizer step.
    StepNoise = 4,
    /// Train/validation split of JSONL examples.
    Split = 5,
    /// Sampling during generation.
    Sampling = 6,
    /// The random sets of `polychromic_rl`'s sampled marginal advantages.
    SetSampling = 7,
    /// Replies sampled by the held-out evaluation during training (the same every time, so
    /// the curve compares checkpoints, not draws).
    EvalSampling = 8,
}

/// SplitMix64 finaliser: a strong 64-bit mix, good enough to derive independent seeds.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed for draw `index` of `stream` in a run seeded with `seed`.
pub fn derive_seed(seed: u64, stream: Stream, index: u64) -> u64 {
    mix64(mix64(seed ^ mix64(stream as u64)) ^ index)
}

/// A small, fast, seedable generator (SplitMix64 sequence) for shuffles and sampling.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0.wrapping_sub(0x9E37_79B9_7F4A_7C15))
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)`; `n` must be > 0. Lemire's multiply-shift (bias < 2^-64·n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A permutation of `0..n` determined by `seed`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_reproducible_and_complete() {
        let a = permutation(1000, 7);
        assert_eq!(a, permutation(1000, 7));
        assert_ne!(a, permutation(1000, 8));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn streams_are_independent() {
        assert_ne!(derive_seed(1, Stream::Shuffle, 0), derive_seed(1, Stream::Split, 0));
        assert_ne!(derive_seed(1, Stream::Shuffle, 0), derive_seed(1, Stream::Shuffle, 1));
    }

    #[test]
    fn uniform_draws_stay_in_range() {
        let mut r = SplitMix64::new(3);
        for _ in 0..10_000 {
            assert!(r.below(7) < 7);
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
        }
    }
}
