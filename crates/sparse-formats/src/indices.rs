//! [`IndexVec`]: column indices stored in the narrowest integer type that fits the fan-in.

/// The integer type of stored column indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexType {
    /// 16-bit indices: any fan-in up to 65,536 (indices 0..=65,535).
    U16,
    /// 32-bit indices: larger fan-ins.
    U32,
}

impl IndexType {
    /// The narrowest type able to index `fan_in` columns: `U16` up to 65,536, else `U32`.
    pub fn for_fan_in(fan_in: usize) -> Self {
        if fan_in <= 1 << 16 {
            IndexType::U16
        } else {
            IndexType::U32
        }
    }
}

/// Column indices in the narrowest integer type that fits the fan-in (half the index bytes of
/// a `u32` layout for every layer up to 65,536 inputs, which is nearly all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexVec {
    /// 16-bit indices.
    U16(Vec<u16>),
    /// 32-bit indices.
    U32(Vec<u32>),
}

impl IndexVec {
    /// Collects `indices` (all `< fan_in`, which the caller guarantees) into the narrowest type
    /// for `fan_in`.
    pub fn collect_for_fan_in(fan_in: usize, indices: impl IntoIterator<Item = usize>) -> Self {
        match IndexType::for_fan_in(fan_in) {
            IndexType::U16 => IndexVec::U16(indices.into_iter().map(|i| i as u16).collect()),
            IndexType::U32 => IndexVec::U32(indices.into_iter().map(|i| i as u32).collect()),
        }
    }

    /// Converts to the narrowest type for `fan_in`. Indices that do not fit are kept wide; the
    /// validation that follows every use of this reports them as out of range.
    pub fn narrowed(self, fan_in: usize) -> Self {
        match (self, IndexType::for_fan_in(fan_in)) {
            (IndexVec::U32(v), IndexType::U16) if v.iter().all(|&i| i <= u16::MAX as u32) => {
                IndexVec::U16(v.into_iter().map(|i| i as u16).collect())
            }
            (IndexVec::U16(v), IndexType::U32) => {
                IndexVec::U32(v.into_iter().map(u32::from).collect())
            }
            (other, _) => other,
        }
    }

    /// The stored type.
    pub fn index_type(&self) -> IndexType {
        match self {
            IndexVec::U16(_) => IndexType::U16,
            IndexVec::U32(_) => IndexType::U32,
        }
    }

    /// Number of indices.
    pub fn len(&self) -> usize {
        match self {
            IndexVec::U16(v) => v.len(),
            IndexVec::U32(v) => v.len(),
        }
    }

    /// True if there are no indices.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Index `i` as `usize`. Panics if out of range, like slice indexing.
    #[inline]
    pub fn get(&self, i: usize) -> usize {
        match self {
            IndexVec::U16(v) => v[i] as usize,
            IndexVec::U32(v) => v[i] as usize,
        }
    }

    /// All indices as `usize`, in order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = usize> + '_> {
        match self {
            IndexVec::U16(v) => Box::new(v.iter().map(|&i| i as usize)),
            IndexVec::U32(v) => Box::new(v.iter().map(|&i| i as usize)),
        }
    }

    /// Indices `range` as `usize` (one row of a layout).
    pub fn slice_to_vec(&self, range: std::ops::Range<usize>) -> Vec<usize> {
        match self {
            IndexVec::U16(v) => v[range].iter().map(|&i| i as usize).collect(),
            IndexVec::U32(v) => v[range].iter().map(|&i| i as usize).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowest_type_boundary() {
        assert_eq!(IndexType::for_fan_in(1), IndexType::U16);
        assert_eq!(IndexType::for_fan_in(65_536), IndexType::U16);
        assert_eq!(IndexType::for_fan_in(65_537), IndexType::U32);
        let v = IndexVec::collect_for_fan_in(65_536, [0, 65_535]);
        assert_eq!(v, IndexVec::U16(vec![0, 65_535]));
        let v = IndexVec::collect_for_fan_in(65_537, [0, 65_536]);
        assert_eq!(v, IndexVec::U32(vec![0, 65_536]));
    }

    #[test]
    fn narrowing_and_widening() {
        assert_eq!(
            IndexVec::U32(vec![1, 2]).narrowed(10),
            IndexVec::U16(vec![1, 2])
        );
        assert_eq!(
            IndexVec::U16(vec![1, 2]).narrowed(70_000),
            IndexVec::U32(vec![1, 2])
        );
        // Out-of-range values are left wide for validation to report.
        assert_eq!(
            IndexVec::U32(vec![70_000]).narrowed(10),
            IndexVec::U32(vec![70_000])
        );
    }
}
