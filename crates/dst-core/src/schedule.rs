//! When masks change and how much: the update schedule (docs/algorithms.md §3, §4).
//!
//! Conventions we follow (the PyTorch ports `rigl-torch` / `condensed-sparsity`, i.e. the SRigL
//! reference):
//! - `step` counts optimiser steps taken so far; the sparsifier runs **after** the optimiser
//!   step, so an update uses the post-step weights and the dense gradient of the mini-batch just
//!   consumed, and no optimiser step is skipped (Google's TF RigL instead skips the weight update
//!   on update iterations);
//! - the first update fires at `step = ΔT` (not at 0, as in Google's code), and `T_end` is
//!   exclusive: updates at `ΔT, 2ΔT, … < T_end`.

use serde::{Deserialize, Serialize};

use crate::error::{DstError, Result};

/// The default `T_end` as a fraction of training: mask updates stop after three quarters of
/// the optimiser steps (the RigL/SRigL papers' setting).
pub const T_END_FRACTION: f64 = 0.75;

/// How the drop fraction decays from α.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Anneal {
    /// `α/2 · (1 + cos(π t / T_end))` — the RigL/SRigL paper schedule (default).
    #[default]
    Cosine,
    /// `α` throughout (Google's flag default for ImageNet/CIFAR, not the paper's).
    Constant,
    /// `α · (1 − t / T_end)`.
    Linear,
}

/// Mask-update schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UpdateSchedule {
    /// ΔT: optimiser steps between updates (default 100).
    pub delta_t: usize,
    /// T_end: no update at or after this step (typically 75% of training).
    pub t_end: usize,
    /// α: initial drop fraction (default 0.3).
    pub alpha: f64,
    /// Decay of the drop fraction.
    pub anneal: Anneal,
    /// Dense-gradient accumulation window: the gradient RigL and SRigL grow by at an update is
    /// the mean of the dense gradients of the last `grad_accumulation` steps (the update step
    /// and the ones before it), as the references' `grad_accumulation_n` does; 1 = the update
    /// step's gradient alone (default). At most ΔT.
    #[serde(default = "one")]
    pub grad_accumulation: usize,
}

fn one() -> usize {
    1
}

impl UpdateSchedule {
    /// ΔT = 100, α = 0.3, cosine, with the given `T_end`.
    pub fn new(t_end: usize) -> Self {
        UpdateSchedule {
            delta_t: 100,
            t_end,
            alpha: 0.3,
            anneal: Anneal::Cosine,
            grad_accumulation: 1,
        }
    }

    /// The defaults for a run of `total_steps` optimiser steps: `T_end` at [`T_END_FRACTION`].
    pub fn for_run(total_steps: usize) -> Self {
        UpdateSchedule::new((T_END_FRACTION * total_steps as f64) as usize)
    }

    /// Checks `ΔT ≥ 1`, `0 ≤ α ≤ 1` and `1 ≤ grad_accumulation ≤ ΔT`.
    pub fn validate(&self) -> Result<()> {
        if self.delta_t == 0 {
            return Err(DstError::Config {
                field: "delta_t",
                reason: "must be at least 1".into(),
            });
        }
        if !(1..=self.delta_t).contains(&self.grad_accumulation) {
            return Err(DstError::Config {
                field: "grad_accumulation",
                reason: format!(
                    "{} is outside [1, ΔT = {}] (steps whose dense gradients an update averages)",
                    self.grad_accumulation, self.delta_t
                ),
            });
        }
        if !(self.alpha.is_finite() && (0.0..=1.0).contains(&self.alpha)) {
            return Err(DstError::Config {
                field: "alpha",
                reason: format!("drop fraction {} is outside [0, 1]", self.alpha),
            });
        }
        Ok(())
    }

    /// Whether the masks update after optimiser step `step` (1-based count).
    pub fn is_update_step(&self, step: usize) -> bool {
        step > 0 && step.is_multiple_of(self.delta_t) && step < self.t_end
    }

    /// Whether the dense gradient of step `step` enters an update: `step` is an update step
    /// or one of the `grad_accumulation − 1` steps before one.
    pub fn in_accumulation_window(&self, step: usize) -> bool {
        (step..step + self.grad_accumulation).any(|u| self.is_update_step(u))
    }

    /// Drop fraction α_t at `step`.
    pub fn drop_fraction(&self, step: usize) -> f64 {
        let t = (step as f64 / self.t_end.max(1) as f64).min(1.0);
        match self.anneal {
            Anneal::Cosine => self.alpha / 2.0 * (1.0 + (std::f64::consts::PI * t).cos()),
            Anneal::Constant => self.alpha,
            Anneal::Linear => self.alpha * (1.0 - t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_steps_start_at_delta_t_and_stop_before_t_end() {
        let s = UpdateSchedule {
            delta_t: 10,
            ..UpdateSchedule::new(35)
        };
        let steps: Vec<usize> = (0..50).filter(|&t| s.is_update_step(t)).collect();
        assert_eq!(steps, vec![10, 20, 30]);
        let w = UpdateSchedule {
            grad_accumulation: 3,
            ..s
        };
        let window: Vec<usize> = (0..50).filter(|&t| w.in_accumulation_window(t)).collect();
        assert_eq!(window, vec![8, 9, 10, 18, 19, 20, 28, 29, 30]);
        let one: Vec<usize> = (0..50).filter(|&t| s.in_accumulation_window(t)).collect();
        assert_eq!(one, steps);
    }

    #[test]
    fn drop_fraction_decays() {
        let s = UpdateSchedule::new(1000);
        assert!((s.drop_fraction(0) - 0.3).abs() < 1e-12);
        assert!((s.drop_fraction(500) - 0.15).abs() < 1e-12);
        assert!(s.drop_fraction(1000).abs() < 1e-12);
        assert!(s.drop_fraction(2000).abs() < 1e-12);
        let l = UpdateSchedule {
            anneal: Anneal::Linear,
            ..s
        };
        assert!((l.drop_fraction(250) - 0.225).abs() < 1e-12);
        let c = UpdateSchedule {
            anneal: Anneal::Constant,
            ..s
        };
        assert_eq!(c.drop_fraction(999), 0.3);
    }

    #[test]
    fn validation() {
        assert!(UpdateSchedule::new(10).validate().is_ok());
        let bad = UpdateSchedule {
            delta_t: 0,
            ..UpdateSchedule::new(10)
        };
        assert!(bad.validate().is_err());
        let bad = UpdateSchedule {
            alpha: 1.5,
            ..UpdateSchedule::new(10)
        };
        assert!(bad.validate().is_err());
        for (n, ok) in [(0, false), (1, true), (10, true), (11, false)] {
            let s = UpdateSchedule {
                delta_t: 10,
                grad_accumulation: n,
                ..UpdateSchedule::new(10)
            };
            assert_eq!(s.validate().is_ok(), ok, "{n}");
        }
    }
}
