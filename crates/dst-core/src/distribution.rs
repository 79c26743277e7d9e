//! Layer-wise sparsity distributions: uniform, Erdős–Rényi (ER) and ER-Kernel (ERK), with exact
//! integer budgets (docs/algorithms.md §2).
//!
//! Conventions (the SRigL reference `condensed-sparsity`, which our users compare with):
//! - layers the user keeps dense **count** in the global budget, so the global density over all
//!   layers is the target (Google's RigL instead leaves its "custom" layers out of the sum);
//! - ERK/ER solve for ε with the dense-layer spill-over loop: while some layer would get a
//!   density above 1, the layer(s) with the largest raw score become dense — **all layers tied
//!   at the maximum at once**, as Google does (the PyTorch ports move only the first; ties are
//!   rare, and moving them one at a time would make the result depend on layer order);
//! - a layer's budget is `B = N − floor(s·N)` non-zeros, and its constant fan-in is
//!   `k = B / active_rows` (integer division), an error when it would be 0.

use serde::{Deserialize, Serialize};

use crate::error::{DstError, Result};

fn one() -> f64 {
    1.0
}

/// How the global sparsity is spread over layers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum Distribution {
    /// Every sparse layer gets the same sparsity (dense-kept layers compensated).
    Uniform,
    /// Erdős–Rényi: raw score `(n_in + n_out) / (n_in · n_out)` on the two channel dimensions
    /// (`shape[0]`, `shape[1]` of a PyTorch-layout weight).
    ErdosRenyi,
    /// Erdős–Rényi-Kernel: raw score `(Σ dims / Π dims)^power_scale` over all dimensions
    /// (`power_scale = 1` is the RigL/SRigL default, 0 gives uniform).
    Erk {
        /// The exponent τ (default 1).
        #[serde(default = "one")]
        power_scale: f64,
    },
}

impl Default for Distribution {
    fn default() -> Self {
        Distribution::Erk { power_scale: 1.0 }
    }
}

/// A sparsifiable layer as the distribution sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Name (for messages and reports).
    pub name: String,
    /// Weight shape in PyTorch layout: `[out, in]` or `[out, in/groups, kh, kw]`.
    pub shape: Vec<usize>,
    /// Kept dense by the user.
    pub dense: bool,
}

impl LayerSpec {
    /// A layer to sparsify.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        LayerSpec {
            name: name.into(),
            shape: shape.to_vec(),
            dense: false,
        }
    }

    /// Number of weights.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows of the `[rows, fan_in]` view (output neurons).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Fan-in of the `[rows, fan_in]` view.
    pub fn fan_in(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// What a layer gets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerBudget {
    /// Layer name.
    pub name: String,
    /// Rows (output neurons).
    pub rows: usize,
    /// Dense fan-in.
    pub fan_in: usize,
    /// Target sparsity of the layer (0 for dense layers).
    pub sparsity: f64,
    /// Non-zero budget `B = N − floor(s·N)`.
    pub budget: usize,
    /// True if the layer is dense (kept by the user or by ERK spill-over).
    pub dense: bool,
}

impl LayerBudget {
    /// The constant fan-in for `active_rows` non-ablated rows: `B / active_rows`.
    pub fn fan_in_for(&self, active_rows: usize) -> Result<usize> {
        let k = self.budget.checked_div(active_rows).unwrap_or(0);
        if k == 0 {
            return Err(DstError::ZeroFanIn {
                layer: self.name.clone(),
                budget: self.budget,
                rows: active_rows,
            });
        }
        Ok(k.min(self.fan_in))
    }
}

fn budget_of(numel: usize, sparsity: f64) -> usize {
    // floor(s·N) zeros; the small epsilon keeps 0.9·1000 from flooring to 899.
    let zeros = ((sparsity * numel as f64) + 1e-9).floor() as usize;
    numel - zeros.min(numel)
}

/// Spreads a global `sparsity` over `layers`.
pub fn allocate(
    layers: &[LayerSpec],
    sparsity: f64,
    dist: Distribution,
) -> Result<Vec<LayerBudget>> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(DstError::Sparsity(sparsity));
    }
    for l in layers {
        if l.shape.len() < 2 || l.numel() == 0 {
            return Err(DstError::layer(
                &l.name,
                format!("shape {:?} is not a weight with rows and fan-in", l.shape),
            ));
        }
    }
    let n = |i: usize| layers[i].numel() as f64;
    let mut dense: Vec<bool> = layers.iter().map(|l| l.dense).collect();
    let density: Vec<f64> = match dist {
        Distribution::Uniform => {
            let total: f64 = (0..layers.len()).map(n).sum();
            let n_dense: f64 = (0..layers.len()).filter(|&i| dense[i]).map(n).sum();
            let n_sparse = total - n_dense;
            let allowed = total * (1.0 - sparsity);
            if n_dense > allowed || (n_sparse > 0.0 && n_dense >= allowed) {
                return Err(DstError::Config {
                    field: "sparsity",
                    reason: format!(
                        "the dense-kept layers alone ({n_dense} weights) use up the budget of \
                         {allowed:.0} weights at sparsity {sparsity}"
                    ),
                });
            }
            let d = if n_sparse > 0.0 {
                (allowed - n_dense) / n_sparse
            } else {
                1.0
            };
            (0..layers.len())
                .map(|i| if dense[i] { 1.0 } else { d.min(1.0) })
                .collect()
        }
        Distribution::ErdosRenyi | Distribution::Erk { .. } => {
            let raw: Vec<f64> = layers
                .iter()
                .map(|l| match dist {
                    Distribution::ErdosRenyi => {
                        let (o, i) = (l.shape[0] as f64, l.shape[1] as f64);
                        (o + i) / (o * i)
                    }
                    Distribution::Erk { power_scale } => {
                        let s: f64 = l.shape.iter().map(|&d| d as f64).sum();
                        (s / l.numel() as f64).powf(power_scale)
                    }
                    Distribution::Uniform => unreachable!(),
                })
                .collect();
            let zeros = |i: usize| ((sparsity * n(i)) + 1e-9).floor();
            let eps = loop {
                let (mut rhs, mut divisor) = (0.0, 0.0);
                for i in 0..layers.len() {
                    if dense[i] {
                        rhs -= zeros(i);
                    } else {
                        rhs += n(i) - zeros(i);
                        divisor += raw[i] * n(i);
                    }
                }
                if divisor == 0.0 {
                    break 0.0;
                }
                let eps = rhs / divisor;
                let max_raw = (0..layers.len())
                    .filter(|&i| !dense[i])
                    .map(|i| raw[i])
                    .fold(f64::MIN, f64::max);
                if eps * max_raw > 1.0 {
                    for i in 0..layers.len() {
                        if !dense[i] && raw[i] == max_raw {
                            dense[i] = true;
                        }
                    }
                } else {
                    break eps;
                }
            };
            if eps <= 0.0 && dense.iter().any(|d| !d) {
                return Err(DstError::Config {
                    field: "sparsity",
                    reason: format!("no weights left for the sparse layers at sparsity {sparsity}"),
                });
            }
            (0..layers.len())
                .map(|i| if dense[i] { 1.0 } else { eps * raw[i] })
                .collect()
        }
    };
    Ok(layers
        .iter()
        .zip(density)
        .zip(&dense)
        .map(|((l, d), &is_dense)| {
            let s = if is_dense || d >= 1.0 { 0.0 } else { 1.0 - d };
            LayerBudget {
                name: l.name.clone(),
                rows: l.rows(),
                fan_in: l.fan_in(),
                sparsity: s,
                budget: budget_of(l.numel(), s),
                dense: is_dense || d >= 1.0,
            }
        })
        .collect())
}

/// Achieved global sparsity when each sparse layer uses `rows · (B / rows)` weights (constant
/// fan-in flooring, SRigL) and dense layers all their weights.
pub fn achieved_sparsity_constant_fan_in(budgets: &[LayerBudget]) -> f64 {
    let total: usize = budgets.iter().map(|b| b.rows * b.fan_in).sum();
    let used: usize = budgets
        .iter()
        .map(|b| {
            if b.dense {
                b.rows * b.fan_in
            } else {
                b.rows * (b.budget / b.rows)
            }
        })
        .sum();
    1.0 - used as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mlp(widths: &[usize]) -> Vec<LayerSpec> {
        widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| LayerSpec::new(format!("fc{}", i + 1), &[w[1], w[0]]))
            .collect()
    }

    /// The ERK table of the RigL/SRigL references (784-1000-1000-1000-10; docs/algorithms.md §2).
    #[test]
    fn erk_matches_the_reference_table() {
        let layers = mlp(&[784, 1000, 1000, 1000, 10]);
        let cases = [
            (
                0.80,
                [(0.784, 169), (0.810, 189), (0.810, 189)],
                None,
                0.8006,
            ),
            (0.90, [(0.894, 83), (0.907, 93), (0.907, 93)], None, 0.9001),
            (0.95, [(0.949, 40), (0.955, 44), (0.955, 44)], None, 0.9506),
            (
                0.99,
                [(0.991, 7), (0.992, 8), (0.992, 8)],
                Some((0.585, 415)),
                0.9903,
            ),
        ];
        for (s, sparse, last, achieved) in cases {
            let b = allocate(&layers, s, Distribution::default()).unwrap();
            for (i, (sl, k)) in sparse.iter().enumerate() {
                assert!(
                    (b[i].sparsity - sl).abs() < 5e-4,
                    "S={s} layer {i}: {}",
                    b[i].sparsity
                );
                assert_eq!(b[i].fan_in_for(b[i].rows).unwrap(), *k, "S={s} layer {i}");
            }
            match last {
                None => assert!(b[3].dense, "S={s}: the head should be dense"),
                Some((sl, k)) => {
                    assert!((b[3].sparsity - sl).abs() < 5e-4, "{}", b[3].sparsity);
                    assert_eq!(b[3].fan_in_for(10).unwrap(), k);
                }
            }
            let a = achieved_sparsity_constant_fan_in(&b);
            assert!((a - achieved).abs() < 1e-4, "S={s}: achieved {a}");
        }
    }

    /// LeNet-300-100 figures of the same section.
    #[test]
    fn erk_lenet_300_100() {
        let layers = mlp(&[784, 300, 100, 10]);
        let b = allocate(&layers, 0.90, Distribution::default()).unwrap();
        let got: Vec<(String, usize)> = b
            .iter()
            .map(|l| (format!("{:.3}", l.sparsity), l.fan_in_for(l.rows).unwrap()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("0.920".into(), 62),
                ("0.770".into(), 69),
                ("0.000".into(), 100)
            ]
        );
        let b = allocate(&layers, 0.99, Distribution::default()).unwrap();
        let ks: Vec<usize> = b.iter().map(|l| l.fan_in_for(l.rows).unwrap()).collect();
        assert_eq!(ks, vec![6, 6, 18]);
    }

    #[test]
    fn uniform_compensates_dense_layers_and_budgets_are_exact() {
        let mut layers = mlp(&[100, 50, 10]);
        let b = allocate(&layers, 0.5, Distribution::Uniform).unwrap();
        assert_eq!(b[0].budget, 2500);
        assert_eq!(b[1].budget, 250);
        layers[1].dense = true;
        let b = allocate(&layers, 0.5, Distribution::Uniform).unwrap();
        // 5500 weights, 2750 allowed, the dense 500 leave 2250 for the first layer.
        assert!(b[1].dense && b[1].budget == 500);
        assert_eq!(b[0].budget, 2250);
        layers[0].dense = true;
        assert!(allocate(&layers, 0.5, Distribution::Uniform).is_err());
    }

    #[test]
    fn er_uses_the_channel_dimensions_only() {
        let layers = vec![
            LayerSpec::new("conv", &[16, 8, 3, 3]),
            LayerSpec::new("fc", &[10, 64]),
        ];
        let er = allocate(&layers, 0.8, Distribution::ErdosRenyi).unwrap();
        let erk = allocate(&layers, 0.8, Distribution::default()).unwrap();
        // Same total budget, different split.
        let total = |b: &[LayerBudget]| b.iter().map(|l| l.budget).sum::<usize>();
        assert!(total(&er).abs_diff(total(&erk)) <= 2);
        assert_ne!(er[0].budget, erk[0].budget);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let layers = mlp(&[4, 2]);
        assert!(matches!(
            allocate(&layers, 1.0, Distribution::Uniform),
            Err(DstError::Sparsity(_))
        ));
        assert!(allocate(&layers, -0.1, Distribution::Uniform).is_err());
        let tiny = allocate(&mlp(&[4, 8]), 0.9, Distribution::Uniform).unwrap();
        // 32 weights, floor(28.8) = 28 zeros, 4 left for 8 rows: k = 0.
        assert!(matches!(
            tiny[0].fan_in_for(8),
            Err(DstError::ZeroFanIn {
                budget: 4,
                rows: 8,
                ..
            })
        ));
        assert_eq!(tiny[0].fan_in_for(4).unwrap(), 1);
        assert!(allocate(&[LayerSpec::new("b", &[5])], 0.5, Distribution::Uniform).is_err());
    }
}
