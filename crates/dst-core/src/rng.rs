//! [`Rng`]: the project's seeded random stream (candle's CPU RNG cannot be seeded).
//!
//! SplitMix64: tiny, fast, portable, and good enough for masks and initialisation. Streams are
//! derived from `(seed, ids...)` so that a mask update at step `t` of layer `l` draws the same
//! numbers however the run got there (resumed, other thread count, other rank), as Google's
//! RigL does with its stateless per-(variable, step) seeds.

/// A seeded pseudo-random stream.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A stream from a seed.
    pub fn new(seed: u64) -> Self {
        Rng { state: mix(seed) }
    }

    /// A stream for `(seed, ids...)`, independent of every other tuple.
    pub fn derive(seed: u64, ids: &[u64]) -> Self {
        let mut s = mix(seed ^ 0x5851_F42D_4C95_7F2D);
        for &id in ids {
            s = mix(s ^ mix(id.wrapping_add(0x9E37_79B9_7F4A_7C15)));
        }
        Rng { state: s }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform in `[0, 1)` with 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return (v % n) as usize;
            }
        }
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `count` distinct values of `0..n`, ascending (partial Fisher–Yates).
    pub fn choose(&mut self, n: usize, count: usize) -> Vec<usize> {
        assert!(count <= n, "cannot choose {count} of {n}");
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..count {
            let j = i + self.below(n - i);
            idx.swap(i, j);
        }
        idx.truncate(count);
        idx.sort_unstable();
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(1).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::derive(1, &[2, 3]).next_u64(),
            Rng::derive(1, &[3, 2]).next_u64()
        );
        assert_ne!(
            Rng::derive(1, &[2]).next_u64(),
            Rng::derive(2, &[2]).next_u64()
        );
    }

    #[test]
    fn choose_is_distinct_sorted_and_uniformish() {
        let mut r = Rng::new(7);
        let mut hits = [0usize; 10];
        for _ in 0..2000 {
            let c = r.choose(10, 3);
            assert!(c.windows(2).all(|w| w[0] < w[1]));
            for i in c {
                hits[i] += 1;
            }
        }
        // Each index is chosen with probability 0.3: 600 ± a generous margin.
        assert!(hits.iter().all(|&h| (480..720).contains(&h)), "{hits:?}");
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut r = Rng::new(3);
        let xs: Vec<f64> = (0..20_000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
