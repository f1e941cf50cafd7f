//! Zipf sampling for the skewed phase: rank k of n (0-based here) is drawn with probability
//! proportional to (k + 1)^-s, by inverse transform over the cumulative weights (n is at most the
//! socket count: 10,000 weights, 80 KB), with SplitMix64 as the uniform source, seeded so that every
//! run draws the same sequence. Small enough to write out rather than take a crate for.

/// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit state, one add and three xor-shift-multiplies per
/// draw; passes BigCrush, plenty for choosing users.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1): the top 53 bits as a double's mantissa.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A Zipf distribution over ranks `0..n` with exponent `s`.
pub struct Zipf {
    /// `cdf[k]`: the sum of the weights of ranks `0..=k` (unnormalised; the last is the total).
    cdf: Vec<f64>,
}

impl Zipf {
    /// `n` ranks (at least one), exponent `s`.
    pub fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cdf = (1..=n.max(1))
            .map(|k| {
                total += (k as f64).powf(-s);
                total
            })
            .collect();
        Self { cdf }
    }

    /// A rank, 0 (the most frequent) to n - 1.
    pub fn sample(&self, rng: &mut SplitMix64) -> usize {
        let total = self.cdf.last().copied().unwrap_or(1.0);
        let u = rng.next_f64() * total;
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }

    /// The probability of `rank`.
    pub fn probability(&self, rank: usize) -> f64 {
        let total = self.cdf.last().copied().unwrap_or(1.0);
        let below = if rank == 0 { 0.0 } else { self.cdf[rank - 1] };
        self.cdf.get(rank).map_or(0.0, |c| (c - below) / total)
    }
}
