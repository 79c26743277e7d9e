//! Mask evolution pinned by snapshots: a seeded 8×16 layer through 5 updates of each method,
//! and the ERK budgets of the reference MLPs.

use dst_core::distribution::{achieved_sparsity_constant_fan_in, allocate, LayerSpec};
use dst_core::update::{
    apply_update, initial_mask, sparse_init, update_mask, Method, SriglParams, UpdateInput,
    UpdateParams,
};
use dst_core::{Distribution, Rng};

/// Five updates with drifting weights and fresh gradients, rendered one grid per update.
fn evolution(method: Method) -> String {
    let (rows, fan_in, budget) = (8, 16, 40);
    let mut rng = Rng::new(11);
    let mut mask = initial_mask(method, "l", rows, fan_in, budget, &mut rng).unwrap();
    let mut w = sparse_init(&mask, &mut rng);
    let mut out = format!("initial ({} active)\n{}", mask.nnz(), mask.render());
    for t in 1..=5u64 {
        // A few "SGD steps": weights move along a fixed direction plus noise; row 5 withers.
        let g: Vec<f32> = (0..rows * fan_in)
            .map(|i| (rng.normal() as f32) * if i / fan_in == 5 { 0.01 } else { 1.0 })
            .collect();
        for i in 0..w.len() {
            if mask.as_slice()[i] {
                w[i] -= 0.1 * g[i];
                if i / fan_in == 5 {
                    w[i] *= 0.05;
                }
            }
        }
        let p = UpdateParams {
            drop_fraction: 0.3 / 2.0 * (1.0 + (std::f64::consts::PI * t as f64 / 6.0).cos()),
            seed: 5,
            step: t * 100,
            layer_index: 0,
            tie_noise: 0.0,
            srigl: SriglParams {
                gamma_sal: 0.3,
                ablation: true,
            },
        };
        let input = UpdateInput {
            name: "l",
            weights: &w,
            grad: Some(&g),
            mask: &mask,
            budget,
            protected: false,
            active_weights: None,
        };
        let u = update_mask(method, &input, &p).unwrap();
        apply_update(&mut w, &mask, &u.mask);
        out += &format!(
            "update {t}: dropped {} grown {} active {} ablated {:?} k {:?}\n{}",
            u.stats.dropped,
            u.stats.grown,
            u.stats.active,
            u.ablated,
            u.stats.fan_in,
            u.mask.render()
        );
        mask = u.mask;
    }
    out
}

#[test]
fn static_evolution() {
    insta::assert_snapshot!(evolution(Method::Static));
}

#[test]
fn set_evolution() {
    insta::assert_snapshot!(evolution(Method::Set));
}

#[test]
fn rigl_evolution() {
    insta::assert_snapshot!(evolution(Method::Rigl));
}

#[test]
fn srigl_evolution() {
    insta::assert_snapshot!(evolution(Method::Srigl));
}

fn budgets_table(widths: &[usize]) -> String {
    let layers: Vec<LayerSpec> = widths
        .windows(2)
        .enumerate()
        .map(|(i, w)| LayerSpec::new(format!("fc{}", i + 1), &[w[1], w[0]]))
        .collect();
    let mut s = String::from("S     | layer: sparsity budget k ... | achieved\n");
    for target in [0.8, 0.9, 0.95, 0.99] {
        let b = allocate(&layers, target, Distribution::default()).unwrap();
        s += &format!("{target:.2} |");
        for l in &b {
            let k = l
                .fan_in_for(l.rows)
                .map(|k| k.to_string())
                .unwrap_or("-".into());
            s += &format!(
                " {}: {:.4} {} {} |",
                l.name,
                l.sparsity,
                l.budget,
                if l.dense { "dense".into() } else { k }
            );
        }
        s += &format!(" {:.4}\n", achieved_sparsity_constant_fan_in(&b));
    }
    s
}

#[test]
fn erk_budgets_lenet_300_100() {
    insta::assert_snapshot!(budgets_table(&[784, 300, 100, 10]));
}

#[test]
fn erk_budgets_mlp_784_1000_1000_1000_10() {
    insta::assert_snapshot!(budgets_table(&[784, 1000, 1000, 1000, 10]));
}
