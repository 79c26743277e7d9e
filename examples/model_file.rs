//! Deploying a trained sparse model: train SRigL at 90% on an MLP, write it as a model file
//! (the layers condensed, the architecture and input normalisation in its metadata — what
//! `dst export` writes), load it back with `SparseModel` without any training machinery, and
//! check it: the same test accuracy, and batch-256 inference time against the same model dense.
//!
//! Run: `cargo run --release -p examples --example model_file -- [--data-dir DIR] [--epochs N]`
//! (Fashion-MNIST from DIR, `$DST_DATA_DIR` or the Debian package's location).

use std::time::Instant;

use anyhow::{Context, Result};
use models::inference::{export_layers, ExportFormat, ModelDescription, SparseModel};
use models::{Datasets, MethodName, Silent, TrainConfig, Trainer};

/// The allocator the `dst` binary uses (freed memory kept: inference allocates per call).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    models::process::init();
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let mut cfg = TrainConfig {
        epochs: flag("--epochs")
            .map_or(Ok(3), |v| v.parse())
            .context("--epochs")?,
        ..TrainConfig::default()
    };
    cfg.data.dir = flag("--data-dir").map(Into::into);
    cfg.method.name = MethodName::Srigl;
    cfg.method.sparsity = 0.9;
    let data = Datasets::load(&cfg)?;
    let mut trainer = Trainer::new(cfg.clone(), data)?;
    let summary = trainer.run(&mut Silent)?;
    println!(
        "trained: test accuracy {:.4} after {} epochs",
        summary.test_accuracy, cfg.epochs
    );

    // The model file: layers in the condensed layout plus the description a loader needs.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("lenet-300-100-srigl90.safetensors");
    let layers = export_layers(&trainer, ExportFormat::Condensed)?;
    let description = ModelDescription::of(&cfg, trainer.normalization().to_vec());
    sparse_formats::io::save_with_metadata(&path, &layers, &description.to_metadata())?;
    println!(
        "model file: {} bytes, {} tensors",
        std::fs::metadata(&path)?.len(),
        layers.len()
    );

    // Loaded on its own: linear layers on the sparse kernels.
    let model = SparseModel::load(&path)?;
    let test = &trainer.data().test;
    let (_, accuracy) = model.evaluate(test)?;
    println!(
        "loaded: test accuracy {accuracy:.4}; on the sparse kernels: {:?}",
        model.sparse_layers()
    );
    anyhow::ensure!(
        (accuracy - summary.test_accuracy).abs() <= 1.0 / test.len() as f32,
        "the model file's accuracy {accuracy} differs from the run's {}",
        summary.test_accuracy
    );

    // Batch-256 inference, sparse against the same file loaded dense.
    let dense = SparseModel::load_dense(&path)?;
    let idx: Vec<usize> = (0..256.min(test.len())).collect();
    let x = model.inputs(test, &idx)?;
    for (name, m) in [("sparse", &model), ("dense", &dense)] {
        m.forward(&x)?;
        let t = Instant::now();
        for _ in 0..20 {
            std::hint::black_box(m.forward(&x)?);
        }
        println!(
            "{name}: {:.3} ms a batch of {}",
            t.elapsed().as_secs_f64() * 1e3 / 20.0,
            idx.len()
        );
    }
    Ok(())
}
