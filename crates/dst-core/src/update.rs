//! Mask updates: Static, SET, RigL and SRigL, each a pure, deterministic function of
//! (weights, dense gradient, mask, step, seed, settings) → new mask + statistics
//! (docs/algorithms.md §5 and §6).
//!
//! Deliberate differences from the reference code, all fixes of documented bugs:
//! - **Kept weights are ranked among active entries only** (RigL, SET, and SRigL's surviving
//!   rows), so an inactive zero can never be "kept" — the reference's top-k over `|W|` can pick
//!   inactive zeros and silently turn them into random growth (docs/algorithms.md §5, §6).
//! - **SRigL trims rows to `k` by magnitude**; the reference sorts a boolean row, keeping
//!   arbitrary weights (docs/algorithms.md §6).
//! - **Ties are broken by index** (smaller index wins), or by seeded noise on the drop scores
//!   when `tie_noise > 0` (Google's 1e-5); `torch.topk`'s tie order is unspecified.
//! - **The output layer can be protected from ablation** (`protected`); the reference's
//!   protection never triggers unless the layer is named (docs/algorithms.md §6).
//! - SRigL's guard `n_keep = min(n_keep, nnz(W))` is kept as in the reference.
//!
//! Grown weights start at 0 and their optimizer state at 0 ([`apply_update`] and the
//! optimizers' `set_mask`); a weight dropped and regrown in the same update keeps its value.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sparse_formats::Mask;

use crate::error::{DstError, Result};
use crate::rng::Rng;
use crate::select::{key, top_k, top_k_keys};

/// A dynamic-sparse-training method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The initial random mask never changes.
    Static,
    /// Drop by magnitude, regrow at random (SET, as in Google's RigL code base).
    Set,
    /// Drop by magnitude, regrow by dense-gradient magnitude, per layer (Evci et al. 2020).
    Rigl,
    /// RigL under a constant fan-in constraint with dynamic neuron ablation (Lasby et al.).
    Srigl,
}

impl Method {
    /// Whether the method's reference re-initialises the kept weights with sparse He
    /// `N(0, 2/k)` (SRigL) rather than masking the dense initialisation (RigL, SET, Static):
    /// the default of [`SparsifierConfig::sparse_init`](crate::SparsifierConfig::sparse_init)
    /// (docs/algorithms.md §6.2).
    pub fn reference_sparse_init(self) -> bool {
        self == Method::Srigl
    }
}

/// SRigL's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SriglParams {
    /// γ_sal: a neuron with fewer salient weights than `max(1, int(γ_sal · B / rows))` is
    /// ablated (γ_sal ≥ 1 is an absolute count; 0 turns ablation off, as the reference's
    /// `min_salient_weights_per_neuron ≠ 0` check does). Default 0.3 (the paper's CNNs; 0.95
    /// for ViT).
    pub gamma_sal: f64,
    /// Dynamic neuron ablation on/off.
    pub ablation: bool,
}

impl SriglParams {
    /// Whether dynamic neuron ablation runs: switched on and γ_sal > 0.
    pub fn ablates(&self) -> bool {
        self.ablation && self.gamma_sal > 0.0
    }
}

impl Default for SriglParams {
    fn default() -> Self {
        SriglParams {
            gamma_sal: 0.3,
            ablation: true,
        }
    }
}

/// One layer's state at an update.
#[derive(Debug, Clone, Copy)]
pub struct UpdateInput<'a> {
    /// Layer name (for errors).
    pub name: &'a str,
    /// Current weights, `[rows, fan_in]` row-major (inactive entries are 0).
    pub weights: &'a [f32],
    /// Dense gradient `∂L/∂W` at every entry (RigL, SRigL); not needed by Static and SET.
    pub grad: Option<&'a [f32]>,
    /// Current mask.
    pub mask: &'a Mask,
    /// The layer's non-zero budget B (SRigL's constant fan-in is `B / active rows`).
    pub budget: usize,
    /// Never ablate neurons of this layer (the output layer by default).
    pub protected: bool,
    /// The weights at the mask's active entries in position order, where the caller already
    /// holds them so (a sparse-storage layer's stored values), else `None`. SRigL's fused update
    /// then reads the active magnitudes here instead of scanning `weights` and the mask's
    /// inactive entries (the caller vouches that those weights are 0); `weights` must still
    /// hold the same weights (the other paths read them). Its length must be the mask's active
    /// count.
    pub active_weights: Option<&'a [f32]>,
}

/// Settings of one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateParams {
    /// α_t, from the schedule.
    pub drop_fraction: f64,
    /// Run seed.
    pub seed: u64,
    /// Optimiser step of this update.
    pub step: u64,
    /// Index of the layer (a stream id for SET and tie noise).
    pub layer_index: u64,
    /// Std of the seeded noise added to drop scores; 0 = break ties by index only.
    pub tie_noise: f32,
    /// SRigL settings.
    pub srigl: SriglParams,
}

/// Counts reported for one layer update.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct UpdateStats {
    /// Weights active before and inactive after.
    pub dropped: usize,
    /// Weights inactive before and active after.
    pub grown: usize,
    /// Active weights after the update.
    pub active: usize,
    /// Rows with no active weight after the update (ablated neurons).
    pub ablated_rows: usize,
    /// The constant fan-in after the update (SRigL), or `None`.
    pub fan_in: Option<usize>,
}

/// The result of an update.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskUpdate {
    /// The new mask.
    pub mask: Mask,
    /// Rows ablated by this update (SRigL).
    pub ablated: Vec<usize>,
    /// Counts.
    pub stats: UpdateStats,
}

fn top_k_all(scores: &[f32], mask: &Mask, k: usize) -> Vec<usize> {
    let cands: Vec<usize> = (0..scores.len())
        .filter(|&i| mask.as_slice()[i] || scores[i] != 0.0)
        .collect();
    let positive = cands.iter().filter(|&&i| scores[i] > 0.0).count();
    if positive >= k {
        top_k(cands, k, |i| scores[i])
    } else {
        let keys: Vec<u32> = scores.iter().map(|&v| key(v)).collect();
        top_k_keys(&keys, k)
    }
}

fn check_input(input: &UpdateInput<'_>, needs_grad: bool) -> Result<()> {
    let n = input.mask.len();
    if input.weights.len() != n {
        return Err(DstError::layer(
            input.name,
            format!("{} weights for a mask of {n} entries", input.weights.len()),
        ));
    }
    match input.grad {
        Some(g) if g.len() != n => Err(DstError::layer(
            input.name,
            format!("{} gradient entries for a mask of {n}", g.len()),
        )),
        None if needs_grad => Err(DstError::layer(
            input.name,
            "this method needs the dense gradient of the layer's weight",
        )),
        _ => Ok(()),
    }
}

/// Drop scores `|W|`, plus seeded noise when asked.
fn drop_scores(input: &UpdateInput<'_>, p: &UpdateParams) -> Vec<f32> {
    let mut s: Vec<f32> = input.weights.iter().map(|w| w.abs()).collect();
    if p.tie_noise > 0.0 {
        let mut rng = Rng::derive(p.seed, &[p.step, p.layer_index, 1]);
        for v in &mut s {
            *v += p.tie_noise * rng.normal() as f32;
        }
    }
    s
}

fn stats(old: &Mask, new: &Mask, fan_in: Option<usize>) -> UpdateStats {
    let (mut dropped, mut grown) = (0, 0);
    for (&a, &b) in old.as_slice().iter().zip(new.as_slice()) {
        dropped += (a && !b) as usize;
        grown += (!a && b) as usize;
    }
    UpdateStats {
        dropped,
        grown,
        active: new.nnz(),
        ablated_rows: new.row_counts().iter().filter(|&&c| c == 0).count(),
        fan_in,
    }
}

/// Computes the new mask of one layer.
pub fn update_mask(
    method: Method,
    input: &UpdateInput<'_>,
    p: &UpdateParams,
) -> Result<MaskUpdate> {
    check_drop_fraction(p)?;
    match method {
        Method::Static => {
            check_input(input, false)?;
            Ok(MaskUpdate {
                mask: input.mask.clone(),
                ablated: Vec::new(),
                stats: stats(input.mask, input.mask, None),
            })
        }
        Method::Set | Method::Rigl => unstructured(method, input, p),
        Method::Srigl => srigl(input, p),
    }
}

/// RigL and SET: layer-wide drop by magnitude among active weights, then growth among all
/// entries not kept (a weight dropped now may be regrown), by `|G|` (RigL) or at random (SET).
fn check_drop_fraction(p: &UpdateParams) -> Result<()> {
    if !(0.0..=1.0).contains(&p.drop_fraction) {
        return Err(DstError::Config {
            field: "drop_fraction",
            reason: format!("{} is outside [0, 1]", p.drop_fraction),
        });
    }
    Ok(())
}

fn unstructured(method: Method, input: &UpdateInput<'_>, p: &UpdateParams) -> Result<MaskUpdate> {
    check_input(input, method == Method::Rigl)?;
    let mask = input.mask;
    let n_act = mask.nnz();
    let n_drop = (n_act as f64 * p.drop_fraction).floor() as usize;
    let n_keep = n_act - n_drop;
    let ds = drop_scores(input, p);
    let active: Vec<usize> = (0..mask.len()).filter(|&i| mask.as_slice()[i]).collect();
    let keep = top_k(active, n_keep, |i| ds[i]);
    let mut bits = vec![false; mask.len()];
    for &i in &keep {
        bits[i] = true;
    }
    let cands: Vec<usize> = (0..mask.len()).filter(|&i| !bits[i]).collect();
    let grow = match method {
        Method::Rigl => {
            let g = input.grad.expect("checked");
            top_k(cands, n_drop, |i| g[i].abs())
        }
        _ => {
            let mut rng = Rng::derive(p.seed, &[p.step, p.layer_index, 2]);
            let r: Vec<f32> = (0..mask.len()).map(|_| rng.uniform() as f32).collect();
            top_k(cands, n_drop, |i| r[i])
        }
    };
    for i in grow {
        bits[i] = true;
    }
    let new = Mask::new(mask.rows(), mask.fan_in(), bits)?;
    let st = stats(mask, &new, None);
    Ok(MaskUpdate {
        mask: new,
        ablated: Vec::new(),
        stats: st,
    })
}

/// SRigL (docs/algorithms.md §6, with the fixes listed in the module
/// documentation).
/// SRigL's new mask: the fused implementation (`fused.rs`) where it applies, else
/// [`srigl_general`].
fn srigl(input: &UpdateInput<'_>, p: &UpdateParams) -> Result<MaskUpdate> {
    check_input(input, true)?;
    match crate::fused::srigl(input, p) {
        Some(update) => update,
        None => srigl_general(input, p),
    }
}

/// SRigL's dynamic neuron ablation from each row's count of salient weights: a row with fewer
/// than τ = max(1, int(γ_sal · B / rows)) is ablated (γ_sal ≥ 1: τ = γ_sal, an absolute count).
/// Safety clamp: at least `B / fan_in + 1` rows survive, so `k` never exceeds the dense fan-in.
pub(crate) fn ablated_rows(
    counts: &[usize],
    gamma: f64,
    budget: usize,
    fan_in: usize,
) -> Vec<bool> {
    let rows = counts.len();
    let mut tau = if gamma >= 1.0 {
        gamma as usize
    } else {
        ((gamma * (budget / rows) as f64) as usize).max(1)
    };
    let m_min = budget / fan_in.max(1);
    let mut sorted = counts.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    if m_min < rows && sorted[m_min] < tau {
        tau = sorted[m_min];
    }
    counts.iter().map(|&c| c < tau).collect()
}

/// SRigL's constant fan-in `k = min(B / alive rows, fan_in)` after ablation; an error when it
/// is 0 (no row left, or a budget below one weight per row).
pub(crate) fn fan_in_after_ablation(input: &UpdateInput<'_>, ablated: &[bool]) -> Result<usize> {
    let alive = ablated.iter().filter(|&&a| !a).count();
    let k = input
        .budget
        .checked_div(alive)
        .unwrap_or(0)
        .min(input.mask.fan_in());
    if k == 0 {
        return Err(DstError::ZeroFanIn {
            layer: input.name.to_string(),
            budget: input.budget,
            rows: alive,
        });
    }
    Ok(k)
}

/// SRigL's update as docs/algorithms.md §6 states it, one selection at a time: the reference
/// the fused implementation is tested against, and the path for tie noise.
pub(crate) fn srigl_general(input: &UpdateInput<'_>, p: &UpdateParams) -> Result<MaskUpdate> {
    check_input(input, true)?;
    let (mask, w, g) = (input.mask, input.weights, input.grad.expect("checked"));
    let (rows, fan_in) = (mask.rows(), mask.fan_in());
    let budget = input.budget;
    let n_act = mask.nnz();
    let n_drop0 = (n_act as f64 * p.drop_fraction).floor() as usize;
    // Guard of the reference: never plan to keep more weights than are non-zero.
    let nnz_w = (0..mask.len())
        .filter(|&i| mask.as_slice()[i] && w[i] != 0.0)
        .count();
    let n_keep = (n_act - n_drop0).min(nnz_w);
    let n_drop = n_act - n_keep;
    let ds = drop_scores(input, p);

    // 1. Dynamic neuron ablation, recomputed from scratch at every update.
    let mut ablated = vec![false; rows];
    if p.srigl.ablates() && !input.protected && rows > 0 {
        let mut salient = vec![false; mask.len()];
        let (by_weight, by_grad) = rayon::join(
            || top_k_all(&ds, mask, n_keep),
            || {
                let keys: Vec<u32> = g.iter().map(|v| key(v.abs())).collect();
                top_k_keys(&keys, n_drop)
            },
        );
        for i in by_weight.into_iter().chain(by_grad) {
            salient[i] = true;
        }
        let counts: Vec<usize> = (0..rows)
            .map(|r| {
                salient[r * fan_in..(r + 1) * fan_in]
                    .iter()
                    .filter(|&&s| s)
                    .count()
            })
            .collect();
        ablated = ablated_rows(&counts, p.srigl.gamma_sal, budget, fan_in);
    }
    let k = fan_in_after_ablation(input, &ablated)?;

    // 2. Layer-wide drop: keep the n_keep largest |W| among active weights of surviving rows.
    let active: Vec<usize> = (0..mask.len())
        .filter(|&i| mask.as_slice()[i] && !ablated[i / fan_in])
        .collect();
    let keep = top_k(active, n_keep, |i| ds[i]);
    let mut kept_by_row: Vec<Vec<usize>> = vec![Vec::new(); rows];
    for i in keep {
        kept_by_row[i / fan_in].push(i);
    }
    // Rows are independent from here on: decided in parallel, gathered in row order (the same
    // mask whatever the thread count).
    let row_bits: Vec<Vec<bool>> = kept_by_row
        .into_par_iter()
        .enumerate()
        .map(|(r, kept)| {
            let mut row = vec![false; fan_in];
            if ablated[r] {
                return row;
            }
            let base = r * fan_in;
            // 3. Cap at k by magnitude (only when k shrank), then 4. regrow to exactly k by |G|
            //    among the row's entries not kept (just-dropped ones included).
            let kept = top_k(kept, k, |i| ds[i]);
            for &i in &kept {
                row[i - base] = true;
            }
            let need = k - kept.len();
            let cands: Vec<usize> = (base..base + fan_in).filter(|&i| !row[i - base]).collect();
            for i in top_k(cands, need, |i| g[i].abs()) {
                row[i - base] = true;
            }
            row
        })
        .collect();
    let bits: Vec<bool> = row_bits.concat();
    let new = Mask::new(rows, fan_in, bits)?;
    let st = stats(mask, &new, Some(k));
    Ok(MaskUpdate {
        mask: new,
        ablated: (0..rows).filter(|&r| ablated[r]).collect(),
        stats: st,
    })
}

/// Applies a mask change to the weights: inactive entries and newly grown ones become 0; kept
/// weights (including dropped-and-regrown ones) keep their values.
///
/// One parallel pass that writes only entries not already `+0.0` (inactive weights are 0 by the
/// update's contract, so on a layer this is a read of the weights and a few writes).
pub fn apply_update(weights: &mut [f32], old: &Mask, new: &Mask) {
    const CHUNK: usize = 1 << 16;
    weights
        .par_chunks_mut(CHUNK)
        .zip(old.as_slice().par_chunks(CHUNK))
        .zip(new.as_slice().par_chunks(CHUNK))
        .for_each(|((w, a), b)| crate::simd::clear_chunk(w, a, b));
}

/// A layer's new mask and the weights under it (see [`update_layer`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerUpdate {
    /// The update: new mask, ablated rows, counts.
    pub update: MaskUpdate,
    /// The weights after [`apply_update`]: dropped and newly grown entries 0.
    pub weights: Vec<f32>,
}

/// One layer's mask update as every caller performs it (the [`Sparsifier`](crate::Sparsifier)
/// in a training loop, and `dst mask-update` on a state file): a **dense layer is left
/// untouched** (`None`) — one whose budget covers every entry, i.e. kept dense by the user or
/// made dense by ERK's spill-over (its mask is all ones) — otherwise [`update_mask`] followed by
/// [`apply_update`] on a copy of the weights.
pub fn update_layer(
    method: Method,
    input: &UpdateInput<'_>,
    p: &UpdateParams,
) -> Result<Option<LayerUpdate>> {
    let Some(update) = layer_mask_update(method, input, p)? else {
        return Ok(None);
    };
    let mut weights = input.weights.to_vec();
    apply_update(&mut weights, input.mask, &update.mask);
    Ok(Some(LayerUpdate { update, weights }))
}

/// [`update_layer`] without the weights: the new mask of a layer (`None` for a dense layer),
/// for a caller that applies it to the weights where they are stored, with [`apply_update`]
/// (the [`Sparsifier`](crate::Sparsifier): no copy of a layer's weights).
pub fn layer_mask_update(
    method: Method,
    input: &UpdateInput<'_>,
    p: &UpdateParams,
) -> Result<Option<MaskUpdate>> {
    if input.budget >= input.mask.len() {
        return Ok(None);
    }
    update_mask(method, input, p).map(Some)
}

/// The initial random mask: SRigL keeps `B / rows` random inputs in every row (constant
/// fan-in); the other methods place exactly `B` active weights uniformly over the layer.
pub fn initial_mask(
    method: Method,
    name: &str,
    rows: usize,
    fan_in: usize,
    budget: usize,
    rng: &mut Rng,
) -> Result<Mask> {
    let mut m = Mask::zeros(rows, fan_in);
    match method {
        Method::Srigl => {
            let k = budget.checked_div(rows).unwrap_or(0).min(fan_in);
            if k == 0 {
                return Err(DstError::ZeroFanIn {
                    layer: name.to_string(),
                    budget,
                    rows,
                });
            }
            for r in 0..rows {
                for c in rng.choose(fan_in, k) {
                    m.set(r, c, true);
                }
            }
        }
        _ => {
            for i in rng.choose(rows * fan_in, budget.min(rows * fan_in)) {
                m.set(i / fan_in, i % fan_in, true);
            }
        }
    }
    Ok(m)
}

/// Sparse He initialisation: every active weight of row `r` drawn from `N(0, 2 / k_r)` (std
/// `sqrt(2 / k_r)`, `k_r` the row's active count), everything else 0.
///
/// Deliberate difference: the SRigL reference's `grad_flow_init` draws with std `2 / k` (a
/// variance/std mix-up that shrinks activations layer after layer in a plain MLP,
/// docs/algorithms.md §6.2).
pub fn sparse_init(mask: &Mask, rng: &mut Rng) -> Vec<f32> {
    let fan_in = mask.fan_in();
    let mut w = vec![0.0f32; mask.len()];
    for r in 0..mask.rows() {
        let k = mask.row_nnz(r);
        if k == 0 {
            continue;
        }
        let std = (2.0 / k as f64).sqrt();
        for c in mask.row_indices(r) {
            w[r * fan_in + c] = (rng.normal() * std) as f32;
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(a: f64) -> UpdateParams {
        UpdateParams {
            drop_fraction: a,
            seed: 1,
            step: 100,
            layer_index: 0,
            tie_noise: 0.0,
            srigl: SriglParams::default(),
        }
    }

    /// A hand-worked RigL update on a 4×6 layer.
    #[test]
    fn rigl_hand_worked_4x6() {
        let mask = Mask::parse(
            "##..#.
             .##..#
             #..##.
             .#.#.#",
        )
        .unwrap();
        // 12 active weights with distinct magnitudes 1..12 (row-major order of the mask).
        let mut w = vec![0.0f32; 24];
        for (n, i) in (0..24).filter(|&i| mask.as_slice()[i]).enumerate() {
            w[i] = (n + 1) as f32 * if n % 2 == 0 { 1.0 } else { -1.0 };
        }
        // Gradient: large at (0,3), (2,1), (3,0) and at the dropped (0,0).
        let mut g = vec![0.01f32; 24];
        g[3] = 5.0;
        g[13] = 4.0;
        g[18] = 3.0;
        g[0] = 9.0;
        let input = UpdateInput {
            name: "fc",
            weights: &w,
            grad: Some(&g),
            mask: &mask,
            budget: 12,
            protected: false,
            active_weights: None,
        };
        // α = 0.25 → drop floor(12 · 0.25) = 3: the three smallest |w| are 1, 2, 3 at
        // (0,0), (0,1), (0,4). Grow the 3 largest |g| among the 15 entries not kept: (0,0)
        // (just dropped, regrown), (0,3), (2,1).
        let u = update_mask(Method::Rigl, &input, &params(0.25)).unwrap();
        assert_eq!(u.mask.render(), "#..#..\n.##..#\n##.##.\n.#.#.#\n");
        assert_eq!(
            u.stats,
            UpdateStats {
                dropped: 2,
                grown: 2,
                active: 12,
                ablated_rows: 0,
                fan_in: None
            }
        );
        let mut w2 = w.clone();
        apply_update(&mut w2, &mask, &u.mask);
        assert_eq!(w2[0], w[0], "dropped-and-regrown keeps its value");
        assert_eq!(w2[3], 0.0, "grown starts at zero");
        assert_eq!(w2[1], 0.0, "dropped is zeroed");
    }

    /// A hand-worked SRigL update on a 4×6 layer with ablation of the weakest neuron.
    #[test]
    fn srigl_hand_worked_4x6_ablates_and_redistributes() {
        // k = 2 per row, budget 8.
        let mask = Mask::parse(
            "#.#...
             .#.#..
             ..#..#
             #...#.",
        )
        .unwrap();
        let mut w = vec![0.0f32; 24];
        // Row 3 holds tiny weights; the others are large.
        for (i, v) in [
            (0, 5.0),
            (2, 6.0),
            (7, 7.0),
            (9, 8.0),
            (14, 9.0),
            (17, 10.0),
            (18, 0.1),
            (22, 0.2),
        ] {
            w[i] = v;
        }
        // Gradient strongest in rows 0-2, nothing in row 3.
        let mut g = vec![0.0f32; 24];
        for (i, v) in [(1, 3.0), (8, 2.0), (15, 1.0), (4, 0.5)] {
            g[i] = v;
        }
        let input = UpdateInput {
            name: "fc",
            weights: &w,
            grad: Some(&g),
            mask: &mask,
            budget: 8,
            protected: false,
            active_weights: None,
        };
        // α = 0.25: n_drop = 2, n_keep = 6. Salient = top-6 |W| (rows 0-2) ∪ top-2 |G|
        // ((0,1), (1,2)): row counts 3, 3, 2, 0. τ = max(1, int(0.3 · 8/4)) = 1; m_min = 8/6 = 1,
        // sorted counts [3,3,2,0], position 1 has 3 ≥ τ. Row 3 (0 salient) is ablated.
        // k = 8 / 3 = 2. Keep the 6 largest active |W| of rows 0-2: all of them, so nothing to
        // grow; row 3 is emptied.
        let u = update_mask(Method::Srigl, &input, &params(0.25)).unwrap();
        assert_eq!(u.ablated, vec![3]);
        assert_eq!(u.mask.render(), "#.#...\n.#.#..\n..#..#\n......\n");
        assert_eq!(u.stats.fan_in, Some(2));
        // The same layer with the row protected keeps row 3 alive.
        let u = update_mask(
            Method::Srigl,
            &UpdateInput {
                protected: true,
                active_weights: None,
                ..input
            },
            &params(0.25),
        )
        .unwrap();
        assert!(u.ablated.is_empty());
        assert_eq!(u.mask.row_counts(), vec![2, 2, 2, 2]);
        // γ_sal = 0 turns ablation off (the reference's check): the same as ablation = false.
        let mut off = params(0.25);
        off.srigl.gamma_sal = 0.0;
        let u0 = update_mask(Method::Srigl, &input, &off).unwrap();
        assert!(u0.ablated.is_empty());
        assert_eq!(u0.mask.row_counts(), vec![2, 2, 2, 2]);
        let mut no_ablation = params(0.25);
        no_ablation.srigl.ablation = false;
        assert_eq!(
            u0,
            update_mask(Method::Srigl, &input, &no_ablation).unwrap()
        );
    }

    #[test]
    fn srigl_regrows_to_k_and_reactivates_when_budget_allows() {
        // Budget 9 over 3 rows with row 2 previously ablated: k was 9/2 = 4.
        let mask = Mask::parse(
            "####..
             ####..
             ......",
        )
        .unwrap();
        let w: Vec<f32> = (0..18)
            .map(|i| {
                if mask.as_slice()[i] {
                    (i + 1) as f32
                } else {
                    0.0
                }
            })
            .collect();
        // Gradient makes row 2 salient again.
        let mut g = vec![0.0f32; 18];
        g[12] = 10.0;
        g[13] = 9.0;
        g[14] = 8.0;
        let input = UpdateInput {
            name: "fc",
            weights: &w,
            grad: Some(&g),
            mask: &mask,
            budget: 9,
            protected: false,
            active_weights: None,
        };
        let mut p = params(0.3);
        p.srigl.gamma_sal = 1.0; // a row needs one salient weight
        let u = update_mask(Method::Srigl, &input, &p).unwrap();
        // n_drop = floor(8·0.3) = 2 → salient: 6 largest |W| (rows 0,1) and 2 largest |G| (row 2).
        // No row has fewer than 1 salient weight → nothing ablated → k = 9/3 = 3.
        assert!(u.ablated.is_empty());
        assert_eq!(u.stats.fan_in, Some(3));
        assert_eq!(u.mask.row_counts(), vec![3, 3, 3]);
        // Layer-wide keep of the 6 largest |W|: row 1's four (7..10) and row 0's 3, 4. Row 1 is
        // trimmed to its 3 largest; row 0 regrows one weight by |G| — all zero there, so the
        // smallest index, the just-dropped (0,0), which keeps its value. Row 2 grows by |G|.
        assert_eq!(u.mask.render(), "#.##..\n.###..\n###...\n");
    }

    #[test]
    fn set_and_static() {
        let mask = Mask::parse("##..\n..##").unwrap();
        let w = [1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0];
        let input = UpdateInput {
            name: "l",
            weights: &w,
            grad: None,
            mask: &mask,
            budget: 4,
            protected: false,
            active_weights: None,
        };
        let u = update_mask(Method::Static, &input, &params(0.5)).unwrap();
        assert_eq!(u.mask, mask);
        let u = update_mask(Method::Set, &input, &params(0.5)).unwrap();
        assert_eq!(u.mask.nnz(), 4);
        assert!(
            u.mask.get(1, 2) && u.mask.get(1, 3),
            "the two largest are kept"
        );
        // Deterministic for a seed.
        assert_eq!(update_mask(Method::Set, &input, &params(0.5)).unwrap(), u);
        // RigL without a gradient is a clear error.
        let err = update_mask(Method::Rigl, &input, &params(0.5))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer `l`") && err.contains("dense gradient"),
            "{err}"
        );
    }

    #[test]
    fn sparse_init_scale() {
        let mut rng = Rng::new(5);
        let mask = initial_mask(Method::Srigl, "l", 64, 512, 64 * 50, &mut rng).unwrap();
        assert!(mask.row_counts().iter().all(|&c| c == 50));
        let w = sparse_init(&mask, &mut rng);
        let active: Vec<f64> = (0..w.len())
            .filter(|&i| mask.as_slice()[i])
            .map(|i| w[i] as f64)
            .collect();
        let var = active.iter().map(|x| x * x).sum::<f64>() / active.len() as f64;
        assert!((var - 2.0 / 50.0).abs() < 0.004, "variance {var}");
        assert!((0..w.len()).all(|i| mask.as_slice()[i] || w[i] == 0.0));
        assert!(initial_mask(Method::Srigl, "l", 10, 5, 9, &mut rng).is_err());
        let m = initial_mask(Method::Rigl, "l", 10, 5, 17, &mut rng).unwrap();
        assert_eq!(m.nnz(), 17);
    }
}
