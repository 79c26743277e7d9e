//! One mask update of one layer, timed as the trainer's sparsifier runs it (the new mask from
//! the weights and gradient in place, then the change applied to the weights in place): SRigL
//! (with ablation), RigL and SET on the wide MLP's 3072×3072 hidden layer and the 1000-wide
//! MLP's 1000×1000 layer at 90%, 95% and 99% sparsity, the weights and dense gradient random
//! (seeded), the mask the method's own initial mask.
//!
//! `cargo bench -p dst-core --bench update -- [--quick] [--rows 1000|3072] [--method srigl]
//! [--sparsity 0.9|0.95|0.99]`; the `train` suite of the `models` crate measures what an
//! update costs inside training (with the dense gradient and the sparse engine's re-layout).

use std::time::Instant;

/// The allocator the `dst` binary uses, with freed memory kept (as `models::alloc` sets it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use dst_core::update::{apply_update, initial_mask, layer_mask_update, UpdateInput, UpdateParams};
use dst_core::{Method, Rng, SriglParams};

fn main() {
    // SAFETY: option 15 is mimalloc's `mi_option_purge_delay` (see `models::alloc`); -1 keeps
    // freed memory in the process, so repeated updates do not fault their buffers in again.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let (only_rows, only_method) = (only("--rows"), only("--method"));
    let only_sparsity: Option<f64> = only("--sparsity").map(|s| match s.parse() {
        Ok(v) if [0.9, 0.95, 0.99].contains(&v) => v,
        _ => {
            eprintln!("error: --sparsity takes 0.9, 0.95 or 0.99, got {s:?}");
            std::process::exit(2);
        }
    });
    let reps = if quick { 2 } else { 5 };
    println!(
        "| layer | sparsity | method | one update (ms, median of {reps}) | threads |\n|---|---|---|---|---|"
    );
    for (rows, fan_in) in [(1000usize, 1000usize), (3072, 3072)] {
        if only_rows.as_ref().is_some_and(|r| *r != rows.to_string()) {
            continue;
        }
        for sparsity in [0.9, 0.95, 0.99] {
            if only_sparsity.is_some_and(|s| s != sparsity) {
                continue;
            }
            let budget = ((1.0 - sparsity) * (rows * fan_in) as f64).round() as usize;
            let mut rng = Rng::new(1);
            let g: Vec<f32> = (0..rows * fan_in).map(|_| rng.normal() as f32).collect();
            for method in [Method::Srigl, Method::Rigl, Method::Set] {
                if only_method
                    .as_ref()
                    .is_some_and(|m| !format!("{method:?}").eq_ignore_ascii_case(m))
                {
                    continue;
                }
                let mut rng = Rng::new(2);
                let mask = initial_mask(method, "w", rows, fan_in, budget, &mut rng).unwrap();
                let w: Vec<f32> = mask
                    .as_slice()
                    .iter()
                    .map(|&a| if a { rng.normal() as f32 } else { 0.0 })
                    .collect();
                let input = UpdateInput {
                    name: "w",
                    weights: &w,
                    grad: Some(&g),
                    mask: &mask,
                    budget,
                    protected: false,
                    active_weights: None,
                };
                let params = UpdateParams {
                    drop_fraction: 0.3,
                    seed: 3,
                    step: 100,
                    layer_index: 0,
                    tie_noise: 0.0,
                    srigl: SriglParams::default(),
                };
                // What the trainer's sparsifier does: the new mask from the weights and gradient
                // where they are stored, then the change applied to the weights in place.
                let mut scratch = w.clone();
                let mut times: Vec<f64> = (0..reps)
                    .map(|_| {
                        scratch.copy_from_slice(&w);
                        let t = Instant::now();
                        let u = layer_mask_update(method, &input, &params).unwrap().unwrap();
                        apply_update(&mut scratch, &mask, &u.mask);
                        let elapsed = t.elapsed().as_secs_f64();
                        std::hint::black_box(u);
                        elapsed
                    })
                    .collect();
                times.sort_by(f64::total_cmp);
                println!(
                    "| {rows}×{fan_in} | {:.0}% | {method:?} | {:.1} | {} |",
                    sparsity * 100.0,
                    times[reps / 2] * 1e3,
                    rayon::current_num_threads()
                );
            }
        }
    }
}
