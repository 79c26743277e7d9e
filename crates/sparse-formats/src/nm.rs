//! [`NmSparse`]: N of every M weights kept, and the NVIDIA 2:4 compressed layout.

use crate::error::{check_len, checked_area, FormatError, Result};
use crate::mask::Mask;

/// Which weights of a row form the groups of an N:M pattern.
///
/// The fan-in axis is viewed as `[fan_in / group_stride, group_stride]` and a group is `m`
/// consecutive entries along the **first** of these axes. With `group_stride = 1` a group is `m`
/// consecutive columns (linear layers). For a conv weight `[out, in, kh, kw]` viewed as
/// `[out, in·kh·kw]`, `group_stride = kh·kw` makes a group `m` consecutive input channels at one
/// kernel position, the hardware-compatible axis used by LBC and ASP (docs/algorithms.md §1.3).
///
/// Groups are numbered `g = block · group_stride + s`, and member `p` (`0 ≤ p < m`) of group `g`
/// is column `(block · m + p) · group_stride + s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NmPattern {
    /// Kept weights per group.
    pub n: usize,
    /// Group size.
    pub m: usize,
    /// Distance between consecutive members of a group along the fan-in (1 for linear layers).
    pub group_stride: usize,
}

impl NmPattern {
    /// N:M with consecutive groups (`group_stride = 1`).
    pub fn new(n: usize, m: usize) -> Self {
        NmPattern {
            n,
            m,
            group_stride: 1,
        }
    }

    /// Checks `1 ≤ n ≤ m ≤ 255`, `group_stride ≥ 1` and that `fan_in` splits into whole groups.
    pub fn validate(&self, fan_in: usize) -> Result<()> {
        let bad = |reason: String| {
            Err(FormatError::invalid(
                "pattern",
                format!(
                    "{}:{} (group stride {}): {reason}",
                    self.n, self.m, self.group_stride
                ),
            ))
        };
        if self.n == 0 || self.n > self.m {
            return bad("needs 1 ≤ N ≤ M".into());
        }
        if self.m > u8::MAX as usize {
            return bad("M above 255 is not supported".into());
        }
        if self.group_stride == 0 || !fan_in.is_multiple_of(self.group_stride) {
            return bad(format!(
                "group stride must be ≥ 1 and divide the fan-in {fan_in}"
            ));
        }
        if !(fan_in / self.group_stride).is_multiple_of(self.m) {
            return bad(format!(
                "fan-in {fan_in} / group stride does not split into groups of {}",
                self.m
            ));
        }
        Ok(())
    }

    /// Groups per row for a given fan-in.
    pub fn groups(&self, fan_in: usize) -> usize {
        fan_in / self.m
    }

    /// The column of member `p` of group `g`.
    #[inline]
    pub fn column(&self, g: usize, p: usize) -> usize {
        let (block, s) = (g / self.group_stride, g % self.group_stride);
        (block * self.m + p) * self.group_stride + s
    }
}

/// An N:M sparse weight: in every group of `m` weights (see [`NmPattern`]) exactly `n` are kept.
///
/// Storage relation, for row `r`, group `g`, slot `t < n`, with `i = (r · groups + g) · n + t`:
///
/// `W[r, pattern.column(g, positions[i])] = values[i]`, every other entry is 0.
///
/// Invariants (checked by every constructor): the pattern is valid for `fan_in`; positions
/// `< m` and strictly increasing inside each group. Kept values may be exactly 0 (a group of
/// fewer than `n` non-zeros still keeps `n` slots, as the hardware layout does).
///
/// ```
/// use sparse_formats::{Mask, NmPattern, NmSparse};
/// let w = [0.0, 3.0, 0.0, -1.0,   2.0, 0.0, 5.0, 0.0];
/// let mask = Mask::from_dense(1, 8, &w).unwrap();
/// let nm = NmSparse::from_dense(1, 8, NmPattern::new(2, 4), &w, &mask).unwrap();
/// assert_eq!(nm.values(), &[3.0, -1.0, 2.0, 5.0]);
/// assert_eq!(nm.positions(), &[1, 3, 0, 2]);
/// assert_eq!(nm.to_dense(), w.to_vec());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NmSparse {
    rows: usize,
    fan_in: usize,
    pattern: NmPattern,
    values: Vec<f32>,
    positions: Vec<u8>,
}

impl NmSparse {
    /// Builds the layout from a dense row-major `[rows, fan_in]` weight and its mask; fails with
    /// [`FormatError::NotNOfM`] naming the first group that does not keep exactly `n`.
    pub fn from_dense(
        rows: usize,
        fan_in: usize,
        pattern: NmPattern,
        weights: &[f32],
        mask: &Mask,
    ) -> Result<Self> {
        pattern.validate(fan_in)?;
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
        let groups = pattern.groups(fan_in);
        let mut values = Vec::with_capacity(rows * groups * pattern.n);
        let mut positions = Vec::with_capacity(rows * groups * pattern.n);
        for r in 0..rows {
            for g in 0..groups {
                let mut found = 0;
                for p in 0..pattern.m {
                    let c = pattern.column(g, p);
                    if mask.get(r, c) {
                        found += 1;
                        values.push(weights[r * fan_in + c]);
                        positions.push(p as u8);
                    }
                }
                if found != pattern.n {
                    return Err(FormatError::NotNOfM {
                        row: r,
                        group: g,
                        found,
                        n: pattern.n,
                        m: pattern.m,
                    });
                }
            }
        }
        Ok(NmSparse {
            rows,
            fan_in,
            pattern,
            values,
            positions,
        })
    }

    /// Checked constructor from the raw parts, reporting the broken rule on `pattern`,
    /// `values` or `positions`.
    pub fn from_parts(
        rows: usize,
        fan_in: usize,
        pattern: NmPattern,
        values: Vec<f32>,
        positions: Vec<u8>,
    ) -> Result<Self> {
        pattern.validate(fan_in)?;
        let groups = pattern.groups(fan_in);
        let kept = checked_area("values", rows, groups * pattern.n)?;
        check_len("values", values.len(), kept)?;
        check_len("positions", positions.len(), kept)?;
        for (gi, group) in positions.chunks_exact(pattern.n).enumerate() {
            let (r, g) = (gi / groups.max(1), gi % groups.max(1));
            for (t, &p) in group.iter().enumerate() {
                if p as usize >= pattern.m {
                    return Err(FormatError::invalid(
                        "positions",
                        format!(
                            "row {r}, group {g}: position {p} out of range for M = {}",
                            pattern.m
                        ),
                    ));
                }
                if t > 0 && p <= group[t - 1] {
                    return Err(FormatError::invalid(
                        "positions",
                        format!(
                            "row {r}, group {g}: positions not strictly increasing ({p} after {}), \
                             so the group does not keep {} distinct weights",
                            group[t - 1],
                            pattern.n
                        ),
                    ));
                }
            }
        }
        Ok(NmSparse {
            rows,
            fan_in,
            pattern,
            values,
            positions,
        })
    }

    /// Rows (output neurons).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Dense fan-in.
    pub fn fan_in(&self) -> usize {
        self.fan_in
    }

    /// The pattern (N, M, group stride).
    pub fn pattern(&self) -> NmPattern {
        self.pattern
    }

    /// N.
    pub fn n(&self) -> usize {
        self.pattern.n
    }

    /// M.
    pub fn m(&self) -> usize {
        self.pattern.m
    }

    /// Kept values, `[rows, fan_in · n / m]` row-major, in group order.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Kept values, mutable (the structure cannot change through this).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Position (`0..m`) of each kept value inside its group.
    pub fn positions(&self) -> &[u8] {
        &self.positions
    }

    /// Kept values per row: `fan_in · n / m`.
    pub fn kept_per_row(&self) -> usize {
        self.pattern.groups(self.fan_in) * self.pattern.n
    }

    /// Dense column of kept slot `i` of row `r`'s storage (`i < kept_per_row`).
    #[inline]
    pub fn column_of(&self, r: usize, i: usize) -> usize {
        let kpr = self.kept_per_row();
        self.pattern
            .column(i / self.pattern.n, self.positions[r * kpr + i] as usize)
    }

    /// The dense row-major `[rows, fan_in]` weight.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0.0; self.rows * self.fan_in];
        let kpr = self.kept_per_row();
        for r in 0..self.rows {
            for i in 0..kpr {
                w[r * self.fan_in + self.column_of(r, i)] = self.values[r * kpr + i];
            }
        }
        w
    }

    /// The mask of the kept positions (exactly N of every M).
    pub fn to_mask(&self) -> Mask {
        let mut m = Mask::zeros(self.rows, self.fan_in);
        for r in 0..self.rows {
            for i in 0..self.kept_per_row() {
                m.set(r, self.column_of(r, i), true);
            }
        }
        m
    }

    /// Exports a 2:4 layout (consecutive groups, fan-in a multiple of 16) to the NVIDIA
    /// sparse-tensor-core layout: see [`Nvidia24`].
    pub fn to_nvidia_2to4(&self) -> Result<Nvidia24> {
        if self.pattern != NmPattern::new(2, 4) {
            return Err(FormatError::invalid(
                "pattern",
                format!(
                    "the NVIDIA layout needs 2:4 with consecutive groups, this is {}:{} (group stride {})",
                    self.pattern.n, self.pattern.m, self.pattern.group_stride
                ),
            ));
        }
        if !self.fan_in.is_multiple_of(16) {
            return Err(FormatError::invalid(
                "pattern",
                format!(
                    "the NVIDIA layout packs 4 groups per 16-bit word: fan-in {} is not a multiple of 16",
                    self.fan_in
                ),
            ));
        }
        let words_per_row = self.fan_in / 16;
        let mut metadata = vec![0u16; self.rows * words_per_row];
        for (gi, pair) in self.positions.chunks_exact(2).enumerate() {
            let code = (pair[0] as u16) | ((pair[1] as u16) << 2);
            metadata[gi / 4] |= code << (4 * (gi % 4));
        }
        Ok(Nvidia24 {
            rows: self.rows,
            fan_in: self.fan_in,
            values: self.values.clone(),
            metadata,
        })
    }
}

/// The NVIDIA 2:4 sparse-tensor-core operand (docs/algorithms.md §1.4), in logical row-major order.
///
/// - `values [rows, fan_in / 2]`: the 2 kept elements of each group of 4, in original order;
/// - `metadata [rows, fan_in / 16]` (`u16`): per group a 4-bit code `i0 | i1 << 2` of the kept
///   positions `i0 < i1`, four groups per word with the first group in the lowest bits — the
///   packing PyTorch's `_sparse_semi_structured_from_dense_cutlass` produces for 16-bit types
///   before its CUTLASS interleave.
///
/// Not included: the CUTLASS `ColumnMajorInterleaved<2>` reordering of the metadata and the
/// opaque cuSPARSELt buffer, which are device-library specifics; values are kept in f32 here
/// and are cast to f16/bf16 by whoever uploads them.
#[derive(Debug, Clone, PartialEq)]
pub struct Nvidia24 {
    /// Rows of the weight.
    pub rows: usize,
    /// Dense fan-in (a multiple of 16).
    pub fan_in: usize,
    /// Kept values, `[rows, fan_in / 2]`.
    pub values: Vec<f32>,
    /// Packed 2-bit index pairs, `[rows, fan_in / 16]`.
    pub metadata: Vec<u16>,
}

impl Nvidia24 {
    /// Decodes back to [`NmSparse`] 2:4, validating lengths and that every code names two
    /// distinct ascending positions.
    pub fn to_nm(&self) -> Result<NmSparse> {
        if !self.fan_in.is_multiple_of(16) {
            return Err(FormatError::invalid(
                "metadata",
                format!("fan-in {} is not a multiple of 16", self.fan_in),
            ));
        }
        let words = checked_area("metadata", self.rows, self.fan_in / 16)?;
        check_len("metadata", self.metadata.len(), words)?;
        let mut positions = Vec::with_capacity(words * 8);
        for &w in &self.metadata {
            for q in 0..4 {
                let code = (w >> (4 * q)) & 0xF;
                positions.push((code & 0b11) as u8);
                positions.push((code >> 2) as u8);
            }
        }
        NmSparse::from_parts(
            self.rows,
            self.fan_in,
            NmPattern::new(2, 4),
            self.values.clone(),
            positions,
        )
        .map_err(|e| match e {
            FormatError::Invalid { rule, .. } => FormatError::invalid("metadata", rule),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_validation() {
        assert!(NmPattern::new(2, 4).validate(8).is_ok());
        assert!(NmPattern::new(2, 4).validate(6).is_err());
        assert!(NmPattern::new(0, 4).validate(8).is_err());
        assert!(NmPattern::new(5, 4).validate(8).is_err());
        assert!(NmPattern::new(1, 300).validate(300).is_err());
        let conv = NmPattern {
            n: 1,
            m: 2,
            group_stride: 3,
        };
        assert!(conv.validate(6).is_ok());
        assert!(conv.validate(9).is_err());
    }

    #[test]
    fn strided_groups_run_along_channels() {
        // fan_in = 4 channels × 2 kernel positions; groups of 2 channels at one position.
        let p = NmPattern {
            n: 1,
            m: 2,
            group_stride: 2,
        };
        let cols: Vec<Vec<usize>> = (0..p.groups(8))
            .map(|g| (0..2).map(|q| p.column(g, q)).collect())
            .collect();
        assert_eq!(cols, vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
        // Every column appears exactly once.
        let mut all: Vec<usize> = cols.concat();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn wrong_count_names_the_group() {
        let mask = Mask::parse("##..###.").unwrap();
        let err = NmSparse::from_dense(1, 8, NmPattern::new(2, 4), &[1.0; 8], &mask).unwrap_err();
        assert!(matches!(
            err,
            FormatError::NotNOfM {
                row: 0,
                group: 1,
                found: 3,
                ..
            }
        ));
    }

    #[test]
    fn kept_zero_values_are_allowed() {
        let mask = Mask::parse("#..#").unwrap();
        let nm = NmSparse::from_dense(1, 4, NmPattern::new(2, 4), &[0.0; 4], &mask).unwrap();
        assert_eq!(nm.values(), &[0.0, 0.0]);
        assert_eq!(nm.to_mask(), mask);
    }

    #[test]
    fn from_parts_rejects_bad_positions() {
        let p = NmPattern::new(2, 4);
        assert!(NmSparse::from_parts(1, 4, p, vec![1.0, 2.0], vec![0, 3]).is_ok());
        for bad in [vec![0u8, 4], vec![2, 2], vec![3, 1]] {
            match NmSparse::from_parts(1, 4, p, vec![1.0, 2.0], bad) {
                Err(FormatError::Invalid { tensor, .. }) => assert_eq!(tensor, "positions"),
                other => panic!("expected a positions error, got {other:?}"),
            }
        }
        assert!(NmSparse::from_parts(1, 4, p, vec![1.0], vec![0, 1]).is_err());
    }

    #[test]
    fn nvidia_codes_match_the_reference_table() {
        // docs/algorithms.md §1.4: {0,1}→0b0100, {0,2}→0b1000, {1,2}→0b1001, {0,3}→0b1100,
        // {1,3}→0b1101, {2,3}→0b1110; group 0 in the lowest bits.
        let pairs = [
            (0u8, 1u8),
            (0, 2),
            (1, 2),
            (0, 3),
            (1, 3),
            (2, 3),
            (0, 1),
            (2, 3),
        ];
        let positions: Vec<u8> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
        let nm =
            NmSparse::from_parts(1, 32, NmPattern::new(2, 4), vec![1.0; 16], positions).unwrap();
        let nv = nm.to_nvidia_2to4().unwrap();
        assert_eq!(
            nv.metadata,
            vec![0b1100_1001_1000_0100, 0b1110_0100_1110_1101,]
        );
        assert_eq!(nv.to_nm().unwrap(), nm);
    }

    #[test]
    fn nvidia_export_needs_2to4_and_fan_in_16() {
        let nm = NmSparse::from_parts(1, 8, NmPattern::new(2, 4), vec![0.0; 4], vec![0, 1, 0, 1])
            .unwrap();
        assert!(nm.to_nvidia_2to4().is_err());
        let nm = NmSparse::from_parts(1, 4, NmPattern::new(1, 4), vec![0.0], vec![0]).unwrap();
        assert!(nm.to_nvidia_2to4().is_err());
        let bad = Nvidia24 {
            rows: 1,
            fan_in: 16,
            values: vec![0.0; 8],
            metadata: vec![0b0000_0000_0000_0000],
        };
        assert!(bad.to_nm().is_err(), "code 0 repeats position 0");
    }
}
