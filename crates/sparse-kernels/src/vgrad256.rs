//! The value gradient at batch > 8 on AVX2 + FMA, without a horizontal reduction per stored
//! weight: the AVX2 counterpart of `vgrad512.rs`.
//!
//! For one batch tile of `TB` examples, a stored weight's `TB / 8` vector FMAs leave one 8-lane
//! partial; the partials of 8 consecutive stored weights of a row are reduced together (two
//! rounds of horizontal adds and one cross-half add give one vector holding the 8 sums), then
//! added to the 8 gradients with one vector load, add and store. Every gradient is summed in an
//! order fixed by its position in its row's chunk of 8, so results do not depend on the thread
//! count.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::rows::Rows;

/// Reduces `v[e]` (8 lanes each) to one vector whose lane `e` is the sum of the lanes of `v[e]`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn transpose_reduce8(v: &[__m256; 8]) -> __m256 {
    // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7].
    let t0 = _mm256_hadd_ps(v[0], v[1]);
    let t1 = _mm256_hadd_ps(v[2], v[3]);
    let t2 = _mm256_hadd_ps(v[4], v[5]);
    let t3 = _mm256_hadd_ps(v[6], v[7]);
    // u0 = [Σlo v0, Σlo v1, Σlo v2, Σlo v3 | Σhi v0, Σhi v1, Σhi v2, Σhi v3], u1 likewise for
    // v4..v7 (lo / hi: the lower / upper four lanes).
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
    let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
    _mm256_add_ps(lo, hi)
}

/// `gv[slot − base] += Σ_t gy_tile[row][t] · x_tile[col][t]` for every stored entry of the
/// stored rows `a0 .. a0 + n_rows`, over the batch tiles `xt` / `gyt` (`[tiles][cols][TB]`),
/// `TB` a multiple of 8, at most 64.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xt`, `gyt` and `gv` must have the tile layout and
/// lengths the generic kernel expects.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
// Index loops on purpose (see the comment in the body).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub(crate) unsafe fn vgrad_tiled_avx2<R: Rows, const TB: usize>(
    r: &R,
    xt: &[f32],
    gyt: &[f32],
    tiles: usize,
    fan_in: usize,
    rows: usize,
    a0: usize,
    n_rows: usize,
    gv: &mut [f32],
) {
    const { assert!(TB.is_multiple_of(8) && TB <= 64) };
    // Plain index loops and no iterator adapters: an adapter that LLVM declines to inline is
    // compiled without this function's target features and costs a call per weight.
    let base = r.slots(a0).start;
    let chunks = TB / 8;
    let mut v = [_mm256_setzero_ps(); 8];
    for t in 0..tiles {
        let xs = &xt[t * fan_in * TB..(t + 1) * fan_in * TB];
        let gys = &gyt[t * rows * TB..(t + 1) * rows * TB];
        for a in a0..a0 + n_rows {
            let row = r.out_row(a);
            let gtile = &gys[row * TB..(row + 1) * TB];
            let mut g = [_mm256_setzero_ps(); 8];
            for c in 0..chunks {
                // SAFETY: a tile row holds TB = 8·chunks floats.
                g[c] = unsafe { _mm256_loadu_ps(gtile.as_ptr().add(8 * c)) };
            }
            let (mut n, mut first) = (0usize, 0usize);
            for (slot, col) in r.entries(a) {
                if n == 0 {
                    first = slot - base;
                }
                let xc = &xs[col * TB..(col + 1) * TB];
                let p = xc.as_ptr();
                // SAFETY: `xc` holds TB = 8·chunks floats.
                let mut acc = unsafe { _mm256_mul_ps(g[0], _mm256_loadu_ps(p)) };
                for c in 1..chunks {
                    acc = unsafe { _mm256_fmadd_ps(g[c], _mm256_loadu_ps(p.add(8 * c)), acc) };
                }
                v[n] = acc;
                n += 1;
                if n == 8 {
                    add_sums(&mut gv[first..first + 8], transpose_reduce8(&v));
                    n = 0;
                }
            }
            if n > 0 {
                for e in v.iter_mut().skip(n) {
                    *e = _mm256_setzero_ps();
                }
                add_sums(&mut gv[first..first + n], transpose_reduce8(&v));
            }
        }
    }
}

/// `out[e] += sums[e]` for the first `out.len()` (≤ 8) lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn add_sums(out: &mut [f32], sums: __m256) {
    let n = out.len();
    if n == 8 {
        // SAFETY: `out` holds 8 floats.
        unsafe {
            let old = _mm256_loadu_ps(out.as_ptr());
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(old, sums));
        }
    } else {
        let mut s = [0f32; 8];
        // SAFETY: `s` holds 8 floats.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), sums) };
        for e in 0..n {
            out[e] += s[e];
        }
    }
}
