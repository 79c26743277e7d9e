//! The baselines sharing LBC's groups and export: SR-STE and one-shot magnitude N:M as NVIDIA's
//! ASP runs it (docs/algorithms.md §8).

use sparse_formats::{Mask, NmPattern};

use crate::LbcError;

fn check(rows: usize, fan_in: usize, pattern: NmPattern, len: usize) -> Result<(), LbcError> {
    pattern.validate(fan_in)?;
    if len != rows * fan_in {
        return Err(LbcError::Shape(format!(
            "{len} weights for a [{rows}, {fan_in}] layer"
        )));
    }
    Ok(())
}

/// ASP's prune epoch for a run of `epochs` epochs when none is configured: half of them, at
/// least 1 and at most `epochs − 1`. ASP trains the dense model, prunes it once and fine-tunes
/// with the original schedule again (about 2× the dense budget); within one run of `epochs`
/// epochs that is half dense, half fine-tuning. A 1-epoch run prunes at initialisation.
pub fn default_prune_epoch(epochs: usize) -> usize {
    (epochs / 2).max(1).min(epochs.saturating_sub(1))
}

/// The N:M magnitude mask: in every group, the N largest `|W|` (ties: smaller position).
///
/// This is SR-STE's mask, recomputed from the dense weights at every forward pass, and the
/// one-shot magnitude pruning of NVIDIA's ASP recipe (train dense, prune once, then fine-tune
/// with the mask fixed).
pub fn magnitude_mask(
    weights: &[f32],
    rows: usize,
    fan_in: usize,
    pattern: NmPattern,
) -> Result<Mask, LbcError> {
    check(rows, fan_in, pattern, weights.len())?;
    let mut bits = vec![false; rows * fan_in];
    let mut members: Vec<usize> = Vec::with_capacity(pattern.m);
    for r in 0..rows {
        for g in 0..pattern.groups(fan_in) {
            members.clear();
            members.extend((0..pattern.m).map(|p| r * fan_in + pattern.column(g, p)));
            members.sort_by(|&a, &b| {
                weights[b]
                    .abs()
                    .total_cmp(&weights[a].abs())
                    .then(a.cmp(&b))
            });
            for &j in &members[..pattern.n] {
                bits[j] = true;
            }
        }
    }
    Ok(Mask::new(rows, fan_in, bits)?)
}

/// SR-STE's gradient for the dense weights: `g_W̃ + λ_W · (1 − E) ⊙ W`, where `g_W̃` is the
/// gradient of the masked weight (passed to every position: the straight-through estimator) and
/// the second term pulls the currently pruned weights towards zero. Reference default
/// `λ_W = 2e-4`. Apply it to the unscaled gradient (under loss scaling the reference's
/// in-backward term silently vanishes).
pub fn srste_grad(
    weights: &[f32],
    grad_masked: &[f32],
    mask: &Mask,
    lambda_w: f32,
) -> Result<Vec<f32>, LbcError> {
    if weights.len() != grad_masked.len() || weights.len() != mask.len() {
        return Err(LbcError::Shape(format!(
            "weights {}, gradient {}, mask {} entries",
            weights.len(),
            grad_masked.len(),
            mask.len()
        )));
    }
    Ok(weights
        .iter()
        .zip(grad_masked)
        .zip(mask.as_slice())
        .map(|((&w, &g), &e)| if e { g } else { g + lambda_w * w })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_mask_keeps_n_largest_per_group() {
        let w = [0.1, -3.0, 2.0, 0.5, /* */ 1.0, 1.0, -1.0, 0.0];
        let m = magnitude_mask(&w, 1, 8, NmPattern::new(2, 4)).unwrap();
        assert_eq!(m.render(), ".##.##..\n", "ties go to the smaller position");
        let conv = NmPattern {
            n: 1,
            m: 2,
            group_stride: 2,
        };
        // Groups pair columns (0,2) and (1,3).
        let m = magnitude_mask(&[1.0, 5.0, 2.0, 4.0], 1, 4, conv).unwrap();
        assert_eq!(m.render(), ".##.\n");
        assert!(magnitude_mask(&w, 1, 8, NmPattern::new(3, 3)).is_err());
    }

    #[test]
    fn srste_adds_decay_on_pruned_weights_only() {
        let mask = Mask::parse("#.").unwrap();
        let g = srste_grad(&[2.0, 3.0], &[0.5, 0.25], &mask, 0.1).unwrap();
        assert_eq!(g, vec![0.5, 0.25 + 0.1 * 3.0]);
        assert!(srste_grad(&[1.0], &[1.0, 2.0], &mask, 0.1).is_err());
    }
}
