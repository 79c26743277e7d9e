//! The `train` suite of `cargo xtask bench`: optimizer steps per second of dense training,
//! dense-mask SRigL and sparse-engine SRigL on the 784-1000-1000-1000-10 MLP and a wide
//! 3072-3072-3072-10 MLP at batch 128, 90/95/99% sparsity, all in one run; and the mask-update
//! overhead (the same run with and without mask updates at ΔT = 100).
//!
//! `cargo bench -p models --bench train -- [--quick] [--json FILE] [--model SUBSTRING]
//! [--sparsity S]` (the last two run a subset, e.g. `--model 3072 --sparsity 0.9`)

use std::time::Instant;

use models::data::ImageSet;
use models::{Datasets, EngineKind, MethodName, ModelConfig, Silent, TrainConfig, Trainer};

fn synthetic(n: usize, c: usize, side: usize, seed: u64) -> ImageSet {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    ImageSet {
        images: (0..n * c * side * side)
            .map(|_| (next() % 256) as f32 / 255.0)
            .collect(),
        labels: (0..n).map(|_| (next() % 10) as u8).collect(),
        channels: c,
        rows: side,
        cols: side,
        classes: 10,
    }
}

/// Seconds per step over `steps` steps after `warm` warm-up steps.
fn time_steps(cfg: &TrainConfig, data: &Datasets, warm: usize, steps: usize) -> f64 {
    let mut t = Trainer::new(cfg.clone(), data.clone()).expect("trainer");
    t.run_until(warm, &mut Silent).expect("warm-up");
    let start = Instant::now();
    t.run_until(warm + steps, &mut Silent).expect("steps");
    start.elapsed().as_secs_f64() / steps as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_out = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let only_model = flag("--model");
    let only_sparsity: Option<f64> = flag("--sparsity").map(|s| s.parse().expect("--sparsity"));
    let (delta_t, steps) = if quick { (20, 40) } else { (100, 200) };
    let nets: &[(&str, Vec<usize>, usize, usize)] = &[
        ("784-1000-1000-1000-10", vec![1000, 1000, 1000], 1, 28),
        ("3072-3072-3072-10", vec![3072, 3072], 3, 32),
    ];
    let sparsities: &[f64] = if quick {
        &[0.9, 0.99]
    } else {
        &[0.9, 0.95, 0.99]
    };
    let mut records = Vec::new();
    println!("| model | sparsity | dense steps/s | dense-mask SRigL | sparse SRigL | sparse ÷ dense | update overhead (sparse) |");
    println!("|---|---|---|---|---|---|---|");
    for (name, hidden, c, side) in nets {
        if only_model
            .as_ref()
            .is_some_and(|m| !name.contains(m.as_str()))
        {
            continue;
        }
        let n = 128 * 25;
        let base = TrainConfig {
            model: ModelConfig::Mlp {
                hidden: hidden.clone(),
            },
            batch_size: 128,
            epochs: 20,
            checkpoint_every: 0,
            ..TrainConfig::default()
        };
        let data = Datasets::split(
            synthetic(n, *c, *side, 1),
            synthetic(128, *c, *side, 2),
            &base,
        );
        let mut dense_cfg = base.clone();
        dense_cfg.method.name = MethodName::Dense;
        let dense = time_steps(&dense_cfg, &data, 3, steps);
        for &s in sparsities {
            if only_sparsity.is_some_and(|o| (o - s).abs() > 1e-9) {
                continue;
            }
            let mut cfg = base.clone();
            cfg.method.name = MethodName::Srigl;
            cfg.method.sparsity = s;
            cfg.method.delta_t = delta_t;
            let masked = time_steps(&cfg, &data, 3, steps);
            cfg.engine = EngineKind::Sparse;
            let sparse = time_steps(&cfg, &data, 3, steps);
            let mut no_updates = cfg.clone();
            no_updates.method.t_end_fraction = 0.0;
            let sparse_static = time_steps(&no_updates, &data, 3, steps);
            let overhead = (sparse - sparse_static).max(0.0) / sparse;
            println!(
                "| {name} | {:.0}% | {:.2} | {:.2} | {:.2} | {:.2}× | {:.1}% |",
                s * 100.0,
                1.0 / dense,
                1.0 / masked,
                1.0 / sparse,
                dense / sparse,
                overhead * 100.0
            );
            records.push(serde_json::json!({
                "suite": "train", "model": name, "sparsity": s, "batch": 128,
                "delta_t": delta_t, "steps": steps,
                "dense_s_per_step": dense, "dense_mask_s_per_step": masked,
                "sparse_s_per_step": sparse, "sparse_no_update_s_per_step": sparse_static,
                "speedup_sparse_vs_dense": dense / sparse, "update_overhead": overhead,
            }));
        }
    }
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    }
}
