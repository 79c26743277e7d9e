//! [`Csr`]: compressed sparse rows, the unstructured baseline.

use crate::error::{check_len, checked_area, FormatError, Result};
use crate::mask::Mask;

/// A compressed-sparse-row weight `[rows, fan_in]`.
///
/// Storage relation: for `row_ptr[r] ≤ i < row_ptr[r + 1]`,
/// `W[r, col_indices[i]] = values[i]`; every other entry is 0.
///
/// Invariants (checked by every constructor): `row_ptr` has `rows + 1` entries, starts at 0,
/// never decreases and ends at `nnz`; column indices of each row strictly increasing and
/// `< fan_in`.
///
/// ```
/// use sparse_formats::{Csr, Mask};
/// let w = [0.0, 1.0, 2.0,
///          3.0, 0.0, 0.0];
/// let csr = Csr::from_dense(2, 3, &w, &Mask::from_dense(2, 3, &w).unwrap()).unwrap();
/// assert_eq!(csr.row_ptr(), &[0, 2, 3]);
/// assert_eq!(csr.col_indices(), &[1, 2, 0]);
/// assert_eq!(csr.to_dense(), w.to_vec());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Csr {
    rows: usize,
    fan_in: usize,
    row_ptr: Vec<usize>,
    col_indices: Vec<u32>,
    values: Vec<f32>,
}

impl Csr {
    /// Builds the layout from a dense row-major `[rows, fan_in]` weight and its mask (values are
    /// read at the mask's active positions, exact zeros included).
    pub fn from_dense(rows: usize, fan_in: usize, weights: &[f32], mask: &Mask) -> Result<Self> {
        check_len(
            "weights",
            weights.len(),
            checked_area("weights", rows, fan_in)?,
        )?;
        if (mask.rows(), mask.fan_in()) != (rows, fan_in) {
            return Err(FormatError::invalid(
                "mask",
                format!(
                    "shape [{}, {}] differs from the weight's",
                    mask.rows(),
                    mask.fan_in()
                ),
            ));
        }
        if fan_in > u32::MAX as usize + 1 {
            return Err(FormatError::invalid(
                "col_indices",
                "fan-in exceeds the u32 range",
            ));
        }
        let positions = mask.positions();
        let values = positions.iter().map(|&p| weights[p]).collect();
        Self::from_positions(rows, fan_in, &positions, values)
    }

    /// Builds the layout from the flat positions `r · fan_in + c` of the active entries
    /// (strictly ascending) and their values — O(active entries); [`Csr::from_dense`] lists a
    /// mask's positions and calls it. Names `positions` or `values` when they are malformed.
    ///
    /// ```
    /// use sparse_formats::Csr;
    /// let csr = Csr::from_positions(2, 3, &[1, 2, 3], vec![1.0, 2.0, 3.0]).unwrap();
    /// assert_eq!((csr.row_ptr(), csr.col_indices()), (&[0, 2, 3][..], &[1u32, 2, 0][..]));
    /// ```
    pub fn from_positions(
        rows: usize,
        fan_in: usize,
        positions: &[usize],
        values: Vec<f32>,
    ) -> Result<Self> {
        let counts = crate::mask::position_row_counts(rows, fan_in, positions)?;
        check_len("values", values.len(), positions.len())?;
        let col_indices = crate::mask::position_columns(&counts, fan_in, positions, |c| c as u32);
        let mut row_ptr = Vec::with_capacity(rows + 1);
        row_ptr.push(0);
        for c in counts {
            row_ptr.push(row_ptr[row_ptr.len() - 1] + c);
        }
        Self::from_parts(rows, fan_in, row_ptr, col_indices, values)
    }

    /// Checked constructor from the raw parts, reporting the broken rule on `row_ptr`,
    /// `col_indices` or `values`.
    pub fn from_parts(
        rows: usize,
        fan_in: usize,
        row_ptr: Vec<usize>,
        col_indices: Vec<u32>,
        values: Vec<f32>,
    ) -> Result<Self> {
        checked_area("csr", rows, fan_in)?;
        check_len("row_ptr", row_ptr.len(), rows + 1)?;
        let nnz = values.len();
        check_len("col_indices", col_indices.len(), nnz)?;
        if row_ptr[0] != 0 {
            return Err(FormatError::invalid(
                "row_ptr",
                format!("must start at 0, starts at {}", row_ptr[0]),
            ));
        }
        if row_ptr[rows] != nnz {
            return Err(FormatError::invalid(
                "row_ptr",
                format!("must end at nnz = {nnz}, ends at {}", row_ptr[rows]),
            ));
        }
        for r in 0..rows {
            let (s, e) = (row_ptr[r], row_ptr[r + 1]);
            if e < s || e > nnz {
                return Err(FormatError::invalid(
                    "row_ptr",
                    format!("row {r}: range {s}..{e} is decreasing or past nnz = {nnz}"),
                ));
            }
        }
        for r in 0..rows {
            let (s, e) = (row_ptr[r], row_ptr[r + 1]);
            for i in s..e {
                let c = col_indices[i] as usize;
                if c >= fan_in {
                    return Err(FormatError::invalid(
                        "col_indices",
                        format!("row {r}: index {c} out of range for fan-in {fan_in}"),
                    ));
                }
                if i > s && col_indices[i] <= col_indices[i - 1] {
                    return Err(FormatError::invalid(
                        "col_indices",
                        format!(
                            "row {r} is not strictly increasing ({c} after {})",
                            col_indices[i - 1]
                        ),
                    ));
                }
            }
        }
        Ok(Csr {
            rows,
            fan_in,
            row_ptr,
            col_indices,
            values,
        })
    }

    /// Rows (output neurons).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Dense fan-in (columns).
    pub fn fan_in(&self) -> usize {
        self.fan_in
    }

    /// Row pointers, `rows + 1` entries.
    pub fn row_ptr(&self) -> &[usize] {
        &self.row_ptr
    }

    /// Column index of each stored value.
    pub fn col_indices(&self) -> &[u32] {
        &self.col_indices
    }

    /// Stored values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Stored values, mutable (the structure cannot change through this).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Stored entries.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// The dense row-major `[rows, fan_in]` weight.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0.0; self.rows * self.fan_in];
        for r in 0..self.rows {
            for i in self.row_ptr[r]..self.row_ptr[r + 1] {
                w[r * self.fan_in + self.col_indices[i] as usize] = self.values[i];
            }
        }
        w
    }

    /// The mask of the stored positions.
    pub fn to_mask(&self) -> Mask {
        let mut m = Mask::zeros(self.rows, self.fan_in);
        for r in 0..self.rows {
            for i in self.row_ptr[r]..self.row_ptr[r + 1] {
                m.set(r, self.col_indices[i] as usize, true);
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_give_the_dense_layout() {
        let w = [0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let mask = Mask::from_dense(3, 3, &w).unwrap();
        let want = Csr::from_dense(3, 3, &w, &mask).unwrap();
        assert_eq!(
            Csr::from_positions(3, 3, &[1, 2, 3], vec![1.0, 2.0, 3.0]).unwrap(),
            want
        );
        for (pos, n) in [
            (vec![2, 1], 2),
            (vec![1, 1], 2),
            (vec![0, 9], 2),
            (vec![0, 1], 1),
        ] {
            let e = Csr::from_positions(3, 3, &pos, vec![0.0; n]).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("positions") || text.contains("values"),
                "{text}"
            );
        }
    }

    #[test]
    fn from_parts_checks_every_rule() {
        let ok = Csr::from_parts(2, 3, vec![0, 2, 3], vec![0, 2, 1], vec![1.0; 3]);
        assert!(ok.is_ok());
        let cases = [
            (
                "row_ptr",
                Csr::from_parts(2, 3, vec![0, 2], vec![0, 2, 1], vec![1.0; 3]),
            ),
            (
                "row_ptr",
                Csr::from_parts(2, 3, vec![1, 2, 3], vec![0, 2, 1], vec![1.0; 3]),
            ),
            (
                "row_ptr",
                Csr::from_parts(2, 3, vec![0, 2, 2], vec![0, 2, 1], vec![1.0; 3]),
            ),
            (
                "row_ptr",
                Csr::from_parts(2, 3, vec![0, 4, 3], vec![0, 2, 1], vec![1.0; 3]),
            ),
            (
                "col_indices",
                Csr::from_parts(2, 3, vec![0, 2, 3], vec![0, 3, 1], vec![1.0; 3]),
            ),
            (
                "col_indices",
                Csr::from_parts(2, 3, vec![0, 2, 3], vec![2, 0, 1], vec![1.0; 3]),
            ),
            (
                "col_indices",
                Csr::from_parts(2, 3, vec![0, 2, 3], vec![0, 2], vec![1.0; 3]),
            ),
        ];
        for (part, res) in cases {
            match res {
                Err(FormatError::Invalid { tensor, .. }) => assert_eq!(tensor, part),
                other => panic!("expected an error on `{part}`, got {other:?}"),
            }
        }
    }
}
