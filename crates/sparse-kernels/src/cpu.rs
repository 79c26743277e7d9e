//! CPU kernels: linear forward, input gradient and value gradient on any [`SparseWeight`].
//!
//! Loop design (docs/algorithms.md §9 explains why the SRigL reference's
//! gather-multiply-reduce is slow at large batches):
//! - **batch 1** (online inference): one pass over each stored row, values and indices streamed
//!   once, the input gathered from cache, 8 independent partial sums per row;
//! - **batch > 1**: the input is transposed into feature-major batch tiles
//!   `[tiles][fan_in][TB]` (zero-padded), so each stored weight does one contiguous SIMD
//!   `axpy` over `TB` batch entries (weight-stationary, like the SRigL paper's fastest GPU
//!   variant); tiles are walked outermost so that one tile of the input (`fan_in · TB` floats)
//!   stays in L2 while every row uses it.
//!
//! Threads: forward and value gradient split the stored rows, the input gradient splits batch
//! tiles (rows would collide on the same inputs). Every output element is computed by one
//! thread in a fixed order, so results are bit-identical for any thread count.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::isa::{multiversion, Isa};
use crate::rows::{Rows, RowsVisitor, Transposed};
use crate::simd::{axpy_tile, dot_tile, madd, tile, tile_mut};
use crate::{Exec, KernelError, SparseWeight};

type Result<T> = std::result::Result<T, KernelError>;

pub(crate) fn check(what: &'static str, found: usize, expected: usize) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(KernelError::Shape {
            what,
            expected,
            found,
        })
    }
}

/// `y = x · Wᵀ + bias` for `x [batch, fan_in]`; returns `y [batch, rows]`.
///
/// `values` are the weight's stored values in the layout's slot order (normally
/// `w.values()`, but a training loop passes its current ones). Rows the layout does not store
/// (ablated neurons of a condensed layer) output their bias.
pub fn forward<'a>(
    w: impl Into<SparseWeight<'a>>,
    values: &[f32],
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    exec: Exec,
) -> Result<Vec<f32>> {
    let w = w.into();
    // `forward_into` starts from the bias: built row by row here instead of zeroed first.
    let mut y = Vec::with_capacity(batch * w.rows());
    match bias {
        Some(b) if b.len() == w.rows() => (0..batch).for_each(|_| y.extend_from_slice(b)),
        _ => y.resize(batch * w.rows(), 0.0),
    }
    forward_impl(w, values, bias, x, batch, &mut y, exec, false)?;
    Ok(y)
}

/// [`forward`] writing into `y [batch, rows]` (overwritten).
pub fn forward_into<'a>(
    w: impl Into<SparseWeight<'a>>,
    values: &[f32],
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
    exec: Exec,
) -> Result<()> {
    forward_impl(w.into(), values, bias, x, batch, y, exec, true)
}

/// The forward; `init`: first overwrite `y` with the bias (or zeros), else `y` already holds it.
#[allow(clippy::too_many_arguments)]
fn forward_impl(
    w: SparseWeight<'_>,
    values: &[f32],
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
    exec: Exec,
    init: bool,
) -> Result<()> {
    let (rows, fan_in) = (w.rows(), w.fan_in());
    check("values", values.len(), w.nnz())?;
    check("x", x.len(), batch * fan_in)?;
    check("y", y.len(), batch * rows)?;
    if let Some(b) = bias {
        check("bias", b.len(), rows)?;
    }
    if init {
        for yb in y.chunks_exact_mut(rows.max(1)) {
            match bias {
                Some(b) => yb.copy_from_slice(b),
                None => yb.fill(0.0),
            }
        }
    }
    if batch == 0 || rows == 0 {
        return Ok(());
    }
    w.with_rows(Forward {
        values,
        x,
        batch,
        fan_in,
        rows,
        y,
        exec,
    });
    Ok(())
}

/// `grad_x = grad_y · W` for `grad_y [batch, rows]`; returns `grad_x [batch, fan_in]`.
///
/// Walks the weight's rows and scatters into `grad_x`, or, where [`gathers`] says so, runs
/// the forward kernel over the weight's transpose (built here; [`input_grad_with`] takes a kept
/// one, as [`crate::ops`] does).
pub fn input_grad<'a>(
    w: impl Into<SparseWeight<'a>>,
    values: &[f32],
    grad_y: &[f32],
    batch: usize,
    exec: Exec,
) -> Result<Vec<f32>> {
    input_grad_with(w.into(), None, values, grad_y, batch, exec)
}

/// Whether the batched input gradient of a `rows × fan_in` weight gathers over the weight's
/// transpose (a forward product: ∂y's batch tile is read, each ∂x element summed in registers
/// and written once) rather than scattering (∂x's batch tile read and written per stored
/// weight). Measured on the kernel bench (`--op input_grad`, 1 thread): the gather wins at
/// full 64-example tiles when ∂y's tile is not larger than ∂x's (3072→768 and 4096→4096 at 90%:
/// 1.1–1.8×, 2:4 1.3×) and loses where it is (768→3072, 0.75×) and at 16-example tiles, where
/// its one chain of FMAs per tile waits on itself (0.5×).
pub fn gathers(batch: usize, rows: usize, fan_in: usize) -> bool {
    batch > 32 && rows <= fan_in
}

/// [`input_grad`] with the weight's transpose if the caller keeps one ([`Transposed::of`] the
/// same `w`; `None`: built here when [`gathers`] says the product needs it).
pub fn input_grad_with(
    w: SparseWeight<'_>,
    transposed: Option<&Transposed>,
    values: &[f32],
    grad_y: &[f32],
    batch: usize,
    exec: Exec,
) -> Result<Vec<f32>> {
    let (rows, fan_in) = (w.rows(), w.fan_in());
    check("values", values.len(), w.nnz())?;
    check("grad_y", grad_y.len(), batch * rows)?;
    if batch == 0 || fan_in == 0 {
        return Ok(vec![0.0; batch * fan_in]);
    }
    if !gathers(batch, rows, fan_in) {
        return Ok(w.with_rows(InputGrad {
            values,
            grad_y,
            batch,
            fan_in,
            rows,
            exec,
        }));
    }
    let built;
    let t = match transposed {
        Some(t) if t.dims() != (rows, fan_in, w.nnz()) => {
            let (r, f, n) = t.dims();
            return Err(KernelError::Unsupported(format!(
                "input_grad_with: the transpose was built from a {r}x{f} weight with {n} \
                 stored values, not this {rows}x{fan_in} one with {}",
                w.nnz()
            )));
        }
        Some(t) => t,
        None => {
            built = Transposed::of(w);
            &built
        }
    };
    // `∂x [batch, fan_in] = ∂y [batch, rows] · W`: the forward product of `Wᵀ`.
    let values_t = t.gather_values(values, exec.threads_for(values.len() * batch));
    let mut gx = vec![0.0; batch * fan_in];
    Forward {
        values: &values_t,
        x: grad_y,
        batch,
        fan_in: rows,
        rows: fan_in,
        y: &mut gx,
        exec,
    }
    .visit(&t.rows());
    Ok(gx)
}

/// The gradient of the stored values: `grad_v[slot] = Σ_b grad_y[b, row] · x[b, col]` for each
/// stored `(row, col)`. Returns one entry per stored value (slot order); the dense weight
/// gradient is never formed.
pub fn value_grad<'a>(
    w: impl Into<SparseWeight<'a>>,
    x: &[f32],
    grad_y: &[f32],
    batch: usize,
    exec: Exec,
) -> Result<Vec<f32>> {
    let w = w.into();
    check("x", x.len(), batch * w.fan_in())?;
    check("grad_y", grad_y.len(), batch * w.rows())?;
    let mut gv = vec![0.0; w.nnz()];
    if batch == 0 || gv.is_empty() {
        return Ok(gv);
    }
    w.with_rows(ValueGrad {
        x,
        grad_y,
        batch,
        fan_in: w.fan_in(),
        rows: w.rows(),
        gv: &mut gv,
        exec,
    });
    Ok(gv)
}

/// Writes the 4×4 block of `src [_, cols]` at rows `l..l + 4`, columns `c..c + 4` transposed
/// into `slab`: column `c + j` at `slab[(c + j) · tb + l ..][..4]`.
#[inline(always)]
fn transpose4(
    src: &[f32],
    cols: usize,
    l: usize,
    c: usize,
    slab: &mut [MaybeUninit<f32>],
    tb: usize,
) {
    assert!((l + 3) * cols + c + 4 <= src.len() && (c + 3) * tb + l + 4 <= slab.len());
    // SAFETY: the block's four source rows and four destination runs are inside `src` and
    // `slab` (asserted), which are distinct slices.
    unsafe {
        crate::transpose::block4(
            src.as_ptr().add(l * cols + c),
            cols,
            slab.as_mut_ptr().add(c * tb + l) as *mut f32,
            tb,
        )
    };
}

/// Copies `src [n, cols]` into batch tiles `[ceil(n / TB)][cols][TB]`, zero-padded.
fn to_tiles<const TB: usize>(src: &[f32], n: usize, cols: usize, threads: usize) -> Vec<f32> {
    // Blocked over columns so that the TB source rows of a tile and the written block of the
    // slab both stay in L1 (the naive row-by-row scatter was most of a 99%-sparse forward).
    const CB: usize = 64;
    let tiles = n.div_ceil(TB);
    let len = tiles * cols * TB;
    // Written once, without zeroing first: zero-filling the buffer and then the tiles was a
    // quarter of a batch-256 forward of a small layer.
    let mut dst: Vec<f32> = Vec::with_capacity(len);
    let fill = |(t, slab): (usize, &mut [MaybeUninit<f32>])| {
        let rows = TB.min(n - t * TB);
        let src = &src[t * TB * cols..(t * TB + rows) * cols];
        for c0 in (0..cols).step_by(CB) {
            let c1 = (c0 + CB).min(cols);
            // 4×4 blocks transposed in registers (element by element, every store was a
            // separate strided write and the copy cost as much as the product), then the
            // ragged edges one by one.
            let (l4, c4) = (rows / 4 * 4, c0 + (c1 - c0) / 4 * 4);
            for l in (0..l4).step_by(4) {
                for c in (c0..c4).step_by(4) {
                    transpose4(src, cols, l, c, slab, TB);
                }
            }
            for l in 0..rows {
                let row = &src[l * cols..(l + 1) * cols];
                let cs = if l < l4 { c4..c1 } else { c0..c1 };
                for c in cs {
                    slab[c * TB + l].write(row[c]);
                }
            }
            // The padding lanes of the last tile.
            for c in c0..c1 {
                for lane in &mut slab[c * TB + rows..(c + 1) * TB] {
                    lane.write(0.0);
                }
            }
        }
    };
    if cols > 0 {
        let spare = &mut dst.spare_capacity_mut()[..len];
        // Tiles are independent: on several threads each fills its own (a serial copy here was
        // a third of a 2-thread batch-256 forward).
        if threads > 1 && tiles > 1 {
            spare
                .par_chunks_exact_mut(cols * TB)
                .enumerate()
                .for_each(fill);
        } else {
            spare.chunks_exact_mut(cols * TB).enumerate().for_each(fill);
        }
    }
    // SAFETY: `fill` wrote every element of every slab (lanes `0..rows` from `src`, the rest
    // 0), and the slabs cover `0..len`; with `cols == 0`, `len` is 0.
    unsafe { dst.set_len(len) };
    dst
}

/// Inverse of [`to_tiles`]: writes the first `n` batch entries back to `dst [n, cols]`.
fn from_tiles<const TB: usize>(tiles: &[f32], n: usize, cols: usize, dst: &mut [f32]) {
    for t in 0..n.div_ceil(TB) {
        let rows = TB.min(n - t * TB);
        let slab = &tiles[t * cols * TB..(t + 1) * cols * TB];
        crate::transpose::from_lanes::<false>(
            slab,
            TB,
            rows,
            cols,
            &mut dst[t * TB * cols..],
            cols,
        );
    }
}

/// Runs `f(tile width)` with the tile width for a batch: the smallest of 8/16/32/64 that holds
/// it, 64 beyond.
macro_rules! with_tile {
    ($batch:expr, $f:ident!($($args:tt)*)) => {
        match $batch {
            0..=8 => $f!(8, $($args)*),
            9..=16 => $f!(16, $($args)*),
            17..=32 => $f!(32, $($args)*),
            _ => $f!(64, $($args)*),
        }
    };
}
pub(crate) use with_tile;

/// Splits `0..n` into at most `parts` contiguous ranges of nearly equal size.
fn split_ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts)
        .map(|i| (i * n / parts)..((i + 1) * n / parts))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Splits `buf` into consecutive pieces of the given lengths.
pub(crate) fn split_lengths<'b, T>(mut buf: &'b mut [T], lens: &[usize]) -> Vec<&'b mut [T]> {
    let mut out = Vec::with_capacity(lens.len());
    for &l in lens {
        let (head, tail) = buf.split_at_mut(l);
        out.push(head);
        buf = tail;
    }
    out
}

/// Runs `job` on each item, on `threads` rayon workers when `threads > 1`.
pub(crate) fn run_parallel<T: Send>(items: Vec<T>, threads: usize, job: impl Fn(T) + Sync + Send) {
    if threads > 1 && items.len() > 1 {
        items.into_par_iter().for_each(job);
    } else {
        items.into_iter().for_each(job);
    }
}

// ---------------------------------------------------------------------------------------------
// Forward

struct Forward<'a> {
    values: &'a [f32],
    x: &'a [f32],
    batch: usize,
    fan_in: usize,
    rows: usize,
    y: &'a mut [f32],
    exec: Exec,
}

fn fwd_gather<R: Rows>(isa: Isa, r: &R, values: &[f32], x: &[f32], a0: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = r.gather_dot(isa, a0 + i, values, x);
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fwd_tiled_body<R: Rows, const TB: usize, const FMA: bool>(
    r: &R,
    values: &[f32],
    xt: &[f32],
    batch: usize,
    fan_in: usize,
    a0: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let n_rows = out.len() / batch;
    for t in 0..batch.div_ceil(TB) {
        let xs = &xt[t * fan_in * TB..(t + 1) * fan_in * TB];
        let b0 = t * TB;
        let bn = TB.min(batch - b0);
        for i in 0..n_rows {
            let mut acc = [0.0f32; TB];
            for (slot, col) in r.entries(a0 + i) {
                axpy_tile::<TB, FMA>(&mut acc, values[slot], tile::<TB>(xs, col));
            }
            for (o, &v) in out[i * batch + b0..i * batch + b0 + bn]
                .iter_mut()
                .zip(&acc[..bn])
            {
                o.write(v);
            }
        }
    }
}
multiversion!(fn fwd_tiled<R: Rows; const TB: usize>(r: &R, values: &[f32], xt: &[f32], batch: usize, fan_in: usize, a0: usize, out: &mut [MaybeUninit<f32>]) => fwd_tiled_body);

/// The batched forward on an input already in batch tiles (`xt [ceil(cols / TB)][fan_in][TB]`,
/// see [`to_tiles`]): returns `acc [n_stored, cols]`, stored row `a`'s products with every
/// column, computed on `threads` workers that split the stored rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_tiles<R: Rows, const TB: usize>(
    isa: Isa,
    r: &R,
    values: &[f32],
    xt: &[f32],
    cols: usize,
    fan_in: usize,
    threads: usize,
) -> Vec<f32> {
    let n = r.n_stored();
    // Every entry is written by exactly one job (each writes all `cols` outputs of its rows),
    // so the buffer is not zeroed first.
    let mut acc: Vec<f32> = Vec::with_capacity(n * cols);
    run_parallel(
        row_jobs(n, cols, threads, &mut acc.spare_capacity_mut()[..n * cols]),
        threads,
        |(a0, out)| fwd_tiled::<R, TB>(isa, r, values, xt, cols, fan_in, a0, out),
    );
    // SAFETY: the jobs cover stored rows `0..n`, and `fwd_tiled` writes outputs `0..cols` of
    // each of its rows (every tile's `bn` entries, the tiles covering `0..cols`).
    unsafe { acc.set_len(n * cols) };
    acc
}

/// `buf` (`per` outputs for each of `n` stored rows) split for at most `threads` workers:
/// (first stored row, its outputs) per job.
pub(crate) fn row_jobs<T>(
    n: usize,
    per: usize,
    threads: usize,
    buf: &mut [T],
) -> Vec<(usize, &mut [T])> {
    let ranges = split_ranges(n, threads);
    let lens: Vec<usize> = ranges.iter().map(|g| g.len() * per).collect();
    ranges
        .iter()
        .map(|g| g.start)
        .zip(split_lengths(buf, &lens))
        .collect()
}

impl RowsVisitor for Forward<'_> {
    type Out = ();
    fn visit<R: Rows>(self, r: &R) {
        let Forward {
            values,
            x,
            batch,
            fan_in,
            rows,
            y,
            exec,
        } = self;
        let isa = exec.isa();
        let threads = exec.threads_for(values.len() * batch);
        let n = r.n_stored();
        // Per stored row, `batch` outputs (row-major by stored row), then scattered into y.
        let acc = if batch == 1 {
            let mut acc = vec![0.0f32; n];
            run_parallel(row_jobs(n, 1, threads, &mut acc), threads, |(a0, out)| {
                fwd_gather(isa, r, values, x, a0, out)
            });
            acc
        } else {
            macro_rules! go {
                ($tb:literal,) => {{
                    let xt = to_tiles::<$tb>(x, batch, fan_in, threads);
                    forward_tiles::<R, $tb>(isa, r, values, &xt, batch, fan_in, threads)
                }};
            }
            with_tile!(batch, go!())
        };
        // A transpose of `acc [n, batch]` into the columns of `y [batch, rows]`, in blocks of
        // 16 stored rows so that the writes of one batch entry stay within a few cache lines
        // (row by row, every write touched a new line of `y`). Four stored rows that land in
        // four consecutive rows of `y` (every row of a layer with no ablated neurons) move
        // with four batch entries as one 4×4 block, transposed in registers
        // (`transpose::block4_add`: scalar, this add was 4% of a wide-MLP sparse step); the
        // rest entry by entry. Each `y` element still gets exactly one addition; threads take
        // disjoint ranges of batch entries.
        const BLOCK: usize = 16;
        let per = batch.div_ceil(threads);
        let transpose = |(part, ys): (usize, &mut [f32])| {
            let b0 = part * per;
            let nb = ys.len() / rows.max(1);
            let nb4 = nb / 4 * 4;
            for a0 in (0..n).step_by(BLOCK) {
                let a1 = (a0 + BLOCK).min(n);
                let out: [usize; BLOCK] = std::array::from_fn(|i| r.out_row((a0 + i).min(a1 - 1)));
                // Groups of four stored rows whose outputs are consecutive rows of `y`.
                let quads = |i: usize| a0 + i + 4 <= a1 && (1..4).all(|k| out[i + k] == out[i] + k);
                let blocked: [bool; BLOCK / 4] = std::array::from_fn(|q| quads(4 * q));
                for (q, _) in blocked.iter().enumerate().filter(|(_, &b)| b) {
                    let (a, o) = (a0 + 4 * q, out[4 * q]);
                    assert!((a + 3) * batch + b0 + nb4 <= acc.len() && o + 4 <= rows);
                    for bi in (0..nb4).step_by(4) {
                        // SAFETY: stored rows `a..a + 4` at batch entries `b0 + bi .. + 4` are
                        // inside `acc`, and `y` rows `bi..bi + 4 ≤ nb` of this part at outputs
                        // `o..o + 4 ≤ rows` inside `ys` (asserted above); distinct buffers.
                        unsafe {
                            crate::transpose::block4_add(
                                acc.as_ptr().add(a * batch + b0 + bi),
                                batch,
                                ys.as_mut_ptr().add(bi * rows + o),
                                rows,
                            )
                        };
                    }
                }
                if nb4 == nb && a1 - a0 == BLOCK && blocked.iter().all(|&b| b) {
                    continue;
                }
                for (bi, yb) in ys.chunks_exact_mut(rows).enumerate() {
                    let b = b0 + bi;
                    for (q, &done) in blocked.iter().enumerate() {
                        if done && bi < nb4 {
                            continue;
                        }
                        for i in 4 * q..(4 * q + 4).min(a1 - a0) {
                            yb[out[i]] += acc[(a0 + i) * batch + b];
                        }
                    }
                }
            }
        };
        if threads > 1 && batch > 1 {
            y.par_chunks_mut(per * rows).enumerate().for_each(transpose);
        } else {
            transpose((0, y));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Input gradient

struct InputGrad<'a> {
    values: &'a [f32],
    grad_y: &'a [f32],
    batch: usize,
    fan_in: usize,
    rows: usize,
    exec: Exec,
}

#[inline(always)]
fn igrad_single_body<R: Rows, const FMA: bool>(r: &R, values: &[f32], gy: &[f32], gx: &mut [f32]) {
    for a in 0..r.n_stored() {
        let g = gy[r.out_row(a)];
        for (slot, col) in r.entries(a) {
            gx[col] = madd::<FMA>(g, values[slot], gx[col]);
        }
    }
}
multiversion!(fn igrad_single<R: Rows;>(r: &R, values: &[f32], gy: &[f32], gx: &mut [f32]) => igrad_single_body);

#[inline(always)]
fn igrad_tile_body<R: Rows, const TB: usize, const FMA: bool>(
    r: &R,
    values: &[f32],
    gys: &[f32],
    gxs: &mut [f32],
) {
    for a in 0..r.n_stored() {
        let g = tile::<TB>(gys, r.out_row(a));
        for (slot, col) in r.entries(a) {
            axpy_tile::<TB, FMA>(tile_mut::<TB>(gxs, col), values[slot], g);
        }
    }
}
multiversion!(fn igrad_tile<R: Rows; const TB: usize>(r: &R, values: &[f32], gys: &[f32], gxs: &mut [f32]) => igrad_tile_body);

/// The batched input gradient on `∂y` already in batch tiles (`gyt [ceil(cols / TB)][rows][TB]`):
/// returns `∂x` in batch tiles (`[ceil(cols / TB)][fan_in][TB]`), on `threads` workers that
/// split the tiles.
#[allow(clippy::too_many_arguments)]
pub(crate) fn input_grad_tiles<R: Rows, const TB: usize>(
    isa: Isa,
    r: &R,
    values: &[f32],
    gyt: &[f32],
    cols: usize,
    fan_in: usize,
    rows: usize,
    threads: usize,
) -> Vec<f32> {
    let mut gxt = vec![0.0f32; cols.div_ceil(TB) * fan_in * TB];
    let jobs: Vec<_> = gxt
        .chunks_mut(fan_in * TB)
        .zip(gyt.chunks(rows * TB))
        .collect();
    run_parallel(jobs, threads, |(gxs, gys)| {
        igrad_tile::<R, TB>(isa, r, values, gys, gxs)
    });
    gxt
}

impl RowsVisitor for InputGrad<'_> {
    type Out = Vec<f32>;
    fn visit<R: Rows>(self, r: &R) -> Vec<f32> {
        let InputGrad {
            values,
            grad_y,
            batch,
            fan_in,
            rows,
            exec,
        } = self;
        let isa = exec.isa();
        let threads = exec.threads_for(values.len() * batch);
        let mut gx = vec![0.0; batch * fan_in];
        if batch == 1 {
            igrad_single(isa, r, values, grad_y, &mut gx);
            return gx;
        }
        macro_rules! go {
            ($tb:literal,) => {{
                let gyt = to_tiles::<$tb>(grad_y, batch, rows, threads);
                let gxt =
                    input_grad_tiles::<R, $tb>(isa, r, values, &gyt, batch, fan_in, rows, threads);
                from_tiles::<$tb>(&gxt, batch, fan_in, &mut gx);
            }};
        }
        with_tile!(batch, go!());
        gx
    }
}

// ---------------------------------------------------------------------------------------------
// Value gradient

struct ValueGrad<'a> {
    x: &'a [f32],
    grad_y: &'a [f32],
    batch: usize,
    fan_in: usize,
    rows: usize,
    gv: &'a mut [f32],
    exec: Exec,
}

#[inline(always)]
fn vgrad_single_body<R: Rows, const FMA: bool>(
    r: &R,
    x: &[f32],
    gy: &[f32],
    a0: usize,
    n_rows: usize,
    gv: &mut [f32],
) {
    let base = r.slots(a0).start;
    for a in a0..a0 + n_rows {
        let g = gy[r.out_row(a)];
        for (slot, col) in r.entries(a) {
            gv[slot - base] = g * x[col];
        }
    }
}
multiversion!(fn vgrad_single<R: Rows;>(r: &R, x: &[f32], gy: &[f32], a0: usize, n_rows: usize, gv: &mut [f32]) => vgrad_single_body);

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn vgrad_tiled_body<R: Rows, const TB: usize, const FMA: bool>(
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
    let base = r.slots(a0).start;
    for t in 0..tiles {
        let xs = &xt[t * fan_in * TB..(t + 1) * fan_in * TB];
        let gys = &gyt[t * rows * TB..(t + 1) * rows * TB];
        for a in a0..a0 + n_rows {
            let g = tile::<TB>(gys, r.out_row(a));
            for (slot, col) in r.entries(a) {
                gv[slot - base] += dot_tile::<TB, FMA>(g, tile::<TB>(xs, col));
            }
        }
    }
}
multiversion!(fn vgrad_tiled<R: Rows; const TB: usize>(r: &R, xt: &[f32], gyt: &[f32], tiles: usize, fan_in: usize, rows: usize, a0: usize, n_rows: usize, gv: &mut [f32]) => vgrad_tiled_body);

impl RowsVisitor for ValueGrad<'_> {
    type Out = ();
    fn visit<R: Rows>(self, r: &R) {
        let ValueGrad {
            x,
            grad_y,
            batch,
            fan_in,
            rows,
            gv,
            exec,
        } = self;
        let isa = exec.isa();
        let threads = exec.threads_for(gv.len() * batch);
        if batch == 1 {
            let (ranges, lens) = row_ranges(r, threads);
            let jobs: Vec<_> = ranges.into_iter().zip(split_lengths(gv, &lens)).collect();
            run_parallel(jobs, threads, |(g, out)| {
                vgrad_single(isa, r, x, grad_y, g.start, g.len(), out)
            });
            return;
        }
        macro_rules! go {
            ($tb:literal,) => {{
                let xt = to_tiles::<$tb>(x, batch, fan_in, threads);
                let gyt = to_tiles::<$tb>(grad_y, batch, rows, threads);
                value_grad_tiles::<R, $tb>(isa, r, &xt, &gyt, batch, fan_in, rows, threads, gv);
            }};
        }
        with_tile!(batch, go!());
    }
}

/// The stored rows split into at most `threads` ranges, and the number of value slots of each.
pub(crate) fn row_ranges<R: Rows>(
    r: &R,
    threads: usize,
) -> (Vec<std::ops::Range<usize>>, Vec<usize>) {
    let ranges = split_ranges(r.n_stored(), threads);
    let lens = ranges
        .iter()
        .map(|g| r.slots(g.end - 1).end - r.slots(g.start).start)
        .collect();
    (ranges, lens)
}

/// The batched value gradient on `x` and `∂y` already in batch tiles (`xt
/// [ceil(cols / TB)][fan_in][TB]`, `gyt [ceil(cols / TB)][rows][TB]`), **added** to `gv` (one
/// entry per stored value), on `threads` workers that split the stored rows. Each entry sums
/// the tiles in order, so calling this once per chunk of columns, chunks in order, gives the
/// same bits for any thread count.
#[allow(clippy::too_many_arguments)]
pub(crate) fn value_grad_tiles<R: Rows, const TB: usize>(
    isa: Isa,
    r: &R,
    xt: &[f32],
    gyt: &[f32],
    cols: usize,
    fan_in: usize,
    rows: usize,
    threads: usize,
    gv: &mut [f32],
) {
    if r.n_stored() == 0 || cols == 0 {
        return;
    }
    let tiles = cols.div_ceil(TB);
    let (ranges, lens) = row_ranges(r, threads);
    let jobs: Vec<_> = ranges.into_iter().zip(split_lengths(gv, &lens)).collect();
    #[cfg(target_arch = "x86_64")]
    if TB >= 16 && isa == Isa::Avx512 {
        run_parallel(jobs, threads, |(g, out)| {
            let (a0, n) = (g.start, g.len());
            // SAFETY: `Isa::Avx512` reaches a kernel only when the CPU supports it (`Exec`);
            // the tiles have the layout the kernel documents, for the tile width `TB` that the
            // match picks.
            unsafe {
                use crate::vgrad512::vgrad_tiled_avx512 as k;
                match TB {
                    16 => k::<R, 16>(r, xt, gyt, tiles, fan_in, rows, a0, n, out),
                    32 => k::<R, 32>(r, xt, gyt, tiles, fan_in, rows, a0, n, out),
                    _ => k::<R, 64>(r, xt, gyt, tiles, fan_in, rows, a0, n, out),
                }
            }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        run_parallel(jobs, threads, |(g, out)| {
            // SAFETY: `Isa::Avx2` reaches a kernel only when the CPU supports it (`Exec`); the
            // tiles have the layout the kernel documents.
            unsafe {
                crate::vgrad256::vgrad_tiled_avx2::<R, TB>(
                    r,
                    xt,
                    gyt,
                    tiles,
                    fan_in,
                    rows,
                    g.start,
                    g.len(),
                    out,
                )
            }
        });
        return;
    }
    run_parallel(jobs, threads, |(g, out)| {
        vgrad_tiled::<R, TB>(isa, r, xt, gyt, tiles, fan_in, rows, g.start, g.len(), out)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked, register-transposed copy against the definition, on shapes with ragged
    /// edges in both directions (rows and columns not multiples of 4), on 1 and 2 threads.
    #[test]
    fn tiles_equal_the_definition_on_ragged_shapes() {
        fn check<const TB: usize>(n: usize, cols: usize) {
            let src: Vec<f32> = (0..n * cols).map(|v| v as f32 + 0.5).collect();
            let mut want = vec![0.0; n.div_ceil(TB) * cols * TB];
            for b in 0..n {
                for c in 0..cols {
                    want[(b / TB) * cols * TB + c * TB + b % TB] = src[b * cols + c];
                }
            }
            for threads in [1, 2] {
                assert_eq!(
                    to_tiles::<TB>(&src, n, cols, threads),
                    want,
                    "{n}×{cols}, TB {TB}"
                );
            }
        }
        for (n, cols) in [
            (70, 37),
            (64, 8),
            (5, 130),
            (130, 1),
            (3, 4),
            (0, 9),
            (9, 0),
        ] {
            check::<8>(n, cols);
            check::<64>(n, cols);
        }
    }

    #[test]
    fn tiles_round_trip_and_pad_with_zeros() {
        let src: Vec<f32> = (0..10 * 3).map(|v| v as f32).collect();
        let t = to_tiles::<8>(&src, 10, 3, 1);
        assert_eq!(to_tiles::<8>(&src, 10, 3, 2), t, "threads change nothing");
        assert_eq!(t.len(), 2 * 3 * 8);
        // Column 1 of batch entry 9 sits in tile 1, lane 1.
        assert_eq!(t[(3 + 1) * 8 + 1], src[9 * 3 + 1]);
        // Padding lanes are zero.
        assert_eq!(t[(3 + 1) * 8 + 2], 0.0);
        let mut back = vec![0.0; 30];
        from_tiles::<8>(&t, 10, 3, &mut back);
        assert_eq!(back, src);
    }

    #[test]
    fn ranges_cover_everything_once() {
        for (n, p) in [(0, 3), (1, 4), (7, 3), (10, 10), (5, 1)] {
            let r = split_ranges(n, p);
            let flat: Vec<usize> = r.iter().flat_map(|g| g.clone()).collect();
            assert_eq!(flat, (0..n).collect::<Vec<_>>());
            assert!(r.len() <= p.max(1));
        }
    }
}
