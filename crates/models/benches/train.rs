//! The `train` suite of `cargo xtask bench`: optimizer steps per second of dense training,
//! dense-mask SRigL and sparse-engine SRigL on the 784-1000-1000-1000-10 MLP and a wide
//! 3072-3072-3072-10 MLP at batch 128, 90/95/99% sparsity, all in one run; and the mask-update
//! overhead: every step is timed, with a mask update every eighth (plus one) of the timed steps (the first
//! update in the warm-up), an update's cost is the median excess of those steps and the steps
//! right after them (which build the new layouts' transposes) over the median step, the sparse
//! column is the median step plus that cost spread over ΔT = 100 steps, and the
//! overhead is that cost over ΔT = 100 steps plus one update. Then the conv nets
//! (`train-conv` records): LeNet-5 on 1×28×28 and the CIFAR ResNet-18 on 3×32×32 images, batch
//! 128, dense training, dense-mask SRigL and sparse-engine SRigL (convolutions in sparse storage)
//! at 90% (steps per second with the mask updates at the trainer's ΔT = 100 included). Last,
//! what `engine = "auto"` is decided from (`engine-rule` records, [`engine_rule_suite`]).
//!
//! `cargo bench -p models --bench train -- [--quick] [--json FILE] [--model SUBSTRING]
//! [--sparsity S] [--profile dense|dense-mask|sparse [--steps N]] [--engine-rule]` (`--model`/`--sparsity` run a subset,
//! e.g. `--model 3072 --sparsity 0.9`; `--profile` runs only that path (SRigL at `--sparsity`,
//! default 90%) of the first selected case, MLP or conv net (`--model lenet5`), for a profiler: `perf record -g target/release/deps/train-* --profile sparse ...`;
//! `--engine-rule` runs only the engine-rule section)

mod common;

use common::{mlp_case, synthetic, time_steps, time_trainer, MLPS};

/// The allocator the `dst` binary uses (see `crates/cli/src/main.rs`), so the suite times what a
/// user runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use models::{Datasets, EngineKind, MethodName, ModelConfig, TrainConfig, Trainer};

/// One conv net of the suite: its name, base configuration (batch 128), synthetic data, warm-up
/// and timed steps.
struct ConvCase {
    name: &'static str,
    base: TrainConfig,
    data: Datasets,
    warm: usize,
    steps: usize,
}

/// LeNet-5 on 1×28×28 and the CIFAR ResNet-18 on 3×32×32 synthetic images; the first steps of a
/// run fault in its memory, hence several warm-up steps where they are cheap.
fn conv_cases(quick: bool, only_model: Option<&str>) -> Vec<ConvCase> {
    let nets = [
        (
            "lenet5",
            ModelConfig::Lenet5,
            1,
            28,
            5,
            if quick { 10 } else { 30 },
        ),
        (
            "resnet18",
            ModelConfig::resnet18(),
            3,
            32,
            1,
            if quick { 2 } else { 4 },
        ),
    ];
    nets.into_iter()
        .filter(|(name, ..)| only_model.is_none_or(|m| name.contains(m)))
        .map(|(name, model, c, side, warm, steps)| {
            let base = TrainConfig {
                model,
                batch_size: 128,
                epochs: 20,
                checkpoint_every: 0,
                ..TrainConfig::default()
            };
            let data = Datasets::split(
                synthetic(128 * 8, c, side, 1),
                synthetic(128, c, side, 2),
                &base,
            );
            ConvCase {
                name,
                base,
                data,
                warm,
                steps,
            }
        })
        .collect()
}

/// The conv nets: dense training, dense-mask SRigL 90% and sparse-engine SRigL 90% steps per
/// second; the sparse column is the median step plus one update spread over ΔT = 100 steps, as in
/// the MLP suite.
fn conv_suite(quick: bool, only_model: Option<&str>) -> Vec<serde_json::Value> {
    let mut records = Vec::new();
    println!(
        "\n| conv net | dense steps/s | dense-mask SRigL 90% steps/s | sparse SRigL 90% steps/s | \
         sparse ÷ dense-mask |\n|---|---|---|---|---|"
    );
    for case in conv_cases(quick, only_model) {
        let ConvCase {
            name,
            base,
            data,
            warm,
            steps,
        } = case;
        let mut dense_cfg = base.clone();
        dense_cfg.method.name = MethodName::Dense;
        let dense = time_steps(&dense_cfg, &data, warm, steps).s_per_step;
        let mut cfg = base.clone();
        cfg.method.name = MethodName::Srigl;
        cfg.method.sparsity = 0.9;
        cfg.engine = EngineKind::DenseMask;
        let masked = time_steps(&cfg, &data, warm, steps).s_per_step;
        cfg.engine = EngineKind::Sparse;
        let (t, _) = step_with_updates(&cfg, &data, warm, steps);
        let sparse = t.s_per_step_at(100);
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2}× |",
            1.0 / dense,
            1.0 / masked,
            1.0 / sparse,
            masked / sparse
        );
        records.push(serde_json::json!({
            "suite": "train-conv", "model": name, "batch": 128, "sparsity": 0.9,
            "threads": rayon::current_num_threads(), "steps": steps,
            "dense_s_per_step": dense, "dense_mask_s_per_step": masked,
            "sparse_s_per_step": sparse, "sparse_update_overhead": t.overhead_at(100),
        }));
    }
    records
}

/// The timing of one configuration with mask updates every eighth of the timed steps (at least
/// every second, so the timed steps hold several; [`common::Timing::s_per_step_at`] spreads the
/// median update's cost over the ΔT of interest) after a warm-up that holds the first update,
/// and how many layers the run held in sparse storage.
fn step_with_updates(
    cfg: &TrainConfig,
    data: &Datasets,
    warm: usize,
    steps: usize,
) -> (common::Timing, usize) {
    let mut cfg = cfg.clone();
    // One more than an eighth, so that updates do not fall on the epoch ends of the suites'
    // 25-batch epochs (whose evaluation would land in the interval of the step after).
    cfg.method.delta_t = (steps / 8).max(2) + 1;
    // The first mask update runs in the warm-up: it faults in the buffers every later update
    // reuses (the dense gradients, the new masks and layouts) — a one-off cost of a run, which
    // a mean over the few timed updates would count as a third of each.
    let warm = warm.max(cfg.method.delta_t);
    let mut trainer = Trainer::new(cfg, data.clone()).expect("trainer");
    let t = time_trainer(&mut trainer, warm, steps);
    (t, trainer.engine().sparse_layers())
}

/// What `engine = "auto"` is decided from (`engine-rule` records): dense-mask against sparse
/// engine for every method the sparse engine trains — Static, SET, RigL (CSR storage: their
/// rows' fan-ins differ) and SRigL (condensed) at 50/70/90% sparsity (ERK), and the N:M methods
/// once their masks are final (nm-magnitude after its prune, LBC from `t_f`) at 2:4, 1:4, 2:8
/// and 1:8 — on the 784-1000-1000-1000-10 MLP and LeNet-5 (N:M on fc1 and fc2), batch 128.
fn engine_rule_suite(quick: bool, only_model: Option<&str>) -> Vec<serde_json::Value> {
    let steps = if quick { 15 } else { 40 };
    let mut records = Vec::new();
    println!(
        "\n| model | method | sparsity / pattern | layers in sparse storage | dense-mask steps/s | \
         sparse steps/s | sparse ÷ dense-mask |\n|---|---|---|---|---|---|---|"
    );
    let (mlp, mlp_data) = mlp_case(&[1000, 1000, 1000], 1, 28);
    let lenet = TrainConfig {
        model: ModelConfig::Lenet5,
        ..mlp.clone()
    };
    let lenet_data = Datasets::split(
        synthetic(128 * 25, 1, 28, 1),
        synthetic(128, 1, 28, 2),
        &lenet,
    );
    let cases = [
        ("784-1000-1000-1000-10", &mlp, &mlp_data, 3),
        ("lenet5", &lenet, &lenet_data, 5),
    ];
    for (name, base, data, warm) in cases {
        if only_model.is_some_and(|m| !name.contains(m)) {
            continue;
        }
        let mut rows: Vec<(MethodName, String, TrainConfig, usize)> = Vec::new();
        for method in [
            MethodName::Static,
            MethodName::Set,
            MethodName::Rigl,
            MethodName::Srigl,
        ] {
            for s in [0.5, 0.7, 0.9] {
                let mut cfg = base.clone();
                cfg.method.name = method;
                cfg.method.sparsity = s;
                rows.push((method, format!("{:.0}%", s * 100.0), cfg, warm));
            }
        }
        // N:M: the masks are final after the first epoch (25 steps); time after it. LeNet-5's
        // convs and fc3 stay dense (1 and 6 input channels, fan-in 84: no groups of 8).
        for (method, patterns) in [
            (
                MethodName::NmMagnitude,
                &[(2, 4), (1, 4), (2, 8), (1, 8)][..],
            ),
            (MethodName::Lbc, &[(1, 4), (1, 8)][..]),
        ] {
            for &(n, m) in patterns {
                let mut cfg = base.clone();
                cfg.method.name = method;
                cfg.method.n = n;
                cfg.method.m = m;
                cfg.method.nm_prune_epoch = Some(1);
                cfg.method.lbc_t_i = 0;
                cfg.method.lbc_t_f = Some(1);
                if name == "lenet5" {
                    cfg.method.dense_layers = ["conv1.weight", "conv2.weight", "fc3.weight"]
                        .map(String::from)
                        .to_vec();
                }
                rows.push((method, format!("{n}:{m}"), cfg, 25 + warm));
            }
        }
        for (method, setting, mut cfg, warm) in rows {
            cfg.engine = EngineKind::DenseMask;
            let masked = step_with_updates(&cfg, data, warm, steps)
                .0
                .s_per_step_at(100);
            cfg.engine = EngineKind::Sparse;
            let (t, layers) = step_with_updates(&cfg, data, warm, steps);
            let sparse = t.s_per_step_at(100);
            println!(
                "| {name} | {} | {setting} | {layers} | {:.2} | {:.2} | {:.2}× |",
                method.as_str(),
                1.0 / masked,
                1.0 / sparse,
                masked / sparse
            );
            records.push(serde_json::json!({
                "suite": "engine-rule", "model": name, "method": method.as_str(),
                "setting": setting, "batch": 128, "threads": rayon::current_num_threads(),
                "steps": steps, "sparse_layers": layers, "dense_mask_s_per_step": masked, "sparse_s_per_step": sparse,
            }));
        }
    }
    records
}

fn main() {
    models::process::init();
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
    let profile = flag("--profile");
    let (delta_t, steps) = if quick { (20, 40) } else { (100, 200) };
    let sparsities: &[f64] = if quick {
        &[0.9, 0.99]
    } else {
        &[0.9, 0.95, 0.99]
    };
    let mut records = Vec::new();
    if args.iter().any(|a| a == "--engine-rule") {
        records.extend(engine_rule_suite(quick, only_model.as_deref()));
        if let Some(path) = json_out {
            std::fs::write(&path, serde_json::to_string_pretty(&records).unwrap()).unwrap();
        }
        return;
    }
    if let Some(path) = &profile {
        // The first selected case, MLPs before conv nets.
        let (name, base, data, warm, steps) = MLPS
            .iter()
            .find(|(name, ..)| {
                only_model
                    .as_ref()
                    .is_none_or(|m| name.contains(m.as_str()))
            })
            .map(|&(name, hidden, c, side)| {
                let (base, data) = mlp_case(hidden, c, side);
                (name, base, data, 3, steps)
            })
            .or_else(|| {
                conv_cases(quick, only_model.as_deref())
                    .into_iter()
                    .next()
                    .map(|c| (c.name, c.base, c.data, c.warm, c.steps))
            })
            .expect("--profile: no case matches --model");
        let mut cfg = base;
        cfg.method.name = MethodName::Dense;
        if path != "dense" {
            cfg.method.name = MethodName::Srigl;
            cfg.method.sparsity = only_sparsity.unwrap_or(0.9);
            cfg.method.delta_t = delta_t;
            cfg.engine = match path.as_str() {
                "dense-mask" => EngineKind::DenseMask,
                "sparse" => EngineKind::Sparse,
                other => panic!("--profile: unknown path `{other}` (dense, dense-mask, sparse)"),
            };
        }
        let steps = flag("--steps").map_or(steps, |s| s.parse().expect("--steps"));
        // Enough epochs for the warm-up and the timed steps (a shorter run would end early).
        let per_epoch = data.train.len().div_ceil(cfg.batch_size);
        cfg.epochs = cfg.epochs.max((warm + steps).div_ceil(per_epoch));
        let t = time_steps(&cfg, &data, warm, steps);
        println!("{name} {path}: {:.3} ms/step", t.s_per_step * 1e3);
        println!("  {}", t.phases.per_step_line());
        return;
    }
    println!("| model | sparsity | dense steps/s | dense-mask SRigL | sparse SRigL | sparse ÷ dense | one update costs | update overhead at ΔT = 100 |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, hidden, c, side) in MLPS {
        if only_model
            .as_ref()
            .is_some_and(|m| !name.contains(m.as_str()))
        {
            continue;
        }
        let (base, data) = mlp_case(hidden, c, side);
        let mut dense_cfg = base.clone();
        dense_cfg.method.name = MethodName::Dense;
        let dense = time_steps(&dense_cfg, &data, 3, steps).s_per_step;
        for &s in sparsities {
            if only_sparsity.is_some_and(|o| (o - s).abs() > 1e-9) {
                continue;
            }
            let mut cfg = base.clone();
            cfg.method.name = MethodName::Srigl;
            cfg.method.sparsity = s;
            cfg.method.delta_t = delta_t;
            cfg.engine = EngineKind::DenseMask;
            let masked = time_steps(&cfg, &data, 3, steps).s_per_step;
            cfg.engine = EngineKind::Sparse;
            let (sparse, _) = step_with_updates(&cfg, &data, 3, steps);
            let overhead = sparse.overhead_at(100);
            let sparse_s = sparse.s_per_step_at(100);
            println!(
                "| {name} | {:.0}% | {:.2} | {:.2} | {:.2} | {:.2}× | {:.3} s | {:.1}% |",
                s * 100.0,
                1.0 / dense,
                1.0 / masked,
                1.0 / sparse_s,
                dense / sparse_s,
                sparse.update_extra,
                overhead * 100.0
            );
            records.push(serde_json::json!({
                "suite": "train", "model": name, "sparsity": s, "batch": 128,
                "threads": rayon::current_num_threads(),
                "delta_t": delta_t, "steps": steps,
                "dense_s_per_step": dense, "dense_mask_s_per_step": masked,
                "sparse_s_per_step": sparse_s,
                "sparse_median_step_s": sparse.median_step,
                "update_extra_s": sparse.update_extra,
                "updates_timed_every": (steps / 8).max(2) + 1,
                "speedup_sparse_vs_dense": dense / sparse_s,
                "update_overhead": overhead,
            }));
        }
    }
    records.extend(conv_suite(quick, only_model.as_deref()));
    records.extend(engine_rule_suite(quick, only_model.as_deref()));
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    }
}
