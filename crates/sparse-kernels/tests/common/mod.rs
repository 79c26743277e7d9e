//! Random sparse weights for the kernel tests.
#![allow(dead_code)]

use sparse_formats::{Condensed, Csr, Mask, NmPattern, NmSparse};

/// splitmix64: a tiny seeded generator so that failures reproduce from the proptest seed.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    pub fn choose(&mut self, n: usize, count: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..count {
            let j = i + self.below(n - i);
            idx.swap(i, j);
        }
        let mut out = idx[..count].to_vec();
        out.sort_unstable();
        out
    }
}

fn masked(rng: &mut Rng, mask: &Mask, zero_every: usize) -> Vec<f32> {
    mask.as_slice()
        .iter()
        .map(|&b| {
            if !b || (zero_every > 0 && rng.below(zero_every) == 0) {
                0.0
            } else {
                rng.f()
            }
        })
        .collect()
}

/// A condensed weight with `k` per active row and `ablate` empty rows.
pub fn condensed(
    rng: &mut Rng,
    rows: usize,
    fan_in: usize,
    k: usize,
    ablate: usize,
    bias: bool,
) -> (Condensed, Vec<f32>) {
    let mut mask = Mask::zeros(rows, fan_in);
    let ablated = rng.choose(rows, ablate);
    for r in (0..rows).filter(|r| !ablated.contains(r)) {
        for c in rng.choose(fan_in, k) {
            mask.set(r, c, true);
        }
    }
    let w = masked(rng, &mask, 0);
    let b = bias.then(|| rng.vec(rows));
    let c = Condensed::from_dense(rows, fan_in, &w, &mask, b.as_deref()).unwrap();
    (c, w)
}

/// An N:M weight; some kept values are exactly 0.
pub fn nm(rng: &mut Rng, rows: usize, fan_in: usize, pattern: NmPattern) -> (NmSparse, Vec<f32>) {
    let mut mask = Mask::zeros(rows, fan_in);
    for r in 0..rows {
        for g in 0..pattern.groups(fan_in) {
            for p in rng.choose(pattern.m, pattern.n) {
                mask.set(r, pattern.column(g, p), true);
            }
        }
    }
    let w = masked(rng, &mask, 5);
    (
        NmSparse::from_dense(rows, fan_in, pattern, &w, &mask).unwrap(),
        w,
    )
}

/// A CSR weight with about `density` of entries, some rows empty.
pub fn csr(rng: &mut Rng, rows: usize, fan_in: usize, density: f64) -> (Csr, Vec<f32>) {
    let nnz = ((rows * fan_in) as f64 * density) as usize;
    let mut mask = Mask::zeros(rows, fan_in);
    for i in rng.choose(rows * fan_in, nnz) {
        mask.set(i / fan_in, i % fan_in, true);
    }
    let w = masked(rng, &mask, 0);
    (Csr::from_dense(rows, fan_in, &w, &mask).unwrap(), w)
}
