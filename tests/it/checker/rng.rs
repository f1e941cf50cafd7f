//! The run's one source of randomness: SplitMix64, seeded from the run's seed. Each task (the
//! schedule, each producer, each client) gets a stream of its own derived from the seed and its
//! name, so its choices depend on the seed alone, not on how the tasks interleave.

/// A SplitMix64 generator (Steele, Lea and Flood): tiny, fast, and plenty for choosing faults.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// The stream named `name`, `index` of the run seeded with `seed`.
    pub fn stream(seed: u64, name: &str, index: u64) -> Self {
        let label = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = Self(seed ^ label);
        rng.0 ^= rng.next_u64().wrapping_add(index);
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is negligible for the small n used here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// One of `items` (not empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// `items` in a random order.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn one_seed_one_sequence_and_streams_differ() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::stream(7, "client", 1).next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut one = Rng::stream(7, "client", 1);
        let mut two = Rng::stream(7, "client", 2);
        assert_ne!(one.next_u64(), two.next_u64());
        let mut r = Rng::stream(7, "x", 0);
        assert!((0..1000).all(|_| (3..=5).contains(&r.between(3, 5))));
    }

    #[test]
    fn chances_picks_and_shuffles_are_fair_enough_and_complete() {
        let mut r = Rng::stream(11, "x", 0);
        let hits = (0..10_000).filter(|_| r.chance(0.25)).count();
        assert!((2_000..3_000).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| r.chance(0.0)));
        let items = [1, 2, 3];
        let mut seen = [false; 3];
        for _ in 0..100 {
            seen[*r.pick(&items) as usize - 1] = true;
        }
        assert_eq!(seen, [true; 3]);
        let mut all: Vec<u32> = (0..20).collect();
        r.shuffle(&mut all);
        assert_ne!(all, (0..20).collect::<Vec<_>>());
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
    }
}
