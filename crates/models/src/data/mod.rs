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

pub use cifar::{load_cifar10, parse_cifar10};
pub use idx::{decode_idx, read_idx, IdxArray};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;

/// Errors reading data sets; each names the file or the places searched.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
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
        // One slice copy per image (a per-element `flat_map` took ~1 s on CIFAR-10's training
        // set).
        let mut images = Vec::with_capacity(idx.len() * d);
        for &i in idx {
            images.extend_from_slice(&self.images[i * d..(i + 1) * d]);
        }
        ImageSet {
            images,
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

/// The data sets the trainer reads (serde and command line: `fashion-mnist`, `mnist`,
/// `cifar-10`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DatasetName {
    /// Fashion-MNIST (IDX files; Debian package `dataset-fashion-mnist`).
    #[serde(rename = "fashion-mnist")]
    FashionMnist,
    /// MNIST (IDX files).
    #[serde(rename = "mnist")]
    Mnist,
    /// CIFAR-10, binary version.
    #[serde(rename = "cifar-10")]
    Cifar10,
}

impl DatasetName {
    /// Every data set, in documentation order.
    pub const ALL: [DatasetName; 3] = [
        DatasetName::FashionMnist,
        DatasetName::Mnist,
        DatasetName::Cifar10,
    ];

    /// The name used in configs, folders and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::FashionMnist => "fashion-mnist",
            DatasetName::Mnist => "mnist",
            DatasetName::Cifar10 => "cifar-10",
        }
    }

    /// `[channels, rows, cols]` of one image.
    pub fn image_shape(self) -> [usize; 3] {
        match self {
            DatasetName::FashionMnist | DatasetName::Mnist => [1, 28, 28],
            DatasetName::Cifar10 => [3, 32, 32],
        }
    }

    /// Whether `dir` holds this data set's files.
    fn present_in(self, dir: &Path) -> bool {
        match self {
            DatasetName::Cifar10 => cifar::has_files(dir),
            _ => has_files(dir),
        }
    }

    /// Loads one split from the folder `dir` (see [`find_dataset`]).
    pub fn load(self, dir: &Path, split: Split) -> Result<ImageSet, DataError> {
        match self {
            DatasetName::Cifar10 => load_cifar10(dir, split),
            _ => load_mnist_like(dir, split),
        }
    }

    /// How to get the data set, for the not-found message.
    fn hint(self) -> String {
        match self {
            DatasetName::Cifar10 => "Download the binary version (cifar-10-binary.tar.gz) from \
                 https://www.cs.toronto.edu/~kriz/cifar.html and extract its data_batch_*.bin \
                 and test_batch.bin into ./data/cifar-10, or pass --data-dir"
                .to_string(),
            DatasetName::FashionMnist => "Get it with `apt-get update && apt-get install -y \
                 dataset-fashion-mnist`, or download the four IDX files of the data set's \
                 official release into ./data/fashion-mnist, or pass --data-dir"
                .to_string(),
            DatasetName::Mnist => "Download the four IDX files of the data set's official \
                 release into ./data/mnist, or pass --data-dir"
                .to_string(),
        }
    }
}

impl std::fmt::Display for DatasetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DatasetName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DatasetName::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown data set `{s}` (one of: {})",
                    DatasetName::ALL.map(|d| d.as_str()).join(", ")
                )
            })
    }
}

/// Finds the folder holding the data set `name`, searching as described in the module
/// documentation.
pub fn find_dataset(name: DatasetName, explicit: Option<&Path>) -> Result<PathBuf, DataError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        // An explicit folder is the only place looked at: a wrong path must not silently fall
        // back to another copy.
        candidates.push(p.to_path_buf());
        candidates.push(p.join(name.as_str()));
    } else if let Some(d) = std::env::var_os("DST_DATA_DIR") {
        let d = PathBuf::from(d);
        candidates.push(d.join(name.as_str()));
        candidates.push(d);
    }
    if explicit.is_none() {
        candidates.push(Path::new("data").join(name.as_str()));
    }
    if explicit.is_none() && name == DatasetName::FashionMnist {
        candidates.push(PathBuf::from("/usr/share/datasets/fashion-mnist"));
    }
    if let Some(found) = candidates.iter().find(|d| name.present_in(d)) {
        return Ok(found.clone());
    }
    Err(DataError::NotFound {
        name: name.to_string(),
        searched: candidates,
        hint: name.hint(),
    })
}

/// The three splits a run uses.
#[derive(Debug, Clone)]
pub struct Datasets {
    /// Training examples (after the validation split and `limit`).
    pub train: ImageSet,
    /// Validation examples (empty when `validation_fraction` is 0).
    pub validation: ImageSet,
    /// Test examples.
    pub test: ImageSet,
}

impl Datasets {
    /// Finds and loads the data set named by `cfg.data` (see [`find_dataset`]), then applies
    /// the validation split and `limit`.
    pub fn load(cfg: &TrainConfig) -> Result<Datasets, DataError> {
        let d = &cfg.data;
        let dir = find_dataset(d.name, d.dir.as_deref())?;
        let train = d.name.load(&dir, Split::Train)?;
        let test = d.name.load(&dir, Split::Test)?;
        Ok(Datasets::split(train, test, cfg))
    }

    /// Applies `cfg.data`'s validation split and `limit` to loaded sets.
    pub fn split(train: ImageSet, test: ImageSet, cfg: &TrainConfig) -> Datasets {
        let (train, validation) = train.split_validation(cfg.data.validation_fraction, cfg.seed);
        let train = match cfg.data.limit {
            Some(l) => train.limit(l),
            None => train,
        };
        Datasets {
            train,
            validation,
            test,
        }
    }
}

fn open_either(dir: &Path, stem: &str) -> Result<IdxArray, DataError> {
    let plain = dir.join(stem);
    if plain.exists() {
        read_idx(&plain)
    } else {
        read_idx(&dir.join(format!("{stem}.gz")))
    }
}

/// Unlabelled images from one IDX image file (`[n, rows, cols]` u8, plain or gzip), as an
/// [`ImageSet`] of one channel whose labels are all 0 (for prediction).
pub fn read_idx_images(path: &Path, classes: usize) -> Result<ImageSet, DataError> {
    let images = read_idx(path)?;
    if images.dims.len() != 3 {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "expected an image file [n, rows, cols], found {} dimension(s)",
                images.dims.len()
            ),
        });
    }
    Ok(ImageSet {
        images: images.data.iter().map(|&p| p as f32 / 255.0).collect(),
        labels: vec![0; images.dims[0]],
        channels: 1,
        rows: images.dims[1],
        cols: images.dims[2],
        classes,
    })
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
    if images.dims[0] == 0 {
        // Accuracy over no images would read as 0 rather than as a broken data set.
        return Err(invalid(img_stem, "holds no images".into()));
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
