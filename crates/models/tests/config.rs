//! The configuration: serde round trip, defaults for missing fields, unknown fields rejected,
//! learning-rate schedules on hand-computed values.

use models::{EngineKind, LrKind, LrSchedule, MethodName, ModelConfig, TrainConfig};

#[test]
fn json_round_trip_and_partial_files() {
    let c = TrainConfig::default();
    let back: TrainConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    let partial: TrainConfig =
        serde_json::from_str(r#"{"epochs": 3, "method": {"name": "lbc", "n": 1, "m": 4}}"#)
            .unwrap();
    assert_eq!(partial.epochs, 3);
    assert_eq!(partial.method.name, MethodName::Lbc);
    assert_eq!((partial.method.n, partial.method.m), (1, 4));
    assert_eq!(partial.batch_size, TrainConfig::default().batch_size);
    let e = serde_json::from_str::<TrainConfig>(r#"{"epoch": 3}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `epoch`"), "{e}");
}

#[test]
fn method_names_parse_both_ways() {
    for m in MethodName::ALL {
        assert_eq!(m.as_str().parse::<MethodName>().unwrap(), m);
    }
    let e = "rig".parse::<MethodName>().unwrap_err();
    assert!(e.contains("rigl") && e.contains("nm-magnitude"), "{e}");
}

#[test]
fn learning_rate_schedules() {
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    // 10 steps an epoch, 100 in all.
    let cos = LrSchedule::default();
    close(cos.lr(1.0, 0, 10, 100), 1.0);
    close(cos.lr(1.0, 50, 10, 100), 0.5);
    close(cos.lr(1.0, 100, 10, 100), 0.0);
    let warm = LrSchedule {
        warmup_epochs: 2.0,
        ..LrSchedule::default()
    };
    close(warm.lr(1.0, 0, 10, 100), 0.05);
    close(warm.lr(1.0, 19, 10, 100), 1.0);
    close(warm.lr(1.0, 20, 10, 100), 1.0);
    close(warm.lr(1.0, 60, 10, 100), 0.5); // half-way through the 80 cosine steps
    let step = LrSchedule {
        kind: LrKind::Step,
        milestones: vec![3, 6],
        gamma: 0.1,
        ..LrSchedule::default()
    };
    close(step.lr(1.0, 29, 10, 100), 1.0);
    close(step.lr(1.0, 30, 10, 100), 0.1);
    close(step.lr(1.0, 65, 10, 100), 0.01);
    let constant = LrSchedule {
        kind: LrKind::Constant,
        ..LrSchedule::default()
    };
    close(constant.lr(0.3, 99, 10, 100), 0.3);
}

/// `engine = "auto"` (the default) resolves to the sparse engine for every method it trains on
/// the measured models (the engine then decides per layer by density), except N:M patterns
/// denser than `MAX_SPARSE_DENSITY`, the ViT, SR-STE and dense training; an explicit choice is
/// kept.
#[test]
fn auto_engine_resolution() {
    let mut c = TrainConfig::default();
    assert_eq!(c.engine, EngineKind::Auto);
    let parsed: TrainConfig = serde_json::from_str(r#"{"engine": "auto"}"#).unwrap();
    assert_eq!(parsed.engine, EngineKind::Auto);
    for method in [
        MethodName::Static,
        MethodName::Set,
        MethodName::Rigl,
        MethodName::Srigl,
    ] {
        for sparsity in [0.5, 0.8, 0.9, 0.99] {
            c.method.name = method;
            c.method.sparsity = sparsity;
            assert_eq!(
                c.engine_for_run(),
                EngineKind::Sparse,
                "{method:?} {sparsity}"
            );
        }
    }
    for (name, n, m, engine) in [
        (MethodName::NmMagnitude, 2, 4, EngineKind::DenseMask),
        (MethodName::NmMagnitude, 1, 4, EngineKind::Sparse),
        (MethodName::Lbc, 2, 8, EngineKind::Sparse),
        (MethodName::Lbc, 1, 16, EngineKind::Sparse),
        (MethodName::Lbc, 2, 4, EngineKind::DenseMask),
        (MethodName::Lbc, 3, 8, EngineKind::DenseMask),
        (MethodName::Srste, 1, 16, EngineKind::DenseMask),
    ] {
        c.method.name = name;
        (c.method.n, c.method.m) = (n, m);
        assert_eq!(c.engine_for_run(), engine, "{name:?} {n}:{m}");
    }
    c.method.name = MethodName::Srigl;
    c.model = ModelConfig::Lenet5;
    assert_eq!(
        c.engine_for_run(),
        EngineKind::Sparse,
        "convs run sparse too"
    );
    c.model = ModelConfig::resnet18();
    assert_eq!(c.engine_for_run(), EngineKind::Sparse);
    c.model = serde_json::from_str(r#"{"kind": "vit"}"#).unwrap();
    assert_eq!(c.engine_for_run(), EngineKind::DenseMask, "not measured");
    c.model = ModelConfig::lenet_300_100();
    c.engine = EngineKind::DenseMask;
    assert_eq!(c.engine_for_run(), EngineKind::DenseMask);
    c.method.name = MethodName::Dense;
    c.engine = EngineKind::Sparse;
    assert!(c.validate().is_err());
    c.engine = EngineKind::Auto;
    assert_eq!(c.engine_for_run(), EngineKind::DenseMask);
}

/// Every table's fields are optional with the documented defaults, and an unknown key at any
/// level is an error naming its path (`[optimizer]` and `[model]` used to need every field and
/// ignore unknown keys).
#[test]
fn every_table_is_optional_and_unknown_keys_name_their_path() {
    use dst_core::optim::{AdamWConfig, OptimizerConfig, SgdConfig};
    let c = TrainConfig::from_toml("[optimizer]\nlr = 0.05\n").unwrap();
    assert_eq!(
        c.optimizer,
        OptimizerConfig::Sgd(SgdConfig {
            lr: 0.05,
            ..SgdConfig::default()
        })
    );
    assert_eq!(
        TrainConfig::default().optimizer,
        OptimizerConfig::Sgd(SgdConfig::default()),
        "one default"
    );
    let c = TrainConfig::from_toml("[optimizer]\nkind = \"adam-w\"\nbeta2 = 0.99\n").unwrap();
    assert_eq!(
        c.optimizer,
        OptimizerConfig::AdamW(AdamWConfig {
            beta2: 0.99,
            ..AdamWConfig::default()
        })
    );
    let c = TrainConfig::from_toml("[model]\nkind = \"resnet18\"\n").unwrap();
    assert_eq!(c.model, ModelConfig::resnet18());
    let c = TrainConfig::from_toml("[model]\nkind = \"mlp\"\n").unwrap();
    assert_eq!(c.model, ModelConfig::lenet_300_100());
    let c = TrainConfig::from_toml("[method.distribution]\nkind = \"erk\"\n").unwrap();
    assert_eq!(c.method.distribution, dst_core::Distribution::default());
    // Round trip through the TOML the CLI writes.
    let d = TrainConfig::default();
    assert_eq!(
        TrainConfig::from_toml(&toml::to_string(&d).unwrap()).unwrap(),
        d
    );

    for (text, path, key) in [
        ("[optimizer]\nmomentun = 0.5\n", "optimizer", "momentun"),
        (
            "[optimizer]\nkind = \"adam-w\"\nmomentum = 0.5\n",
            "optimizer",
            "momentum",
        ),
        ("[model]\nkind = \"mlp\"\nhiden = [10]\n", "model", "hiden"),
        (
            "[model]\nkind = \"resnet18\"\nwidht = 8\n",
            "model",
            "widht",
        ),
        ("[method]\ngama_sal = 0.5\n", "method", "gama_sal"),
        (
            "[method.distribution]\nkind = \"erk\"\npower = 2.0\n",
            "method.distribution",
            "power",
        ),
        ("[data]\nname = \"cifar10\"\n", "data.name", "cifar10"),
        ("[lr_schedule]\nwarmup = 1\n", "lr_schedule", "warmup"),
        ("epoch = 3\n", "epoch", "epoch"),
    ] {
        let e = TrainConfig::from_toml(text).unwrap_err();
        assert!(e.contains(path) && e.contains(key), "{text:?}: {e}");
        assert_eq!(e.lines().count(), 1, "one line: {e}");
    }
    let e =
        TrainConfig::from_json(r#"{"optimizer": {"kind": "sgd", "nesterof": true}}"#).unwrap_err();
    assert!(e.contains("optimizer") && e.contains("nesterof"), "{e}");
}

/// One validation pass covers every number: NaN, infinities and out-of-range values name the
/// field and its range.
#[test]
fn validation_names_the_field_and_its_range() {
    use dst_core::optim::{OptimizerConfig, SgdConfig};
    let bad = |f: &dyn Fn(&mut TrainConfig)| {
        let mut c = TrainConfig::default();
        f(&mut c);
        c.validate().unwrap_err()
    };
    let (field, reason) = bad(&|c| c.method.gamma_sal = f64::NAN);
    assert_eq!(field, "method.gamma_sal", "{reason}");
    let (field, reason) = bad(&|c| c.lr_schedule.warmup_epochs = -1.0);
    assert_eq!(field, "lr_schedule.warmup_epochs");
    assert!(reason.contains("[0, ∞)"), "{reason}");
    let (field, _) = bad(&|c| c.method.sparsity = f64::INFINITY);
    assert_eq!(field, "method.sparsity");
    let (field, _) = bad(&|c| c.method.delta_t = 0);
    assert_eq!(field, "method.delta_t");
    let (field, _) = bad(&|c| c.method.alpha = f64::NAN);
    assert_eq!(field, "method.alpha");
    let (field, _) = bad(&|c| c.method.lbc_power = f64::INFINITY);
    assert_eq!(field, "method.lbc_power");
    let (field, _) = bad(&|c| {
        c.method.distribution = dst_core::Distribution::Erk {
            power_scale: f64::NAN,
        }
    });
    assert_eq!(field, "method.distribution.power_scale");
    let (field, reason) = bad(&|c| {
        c.optimizer = OptimizerConfig::Sgd(SgdConfig {
            momentum: 5.0,
            ..SgdConfig::default()
        })
    });
    assert_eq!(field, "optimizer.momentum");
    assert!(reason.contains("[0, 1)"), "{reason}");
    assert!(TrainConfig::default().validate().is_ok());
}

/// Sizes a config or a checkpoint can hold are bounded before anything is built (a fuzzed
/// checkpoint with an MLP width of 2⁶⁴ − 1 panicked on a capacity overflow in the trainer).
#[test]
fn model_sizes_epochs_and_batch_are_bounded() {
    let with = |f: &dyn Fn(&mut TrainConfig)| {
        let mut c = TrainConfig::default();
        f(&mut c);
        c.validate()
    };
    let (field, reason) = with(&|c| {
        c.model = ModelConfig::Mlp {
            hidden: vec![300, usize::MAX],
        }
    })
    .unwrap_err();
    assert_eq!(field, "model.hidden");
    assert!(reason.contains("[1, 65536]"), "{reason}");
    assert_eq!(
        with(&|c| c.model = ModelConfig::Mlp { hidden: vec![0] })
            .unwrap_err()
            .0,
        "model.hidden"
    );
    assert_eq!(with(&|c| c.epochs = 1 << 32).unwrap_err().0, "epochs");
    assert_eq!(
        with(&|c| c.batch_size = usize::MAX).unwrap_err().0,
        "batch_size"
    );
    assert_eq!(
        with(&|c| c.model = ModelConfig::Resnet18 { width: 0 })
            .unwrap_err()
            .0,
        "model.width"
    );
    assert!(with(&|c| c.model = ModelConfig::Mlp {
        hidden: vec![65_536]
    })
    .is_ok());
}

/// LBC's scores follow the weights' optimizer by default (Nesterov SGD with the weights'
/// momentum and decay; AdamW with its betas, ε and decay), or plain SGD (momentum 0.9, wd 1e-4)
/// with `lbc_scores = "sgd"`; nm-magnitude's prune epoch defaults to half the run; LBC's t_f to
/// half the epochs (the reference README's 60 of 120).
#[test]
fn n_m_method_defaults_follow_the_references() {
    use dst_core::optim::{AdamWConfig, OptimizerConfig};
    use lbc::lbc::ScoreOpt;
    let mut c = TrainConfig::from_toml("epochs = 120\n[method]\nname = \"lbc\"").unwrap();
    assert_eq!(c.removal_schedule().t_f, 60);
    match c.lbc_score_optimizer() {
        ScoreOpt::Sgd(s) => {
            assert!(s.nesterov);
            assert_eq!((s.momentum, s.weight_decay), (0.9, 1e-4));
        }
        other => panic!("{other:?}"),
    }
    c.optimizer = OptimizerConfig::AdamW(AdamWConfig {
        beta2: 0.95,
        ..AdamWConfig::default()
    });
    match c.lbc_score_optimizer() {
        ScoreOpt::AdamW(a) => assert_eq!((a.beta2, a.weight_decay), (0.95, 0.01)),
        other => panic!("{other:?}"),
    }
    let c = TrainConfig::from_toml(
        "[method]\nname = \"lbc\"\nlbc_scores = \"sgd\"\n[optimizer]\nkind = \"adam-w\"",
    )
    .unwrap();
    match c.lbc_score_optimizer() {
        ScoreOpt::Sgd(s) => assert!(!s.nesterov && s.momentum == 0.9),
        other => panic!("{other:?}"),
    }
    let c = TrainConfig::from_toml("epochs = 20\n[method]\nname = \"nm-magnitude\"").unwrap();
    assert_eq!(c.nm_prune_epoch(), Some(10));
    let c = TrainConfig::from_toml("epochs = 20\n[method]\nname = \"lbc\"").unwrap();
    assert_eq!(c.nm_prune_epoch(), None);
}
