//! Training on a committed slice of real Fashion-MNIST (1,000 train / 500 test images): SRigL
//! at 90% beats chance by a wide margin, and the same seed gives the same run.

use std::path::Path;

use dst_core::Method;
use models::data::{load_mnist_like, Split};
use models::train::{train_mlp, MlpConfig};

fn fixture() -> (models::data::ImageSet, models::data::ImageSet) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fashion-mnist-tiny");
    (
        load_mnist_like(&dir, Split::Train).unwrap(),
        load_mnist_like(&dir, Split::Test).unwrap(),
    )
}

fn cfg(method: Option<Method>) -> MlpConfig {
    MlpConfig {
        epochs: 4,
        batch_size: 50,
        delta_t: 10,
        method,
        ..MlpConfig::lenet_300_100_srigl()
    }
}

#[test]
fn srigl_90_on_real_fashion_mnist_beats_chance() {
    let (train, test) = fixture();
    let mut seen = 0;
    let h = train_mlp(&train, &test, &cfg(Some(Method::Srigl)), |_| seen += 1).unwrap();
    assert_eq!(seen, 4);
    let last = h.last().unwrap();
    assert!(
        last.test_accuracy > 0.6,
        "test accuracy {} (chance 0.1)",
        last.test_accuracy
    );
    assert!(
        (last.sparsity - 0.9).abs() < 0.01,
        "sparsity {}",
        last.sparsity
    );
    assert!(h[0].train_loss > last.train_loss);
}

#[test]
fn same_seed_same_run_and_dense_runs_too() {
    let (train, test) = fixture();
    let small = MlpConfig {
        epochs: 1,
        limit: Some(300),
        ..cfg(Some(Method::Rigl))
    };
    let a = train_mlp(&train, &test, &small, |_| {}).unwrap();
    let b = train_mlp(&train, &test, &small, |_| {}).unwrap();
    assert_eq!(a[0].test_loss, b[0].test_loss);
    assert_eq!(a[0].train_loss, b[0].train_loss);
    let dense = train_mlp(
        &train,
        &test,
        &MlpConfig {
            method: None,
            ..small
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(dense[0].sparsity, 0.0);
    assert!(dense[0].test_accuracy > 0.3);
}

#[test]
fn bad_widths_are_a_clear_error() {
    let (train, test) = fixture();
    let bad = MlpConfig {
        widths: vec![100, 10],
        ..cfg(None)
    };
    let err = train_mlp(&train, &test, &bad, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("widths") && err.contains("784"), "{err}");
}
