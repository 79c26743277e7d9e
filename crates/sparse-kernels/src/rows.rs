//! One view of every format for the kernels: a list of stored rows, each a run of value slots
//! with a column per slot.
//!
//! The kernels in [`crate::cpu`] are generic over [`Rows`], so each format only says how to
//! walk one of its rows; `#[inline(always)]` makes every walk compile into the kernel loop.

use std::ops::Range;

use sparse_formats::{Condensed, Csr, IndexVec, NmSparse};

use crate::gather::{dot_indexed, dot_nm, sum8, GatherIndex};
use crate::isa::Isa;

/// A sparse matrix as stored rows of (slot, column) pairs.
pub(crate) trait Rows: Sync {
    /// Number of stored rows (for condensed: active rows only).
    fn n_stored(&self) -> usize;
    /// The output row (neuron) of stored row `a`.
    fn out_row(&self, a: usize) -> usize;
    /// The value slots of stored row `a`.
    fn slots(&self, a: usize) -> Range<usize>;
    /// The `(slot, column)` entries of stored row `a`, in slot order.
    ///
    /// An iterator rather than a `for_each(closure)`: a closure is compiled without the target
    /// features of the kernel variant that calls it whenever LLVM declines to inline it, and
    /// its `mul_add`s then became calls to a software `fmaf` (measured: 30× slower).
    type Entries<'b>: Iterator<Item = (usize, usize)>
    where
        Self: 'b;
    /// See [`Rows::Entries`].
    fn entries(&self, a: usize) -> Self::Entries<'_>;
    /// `Σ values[slot] · x[column]` over stored row `a` (batch 1), with partial sums in a
    /// fixed order for a given instruction set.
    fn gather_dot(&self, isa: Isa, a: usize, values: &[f32], x: &[f32]) -> f32;
}

/// The condensed layout with its index type as a type parameter.
pub(crate) struct CondensedRows<'a, I> {
    pub k: usize,
    pub active_rows: &'a [u32],
    pub indices: &'a [I],
}

impl<I: GatherIndex> Rows for CondensedRows<'_, I> {
    fn n_stored(&self) -> usize {
        self.active_rows.len()
    }
    #[inline(always)]
    fn out_row(&self, a: usize) -> usize {
        self.active_rows[a] as usize
    }
    #[inline(always)]
    fn slots(&self, a: usize) -> Range<usize> {
        a * self.k..(a + 1) * self.k
    }
    type Entries<'b>
        = IndexedEntries<'b, I>
    where
        Self: 'b;
    #[inline(always)]
    fn entries(&self, a: usize) -> IndexedEntries<'_, I> {
        let s = self.slots(a);
        IndexedEntries {
            slot: s.start,
            indices: self.indices[s].iter(),
        }
    }
    #[inline]
    fn gather_dot(&self, isa: Isa, a: usize, values: &[f32], x: &[f32]) -> f32 {
        let s = self.slots(a);
        dot_indexed(isa, &values[s.clone()], &self.indices[s], x)
    }
}

/// Entries of a row whose columns are listed in an index array.
pub(crate) struct IndexedEntries<'a, I> {
    slot: usize,
    indices: std::slice::Iter<'a, I>,
}

impl<I: GatherIndex> Iterator for IndexedEntries<'_, I> {
    type Item = (usize, usize);
    #[inline(always)]
    fn next(&mut self) -> Option<(usize, usize)> {
        let c = self.indices.next()?.idx();
        self.slot += 1;
        Some((self.slot - 1, c))
    }
}

/// Entries of an N:M row: slot `i` is member `positions[i]` of group `i / n`.
pub(crate) struct NmEntries<'a> {
    slot: usize,
    positions: &'a [u8],
    i: usize,
    n: usize,
    m: usize,
    stride: usize,
    /// Slot within the current group.
    t: usize,
    /// Offset within the stride of the current group.
    s: usize,
    /// `block · m` of the current group.
    block_base: usize,
}

impl Iterator for NmEntries<'_> {
    type Item = (usize, usize);
    #[inline(always)]
    fn next(&mut self) -> Option<(usize, usize)> {
        let p = *self.positions.get(self.i)? as usize;
        let item = (
            self.slot + self.i,
            (self.block_base + p) * self.stride + self.s,
        );
        self.i += 1;
        self.t += 1;
        if self.t == self.n {
            self.t = 0;
            self.s += 1;
            if self.s == self.stride {
                self.s = 0;
                self.block_base += self.m;
            }
        }
        Some(item)
    }
}

/// The N:M layout; `N` and `M` are const for the fast paths (0 = read them at run time).
pub(crate) struct NmRows<'a, const N: usize, const M: usize> {
    pub n: usize,
    pub m: usize,
    pub stride: usize,
    pub kept_per_row: usize,
    pub rows: usize,
    pub positions: &'a [u8],
}

impl<const N: usize, const M: usize> NmRows<'_, N, M> {
    #[inline(always)]
    fn n(&self) -> usize {
        if N > 0 {
            N
        } else {
            self.n
        }
    }
    #[inline(always)]
    fn m(&self) -> usize {
        if M > 0 {
            M
        } else {
            self.m
        }
    }
}

impl<const N: usize, const M: usize> Rows for NmRows<'_, N, M> {
    fn n_stored(&self) -> usize {
        self.rows
    }
    #[inline(always)]
    fn out_row(&self, a: usize) -> usize {
        a
    }
    #[inline(always)]
    fn slots(&self, a: usize) -> Range<usize> {
        a * self.kept_per_row..(a + 1) * self.kept_per_row
    }
    type Entries<'b>
        = NmEntries<'b>
    where
        Self: 'b;
    #[inline(always)]
    fn entries(&self, a: usize) -> NmEntries<'_> {
        let s = self.slots(a);
        NmEntries {
            slot: s.start,
            positions: &self.positions[s],
            i: 0,
            n: self.n(),
            m: self.m(),
            stride: self.stride,
            t: 0,
            s: 0,
            block_base: 0,
        }
    }
    #[inline]
    fn gather_dot(&self, isa: Isa, a: usize, values: &[f32], x: &[f32]) -> f32 {
        let n = self.n();
        if self.stride == 1 && 16 % n == 0 {
            let s = self.slots(a);
            return dot_nm(isa, &values[s.clone()], &self.positions[s], n, self.m(), x);
        }
        // Strided groups (conv) or N not dividing 16: portable path, plain multiply-add (see
        // `gather::dot_nm`).
        let mut acc = [0.0f32; 8];
        for (slot, col) in self.entries(a) {
            acc[slot % 8] += values[slot] * x[col];
        }
        sum8(acc)
    }
}

/// The CSR layout.
pub(crate) struct CsrRows<'a> {
    pub row_ptr: &'a [usize],
    pub col_indices: &'a [u32],
}

impl Rows for CsrRows<'_> {
    fn n_stored(&self) -> usize {
        self.row_ptr.len() - 1
    }
    #[inline(always)]
    fn out_row(&self, a: usize) -> usize {
        a
    }
    #[inline(always)]
    fn slots(&self, a: usize) -> Range<usize> {
        self.row_ptr[a]..self.row_ptr[a + 1]
    }
    type Entries<'b>
        = IndexedEntries<'b, u32>
    where
        Self: 'b;
    #[inline(always)]
    fn entries(&self, a: usize) -> IndexedEntries<'_, u32> {
        let s = self.slots(a);
        IndexedEntries {
            slot: s.start,
            indices: self.col_indices[s].iter(),
        }
    }
    #[inline]
    fn gather_dot(&self, isa: Isa, a: usize, values: &[f32], x: &[f32]) -> f32 {
        let s = self.slots(a);
        dot_indexed(isa, &values[s.clone()], &self.col_indices[s], x)
    }
}

/// Something the kernels run on: a format, seen through [`Rows`].
pub(crate) trait RowsVisitor {
    type Out;
    fn visit<R: Rows>(self, rows: &R) -> Self::Out;
}

/// Hands the [`Rows`] view of a format to a visitor, choosing the monomorphised variant (index
/// type, 2:4 fast path).
pub(crate) trait AsRows {
    fn with_rows<V: RowsVisitor>(&self, v: V) -> V::Out;
}

impl AsRows for Condensed {
    fn with_rows<V: RowsVisitor>(&self, v: V) -> V::Out {
        match self.indices() {
            IndexVec::U16(ix) => v.visit(&CondensedRows {
                k: self.k(),
                active_rows: self.active_rows(),
                indices: ix,
            }),
            IndexVec::U32(ix) => v.visit(&CondensedRows {
                k: self.k(),
                active_rows: self.active_rows(),
                indices: ix,
            }),
        }
    }
}

impl AsRows for NmSparse {
    fn with_rows<V: RowsVisitor>(&self, v: V) -> V::Out {
        let p = self.pattern();
        macro_rules! view {
            ($n:literal, $m:literal) => {
                NmRows::<$n, $m> {
                    n: p.n,
                    m: p.m,
                    stride: p.group_stride,
                    kept_per_row: self.kept_per_row(),
                    rows: self.rows(),
                    positions: self.positions(),
                }
            };
        }
        match (p.n, p.m) {
            (2, 4) => v.visit(&view!(2, 4)),
            (1, 4) => v.visit(&view!(1, 4)),
            _ => v.visit(&view!(0, 0)),
        }
    }
}

impl AsRows for Csr {
    fn with_rows<V: RowsVisitor>(&self, v: V) -> V::Out {
        v.visit(&CsrRows {
            row_ptr: self.row_ptr(),
            col_indices: self.col_indices(),
        })
    }
}

/// A sparse weight's transpose, for the batched input gradient ([`crate::input_grad_with`]);
/// build it once per structure and reuse it while the structure stays (the custom op
/// [`crate::ops::sparse_linear`] does). It is the CSR form of `Wᵀ` — one row per input column,
/// its entries that column's weights with their output rows, in the format's stored-row
/// order — plus each entry's value slot in the format. The batched input gradient
/// `∂x = ∂y · W` is then the forward product of `Wᵀ` on values gathered into this order: each
/// `∂x` element is summed in registers and written once, where walking the format's rows
/// scatters a read-add-write of it per stored weight. The sums run in the same order either
/// way (stored rows ascending), so both give the same floats.
#[derive(Debug)]
pub struct Transposed {
    /// The weight's `[rows, fan_in]`.
    shape: (usize, usize),
    /// Entries of column `c`: `row_ptr[c]..row_ptr[c + 1]`.
    row_ptr: Vec<usize>,
    /// The output row of each entry.
    rows: Vec<u32>,
    /// The value slot (in the format) of each entry.
    slots: Vec<u32>,
}

impl Transposed {
    /// The transpose of `w` (a counting sort of its entries by column, O(nnz + fan_in)).
    pub fn of<'a>(w: impl Into<crate::SparseWeight<'a>>) -> Transposed {
        let w = w.into();
        struct Build(usize, usize);
        impl RowsVisitor for Build {
            type Out = Transposed;
            fn visit<R: Rows>(self, r: &R) -> Transposed {
                let (n_rows, fan_in) = (self.0, self.1);
                let mut row_ptr = vec![0usize; fan_in + 1];
                for a in 0..r.n_stored() {
                    for (_, c) in r.entries(a) {
                        row_ptr[c + 1] += 1;
                    }
                }
                for c in 0..fan_in {
                    row_ptr[c + 1] += row_ptr[c];
                }
                let mut next = row_ptr.clone();
                let nnz = row_ptr[fan_in];
                let (mut rows, mut slots) = (vec![0u32; nnz], vec![0u32; nnz]);
                for a in 0..r.n_stored() {
                    let row = r.out_row(a) as u32;
                    for (slot, c) in r.entries(a) {
                        rows[next[c]] = row;
                        slots[next[c]] = slot as u32;
                        next[c] += 1;
                    }
                }
                Transposed {
                    shape: (n_rows, fan_in),
                    row_ptr,
                    rows,
                    slots,
                }
            }
        }
        w.with_rows(Build(w.rows(), w.fan_in()))
    }

    /// `(rows, fan_in, nnz)` of the weight it was built from.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.shape.0, self.shape.1, self.rows.len())
    }

    /// `values` (in the format's slot order) in this transpose's entry order, on `threads`
    /// workers.
    pub(crate) fn gather_values(&self, values: &[f32], threads: usize) -> Vec<f32> {
        let n = self.slots.len();
        // Every slot is below the format's value count (built from its entries), which the
        // callers check `values` against; asserted here once instead of per read.
        assert_eq!(values.len(), n, "gather_values: one value per stored entry");
        // Written once, not zeroed first.
        let mut out: Vec<f32> = Vec::with_capacity(n);
        let chunk = n.div_ceil(threads.max(1)).max(1);
        let jobs: Vec<_> = out.spare_capacity_mut()[..n]
            .chunks_mut(chunk)
            .zip(self.slots.chunks(chunk))
            .collect();
        crate::cpu::run_parallel(jobs, threads, |(out, slots)| {
            for (o, &s) in out.iter_mut().zip(slots) {
                debug_assert!((s as usize) < values.len());
                // SAFETY: `s` is a slot of the format this transpose was built from, below its
                // value count, which equals `values.len()` (asserted above).
                o.write(unsafe { *values.get_unchecked(s as usize) });
            }
        });
        // SAFETY: the jobs cover `out[..n]` and write every element.
        unsafe { out.set_len(n) };
        out
    }

    /// The [`Rows`] view of `Wᵀ` (values in [`Transposed::gather_values`]' order).
    pub(crate) fn rows(&self) -> CsrRows<'_> {
        CsrRows {
            row_ptr: &self.row_ptr,
            col_indices: &self.rows,
        }
    }
}
