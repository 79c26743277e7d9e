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
