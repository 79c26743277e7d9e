//! The sparse convolution's three products with samples as SIMD lanes: an implicit im2col.
//!
//! An explicit im2col matrix holds `K = in·kh·kw` floats per output position — 25 copies of the
//! input for a 5×5 kernel — and a training step writes it twice (forward, value gradient) and
//! reads the input gradient's back through col2im. At the densities where a convolution goes
//! to sparse storage those copies cost more than the sparse products (LeNet-5's conv2 at 10%:
//! docs/benchmarks.md, "Sparse engine on conv nets"). Here a chunk of up to [`LANES`] samples is
//! transposed once into a padded lane layout `xp [in][ph][pw][TB]` (`ph = h + 2·padding`,
//! `pw = w + 2·padding`, lane = sample, zero in the padding and in lanes past the chunk), where
//! the input that kernel entry `col = (ci·kh + ki)·kw + kj` sees at output position
//! `p = (oy, ox)` is the cell `base(p) + off(col)`, with
//! `base(p) = oy·stride·pw + ox·stride` and `off(col) = (ci·ph + ki·dilation)·pw + kj·dilation`.
//! Every stored weight then does one `TB`-wide multiply-add per position, as in the linear
//! kernels of [`crate::cpu`], with no im2col written:
//!
//! - forward: `acc[TB] = Σ_slot v · xp[base(p) + off(col)]` per position and stored row;
//! - input gradient, stride 1: a gather per input cell over a zero-padded lane layout of `∂y`
//!   (the transposed convolution, see [`Gather`]), each cell's sum kept in registers;
//!   other strides: the scatter `∂xp[base(p) + off(col)] += v · ∂y[row, p]`, then `∂xp` back
//!   to `[n, in, h, w]` without its padding cells;
//! - value gradient: per stored weight, `Σ_p ∂y[row, p] ⊙ xp[base(p) + off(col)]` lane-wise
//!   over blocks of [`POSITION_BLOCK`] positions (a block of `∂y` stays in L1 while the row's
//!   weights use it), each block's sum reduced across the lanes and added in block order
//!   (written in AVX-512 intrinsics where available: see `vgrad_avx512`).
//!
//! Chunks depend only on the batch size. Within a chunk the forward and the value gradient split
//! the stored rows over the threads, the gathered input gradient the input channels, and the
//! scattered one runs on one thread (its rows collide on the same inputs); chunks run in parallel and the value gradient adds their partial sums in chunk
//! order. Every output is summed in one fixed order, so results are bit-identical for any thread
//! count.

use std::ops::Range;

use crate::conv::{run_chunks, Geometry};
use crate::cpu::{row_jobs, row_ranges, run_parallel, split_lengths, with_tile};
use crate::isa::multiversion;
use crate::rows::Rows;
use crate::scratch;
use crate::simd::{axpy_tile, fma_tile, tile, tile_mut};
use crate::transpose::{from_lanes, to_lanes};
use crate::Exec;

/// Samples per chunk, one SIMD lane each (the widest batch tile of [`crate::cpu`]).
pub(crate) const LANES: usize = 64;

/// Output positions per block of the value gradient (each stored weight's lane-wise sum over a
/// block is reduced to one number, added in block order).
const POSITION_BLOCK: usize = 16;

/// The lane layout of one convolution: padded plane sizes, each output position's base cell
/// and each kernel entry's cell offset.
struct Lanes {
    ph: usize,
    pw: usize,
    /// `base(p)` for the `oh · ow` output positions, row-major.
    bases: Vec<usize>,
    /// `off(col)` for the `K` kernel entries.
    offs: Vec<usize>,
}

impl Lanes {
    fn new(g: &Geometry) -> Self {
        let (s, d, pad) = (g.spec.stride, g.spec.dilation, g.spec.padding);
        let (ph, pw) = (g.h + 2 * pad, g.w + 2 * pad);
        let bases = (0..g.oh)
            .flat_map(|oy| (0..g.ow).map(move |ox| oy * s * pw + ox * s))
            .collect();
        let offs = (0..g.c)
            .flat_map(|ci| {
                (0..g.kh)
                    .flat_map(move |ki| (0..g.kw).map(move |kj| (ci * ph + ki * d) * pw + kj * d))
            })
            .collect();
        Lanes {
            ph,
            pw,
            bases,
            offs,
        }
    }

    /// Cells of the padded input, `in · ph · pw`.
    fn cells(&self, g: &Geometry) -> usize {
        g.c * self.ph * self.pw
    }

    /// The cell of unpadded input `(ci, iy, ix = 0)`.
    fn cell(&self, g: &Geometry, ci: usize, iy: usize) -> usize {
        let pad = g.spec.padding;
        (ci * self.ph + iy + pad) * self.pw + pad
    }

    /// Writes samples `c` of `x [batch, in, h, w]` to `xp [in][ph][pw][TB]` (`cells · TB`
    /// floats, every one written: the padding and the lanes past the chunk with zeros).
    fn images_to_lanes<const TB: usize>(
        &self,
        g: &Geometry,
        x: &[f32],
        c: Range<usize>,
        xp: &mut [f32],
    ) {
        let (n, s0) = (c.len(), c.start);
        if n == 0 {
            xp.fill(0.0);
            return;
        }
        if g.spec.padding > 0 {
            // Only the padding cells: the runs between one input row's cells and the next's.
            let mut at = 0;
            for ci in 0..g.c {
                for iy in 0..g.h {
                    let start = self.cell(g, ci, iy);
                    xp[at * TB..start * TB].fill(0.0);
                    at = start + g.w;
                }
            }
            xp[at * TB..].fill(0.0);
        }
        let (plane, stride) = (g.h * g.w, g.c * g.h * g.w);
        for ci in 0..g.c {
            let first = (s0 * g.c + ci) * plane;
            if g.spec.padding == 0 {
                // Unpadded, a channel's rows are one run of cells.
                to_lanes(
                    &x[first..],
                    stride,
                    n,
                    plane,
                    &mut xp[self.cell(g, ci, 0) * TB..],
                    TB,
                );
            } else {
                for iy in 0..g.h {
                    let cells = &mut xp[self.cell(g, ci, iy) * TB..];
                    to_lanes(&x[first + iy * g.w..], stride, n, g.w, cells, TB);
                }
            }
        }
    }

    /// `∂xp [in][ph][pw][TB]` back to the chunk's `∂x [n, in, h, w]` (its padding cells dropped).
    fn lanes_to_images<const TB: usize>(&self, g: &Geometry, gxp: &[f32], gx: &mut [f32]) {
        let plane = g.h * g.w;
        let n = gx.len() / (g.c * plane).max(1);
        for ci in 0..g.c {
            let (dst, stride) = (&mut gx[ci * plane..], g.c * plane);
            if g.spec.padding == 0 {
                from_lanes::<false>(&gxp[self.cell(g, ci, 0) * TB..], TB, n, plane, dst, stride);
            } else {
                for iy in 0..g.h {
                    let cells = &gxp[self.cell(g, ci, iy) * TB..];
                    from_lanes::<false>(cells, TB, n, g.w, &mut dst[iy * g.w..], stride);
                }
            }
        }
    }
}

/// Each stored weight's cell offset `off(col)`, in slot order (the kernels' inner loops then
/// read one offset per weight, with no column lookup).
fn slot_offsets<R: Rows>(r: &R, lanes: &Lanes, nnz: usize) -> Vec<usize> {
    let mut offs = vec![0; nnz];
    for a in 0..r.n_stored() {
        for (slot, col) in r.entries(a) {
            offs[slot] = lanes.offs[col];
        }
    }
    offs
}

/// Writes samples `c` of `∂y [batch, out, oh, ow]` to `dst`, lane-major with `top` rows and
/// `left` columns of zeros around each plane: `[out][oh + 2·top][ow + 2·left][TB]` (`[out][L][TB]`
/// without padding; [`Gather`] pads), every float written.
fn grad_lanes<const TB: usize>(
    g: &Geometry,
    gy: &[f32],
    c: Range<usize>,
    (top, left): (usize, usize),
    dst: &mut [f32],
) {
    let (out, l) = (g.out, g.l());
    let (n, stride) = (c.len(), out * l);
    if top == 0 && left == 0 {
        for o in 0..out {
            let src = &gy[(c.start * out + o) * l..];
            to_lanes(src, stride, n, l, &mut dst[o * l * TB..], TB);
        }
        return;
    }
    dst.fill(0.0);
    let (gph, gpw) = (g.oh + 2 * top, g.ow + 2 * left);
    for o in 0..out {
        for oy in 0..g.oh {
            let src = &gy[(c.start * out + o) * l + oy * g.ow..];
            let cell = (o * gph + oy + top) * gpw + left;
            to_lanes(src, stride, n, g.ow, &mut dst[cell * TB..], TB);
        }
    }
}

/// The chunks of `g`'s batch, [`LANES`] samples each (the last one shorter).
fn chunks(g: &Geometry) -> Vec<Range<usize>> {
    (0..g.batch)
        .step_by(LANES)
        .map(|s| s..(s + LANES).min(g.batch))
        .collect()
}

/// `Σ v · xs[off]` over the weights `(values, offs)` for the `P` positions whose cells start at
/// `xs[p]`, one `TB`-lane sum each, every sum in weight order. Several positions at once keep
/// `P` independent multiply-add chains per lane group in flight (one position alone waits on
/// the previous weight's multiply-add: with `TB = 32`, two chains for two FMA units).
#[inline(always)]
fn dot_positions<const TB: usize, const P: usize, const FMA: bool>(
    values: &[f32],
    offs: &[usize],
    xs: [&[f32]; P],
) -> [[f32; TB]; P] {
    let mut acc = [[0f32; TB]; P];
    for (&v, &off) in values.iter().zip(offs) {
        for (a, x) in acc.iter_mut().zip(xs) {
            axpy_tile::<TB, FMA>(a, v, tile::<TB>(x, off));
        }
    }
    acc
}

/// `out[i][p] = Σ v · src[bases[p] + off]` (lane-wise, `out [groups][positions][TB]`) over the
/// weights `starts[i]..starts[i + 1]` of `(values, offs)` for each group `i`: the forward
/// (groups = stored rows, `src` = the input's lanes) and the gathered input gradient (groups =
/// input channels, `src` = `∂y`'s padded lanes). Positions outermost, two at a time: the cells
/// they read (a window across every input channel or every row of `∂y`) serve all the groups
/// before the next positions'. (Groups outermost re-read those cells from memory for each
/// group: for the gather, no faster than the scatter.)
#[inline(always)]
fn dots_body<const TB: usize, const FMA: bool>(
    values: &[f32],
    offs: &[usize],
    starts: &[usize],
    bases: &[usize],
    src: &[f32],
    out: &mut [f32],
) {
    let plane = bases.len();
    let pairs = plane / 2 * 2;
    for pi in (0..pairs).step_by(2) {
        let xs = [&src[bases[pi] * TB..], &src[bases[pi + 1] * TB..]];
        for (i, e) in starts.windows(2).enumerate() {
            let (v, o) = (&values[e[0]..e[1]], &offs[e[0]..e[1]]);
            let [y0, y1] = dot_positions::<TB, 2, FMA>(v, o, xs);
            *tile_mut::<TB>(out, i * plane + pi) = y0;
            *tile_mut::<TB>(out, i * plane + pi + 1) = y1;
        }
    }
    for pi in pairs..plane {
        let xs = [&src[bases[pi] * TB..]];
        for (i, e) in starts.windows(2).enumerate() {
            let (v, o) = (&values[e[0]..e[1]], &offs[e[0]..e[1]]);
            let [y] = dot_positions::<TB, 1, FMA>(v, o, xs);
            *tile_mut::<TB>(out, i * plane + pi) = y;
        }
    }
}
multiversion!(fn dots_lanes<; const TB: usize>(values: &[f32], offs: &[usize], starts: &[usize], bases: &[usize], src: &[f32], out: &mut [f32]) => dots_body);

/// Stored row `a`'s slots are `starts[a]..starts[a + 1]` (consecutive in every layout).
fn row_starts<R: Rows>(r: &R) -> Vec<usize> {
    let n = r.n_stored();
    let mut starts: Vec<usize> = (0..n).map(|a| r.slots(a).start).collect();
    starts.push(if n > 0 { r.slots(n - 1).end } else { 0 });
    debug_assert!((1..n).all(|a| r.slots(a - 1).end == r.slots(a).start));
    starts
}

#[inline(always)]
fn igrad_body<R: Rows, const TB: usize, const FMA: bool>(
    r: &R,
    values: &[f32],
    offs: &[usize],
    bases: &[usize],
    gyl: &[f32],
    gxp: &mut [f32],
) {
    let l = bases.len();
    for (pi, &b) in bases.iter().enumerate() {
        let gxs = &mut gxp[b * TB..];
        for a in 0..r.n_stored() {
            let g = tile::<TB>(gyl, r.out_row(a) * l + pi);
            let slots = r.slots(a);
            for (&v, &off) in values[slots.clone()].iter().zip(&offs[slots]) {
                axpy_tile::<TB, FMA>(tile_mut::<TB>(gxs, off), v, g);
            }
        }
    }
}
multiversion!(fn igrad_lanes<R: Rows; const TB: usize>(r: &R, values: &[f32], offs: &[usize], bases: &[usize], gyl: &[f32], gxp: &mut [f32]) => igrad_body);

/// `Σ acc` in a fixed order: 16 partial sums (8 for `TB = 8`), then a tree — the shape of one
/// 16-lane register, so the accumulation above stays in full-width vectors.
#[inline(always)]
fn sum_lanes<const TB: usize>(acc: &[f32; TB]) -> f32 {
    let mut p = [0f32; 16];
    if TB == 8 {
        p[..8].copy_from_slice(&acc[..8]);
    } else {
        for c in 0..TB / 16 {
            for l in 0..16 {
                p[l] += acc[c * 16 + l];
            }
        }
    }
    let q: [f32; 8] = std::array::from_fn(|l| p[l] + p[l + 8]);
    let r: [f32; 4] = std::array::from_fn(|l| q[l] + q[l + 4]);
    (r[0] + r[2]) + (r[1] + r[3])
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn vgrad_body<R: Rows, const TB: usize, const FMA: bool>(
    r: &R,
    offs: &[usize],
    bases: &[usize],
    xp: &[f32],
    gyl: &[f32],
    a0: usize,
    n_rows: usize,
    gv: &mut [f32],
) {
    let l = bases.len();
    let first = r.slots(a0).start;
    // Blocks of positions outermost: a block of one row's `∂y` (`POSITION_BLOCK · TB` floats)
    // stays in L1 while every stored weight of the row streams its inputs past it. (Walking all
    // positions per weight re-read the row's whole `∂y` from L2 for every weight: 4× slower.)
    for p0 in (0..l).step_by(POSITION_BLOCK) {
        let block = &bases[p0..(p0 + POSITION_BLOCK).min(l)];
        for a in a0..a0 + n_rows {
            let gs = &gyl[(r.out_row(a) * l + p0) * TB..][..block.len() * TB];
            for slot in r.slots(a) {
                let xs = &xp[offs[slot] * TB..];
                let mut acc = [0f32; TB];
                for (pi, &b) in block.iter().enumerate() {
                    fma_tile::<TB, FMA>(&mut acc, tile::<TB>(gs, pi), tile::<TB>(xs, b));
                }
                gv[slot - first] += sum_lanes(&acc);
            }
        }
    }
}
multiversion!(fn vgrad_lanes<R: Rows; const TB: usize>(r: &R, offs: &[usize], bases: &[usize], xp: &[f32], gyl: &[f32], a0: usize, n_rows: usize, gv: &mut [f32]) => vgrad_body);

/// [`vgrad_body`] in AVX-512 intrinsics for `TB` a multiple of 16: the same sums in the same
/// order (16-lane accumulators, folded and reduced as [`sum_lanes`] does). The generic body is
/// vectorised by LLVM two lanes at a time here (the reduction after the loop steers its SLP
/// vectoriser), which made the value gradient 4× slower than the forward. Four stored weights
/// of a row run together ([`vgrad_slots`]), so each load of `∂y` serves four multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn vgrad_avx512<R: Rows, const TB: usize>(
    r: &R,
    offs: &[usize],
    bases: &[usize],
    xp: &[f32],
    gyl: &[f32],
    a0: usize,
    n_rows: usize,
    gv: &mut [f32],
) {
    assert!(TB.is_multiple_of(16) && TB <= 64, "vgrad_avx512: TB = {TB}");
    let l = bases.len();
    let first = r.slots(a0).start;
    for p0 in (0..l).step_by(POSITION_BLOCK) {
        let block = &bases[p0..(p0 + POSITION_BLOCK).min(l)];
        for a in a0..a0 + n_rows {
            let gs = &gyl[(r.out_row(a) * l + p0) * TB..][..block.len() * TB];
            let slots = r.slots(a);
            let mut slot = slots.start;
            while slot + 4 <= slots.end {
                let o = [offs[slot], offs[slot + 1], offs[slot + 2], offs[slot + 3]];
                let sums = vgrad_slots::<TB, 4>(xp, o, block, gs);
                for (j, s) in sums.into_iter().enumerate() {
                    gv[slot + j - first] += s;
                }
                slot += 4;
            }
            for slot in slot..slots.end {
                let [s] = vgrad_slots::<TB, 1>(xp, [offs[slot]], block, gs);
                gv[slot - first] += s;
            }
        }
    }
}

/// The value-gradient sums of `S` stored weights (cell offsets `offs`) of one row over one
/// block of positions: `Σ_p ∂y[p] ⊙ xp[base(p) + off]` in 16-lane accumulators, then reduced
/// as [`sum_lanes`] does. Each weight's sum is the one it would have alone. (No closures
/// here: they would not inherit the target features.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
fn vgrad_slots<const TB: usize, const S: usize>(
    xp: &[f32],
    offs: [usize; S],
    block: &[usize],
    gs: &[f32],
) -> [f32; S] {
    use std::arch::x86_64::*;
    let mut out = [0f32; S];
    let (Some(&last), Some(&far)) = (block.iter().max(), offs.iter().max()) else {
        return out;
    };
    assert!((last + far + 1) * TB <= xp.len() && block.len() * TB <= gs.len());
    // Two 16-lane slices of the tile at a time (one for `TB = 16`), so that the `2·S`
    // accumulators and the loaded `∂y` stay in registers and enough independent
    // multiply-add chains are in flight; the slices' sums are folded in slice order afterwards.
    let mut parts = [[_mm512_setzero_ps(); 4]; S];
    let pair = if TB >= 32 { 2 } else { 1 };
    // Each weight's first cell, so that a load's address is that plus the position's `b · TB`
    // (one multiply per position instead of one per weight and position).
    // SAFETY: `offs[j] ≤ far`, inside `xp` (asserted above).
    let xs: [*const f32; S] = std::array::from_fn(|j| unsafe { xp.as_ptr().add(offs[j] * TB) });
    for c0 in (0..TB / 16).step_by(pair) {
        let mut acc = [[_mm512_setzero_ps(); S]; 2];
        for (pi, &b) in block.iter().enumerate() {
            let bt = b * TB;
            for (h, acc) in acc.iter_mut().enumerate().take(pair) {
                let c = c0 + h;
                // SAFETY: `pi < block.len()`, so `∂y`'s lanes `16c .. 16c + 16` of position
                // `pi` are inside `gs`; `b + offs[j] ≤ last + far`, so the cell's lanes are
                // inside `xp` (both asserted above).
                let gv = unsafe { _mm512_loadu_ps(gs.as_ptr().add(pi * TB + c * 16)) };
                for j in 0..S {
                    // SAFETY: as for `gv`.
                    let xv = unsafe { _mm512_loadu_ps(xs[j].add(bt + c * 16)) };
                    acc[j] = _mm512_fmadd_ps(gv, xv, acc[j]);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate().take(pair) {
            for j in 0..S {
                parts[j][c0 + h] = acc[j];
            }
        }
    }
    for j in 0..S {
        let mut sum = parts[j][0];
        for v in &parts[j][1..TB / 16] {
            sum = _mm512_add_ps(sum, *v);
        }
        let mut p = [0f32; 16];
        // SAFETY: `p` holds 16 floats.
        unsafe { _mm512_storeu_ps(p.as_mut_ptr(), sum) };
        let mut q = [0f32; 8];
        for i in 0..8 {
            q[i] = p[i] + p[i + 8];
        }
        out[j] = ((q[0] + q[4]) + (q[2] + q[6])) + ((q[1] + q[5]) + (q[3] + q[7]));
    }
    out
}

/// Adds the convolution of `x` with the stored rows of `r` into `y [batch, out, oh, ow]` (which
/// holds the bias, or zeros).
pub(crate) fn forward<R: Rows>(
    g: &Geometry,
    r: &R,
    values: &[f32],
    x: &[f32],
    y: &mut [f32],
    exec: Exec,
) {
    let (l, out, n_stored) = (g.l(), g.out, r.n_stored());
    let lanes = Lanes::new(g);
    let (offs, starts) = (slot_offsets(r, &lanes, values.len()), row_starts(r));
    let isa = exec.isa();
    let threads = exec.threads_for(values.len() * g.batch * l);
    let parts: Vec<&mut [f32]> = y.chunks_mut(LANES * out * l).collect();
    run_chunks(chunks(g), threads, parts, |ys, c, inner| {
        let n = c.len();
        macro_rules! go {
            ($tb:literal,) => {{
                scratch::with(lanes.cells(g) * $tb, |xp| {
                    lanes.images_to_lanes::<$tb>(g, x, c, xp);
                    let xp = &*xp;
                    // Every tile of `yl` is written by `dots_lanes`.
                    scratch::with(n_stored * l * $tb, |yl| {
                        let jobs = row_jobs(n_stored, l * $tb, inner, yl);
                        run_parallel(jobs, inner, |(a0, o)| {
                            let rows = &starts[a0..=a0 + o.len() / (l * $tb).max(1)];
                            dots_lanes::<$tb>(isa, values, &offs, rows, &lanes.bases, xp, o)
                        });
                        for a in 0..n_stored {
                            let dst = &mut ys[r.out_row(a) * l..];
                            from_lanes::<true>(&yl[a * l * $tb..], $tb, n, l, dst, out * l);
                        }
                    });
                });
            }};
        }
        with_tile!(n, go!());
    });
}

/// `∂x [batch, in, h, w]` of [`forward`] for `∂y [batch, out, oh, ow]`: gathered per input
/// cell ([`Gather`]) where [`gathers`] says so, scattered from the output positions otherwise.
pub(crate) fn input_grad<R: Rows>(
    g: &Geometry,
    r: &R,
    values: &[f32],
    gy: &[f32],
    exec: Exec,
) -> Vec<f32> {
    let per_sample = g.c * g.h * g.w;
    let mut gx = vec![0f32; g.batch * per_sample];
    let isa = exec.isa();
    let threads = exec.threads_for(values.len() * g.batch * g.l());
    let parts: Vec<&mut [f32]> = gx.chunks_mut(LANES * per_sample).collect();
    if gathers(g) {
        let ga = Gather::new(g, r, values);
        let plane = g.h * g.w;
        run_chunks(chunks(g), threads, parts, |gxs, c, inner| {
            macro_rules! go {
                ($tb:literal,) => {{
                    let n = c.len();
                    scratch::with(ga.cells(g) * $tb, |gyp| {
                        grad_lanes::<$tb>(g, gy, c, (ga.top, ga.left), gyp);
                        let gyp = &*gyp;
                        // `∂x` of the chunk in lanes, `[in][h·w][TB]`, every cell written by
                        // `dots_lanes`.
                        scratch::with(g.c * plane * $tb, |gl| {
                            let jobs = row_jobs(g.c, plane * $tb, inner, gl);
                            run_parallel(jobs, inner, |(c0, o)| {
                                let starts = &ga.starts[c0..=c0 + o.len() / (plane * $tb).max(1)];
                                let (v, offs) = (&ga.values, &ga.offs);
                                dots_lanes::<$tb>(isa, v, offs, starts, &ga.bases, gyp, o);
                            });
                            for ci in 0..g.c {
                                let (src, dst) = (&gl[ci * plane * $tb..], &mut gxs[ci * plane..]);
                                from_lanes::<false>(src, $tb, n, plane, dst, per_sample);
                            }
                        });
                    });
                }};
            }
            with_tile!(c.len(), go!());
        });
        return gx;
    }
    let lanes = Lanes::new(g);
    let offs = slot_offsets(r, &lanes, values.len());
    run_chunks(chunks(g), threads, parts, |gxs, c, _| {
        macro_rules! go {
            ($tb:literal,) => {{
                scratch::with(g.out * g.l() * $tb, |gyl| {
                    grad_lanes::<$tb>(g, gy, c, (0, 0), gyl);
                    // Accumulated into: zeroed first.
                    scratch::with(lanes.cells(g) * $tb, |gxp| {
                        gxp.fill(0.0);
                        igrad_lanes::<R, $tb>(isa, r, values, &offs, &lanes.bases, gyl, gxp);
                        lanes.lanes_to_images::<$tb>(g, gxp, gxs);
                    });
                });
            }};
        }
        with_tile!(c.len(), go!());
    });
    gx
}

/// Whether [`input_grad`] gathers: for stride 1 (the gather form needs it) when the input has
/// at most 1.5× as many positions as the output. The gather does `h · w` multiply-adds per
/// stored weight and sample, the scatter `oh · ow`, so it pays for a "same" convolution
/// (ResNet-18's 3×3, padding 1: equal counts, the gather ~1.6× faster on the kernel bench) and
/// not for an unpadded 5×5 (LeNet-5's conv2, 12×12 → 8×8: 2.25× the work, measured slower).
fn gathers(g: &Geometry) -> bool {
    g.spec.stride == 1 && 2 * g.h * g.w <= 3 * g.l()
}

/// The input gradient of a stride-1 convolution as a gather: the transposed convolution
/// `∂x[ci, iy, ix] = Σ_{row, ki, kj} W[row, ci, ki, kj] · ∂y[row, iy + p − ki·d, ix + p − kj·d]`
/// (`p` padding, `d` dilation, out-of-range `∂y` zero), each input cell summing its `TB`
/// lanes in registers and written once — where the scatter form (`igrad_body`) reads, adds and
/// writes back a cell of `∂xp` per stored weight and position. `∂y` goes into a zero-padded
/// lane layout `[out][gph][gpw][TB]` so that every term is a cell at a fixed offset from the
/// input position's base cell, as in the forward: `base(iy, ix) = (iy + ay)·gpw + ix + ax` and,
/// per stored weight, `off = (row·gph + (kh − 1 − ki)·d)·gpw + (kw − 1 − kj)·d`. The stored
/// weights are bucketed by input channel (in stored-row, then slot order: a fixed order per
/// cell), so channels split over threads with no shared writes.
struct Gather {
    gph: usize,
    gpw: usize,
    /// Rows and columns of zeros above and left of `∂y` in its padded layout.
    top: usize,
    left: usize,
    /// `base(iy, ix)` for the `h · w` input positions, row-major.
    bases: Vec<usize>,
    /// Bucket `ci` is `starts[ci]..starts[ci + 1]` of `values` / `offs`.
    starts: Vec<usize>,
    values: Vec<f32>,
    offs: Vec<usize>,
}

impl Gather {
    fn new<R: Rows>(g: &Geometry, r: &R, values: &[f32]) -> Self {
        debug_assert_eq!(g.spec.stride, 1);
        let (d, pad) = (g.spec.dilation, g.spec.padding);
        let (reach_y, reach_x) = ((g.kh - 1) * d, (g.kw - 1) * d);
        let (top, left) = (reach_y.saturating_sub(pad), reach_x.saturating_sub(pad));
        let (gph, gpw) = (g.oh + 2 * top, g.ow + 2 * left);
        let (ay, ax) = (pad.saturating_sub(reach_y), pad.saturating_sub(reach_x));
        let bases = (0..g.h)
            .flat_map(|iy| (0..g.w).map(move |ix| (iy + ay) * gpw + ix + ax))
            .collect();
        let kk = g.kh * g.kw;
        let mut starts = vec![0usize; g.c + 1];
        for a in 0..r.n_stored() {
            for (_, col) in r.entries(a) {
                starts[col / kk + 1] += 1;
            }
        }
        for ci in 0..g.c {
            starts[ci + 1] += starts[ci];
        }
        let mut next = starts.clone();
        let (mut vals, mut offs) = (vec![0f32; values.len()], vec![0usize; values.len()]);
        for a in 0..r.n_stored() {
            let row = r.out_row(a);
            for (slot, col) in r.entries(a) {
                let (ci, ki, kj) = (col / kk, col % kk / g.kw, col % g.kw);
                let i = next[ci];
                next[ci] += 1;
                vals[i] = values[slot];
                offs[i] = (row * gph + (g.kh - 1 - ki) * d) * gpw + (g.kw - 1 - kj) * d;
            }
        }
        Gather {
            gph,
            gpw,
            top,
            left,
            bases,
            starts,
            values: vals,
            offs,
        }
    }

    /// Cells of the padded `∂y` layout, `out · gph · gpw`.
    fn cells(&self, g: &Geometry) -> usize {
        g.out * self.gph * self.gpw
    }
}

/// Adds the gradient of the stored values (slot order) of [`forward`] into `gv`.
pub(crate) fn value_grad<R: Rows>(
    g: &Geometry,
    r: &R,
    x: &[f32],
    gy: &[f32],
    gv: &mut [f32],
    exec: Exec,
) {
    let lanes = Lanes::new(g);
    let offs = slot_offsets(r, &lanes, gv.len());
    let isa = exec.isa();
    let threads = exec.threads_for(gv.len() * g.batch * g.l());
    let chunks = chunks(g);
    // One partial gradient per chunk, summed in chunk order below.
    let mut partials = vec![0f32; chunks.len() * gv.len()];
    let parts: Vec<&mut [f32]> = partials.chunks_mut(gv.len().max(1)).collect();
    run_chunks(chunks, threads, parts, |part, c, inner| {
        macro_rules! go {
            ($tb:literal,) => {{
                scratch::with(lanes.cells(g) * $tb, |xp| {
                    scratch::with(g.out * g.l() * $tb, |gyl| {
                        lanes.images_to_lanes::<$tb>(g, x, c.clone(), xp);
                        grad_lanes::<$tb>(g, gy, c, (0, 0), gyl);
                        let (xp, gyl, bases) = (&*xp, &*gyl, &lanes.bases);
                        let (ranges, lens) = row_ranges(r, inner);
                        let jobs: Vec<_> =
                            ranges.into_iter().zip(split_lengths(part, &lens)).collect();
                        run_parallel(jobs, inner, |(rows, out)| {
                            let (a0, n) = (rows.start, rows.len());
                            #[cfg(target_arch = "x86_64")]
                            if $tb >= 16 && isa == crate::Isa::Avx512 {
                                // SAFETY: `Isa::Avx512` reaches a kernel only when the CPU
                                // supports it (`Exec`).
                                unsafe {
                                    vgrad_avx512::<R, $tb>(r, &offs, bases, xp, gyl, a0, n, out)
                                };
                                return;
                            }
                            vgrad_lanes::<R, $tb>(isa, r, &offs, bases, xp, gyl, a0, n, out)
                        });
                    });
                });
            }};
        }
        with_tile!(c.len(), go!());
    });
    for p in partials.chunks(gv.len().max(1)) {
        for (a, b) in gv.iter_mut().zip(p) {
            *a += b;
        }
    }
}
