//! SRigL's update (docs/algorithms.md §6) in three passes over a layer's dense arrays, with
//! the result of the general implementation in `update.rs` bit for bit (tests below compare
//! them on random layers with ties, zeros, NaN gradients and ablation).
//!
//! The general implementation makes about fifteen passes over the `rows × fan_in` entries
//! (drop scores, gradient keys, salience flags, per-row candidate lists, the new mask, a copy
//! of the weights, statistics). Here:
//!
//! 1. one pass over the weights and the mask lists the active entries with their `|W|` keys
//!    (every `|W|` selection is among active entries: a tenth or less of the layer); it packs
//!    64 active flags into a word at a time and walks the word's set bits — or, for a caller
//!    that holds the active weights (the sparse engine), the mask's own list of its active
//!    positions ([`Mask::active_positions`]) and those weights, without a pass;
//! 2. one pass over the gradient collects the entries that can be among the `n_drop` largest
//!    `|∂L/∂W|` (`select::top_k_abs`), for the salience counts of ablation;
//! 3. one pass over rows, in parallel, trims each row's kept weights to `k` and grows it back
//!    to `k` by `|∂L/∂W|` (`select::top_k_growth`: block maxima bound the candidates, so a
//!    sparse row's growth looks at a few blocks' keys), and writes the new mask with its list
//!    of active positions (each row's read while the row is in cache, so the next update, the
//!    sparse engine's layout and the ever-active union need no scan of the mask); the
//!    drop/grow counts come from the row's lists, not from another scan.
//!
//! It applies when the general implementation's candidate sets are the active entries: no tie
//! noise (which scores every entry), every inactive weight 0 (the update's contract) and no NaN
//! weight. Otherwise [`srigl`] returns `None` and the general implementation runs.

use rayon::prelude::*;
use sparse_formats::Mask;

use crate::error::Result;
use crate::select::{key, top_k_abs, top_k_growth, top_k_keys};
use crate::update::{
    ablated_rows, fan_in_after_ablation, MaskUpdate, UpdateInput, UpdateParams, UpdateStats,
};

/// The active entries of a layer in position order, with their `|W|` keys.
struct Active {
    pos: Vec<usize>,
    keys: Vec<u32>,
    /// Active entries whose weight is not 0.
    nonzero: usize,
}

/// Pass 1; `None` when the fused path does not apply (a NaN weight, or an inactive weight
/// that is not 0).
fn active_entries(w: &[f32], bits: &[bool], fan_in: usize) -> Option<Active> {
    let chunk = fan_in.max(1) * (1usize << 16).div_ceil(fan_in.max(1));
    let parts: Option<Vec<Active>> = bits
        .par_chunks(chunk)
        .zip(w.par_chunks(chunk))
        .enumerate()
        .map(|(ci, (m, wc))| {
            // Words of 64 entries: branch-free checks, counts and the word of active flags
            // (vectorised, `simd`), then a walk over its set bits — one step per active entry.
            let (nonzero, broken, offsets) = crate::simd::active_chunk(m, wc);
            if broken {
                return None;
            }
            let base = ci * chunk;
            Some(Active {
                pos: offsets.iter().map(|&j| base + j as usize).collect(),
                keys: offsets.iter().map(|&j| key(wc[j as usize].abs())).collect(),
                nonzero,
            })
        })
        .collect();
    let parts = parts?;
    let n: usize = parts.iter().map(|a| a.pos.len()).sum();
    let mut all = Active {
        pos: Vec::with_capacity(n),
        keys: Vec::with_capacity(n),
        nonzero: 0,
    };
    for a in parts {
        all.pos.extend(a.pos);
        all.keys.extend(a.keys);
        all.nonzero += a.nonzero;
    }
    Some(all)
}

/// Pass 1 from the caller's stored weights (`UpdateInput::active_weights`, the active entries'
/// weights in position order): the positions from the mask alone, the keys from `stored` —
/// the dense weights are not read. `Ok(None)` for a NaN weight (the general implementation
/// then runs); an error when `stored` does not hold one weight per active entry.
fn stored_entries(name: &str, mask: &Mask, stored: &[f32]) -> Result<Option<Active>> {
    // The mask's own list where it has one (the previous update built it, or the sparse
    // engine's layout asked for it), else one scan that the mask then keeps.
    let pos = mask.active_positions().to_vec();
    if pos.len() != stored.len() {
        return Err(crate::error::DstError::layer(
            name,
            format!(
                "{} stored weights for a mask of {} active entries",
                stored.len(),
                pos.len()
            ),
        ));
    }
    if stored.iter().any(|v| v.is_nan()) {
        return Ok(None);
    }
    Ok(Some(Active {
        keys: stored.iter().map(|v| key(v.abs())).collect(),
        nonzero: stored.iter().filter(|&&v| v != 0.0).count(),
        pos,
    }))
}

/// The positions of a row's active entries (`nb`, the row starting at `base`), read while
/// the row is in cache: the new mask's list, so that no later reader scans the whole mask.
fn row_positions(nb: &[bool], base: usize) -> Vec<usize> {
    let mut out = Vec::new();
    sparse_formats::push_active_positions(nb, base, &mut out);
    out
}

/// `starts[r]..starts[r + 1]`: the entries of row `r` in an ascending list of distinct
/// positions (a binary search for each row's end within the next `fan_in` entries — a row
/// holds at most that many — not a division per entry).
fn row_starts(positions: &[usize], rows: usize, fan_in: usize) -> Vec<usize> {
    let mut starts = Vec::with_capacity(rows + 1);
    starts.push(0);
    let mut at = 0;
    for r in 0..rows {
        let end = (r + 1) * fan_in;
        let run = &positions[at..(at + fan_in).min(positions.len())];
        at += run.partition_point(|&p| p < end);
        starts.push(at);
    }
    starts
}

/// Per row, how many entries are in either of two ascending position lists: each row's two
/// runs ([`row_starts`]) merged.
fn union_counts(a: &[usize], b: &[usize], rows: usize, fan_in: usize) -> Vec<usize> {
    let (sa, sb) = (row_starts(a, rows, fan_in), row_starts(b, rows, fan_in));
    (0..rows)
        .map(|r| {
            let (x, y) = (&a[sa[r]..sa[r + 1]], &b[sb[r]..sb[r + 1]]);
            let (mut i, mut j, mut both) = (0, 0, 0);
            while i < x.len() && j < y.len() {
                both += (x[i] == y[j]) as usize;
                let (xi, yj) = (x[i], y[j]);
                i += (xi <= yj) as usize;
                j += (yj <= xi) as usize;
            }
            x.len() + y.len() - both
        })
        .collect()
}

/// SRigL's new mask, or `None` where the fused path does not apply (see the module
/// documentation). `input` has been checked (lengths, gradient present).
pub(crate) fn srigl(input: &UpdateInput<'_>, p: &UpdateParams) -> Option<Result<MaskUpdate>> {
    if p.tie_noise > 0.0 {
        return None;
    }
    let (mask, w) = (input.mask, input.weights);
    let g = input.grad?;
    let active = match input.active_weights {
        Some(v) => match stored_entries(input.name, mask, v) {
            Ok(a) => a?,
            Err(e) => return Some(Err(e)),
        },
        None => active_entries(w, mask.as_slice(), mask.fan_in())?,
    };
    Some(finish(input, p, g, active))
}

fn finish(
    input: &UpdateInput<'_>,
    p: &UpdateParams,
    g: &[f32],
    active: Active,
) -> Result<MaskUpdate> {
    let (mask, w) = (input.mask, input.weights);
    let (rows, fan_in) = (mask.rows(), mask.fan_in());
    let bits = mask.as_slice();
    let budget = input.budget;
    let n_act = active.pos.len();
    let n_drop0 = (n_act as f64 * p.drop_fraction).floor() as usize;
    let n_keep = (n_act - n_drop0).min(active.nonzero);
    let n_drop = n_act - n_keep;

    // The n_keep largest |W| among active entries (indices into `active`).
    let by_weight = top_k_keys(&active.keys, n_keep);
    let mut ablated = vec![false; rows];
    if p.srigl.ablates() && !input.protected && rows > 0 {
        let salient_w: Vec<usize> = by_weight.iter().map(|&a| active.pos[a]).collect();
        let salient_g = top_k_abs(g, n_drop);
        let counts = union_counts(&salient_w, &salient_g, rows, fan_in);
        ablated = ablated_rows(&counts, p.srigl.gamma_sal, budget, fan_in);
    }
    let any_ablated = ablated.contains(&true);
    let alive = ablated.iter().filter(|&&a| !a).count();
    let k = fan_in_after_ablation(input, &ablated)?;

    // The n_keep largest |W| among active entries of rows that live on, in position order.
    let keep: Vec<usize> = if any_ablated {
        let (pos, keys): (Vec<usize>, Vec<u32>) = active
            .pos
            .iter()
            .zip(&active.keys)
            .filter(|(&i, _)| !ablated[i / fan_in])
            .map(|(&i, &o)| (i, o))
            .unzip();
        top_k_keys(&keys, n_keep)
            .into_iter()
            .map(|a| pos[a])
            .collect()
    } else {
        by_weight.into_iter().map(|a| active.pos[a]).collect()
    };
    let starts = row_starts(&keep, rows, fan_in);
    let old_starts = row_starts(&active.pos, rows, fan_in);

    // Pass 3: every row at once.
    let mut new_bits = vec![false; mask.len()];
    let rows_out: Vec<(usize, usize, Vec<usize>)> = new_bits
        .par_chunks_mut(fan_in)
        .enumerate()
        .map(|(r, nb)| {
            let base = r * fan_in;
            let old = &bits[base..base + fan_in];
            let n_old = old_starts[r + 1] - old_starts[r];
            if ablated[r] {
                return (n_old, 0, Vec::new());
            }
            let kept = &keep[starts[r]..starts[r + 1]];
            if kept.len() > k {
                let keys: Vec<u32> = kept.iter().map(|&i| key(w[i].abs())).collect();
                for a in top_k_keys(&keys, k) {
                    nb[kept[a] - base] = true;
                }
            } else {
                for &i in kept {
                    nb[i - base] = true;
                }
            }
            // Kept entries are active ones; a grown entry may be one just dropped (then it
            // counts as neither).
            let kept_n = kept.len().min(k);
            let need = k - kept_n;
            let mut regrown = 0;
            for c in top_k_growth(&g[base..base + fan_in], nb, k, need) {
                nb[c] = true;
                regrown += old[c] as usize;
            }
            (
                n_old - kept_n - regrown,
                need - regrown,
                row_positions(nb, base),
            )
        })
        .collect();
    let (mut dropped, mut grown) = (0, 0);
    let mut positions = Vec::with_capacity(rows_out.iter().map(|r| r.2.len()).sum());
    for (d, g, pos) in rows_out {
        dropped += d;
        grown += g;
        positions.extend(pos);
    }
    let ablated_rows: Vec<usize> = (0..rows).filter(|&r| ablated[r]).collect();
    let stats = UpdateStats {
        dropped,
        grown,
        active: alive * k,
        ablated_rows: ablated_rows.len(),
        fan_in: Some(k),
    };
    Ok(MaskUpdate {
        mask: Mask::with_positions(rows, fan_in, new_bits, positions)?,
        ablated: ablated_rows,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::update::{initial_mask, srigl_general, Method, SriglParams};

    /// Scores with many ties: a few distinct magnitudes, zeros, and (gradients only) NaN.
    fn value(rng: &mut Rng, nan: bool) -> f32 {
        match rng.below(10) {
            0 => 0.0,
            1 if nan => f32::NAN,
            2 | 3 => (rng.below(4) as f32 - 1.5) * 0.5,
            _ => rng.normal() as f32,
        }
    }

    /// The update's input for a layer `w` whose weights are read densely.
    fn dense_input<'a>(
        w: &'a [f32],
        g: &'a [f32],
        mask: &'a Mask,
        budget: usize,
        protected: bool,
    ) -> UpdateInput<'a> {
        UpdateInput {
            name: "w",
            weights: w,
            grad: Some(g),
            mask,
            budget,
            protected,
            active_weights: None,
        }
    }

    #[test]
    fn the_fused_update_is_the_general_one() {
        let mut rng = Rng::new(11);
        let mut checked = 0;
        for case in 0..300 {
            let rows = 1 + rng.below(40);
            let fan_in = 1 + rng.below(60);
            let n = rows * fan_in;
            let budget = 1 + rng.below(n.saturating_sub(1).max(1));
            let Ok(mask) = initial_mask(Method::Srigl, "w", rows, fan_in, budget, &mut rng) else {
                continue;
            };
            // Some layers start with rows already ablated or trimmed below k.
            let mut bits = mask.as_slice().to_vec();
            if case % 3 == 0 {
                for b in bits.iter_mut() {
                    *b &= rng.below(4) != 0;
                }
            }
            let mask = Mask::new(rows, fan_in, bits).unwrap();
            let w: Vec<f32> = mask
                .as_slice()
                .iter()
                .map(|&a| if a { value(&mut rng, false) } else { 0.0 })
                .collect();
            let g: Vec<f32> = (0..n).map(|_| value(&mut rng, case % 2 == 0)).collect();
            let input = dense_input(&w, &g, &mask, budget, case % 7 == 0);
            let params = UpdateParams {
                drop_fraction: [0.0, 0.1, 0.3, 0.5, 1.0][case % 5],
                seed: 1,
                step: 100,
                layer_index: 0,
                tie_noise: 0.0,
                srigl: SriglParams {
                    gamma_sal: [0.3, 0.95, 2.0, 0.0][case % 4],
                    ablation: case % 5 != 1,
                },
            };
            let fused = srigl(&input, &params).expect("the fused path applies");
            // The same update from the active weights as a sparse-storage caller holds them.
            let active: Vec<f32> = mask.positions().iter().map(|&i| w[i]).collect();
            let from_stored = srigl(
                &UpdateInput {
                    active_weights: Some(&active),
                    ..input
                },
                &params,
            )
            .expect("the fused path applies");
            match (fused, srigl_general(&input, &params)) {
                (Ok(u), Ok(want)) => {
                    assert_eq!(u, want, "case {case}");
                    // The list the update hands on with its mask is the mask's.
                    let bits = u.mask.as_slice().to_vec();
                    let fresh = Mask::new(rows, fan_in, bits).unwrap().positions();
                    assert_eq!(u.mask.active_positions(), &fresh[..], "case {case}");
                    assert_eq!(from_stored.unwrap(), want, "case {case}, stored weights");
                    checked += 1;
                }
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "case {case}"),
                (a, b) => panic!("case {case}: fused {a:?}, general {b:?}"),
            }
        }
        assert!(checked > 200, "only {checked} cases produced a mask");
    }

    #[test]
    fn row_starts_and_union_counts_are_the_divisions() {
        let mut rng = Rng::new(29);
        for (rows, fan_in) in [(1, 1), (5, 9), (40, 64), (7, 300)] {
            let n = rows * fan_in;
            let a: Vec<usize> = (0..n).filter(|_| rng.below(3) == 0).collect();
            let b: Vec<usize> = (0..n).filter(|_| rng.below(4) == 0).collect();
            let mut want = vec![0usize; rows + 1];
            a.iter().for_each(|&p| want[p / fan_in + 1] += 1);
            (0..rows).for_each(|r| want[r + 1] += want[r]);
            assert_eq!(row_starts(&a, rows, fan_in), want, "{rows}×{fan_in}");
            let mut union = vec![0usize; rows];
            (0..n)
                .filter(|p| a.contains(p) || b.contains(p))
                .for_each(|p| union[p / fan_in] += 1);
            assert_eq!(union_counts(&a, &b, rows, fan_in), union, "{rows}×{fan_in}");
        }
    }

    #[test]
    fn stored_weights_must_match_the_mask() {
        let mask = Mask::parse("#.#.\n.##.").unwrap();
        let w = [1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0];
        let g = [0.5f32; 8];
        let input = UpdateInput {
            name: "fc2",
            weights: &w,
            grad: Some(&g),
            mask: &mask,
            budget: 4,
            protected: false,
            active_weights: Some(&[1.0, 2.0, 3.0]),
        };
        let params = UpdateParams {
            drop_fraction: 0.5,
            seed: 1,
            step: 1,
            layer_index: 0,
            tie_noise: 0.0,
            srigl: SriglParams::default(),
        };
        let err = srigl(&input, &params).unwrap().unwrap_err().to_string();
        assert!(
            err.contains("fc2") && err.contains("3 stored weights") && err.contains("4 active"),
            "{err}"
        );
        // A NaN among them leaves the update to the general implementation.
        let nan = [1.0, f32::NAN, 3.0, 4.0];
        let input = UpdateInput {
            active_weights: Some(&nan),
            ..input
        };
        assert!(srigl(&input, &params).is_none());
    }

    #[test]
    fn large_layers_are_the_general_update() {
        // Layers large enough for the gradient salience's sampled collecting pass
        // (`select::top_k_abs`), with rows short against their fan-in (growth by a sampled
        // bound, 600 × 300) and long (growth by block maxima, `select::top_k_growth`): fan-ins
        // that are and are not multiples of 16, gradients with ties, zeros and NaN, ablation
        // firing (gradients concentrated on a few rows) and not.
        let mut rng = Rng::new(29);
        let mut ablations = Vec::new();
        for (case, (rows, fan_in, budget)) in [
            (600, 300, 18_000),
            (100, 1024, 800),
            (70, 1000, 700),
            (90, 999, 1800),
            (40, 2000, 600),
        ]
        .into_iter()
        .enumerate()
        {
            let mask = initial_mask(Method::Srigl, "w", rows, fan_in, budget, &mut rng).unwrap();
            // Growth by block maxima in all but the first.
            assert_eq!(fan_in >= 32 * (budget / rows), case > 0, "case {case}");
            let w: Vec<f32> = mask
                .as_slice()
                .iter()
                .map(|&a| if a { value(&mut rng, false) } else { 0.0 })
                .collect();
            let g: Vec<f32> = (0..rows * fan_in)
                .map(|i| {
                    let scale = if case % 2 == 0 && i / fan_in < rows / 10 {
                        10.0
                    } else {
                        0.01
                    };
                    value(&mut rng, true) * scale
                })
                .collect();
            let input = dense_input(&w, &g, &mask, budget, false);
            for drop_fraction in [0.3, 1.0] {
                let params = UpdateParams {
                    drop_fraction,
                    seed: 1,
                    step: 100,
                    layer_index: 0,
                    tie_noise: 0.0,
                    srigl: SriglParams::default(),
                };
                let u = srigl(&input, &params).unwrap().unwrap();
                let want = srigl_general(&input, &params).unwrap();
                assert_eq!(u, want, "case {case}, drop fraction {drop_fraction}");
                assert!(u.stats.grown > 0, "case {case}");
                ablations.push(u.ablated.len());
            }
        }
        assert!(
            ablations.iter().any(|&a| a > 0),
            "ablation fires: {ablations:?}"
        );
        assert!(ablations.contains(&0), "and does not: {ablations:?}");
    }

    #[test]
    fn tie_noise_and_broken_contracts_take_the_general_path() {
        let mask = Mask::parse("#.\n.#").unwrap();
        let g = [1.0f32; 4];
        let input = |w: &'static [f32]| UpdateInput {
            name: "w",
            weights: w,
            grad: Some(&g),
            mask: &mask,
            budget: 2,
            protected: false,
            active_weights: None,
        };
        let mut p = UpdateParams {
            drop_fraction: 0.5,
            seed: 1,
            step: 1,
            layer_index: 0,
            tie_noise: 0.0,
            srigl: SriglParams::default(),
        };
        assert!(srigl(&input(&[1.0, 0.0, 0.0, 1.0]), &p).is_some());
        assert!(srigl(&input(&[1.0, 0.5, 0.0, 1.0]), &p).is_none());
        assert!(srigl(&input(&[f32::NAN, 0.0, 0.0, 1.0]), &p).is_none());
        p.tie_noise = 1e-5;
        assert!(srigl(&input(&[1.0, 0.0, 0.0, 1.0]), &p).is_none());
    }
}
