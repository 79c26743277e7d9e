//! LBC and the baselines on seeded layers: exact N:M at the end, the schedule epoch by epoch,
//! hand-computed score gradients, the two formulations agreeing, and snapshots of the masks.

use dst_core::Rng;
use lbc::baselines::{magnitude_mask, srste_grad};
use lbc::combinations::binomial;
use lbc::lbc::{
    lbc_state, AccumulatedScores, DirectScores, LbcState, ScoreAdamW, ScoreOpt, ScoreSgd,
};
use lbc::schedule::RemovalSchedule;
use sparse_formats::NmPattern;

const SGD: ScoreOpt = ScoreOpt::Sgd(ScoreSgd {
    lr: 0.05,
    momentum: 0.9,
    weight_decay: 1e-4,
    nesterov: false,
});

const NESTEROV: ScoreOpt = ScoreOpt::Sgd(ScoreSgd {
    lr: 0.05,
    momentum: 0.9,
    weight_decay: 1e-4,
    nesterov: true,
});

fn normal(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Runs `epochs` epochs of `steps` score updates with random weights/gradients; calls `check`
/// after each epoch's removal.
fn train(
    state: &mut dyn LbcState,
    opt: ScoreOpt,
    seed: u64,
    sched: RemovalSchedule,
    epochs: usize,
    mut check: impl FnMut(usize, &dyn LbcState),
) {
    let (rows, fan_in) = state.shape();
    let c = binomial(state.pattern().m, state.pattern().n) as usize;
    let mut rng = Rng::new(seed);
    let w = normal(&mut rng, rows * fan_in);
    for e in 0..epochs {
        state.remove_to(sched.kept(c, e));
        check(e, state);
        for _ in 0..3 {
            let mask = state.mask();
            // Gradient of the masked weight: random, and zero where masked (as autograd gives
            // for W ⊙ B... the STE only needs g_W̃, which is dense in general).
            let g: Vec<f32> = normal(&mut rng, rows * fan_in)
                .into_iter()
                .zip(mask.as_slice())
                .map(|(g, &a)| if a { g } else { 0.5 * g })
                .collect();
            state.step(&w, &g, opt, true).unwrap();
        }
    }
}

#[test]
fn final_mask_is_exactly_n_of_m_for_every_pattern() {
    for (n, m) in [(2, 4), (1, 4), (2, 8), (4, 8), (1, 16), (4, 16)] {
        let p = NmPattern::new(n, m);
        let sched = RemovalSchedule {
            t_i: 0,
            t_f: 6,
            power: 3.0,
        };
        let mut states: Vec<Box<dyn LbcState>> =
            vec![Box::new(AccumulatedScores::new(3, 2 * m, p).unwrap())];
        if binomial(m, n) <= 2000 {
            states.push(Box::new(DirectScores::new(3, 2 * m, p, 1 << 20).unwrap()));
        }
        for mut s in states {
            train(s.as_mut(), SGD, 1, sched, 8, |_, _| {});
            let mask = s.mask();
            let nm = lbc::export_nm(&vec![1.0; 6 * m], &mask, 3, 2 * m, p)
                .unwrap_or_else(|e| panic!("{n}:{m}: {e}"));
            assert_eq!(nm.values().len(), 3 * 2 * n, "{n}:{m}");
            assert_eq!(s.max_alive(), 1);
        }
    }
}

#[test]
fn remaining_combinations_follow_the_schedule() {
    let sched = RemovalSchedule::default(); // t_f = 60, p = 3
    let p = NmPattern::new(2, 4);
    let mut s = DirectScores::new(2, 8, p, 1 << 20).unwrap();
    let mut table = Vec::new();
    train(&mut s, SGD, 2, sched, 62, |e, st| {
        assert_eq!(st.max_alive(), sched.kept(6, e), "epoch {e}");
        table.push((e, st.max_alive(), st.mask().density()));
    });
    // Density: dense until K < 4, then ≥ 75% until t_f, then exactly 50%.
    for &(e, k, d) in &table {
        if k >= 4 {
            assert_eq!(d, 1.0, "epoch {e}");
        } else if k >= 2 {
            assert!(d >= 0.75, "epoch {e}: density {d}");
        } else {
            assert_eq!(d, 0.5, "epoch {e}");
        }
    }
}

#[test]
fn score_gradient_by_hand() {
    // One group of 4, 2:4: combos {0,1} {0,2} {0,3} {1,2} {1,3} {2,3}.
    let s = DirectScores::new(1, 4, NmPattern::new(2, 4), 100).unwrap();
    let w = [1.0, 2.0, -1.0, 0.5];
    let g = [0.5, -1.0, 2.0, 4.0];
    // h = W ⊙ g = [0.5, -2, -2, 2]; ∂α_k = Σ_{j∈k} h_j.
    let grad = s.score_grad(&w, &g);
    assert_eq!(grad, vec![-1.5, -1.5, 2.5, -4.0, 0.0, 0.0]);
    // One plain SGD step (no momentum, no decay): α = 1/3 − 0.1 · ∂α.
    let mut s = s;
    s.step(
        &w,
        &g,
        ScoreOpt::Sgd(ScoreSgd {
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }),
        true,
    )
    .unwrap();
    for (k, d) in grad.iter().enumerate() {
        assert!((s.score(0, k) - (1.0 / 3.0 - 0.1 * d)).abs() < 1e-6);
    }
    // Removing to 1 keeps the largest signed score: {1,2} (−4 gradient → largest score).
    s.remove_to(1);
    assert_eq!(s.mask().render(), ".##.\n");
}

/// docs/algorithms.md §7.4: the accumulated formulation is exact under SGD + momentum + L2 — same masks at every
/// epoch, same scores up to float rounding — on patterns small enough for the direct table.
#[test]
fn accumulated_formulation_equals_the_direct_one() {
    for (n, m, stride) in [(2, 4, 1), (1, 4, 1), (2, 8, 1), (3, 6, 1), (2, 4, 3)] {
        let p = NmPattern {
            n,
            m,
            group_stride: stride,
        };
        let (rows, fan_in) = (4, 2 * m * stride);
        let sched = RemovalSchedule {
            t_i: 1,
            t_f: 9,
            power: 2.0,
        };
        for opt in [SGD, NESTEROV] {
            let mut d = DirectScores::new(rows, fan_in, p, 1 << 20).unwrap();
            let mut a = AccumulatedScores::new(rows, fan_in, p).unwrap();
            let mut masks_d = Vec::new();
            let mut masks_a = Vec::new();
            train(&mut d, opt, 9, sched, 11, |_, st| masks_d.push(st.mask()));
            train(&mut a, opt, 9, sched, 11, |_, st| masks_a.push(st.mask()));
            assert_eq!(masks_d, masks_a, "{n}:{m} stride {stride} {opt:?}");
        }
        // Without removals every score is comparable: c + Σ a_j equals the table entry.
        let never = RemovalSchedule {
            t_i: 100,
            t_f: 200,
            power: 2.0,
        };
        let mut d = DirectScores::new(rows, fan_in, p, 1 << 20).unwrap();
        let mut a = AccumulatedScores::new(rows, fan_in, p).unwrap();
        train(&mut d, NESTEROV, 10, never, 5, |_, _| {});
        train(&mut a, NESTEROV, 10, never, 5, |_, _| {});
        for gi in 0..rows * fan_in / m {
            for k in 0..binomial(m, n) as usize {
                let (x, y) = (d.score(gi, k) as f64, a.score(gi, k));
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                    "{n}:{m} group {gi} combo {k}: {x} vs {y}"
                );
            }
        }
    }
}

#[test]
fn large_tables_switch_to_the_accumulated_formulation() {
    let p = NmPattern::new(8, 16);
    assert!(matches!(
        DirectScores::new(64, 64, p, 1 << 20),
        Err(lbc::LbcError::TooLarge { .. })
    ));
    let s = lbc_state(64, 64, p, 1 << 20, SGD).unwrap();
    assert_eq!(s.max_alive(), 12870);
    assert_eq!(s.mask().nnz(), 64 * 64);
}

#[test]
fn patterns_and_layers_too_large_to_enumerate_are_errors_before_any_allocation() {
    // C(56, 28) ≈ 7.6e15 combinations per group: refused before enumerating one.
    let e = lbc_state(8, 56, NmPattern::new(28, 56), 1 << 20, SGD)
        .err()
        .unwrap();
    assert!(
        matches!(e, lbc::LbcError::TooManyCombinations { n: 28, m: 56, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("at most 65536"), "{e}");
    // 8:16 on a 65536 × 65536 layer: 2.7e8 groups × 12870 combinations.
    let e = lbc_state(65536, 65536, NmPattern::new(8, 16), 1 << 20, SGD)
        .err()
        .unwrap();
    assert!(matches!(e, lbc::LbcError::TableTooLarge { .. }), "{e}");
}

#[test]
fn saved_state_packs_alive_flags_and_restores_exactly_in_both_formulations() {
    let p = NmPattern::new(2, 4);
    let sched = RemovalSchedule {
        t_i: 0,
        t_f: 4,
        power: 3.0,
    };
    for direct in [true, false] {
        let mut s: Box<dyn LbcState> = if direct {
            Box::new(DirectScores::new(8, 16, p, 1 << 20).unwrap())
        } else {
            Box::new(AccumulatedScores::new(8, 16, p).unwrap())
        };
        train(s.as_mut(), SGD, 3, sched, 3, |_, _| {});
        let saved = s.export_state();
        let (name, bits) = saved.iter().find(|(n, _)| n.starts_with("alive")).unwrap();
        assert_eq!(name, "alive_bits");
        // 8 rows × 4 groups × C(4, 2) = 192 flags in 6 values.
        assert_eq!(bits.len(), 6);
        let mut back: Box<dyn LbcState> = if direct {
            Box::new(DirectScores::new(8, 16, p, 1 << 20).unwrap())
        } else {
            Box::new(AccumulatedScores::new(8, 16, p).unwrap())
        };
        back.import_state(&saved).unwrap();
        assert_eq!(back.mask(), s.mask());
        assert_eq!(back.max_alive(), s.max_alive());
        assert_eq!(back.export_state(), saved);
        // The one-value-per-flag field of older checkpoints still restores.
        let legacy: Vec<(String, Vec<f64>)> = saved
            .iter()
            .map(|(n, v)| {
                if n == "alive_bits" {
                    let flags = (0..192)
                        .map(|i| f64::from((v[i / 32] as u32) >> (i % 32) & 1))
                        .collect();
                    ("alive".to_string(), flags)
                } else {
                    (n.clone(), v.clone())
                }
            })
            .collect();
        let mut old = if direct {
            Box::new(DirectScores::new(8, 16, p, 1 << 20).unwrap()) as Box<dyn LbcState>
        } else {
            Box::new(AccumulatedScores::new(8, 16, p).unwrap())
        };
        old.import_state(&legacy).unwrap();
        assert_eq!(old.export_state(), saved);
        // A packed value that is not a 32-bit integer is refused.
        let mut bad = saved.clone();
        bad.iter_mut().find(|(n, _)| n == "alive_bits").unwrap().1[0] = 0.5;
        assert!(back.import_state(&bad).is_err());
    }
}

#[test]
fn lbc_mask_evolution_snapshot() {
    let sched = RemovalSchedule {
        t_i: 0,
        t_f: 5,
        power: 3.0,
    };
    let mut s = DirectScores::new(4, 16, NmPattern::new(2, 4), 1 << 20).unwrap();
    let mut out = String::new();
    train(&mut s, SGD, 4, sched, 6, |e, st| {
        out += &format!("epoch {e}: K = {}\n{}", st.max_alive(), st.mask().render());
    });
    insta::assert_snapshot!(out);
}

#[test]
fn srste_mask_after_a_few_steps_snapshot() {
    let (rows, fan_in) = (4, 16);
    let p = NmPattern::new(2, 4);
    let mut rng = Rng::new(8);
    let mut w = normal(&mut rng, rows * fan_in);
    let mut out = String::new();
    for step in 0..3 {
        let mask = magnitude_mask(&w, rows, fan_in, p).unwrap();
        out += &format!("step {step}\n{}", mask.render());
        let g = normal(&mut rng, rows * fan_in);
        let g = srste_grad(&w, &g, &mask, 2e-4).unwrap();
        for (wi, gi) in w.iter_mut().zip(g) {
            *wi -= 0.3 * gi;
        }
    }
    insta::assert_snapshot!(out);
}

const ADAMW: ScoreOpt = ScoreOpt::AdamW(ScoreAdamW {
    lr: 0.01,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.05,
});

/// Scores under AdamW (the reference's DeiT runs): the first step moves every alive score by
/// `−lr · sign(∂α)` after the decoupled decay (bias-corrected moments make m̂/√v̂ = sign);
/// Nesterov SGD's first step is `−lr · (1 + μ) · ∂α`; the accumulated formulation and a table
/// too large for the direct one refuse AdamW; checkpoints carry AdamW's moments and step count.
#[test]
fn adamw_and_nesterov_score_steps_by_hand() {
    let w = [1.0, 2.0, -1.0, 0.5];
    let g = [0.5, -1.0, 2.0, 4.0];
    let p = NmPattern::new(2, 4);
    let mut s = DirectScores::new(1, 4, p, 100).unwrap();
    let grad = s.score_grad(&w, &g);
    s.step(&w, &g, ADAMW, true).unwrap();
    let s0 = 1.0f32 / 3.0;
    for (k, d) in grad.iter().enumerate() {
        let step = if *d == 0.0 { 0.0 } else { d.signum() * 0.01 };
        let expect = s0 * (1.0 - 0.01 * 0.05) - step;
        assert!((s.score(0, k) - expect).abs() < 1e-6, "combo {k}");
    }
    // The state round-trips with the moments and step count.
    let mut r = DirectScores::new(1, 4, p, 100).unwrap();
    r.import_state(&s.export_state()).unwrap();
    s.step(&w, &g, ADAMW, true).unwrap();
    r.step(&w, &g, ADAMW, true).unwrap();
    for k in 0..6 {
        assert_eq!(s.score(0, k), r.score(0, k));
    }
    let mut n = DirectScores::new(1, 4, p, 100).unwrap();
    n.step(&w, &g, NESTEROV, true).unwrap();
    for (k, d) in grad.iter().enumerate() {
        let dd = d + 1e-4 * s0;
        let expect = s0 - 0.05 * (dd + 0.9 * dd);
        assert!((n.score(0, k) - expect).abs() < 1e-6, "combo {k}");
    }
    let mut a = AccumulatedScores::new(1, 4, p).unwrap();
    let e = a.step(&w, &g, ADAMW, true).unwrap_err().to_string();
    assert!(e.contains("only under SGD"), "{e}");
    let e = lbc_state(64, 64, NmPattern::new(8, 16), 1 << 20, ADAMW)
        .err()
        .unwrap();
    assert!(matches!(e, lbc::LbcError::TooLarge { .. }), "{e}");
}

/// With `freeze` (the ResNet script) the scores stop once one combination is left; without it
/// (the DeiT script) they keep training — and the mask stays the same, removals being
/// permanent.
#[test]
fn unfrozen_scores_keep_training_without_changing_the_mask() {
    let w = [1.0, 2.0, -1.0, 0.5, 0.3, -0.2, 0.9, 1.1];
    let g = [0.5, -1.0, 2.0, 4.0, -0.3, 0.2, 0.1, -2.0];
    let p = NmPattern::new(2, 4);
    for freeze in [true, false] {
        let mut s = DirectScores::new(2, 4, p, 100).unwrap();
        s.step(&w, &g, ADAMW, freeze).unwrap();
        s.remove_to(1);
        let (mask, before) = (s.mask(), s.export_state());
        for _ in 0..5 {
            s.step(&w, &g, ADAMW, freeze).unwrap();
            s.remove_to(1);
        }
        assert_eq!(s.mask(), mask);
        assert_eq!(s.export_state() == before, freeze, "freeze {freeze}");
    }
}
