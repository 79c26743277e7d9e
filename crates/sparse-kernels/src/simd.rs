//! The small inner loops every kernel is built from. They are plain Rust over fixed-size
//! arrays, written so that LLVM vectorises them for whatever target features the calling
//! variant is compiled with (see [`crate::isa`]).

/// `a · b + c`, fused when the variant has FMA (exact rounding of the fused result), plain
/// otherwise (a software `fmaf` would be 20× slower).
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `acc += v · x` over one batch tile.
#[inline(always)]
pub fn axpy_tile<const TB: usize, const FMA: bool>(acc: &mut [f32; TB], v: f32, x: &[f32; TB]) {
    for t in 0..TB {
        acc[t] = madd::<FMA>(v, x[t], acc[t]);
    }
}

/// `acc += g ⊙ x` lane-wise over one tile.
#[inline(always)]
pub fn fma_tile<const TB: usize, const FMA: bool>(
    acc: &mut [f32; TB],
    g: &[f32; TB],
    x: &[f32; TB],
) {
    for t in 0..TB {
        acc[t] = madd::<FMA>(g[t], x[t], acc[t]);
    }
}

/// `Σ_t g[t] · x[t]` over one batch tile (`TB` a multiple of 8), with 8 (`TB = 8`) or 16
/// independent partial sums reduced in a fixed order.
#[inline(always)]
pub fn dot_tile<const TB: usize, const FMA: bool>(g: &[f32; TB], x: &[f32; TB]) -> f32 {
    let mut p = [0.0f32; 16];
    if TB == 8 {
        for t in 0..8 {
            p[t] = madd::<FMA>(g[t], x[t], p[t]);
        }
    } else {
        for c in 0..TB / 16 {
            for l in 0..16 {
                p[l] = madd::<FMA>(g[c * 16 + l], x[c * 16 + l], p[l]);
            }
        }
    }
    let q: [f32; 8] = std::array::from_fn(|l| p[l] + p[l + 8]);
    let r: [f32; 4] = std::array::from_fn(|l| q[l] + q[l + 4]);
    (r[0] + r[2]) + (r[1] + r[3])
}

/// A `[f32; TB]` view of `s[i·TB .. (i+1)·TB]`.
#[inline(always)]
pub fn tile<const TB: usize>(s: &[f32], i: usize) -> &[f32; TB] {
    s[i * TB..(i + 1) * TB].try_into().expect("tile in range")
}

/// A mutable `[f32; TB]` view of `s[i·TB .. (i+1)·TB]`.
#[inline(always)]
pub fn tile_mut<const TB: usize>(s: &mut [f32], i: usize) -> &mut [f32; TB] {
    (&mut s[i * TB..(i + 1) * TB])
        .try_into()
        .expect("tile in range")
}
