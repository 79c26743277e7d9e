//! Property tests: the invariants of every method after every update, on random layers.
#![allow(clippy::needless_range_loop)] // parallel arrays indexed together read clearer

use dst_core::update::{
    apply_update, initial_mask, sparse_init, update_mask, Method, SriglParams, UpdateInput,
    UpdateParams,
};
use dst_core::Rng;
use proptest::prelude::*;
use sparse_formats::Mask;

struct Case {
    rows: usize,
    fan_in: usize,
    budget: usize,
    mask: Mask,
    weights: Vec<f32>,
    grad: Vec<f32>,
}

fn case(seed: u64, rows: usize, fan_in: usize, density: f64, method: Method) -> Option<Case> {
    let mut rng = Rng::new(seed);
    let budget = ((rows * fan_in) as f64 * density).floor() as usize;
    if budget < rows {
        return None;
    }
    let mask = initial_mask(method, "l", rows, fan_in, budget, &mut rng).ok()?;
    let mut weights = sparse_init(&mask, &mut rng);
    // Some active weights exactly zero (freshly grown ones), as in real training.
    for (i, w) in weights.iter_mut().enumerate() {
        if mask.as_slice()[i] && rng.below(7) == 0 {
            *w = 0.0;
        }
    }
    let grad = (0..rows * fan_in).map(|_| rng.normal() as f32).collect();
    Some(Case {
        rows,
        fan_in,
        budget,
        mask,
        weights,
        grad,
    })
}

fn check(
    method: Method,
    c: &Case,
    a: f64,
    gamma: f64,
    ablation: bool,
    protected: bool,
) -> Result<(), TestCaseError> {
    let input = UpdateInput {
        name: "l",
        weights: &c.weights,
        grad: Some(&c.grad),
        mask: &c.mask,
        budget: c.budget,
        protected,
        active_weights: None,
    };
    let p = UpdateParams {
        drop_fraction: a,
        seed: 3,
        step: 100,
        layer_index: 0,
        tie_noise: 0.0,
        srigl: SriglParams {
            gamma_sal: gamma,
            ablation,
        },
    };
    let u = update_mask(method, &input, &p).unwrap();
    let new = &u.mask;
    match method {
        Method::Rigl | Method::Set | Method::Static => {
            prop_assert_eq!(new.nnz(), c.mask.nnz(), "active count preserved");
        }
        Method::Srigl => {
            let k = u.stats.fan_in.unwrap();
            prop_assert!(new.nnz() <= c.budget, "within budget");
            prop_assert!(k >= 1 && k <= c.fan_in);
            let alive = c.rows - u.ablated.len();
            prop_assert_eq!(k, (c.budget / alive).min(c.fan_in));
            for r in 0..c.rows {
                let n = new.row_nnz(r);
                if u.ablated.contains(&r) {
                    prop_assert_eq!(n, 0, "ablated row {} is empty", r);
                } else {
                    prop_assert_eq!(n, k, "row {} has exactly k", r);
                }
            }
            if protected || !ablation {
                prop_assert!(u.ablated.is_empty());
            }
        }
    }
    // Drop count: at most floor(α · n) plus the guard's zero-valued actives.
    let mut w = c.weights.clone();
    apply_update(&mut w, &c.mask, new);
    for i in 0..w.len() {
        let (was, is) = (c.mask.as_slice()[i], new.as_slice()[i]);
        if !is {
            prop_assert_eq!(w[i], 0.0, "inactive weight {} is zero", i);
        } else if !was {
            prop_assert_eq!(w[i], 0.0, "grown weight {} starts at zero", i);
        } else {
            prop_assert_eq!(w[i], c.weights[i], "kept weight {} keeps its value", i);
        }
    }
    prop_assert_eq!(u.stats.active, new.nnz());
    // Determinism.
    prop_assert_eq!(update_mask(method, &input, &p).unwrap(), u);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn rigl_set_static(seed: u64, rows in 1usize..20, fan_in in 1usize..40, density in 0.05f64..0.9, a in 0.0f64..=1.0, m in 0usize..3) {
        let method = [Method::Rigl, Method::Set, Method::Static][m];
        if let Some(c) = case(seed, rows, fan_in, density, method) {
            check(method, &c, a, 0.3, true, false)?;
        }
    }

    #[test]
    fn srigl(seed: u64, rows in 1usize..20, fan_in in 1usize..40, density in 0.05f64..0.9, a in 0.0f64..=0.6, gamma in 0.0f64..1.5, ablation: bool, protected: bool) {
        if let Some(c) = case(seed, rows, fan_in, density, Method::Srigl) {
            check(Method::Srigl, &c, a, gamma, ablation, protected)?;
        }
    }
}
