//! [`ColumnBlocked`]: an unstructured sparse weight laid out for batched training products
//! whose input tiles stay in L1.
//!
//! The batched kernels of [`crate::cpu`] keep a batch tile of the input (`fan_in × 64`
//! examples, 768 KiB for a fan-in of 3072) in L2 and load a random 64-example column of it per
//! stored weight: one L2 load per vector FMA, which bounds them at ≈ 17–21 G FMA/s on the
//! development machine (docs/benchmarks.md, "Reading the targets"). Here the stored weights
//! are ordered by column block first — block `b` holds columns `b · W .. (b + 1) · W`, `W =`
//! [`ColumnBlocked::WIDTH`] — then by row, then by column. A kernel walks one block at a time
//! over every row, so the block's part of the input tile (`W × 64` floats, 32 KiB) stays in
//! L1 while the block's weights stream past it, and each row pays a load and a store of its
//! 64-example accumulator per block instead. At 90% sparsity a row holds ≈ 13 weights per
//! block, which makes the forward ≈ 1.6× faster than the row-major walk on this machine; at
//! 99% a row holds ≈ 1 weight per block and the accumulator traffic costs more than it saves,
//! hence [`ColumnBlocked::worth`].
//!
//! Every product sums in the same order as the row-major layouts (a row's weights in column
//! order, an input-gradient entry's rows in row order), so results equal the condensed
//! kernels' bit for bit on the same instruction set, whatever the thread count.

use std::ops::Range;

use crate::cpu::{
    add_transposed, check, from_tiles, run_parallel, split_lengths, split_ranges, to_tiles,
    vgrad_rows, with_tile,
};
use crate::gather::dot_indexed;
use crate::isa::{multiversion, Isa};
use crate::rows::{IndexedEntries, Rows};
use crate::simd::{axpy_tile, tile, tile_mut};
use crate::{Exec, KernelError};

/// A sparse weight's stored entries ordered by (column block, row, column); see the module
/// documentation. Holds its values in that order, as the other formats hold theirs.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnBlocked {
    rows: usize,
    fan_in: usize,
    /// Slots of row `r` in block `b`: `ptr[b · (rows + 1) + r] .. ptr[b · (rows + 1) + r + 1]`
    /// (block `b`'s last entry equals block `b + 1`'s first).
    ptr: Vec<u32>,
    /// Column of each slot.
    cols: Vec<u32>,
    values: Vec<f32>,
}

impl ColumnBlocked {
    /// Columns per block: a 64-example tile of them is 32 KiB, inside a 48 KiB L1 data cache.
    pub const WIDTH: usize = 128;

    /// Lays out the entries at the flat positions `r · fan_in + c` (strictly ascending, below
    /// `rows · fan_in`) with their `values`. Returns the layout and, for each position in the
    /// order given, its slot in the layout.
    pub fn from_positions(
        rows: usize,
        fan_in: usize,
        positions: &[usize],
        values: &[f32],
    ) -> Result<(Self, Vec<u32>), KernelError> {
        check("values", values.len(), positions.len())?;
        let len = rows.saturating_mul(fan_in);
        if positions.len() > u32::MAX as usize || fan_in > u32::MAX as usize {
            return Err(KernelError::Unsupported(format!(
                "column-blocked layout: at most {} entries and columns, got {} entries of \
                 [{rows}, {fan_in}]",
                u32::MAX,
                positions.len()
            )));
        }
        for (i, w) in positions.windows(2).enumerate() {
            if w[0] >= w[1] {
                return Err(KernelError::Unsupported(format!(
                    "column-blocked layout: positions not strictly ascending at {}: {} after {}",
                    i + 1,
                    w[1],
                    w[0]
                )));
            }
        }
        if let Some(&last) = positions.last() {
            if last >= len {
                return Err(KernelError::Unsupported(format!(
                    "column-blocked layout: position {last} outside the [{rows}, {fan_in}] \
                     weight"
                )));
            }
        }
        let nb = Self::blocks_of(fan_in);
        let stride = rows + 1;
        // Counts per (block, row) at `ptr[b · stride + r + 1]`, then a running sum.
        let mut ptr = vec![0u32; nb * stride];
        let (mut r, mut row_start) = (0usize, 0usize);
        let mut coords = Vec::with_capacity(positions.len());
        for &p in positions {
            while p >= row_start + fan_in {
                r += 1;
                row_start += fan_in;
            }
            let c = p - row_start;
            let b = c / Self::WIDTH;
            ptr[b * stride + r + 1] += 1;
            coords.push((b * stride + r, c as u32));
        }
        let mut run = 0u32;
        for b in 0..nb {
            ptr[b * stride] = run;
            for r in 0..rows {
                run += ptr[b * stride + r + 1];
                ptr[b * stride + r + 1] = run;
            }
        }
        // Each (block, row) run filled in ascending column order: its next free slot.
        let mut next: Vec<u32> = ptr.clone();
        let mut cols = vec![0u32; positions.len()];
        let mut vals = vec![0.0f32; positions.len()];
        let mut order = Vec::with_capacity(positions.len());
        for (&(key, c), &v) in coords.iter().zip(values) {
            let slot = next[key];
            next[key] += 1;
            cols[slot as usize] = c;
            vals[slot as usize] = v;
            order.push(slot);
        }
        Ok((
            ColumnBlocked {
                rows,
                fan_in,
                ptr,
                cols,
                values: vals,
            },
            order,
        ))
    }

    /// The number of column blocks of a fan-in (1 for a fan-in of 0).
    fn blocks_of(fan_in: usize) -> usize {
        fan_in.div_ceil(Self::WIDTH).max(1)
    }

    /// Whether the layout is expected to beat the row-major one for a `rows × fan_in` weight
    /// with `nnz` stored entries: at least 8 entries per row and block on average (measured:
    /// ≈ 13 gives 1.6× on the forward, ≈ 6 about 1.2×, ≈ 1 a loss).
    pub fn worth(rows: usize, fan_in: usize, nnz: usize) -> bool {
        rows > 0 && fan_in >= 2 * Self::WIDTH && nnz >= 8 * rows * Self::blocks_of(fan_in)
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn fan_in(&self) -> usize {
        self.fan_in
    }

    /// Stored values, in slot order.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Stored values, mutable (the structure stays).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Flat position `r · fan_in + c` of every slot.
    pub fn positions(&self) -> Vec<usize> {
        let mut out = vec![0usize; self.cols.len()];
        for b in 0..self.blocks() {
            let p = &self.ptr[b * (self.rows + 1)..(b + 1) * (self.rows + 1)];
            for r in 0..self.rows {
                let run = p[r] as usize..p[r + 1] as usize;
                for (o, &c) in out[run.clone()].iter_mut().zip(&self.cols[run]) {
                    *o = r * self.fan_in + c as usize;
                }
            }
        }
        out
    }

    /// Number of column blocks.
    pub fn blocks(&self) -> usize {
        self.ptr.len() / (self.rows + 1)
    }

    /// Every (block, row) pair as a stored row (output row `r`, the row's slots in that
    /// block): the view the generic kernels run on.
    pub(crate) fn flat_rows(&self) -> BlockRows<'_> {
        BlockRows {
            rows: self.rows,
            ptr: &self.ptr,
            cols: &self.cols,
        }
    }

    /// Block `b` alone, as `rows` stored rows.
    fn block(&self, b: usize) -> BlockRows<'_> {
        let stride = self.rows + 1;
        BlockRows {
            rows: self.rows,
            ptr: &self.ptr[b * stride..(b + 1) * stride],
            cols: &self.cols,
        }
    }

    /// The columns of block `b`.
    fn block_cols(&self, b: usize) -> Range<usize> {
        b * Self::WIDTH..((b + 1) * Self::WIDTH).min(self.fan_in)
    }
}

/// Stored rows `(block, row)` in block-major order; see [`ColumnBlocked::flat_rows`].
pub(crate) struct BlockRows<'a> {
    rows: usize,
    /// `(rows + 1)` entries per block.
    ptr: &'a [u32],
    cols: &'a [u32],
}

impl Rows for BlockRows<'_> {
    fn n_stored(&self) -> usize {
        self.ptr.len() / (self.rows + 1) * self.rows
    }
    #[inline(always)]
    fn out_row(&self, a: usize) -> usize {
        a % self.rows
    }
    #[inline(always)]
    fn slots(&self, a: usize) -> Range<usize> {
        let i = a / self.rows * (self.rows + 1) + a % self.rows;
        self.ptr[i] as usize..self.ptr[i + 1] as usize
    }
    type Entries<'b>
        = IndexedEntries<'b, u32>
    where
        Self: 'b;
    #[inline(always)]
    fn entries(&self, a: usize) -> IndexedEntries<'_, u32> {
        let s = self.slots(a);
        IndexedEntries::new(s.start, &self.cols[s])
    }
    #[inline]
    fn gather_dot(&self, isa: Isa, a: usize, values: &[f32], x: &[f32]) -> f32 {
        let s = self.slots(a);
        dot_indexed(isa, &values[s.clone()], &self.cols[s], x)
    }
}

// ---------------------------------------------------------------------------------------------
// Forward

/// Stored rows `a0 ..` (one `batch`-wide output row each in `out`) of every block, tile by
/// tile: `out[i · batch + t] += Σ values[s] · x[t, col(s)]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fwd_body<const TB: usize, const FMA: bool>(
    w: &ColumnBlocked,
    values: &[f32],
    xt: &[f32],
    batch: usize,
    a0: usize,
    out: &mut [f32],
) {
    let (rows, fan_in) = (w.rows, w.fan_in);
    let n_rows = out.len() / batch;
    let stride = rows + 1;
    for t in 0..batch.div_ceil(TB) {
        let xs = &xt[t * fan_in * TB..(t + 1) * fan_in * TB];
        let b0 = t * TB;
        let bn = TB.min(batch - b0);
        for b in 0..w.blocks() {
            let p = &w.ptr[b * stride + a0..b * stride + a0 + n_rows + 1];
            for i in 0..n_rows {
                let (s, e) = (p[i] as usize, p[i + 1] as usize);
                if s == e {
                    continue;
                }
                let o = &mut out[i * batch + b0..i * batch + b0 + bn];
                let (vs, cs) = (&values[s..e], &w.cols[s..e]);
                // A full tile as a fixed-size array (a copy of `bn` floats compiles to a
                // `memcpy` call per row and block).
                if let Ok(o) = <&mut [f32; TB]>::try_from(&mut *o) {
                    let mut acc = *o;
                    row_block::<TB, FMA>(&mut acc, vs, cs, xs);
                    *o = acc;
                } else {
                    let mut acc = [0.0f32; TB];
                    acc[..bn].copy_from_slice(o);
                    row_block::<TB, FMA>(&mut acc, vs, cs, xs);
                    o.copy_from_slice(&acc[..bn]);
                }
            }
        }
    }
}
/// `acc += Σ v · x_tile[c]` over one row's entries in one block.
#[inline(always)]
fn row_block<const TB: usize, const FMA: bool>(
    acc: &mut [f32; TB],
    vs: &[f32],
    cs: &[u32],
    xs: &[f32],
) {
    for (&v, &c) in vs.iter().zip(cs) {
        axpy_tile::<TB, FMA>(acc, v, tile::<TB>(xs, c as usize));
    }
}
multiversion!(fn fwd<; const TB: usize>(w: &ColumnBlocked, values: &[f32], xt: &[f32], batch: usize, a0: usize, out: &mut [f32]) => fwd_body);

/// `y [batch, rows] += x [batch, fan_in] · Wᵀ`.
pub(crate) fn forward(
    w: &ColumnBlocked,
    values: &[f32],
    x: &[f32],
    batch: usize,
    y: &mut [f32],
    exec: Exec,
) {
    let isa = exec.isa();
    let threads = exec.threads_for(values.len() * batch);
    let rows = w.rows;
    // Per row, `batch` accumulated outputs (row-major), then added into y's columns.
    let mut acc = vec![0.0f32; rows * batch];
    macro_rules! go {
        ($tb:literal,) => {{
            let xt = to_tiles::<$tb>(x, batch, w.fan_in, threads);
            let ranges = split_ranges(rows, threads);
            let lens: Vec<usize> = ranges.iter().map(|g| g.len() * batch).collect();
            let jobs: Vec<_> = ranges.iter().zip(split_lengths(&mut acc, &lens)).collect();
            run_parallel(jobs, threads, |(g, out)| {
                fwd::<$tb>(isa, w, values, &xt, batch, g.start, out)
            });
        }};
    }
    with_tile!(batch, go!());
    add_transposed(&w.block(0), &acc, batch, rows, y, threads);
}

// ---------------------------------------------------------------------------------------------
// Input gradient

/// One block of one batch tile: `gxs[(c − c0) · TB + t] += Σ_r values[s] · gys[r · TB + t]`
/// over the block's entries, rows in order.
#[inline(always)]
fn igrad_body<const TB: usize, const FMA: bool>(
    w: &ColumnBlocked,
    b: usize,
    values: &[f32],
    gys: &[f32],
    gxs: &mut [f32],
) {
    let stride = w.rows + 1;
    let c0 = w.block_cols(b).start;
    let p = &w.ptr[b * stride..(b + 1) * stride];
    for r in 0..w.rows {
        let (s, e) = (p[r] as usize, p[r + 1] as usize);
        if s == e {
            continue;
        }
        let g = tile::<TB>(gys, r);
        for (&v, &c) in values[s..e].iter().zip(&w.cols[s..e]) {
            axpy_tile::<TB, FMA>(tile_mut::<TB>(gxs, c as usize - c0), v, g);
        }
    }
}
multiversion!(fn igrad<; const TB: usize>(w: &ColumnBlocked, b: usize, values: &[f32], gys: &[f32], gxs: &mut [f32]) => igrad_body);

/// `grad_x [batch, fan_in] = grad_y [batch, rows] · W`: each (batch tile, column block) is a
/// job whose `∂x` block (32 KiB) stays in L1 while every row scatters into it.
pub(crate) fn input_grad(
    w: &ColumnBlocked,
    values: &[f32],
    grad_y: &[f32],
    batch: usize,
    exec: Exec,
) -> Vec<f32> {
    let isa = exec.isa();
    let threads = exec.threads_for(values.len() * batch);
    let (rows, fan_in) = (w.rows, w.fan_in);
    let mut gx = vec![0.0f32; batch * fan_in];
    macro_rules! go {
        ($tb:literal,) => {{
            let gyt = to_tiles::<$tb>(grad_y, batch, rows, threads);
            let mut gxt = vec![0.0f32; batch.div_ceil($tb) * fan_in * $tb];
            let mut jobs = Vec::new();
            for (gxs, gys) in gxt.chunks_mut(fan_in * $tb).zip(gyt.chunks(rows * $tb)) {
                let lens: Vec<usize> = (0..w.blocks())
                    .map(|b| w.block_cols(b).len() * $tb)
                    .collect();
                for (b, part) in split_lengths(gxs, &lens).into_iter().enumerate() {
                    jobs.push((b, gys, part));
                }
            }
            run_parallel(jobs, threads, |(b, gys, part)| {
                igrad::<$tb>(isa, w, b, values, gys, part)
            });
            from_tiles::<$tb>(&gxt, batch, fan_in, &mut gx);
        }};
    }
    with_tile!(batch, go!());
    gx
}

// ---------------------------------------------------------------------------------------------
// Value gradient

/// `grad_v[s] = Σ_t grad_y[t, row(s)] · x[t, col(s)]`, block by block on the value-gradient
/// kernels of [`crate::cpu`]; threads split the rows (in every block).
pub(crate) fn value_grad(
    w: &ColumnBlocked,
    x: &[f32],
    grad_y: &[f32],
    batch: usize,
    exec: Exec,
) -> Vec<f32> {
    let isa = exec.isa();
    let mut gv = vec![0.0f32; w.values.len()];
    let threads = exec.threads_for(gv.len() * batch);
    let (rows, fan_in) = (w.rows, w.fan_in);
    let stride = rows + 1;
    let ranges = split_ranges(rows, threads);
    // Job `j`: rows `ranges[j]` of every block, their slots in each block one run of `gv`.
    let mut jobs: Vec<Vec<&mut [f32]>> = ranges.iter().map(|_| Vec::new()).collect();
    let mut rest: &mut [f32] = &mut gv;
    for b in 0..w.blocks() {
        let p = &w.ptr[b * stride..(b + 1) * stride];
        let lens: Vec<usize> = ranges
            .iter()
            .map(|g| (p[g.end] - p[g.start]) as usize)
            .collect();
        let total = (p[rows] - p[0]) as usize;
        let (block, tail) = rest.split_at_mut(total);
        rest = tail;
        for (j, part) in split_lengths(block, &lens).into_iter().enumerate() {
            jobs[j].push(part);
        }
    }
    macro_rules! go {
        ($tb:literal,) => {{
            let xt = to_tiles::<$tb>(x, batch, fan_in, threads);
            let gyt = to_tiles::<$tb>(grad_y, batch, rows, threads);
            let tiles = batch.div_ceil($tb);
            let jobs: Vec<_> = ranges.iter().zip(jobs).collect();
            run_parallel(jobs, threads, |(g, outs)| {
                for (b, out) in outs.into_iter().enumerate() {
                    vgrad_rows::<_, $tb>(
                        isa,
                        &w.block(b),
                        &xt,
                        &gyt,
                        tiles,
                        fan_in,
                        rows,
                        g.start,
                        g.len(),
                        out,
                    );
                }
            });
        }};
    }
    with_tile!(batch, go!());
    gv
}
