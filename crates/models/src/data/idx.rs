//! The IDX format (MNIST's): magic `0x00 0x00 <type> <ndims>`, `ndims` big-endian u32 sizes,
//! then the data. Only unsigned-byte data (type `0x08`) is used by the image data sets.

use std::io::Read;
use std::path::Path;

use super::DataError;

/// An IDX array of bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    /// Sizes of the dimensions.
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

/// Largest decompressed file accepted (the biggest IDX data set in use, MNIST-like train
/// images, is 47 MB; this leaves room for larger ones while refusing gzip bombs).
const MAX_DECOMPRESSED: u64 = 1 << 32;

/// Reads an IDX file of unsigned bytes, gzip-compressed or not (detected from its content).
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let raw = std::fs::read(path).map_err(|error| DataError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    decode_idx(&raw).map_err(|reason| DataError::Invalid {
        path: path.to_path_buf(),
        reason,
    })
}

/// Decodes the bytes of an IDX file of unsigned bytes, gzip-compressed or not (detected from
/// its content; at most 4 GiB decompressed); the error says what is wrong. [`read_idx`] is this
/// on a file's contents.
pub fn decode_idx(raw: &[u8]) -> Result<IdxArray, String> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw)
            .take(MAX_DECOMPRESSED)
            .read_to_end(&mut out)
            .map_err(|e| format!("corrupted gzip data: {e}"))?;
        parse_idx(&out)
    } else {
        parse_idx(raw)
    }
}

/// Parses IDX bytes; the error says what is wrong.
pub(crate) fn parse_idx(bytes: &[u8]) -> Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!(
            "{} bytes: too short for an IDX header",
            bytes.len()
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!(
            "bad magic {:02x}{:02x}: not an IDX file",
            bytes[0], bytes[1]
        ));
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "data type 0x{:02x}, expected unsigned bytes (0x08)",
            bytes[2]
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 {
        return Err("zero dimensions".into());
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(format!(
            "truncated header: {ndims} dimensions need {header} bytes, file has {}",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    let have = bytes.len() - header;
    if have != n {
        return Err(format!(
            "dimensions {dims:?} need {n} data bytes, the file has {have} ({})",
            if have < n {
                "truncated"
            } else {
                "trailing bytes"
            }
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(data);
        b
    }

    #[test]
    fn parses_and_rejects() {
        let ok = idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(
            parse_idx(&ok).unwrap(),
            IdxArray {
                dims: vec![2, 3],
                data: vec![1, 2, 3, 4, 5, 6]
            }
        );
        assert!(parse_idx(&ok[..ok.len() - 1])
            .unwrap_err()
            .contains("truncated"));
        let mut trailing = ok.clone();
        trailing.push(0);
        assert!(parse_idx(&trailing).unwrap_err().contains("trailing"));
        assert!(parse_idx(&[1, 0, 8, 1]).unwrap_err().contains("magic"));
        assert!(parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 0])
            .unwrap_err()
            .contains("data type"));
        assert!(parse_idx(&[0, 0, 8, 2, 0, 0])
            .unwrap_err()
            .contains("truncated header"));
        assert!(parse_idx(&idx(&[u32::MAX, u32::MAX, u32::MAX], &[]))
            .unwrap_err()
            .contains("overflow"));
    }
}
