//! [`RowBlocks`]: an unstructured sparse weight re-laid out once for fast small-batch inference.
//!
//! A gathered sparse product (condensed, CSR) loads a value, an index and one input per stored
//! weight; at batch 1 those loads, not the arithmetic, bound it, and at ~10% density it is
//! barely faster than streaming the dense weight (docs/benchmarks.md, "End-to-end inference").
//! Here each row's stored weights are covered by blocks of 8 consecutive columns, chosen
//! greedily (a block starts at the first stored column not yet covered), and every block keeps
//! all 8 of its values — zeros where nothing is stored. One block then costs a start index, one
//! contiguous load of 8 inputs, one load of 8 values and one 8-wide fused multiply-add: at 8%
//! density a block covers ~1.6 stored weights, so a row needs ~40% of the loads of the gathered
//! product, and only ~40% of the dense weight's bytes. Build it once per trained layer, like
//! any inference layout; it computes the same products as the dense weight (the zeros add
//! nothing), up to float summation order.

use crate::cpu::check;
use crate::isa::multiversion;
use crate::simd::fma_tile;
use crate::{Exec, KernelError};

/// Columns per block.
const W: usize = 8;

/// A sparse weight as 8-column blocks per row; see the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct RowBlocks {
    rows: usize,
    fan_in: usize,
    /// Row `r`'s blocks are `row_ptr[r]..row_ptr[r + 1]`.
    row_ptr: Vec<u32>,
    /// First column of each block; `start + 8 ≤ max(fan_in, 8)`.
    starts: Vec<u32>,
    /// 8 values per block, the block's columns in order.
    values: Vec<f32>,
}

impl RowBlocks {
    /// Covers the non-zero entries of the dense row-major weight `w [rows, fan_in]` with
    /// blocks (a stored weight that is exactly zero adds nothing to a product, so the non-zeros
    /// are all that matter).
    pub fn from_dense(rows: usize, fan_in: usize, w: &[f32]) -> Result<Self, KernelError> {
        if w.len() != rows * fan_in {
            return Err(KernelError::Shape {
                what: "w",
                expected: rows * fan_in,
                found: w.len(),
            });
        }
        if fan_in > u32::MAX as usize || rows * fan_in > u32::MAX as usize {
            return Err(KernelError::Unsupported(format!(
                "row blocks index a weight of at most {} entries, got [{rows}, {fan_in}]",
                u32::MAX
            )));
        }
        let mut row_ptr = Vec::with_capacity(rows + 1);
        row_ptr.push(0u32);
        let (mut starts, mut values) = (Vec::new(), Vec::new());
        for row in w.chunks_exact(fan_in.max(1)).take(rows) {
            let mut c = 0;
            while c < fan_in {
                if row[c] == 0.0 {
                    c += 1;
                    continue;
                }
                // The last block is moved left to end at the row's end (it still covers `c`);
                // the columns it shares with the block before hold zeros, so that each stored
                // weight is counted once.
                let start = c.min(fan_in.saturating_sub(W));
                let end = (start + W).min(fan_in);
                starts.push(start as u32);
                values.extend((start..end).map(|j| if j < c { 0.0 } else { row[j] }));
                values.resize(values.len() + W - (end - start), 0.0);
                c = start + W;
            }
            row_ptr.push(starts.len() as u32);
        }
        if fan_in == 0 {
            row_ptr.resize(rows + 1, 0);
        }
        Ok(RowBlocks {
            rows,
            fan_in,
            row_ptr,
            starts,
            values,
        })
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Inputs per row.
    pub fn fan_in(&self) -> usize {
        self.fan_in
    }

    /// Number of 8-column blocks.
    pub fn blocks(&self) -> usize {
        self.starts.len()
    }

    /// Bytes of the layout (values, starts and row pointers).
    pub fn bytes(&self) -> usize {
        self.values.len() * 4 + self.starts.len() * 4 + self.row_ptr.len() * 4
    }

    /// `y [batch, rows] = x · Wᵀ + bias` for `x [batch, fan_in]`, one example after another on
    /// the calling thread (made for small batches; the batched kernels are faster from a few
    /// dozen examples on).
    pub fn forward(
        &self,
        x: &[f32],
        batch: usize,
        bias: Option<&[f32]>,
        exec: Exec,
    ) -> Result<Vec<f32>, KernelError> {
        check("x", x.len(), batch * self.fan_in)?;
        if let Some(b) = bias {
            check("bias", b.len(), self.rows)?;
        }
        let mut y = vec![0.0f32; batch * self.rows];
        if self.rows == 0 {
            return Ok(y);
        }
        let mut padded = [0.0f32; W];
        for (b, yb) in y.chunks_exact_mut(self.rows).enumerate() {
            let mut xb = &x[b * self.fan_in..(b + 1) * self.fan_in];
            if self.fan_in < W {
                // Blocks of a narrow weight reach past its inputs: read zeros there.
                padded[..self.fan_in].copy_from_slice(xb);
                xb = &padded;
            }
            forward_one(
                exec.isa(),
                &self.row_ptr,
                &self.starts,
                &self.values,
                xb,
                bias.unwrap_or(&[]),
                yb,
            );
        }
        Ok(y)
    }
}

multiversion!(
    /// One example through the blocks (see [`RowBlocks::forward`]).
    fn forward_one<;>(
        row_ptr: &[u32],
        starts: &[u32],
        values: &[f32],
        x: &[f32],
        bias: &[f32],
        y: &mut [f32],
    ) => forward_one_body
);

#[inline(always)]
fn forward_one_body<const FMA: bool>(
    row_ptr: &[u32],
    starts: &[u32],
    values: &[f32],
    x: &[f32],
    bias: &[f32],
    y: &mut [f32],
) {
    // `RowBlocks` keeps its fields private and builds them only in `from_dense`, which makes
    // `start + 8 ≤ max(fan_in, 8)` for every block, `values.len() = 8 · starts.len()` and the
    // row ranges ascending up to `starts.len()`; `forward` passes `x` with `max(fan_in, 8)`
    // entries and `y` with `rows` — so the unchecked reads below stay in range.
    debug_assert!(starts.iter().all(|&s| s as usize + W <= x.len()));
    assert!(values.len() == starts.len() * W && row_ptr.len() == y.len() + 1);
    let block = |i: usize| -> (&[f32; W], &[f32; W]) {
        // SAFETY: `i < starts.len()` (the row ranges lie within `0..starts.len()`),
        // `starts[i] + 8 ≤ x.len()` and `values.len() = 8 · starts.len()` (see above).
        unsafe {
            let s = *starts.get_unchecked(i) as usize;
            (
                &*(x.as_ptr().add(s) as *const [f32; W]),
                &*(values.as_ptr().add(i * W) as *const [f32; W]),
            )
        }
    };
    for (r, yr) in y.iter_mut().enumerate() {
        let (lo, hi) = (row_ptr[r] as usize, row_ptr[r + 1] as usize);
        // Four independent accumulators hide the multiply-add latency.
        let mut acc = [[0.0f32; W]; 4];
        let mut i = lo;
        while i + 4 <= hi {
            for (j, a) in acc.iter_mut().enumerate() {
                let (xs, vs) = block(i + j);
                fma_tile::<W, FMA>(a, vs, xs);
            }
            i += 4;
        }
        while i < hi {
            let (xs, vs) = block(i);
            fma_tile::<W, FMA>(&mut acc[0], vs, xs);
            i += 1;
        }
        // A fixed tree over accumulators and lanes (vector adds and shuffles, not a serial
        // chain of scalar adds).
        let mut h = [0.0f32; W];
        for k in 0..W {
            h[k] = (acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]);
        }
        let h4: [f32; 4] = std::array::from_fn(|k| h[k] + h[k + 4]);
        let h2 = [h4[0] + h4[2], h4[1] + h4[3]];
        *yr = (h2[0] + h2[1]) + bias.get(r).copied().unwrap_or(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Isa;

    /// Every variant against the dense product on random shapes and densities, including
    /// widths below one block, empty rows and blocks moved left at a row's end.
    #[test]
    fn matches_the_dense_product_at_every_isa() {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n
        };
        for case in 0..60 {
            let rows = 1 + next(40) as usize;
            let fan_in = [1, 3, 7, 8, 9, 15, 16, 17, 64, 100, 300][case % 11];
            let keep = 1 + next(100);
            let batch = 1 + next(4) as usize;
            let w: Vec<f32> = (0..rows * fan_in)
                .map(|_| {
                    if next(100) < keep {
                        next(2001) as f32 / 1000.0 - 1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let x: Vec<f32> = (0..batch * fan_in)
                .map(|_| next(2001) as f32 / 1000.0 - 1.0)
                .collect();
            let bias: Vec<f32> = (0..rows).map(|r| r as f32 * 0.25).collect();
            let blocks = RowBlocks::from_dense(rows, fan_in, &w).unwrap();
            let nnz = w.iter().filter(|v| **v != 0.0).count();
            assert!(blocks.blocks() <= nnz, "a block covers at least one weight");
            for (i, &st) in blocks.starts.iter().enumerate() {
                assert!(st as usize + W <= fan_in.max(W), "block {i} starts at {st}");
            }
            for isa in Isa::available() {
                let y = blocks
                    .forward(&x, batch, Some(&bias), Exec::default().with_isa(isa))
                    .unwrap();
                for b in 0..batch {
                    for r in 0..rows {
                        let want: f64 = bias[r] as f64
                            + (0..fan_in)
                                .map(|c| w[r * fan_in + c] as f64 * x[b * fan_in + c] as f64)
                                .sum::<f64>();
                        let got = y[b * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{isa:?} case {case} [{rows}, {fan_in}] b {b} r {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let blocks = RowBlocks::from_dense(2, 3, &[1.0, 0.0, 2.0, 0.0, 0.0, 3.0]).unwrap();
        assert_eq!(blocks.blocks(), 2);
        assert!(blocks.forward(&[1.0; 4], 1, None, Exec::default()).is_err());
        assert!(blocks
            .forward(&[1.0; 3], 1, Some(&[0.0]), Exec::default())
            .is_err());
        assert!(RowBlocks::from_dense(2, 3, &[0.0; 5]).is_err());
        let y = blocks
            .forward(&[1.0, 2.0, 3.0], 1, None, Exec::default())
            .unwrap();
        assert_eq!(y, vec![7.0, 9.0]);
    }
}
