//! The IDX reader on generated files, plain and gzip, valid and broken, and on the Debian
//! package's Fashion-MNIST when it is installed.

use std::io::Write;
use std::path::Path;

use models::data::{find_dataset, load_mnist_like, read_idx, DataError, DatasetName, Split};

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(data);
    b
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Writes a 3-image, 2×2 data set; `gzip` picks plain or `.gz` files.
fn write_set(dir: &Path, gzip: bool, labels: &[u8]) {
    let images: Vec<u8> = (0..12).map(|i| (i * 20) as u8).collect();
    for (stem, bytes) in [
        ("train-images-idx3-ubyte", idx(&[3, 2, 2], &images)),
        (
            "train-labels-idx1-ubyte",
            idx(&[labels.len() as u32], labels),
        ),
        ("t10k-images-idx3-ubyte", idx(&[3, 2, 2], &images)),
        ("t10k-labels-idx1-ubyte", idx(&[3], &[0, 1, 2])),
    ] {
        if gzip {
            std::fs::write(dir.join(format!("{stem}.gz")), gz(&bytes)).unwrap();
        } else {
            std::fs::write(dir.join(stem), bytes).unwrap();
        }
    }
}

#[test]
fn loads_plain_and_gzip() {
    for gzip in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), gzip, &[9, 0, 4]);
        let found = find_dataset(DatasetName::Mnist, Some(dir.path())).unwrap();
        let set = load_mnist_like(&found, Split::Train).unwrap();
        assert_eq!((set.len(), set.rows, set.cols), (3, 2, 2));
        assert_eq!(set.labels, vec![9, 0, 4]);
        assert_eq!(set.images[1], 20.0 / 255.0);
        assert_eq!(
            load_mnist_like(&found, Split::Test).unwrap().labels,
            vec![0, 1, 2]
        );
    }
}

#[test]
fn broken_files_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), false, &[1, 2, 10]);
    let err = load_mnist_like(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train-labels-idx1-ubyte") && err.contains("label 10 at index 2"),
        "{err}"
    );

    write_set(dir.path(), false, &[1, 2]);
    let err = load_mnist_like(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 labels for 3 images"), "{err}");

    let p = dir.path().join("train-images-idx3-ubyte");
    let full = std::fs::read(&p).unwrap();
    std::fs::write(&p, &full[..full.len() - 3]).unwrap();
    let err = load_mnist_like(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("truncated"),
        "{err}"
    );

    let g = dir.path().join("broken.gz");
    let mut z = gz(&full);
    z.truncate(z.len() / 2);
    std::fs::write(&g, z).unwrap();
    assert!(matches!(read_idx(&g), Err(DataError::Invalid { .. })));
    assert!(matches!(
        read_idx(&dir.path().join("missing")),
        Err(DataError::Io { .. })
    ));
}

/// A set of zero images is an error naming the file, not an accuracy of 0 later.
#[test]
fn an_empty_split_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), false, &[9, 0, 4]);
    std::fs::write(
        dir.path().join("t10k-images-idx3-ubyte"),
        idx(&[0, 2, 2], &[]),
    )
    .unwrap();
    std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), idx(&[0], &[])).unwrap();
    let e = load_mnist_like(dir.path(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t10k-images-idx3-ubyte") && e.contains("no images"),
        "{e}"
    );
    assert!(load_mnist_like(dir.path(), Split::Train).is_ok());
}

#[test]
fn not_found_lists_where_it_looked_and_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = find_dataset(DatasetName::FashionMnist, Some(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fashion-mnist") && err.contains("apt-get install -y dataset-fashion-mnist"),
        "{err}"
    );
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
}

/// The real thing from the Debian package. Ignored by default, so that a machine without the
/// package reports it as ignored rather than passed; `.ci/run` installs the package where it can
/// and runs it with `cargo test --release --workspace --test data -- --ignored` (it fails if the
/// package is missing).
#[test]
#[ignore = "needs `apt-get install -y dataset-fashion-mnist`"]
fn debian_fashion_mnist() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    assert!(dir.exists(), "{} not installed", dir.display());
    let test = load_mnist_like(dir, Split::Test).unwrap();
    assert_eq!((test.len(), test.rows, test.cols), (10_000, 28, 28));
    let mut counts = [0usize; 10];
    for &l in &test.labels {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [1000; 10], "Fashion-MNIST's test set is balanced");
}

fn cifar_record(label: u8, seed: u8) -> Vec<u8> {
    let mut r = vec![label];
    r.extend((0..3072).map(|i| (i as u8).wrapping_mul(seed)));
    r
}

fn write_cifar(dir: &Path, per_file: usize) {
    for f in 1..=5 {
        let bytes: Vec<u8> = (0..per_file)
            .flat_map(|i| cifar_record((i % 10) as u8, f as u8))
            .collect();
        std::fs::write(dir.join(format!("data_batch_{f}.bin")), bytes).unwrap();
    }
    let test: Vec<u8> = (0..per_file)
        .flat_map(|i| cifar_record(9 - (i % 10) as u8, 7))
        .collect();
    std::fs::write(dir.join("test_batch.bin"), test).unwrap();
}

#[test]
fn cifar10_binary_reader() {
    use models::data::load_cifar10;
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path(), 3);
    assert_eq!(
        find_dataset(DatasetName::Cifar10, Some(dir.path())).unwrap(),
        dir.path()
    );
    let train = load_cifar10(dir.path(), Split::Train).unwrap();
    assert_eq!(
        (train.len(), train.channels, train.rows, train.cols),
        (15, 3, 32, 32)
    );
    assert_eq!(&train.labels[..4], &[0, 1, 2, 0]);
    // Record 3 is the first of data_batch_2: pixel i = (i · 2) mod 256, red plane first.
    let img = &train.images[3 * 3072..4 * 3072];
    assert_eq!(img[1], 2.0 / 255.0);
    assert_eq!(img[1024 + 1], ((1025u32 * 2) % 256) as f32 / 255.0);
    let test = load_cifar10(dir.path(), Split::Test).unwrap();
    assert_eq!(test.labels, vec![9, 8, 7]);
}

#[test]
fn broken_cifar_files_name_the_file() {
    use models::data::load_cifar10;
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path(), 2);
    let f = dir.path().join("data_batch_3.bin");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes.truncate(5000);
    std::fs::write(&f, &bytes).unwrap();
    let e = load_cifar10(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data_batch_3.bin") && e.contains("5000 bytes"),
        "{e}"
    );
    let t = dir.path().join("test_batch.bin");
    let mut bytes = std::fs::read(&t).unwrap();
    bytes[3073] = 10;
    std::fs::write(&t, &bytes).unwrap();
    let e = load_cifar10(dir.path(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test_batch.bin") && e.contains("record 1: label 10"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    let e = find_dataset(DatasetName::Cifar10, Some(empty.path()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cifar-10-binary.tar.gz"), "{e}");
}

#[test]
fn validation_split_is_seeded_disjoint_and_complete() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fashion-mnist-tiny");
    let set = load_mnist_like(&dir, Split::Train).unwrap();
    let (train, val) = set.split_validation(0.2, 4);
    assert_eq!((train.len(), val.len()), (800, 200));
    assert_eq!(set.split_validation(0.2, 4), (train.clone(), val.clone()));
    assert_ne!(set.split_validation(0.2, 5).1, val);
    // Every image lands in exactly one part: compare the multisets of per-image sums.
    let sums = |s: &models::data::ImageSet| {
        let mut v: Vec<u64> = s
            .images
            .chunks(784)
            .map(|c| c.iter().map(|p| (p * 255.0).round() as u64).sum())
            .collect();
        v.sort_unstable();
        v
    };
    let mut both = sums(&train);
    both.extend(sums(&val));
    both.sort_unstable();
    assert_eq!(both, sums(&set));
    assert_eq!(set.limit(10).len(), 10);
    assert_eq!(set.limit(10).labels, set.labels[..10]);
    let stats = set.channel_stats();
    assert_eq!(stats.len(), 1);
    assert!(
        (stats[0].0 - 0.286).abs() < 0.02 && (stats[0].1 - 0.353).abs() < 0.02,
        "{stats:?}"
    );
}
