//! Transposes between per-sample rows and lane-major layouts, in 4×4 register blocks.
//!
//! The kernels that put samples in SIMD lanes (the linear batch tiles of [`crate::cpu`], the
//! sparse convolution's lane layout in `conv_lanes.rs`) copy their inputs from per-sample rows
//! `[n][len]` (row stride `stride`) into `[len][tb]`, lane = sample, and their outputs back.
//! Done element by element, every store of such a copy is a separate strided write; on a
//! LeNet-5 sparse training step the element-wise copies of the sparse convolution took ~10% of
//! the step, more than its products. [`block4`] moves a 4×4 block with four loads, eight
//! shuffles and four stores (SSE, part of every x86-64 CPU; plain loops elsewhere), and
//! [`to_lanes`] / [`from_lanes`] tile a whole copy with it, the ragged edges element by element.

/// The 4×4 block at `src` (rows `src + i·ss`, 4 floats each) as its four columns.
///
/// # Safety
/// `src + i·ss .. + 4` must be readable for `i < 4`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn columns4(src: *const f32, ss: usize) -> [std::arch::x86_64::__m128; 4] {
    use std::arch::x86_64::*;
    // SAFETY: SSE is part of x86_64; the reads are the ones the caller vouches for.
    unsafe {
        let r0 = _mm_loadu_ps(src);
        let r1 = _mm_loadu_ps(src.add(ss));
        let r2 = _mm_loadu_ps(src.add(2 * ss));
        let r3 = _mm_loadu_ps(src.add(3 * ss));
        let t0 = _mm_unpacklo_ps(r0, r1);
        let t1 = _mm_unpacklo_ps(r2, r3);
        let t2 = _mm_unpackhi_ps(r0, r1);
        let t3 = _mm_unpackhi_ps(r2, r3);
        [
            _mm_movelh_ps(t0, t1),
            _mm_movehl_ps(t1, t0),
            _mm_movelh_ps(t2, t3),
            _mm_movehl_ps(t3, t2),
        ]
    }
}

/// Writes the 4×4 block at `src` (rows `src + i·ss`, 4 floats each) transposed to `dst`
/// (`ADD`: added to it, one addition per element): `dst[j·ds + i] (+)= src[i·ss + j]` for
/// `i, j < 4`. Four loads, eight shuffles and four stores (SSE, part of every x86-64 CPU;
/// plain loops elsewhere).
///
/// # Safety
/// `src + i·ss .. + 4` must be readable and `dst + j·ds .. + 4` writable for `i, j < 4`, and
/// the two regions must not overlap.
#[inline(always)]
pub(crate) unsafe fn block4_op<const ADD: bool>(
    src: *const f32,
    ss: usize,
    dst: *mut f32,
    ds: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // SAFETY: the reads and writes are the ones the caller vouches for.
        unsafe {
            for (j, c) in columns4(src, ss).into_iter().enumerate() {
                let d = dst.add(j * ds);
                _mm_storeu_ps(
                    d,
                    if ADD {
                        _mm_add_ps(_mm_loadu_ps(d), c)
                    } else {
                        c
                    },
                );
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for j in 0..4 {
        for i in 0..4 {
            // SAFETY: as vouched for by the caller.
            unsafe {
                let (d, v) = (dst.add(j * ds), *src.add(i * ss + j));
                *d.add(i) = if ADD { *d.add(i) + v } else { v };
            }
        }
    }
}

/// [`block4_op`] that overwrites `dst`.
///
/// # Safety
/// As for [`block4_op`].
#[inline(always)]
pub(crate) unsafe fn block4(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
    // SAFETY: the caller's guarantees are `block4_op`'s.
    unsafe { block4_op::<false>(src, ss, dst, ds) }
}

/// [`block4_op`] that adds to `dst`.
///
/// # Safety
/// As for [`block4_op`].
#[inline(always)]
pub(crate) unsafe fn block4_add(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
    // SAFETY: the caller's guarantees are `block4_op`'s.
    unsafe { block4_op::<true>(src, ss, dst, ds) }
}

/// Positions per block of a copy: the block's `POSITIONS · tb` lane-major floats (16 KiB at
/// `tb = 64`) and the `n` rows' `POSITIONS` floats stay in L1 while the 4×4 blocks move them.
const POSITIONS: usize = 64;

/// `dst[p·tb + lane] = src[lane·stride + p]` for `lane < n`, `p < len`, and 0 for the lanes
/// `n..tb`: `n` rows of `len` floats, `stride` apart, into the lane-major `[len][tb]`.
pub(crate) fn to_lanes(
    src: &[f32],
    stride: usize,
    n: usize,
    len: usize,
    dst: &mut [f32],
    tb: usize,
) {
    assert!(n <= tb && dst.len() >= len * tb, "to_lanes: dst too short");
    if n == 0 || len == 0 {
        dst[..len * tb].fill(0.0);
        return;
    }
    assert!(
        src.len() >= (n - 1) * stride + len,
        "to_lanes: src too short"
    );
    let (n4, len4) = (n / 4 * 4, len / 4 * 4);
    for p0 in (0..len).step_by(POSITIONS) {
        let p1 = (p0 + POSITIONS).min(len);
        for lane in (0..n4).step_by(4) {
            for p in (p0..p1.min(len4)).step_by(4) {
                // SAFETY: rows `lane..lane + 4 ≤ n` at positions `p..p + 4 ≤ len` are inside
                // `src`, and positions `p..p + 4` at lanes `lane..lane + 4 ≤ tb` inside `dst`
                // (both asserted above).
                unsafe {
                    block4(
                        src.as_ptr().add(lane * stride + p),
                        stride,
                        dst.as_mut_ptr().add(p * tb + lane),
                        tb,
                    )
                };
            }
        }
        for p in p0..p1 {
            let lanes = &mut dst[p * tb..(p + 1) * tb];
            let done = if p < len4 { n4 } else { 0 };
            for (lane, d) in lanes.iter_mut().enumerate().take(n).skip(done) {
                *d = src[lane * stride + p];
            }
            lanes[n..].fill(0.0);
        }
    }
}

/// `dst[lane·stride + p] = src[p·tb + lane]` (`+=` with `ADD`) for `lane < n`, `p < len`: the
/// inverse of [`to_lanes`], the lanes `n..tb` dropped.
pub(crate) fn from_lanes<const ADD: bool>(
    src: &[f32],
    tb: usize,
    n: usize,
    len: usize,
    dst: &mut [f32],
    stride: usize,
) {
    assert!(
        n <= tb && src.len() >= len * tb,
        "from_lanes: src too short"
    );
    if n == 0 || len == 0 {
        return;
    }
    assert!(
        dst.len() >= (n - 1) * stride + len,
        "from_lanes: dst too short"
    );
    let (n4, len4) = (n / 4 * 4, len / 4 * 4);
    for p0 in (0..len).step_by(POSITIONS) {
        let p1 = (p0 + POSITIONS).min(len);
        for p in (p0..p1.min(len4)).step_by(4) {
            for lane in (0..n4).step_by(4) {
                let (s, d) = (p * tb + lane, lane * stride + p);
                // SAFETY: positions `p..p + 4 ≤ len` at lanes `lane..lane + 4 ≤ n ≤ tb` are
                // inside `src`, rows `lane..lane + 4 ≤ n` at positions `p..p + 4` inside
                // `dst` (both asserted above); `src` and `dst` are distinct slices.
                unsafe {
                    block4_op::<ADD>(src.as_ptr().add(s), tb, dst.as_mut_ptr().add(d), stride)
                };
            }
        }
        for p in p0..p1 {
            let done = if p < len4 { n4 } else { 0 };
            for lane in done..n {
                let v = src[p * tb + lane];
                let d = &mut dst[lane * stride + p];
                *d = if ADD { *d + v } else { v };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (n, len, stride, tb) shape around the 4×4 blocks and the position blocks, against
    /// the element-by-element definitions.
    #[test]
    fn lane_copies_match_the_definitions() {
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for tb in [8usize, 16, 64] {
            for n in [0usize, 1, 3, 4, 5, 8, tb] {
                if n > tb {
                    continue;
                }
                for len in [0usize, 1, 4, 7, 64, 67, 130] {
                    let stride = len + 3;
                    let src: Vec<f32> = (0..n * stride).map(|_| next()).collect();
                    let mut lanes = vec![f32::NAN; len * tb + 5];
                    to_lanes(&src, stride, n, len, &mut lanes, tb);
                    for p in 0..len {
                        for lane in 0..tb {
                            let want = if lane < n {
                                src[lane * stride + p]
                            } else {
                                0.0
                            };
                            assert_eq!(lanes[p * tb + lane], want, "tb {tb} n {n} len {len}");
                        }
                    }
                    assert!(lanes[len * tb..].iter().all(|v| v.is_nan()));
                    let mut back = vec![1.5f32; n * stride];
                    from_lanes::<false>(&lanes, tb, n, len, &mut back, stride);
                    let mut sum = vec![1.5f32; n * stride];
                    from_lanes::<true>(&lanes, tb, n, len, &mut sum, stride);
                    for lane in 0..n {
                        for p in 0..stride {
                            let i = lane * stride + p;
                            let (want, want_sum) = if p < len {
                                (src[i], 1.5 + src[i])
                            } else {
                                (1.5, 1.5)
                            };
                            assert_eq!(back[i], want, "tb {tb} n {n} len {len}");
                            assert_eq!(sum[i], want_sum, "tb {tb} n {n} len {len}");
                        }
                    }
                }
            }
        }
    }
}
