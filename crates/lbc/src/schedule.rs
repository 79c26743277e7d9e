//! LBC's gradual removal schedule (docs/algorithms.md §7.5).

/// How many combinations each group keeps, epoch by epoch:
/// `K(e) = 1 + ⌈(C − 1) · (1 − (e − t_i) / (t_f − t_i))^p⌉` for `t_i ≤ e < t_f`, 1 from `t_f`.
///
/// Deliberate difference: before `t_i` every combination is kept (`K = C`); the reference has
/// no branch for `e < t_i` and crashes for `t_i > 0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RemovalSchedule {
    /// First epoch of removal (reference default 0).
    pub t_i: usize,
    /// Epoch from which one combination is left (ResNet README 60, code default 80).
    pub t_f: usize,
    /// Exponent p (3 for ResNet, 4 for DeiT).
    pub power: f64,
}

impl Default for RemovalSchedule {
    fn default() -> Self {
        RemovalSchedule {
            t_i: 0,
            t_f: 60,
            power: 3.0,
        }
    }
}

/// The default `t_f` as a fraction of the run's epochs when none is given: one half, as the
/// reference's README reproduction command for its ResNet runs (`--t_f 60` of 120 epochs; its
/// `options.py` default is 80, i.e. ⅔). Until issue #18 the default was ¾, which neither uses.
pub const T_F_FRACTION: f64 = 0.5;

impl RemovalSchedule {
    /// `t_f` for a run of `epochs` epochs when none is configured: [`T_F_FRACTION`] of them,
    /// at least 1, and at most `epochs − 1` (the last epoch, 0-based), so that the masks reach
    /// N:M within the run (a 1-epoch run prunes to N:M at once).
    pub fn default_t_f(epochs: usize) -> usize {
        ((T_F_FRACTION * epochs as f64) as usize)
            .max(1)
            .min(epochs.saturating_sub(1))
    }

    /// Checks the exponent (finite, > 0), `t_i ≤ t_f` and, for a run of `epochs` epochs,
    /// `t_f ≤ epochs − 1` (at `t_f` the masks become N:M; later, the run would end with its
    /// masks still denser than N:M); the error names the setting (`lbc_power`, `lbc_t_i`,
    /// `lbc_t_f`) and its valid range.
    pub fn validate_for(&self, epochs: usize) -> Result<(), (&'static str, String)> {
        self.validate()?;
        if self.t_f >= epochs {
            return Err((
                "lbc_t_f",
                format!(
                    "{} is not before the end of the run: the masks become N:M at epoch t_f \
                     (0-based), so 0 ≤ t_f ≤ epochs − 1 = {}",
                    self.t_f,
                    epochs.saturating_sub(1)
                ),
            ));
        }
        Ok(())
    }

    /// Checks the exponent (finite, > 0) and `t_i ≤ t_f`; the error names the setting
    /// (`lbc_power`, `lbc_t_i`) and its valid range.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.power.is_finite() && self.power > 0.0) {
            return Err(("lbc_power", format!("{} is outside (0, ∞)", self.power)));
        }
        if self.t_i > self.t_f {
            return Err((
                "lbc_t_i",
                format!("{} is after t_f = {} (0 ≤ t_i ≤ t_f)", self.t_i, self.t_f),
            ));
        }
        Ok(())
    }

    /// Combinations kept per group at `epoch` (0-based), out of `c`.
    pub fn kept(&self, c: usize, epoch: usize) -> usize {
        if epoch < self.t_i {
            return c;
        }
        if epoch >= self.t_f || self.t_f <= self.t_i {
            return 1;
        }
        let frac = 1.0 - (epoch - self.t_i) as f64 / (self.t_f - self.t_i) as f64;
        let k = 1 + ((c - 1) as f64 * frac.powf(self.power)).ceil() as usize;
        k.min(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (epoch at which K changes, new K), epochs 0..=60, as listed in docs/algorithms.md §7.5.
    fn changes(c: usize, s: RemovalSchedule) -> Vec<(usize, usize)> {
        let mut out = vec![(0, s.kept(c, 0))];
        for e in 1..=s.t_f {
            let k = s.kept(c, e);
            if k != out.last().unwrap().1 {
                out.push((e, k));
            }
        }
        out
    }

    #[test]
    fn timelines_match_the_reference_notes() {
        let s = RemovalSchedule::default();
        assert_eq!(
            changes(6, s),
            vec![(0, 6), (5, 5), (10, 4), (16, 3), (25, 2), (60, 1)]
        );
        assert_eq!(changes(4, s), vec![(0, 4), (8, 3), (19, 2), (60, 1)]);
        assert_eq!(
            changes(16, s),
            vec![
                (0, 16),
                (2, 15),
                (3, 14),
                (5, 13),
                (6, 12),
                (8, 11),
                (10, 10),
                (12, 9),
                (14, 8),
                (16, 7),
                (19, 6),
                (22, 5),
                (25, 4),
                (30, 3),
                (36, 2),
                (60, 1)
            ]
        );
        let s80 = RemovalSchedule { t_f: 80, ..s };
        assert_eq!(
            changes(6, s80),
            vec![(0, 6), (6, 5), (13, 4), (22, 3), (34, 2), (80, 1)]
        );
        // 2:8: 2 by epoch 41, 10 by 19, 3 by 35.
        assert_eq!(s.kept(28, 41), 2);
        assert_eq!(s.kept(28, 19), 10);
        assert_eq!(s.kept(28, 35), 3);
    }

    #[test]
    fn late_start_does_not_crash() {
        let s = RemovalSchedule {
            t_i: 10,
            t_f: 20,
            power: 3.0,
        };
        assert_eq!(s.kept(6, 0), 6);
        assert_eq!(s.kept(6, 9), 6);
        assert_eq!(s.kept(6, 10), 6);
        assert_eq!(s.kept(6, 20), 1);
        assert!((10..20).all(|e| s.kept(6, e) >= s.kept(6, e + 1)));
    }

    #[test]
    fn the_default_t_f_ends_inside_the_run_and_a_later_one_is_refused() {
        assert_eq!(RemovalSchedule::default_t_f(1), 0);
        assert_eq!(RemovalSchedule::default_t_f(2), 1);
        assert_eq!(RemovalSchedule::default_t_f(4), 2);
        assert_eq!(RemovalSchedule::default_t_f(20), 10);
        assert_eq!(
            RemovalSchedule::default_t_f(120),
            60,
            "the reference's README setting"
        );
        for epochs in 1..40 {
            let s = RemovalSchedule {
                t_i: 0,
                t_f: RemovalSchedule::default_t_f(epochs),
                power: 3.0,
            };
            assert!(s.validate_for(epochs).is_ok(), "{epochs} epochs");
            assert_eq!(
                s.kept(6, epochs - 1),
                1,
                "N:M by the last epoch of {epochs}"
            );
        }
        let late = RemovalSchedule {
            t_i: 0,
            t_f: 5,
            power: 3.0,
        };
        let (field, reason) = late.validate_for(5).unwrap_err();
        assert_eq!(field, "lbc_t_f");
        assert!(reason.contains("epochs − 1 = 4"), "{reason}");
        assert!(late.validate_for(6).is_ok());
    }
}
