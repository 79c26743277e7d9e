//! The `scaling` suite of `cargo xtask bench --scaling`: data-parallel training steps per second
//! on the wide MLP (3072-3072-3072-10, global batch 128) for dense training, dense-mask SRigL 90%
//! and sparse-engine SRigL 90%, with the time and volume of the collective operations per step;
//! then the all-reduce alone on buffers of 1–64 MiB (its bandwidth, for the N-node estimate in
//! docs/benchmarks.md).
//!
//! One binary for every configuration, so the xtask compares them in one run:
//! `RAYON_NUM_THREADS=1 scaling-*` (1 process × 1 thread), `RAYON_NUM_THREADS=2 scaling-*`
//! (1 × 2), `RAYON_NUM_THREADS=1 mpirun -np 2 scaling-* --distributed` (2 ranks × 1 thread).
//! Flags: `--distributed`, `--quick` (ΔT = 40 timed steps instead of 100), `--model SUBSTRING`
//! (`3072` or `1000`), `--json FILE` (rank 0 writes the records).
//!
//! The sparse paths update masks once in the timed window (ΔT = the timed steps), so their
//! steps per second and bytes per step include one update and its dense-gradient all-reduce.

mod common;

use std::time::Instant;

use common::{mlp_case, time_trainer, MLPS};
use models::distributed::{Collective, SingleProcess};
use models::{EngineKind, MethodName, Trainer};

/// The allocator the `dst` binary uses (see `crates/cli/src/main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    models::process::init();
    let args: Vec<String> = std::env::args().collect();
    let has = |name: &str| args.iter().any(|a| a == name);
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let quick = has("--quick");
    let only_model = flag("--model").unwrap_or_else(|| "3072".into());
    let json_out = flag("--json");
    let mut comm: Box<dyn Collective> = if has("--distributed") {
        #[cfg(feature = "distributed")]
        {
            Box::new(
                models::distributed::MpiCollective::init(std::time::Duration::from_secs(600))
                    .expect("MPI initialisation"),
            )
        }
        #[cfg(not(feature = "distributed"))]
        panic!("--distributed needs the `distributed` feature (cargo bench --features distributed)")
    } else {
        Box::new(SingleProcess)
    };
    let (ranks, rank) = (comm.size(), comm.rank());
    let threads = rayon::current_num_threads();
    let say = |s: String| {
        if rank == 0 {
            println!("{s}");
        }
    };
    let steps = if quick { 40 } else { 100 };
    let mut records = Vec::new();
    say(format!(
        "\n{ranks} rank(s) × {threads} thread(s)\n| model | path | steps/s | collective s/step | \
         collective share | MB/step handed to collectives |\n|---|---|---|---|---|---|"
    ));
    for (name, hidden, c, side) in MLPS {
        if !name.contains(only_model.as_str()) {
            continue;
        }
        let (base, data) = mlp_case(hidden, c, side);
        for path in ["dense", "dense-mask", "sparse"] {
            let mut cfg = base.clone();
            cfg.method.name = MethodName::Dense;
            if path != "dense" {
                cfg.method.name = MethodName::Srigl;
                cfg.method.sparsity = 0.9;
                cfg.method.delta_t = steps;
                cfg.engine = if path == "sparse" {
                    EngineKind::Sparse
                } else {
                    EngineKind::DenseMask
                };
            }
            // Dense training has no mask updates: fewer timed steps tell the same.
            let n = if path == "dense" {
                steps.min(30)
            } else {
                steps
            };
            let t = Trainer::new(cfg, data.clone()).expect("trainer");
            let mut t = t.with_collective(comm).expect("collective");
            let timing = time_trainer(&mut t, 3, n);
            comm = t.into_collective();
            let (s, cs) = (timing.s_per_step, timing.comm.seconds / n as f64);
            let mb = timing.comm.bytes as f64 / n as f64 / 1e6;
            say(format!(
                "| {name} | {path} | {:.2} | {cs:.4} | {:.0}% | {mb:.1} |",
                1.0 / s,
                100.0 * cs / s
            ));
            records.push(serde_json::json!({
                "suite": "scaling", "model": name, "path": path, "sparsity": 0.9,
                "batch": 128, "ranks": ranks, "threads": threads, "steps": n,
                "delta_t": if path == "dense" { 0 } else { steps },
                "s_per_step": s, "median_step_s": timing.median_step,
                "comm_s_per_step": cs, "comm_bytes_per_step": mb * 1e6,
            }));
        }
    }
    if ranks > 1 {
        say(
            "\n| all-reduce of | seconds | algorithm bandwidth (buffer ÷ time) |\n|---|---|---|"
                .into(),
        );
        for mib in [1usize, 4, 16, 64] {
            let mut buf = vec![rank as f32; mib << 18];
            comm.all_reduce_sum(&mut buf).expect("warm-up all-reduce");
            let reps = if mib >= 16 { 5 } else { 20 };
            let start = Instant::now();
            for _ in 0..reps {
                comm.all_reduce_sum(&mut buf).expect("all-reduce");
            }
            let sec = start.elapsed().as_secs_f64() / reps as f64;
            let gbs = (mib << 20) as f64 / sec / 1e9;
            say(format!("| {mib} MiB | {sec:.5} | {gbs:.2} GB/s |"));
            records.push(serde_json::json!({
                "suite": "allreduce", "ranks": ranks, "threads": threads,
                "bytes": mib << 20, "seconds": sec, "algbw_gb_s": gbs,
            }));
        }
    }
    if rank == 0 {
        if let Some(path) = json_out {
            std::fs::write(&path, serde_json::to_string_pretty(&records).unwrap()).unwrap();
        }
    }
}
