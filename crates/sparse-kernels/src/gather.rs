//! Batch-1 gather dot products: `Σ_j v[j] · x[idx[j]]`, with hardware gathers on AVX2 and
//! AVX-512.
//!
//! LLVM does not vectorise an indexed load into a gather on its own (checked in the generated
//! code), and a scalar loop tops out near one product per cycle; the gather instructions made the
//! batch-1 condensed forward ~2× faster (measured with `cargo xtask bench`), which is why this
//! is the one place with hand-written intrinsics. Each function keeps its partial sums in a
//! fixed order, so a given instruction set always gives the same result.

use crate::isa::Isa;
use crate::simd::madd;

/// An index type the gathers can load (`u16` or `u32`).
pub(crate) trait GatherIndex: Copy + Send + Sync + 'static {
    fn idx(self) -> usize;
    #[cfg(target_arch = "x86_64")]
    /// Loads 16 indices widened to i32. SAFETY: `p` must point at 16 readable indices.
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512i;
    #[cfg(target_arch = "x86_64")]
    /// Loads `count < 16` indices widened to i32, zero in the other lanes. SAFETY: `p` must
    /// point at `count` readable indices.
    unsafe fn load16_partial(p: *const Self, count: usize) -> std::arch::x86_64::__m512i;
    #[cfg(target_arch = "x86_64")]
    /// Loads 8 indices widened to i32. SAFETY: `p` must point at 8 readable indices.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256i;
}

impl GatherIndex for u16 {
    #[inline(always)]
    fn idx(self) -> usize {
        self as usize
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_partial(p: *const Self, count: usize) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let k = ((1u32 << count) - 1) as __mmask16;
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p as *const i16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))
    }
}

impl GatherIndex for u32 {
    #[inline(always)]
    fn idx(self) -> usize {
        self as usize
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        _mm512_loadu_si512(p as *const __m512i)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_partial(p: *const Self, count: usize) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let k = ((1u32 << count) - 1) as __mmask16;
        _mm512_maskz_loadu_epi32(k, p as *const i32)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        _mm256_loadu_si256(p as *const __m256i)
    }
}

/// Sum of 8 lanes in a fixed order.
#[inline(always)]
pub(crate) fn sum8(a: [f32; 8]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// `Σ_j v[j] · x[idx[j]]`. Every index must be `< x.len()`; this is checked in debug builds and
/// guaranteed by the formats' constructors plus the kernels' length checks.
#[inline]
pub(crate) fn dot_indexed<I: GatherIndex>(isa: Isa, v: &[f32], idx: &[I], x: &[f32]) -> f32 {
    debug_assert_eq!(v.len(), idx.len());
    debug_assert!(idx.iter().all(|i| i.idx() < x.len()));
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the ISA was checked by `Exec`; indices are in range of `x` (see above) and
        // `v`, `idx` have the same length.
        Isa::Avx512 => return unsafe { dot_indexed_avx512(v, idx, x) },
        Isa::Avx2 => return unsafe { dot_indexed_avx2(v, idx, x) },
        Isa::Scalar => {}
    }
    let _ = isa;
    dot_indexed_scalar(v, idx, x)
}

fn dot_indexed_scalar<I: GatherIndex>(v: &[f32], idx: &[I], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (vc, ic) in v.chunks(8).zip(idx.chunks(8)) {
        for (l, (&vv, &i)) in vc.iter().zip(ic).enumerate() {
            acc[l] = madd::<false>(vv, x[i.idx()], acc[l]);
        }
    }
    sum8(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
unsafe fn dot_indexed_avx512<I: GatherIndex>(v: &[f32], idx: &[I], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = v.len();
    let (vp, ip, xp) = (v.as_ptr(), idx.as_ptr(), x.as_ptr());
    let mut a0 = _mm512_setzero_ps();
    let mut a1 = _mm512_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        let x0 = _mm512_i32gather_ps::<4>(I::load16(ip.add(i)), xp);
        let x1 = _mm512_i32gather_ps::<4>(I::load16(ip.add(i + 16)), xp);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(vp.add(i)), x0, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(vp.add(i + 16)), x1, a1);
        i += 32;
    }
    if i + 16 <= n {
        let x0 = _mm512_i32gather_ps::<4>(I::load16(ip.add(i)), xp);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(vp.add(i)), x0, a0);
        i += 16;
    }
    // Tail (fewer than 16 products): the missing lanes get index 0 (a valid address) and value
    // 0, so one plain gather does it; a scalar tail was half the time of a k = 31 row.
    if i < n {
        let k = ((1u32 << (n - i)) - 1) as __mmask16;
        let xi = _mm512_i32gather_ps::<4>(I::load16_partial(ip.add(i), n - i), xp);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, vp.add(i)), xi, a1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_indexed_avx2<I: GatherIndex>(v: &[f32], idx: &[I], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = v.len();
    let (vp, ip, xp) = (v.as_ptr(), idx.as_ptr(), x.as_ptr());
    let mut a0 = _mm256_setzero_ps();
    let mut a1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        let x0 = _mm256_i32gather_ps::<4>(xp, I::load8(ip.add(i)));
        let x1 = _mm256_i32gather_ps::<4>(xp, I::load8(ip.add(i + 8)));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(vp.add(i)), x0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(vp.add(i + 8)), x1, a1);
        i += 16;
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a0, a1));
    for (l, j) in (i..n).enumerate() {
        lanes[l % 8] = (*vp.add(j)).mul_add(*xp.add((*ip.add(j)).idx()), lanes[l % 8]);
    }
    sum8(lanes)
}

/// `(l / n) · m` for the 16 lanes of a block of N:M slots: the offset of lane `l`'s group.
/// Computed with counters, not divisions (16 divisions per row cost a third of the 2:4 kernel).
#[inline(always)]
fn lane_offsets(n: usize, m: usize) -> [i32; 16] {
    let mut off = [0i32; 16];
    let (mut g, mut t) = (0i32, 0);
    for o in off.iter_mut() {
        *o = g * m as i32;
        t += 1;
        if t == n {
            t = 0;
            g += 1;
        }
    }
    off
}

/// `Σ v[s] · x[(s / n) · m + pos[s]]` over one row of an N:M layout with consecutive groups,
/// for `n` dividing 16 (so that 16 slots always cover whole groups).
#[inline]
pub(crate) fn dot_nm(isa: Isa, v: &[f32], pos: &[u8], n: usize, m: usize, x: &[f32]) -> f32 {
    debug_assert!(16 % n == 0 && v.len() == pos.len() && v.len() / n * m == x.len());
    debug_assert!(pos.iter().all(|&p| (p as usize) < m));
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        if 32 % m == 0 && 32 * n / m >= 8 {
            // SAFETY: as below; every permute index (l / n) · m + pos < 32.
            return unsafe { dot_nm_permute_avx512(v, pos, n, m, x) };
        }
        // SAFETY: ISA checked by `Exec`; positions are < m, so every computed index
        // (s / n) · m + pos[s] is < (len / n) · m = x.len().
        return unsafe { dot_nm_avx512(v, pos, n, m, x) };
    }
    // Portable path: 8 groups per step, one partial sum per group lane. Plain multiply-add:
    // `mul_add` outside a target-feature function would be a software `fmaf` call.
    let groups = v.len() / n;
    let mut acc = [0.0f32; 8];
    let full = groups / 8 * 8;
    for g0 in (0..full).step_by(8) {
        for (l, a) in acc.iter_mut().enumerate() {
            let g = g0 + l;
            let xg = &x[g * m..g * m + m];
            for t in 0..n {
                *a += v[g * n + t] * xg[pos[g * n + t] as usize];
            }
        }
    }
    for g in full..groups {
        for t in 0..n {
            acc[g - full] += v[g * n + t] * x[g * m + pos[g * n + t] as usize];
        }
    }
    sum8(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
unsafe fn dot_nm_avx512(v: &[f32], pos: &[u8], n: usize, m: usize, x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let len = v.len();
    let (vp, pp, xp) = (v.as_ptr(), pos.as_ptr(), x.as_ptr());
    // Lane l of a 16-slot block starts at group l / n: offset (l / n) · m.
    let off = _mm512_loadu_si512(lane_offsets(n, m).as_ptr() as *const __m512i);
    // Each block of 16 slots covers 16 / n groups = 16·m/n inputs.
    let step = (16 / n * m) as i32;
    let mut base = _mm512_setzero_si512();
    let stepv = _mm512_set1_epi32(step);
    let mut a0 = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= len {
        let p = _mm512_cvtepu8_epi32(_mm_loadu_si128(pp.add(i) as *const __m128i));
        let ix = _mm512_add_epi32(_mm512_add_epi32(base, off), p);
        let xv = _mm512_i32gather_ps::<4>(ix, xp);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(vp.add(i)), xv, a0);
        base = _mm512_add_epi32(base, stepv);
        i += 16;
    }
    let mut s = _mm512_reduce_add_ps(a0);
    for j in i..len {
        s = (*vp.add(j)).mul_add(*xp.add((j / n) * m + *pp.add(j) as usize), s);
    }
    s
}

/// N:M with `m` dividing 32 and at least 8 kept per 32 inputs (2:4, 1:4, 2:8, 4:8, 4:16, ...):
/// no gathers at all. Each step loads 32 consecutive inputs into two registers and picks the
/// kept ones with one two-source permute (`vpermt2ps`), so the input is read contiguously and
/// only values and positions stream from memory.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
unsafe fn dot_nm_permute_avx512(v: &[f32], pos: &[u8], n: usize, m: usize, x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let cnt = 32 * n / m; // kept slots per 32 inputs: 8 or 16
    let kmask: __mmask16 = if cnt >= 16 {
        0xFFFF
    } else {
        ((1u32 << cnt) - 1) as __mmask16
    };
    let off = _mm512_loadu_si512(lane_offsets(n, m).as_ptr() as *const __m512i);
    let (vp, pp, xp) = (v.as_ptr(), pos.as_ptr(), x.as_ptr());
    let chunks = x.len() / 32;
    let mut a0 = _mm512_setzero_ps();
    let mut a1 = _mm512_setzero_ps();
    let mut c = 0;
    macro_rules! step {
        ($acc:ident, $c:expr) => {{
            let x0 = _mm512_loadu_ps(xp.add(32 * $c));
            let x1 = _mm512_loadu_ps(xp.add(32 * $c + 16));
            let p = if cnt >= 16 {
                _mm512_cvtepu8_epi32(_mm_loadu_si128(pp.add($c * cnt) as *const __m128i))
            } else {
                _mm512_cvtepu8_epi32(_mm_loadl_epi64(pp.add($c * cnt) as *const __m128i))
            };
            let xs = _mm512_permutex2var_ps(x0, _mm512_add_epi32(off, p), x1);
            let vv = _mm512_maskz_loadu_ps(kmask, vp.add($c * cnt));
            $acc = _mm512_fmadd_ps(vv, xs, $acc);
        }};
    }
    while c + 2 <= chunks {
        step!(a0, c);
        step!(a1, c + 1);
        c += 2;
    }
    if c < chunks {
        step!(a0, c);
        c += 1;
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    for j in c * cnt..v.len() {
        s = (*vp.add(j)).mul_add(*xp.add((j / n) * m + *pp.add(j) as usize), s);
    }
    s
}
