//! The value gradient at batch > 8 on AVX-512, without a horizontal reduction per stored
//! weight.
//!
//! For one batch tile of `TB` examples (feature-major, as in `cpu.rs`), a stored weight's
//! gradient is `Σ_t gy[t, row] · x[t, col]`: `TB / 16` vector FMAs into one 16-lane partial. The
//! generic kernel then reduces each partial to a scalar (about 8 shuffle/add operations per
//! stored weight, the larger part of its time). Here the partials of 16 consecutive stored
//! weights of a row are reduced together by a transposing tree — 15 steps of two shuffles and
//! one add give one vector holding the 16 sums — and added to the 16 gradients with one vector
//! load, add and store: about 3 reduction operations per stored weight instead of 8.
//!
//! Every gradient is summed in a fixed order that depends only on its position in its row's
//! chunk of 16, so results do not depend on the thread count (the rows are split between
//! threads, never a row).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::rows::Rows;

/// Reduces `v[e]` (16 lanes each) to one vector whose lane `e` is the sum of the lanes of
/// `v[e]`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
fn transpose_reduce16(v: &[__m512; 16]) -> __m512 {
    // 16 → 8: w[i] holds v[2i]'s partials in its low 256 bits, v[2i+1]'s in its high 256 bits.
    let mut w = [_mm512_setzero_ps(); 8];
    for i in 0..8 {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
        let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
        w[i] = _mm512_add_ps(lo, hi);
    }
    // 8 → 4: quarter q of u[j] holds v[4j + q]'s partials.
    let mut u = [_mm512_setzero_ps(); 4];
    for j in 0..4 {
        let (a, b) = (w[2 * j], w[2 * j + 1]);
        let lo = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
        let hi = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
        u[j] = _mm512_add_ps(lo, hi);
    }
    // 4 → 2: in quarter q of r[k], lanes 0 and 2 hold v[8k + q]'s partials, lanes 1 and 3
    // v[8k + 4 + q]'s.
    let mut r = [_mm512_setzero_ps(); 2];
    for k in 0..2 {
        let (a, b) = (u[2 * k], u[2 * k + 1]);
        r[k] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // 2 → 1: quarter q lane i holds the sum of v[4i + q].
    let lo = _mm512_shuffle_ps::<0b01_00_01_00>(r[0], r[1]);
    let hi = _mm512_shuffle_ps::<0b11_10_11_10>(r[0], r[1]);
    let s = _mm512_add_ps(lo, hi);
    // Lane e ← lane 4·(e mod 4) + e / 4.
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(idx, s)
}

/// `gv[slot − base] += Σ_t gy_tile[row][t] · x_tile[col][t]` for every stored entry of the
/// stored rows `a0 .. a0 + n_rows`, over the batch tiles `xt` / `gyt` (`[tiles][cols][TB]`),
/// `TB` a multiple of 16.
///
/// # Safety
/// The CPU must support AVX-512 F/VL/BW and FMA; `xt`, `gyt` and `gv` must have the tile
/// layout and lengths the generic kernel expects.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
// Index loops on purpose (see the comment in the body).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub(crate) unsafe fn vgrad_tiled_avx512<R: Rows, const TB: usize>(
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
    const { assert!(TB.is_multiple_of(16) && TB <= 64) };
    // Plain index loops and no iterator adapters: an adapter that LLVM declines to inline is
    // compiled without this function's target features and costs a call per weight.
    let base = r.slots(a0).start;
    let chunks = TB / 16;
    let mut v = [_mm512_setzero_ps(); 16];
    for t in 0..tiles {
        let xs = &xt[t * fan_in * TB..(t + 1) * fan_in * TB];
        let gys = &gyt[t * rows * TB..(t + 1) * rows * TB];
        for a in a0..a0 + n_rows {
            let row = r.out_row(a);
            let gtile = &gys[row * TB..(row + 1) * TB];
            let mut g = [_mm512_setzero_ps(); 4];
            for c in 0..chunks {
                // SAFETY: a tile row holds TB = 16·chunks floats.
                g[c] = unsafe { _mm512_loadu_ps(gtile.as_ptr().add(16 * c)) };
            }
            let (mut n, mut first) = (0usize, 0usize);
            for (slot, col) in r.entries(a) {
                if n == 0 {
                    first = slot - base;
                }
                let xc = &xs[col * TB..(col + 1) * TB];
                let p = xc.as_ptr();
                // SAFETY: `xc` holds TB = 16·chunks floats.
                let mut acc = unsafe { _mm512_mul_ps(g[0], _mm512_loadu_ps(p)) };
                for c in 1..chunks {
                    acc = unsafe { _mm512_fmadd_ps(g[c], _mm512_loadu_ps(p.add(16 * c)), acc) };
                }
                v[n] = acc;
                n += 1;
                if n == 16 {
                    add_sums(&mut gv[first..first + 16], transpose_reduce16(&v));
                    n = 0;
                }
            }
            if n > 0 {
                for e in v.iter_mut().skip(n) {
                    *e = _mm512_setzero_ps();
                }
                add_sums(&mut gv[first..first + n], transpose_reduce16(&v));
            }
        }
    }
}

/// `out[e] += sums[e]` for the first `out.len()` (≤ 16) lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
fn add_sums(out: &mut [f32], sums: __m512) {
    let n = out.len();
    let k: __mmask16 = if n >= 16 { 0xffff } else { (1u16 << n) - 1 };
    // SAFETY: the mask covers exactly the `n` floats of `out`.
    unsafe {
        let old = _mm512_maskz_loadu_ps(k, out.as_ptr());
        _mm512_mask_storeu_ps(out.as_mut_ptr(), k, _mm512_add_ps(old, sums));
    }
}
