//! Model files: a trained network laid out as `dst export` lays it out, loaded by
//! `SparseModel`, gives the trainer's accuracy; the MLP plan gives the network's logits; bad
//! files are refused naming the tensor or field.

mod common;
use common::fixture;

use models::inference::{export_layers, ExportFormat, ModelDescription, SparseModel};
use models::{EngineKind, MethodName, ModelConfig, Silent, TrainConfig, Trainer};
use sparse_formats::{DenseTensor, SparseLayer};

fn trained() -> (Trainer, ModelDescription) {
    let mut c = TrainConfig {
        epochs: 2,
        batch_size: 50,
        engine: EngineKind::Sparse,
        ..TrainConfig::default()
    };
    c.data.limit = Some(400);
    c.method.name = MethodName::Srigl;
    c.method.sparsity = 0.9;
    c.method.delta_t = 5;
    let mut t = Trainer::new(c.clone(), fixture(&c)).unwrap();
    t.run(&mut Silent).unwrap();
    let desc = ModelDescription::of(&c, t.normalization().to_vec());
    (t, desc)
}

/// The largest absolute difference between two tensors of one shape.
fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The model file's layers of `t`, condensed (what `dst export --format condensed` writes).
fn layers(t: &Trainer) -> Vec<(String, SparseLayer)> {
    export_layers(t, ExportFormat::Condensed).unwrap()
}

#[test]
fn a_model_file_runs_to_the_trainers_accuracy() {
    let (t, desc) = trained();
    let test = &t.data().test;
    let (loss, acc) = t.evaluate(test).unwrap();
    let model = SparseModel::from_layers(desc.clone(), layers(&t), false).unwrap();
    let names: Vec<&str> = model
        .sparse_layers()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(names.contains(&"fc1.weight"), "{names:?}");
    let (m_loss, m_acc) = model.evaluate(test).unwrap();
    assert!(
        (m_acc - acc).abs() <= 1.0 / test.len() as f32,
        "{m_acc} vs {acc}"
    );
    assert!((m_loss - loss).abs() < 1e-4, "{m_loss} vs {loss}");
    // The MLP plan (kernel calls on slices) gives the network's logits; the dense model too.
    let idx: Vec<usize> = (0..64).collect();
    let x = model.logits(test, &idx).unwrap();
    let net = model
        .network_forward(&model.inputs(test, &idx).unwrap())
        .unwrap();
    let dense = SparseModel::from_layers(desc, layers(&t), true).unwrap();
    assert!(dense.sparse_layers().is_empty());
    let d = dense.logits(test, &idx).unwrap();
    for other in [&net, &d] {
        let diff = max_diff(&x, other);
        assert!(diff < 1e-4, "{diff}");
    }
    assert_eq!(
        model.predict(test).unwrap().len(),
        test.len(),
        "one class per image"
    );
    // One image at a time (batches below 8: fc2, at ERK's 23% density, as row blocks; fc1, at
    // 8%, gathered) gives the batched logits.
    assert_eq!(
        model.small_batch_layers(),
        [("fc2.weight".to_string(), "row blocks")]
    );
    for i in [0usize, 5, 63] {
        let one = model.logits(test, &[i]).unwrap();
        let diff = max_diff(&one, &x.narrow(0, i, 1).unwrap());
        assert!(diff < 1e-4, "image {i}: {diff}");
    }
}

/// An N:M file (ASP at 1:4): its layers run packed at batches below 8 and give the batched
/// logits, which give the trainer's accuracy.
#[test]
fn an_nm_file_runs_packed_at_small_batches() {
    let mut c = TrainConfig {
        epochs: 2,
        batch_size: 50,
        engine: EngineKind::DenseMask,
        ..TrainConfig::default()
    };
    c.data.limit = Some(400);
    c.method.name = MethodName::NmMagnitude;
    (c.method.n, c.method.m) = (1, 4);
    c.method.nm_prune_epoch = Some(1);
    let mut t = Trainer::new(c.clone(), fixture(&c)).unwrap();
    t.run(&mut Silent).unwrap();
    let desc = ModelDescription::of(&c, t.normalization().to_vec());
    let model = SparseModel::from_layers(desc, export_layers(&t, ExportFormat::Nm).unwrap(), false)
        .unwrap();
    let packed: Vec<(String, &str)> = ["fc1.weight", "fc2.weight", "fc3.weight"]
        .map(|n| (n.to_string(), "packed N:M"))
        .to_vec();
    assert_eq!(model.small_batch_layers(), packed);
    let test = &t.data().test;
    let (_, acc) = t.evaluate(test).unwrap();
    let (_, m_acc) = model.evaluate(test).unwrap();
    assert!(
        (m_acc - acc).abs() <= 1.0 / test.len() as f32,
        "{m_acc} vs {acc}"
    );
    let idx: Vec<usize> = (0..16).collect();
    let batched = model.logits(test, &idx).unwrap();
    for i in [0usize, 7, 15] {
        let one = model.logits(test, &[i]).unwrap();
        let diff = max_diff(&one, &batched.narrow(0, i, 1).unwrap());
        assert!(diff < 1e-4, "image {i}: {diff}");
    }
}

/// A LeNet-5 file: its sparse convolution runs on the sparse conv kernels too (condensed and
/// CSR), to the trainer's accuracy and loss.
#[test]
fn a_lenet5_file_runs_its_convolutions_sparse() {
    let mut c = TrainConfig {
        epochs: 2,
        batch_size: 50,
        model: ModelConfig::Lenet5,
        ..TrainConfig::default()
    };
    c.data.limit = Some(300);
    c.method.name = MethodName::Srigl;
    c.method.sparsity = 0.9;
    c.method.delta_t = 3;
    let mut t = Trainer::new(c.clone(), fixture(&c)).unwrap();
    t.run(&mut Silent).unwrap();
    let desc = ModelDescription::of(&c, t.normalization().to_vec());
    let test = &t.data().test;
    let (loss, acc) = t.evaluate(test).unwrap();
    for format in [ExportFormat::Condensed, ExportFormat::Csr] {
        let layers = export_layers(&t, format).unwrap();
        let model = SparseModel::from_layers(desc.clone(), layers, false).unwrap();
        let names: Vec<&str> = model
            .sparse_layers()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        // conv2, fc1, fc2 (density ≤ 0.3); conv1 and fc3 (ERK keeps them near 0.8) run dense.
        assert_eq!(
            names,
            ["conv2.weight", "fc1.weight", "fc2.weight"],
            "{format:?}"
        );
        let (m_loss, m_acc) = model.evaluate(test).unwrap();
        assert!(
            (m_acc - acc).abs() <= 1.0 / test.len() as f32,
            "{format:?}: {m_acc} vs {acc}"
        );
        assert!(
            (m_loss - loss).abs() < 1e-4,
            "{format:?}: {m_loss} vs {loss}"
        );
    }
}

#[test]
fn bad_model_files_are_refused_naming_the_problem() {
    let (t, desc) = trained();
    let check = |desc: ModelDescription, layers: Vec<(String, SparseLayer)>, needle: &str| {
        let e = SparseModel::from_layers(desc, layers, false)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains(needle), "`{needle}` not in: {e}");
    };
    let mut missing = layers(&t);
    missing.retain(|(n, _)| n != "fc3.bias");
    check(desc.clone(), missing, "fc3.bias");
    let mut stray = layers(&t);
    stray.push((
        "extra.weight".into(),
        SparseLayer::Dense(DenseTensor {
            shape: vec![1],
            values: vec![0.0],
        }),
    ));
    check(desc.clone(), stray, "extra.weight");
    let mut wrong = layers(&t);
    for (n, l) in &mut wrong {
        if n == "fc3.bias" {
            *l = SparseLayer::Dense(DenseTensor {
                shape: vec![3],
                values: vec![0.0; 3],
            });
        }
    }
    check(desc.clone(), wrong, "fc3.bias");
    // A description asking for a far larger network than the file holds is refused before
    // anything is allocated (60000² weights would be 14 GB).
    let mut huge = desc.clone();
    huge.model = ModelConfig::Mlp {
        hidden: vec![60_000, 60_000],
    };
    check(huge, layers(&t), "numbers, the file holds");
    // The description is checked where it is read.
    let path = std::path::Path::new("model.safetensors");
    for (edit, needle) in [
        ("\"version\":1", "version 7"),
        ("\"classes\":10", "classes"),
        ("\"normalization\":[[", "normalization"),
    ] {
        let json = serde_json::to_string(&desc).unwrap();
        assert!(json.contains(edit), "{json}");
        let bad = match edit {
            "\"version\":1" => json.replace(edit, "\"version\":7"),
            "\"classes\":10" => json.replace(edit, "\"classes\":0"),
            _ => json.replace(edit, "\"normalization\":[[0.5,0.0],["),
        };
        let meta = [(models::inference::MODEL_KEY.to_string(), bad)].into();
        let e = ModelDescription::from_metadata(path, &meta)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle) && e.contains("model.safetensors"), "{e}");
    }
    let e = ModelDescription::from_metadata(path, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("dst.model"), "{e}");
}
