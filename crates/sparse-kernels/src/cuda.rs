//! CUDA kernels for the condensed (constant fan-in) and N:M layouts (feature `cuda`).
//!
//! The kernels are CUDA C ([`KERNEL_SOURCE`], `src/cuda/kernels.cu`) compiled at run time with
//! NVRTC and loaded through cudarc with dynamic loading: the crate builds with `--features cuda`
//! on a machine without any CUDA library, and the same binary runs on a GPU machine that has the
//! driver and NVRTC (docs/algorithms.md §10). Nothing here touches candle's own `cuda` feature.
//!
//! Every layout reaches the GPU in one form, [`Ell`]: stored rows of exactly `k` entries with
//! their column indices, plus the column-major transpose the input-gradient kernel reads. The
//! weight's values stay a separate buffer in the layout's own order, so training can update
//! them without rebuilding the structure. The 2:4 pattern also has a packed form ([`Packed24`]:
//! two values and one byte of positions per group of four) for its fast forward kernel.
//!
//! Kernels (see the source for the exact contracts):
//!
//! | kernel | computes | shape of the work |
//! |---|---|---|
//! | `ell_fwd_b1` | `y = W·x (+ bias)`, batch 1 | one warp per row, `float4`/`uint4` loads, `x` in shared memory |
//! | `ell_fwd_fm` | `Y = X·Wᵀ (+ bias)`, any batch | input feature-major, 32 batch lanes × 8 rows per block, values tiled in shared memory |
//! | `nm24_fwd_b1` | 2:4 forward, batch 1 | one warp per row, `float2` values + packed 2-bit positions |
//! | `ell_igrad` | `∂L/∂X = ∂L/∂Y·W` | one thread per (sample, input), through the transpose |
//! | `ell_vgrad` | `∂L/∂values` | one warp per stored value, lanes over the batch |
//! | `transpose` | `X → Xᵀ` | 32×32 tiles |
//!
//! Every kernel writes every element of its output and reduces in a fixed order, so results
//! are repeatable bit for bit and a poisoned output buffer reveals an unwritten element.
//!
//! Without the `cuda` feature (or without a GPU at run time) [`available`] says why CUDA
//! cannot be used, and the CPU kernels of this crate remain the implementation.

use crate::{KernelError, SparseWeight};

/// The CUDA C source of every kernel (compiled at run time with NVRTC).
pub const KERNEL_SOURCE: &str = include_str!("cuda/kernels.cu");

/// The kernels' entry points in [`KERNEL_SOURCE`].
pub const KERNEL_NAMES: &[&str] = &[
    "ell_fwd_b1",
    "ell_fwd_fm",
    "nm24_fwd_b1",
    "ell_igrad",
    "ell_vgrad",
    "transpose",
];

/// The virtual architectures the kernels are compiled for in the CPU-only NVRTC test: A100
/// (sm_80) and H100/H200 (sm_90).
pub const TARGET_ARCHS: &[&str] = &["compute_80", "compute_90"];

/// The structure of a sparse weight in the form the GPU kernels read (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Ell {
    /// Output rows.
    pub rows: usize,
    /// Input features.
    pub fan_in: usize,
    /// Entries per stored row.
    pub k: usize,
    /// Per output row, its stored row or -1 (an empty, e.g. ablated, row).
    pub slot_of: Vec<i32>,
    /// Per stored row, its output row.
    pub row_of: Vec<i32>,
    /// Column of each stored value, `[n_slots · k]`, in the layout's value order.
    pub cols: Vec<u32>,
    /// Transpose: column `c`'s entries are `col_start[c] .. col_start[c + 1]`.
    pub col_start: Vec<u32>,
    /// Transpose: index into the values of each entry (rows increasing within a column).
    pub perm: Vec<u32>,
    /// Transpose: output row of each entry.
    pub csc_row: Vec<u32>,
}

impl Ell {
    /// Builds the form of any weight whose non-empty rows all store the same number of values
    /// (condensed always, N:M always, CSR when its rows happen to be equal); the values keep the
    /// weight's own order (`w.values()`).
    pub fn new(w: SparseWeight<'_>) -> Result<Ell, KernelError> {
        let (rows, fan_in) = (w.rows(), w.fan_in());
        let entries = w.columns();
        if entries.len() > u32::MAX as usize || fan_in > u32::MAX as usize {
            return Err(KernelError::Unsupported(format!(
                "a weight of {} stored values and fan-in {fan_in} exceeds the GPU kernels' 32-bit indices",
                entries.len()
            )));
        }
        let mut slot_of = vec![-1i32; rows];
        let mut row_of = Vec::new();
        let mut counts = Vec::new();
        for (i, &(r, _)) in entries.iter().enumerate() {
            if i == 0 || entries[i - 1].0 != r {
                if slot_of[r] >= 0 {
                    return Err(KernelError::Unsupported(format!(
                        "row {r}'s values are not stored contiguously"
                    )));
                }
                slot_of[r] = row_of.len() as i32;
                row_of.push(r as i32);
                counts.push(0usize);
            }
            *counts.last_mut().expect("pushed") += 1;
        }
        let k = counts.first().copied().unwrap_or(0);
        if let Some((s, &c)) = counts.iter().enumerate().find(|(_, &c)| c != k) {
            return Err(KernelError::Unsupported(format!(
                "the GPU kernels need the same number of values in every non-empty row: row {} has {c}, row {} has {k}",
                row_of[s], row_of[0]
            )));
        }
        let cols: Vec<u32> = entries.iter().map(|&(_, c)| c as u32).collect();
        // Transpose by counting sort on the column: stable, so rows stay increasing.
        let mut col_start = vec![0u32; fan_in + 1];
        for &c in &cols {
            col_start[c as usize + 1] += 1;
        }
        for c in 0..fan_in {
            col_start[c + 1] += col_start[c];
        }
        let mut next = col_start.clone();
        let mut perm = vec![0u32; cols.len()];
        let mut csc_row = vec![0u32; cols.len()];
        for (i, (&c, &(r, _))) in cols.iter().zip(&entries).enumerate() {
            let e = next[c as usize] as usize;
            next[c as usize] += 1;
            perm[e] = i as u32;
            csc_row[e] = r as u32;
        }
        Ok(Ell {
            rows,
            fan_in,
            k,
            slot_of,
            row_of,
            cols,
            col_start,
            perm,
            csc_row,
        })
    }

    /// Stored rows.
    pub fn n_slots(&self) -> usize {
        self.row_of.len()
    }

    /// `y = x·Wᵀ (+ bias)` computed the way the kernels do (per row, stored order), on the CPU:
    /// the executable specification the GPU results are compared with.
    pub fn forward_cpu(
        &self,
        values: &[f32],
        bias: Option<&[f32]>,
        x: &[f32],
        batch: usize,
    ) -> Vec<f32> {
        let mut y = vec![0.0f32; batch * self.rows];
        for b in 0..batch {
            for r in 0..self.rows {
                let mut acc = 0.0f32;
                if let Ok(s) = usize::try_from(self.slot_of[r]) {
                    for j in s * self.k..(s + 1) * self.k {
                        acc += values[j] * x[b * self.fan_in + self.cols[j] as usize];
                    }
                }
                y[b * self.rows + r] = acc + bias.map_or(0.0, |bi| bi[r]);
            }
        }
        y
    }

    /// `∂L/∂X` through the transpose, as `ell_igrad` computes it.
    pub fn input_grad_cpu(&self, values: &[f32], gy: &[f32], batch: usize) -> Vec<f32> {
        let mut gx = vec![0.0f32; batch * self.fan_in];
        for b in 0..batch {
            for c in 0..self.fan_in {
                let mut acc = 0.0f32;
                for e in self.col_start[c] as usize..self.col_start[c + 1] as usize {
                    acc += values[self.perm[e] as usize]
                        * gy[b * self.rows + self.csc_row[e] as usize];
                }
                gx[b * self.fan_in + c] = acc;
            }
        }
        gx
    }
}

/// The packed 2:4 form read by `nm24_fwd_b1`: per row and group of four, two values and one
/// byte `p0 | p1 << 2` of positions.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed24 {
    /// Output rows.
    pub rows: usize,
    /// Groups of four per row (`fan_in / 4`).
    pub groups: usize,
    /// `[rows · groups · 2]` values.
    pub values: Vec<f32>,
    /// `[rows · groups]` packed positions.
    pub positions: Vec<u8>,
}

impl Packed24 {
    /// Packs a 2:4 weight with consecutive groups (`group_stride = 1`).
    pub fn new(w: &sparse_formats::NmSparse) -> Result<Packed24, KernelError> {
        let p = w.pattern();
        if (p.n, p.m, p.group_stride) != (2, 4, 1) {
            return Err(KernelError::Unsupported(format!(
                "the packed 2:4 kernel needs 2:4 with consecutive groups, not {}:{} with group stride {}",
                p.n, p.m, p.group_stride
            )));
        }
        let positions = w
            .positions()
            .chunks_exact(2)
            .map(|q| q[0] | (q[1] << 2))
            .collect();
        Ok(Packed24 {
            rows: w.rows(),
            groups: w.fan_in() / 4,
            values: w.values().to_vec(),
            positions,
        })
    }
}

/// Whether the CUDA kernels can run here; the error says why not.
pub fn available() -> Result<(), KernelError> {
    #[cfg(feature = "cuda")]
    {
        gpu::Gpu::new(0).map(|_| ())
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(KernelError::Cuda(
            "no CUDA support built: rebuild sparse-kernels with `--features cuda`".into(),
        ))
    }
}

#[cfg(feature = "cuda")]
pub mod gpu;

#[cfg(test)]
mod tests {
    use super::*;
    use sparse_formats::{Condensed, Csr, Mask, NmPattern, NmSparse};

    /// Without the feature; `tests/gpu.rs` has the `cuda` build's counterpart.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn reports_why_cuda_is_unavailable() {
        let msg = available().unwrap_err().to_string();
        assert!(msg.contains("no CUDA support built"), "{msg}");
    }

    /// 4×6, an ablated row, fan-in 2: the form, the transpose, and both CPU contracts against
    /// the dense computation.
    #[test]
    fn ell_of_a_condensed_weight() {
        let w = [
            1.0, 0.0, 2.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, //
            0.0, 3.0, 0.0, 0.0, 4.0, 0.0, //
            5.0, 0.0, 0.0, 0.0, 0.0, 6.0,
        ];
        let mask = Mask::from_dense(4, 6, &w).unwrap();
        let c = Condensed::from_dense(4, 6, &w, &mask, None).unwrap();
        let e = Ell::new(SparseWeight::Condensed(&c)).unwrap();
        assert_eq!((e.k, e.n_slots()), (2, 3));
        assert_eq!(e.slot_of, vec![0, -1, 1, 2]);
        assert_eq!(e.row_of, vec![0, 2, 3]);
        assert_eq!(e.cols, vec![0, 2, 1, 4, 0, 5]);
        assert_eq!(e.col_start, vec![0, 2, 3, 4, 4, 5, 6]);
        assert_eq!(e.perm, vec![0, 4, 2, 1, 3, 5]);
        assert_eq!(e.csc_row, vec![0, 3, 2, 0, 2, 3]);
        let x = [
            1.0, -1.0, 0.5, 2.0, 3.0, -2.0, 0.0, 1.0, 1.0, 0.0, -1.0, 4.0,
        ];
        let bias = [0.5, -0.5, 0.0, 1.0];
        let y = e.forward_cpu(c.values(), Some(&bias), &x, 2);
        let want = crate::reference::forward(&w, 4, 6, Some(&bias), &x, 2);
        assert_eq!(y, want);
        let gy = [1.0, 2.0, -1.0, 0.5, 0.0, 1.0, 3.0, -2.0];
        let gx = e.input_grad_cpu(c.values(), &gy, 2);
        assert_eq!(gx, crate::reference::input_grad(&w, 4, 6, &gy, 2));
    }

    #[test]
    fn ell_of_nm_and_csr_and_what_it_refuses() {
        let w = [0.0, 3.0, 0.0, -1.0, 2.0, 0.0, 5.0, 0.0];
        let mask = Mask::from_dense(1, 8, &w).unwrap();
        let nm = NmSparse::from_dense(1, 8, NmPattern::new(2, 4), &w, &mask).unwrap();
        let e = Ell::new(SparseWeight::Nm(&nm)).unwrap();
        assert_eq!((e.k, e.cols.clone()), (4, vec![1, 3, 4, 6]));
        let p = Packed24::new(&nm).unwrap();
        assert_eq!(p.positions, vec![1 | (3 << 2), 2 << 2]);
        assert_eq!(p.values, vec![3.0, -1.0, 2.0, 5.0]);
        let nm14 = NmSparse::from_dense(
            1,
            8,
            NmPattern::new(1, 4),
            &[0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0],
            &Mask::from_dense(1, 8, &[0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0]).unwrap(),
        )
        .unwrap();
        assert!(Packed24::new(&nm14)
            .unwrap_err()
            .to_string()
            .contains("not 1:4"));
        let uneven = [1.0, 1.0, 0.0, 1.0];
        let csr =
            Csr::from_dense(2, 2, &uneven, &Mask::from_dense(2, 2, &uneven).unwrap()).unwrap();
        let err = Ell::new(SparseWeight::Csr(&csr)).unwrap_err().to_string();
        assert!(err.contains("row 1 has 1, row 0 has 2"), "{err}");
    }
}
