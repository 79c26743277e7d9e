//! Shared by the models test files: the committed Fashion-MNIST slice (1,000 train / 500 test
//! images) split as a config asks.

use std::path::Path;

use models::data::{load_mnist_like, Split};
use models::{Datasets, TrainConfig};

/// The committed slice with `cfg`'s validation split and limit applied.
pub fn fixture(cfg: &TrainConfig) -> Datasets {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fashion-mnist-tiny");
    Datasets::split(
        load_mnist_like(&dir, Split::Train).unwrap(),
        load_mnist_like(&dir, Split::Test).unwrap(),
        cfg,
    )
}
