//! The mask update's scans over whole layers, compiled for AVX-512 and AVX2 beside the
//! baseline x86-64 build (SSE2) and chosen at run time.
//!
//! The crate is built for baseline x86-64, so without this its vectorised loops use 4-lane
//! SSE2, and SSE2 has no unsigned 32-bit compare or max (each is emulated in several
//! instructions). Each scan here is one `#[inline(always)]` body compiled three times by
//! [`multiversion!`]; the bodies use only integer and comparison operations, so every variant
//! gives the same result bit for bit (the update tests run whichever this CPU picks, and
//! `DST_CORE_SIMD=baseline` forces the baseline one).

use std::sync::OnceLock;

use crate::select::abs_key;

/// The instruction set the scans run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Baseline,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
}

/// The best level this CPU supports (or `DST_CORE_SIMD=baseline|avx2`, if supported); computed
/// once per process.
pub(crate) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            match std::env::var("DST_CORE_SIMD").ok().as_deref() {
                Some("baseline") => Level::Baseline,
                Some("avx2") if avx2 => Level::Avx2,
                _ if avx512 => Level::Avx512,
                _ if avx2 => Level::Avx2,
                _ => Level::Baseline,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Level::Baseline
    })
}

/// `fn name(args) -> ret` calling `body(args)` compiled for the CPU's [`level`].
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($a:ident : $t:ty),* $(,)?) -> $r:ty => $body:ident) => {
        $(#[$m])*
        #[allow(clippy::unused_unit)]
        pub(crate) fn $name($($a: $t),*) -> $r {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
                #[allow(clippy::unused_unit)]
                unsafe fn avx512($($a: $t),*) -> $r {
                    $body($($a),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::unused_unit)]
                unsafe fn avx2($($a: $t),*) -> $r {
                    $body($($a),*)
                }
                match level() {
                    // SAFETY: `level` returns a variant only where the CPU supports it.
                    Level::Avx512 => return unsafe { avx512($($a),*) },
                    Level::Avx2 => return unsafe { avx2($($a),*) },
                    Level::Baseline => {}
                }
            }
            $body($($a),*)
        }
    };
}

/// One chunk of pass 1 of the fused SRigL update: the number of active nonzero weights,
/// whether the chunk breaks the fused path's contract (a NaN weight, or a nonzero inactive
/// one), and the active entries' offsets in the chunk, ascending.
#[inline(always)]
fn active_chunk_body(m: &[bool], w: &[f32]) -> (usize, bool, Vec<u32>) {
    const B: usize = 64;
    let (mut nonzero, mut broken) = (0usize, false);
    let mut offsets: Vec<u32> = Vec::new();
    for (b, (mb, wb)) in m.chunks(B).zip(w.chunks(B)).enumerate() {
        let (mut nz, mut bad, mut word) = (0u32, false, 0u64);
        for (j, (&on, &v)) in mb.iter().zip(wb).enumerate() {
            nz += (on & (v != 0.0)) as u32;
            bad |= v.is_nan() | (!on & (v != 0.0));
            word |= (on as u64) << j;
        }
        nonzero += nz as usize;
        broken |= bad;
        while word != 0 {
            offsets.push((b * B) as u32 + word.trailing_zeros());
            word &= word - 1;
        }
    }
    (nonzero, broken, offsets)
}
multiversion!(fn active_chunk(m: &[bool], w: &[f32]) -> (usize, bool, Vec<u32>) => active_chunk_body);

/// One chunk of `select::top_k_abs`'s collecting pass: `(base + offset, key)` of every entry
/// whose `abs_key` is at least `t_lo`, ascending.
#[inline(always)]
fn collect_abs_body(g: &[f32], t_lo: u32, base: usize) -> Vec<(usize, u32)> {
    const B: usize = 64;
    let mut out = Vec::new();
    for (b, block) in g.chunks(B).enumerate() {
        let mut word = block
            .iter()
            .enumerate()
            .fold(0u64, |w, (j, &v)| w | (((abs_key(v) >= t_lo) as u64) << j));
        let at = base + b * B;
        while word != 0 {
            let j = word.trailing_zeros() as usize;
            out.push((at + j, abs_key(block[j])));
            word &= word - 1;
        }
    }
    out
}
multiversion!(fn collect_abs(g: &[f32], t_lo: u32, base: usize) -> Vec<(usize, u32)> => collect_abs_body);

/// One row of `select::top_k_growth`'s sampled path: the offsets of the entries not `taken`
/// whose `abs_key` is above `t_lo`, and of the first `ties` (in position order) equal to it,
/// ascending (64 comparisons of each kind packed into a word at a time, then a walk over the
/// set bits).
#[inline(always)]
fn collect_growth_body(g: &[f32], taken: &[bool], t_lo: u32, ties: usize) -> Vec<u32> {
    const B: usize = 64;
    let mut out = Vec::new();
    let mut ties = ties;
    for (b, (gb, tb)) in g.chunks(B).zip(taken.chunks(B)).enumerate() {
        let (mut above, mut equal) = (0u64, 0u64);
        for (j, (&v, &t)) in gb.iter().zip(tb).enumerate() {
            let key = abs_key(v);
            above |= (((key > t_lo) & !t) as u64) << j;
            equal |= (((key == t_lo) & !t) as u64) << j;
        }
        while ties > 0 && equal != 0 {
            above |= equal & equal.wrapping_neg();
            equal &= equal - 1;
            ties -= 1;
        }
        while above != 0 {
            out.push((b * B) as u32 + above.trailing_zeros());
            above &= above - 1;
        }
    }
    out
}
multiversion!(fn collect_growth(g: &[f32], taken: &[bool], t_lo: u32, ties: usize) -> Vec<u32> => collect_growth_body);

/// The largest `abs_key` of each block of 16 entries of `g` over the entries not `taken`
/// (the last block may be shorter; a block all taken has `0`, `select::EXCLUDED`).
#[inline(always)]
fn untaken_block_maxima_body(g: &[f32], taken: &[bool]) -> Vec<u32> {
    // Two plain loops the compiler vectorises (one keyed pass, then a maximum per block),
    // rather than one whose per-block reduction it does not: keys are all ones-masked for an
    // untaken entry, 0 for a taken one, branch-free.
    let keys: Vec<u32> = g
        .iter()
        .zip(taken)
        .map(|(&v, &on)| abs_key(v) & (on as u32).wrapping_sub(1))
        .collect();
    let mut out = Vec::with_capacity(keys.len().div_ceil(16));
    let mut blocks = keys.chunks_exact(16);
    for c in &mut blocks {
        let c: &[u32; 16] = c.try_into().expect("16 keys");
        let mut m = [0u32; 8];
        for j in 0..8 {
            m[j] = c[j].max(c[j + 8]);
        }
        for j in 0..4 {
            m[j] = m[j].max(m[j + 4]);
        }
        out.push(m[0].max(m[2]).max(m[1].max(m[3])));
    }
    if let Some(&m) = blocks.remainder().iter().max() {
        out.push(m);
    }
    out
}
multiversion!(fn untaken_block_maxima(g: &[f32], taken: &[bool]) -> Vec<u32> => untaken_block_maxima_body);

/// One chunk of `update::apply_update`: weights outside `a ∧ b` become `+0.0`, written only in
/// blocks of 16 that hold a nonzero one.
#[inline(always)]
fn clear_chunk_body(w: &mut [f32], a: &[bool], b: &[bool]) {
    const B: usize = 16;
    for ((w, a), b) in w.chunks_mut(B).zip(a.chunks(B)).zip(b.chunks(B)) {
        let dirty = w.iter().zip(a).zip(b).fold(false, |d, ((w, &a), &b)| {
            d | (!(a & b) & (w.to_bits() != 0))
        });
        if dirty {
            for ((w, &a), &b) in w.iter_mut().zip(a).zip(b) {
                if !(a && b) {
                    *w = 0.0;
                }
            }
        }
    }
}
multiversion!(fn clear_chunk(w: &mut [f32], a: &[bool], b: &[bool]) -> () => clear_chunk_body);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_is_the_baseline() {
        // The dispatched variant (this CPU's best) against the plain body on awkward inputs.
        let mut state = 3u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        for n in [0usize, 1, 15, 16, 17, 63, 64, 65, 1000] {
            let w: Vec<f32> = (0..n)
                .map(|_| match next() % 6 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => f32::NAN,
                    3 => -f32::INFINITY,
                    _ => (next() % 1000) as f32 / 100.0 - 5.0,
                })
                .collect();
            let m: Vec<bool> = (0..n).map(|_| next() % 3 == 0).collect();
            let m2: Vec<bool> = (0..n).map(|_| next() % 2 == 0).collect();
            assert_eq!(active_chunk(&m, &w), active_chunk_body(&m, &w), "{n}");
            assert_eq!(
                untaken_block_maxima(&w, &m),
                untaken_block_maxima_body(&w, &m),
                "{n}"
            );
            for t in [0, abs_key(0.0), abs_key(2.5), u32::MAX] {
                assert_eq!(collect_abs(&w, t, 7), collect_abs_body(&w, t, 7), "{n}");
                for ties in [0, 3, usize::MAX] {
                    assert_eq!(
                        collect_growth(&w, &m, t, ties),
                        collect_growth_body(&w, &m, t, ties),
                        "{n}"
                    );
                }
            }
            let (mut x, mut y) = (w.clone(), w.clone());
            clear_chunk(&mut x, &m, &m2);
            clear_chunk_body(&mut y, &m, &m2);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&x), bits(&y), "{n}");
        }
    }
}
