//! CIFAR-10, binary version: `data_batch_1.bin` … `data_batch_5.bin` and `test_batch.bin`, each
//! a sequence of 3,073-byte records (one label byte, then 32×32 red, green and blue planes).

use std::path::Path;

use super::{DataError, ImageSet, Split};

const RECORD: usize = 1 + 3 * 32 * 32;
const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
const TEST_FILES: [&str; 1] = ["test_batch.bin"];

pub(super) fn has_files(dir: &Path) -> bool {
    TRAIN_FILES
        .iter()
        .chain(&TEST_FILES)
        .all(|f| dir.join(f).exists())
}

/// Decodes one CIFAR-10 binary file: its labels and its pixels scaled to `[0, 1]`, record by
/// record. It must be a whole, non-zero number of 3073-byte records with labels below 10; the
/// error says what is wrong. [`load_cifar10`] is this on each file of a split.
pub fn parse_cifar10(bytes: &[u8]) -> Result<(Vec<u8>, Vec<f32>), String> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
        return Err(format!(
            "{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records \
             (truncated or not the binary version?)",
            bytes.len()
        ));
    }
    let n = bytes.len() / RECORD;
    let (mut labels, mut images) = (Vec::with_capacity(n), Vec::with_capacity(n * (RECORD - 1)));
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] >= 10 {
            return Err(format!("record {i}: label {} is not below 10", rec[0]));
        }
        labels.push(rec[0]);
        images.extend(rec[1..].iter().map(|&p| p as f32 / 255.0));
    }
    Ok((labels, images))
}

/// Loads one split of CIFAR-10 (binary version) from `dir`. Every file must be a whole number of
/// records with labels below 10; errors name the file.
pub fn load_cifar10(dir: &Path, split: Split) -> Result<ImageSet, DataError> {
    let files: &[&str] = match split {
        Split::Train => &TRAIN_FILES,
        Split::Test => &TEST_FILES,
    };
    let mut set = ImageSet {
        images: Vec::new(),
        labels: Vec::new(),
        channels: 3,
        rows: 32,
        cols: 32,
        classes: 10,
    };
    for f in files {
        let path = dir.join(f);
        let bytes = std::fs::read(&path).map_err(|error| DataError::Io {
            path: path.clone(),
            error,
        })?;
        let (labels, images) = parse_cifar10(&bytes).map_err(|reason| DataError::Invalid {
            path: path.clone(),
            reason,
        })?;
        set.labels.extend(labels);
        set.images.extend(images);
    }
    Ok(set)
}
