//! LBC, "learning best combination" (Zhang, Lin et al., NeurIPS 2022): one learnable score per
//! (group, N-of-M combination), the mask as the union of the surviving combinations, scores
//! trained through a straight-through estimator, combinations removed gradually by lowest
//! signed score (docs/algorithms.md §7).
//!
//! Two exact formulations share one interface, [`LbcState`]:
//! - [`DirectScores`]: the reference's table of `G · C(M,N)` scores (plus their momentum);
//! - [`AccumulatedScores`]: per-weight accumulators and one alive bit per combination — exact
//!   under SGD with momentum and L2 decay (docs/algorithms.md §7.4), and the only feasible one for 4:16 or 8:16,
//!   whose tables run to gigabytes.
//!
//! Deliberate differences from the reference (docs/algorithms.md §7.5): an explicit alive flag
//! instead of "score exactly 0 means removed" (whose interaction with momentum can revive removed
//! combinations); ties in removal broken by combination index; scores frozen once one
//! combination is left.

use sparse_formats::{Mask, NmPattern};

use crate::combinations::{binomial, combinations, initial_score};
use crate::LbcError;

/// SGD settings of the scores, PyTorch's rule: `d = g + λ·α`, `b = μ·b + d`, then `α -= lr·d'`
/// with `d' = d + μ·b` (Nesterov) or `d' = b`. The reference's ResNet runs use the weights'
/// SGD (momentum 0.9, wd 1e-4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreSgd {
    /// Learning rate.
    pub lr: f32,
    /// Momentum.
    pub momentum: f32,
    /// L2 weight decay on the scores.
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// AdamW settings of the scores (the reference's DeiT runs train them with the weights'
/// AdamW): decoupled decay `α -= lr·λ·α`, then `α -= lr·m̂/(√v̂ + ε)` with bias-corrected moments,
/// as `dst_core::optim::MaskedAdamW` does for weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreAdamW {
    /// Learning rate.
    pub lr: f32,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

/// The optimizer of the scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreOpt {
    /// SGD with momentum (both formulations; the accumulated one is exact only for SGD).
    Sgd(ScoreSgd),
    /// AdamW (direct score tables only).
    AdamW(ScoreAdamW),
}

impl ScoreOpt {
    /// Sets the learning rate (the scores follow the weights' schedule).
    pub fn set_lr(&mut self, lr: f32) {
        match self {
            ScoreOpt::Sgd(s) => s.lr = lr,
            ScoreOpt::AdamW(a) => a.lr = lr,
        }
    }
}

impl From<ScoreSgd> for ScoreOpt {
    fn from(s: ScoreSgd) -> Self {
        ScoreOpt::Sgd(s)
    }
}

impl ScoreSgd {
    /// One step of one value `x` with momentum buffer `b` and gradient `g` (f64 for the
    /// accumulated formulation's shared term).
    #[inline]
    fn apply(&self, x: f64, b: &mut f64, g: f64) -> f64 {
        let (mu, wd) = (self.momentum as f64, self.weight_decay as f64);
        let d = g + wd * x;
        *b = mu * *b + d;
        let d = if self.nesterov { d + mu * *b } else { *b };
        x - self.lr as f64 * d
    }

    #[inline]
    fn apply32(&self, x: &mut f32, b: &mut f32, g: f32) {
        let d = g + self.weight_decay * *x;
        *b = self.momentum * *b + d;
        let d = if self.nesterov {
            d + self.momentum * *b
        } else {
            *b
        };
        *x -= self.lr * d;
    }
}

/// What both formulations offer to a training loop.
pub trait LbcState {
    /// The N:M pattern and group layout.
    fn pattern(&self) -> NmPattern;
    /// `[rows, fan_in]`.
    fn shape(&self) -> (usize, usize);
    /// The current mask: in each group, the union of the positions of its alive combinations.
    fn mask(&self) -> Mask;
    /// One optimizer step of the alive scores from `weights` and the gradient of the
    /// **masked** weight `g_W̃` (both `[rows, fan_in]`): `∂L/∂α[g,k] = Σ_{j∈k} W_j · g_W̃,j`
    /// (the straight-through estimator of docs/algorithms.md §7.3). With `freeze`, a state with
    /// one combination left per group no longer steps (the reference's ResNet script; its DeiT
    /// script keeps training the scores — here that changes no mask, removals being permanent).
    /// The accumulated formulation refuses AdamW.
    fn step(
        &mut self,
        weights: &[f32],
        grad_masked: &[f32],
        opt: ScoreOpt,
        freeze: bool,
    ) -> Result<(), LbcError>;
    /// Keeps, in every group, the `k` alive combinations with the largest signed score (ties:
    /// smaller combination index); removals are permanent.
    fn remove_to(&mut self, k: usize);
    /// Alive combinations in the group with most of them.
    fn max_alive(&self) -> usize;
    /// The whole state as named `f64` vectors (exact for every field: scores, momenta,
    /// accumulators, alive flags as 0/1), for checkpoints.
    fn export_state(&self) -> Vec<(String, Vec<f64>)>;
    /// Restores what [`LbcState::export_state`] gave; fails naming a missing or mis-sized field.
    fn import_state(&mut self, state: &[(String, Vec<f64>)]) -> Result<(), LbcError>;
}

fn field<'a>(
    state: &'a [(String, Vec<f64>)],
    name: &str,
    len: usize,
) -> Result<&'a [f64], LbcError> {
    let v = state
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
        .ok_or_else(|| LbcError::Shape(format!("LBC state: missing field `{name}`")))?;
    if v.len() != len {
        return Err(LbcError::Shape(format!(
            "LBC state: field `{name}` has {} values, expected {len}",
            v.len()
        )));
    }
    Ok(v)
}

/// Alive flags packed 32 to a value (`alive_bits`: bit `i % 32` of value `i / 32`, each an
/// integer in `[0, 2³²)`, exact in `f64`): 1/256 of one `f64` per flag.
fn pack_alive(n: usize, alive: impl Fn(usize) -> bool) -> Vec<f64> {
    (0..n.div_ceil(32))
        .map(|w| {
            let bits = (0..32.min(n - 32 * w))
                .filter(|&b| alive(32 * w + b))
                .fold(0u32, |acc, b| acc | 1 << b);
            f64::from(bits)
        })
        .collect()
}

/// The `n` alive flags of a state: `alive_bits` as [`pack_alive`] writes it, or `alive` (one
/// value per flag, 0 = removed) as checkpoints written before the packing hold them.
fn unpack_alive(state: &[(String, Vec<f64>)], n: usize) -> Result<Vec<bool>, LbcError> {
    if state.iter().any(|(name, _)| name == "alive_bits") {
        let words = field(state, "alive_bits", n.div_ceil(32))?;
        let mut out = Vec::with_capacity(n);
        for (w, &v) in words.iter().enumerate() {
            if !((0.0..4_294_967_296.0).contains(&v) && v.fract() == 0.0) {
                return Err(LbcError::Shape(format!(
                    "LBC state: field `alive_bits` value {w} is {v}, not an integer in [0, 2^32)"
                )));
            }
            let bits = v as u32;
            out.extend((0..32.min(n - 32 * w)).map(|b| bits >> b & 1 == 1));
        }
        return Ok(out);
    }
    Ok(field(state, "alive", n)?
        .iter()
        .map(|&x| x != 0.0)
        .collect())
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub(crate) struct Layout {
    pub pattern: NmPattern,
    pub rows: usize,
    pub fan_in: usize,
    pub combos: Vec<Vec<u8>>,
}

impl Layout {
    pub fn new(rows: usize, fan_in: usize, pattern: NmPattern) -> Result<Self, LbcError> {
        pattern.validate(fan_in)?;
        let (n, m) = (pattern.n, pattern.m);
        let count = binomial(m, n);
        if count > crate::MAX_COMBINATIONS {
            return Err(LbcError::TooManyCombinations {
                n,
                m,
                combinations: count,
                limit: crate::MAX_COMBINATIONS,
            });
        }
        let groups = (rows as u64).saturating_mul((fan_in / m) as u64);
        let entries = groups.saturating_mul(count);
        if entries > crate::MAX_TABLE_ENTRIES {
            return Err(LbcError::TableTooLarge {
                n,
                m,
                rows,
                fan_in,
                entries,
                limit: crate::MAX_TABLE_ENTRIES,
            });
        }
        Ok(Layout {
            pattern,
            rows,
            fan_in,
            combos: combinations(pattern.m, pattern.n),
        })
    }
    pub fn groups_per_row(&self) -> usize {
        self.fan_in / self.pattern.m
    }
    pub fn groups(&self) -> usize {
        self.rows * self.groups_per_row()
    }
    /// Flat weight index of member `p` of group `gi` (row-major over rows, then groups).
    #[inline]
    pub fn index(&self, gi: usize, p: usize) -> usize {
        let gpr = self.groups_per_row();
        let (r, g) = (gi / gpr, gi % gpr);
        r * self.fan_in + self.pattern.column(g, p)
    }
    pub fn check(&self, what: &str, len: usize) -> Result<(), LbcError> {
        if len == self.rows * self.fan_in {
            Ok(())
        } else {
            Err(LbcError::Shape(format!(
                "{what} has {len} entries, the layer has {}",
                self.rows * self.fan_in
            )))
        }
    }
    pub fn mask_from(&self, alive: impl Fn(usize, usize) -> bool) -> Mask {
        let mut bits = vec![false; self.rows * self.fan_in];
        for gi in 0..self.groups() {
            for (k, combo) in self.combos.iter().enumerate() {
                if alive(gi, k) {
                    for &p in combo {
                        bits[self.index(gi, p as usize)] = true;
                    }
                }
            }
        }
        Mask::new(self.rows, self.fan_in, bits).expect("shape is consistent")
    }
}

/// Keeps the `k` largest of `scores` among `alive` entries (ties: smaller index).
fn keep_top(scores: impl Fn(usize) -> f64, alive: &mut [bool], k: usize) {
    let mut idx: Vec<usize> = (0..alive.len()).filter(|&i| alive[i]).collect();
    if idx.len() <= k {
        return;
    }
    idx.sort_by(|&a, &b| scores(b).total_cmp(&scores(a)).then(a.cmp(&b)));
    for &i in &idx[k..] {
        alive[i] = false;
    }
}

/// The reference's formulation: a score and a momentum per (group, combination).
pub struct DirectScores {
    layout: Layout,
    scores: Vec<f32>,
    /// SGD's momentum buffer, or AdamW's first moment.
    momentum: Vec<f32>,
    /// AdamW's second moment (empty until AdamW steps).
    second: Vec<f32>,
    /// AdamW steps taken (bias correction).
    adam_t: u64,
    alive: Vec<bool>,
}

impl DirectScores {
    /// Scores of a `[rows, fan_in]` layer, all `1 / C(M−1, N−1)` (dense start). Refuses tables
    /// above `max_scores` entries (use [`AccumulatedScores`]).
    pub fn new(
        rows: usize,
        fan_in: usize,
        pattern: NmPattern,
        max_scores: usize,
    ) -> Result<Self, LbcError> {
        let layout = Layout::new(rows, fan_in, pattern)?;
        let total = (layout.groups() as u64).saturating_mul(binomial(pattern.m, pattern.n));
        if total > max_scores as u64 {
            return Err(LbcError::TooLarge {
                scores: total,
                limit: max_scores,
            });
        }
        let n = total as usize;
        Ok(DirectScores {
            scores: vec![initial_score(pattern.m, pattern.n); n],
            momentum: vec![0.0; n],
            second: Vec::new(),
            adam_t: 0,
            alive: vec![true; n],
            layout,
        })
    }

    /// Score of combination `k` of group `gi`.
    pub fn score(&self, gi: usize, k: usize) -> f32 {
        self.scores[gi * self.layout.combos.len() + k]
    }

    /// The score gradient `∂L/∂α` (zero for removed combinations).
    pub fn score_grad(&self, weights: &[f32], grad_masked: &[f32]) -> Vec<f32> {
        let c = self.layout.combos.len();
        let mut g = vec![0.0f32; self.scores.len()];
        for gi in 0..self.layout.groups() {
            for (k, combo) in self.layout.combos.iter().enumerate() {
                if self.alive[gi * c + k] {
                    g[gi * c + k] = combo
                        .iter()
                        .map(|&p| {
                            let j = self.layout.index(gi, p as usize);
                            weights[j] * grad_masked[j]
                        })
                        .sum();
                }
            }
        }
        g
    }
}

impl LbcState for DirectScores {
    fn pattern(&self) -> NmPattern {
        self.layout.pattern
    }
    fn shape(&self) -> (usize, usize) {
        (self.layout.rows, self.layout.fan_in)
    }
    fn mask(&self) -> Mask {
        let c = self.layout.combos.len();
        self.layout.mask_from(|gi, k| self.alive[gi * c + k])
    }
    fn step(
        &mut self,
        weights: &[f32],
        grad_masked: &[f32],
        opt: ScoreOpt,
        freeze: bool,
    ) -> Result<(), LbcError> {
        self.layout.check("weights", weights.len())?;
        self.layout.check("gradient", grad_masked.len())?;
        if freeze && self.max_alive() <= 1 {
            return Ok(()); // frozen after t_f, as the reference's ResNet script
        }
        let g = self.score_grad(weights, grad_masked);
        match opt {
            ScoreOpt::Sgd(s) => {
                let it = self
                    .scores
                    .iter_mut()
                    .zip(&mut self.momentum)
                    .zip(&self.alive)
                    .zip(g);
                for (((score, mom), &alive), g) in it {
                    if alive {
                        s.apply32(score, mom, g);
                    }
                }
            }
            ScoreOpt::AdamW(a) => {
                if self.second.is_empty() {
                    self.second = vec![0.0; self.scores.len()];
                }
                self.adam_t += 1;
                let bc1 = 1.0 - a.beta1.powf(self.adam_t as f32);
                let bc2 = 1.0 - a.beta2.powf(self.adam_t as f32);
                let it = self
                    .scores
                    .iter_mut()
                    .zip(&mut self.momentum)
                    .zip(&mut self.second)
                    .zip(&self.alive)
                    .zip(g);
                for ((((score, m1), m2), &alive), g) in it {
                    if alive {
                        *m1 = a.beta1 * *m1 + (1.0 - a.beta1) * g;
                        *m2 = a.beta2 * *m2 + (1.0 - a.beta2) * g * g;
                        let update = (*m1 / bc1) / ((*m2 / bc2).sqrt() + a.eps);
                        *score = *score * (1.0 - a.lr * a.weight_decay) - a.lr * update;
                    }
                }
            }
        }
        Ok(())
    }
    fn remove_to(&mut self, k: usize) {
        let c = self.layout.combos.len();
        for gi in 0..self.layout.groups() {
            let sc = &self.scores[gi * c..(gi + 1) * c];
            keep_top(
                |i| sc[i] as f64,
                &mut self.alive[gi * c..(gi + 1) * c],
                k.max(1),
            );
        }
    }
    fn max_alive(&self) -> usize {
        let c = self.layout.combos.len();
        self.alive
            .chunks(c)
            .map(|a| a.iter().filter(|&&x| x).count())
            .max()
            .unwrap_or(0)
    }
    fn export_state(&self) -> Vec<(String, Vec<f64>)> {
        let mut v = vec![
            ("scores".into(), to_f64(&self.scores)),
            ("momentum".into(), to_f64(&self.momentum)),
            (
                "alive_bits".into(),
                pack_alive(self.alive.len(), |i| self.alive[i]),
            ),
        ];
        if !self.second.is_empty() {
            v.push(("second_moment".into(), to_f64(&self.second)));
            v.push(("adam_steps".into(), vec![self.adam_t as f64]));
        }
        v
    }
    fn import_state(&mut self, state: &[(String, Vec<f64>)]) -> Result<(), LbcError> {
        let n = self.scores.len();
        let (scores, momentum, alive) = (
            field(state, "scores", n)?,
            field(state, "momentum", n)?,
            unpack_alive(state, n)?,
        );
        self.scores = scores.iter().map(|&x| x as f32).collect();
        self.momentum = momentum.iter().map(|&x| x as f32).collect();
        self.alive = alive;
        (self.second, self.adam_t) = (Vec::new(), 0);
        if state.iter().any(|(name, _)| name == "second_moment") {
            self.second = field(state, "second_moment", n)?
                .iter()
                .map(|&x| x as f32)
                .collect();
            let t = field(state, "adam_steps", 1)?[0];
            if !(t >= 0.0 && t.fract() == 0.0 && t < 1e15) {
                return Err(LbcError::Shape(format!(
                    "LBC state: field `adam_steps` is {t}, not a step count"
                )));
            }
            self.adam_t = t as u64;
        }
        Ok(())
    }
}

/// The memory-light exact formulation of docs/algorithms.md §7.4: under SGD with momentum μ and L2 decay λ, every
/// alive score equals `c(t) + Σ_{j∈k} a_j(t)`, where `a_j` is a per-weight accumulator driven by
/// `h_j = W_j · g_W̃,j` with the same recursion and `c(t)` one scalar shared by all groups
/// (they all start at `1/C(M−1,N−1)`). Memory: two floats per weight plus one bit per
/// (group, combination), instead of three floats per (group, combination).
pub struct AccumulatedScores {
    layout: Layout,
    acc: Vec<f32>,
    acc_momentum: Vec<f32>,
    common: f64,
    common_momentum: f64,
    /// One bit per (group, combination), `words_per_group` words a group.
    alive: Vec<u64>,
    words_per_group: usize,
}

impl AccumulatedScores {
    /// State of a `[rows, fan_in]` layer (dense start).
    pub fn new(rows: usize, fan_in: usize, pattern: NmPattern) -> Result<Self, LbcError> {
        let layout = Layout::new(rows, fan_in, pattern)?;
        let c = layout.combos.len();
        let words_per_group = c.div_ceil(64);
        let mut alive = vec![u64::MAX; layout.groups() * words_per_group];
        if c % 64 != 0 {
            for gi in 0..layout.groups() {
                alive[gi * words_per_group + words_per_group - 1] = (1u64 << (c % 64)) - 1;
            }
        }
        Ok(AccumulatedScores {
            acc: vec![0.0; rows * fan_in],
            acc_momentum: vec![0.0; rows * fan_in],
            common: initial_score(pattern.m, pattern.n) as f64,
            common_momentum: 0.0,
            alive,
            words_per_group,
            layout,
        })
    }

    fn is_alive(&self, gi: usize, k: usize) -> bool {
        self.alive[gi * self.words_per_group + k / 64] >> (k % 64) & 1 == 1
    }

    /// Score of combination `k` of group `gi`: `c + Σ_{j∈k} a_j`.
    pub fn score(&self, gi: usize, k: usize) -> f64 {
        self.common
            + self.layout.combos[k]
                .iter()
                .map(|&p| self.acc[self.layout.index(gi, p as usize)] as f64)
                .sum::<f64>()
    }
}

impl LbcState for AccumulatedScores {
    fn pattern(&self) -> NmPattern {
        self.layout.pattern
    }
    fn shape(&self) -> (usize, usize) {
        (self.layout.rows, self.layout.fan_in)
    }
    fn mask(&self) -> Mask {
        self.layout.mask_from(|gi, k| self.is_alive(gi, k))
    }
    fn step(
        &mut self,
        weights: &[f32],
        grad_masked: &[f32],
        opt: ScoreOpt,
        freeze: bool,
    ) -> Result<(), LbcError> {
        self.layout.check("weights", weights.len())?;
        self.layout.check("gradient", grad_masked.len())?;
        let ScoreOpt::Sgd(s) = opt else {
            return Err(LbcError::Shape(
                "LBC's accumulated score formulation is exact only under SGD; AdamW scores need \
                 the direct table (a smaller N:M pattern or layer)"
                    .into(),
            ));
        };
        if freeze && self.max_alive() <= 1 {
            return Ok(());
        }
        // Every update is linear in the gradients (SGD, momentum, Nesterov, L2 decay), so a
        // score's step is the sum of its members' accumulator steps plus the shared term's.
        for j in 0..self.acc.len() {
            s.apply32(
                &mut self.acc[j],
                &mut self.acc_momentum[j],
                weights[j] * grad_masked[j],
            );
        }
        self.common = s.apply(self.common, &mut self.common_momentum, 0.0);
        Ok(())
    }
    fn remove_to(&mut self, k: usize) {
        let c = self.layout.combos.len();
        for gi in 0..self.layout.groups() {
            let mut alive: Vec<bool> = (0..c).map(|i| self.is_alive(gi, i)).collect();
            if alive.iter().filter(|&&a| a).count() <= k {
                continue;
            }
            let scores: Vec<f64> = (0..c)
                .map(|i| if alive[i] { self.score(gi, i) } else { 0.0 })
                .collect();
            keep_top(|i| scores[i], &mut alive, k.max(1));
            let w = &mut self.alive[gi * self.words_per_group..(gi + 1) * self.words_per_group];
            w.iter_mut().for_each(|x| *x = 0);
            for (i, &a) in alive.iter().enumerate() {
                if a {
                    w[i / 64] |= 1 << (i % 64);
                }
            }
        }
    }
    fn max_alive(&self) -> usize {
        self.alive
            .chunks(self.words_per_group)
            .map(|w| w.iter().map(|x| x.count_ones() as usize).sum())
            .max()
            .unwrap_or(0)
    }
    fn export_state(&self) -> Vec<(String, Vec<f64>)> {
        let c = self.layout.combos.len();
        let alive = pack_alive(self.layout.groups() * c, |i| self.is_alive(i / c, i % c));
        vec![
            ("acc".into(), to_f64(&self.acc)),
            ("acc_momentum".into(), to_f64(&self.acc_momentum)),
            ("common".into(), vec![self.common, self.common_momentum]),
            ("alive_bits".into(), alive),
        ]
    }
    fn import_state(&mut self, state: &[(String, Vec<f64>)]) -> Result<(), LbcError> {
        let (n, c) = (self.acc.len(), self.layout.combos.len());
        let acc = field(state, "acc", n)?;
        let mom = field(state, "acc_momentum", n)?;
        let common = field(state, "common", 2)?;
        let alive = unpack_alive(state, self.layout.groups() * c)?;
        self.acc = acc.iter().map(|&x| x as f32).collect();
        self.acc_momentum = mom.iter().map(|&x| x as f32).collect();
        (self.common, self.common_momentum) = (common[0], common[1]);
        self.alive.iter_mut().for_each(|w| *w = 0);
        for (i, &a) in alive.iter().enumerate() {
            if a {
                let (gi, k) = (i / c, i % c);
                self.alive[gi * self.words_per_group + k / 64] |= 1 << (k % 64);
            }
        }
        Ok(())
    }
}

/// Picks the formulation: the direct table when it stays under `max_scores` entries, the
/// accumulated one otherwise (exact for SGD; the direct one is what the reference does). Scores
/// trained with AdamW (`opt`) need the direct table: a larger one is an error.
pub fn lbc_state(
    rows: usize,
    fan_in: usize,
    pattern: NmPattern,
    max_scores: usize,
    opt: ScoreOpt,
) -> Result<Box<dyn LbcState + Send>, LbcError> {
    match DirectScores::new(rows, fan_in, pattern, max_scores) {
        Ok(d) => Ok(Box::new(d)),
        Err(LbcError::TooLarge { .. }) if matches!(opt, ScoreOpt::Sgd(_)) => {
            Ok(Box::new(AccumulatedScores::new(rows, fan_in, pattern)?))
        }
        Err(e) => Err(e),
    }
}
