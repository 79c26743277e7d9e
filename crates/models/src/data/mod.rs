//! Data sets: IDX files (MNIST, Fashion-MNIST) and CIFAR-10, found on disk and validated, with
//! seeded validation splits and subsets.
//!
//! A data set is looked for at an explicit path (`DIR` or `DIR/<name>`; when given, nowhere
//! else), otherwise in `$DST_DATA_DIR` (or `$DST_DATA_DIR/<name>`), in `./data/<name>`, and for
//! Fashion-MNIST in `/usr/share/datasets/fashion-mnist` (Debian package
//! `dataset-fashion-mnist`). CIFAR-10 is the binary version (`data_batch_*.bin`). Files may be
//! plain or gzip-compressed. Every header, size and label is validated; a truncated or corrupted
//! file gives an [`DataError`] naming it, never a panic, and nothing is allocated beyond what the
//! file's own size justifies.

mod cifar;
mod idx;

pub use cifar::load_cifar10;
pub use idx::{read_idx, IdxArray};

use std::path::{Path, PathBuf};

/// Errors reading data sets; each names the file or the places searched.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a valid IDX file of the expected kind.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No copy of the data set was found.
    #[error(
        "data set `{name}` not found; looked in: {}. {hint}",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotFound {
        /// Data set name.
        name: String,
        /// Folders looked in.
        searched: Vec<PathBuf>,
        /// How to get it.
        hint: String,
    },
}

/// Which split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training split (`train-*`).
    Train,
    /// The test split (`t10k-*`).
    Test,
}

/// Images and labels of a data set.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    /// Pixels scaled to `[0, 1]`, `[n, channels, rows, cols]` row-major.
    pub images: Vec<f32>,
    /// Class of each image, `< classes`.
    pub labels: Vec<u8>,
    /// Colour channels (1 for MNIST, 3 for CIFAR-10).
    pub channels: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// Number of classes.
    pub classes: usize,
}

impl ImageSet {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True if there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image (`channels · rows · cols`).
    pub fn image_len(&self) -> usize {
        self.channels * self.rows * self.cols
    }

    /// The examples at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> ImageSet {
        let d = self.image_len();
        ImageSet {
            images: idx
                .iter()
                .flat_map(|&i| self.images[i * d..(i + 1) * d].iter().copied())
                .collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            channels: self.channels,
            rows: self.rows,
            cols: self.cols,
            classes: self.classes,
        }
    }

    /// The first `limit` examples (all if there are fewer).
    pub fn limit(&self, limit: usize) -> ImageSet {
        let idx: Vec<usize> = (0..limit.min(self.len())).collect();
        self.select(&idx)
    }

    /// Splits off a validation set of `round(fraction · n)` examples chosen by a seeded
    /// shuffle; returns `(train, validation)`. The same seed always gives the same split.
    pub fn split_validation(&self, fraction: f64, seed: u64) -> (ImageSet, ImageSet) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        let mut rng = dst_core::Rng::derive(seed, &[0x5917]);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let n_val = ((fraction * self.len() as f64).round() as usize).min(self.len());
        let (val, train) = order.split_at(n_val);
        let (mut train, mut val) = (train.to_vec(), val.to_vec());
        train.sort_unstable();
        val.sort_unstable();
        (self.select(&train), self.select(&val))
    }

    /// Per-channel mean and standard deviation of the pixels (for normalisation).
    pub fn channel_stats(&self) -> Vec<(f32, f32)> {
        let hw = self.rows * self.cols;
        (0..self.channels)
            .map(|c| {
                let (mut s, mut s2, mut n) = (0.0f64, 0.0f64, 0usize);
                for img in self.images.chunks_exact(self.image_len().max(1)) {
                    for &p in &img[c * hw..(c + 1) * hw] {
                        s += p as f64;
                        s2 += (p as f64) * (p as f64);
                        n += 1;
                    }
                }
                let n = n.max(1) as f64;
                let mean = s / n;
                let std = (s2 / n - mean * mean).max(1e-12).sqrt();
                (mean as f32, std as f32)
            })
            .collect()
    }
}

const IDX_FILES: [(&str, &str); 2] = [
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
];

fn has_files(dir: &Path) -> bool {
    IDX_FILES.iter().all(|(i, l)| {
        [i, l]
            .iter()
            .all(|f| dir.join(f).exists() || dir.join(format!("{f}.gz")).exists())
    })
}

/// Finds the folder holding `name` (e.g. `fashion-mnist`), searching as described in the module
/// documentation.
pub fn find_dataset(name: &str, explicit: Option<&Path>) -> Result<PathBuf, DataError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        // An explicit folder is the only place looked at: a wrong path must not silently fall
        // back to another copy.
        candidates.push(p.to_path_buf());
        candidates.push(p.join(name));
    } else if let Some(d) = std::env::var_os("DST_DATA_DIR") {
        let d = PathBuf::from(d);
        candidates.push(d.join(name));
        candidates.push(d);
    }
    if explicit.is_none() {
        candidates.push(Path::new("data").join(name));
    }
    if explicit.is_none() && name == "fashion-mnist" {
        candidates.push(PathBuf::from("/usr/share/datasets/fashion-mnist"));
    }
    let present = |d: &Path| {
        if name == "cifar-10" {
            cifar::has_files(d)
        } else {
            has_files(d)
        }
    };
    if let Some(found) = candidates.iter().find(|d| present(d)) {
        return Ok(found.clone());
    }
    let hint = match name {
        "cifar-10" => {
            "Download the binary version (cifar-10-binary.tar.gz) from \
                       https://www.cs.toronto.edu/~kriz/cifar.html and extract its \
                       data_batch_*.bin and test_batch.bin into ./data/cifar-10, or pass --data-dir"
                .to_string()
        }
        _ => format!(
            "Get it with `apt-get install dataset-fashion-mnist` (Fashion-MNIST), or download \
             the four IDX files of the data set's official release into ./data/{name}, or pass \
             --data-dir"
        ),
    };
    Err(DataError::NotFound {
        name: name.to_string(),
        searched: candidates,
        hint,
    })
}

fn open_either(dir: &Path, stem: &str) -> Result<IdxArray, DataError> {
    let plain = dir.join(stem);
    if plain.exists() {
        read_idx(&plain)
    } else {
        read_idx(&dir.join(format!("{stem}.gz")))
    }
}

/// Loads one split of an MNIST-like data set from `dir` (10 classes, `u8` pixels).
pub fn load_mnist_like(dir: &Path, split: Split) -> Result<ImageSet, DataError> {
    let (img_stem, lbl_stem) = IDX_FILES[match split {
        Split::Train => 0,
        Split::Test => 1,
    }];
    let images = open_either(dir, img_stem)?;
    let labels = open_either(dir, lbl_stem)?;
    let invalid = |stem: &str, reason: String| DataError::Invalid {
        path: dir.join(stem),
        reason,
    };
    if images.dims.len() != 3 {
        return Err(invalid(
            img_stem,
            format!(
                "expected 3 dimensions (n, rows, cols), found {:?}",
                images.dims
            ),
        ));
    }
    if labels.dims.len() != 1 {
        return Err(invalid(
            lbl_stem,
            format!("expected 1 dimension (n), found {:?}", labels.dims),
        ));
    }
    if images.dims[0] != labels.dims[0] {
        return Err(invalid(
            lbl_stem,
            format!("{} labels for {} images", labels.dims[0], images.dims[0]),
        ));
    }
    let classes = 10;
    if let Some((i, &l)) = labels
        .data
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        return Err(invalid(
            lbl_stem,
            format!("label {l} at index {i} is not below {classes}"),
        ));
    }
    Ok(ImageSet {
        images: images.data.iter().map(|&p| p as f32 / 255.0).collect(),
        labels: labels.data,
        channels: 1,
        rows: images.dims[1],
        cols: images.dims[2],
        classes,
    })
}
