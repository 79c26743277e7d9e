//! [`Condensed`]: the constant fan-in layout of SRigL's condensed layer.

use crate::error::{check_len, checked_area, FormatError, Result};
use crate::indices::IndexVec;
use crate::mask::Mask;

/// A constant fan-in sparse weight: every non-ablated output neuron has exactly `k` inputs.
///
/// Storage relation, for active-row slot `a` (original row `active_rows[a]`) and `j < k`:
///
/// `W[active_rows[a], indices[a·k + j]] = values[a·k + j]`, every other entry of `W` is 0.
///
/// Invariants (checked by every constructor): `active_rows` strictly increasing and `< rows`;
/// `k ≥ 1` when any row is active and `k ≤ fan_in`; indices of each row strictly increasing
/// (sorted, unique) and `< fan_in`; index type the narrowest for `fan_in`; `bias`, when present,
/// has one entry per original row.
///
/// Differences from the SRigL reference `CondensedLinearFineGrained`, on purpose:
/// - active rows and indices come from the **mask**, not from `W.sum(1) != 0` / `W != 0`, so a
///   row whose weights cancel or a grown weight that is still exactly 0 is kept
///   (docs/algorithms.md §1.2);
/// - the bias keeps an entry for **every** row, ablated ones included: an ablated neuron still
///   outputs its bias (docs/algorithms.md §6.4), and the dense round trip stays exact.
///
/// ```
/// use sparse_formats::{Condensed, Mask};
/// let w = [1.0, 0.0, 2.0,
///          0.0, 0.0, 0.0,   // ablated neuron
///          0.0, 3.0, 4.0];
/// let mask = Mask::from_dense(3, 3, &w).unwrap();
/// let c = Condensed::from_dense(3, 3, &w, &mask, None).unwrap();
/// assert_eq!((c.k(), c.active_rows()), (2, &[0u32, 2][..]));
/// assert_eq!(c.values(), &[1.0, 2.0, 3.0, 4.0]);
/// assert_eq!(c.to_dense(), w.to_vec());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Condensed {
    rows: usize,
    fan_in: usize,
    k: usize,
    active_rows: Vec<u32>,
    values: Vec<f32>,
    indices: IndexVec,
    bias: Option<Vec<f32>>,
}

impl Condensed {
    /// Builds the layout from a dense row-major `[rows, fan_in]` weight and its mask.
    ///
    /// Values are read at the mask's active positions (exact zeros included); weights outside
    /// the mask are ignored. Fails with [`FormatError::FanInNotConstant`] when the non-empty
    /// rows of the mask do not all have the same count.
    pub fn from_dense(
        rows: usize,
        fan_in: usize,
        weights: &[f32],
        mask: &Mask,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        check_len(
            "weights",
            weights.len(),
            checked_area("weights", rows, fan_in)?,
        )?;
        if (mask.rows(), mask.fan_in()) != (rows, fan_in) {
            return Err(FormatError::invalid(
                "mask",
                format!(
                    "shape [{}, {}] differs from the weight's [{rows}, {fan_in}]",
                    mask.rows(),
                    mask.fan_in()
                ),
            ));
        }
        // The mask's active entries, as the positions constructor takes them.
        let positions = mask.positions();
        let values = positions.iter().map(|&p| weights[p]).collect();
        Self::from_positions(rows, fan_in, &positions, values, bias.map(<[f32]>::to_vec))
    }

    /// Builds the layout from the flat positions `r · fan_in + c` of the active entries
    /// (strictly ascending) and their values — O(active entries); [`Condensed::from_dense`]
    /// lists a mask's positions and calls it. Fails with [`FormatError::FanInNotConstant`] when
    /// the non-empty rows' counts differ, and names `positions` or `values` when they are
    /// malformed.
    ///
    /// ```
    /// use sparse_formats::Condensed;
    /// let c = Condensed::from_positions(3, 3, &[0, 2, 7, 8], vec![1.0, 2.0, 3.0, 4.0], None)
    ///     .unwrap();
    /// assert_eq!(c.to_dense(), vec![1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0]);
    /// ```
    pub fn from_positions(
        rows: usize,
        fan_in: usize,
        positions: &[usize],
        values: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<Self> {
        let counts = crate::mask::position_row_counts(rows, fan_in, positions)?;
        check_len("values", values.len(), positions.len())?;
        let mut k = 0;
        let mut first_row = 0;
        for (r, &c) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
            if k == 0 {
                (k, first_row) = (c, r);
            } else if c != k {
                return Err(FormatError::FanInNotConstant {
                    first_row,
                    expected: k,
                    row: r,
                    found: c,
                });
            }
        }
        let active_rows: Vec<u32> = (0..rows)
            .filter(|&r| counts[r] > 0)
            .map(|r| r as u32)
            .collect();
        let indices = match crate::IndexType::for_fan_in(fan_in) {
            crate::IndexType::U16 => IndexVec::U16(crate::mask::position_columns(
                &counts,
                fan_in,
                positions,
                |c| c as u16,
            )),
            crate::IndexType::U32 => IndexVec::U32(crate::mask::position_columns(
                &counts,
                fan_in,
                positions,
                |c| c as u32,
            )),
        };
        Self::from_parts(rows, fan_in, k, active_rows, values, indices, bias)
    }

    /// Checked constructor from the raw parts; every invariant listed on the type is verified
    /// and a violation is reported naming the part (`active_rows`, `values`, `indices`,
    /// `bias`). Indices are converted to the narrowest type for `fan_in`.
    pub fn from_parts(
        rows: usize,
        fan_in: usize,
        k: usize,
        active_rows: Vec<u32>,
        values: Vec<f32>,
        indices: IndexVec,
        bias: Option<Vec<f32>>,
    ) -> Result<Self> {
        checked_area("condensed", rows, fan_in)?;
        for (a, pair) in active_rows.windows(2).enumerate() {
            if pair[0] >= pair[1] {
                return Err(FormatError::invalid(
                    "active_rows",
                    format!(
                        "not strictly increasing at position {}: {} after {}",
                        a + 1,
                        pair[1],
                        pair[0]
                    ),
                ));
            }
        }
        if let Some(&last) = active_rows.last() {
            if last as usize >= rows {
                return Err(FormatError::invalid(
                    "active_rows",
                    format!("row {last} out of range for {rows} rows"),
                ));
            }
            if k == 0 {
                return Err(FormatError::invalid(
                    "k",
                    "k is 0 but some rows are listed as active",
                ));
            }
        }
        if k > fan_in {
            return Err(FormatError::invalid(
                "k",
                format!("k = {k} exceeds the fan-in {fan_in}"),
            ));
        }
        let n = checked_area("values", active_rows.len(), k)?;
        check_len("values", values.len(), n)?;
        check_len("indices", indices.len(), n)?;
        let indices = indices.narrowed(fan_in);
        match &indices {
            IndexVec::U16(v) => check_rows(v, k, fan_in)?,
            IndexVec::U32(v) => check_rows(v, k, fan_in)?,
        }
        if let Some(b) = &bias {
            check_len("bias", b.len(), rows)?;
        }
        Ok(Condensed {
            rows,
            fan_in,
            k,
            active_rows,
            values,
            indices,
            bias,
        })
    }

    /// Number of rows of the dense weight (output neurons, ablated ones included).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the dense weight (the dense fan-in).
    pub fn fan_in(&self) -> usize {
        self.fan_in
    }

    /// The constant fan-in of every active row (0 when every row is ablated).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Original row ids of the non-ablated neurons, ascending.
    pub fn active_rows(&self) -> &[u32] {
        &self.active_rows
    }

    /// Number of non-ablated rows.
    pub fn n_active(&self) -> usize {
        self.active_rows.len()
    }

    /// Stored values, `[n_active, k]` row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Stored values, mutable (the structure cannot change through this).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Column index of each value, `[n_active, k]` row-major.
    pub fn indices(&self) -> &IndexVec {
        &self.indices
    }

    /// The bias, one entry per original row, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// Stored entries: `n_active · k`.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// `1 − nnz / (rows · fan_in)`.
    pub fn sparsity(&self) -> f64 {
        let total = self.rows * self.fan_in;
        if total == 0 {
            0.0
        } else {
            1.0 - self.nnz() as f64 / total as f64
        }
    }

    /// The dense row-major `[rows, fan_in]` weight (zeros outside the mask).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0.0; self.rows * self.fan_in];
        for (a, &r) in self.active_rows.iter().enumerate() {
            let base = r as usize * self.fan_in;
            for j in 0..self.k {
                w[base + self.indices.get(a * self.k + j)] = self.values[a * self.k + j];
            }
        }
        w
    }

    /// The mask of the stored positions.
    pub fn to_mask(&self) -> Mask {
        let mut m = Mask::zeros(self.rows, self.fan_in);
        for (a, &r) in self.active_rows.iter().enumerate() {
            for j in 0..self.k {
                m.set(r as usize, self.indices.get(a * self.k + j), true);
            }
        }
        m
    }
}

/// Every row of `k` indices strictly increasing and below `fan_in` (rows are `indices`'
/// chunks of `k`), else the first violation, named as `from_parts` reports it.
fn check_rows<T: Copy + Into<u64>>(indices: &[T], k: usize, fan_in: usize) -> Result<()> {
    if k == 0 {
        return Ok(());
    }
    for (a, row) in indices.chunks_exact(k).enumerate() {
        let ok = row.iter().all(|&c| c.into() < fan_in as u64)
            && row.windows(2).all(|p| p[0].into() < p[1].into());
        if ok {
            continue;
        }
        let mut prev: Option<u64> = None;
        for &c in row {
            let c = c.into();
            if c >= fan_in as u64 {
                return Err(FormatError::invalid(
                    "indices",
                    format!("row {a}: index {c} out of range for fan-in {fan_in}"),
                ));
            }
            if let Some(p) = prev.filter(|&p| c <= p) {
                return Err(FormatError::invalid(
                    "indices",
                    format!("row {a} is not strictly increasing ({c} after {p})"),
                ));
            }
            prev = Some(c);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_give_the_dense_layout() {
        let w = [1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0];
        let mask = Mask::from_dense(3, 3, &w).unwrap();
        let bias = Some(vec![0.5, -0.5, 1.0]);
        let want = Condensed::from_dense(3, 3, &w, &mask, bias.as_deref()).unwrap();
        let got =
            Condensed::from_positions(3, 3, &[0, 2, 7, 8], vec![1.0, 2.0, 3.0, 4.0], bias).unwrap();
        assert_eq!(got, want);
        // Unequal rows, unsorted or outside positions, a values length off: errors.
        assert!(matches!(
            Condensed::from_positions(3, 3, &[0, 2, 7], vec![0.0; 3], None),
            Err(FormatError::FanInNotConstant {
                row: 2,
                found: 1,
                ..
            })
        ));
        for (pos, n) in [
            (vec![2, 0], 2),
            (vec![0, 0], 2),
            (vec![0, 9], 2),
            (vec![0, 1], 3),
        ] {
            let e = Condensed::from_positions(3, 3, &pos, vec![0.0; n], None).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("positions") || text.contains("values"),
                "{text}"
            );
        }
    }

    #[test]
    fn ragged_mask_is_a_typed_error() {
        let mask = Mask::parse("##.\n#..\n...").unwrap();
        let err = Condensed::from_dense(3, 3, &[1.0; 9], &mask, None).unwrap_err();
        assert!(matches!(
            err,
            FormatError::FanInNotConstant {
                first_row: 0,
                expected: 2,
                row: 1,
                found: 1
            }
        ));
    }

    #[test]
    fn zero_valued_kept_weights_stay_in_the_layout() {
        // A grown weight that is still exactly 0 must not break the constant fan-in.
        let mask = Mask::parse("#.#\n.##").unwrap();
        let w = [0.0, 0.0, 1.0, 0.0, 2.0, 0.0];
        let c = Condensed::from_dense(2, 3, &w, &mask, None).unwrap();
        assert_eq!(c.k(), 2);
        assert_eq!(c.to_mask(), mask);
        assert_eq!(c.to_dense(), w.to_vec());
    }

    #[test]
    fn bias_keeps_ablated_rows() {
        let mask = Mask::parse("#.\n..\n.#").unwrap();
        let w = [1.0, 0.0, 0.0, 0.0, 0.0, 2.0];
        let c = Condensed::from_dense(3, 2, &w, &mask, Some(&[0.1, 0.2, 0.3])).unwrap();
        assert_eq!(c.bias(), Some(&[0.1, 0.2, 0.3][..]));
        assert_eq!(c.active_rows(), &[0, 2]);
        assert!(Condensed::from_dense(3, 2, &w, &mask, Some(&[0.1])).is_err());
    }

    #[test]
    fn all_rows_ablated() {
        let c = Condensed::from_dense(2, 3, &[0.0; 6], &Mask::zeros(2, 3), None).unwrap();
        assert_eq!((c.k(), c.n_active(), c.nnz()), (0, 0, 0));
        assert_eq!(c.to_dense(), vec![0.0; 6]);
    }

    #[test]
    fn from_parts_checks_every_rule() {
        let ok = || {
            (
                vec![0u32, 2],
                vec![1.0f32, 2.0, 3.0, 4.0],
                IndexVec::U16(vec![0, 2, 1, 2]),
            )
        };
        let (a, v, i) = ok();
        assert!(Condensed::from_parts(3, 3, 2, a, v, i, None).is_ok());
        let cases: Vec<(&str, Result<Condensed>)> = vec![
            ("active_rows", {
                let (_, v, i) = ok();
                Condensed::from_parts(3, 3, 2, vec![2, 0], v, i, None)
            }),
            ("active_rows", {
                let (_, v, i) = ok();
                Condensed::from_parts(3, 3, 2, vec![0, 3], v, i, None)
            }),
            ("values", {
                let (a, _, i) = ok();
                Condensed::from_parts(3, 3, 2, a, vec![1.0; 3], i, None)
            }),
            ("indices", {
                let (a, v, _) = ok();
                Condensed::from_parts(3, 3, 2, a, v, IndexVec::U16(vec![0, 3, 1, 2]), None)
            }),
            ("indices", {
                let (a, v, _) = ok();
                Condensed::from_parts(3, 3, 2, a, v, IndexVec::U16(vec![2, 0, 1, 2]), None)
            }),
            ("indices", {
                let (a, v, _) = ok();
                Condensed::from_parts(3, 3, 2, a, v, IndexVec::U16(vec![1, 1, 1, 2]), None)
            }),
            ("k", {
                let (a, v, i) = ok();
                Condensed::from_parts(3, 1, 2, a, v, i, None)
            }),
            ("bias", {
                let (a, v, i) = ok();
                Condensed::from_parts(3, 3, 2, a, v, i, Some(vec![0.0; 2]))
            }),
        ];
        for (part, res) in cases {
            match res {
                Err(FormatError::Invalid { tensor, .. }) => assert_eq!(tensor, part),
                other => panic!("expected an error on `{part}`, got {other:?}"),
            }
        }
    }
}
