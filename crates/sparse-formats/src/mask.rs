//! [`Mask`]: the binary mask of one layer, on the `[rows, fan_in]` view.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use crate::error::{check_len, checked_area, FormatError, Result};

/// The binary mask of one layer's weight, viewed as a matrix `[rows = output neurons, fan_in]`
/// (linear `[out, in]`, conv `[out, in/groups·kh·kw]`).
///
/// Storage relation: entry `(r, c)` is active iff `bits[r * fan_in + c]`.
///
/// ```
/// use sparse_formats::Mask;
/// let w = [0.5, 0.0, -1.0,
///          0.0, 0.0,  0.0];
/// let mask = Mask::from_dense(2, 3, &w).unwrap();
/// assert_eq!(mask.nnz(), 2);
/// assert_eq!(mask.row_counts(), vec![2, 0]);
/// assert_eq!(mask.render(), "#.#\n...\n");
/// ```
#[derive(Clone)]
pub struct Mask {
    rows: usize,
    fan_in: usize,
    bits: Vec<bool>,
    /// The active entries' positions ([`Mask::active_positions`]), once computed or given
    /// ([`Mask::with_positions`]); reset by every change of `bits`.
    positions: OnceLock<Vec<usize>>,
}

impl PartialEq for Mask {
    fn eq(&self, other: &Mask) -> bool {
        (self.rows, self.fan_in) == (other.rows, other.fan_in) && self.bits == other.bits
    }
}

impl Eq for Mask {}

impl std::hash::Hash for Mask {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.rows, self.fan_in, &self.bits).hash(state);
    }
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Mask {{ rows: {}, fan_in: {}, nnz: {} }}",
            self.rows,
            self.fan_in,
            self.nnz()
        )
    }
}

/// The statistics of one layer's mask: the one per-layer statistics type of the workspace
/// (training metrics, the sparsifier's summary, `dst inspect`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerStats {
    /// Weight name (e.g. `fc1.weight`).
    pub name: String,
    /// `[rows, fan_in]`.
    pub shape: [usize; 2],
    /// Number of active entries.
    pub nnz: usize,
    /// Fraction of inactive entries ([`Mask::sparsity`]).
    pub sparsity: f64,
    /// Smallest fan-in among rows with at least one active entry (0 if there are none).
    pub min_fan_in: usize,
    /// Largest fan-in of any row.
    pub max_fan_in: usize,
    /// Rows with no active entry (ablated neurons).
    pub ablated_rows: usize,
}

impl LayerStats {
    /// The statistics of `mask`, the mask of the weight `name`.
    pub fn of(name: &str, mask: &Mask) -> LayerStats {
        let counts = mask.row_counts();
        LayerStats {
            name: name.to_string(),
            shape: [mask.rows, mask.fan_in],
            nnz: counts.iter().sum(),
            sparsity: mask.sparsity(),
            min_fan_in: counts.iter().copied().filter(|&c| c > 0).min().unwrap_or(0),
            max_fan_in: counts.iter().copied().max().unwrap_or(0),
            ablated_rows: counts.iter().filter(|&&c| c == 0).count(),
        }
    }
}

impl Mask {
    /// A mask from its bits in row-major order; fails if `bits.len() != rows · fan_in`.
    pub fn new(rows: usize, fan_in: usize, bits: Vec<bool>) -> Result<Self> {
        check_len("mask", bits.len(), checked_area("mask", rows, fan_in)?)?;
        Ok(Mask {
            rows,
            fan_in,
            bits,
            positions: OnceLock::new(),
        })
    }

    /// The all-inactive mask.
    pub fn zeros(rows: usize, fan_in: usize) -> Self {
        Mask {
            rows,
            fan_in,
            bits: vec![false; rows * fan_in],
            positions: OnceLock::new(),
        }
    }

    /// The all-active (dense) mask.
    pub fn ones(rows: usize, fan_in: usize) -> Self {
        Mask {
            rows,
            fan_in,
            bits: vec![true; rows * fan_in],
            positions: OnceLock::new(),
        }
    }

    /// The mask of the non-zero entries of a dense row-major `[rows, fan_in]` weight.
    pub fn from_dense(rows: usize, fan_in: usize, weights: &[f32]) -> Result<Self> {
        check_len(
            "weights",
            weights.len(),
            checked_area("weights", rows, fan_in)?,
        )?;
        Ok(Mask {
            rows,
            fan_in,
            bits: weights.iter().map(|&w| w != 0.0).collect(),
            positions: OnceLock::new(),
        })
    }

    /// The mask of the non-zero entries of a tensor of rank ≥ 2, viewed as
    /// `[dim 0, product of the other dims]` (so a conv weight `[out, in, kh, kw]` becomes
    /// `[out, in·kh·kw]`). Any dtype; the tensor may live on any device.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let dims = t.dims();
        if dims.len() < 2 {
            return Err(FormatError::invalid(
                "tensor",
                format!("a mask needs a tensor of rank ≥ 2, got shape {dims:?}"),
            ));
        }
        let rows = dims[0];
        let fan_in = dims[1..].iter().product();
        let flat = t
            .ne(0.0)?
            .to_dtype(DType::U8)?
            .flatten_all()?
            .to_vec1::<u8>()?;
        Ok(Mask {
            rows,
            fan_in,
            bits: flat.into_iter().map(|b| b != 0).collect(),
            positions: OnceLock::new(),
        })
    }

    /// The mask as an f32 tensor of 0s and 1s, shape `[rows, fan_in]`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        self.to_tensor_dtype(DType::F32, device)
    }

    /// The mask as a tensor of 0s and 1s of the given dtype, shape `[rows, fan_in]`.
    pub fn to_tensor_dtype(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let v: Vec<u8> = self.bits.iter().map(|&b| b as u8).collect();
        Ok(Tensor::from_vec(v, (self.rows, self.fan_in), device)?.to_dtype(dtype)?)
    }

    /// Number of rows (output neurons).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (the dense fan-in).
    pub fn fan_in(&self) -> usize {
        self.fan_in
    }

    /// `rows · fan_in`.
    pub fn len(&self) -> usize {
        self.bits.len()
    }

    /// True if the mask has no entries at all (a dimension is 0).
    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// The bits in row-major order.
    pub fn as_slice(&self) -> &[bool] {
        &self.bits
    }

    /// The bits of one row.
    pub fn row(&self, r: usize) -> &[bool] {
        &self.bits[r * self.fan_in..(r + 1) * self.fan_in]
    }

    /// Whether entry `(r, c)` is active. Panics if out of range, like slice indexing.
    pub fn get(&self, r: usize, c: usize) -> bool {
        assert!(c < self.fan_in, "column {c} out of range {}", self.fan_in);
        self.bits[r * self.fan_in + c]
    }

    /// Sets entry `(r, c)`. Panics if out of range, like slice indexing.
    pub fn set(&mut self, r: usize, c: usize, active: bool) {
        assert!(c < self.fan_in, "column {c} out of range {}", self.fan_in);
        self.bits[r * self.fan_in + c] = active;
        self.positions = OnceLock::new();
    }

    /// Number of active entries.
    pub fn nnz(&self) -> usize {
        count_active(&self.bits)
    }

    /// The flat positions `r · fan_in + c` of the active entries, ascending: a copy of
    /// [`Mask::active_positions`].
    ///
    /// The list is computed once per mask: 64 entries packed into a word at a time (a
    /// branch-free, vectorised loop) and a walk over its set bits, so the cost is a read of the
    /// mask plus one step per active entry — several times faster than visiting the entries
    /// one by one on a 90–99%-sparse mask.
    ///
    /// ```
    /// use sparse_formats::Mask;
    /// let m = Mask::new(2, 3, vec![false, true, true, true, false, false]).unwrap();
    /// assert_eq!(m.positions(), vec![1, 2, 3]);
    /// ```
    pub fn positions(&self) -> Vec<usize> {
        self.active_positions().to_vec()
    }

    /// [`Mask::positions`], borrowed: computed on the first call (or given to
    /// [`Mask::with_positions`]) and kept with the mask until it changes, so a mask update's
    /// later readers (the next update's scan of the active entries, the sparse engine's
    /// layout, the ever-active union) do not scan the whole mask again.
    pub fn active_positions(&self) -> &[usize] {
        self.positions.get_or_init(|| {
            let mut out = Vec::with_capacity(self.nnz_estimate());
            push_active_positions(&self.bits, 0, &mut out);
            out
        })
    }

    /// A mask from its bits and the positions of its active entries, as [`Mask::new`] plus
    /// the list [`Mask::active_positions`] would compute (for a caller that built both, e.g.
    /// a mask update row by row). Fails if the length is wrong, or if `positions` is not
    /// strictly ascending or names an inactive entry; that it names *every* active entry is
    /// the caller's contract (checked in debug builds: it would take a pass over the mask).
    pub fn with_positions(
        rows: usize,
        fan_in: usize,
        bits: Vec<bool>,
        positions: Vec<usize>,
    ) -> Result<Self> {
        let mask = Mask::new(rows, fan_in, bits)?;
        let mut prev = None;
        for &p in &positions {
            if prev.is_some_and(|q| q >= p) || !mask.bits.get(p).copied().unwrap_or(false) {
                return Err(FormatError::invalid(
                    "positions",
                    format!("position {p} is out of order, out of range or not active"),
                ));
            }
            prev = Some(p);
        }
        debug_assert_eq!(positions.len(), mask.nnz(), "positions miss active entries");
        Ok(Mask {
            positions: OnceLock::from(positions),
            ..mask
        })
    }

    /// A capacity for [`Mask::positions`]: the active count of a strided sample of the words,
    /// scaled up with a margin, so that the list rarely grows (each growth copies it) and a
    /// sparse mask does not reserve its dense size.
    fn nnz_estimate(&self) -> usize {
        let words = self.bits.len() / 64;
        if words == 0 {
            return 0;
        }
        let stride = (words / 256).max(1);
        let (mut seen, mut on) = (0usize, 0usize);
        for chunk in self.bits.chunks_exact(64).step_by(stride) {
            seen += 1;
            on += pack_word(chunk).count_ones() as usize;
        }
        let est = on as f64 / (seen * 64) as f64 * self.bits.len() as f64;
        ((est * 1.1) as usize + 64).min(self.bits.len())
    }

    /// Active entries of one row (the row's fan-in).
    pub fn row_nnz(&self, r: usize) -> usize {
        self.row(r).iter().filter(|&&b| b).count()
    }

    /// Active entries per row.
    pub fn row_counts(&self) -> Vec<usize> {
        (0..self.rows).map(|r| self.row_nnz(r)).collect()
    }

    /// Column indices of the active entries of one row, ascending.
    ///
    /// Scans 32 entries at a time with a branch-free OR and skips blocks with none active (most
    /// blocks of a 90–99%-sparse row), so a sparse row costs a fraction of an entry-by-entry
    /// scan.
    pub fn row_indices(&self, r: usize) -> impl Iterator<Item = usize> + '_ {
        const BLOCK: usize = 32;
        self.row(r)
            .chunks(BLOCK)
            .enumerate()
            .filter(|(_, block)| block.iter().fold(false, |any, &b| any | b))
            .flat_map(|(j, block)| {
                block
                    .iter()
                    .enumerate()
                    .filter_map(move |(c, &b)| b.then_some(j * BLOCK + c))
            })
    }

    /// Rows with at least one active entry (non-ablated neurons), ascending.
    pub fn active_rows(&self) -> Vec<usize> {
        (0..self.rows)
            .filter(|&r| self.row(r).contains(&true))
            .collect()
    }

    /// `nnz / len`, 0 for an empty mask.
    pub fn density(&self) -> f64 {
        if self.bits.is_empty() {
            0.0
        } else {
            self.nnz() as f64 / self.bits.len() as f64
        }
    }

    /// `1 − density`.
    pub fn sparsity(&self) -> f64 {
        1.0 - self.density()
    }

    /// The statistics of this mask as the weight `name` ([`LayerStats::of`]).
    pub fn stats(&self, name: &str) -> LayerStats {
        LayerStats::of(name, self)
    }

    /// Text rendering for snapshot tests: one line per row, `#` for active, `.` for inactive.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(self.rows * (self.fan_in + 1));
        for r in 0..self.rows {
            s.extend(self.row(r).iter().map(|&b| if b { '#' } else { '.' }));
            s.push('\n');
        }
        s
    }

    /// Parses [`Mask::render`]'s output (`#`/`1` active, `.`/`0` inactive); handy in tests.
    pub fn parse(text: &str) -> Result<Self> {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let fan_in = lines.first().map_or(0, |l| l.trim().chars().count());
        let mut bits = Vec::with_capacity(lines.len() * fan_in);
        for (r, line) in lines.iter().enumerate() {
            let line = line.trim();
            if line.chars().count() != fan_in {
                return Err(FormatError::invalid(
                    "mask text",
                    format!(
                        "line {r} has {} entries, line 0 has {fan_in}",
                        line.chars().count()
                    ),
                ));
            }
            for ch in line.chars() {
                bits.push(match ch {
                    '#' | '1' => true,
                    '.' | '0' => false,
                    other => {
                        return Err(FormatError::invalid(
                            "mask text",
                            format!("line {r}: unexpected character {other:?}"),
                        ))
                    }
                });
            }
        }
        Mask::new(lines.len(), fan_in, bits)
    }

    /// Sets inactive entries of a row-major `[rows, fan_in]` weight to zero.
    pub fn apply(&self, weights: &mut [f32]) -> Result<()> {
        check_len("weights", weights.len(), self.bits.len())?;
        for (w, &b) in weights.iter_mut().zip(&self.bits) {
            if !b {
                *w = 0.0;
            }
        }
        Ok(())
    }

    fn same_shape(&self, other: &Mask) -> Result<()> {
        if (self.rows, self.fan_in) != (other.rows, other.fan_in) {
            return Err(FormatError::invalid(
                "mask",
                format!(
                    "shapes differ: [{}, {}] and [{}, {}]",
                    self.rows, self.fan_in, other.rows, other.fan_in
                ),
            ));
        }
        Ok(())
    }

    fn zip_with(&self, other: &Mask, f: impl Fn(bool, bool) -> bool) -> Result<Mask> {
        self.same_shape(other)?;
        Ok(Mask {
            rows: self.rows,
            fan_in: self.fan_in,
            bits: self
                .bits
                .iter()
                .zip(&other.bits)
                .map(|(&a, &b)| f(a, b))
                .collect(),
            positions: OnceLock::new(),
        })
    }

    /// Entries active in either mask.
    pub fn union(&self, other: &Mask) -> Result<Mask> {
        self.zip_with(other, |a, b| a || b)
    }

    /// Adds the entries of `other` to `self` in place (the union without a new mask).
    ///
    /// Where `other`'s positions are known ([`Mask::with_positions`], or an earlier
    /// [`Mask::active_positions`]) this sets those entries only: O(active entries of `other`),
    /// not a pass over both masks.
    pub fn union_with(&mut self, other: &Mask) -> Result<()> {
        self.same_shape(other)?;
        match other.positions.get() {
            Some(pos) => {
                for &p in pos {
                    self.bits[p] = true;
                }
            }
            None => {
                for (a, &b) in self.bits.iter_mut().zip(&other.bits) {
                    *a |= b;
                }
            }
        }
        self.positions = OnceLock::new();
        Ok(())
    }

    /// Entries active in both masks.
    pub fn intersection(&self, other: &Mask) -> Result<Mask> {
        self.zip_with(other, |a, b| a && b)
    }

    /// Entries active in `self` but not in `other` (e.g. the dropped set: `old − new`).
    pub fn difference(&self, other: &Mask) -> Result<Mask> {
        self.zip_with(other, |a, b| a && !b)
    }

    /// Inactive entries become active and vice versa (the candidates for growth).
    pub fn complement(&self) -> Mask {
        Mask {
            rows: self.rows,
            fan_in: self.fan_in,
            bits: self.bits.iter().map(|&b| !b).collect(),
            positions: OnceLock::new(),
        }
    }

    /// True if every active entry of `self` is active in `other`.
    pub fn is_subset_of(&self, other: &Mask) -> Result<bool> {
        Ok(self.difference(other)?.nnz() == 0)
    }

    /// Number of entries active in both masks.
    pub fn overlap(&self, other: &Mask) -> Result<usize> {
        Ok(self.intersection(other)?.nnz())
    }
}

/// Active entries per row of `rows × fan_in` from their flat positions `r · fan_in + c`,
/// which must be strictly ascending and inside the layer (the `positions` constructors of
/// [`Condensed`](crate::Condensed) and [`Csr`](crate::Csr)).
pub(crate) fn position_row_counts(
    rows: usize,
    fan_in: usize,
    positions: &[usize],
) -> Result<Vec<usize>> {
    let len = checked_area("positions", rows, fan_in)?;
    if let Some(a) = positions.windows(2).position(|p| p[0] >= p[1]) {
        return Err(FormatError::invalid(
            "positions",
            format!(
                "not strictly increasing at position {}: {} after {}",
                a + 1,
                positions[a + 1],
                positions[a]
            ),
        ));
    }
    if let Some(&last) = positions.last().filter(|&&p| p >= len) {
        return Err(FormatError::invalid(
            "positions",
            format!("{last} outside the {rows} × {fan_in} layer (valid: 0..{len})"),
        ));
    }
    // The positions are ascending and distinct: a row holds at most `fan_in` of them, so its
    // count is where its end falls in the next `fan_in` — a binary search within the row's
    // run (cache-local), not a division per entry.
    let mut counts = vec![0usize; rows];
    let mut at = 0;
    for (r, c) in counts.iter_mut().enumerate() {
        let end = (r + 1) * fan_in;
        let run = &positions[at..(at + fan_in).min(positions.len())];
        *c = run.partition_point(|&p| p < end);
        at += *c;
    }
    Ok(counts)
}

/// The column (`p mod fan_in`) of each of the ascending `positions`, whose per-row counts are
/// `counts` ([`position_row_counts`]), through `narrow` — a subtraction per entry, not a
/// division.
pub(crate) fn position_columns<T>(
    counts: &[usize],
    fan_in: usize,
    positions: &[usize],
    narrow: impl Fn(usize) -> T,
) -> Vec<T> {
    let mut out = Vec::with_capacity(positions.len());
    let mut at = 0;
    for (r, &c) in counts.iter().enumerate() {
        let base = r * fan_in;
        out.extend(positions[at..at + c].iter().map(|&p| narrow(p - base)));
        at += c;
    }
    out
}

/// Appends `base + j` for every `j` with `bits[j]` set, ascending: [`Mask::positions`] on a
/// slice of mask bits (a chunk of a layer's mask, for a caller that splits the scan over
/// threads). Packs 64 entries into a word at a time and walks its set bits, so the cost is a
/// read of the bits plus one step per active entry.
pub fn push_active_positions(bits: &[bool], base: usize, out: &mut Vec<usize>) {
    let mut words = bits.chunks_exact(64);
    for (b, chunk) in (&mut words).enumerate() {
        let mut w = pack_word(chunk);
        while w != 0 {
            out.push(base + b * 64 + w.trailing_zeros() as usize);
            w &= w - 1;
        }
    }
    let tail = bits.len() - words.remainder().len();
    out.extend(
        words
            .remainder()
            .iter()
            .enumerate()
            .filter(|(_, &on)| on)
            .map(|(j, _)| base + tail + j),
    );
}

/// The number of `true` entries of `bits`, eight at a time: an entry is one byte, 0 or 1, so
/// adding 8-byte words adds eight counts at once, one per byte, and up to 255 words fit before a
/// byte could overflow. Counting entry by entry (`filter().count()`) widens every flag to a
/// 64-bit lane; on the 9.4 M entries of a 3072×3072 mask that took ~2.4 ms, and a mask update
/// of the wide MLP counts several masks (the ITOP rate, the sparse engine's layout choice).
fn count_active(bits: &[bool]) -> usize {
    let bytes = flag_bytes(bits);
    const LOW: u64 = 0x00ff_00ff_00ff_00ff;
    let mut n = 0;
    let mut blocks = bytes.chunks_exact(8 * 255);
    let word_sums = |block: &[u8]| -> usize {
        let acc = block
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("eight bytes")))
            .sum::<u64>();
        // Four 16-bit sums of byte pairs (each ≤ 510), then their total in the top 16 bits.
        let pairs = (acc & LOW) + ((acc >> 8) & LOW);
        (pairs.wrapping_mul(0x0001_0001_0001_0001) >> 48) as usize
    };
    for block in &mut blocks {
        n += word_sums(block);
    }
    let rest = blocks.remainder();
    let whole = rest.len() / 8 * 8;
    n += word_sums(&rest[..whole]);
    n + rest[whole..].iter().filter(|&&b| b != 0).count()
}

/// Mask entries as their bytes, each 0 or 1 (what the word-at-a-time loops above and below
/// add and multiply).
#[inline]
fn flag_bytes(bits: &[bool]) -> &[u8] {
    // SAFETY: a `bool` is one byte holding 0 or 1, so `bits.len()` entries are as many
    // readable, initialised bytes, borrowed for as long as `bits`.
    unsafe { std::slice::from_raw_parts(bits.as_ptr().cast::<u8>(), bits.len()) }
}

/// 64 mask entries packed into a word, entry `j` at bit `j`: eight entries at a time, their
/// bytes (0 or 1) gathered into one byte by a multiplication.
#[inline]
fn pack_word(chunk: &[bool]) -> u64 {
    debug_assert_eq!(chunk.len(), 64);
    let bytes = flag_bytes(chunk);
    let mut w = 0u64;
    for (q, eight) in bytes.chunks_exact(8).enumerate() {
        let x = u64::from_le_bytes(eight.try_into().expect("eight bytes"));
        // Byte i (0 or 1) times 2^(7i + 7 + 8j) for the constant's byte j lands on bit
        // 56 + i when i + j = 7; no two products share a bit, so nothing carries.
        w |= (x.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (q * 8);
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept list of active positions: given or computed, it is the mask's, and every
    /// change of the bits drops it; a wrong list is refused; the union through a list is the
    /// union through the bits; equality looks at the bits only.
    #[test]
    fn active_positions_follow_the_bits() {
        let bits = vec![false, true, true, false, false, true];
        let m = Mask::with_positions(2, 3, bits.clone(), vec![1, 2, 5]).unwrap();
        assert_eq!(m.active_positions(), &[1, 2, 5]);
        assert_eq!(m, Mask::new(2, 3, bits.clone()).unwrap());
        for bad in [
            vec![2, 1, 5],
            vec![1, 2, 3],
            vec![1, 1, 2, 5],
            vec![1, 2, 5, 6],
        ] {
            let e = Mask::with_positions(2, 3, bits.clone(), bad.clone());
            assert!(e.is_err(), "{bad:?}");
        }
        let mut n = m.clone();
        n.set(1, 0, true);
        assert_eq!(n.active_positions(), &[1, 2, 3, 5]);
        n.set(0, 1, false);
        assert_eq!(n.positions(), vec![2, 3, 5]);
        // Union through `m`'s list and through plain bits, into masks with and without lists.
        let plain = Mask::new(2, 3, bits).unwrap();
        let mut a = Mask::new(2, 3, vec![true, false, false, false, true, false]).unwrap();
        let _ = a.active_positions();
        let mut b = a.clone();
        a.union_with(&m).unwrap();
        b.union_with(&plain).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.active_positions(), &[0, 1, 2, 4, 5]);
        assert_eq!(b.positions(), vec![0, 1, 2, 4, 5]);
    }

    /// The word-wise count against entry-by-entry counting, on lengths around the 8-entry words
    /// and the 255-word blocks, with all-on stretches (the largest per-byte sums).
    #[test]
    fn nnz_counts_every_active_entry() {
        let mut seed = 5u64;
        for len in [
            0usize, 1, 7, 8, 9, 63, 64, 2039, 2040, 2041, 4080, 4095, 10_000,
        ] {
            for density in [0u64, 1, 50, 99, 100] {
                let bits: Vec<bool> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        (seed >> 33) % 100 < density
                    })
                    .collect();
                let want = bits.iter().filter(|&&b| b).count();
                let m = Mask::new(1, len, bits).unwrap();
                assert_eq!(m.nnz(), want, "len {len} density {density}%");
            }
        }
    }

    #[test]
    fn row_counts_and_columns_are_the_divisions() {
        let mut state = 3u64;
        for (rows, fan_in) in [(1, 1), (4, 7), (9, 64), (33, 100), (6, 1000)] {
            for density in [0u64, 3, 40, 100] {
                let positions: Vec<usize> = (0..rows * fan_in)
                    .filter(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (state >> 33) % 100 < density
                    })
                    .collect();
                let counts = position_row_counts(rows, fan_in, &positions).unwrap();
                let mut want = vec![0usize; rows];
                positions.iter().for_each(|&p| want[p / fan_in] += 1);
                assert_eq!(counts, want, "{rows}×{fan_in}, {density}%");
                let cols = position_columns(&counts, fan_in, &positions, |c| c);
                let want: Vec<usize> = positions.iter().map(|&p| p % fan_in).collect();
                assert_eq!(cols, want, "{rows}×{fan_in}, {density}%");
            }
        }
    }

    #[test]
    fn positions_are_the_active_entries_in_order() {
        // Sizes around the 64-entry words, densities from empty to full.
        let mut state = 7u64;
        for (rows, fan_in) in [(1, 1), (3, 21), (2, 64), (5, 100), (17, 129)] {
            for density in [0u64, 1, 10, 50, 100] {
                let bits: Vec<bool> = (0..rows * fan_in)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (state >> 33) % 100 < density
                    })
                    .collect();
                let want: Vec<usize> = (0..bits.len()).filter(|&i| bits[i]).collect();
                let m = Mask::new(rows, fan_in, bits).unwrap();
                assert_eq!(m.positions(), want, "{rows}×{fan_in}, {density}%");
            }
        }
    }

    fn sample() -> Mask {
        Mask::parse(
            "#..#.#
             ......
             .####.
             #....#",
        )
        .unwrap()
    }

    #[test]
    fn counts_and_density() {
        let m = sample();
        assert_eq!((m.rows(), m.fan_in()), (4, 6));
        assert_eq!(m.nnz(), 9);
        assert_eq!(m.row_counts(), vec![3, 0, 4, 2]);
        assert_eq!(m.active_rows(), vec![0, 2, 3]);
        assert!((m.density() - 9.0 / 24.0).abs() < 1e-12);
        assert_eq!(m.row_indices(2).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        // Long rows of every density, block edges included: the block scan equals a plain one.
        let mut state = 7u64;
        for (fan_in, per_mille) in [
            (31, 500),
            (32, 30),
            (33, 1000),
            (100, 10),
            (3072, 10),
            (3072, 900),
        ] {
            let bits: Vec<bool> = (0..2 * fan_in)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 33) % 1000 < per_mille
                })
                .collect();
            let m = Mask::new(2, fan_in, bits).unwrap();
            for r in 0..2 {
                let plain: Vec<usize> = (0..fan_in).filter(|&c| m.get(r, c)).collect();
                assert_eq!(
                    m.row_indices(r).collect::<Vec<_>>(),
                    plain,
                    "fan-in {fan_in}"
                );
            }
        }
    }

    #[test]
    fn render_snapshot() {
        insta::assert_snapshot!(sample().render());
    }

    #[test]
    fn stats_snapshot() {
        insta::assert_yaml_snapshot!(sample().stats("sample.weight"));
    }

    #[test]
    fn render_parse_round_trip() {
        let m = sample();
        assert_eq!(Mask::parse(&m.render()).unwrap(), m);
    }

    #[test]
    fn parse_rejects_ragged_and_unknown() {
        assert!(Mask::parse("##\n#").is_err());
        assert!(Mask::parse("#x").is_err());
    }

    #[test]
    fn set_operations() {
        let a = Mask::parse("##..\n.#.#").unwrap();
        let b = Mask::parse("#.#.\n.#..").unwrap();
        assert_eq!(a.union(&b).unwrap().render(), "###.\n.#.#\n");
        assert_eq!(a.intersection(&b).unwrap().render(), "#...\n.#..\n");
        assert_eq!(a.difference(&b).unwrap().render(), ".#..\n...#\n");
        assert_eq!(a.complement().render(), "..##\n#.#.\n");
        assert_eq!(a.overlap(&b).unwrap(), 2);
        assert!(a.intersection(&b).unwrap().is_subset_of(&a).unwrap());
        assert!(!a.is_subset_of(&b).unwrap());
        assert!(a.union(&Mask::zeros(3, 4)).is_err());
        let mut c = a.clone();
        c.union_with(&b).unwrap();
        assert_eq!(c, a.union(&b).unwrap());
        assert!(c.union_with(&Mask::zeros(3, 4)).is_err());
        assert_eq!(
            c,
            a.union(&b).unwrap(),
            "a failed union leaves the mask as it was"
        );
    }

    #[test]
    fn tensor_round_trip() {
        let m = sample();
        let t = m.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[4, 6]);
        assert_eq!(t.sum_all().unwrap().to_scalar::<f32>().unwrap(), 9.0);
        assert_eq!(Mask::from_tensor(&t).unwrap(), m);
    }

    #[test]
    fn from_conv_tensor_flattens_fan_in() {
        // [out 2, in 1, 2, 2]: fan-in 4 per output channel.
        let t = Tensor::new(
            &[[[[1f32, 0.], [0., 2.]]], [[[0f32, 0.], [3., 0.]]]],
            &Device::Cpu,
        )
        .unwrap();
        let m = Mask::from_tensor(&t).unwrap();
        assert_eq!(m.render(), "#..#\n..#.\n");
        assert!(Mask::from_tensor(&Tensor::new(&[1f32, 0.], &Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn apply_zeroes_inactive() {
        let m = Mask::parse("#.\n.#").unwrap();
        let mut w = vec![1.0, 2.0, 3.0, 4.0];
        m.apply(&mut w).unwrap();
        assert_eq!(w, vec![1.0, 0.0, 0.0, 4.0]);
        assert!(m.apply(&mut [0.0; 3]).is_err());
    }

    #[test]
    fn wrong_lengths_are_errors() {
        assert!(Mask::new(2, 3, vec![true; 5]).is_err());
        assert!(Mask::from_dense(2, 3, &[0.0; 7]).is_err());
        assert!(Mask::new(usize::MAX, 2, vec![]).is_err());
    }
}
