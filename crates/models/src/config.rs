//! The training configuration: one serde struct, so that a run is described by a file (TOML or
//! JSON) and every field can be overridden from a command line.
//!
//! Every setting has one default and one validation: the defaults of the dst-core and lbc
//! settings are those crates' own ([`dst_core::SriglParams`], [`dst_core::UpdateSchedule`],
//! [`dst_core::schedule::T_END_FRACTION`], [`dst_core::optim::SgdConfig`],
//! [`lbc::schedule::T_F_FRACTION`]); [`TrainConfig::validate`] is the one validation pass
//! (optimizer settings through [`OptimizerConfig::validate`]), run by the trainer and by the
//! CLI before any file is written. Every table's fields are optional; an unknown key anywhere is
//! an error naming its path ([`TrainConfig::from_toml`], [`TrainConfig::from_json`]).

use std::path::PathBuf;

use dst_core::optim::OptimizerConfig;
use dst_core::{Distribution, NoSparsity, SparseParam, Sparsifier, SparsifierConfig, Sparsify};
use lbc::lbc::{ScoreAdamW, ScoreOpt, ScoreSgd};
use lbc::schedule::RemovalSchedule;
use lbc::training::{NmMethod, NmSparsifier};
use serde::{Deserialize, Serialize};
use sparse_formats::NmPattern;

use crate::data::DatasetName;
use crate::error::{config_err, Result};
use crate::nets::{BuiltLayers, LayerKind, ModelConfig};

/// Everything that defines a run. Missing fields take the defaults of
/// [`TrainConfig::default`] (LeNet-300-100, SRigL 90% ERK, Fashion-MNIST, 20 epochs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The architecture.
    pub model: ModelConfig,
    /// The data set.
    pub data: DataConfig,
    /// The sparse-training method and its parameters.
    pub method: MethodConfig,
    /// Epochs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Optimizer (SGD with momentum / Nesterov / weight decay, or AdamW) and its peak
    /// learning rate.
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule.
    pub lr_schedule: LrSchedule,
    /// Label smoothing ε (0 = plain cross-entropy).
    pub label_smoothing: f64,
    /// Seed of initialisation, masks, shuffling and the validation split.
    pub seed: u64,
    /// Worker threads (`None`: all cores). Results do not depend on it.
    pub threads: Option<usize>,
    /// How sparse layers are trained: `dense-mask` (dense weights times a mask, as every public
    /// implementation) or `sparse` (linear weights in sparse storage between mask updates; dst
    /// methods only).
    pub engine: EngineKind,
    /// Write a checkpoint every this many epochs when the run has an output folder (0: only at
    /// the end). A checkpoint is also written when a run is stopped.
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: ModelConfig::lenet_300_100(),
            data: DataConfig::default(),
            method: MethodConfig::default(),
            epochs: 20,
            batch_size: 128,
            optimizer: OptimizerConfig::default(),
            lr_schedule: LrSchedule::default(),
            label_smoothing: 0.0,
            seed: 1,
            threads: None,
            engine: EngineKind::Auto,
            checkpoint_every: 1,
        }
    }
}

/// The training engine of sparse layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// The faster of the two for this run ([`TrainConfig::engine_for_run`]): the sparse engine
    /// for SRigL at ≥ 90% sparsity on an MLP, the dense-mask engine otherwise.
    Auto,
    /// Dense weights multiplied by a mask.
    DenseMask,
    /// Linear and conv weights of density ≤ [`crate::engine::MAX_SPARSE_DENSITY`] stored sparse
    /// (condensed for constant fan-in, CSR otherwise) between mask updates; the dense gradient
    /// only at mask-update steps. N:M layers (LBC, one-shot) move there once their masks are
    /// final (`dst_core::Sparsify::masks_final`); SR-STE cannot use it.
    Sparse,
}

/// Where the data come from and how they are split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// The data set.
    pub name: DatasetName,
    /// Explicit folder (searched before `$DST_DATA_DIR`, `./data/<name>` and the Debian
    /// package's location).
    pub dir: Option<PathBuf>,
    /// Train on the first `limit` training examples only.
    pub limit: Option<usize>,
    /// Fraction of the training set held out for validation (seeded split; 0 = none).
    pub validation_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            name: DatasetName::FashionMnist,
            dir: None,
            limit: None,
            validation_fraction: 0.0,
        }
    }
}

/// The methods the trainer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MethodName {
    /// Dense training.
    Dense,
    /// Fixed random sparse mask.
    Static,
    /// SET (magnitude drop, random grow).
    Set,
    /// RigL (magnitude drop, gradient grow).
    Rigl,
    /// SRigL (RigL under constant fan-in, with neuron ablation).
    Srigl,
    /// LBC N:M.
    Lbc,
    /// SR-STE N:M.
    Srste,
    /// One-shot magnitude N:M as NVIDIA's ASP runs it: dense, prune once, fine-tune.
    NmMagnitude,
}

impl MethodName {
    /// Every method, in documentation order.
    pub const ALL: [MethodName; 8] = [
        MethodName::Dense,
        MethodName::Static,
        MethodName::Set,
        MethodName::Rigl,
        MethodName::Srigl,
        MethodName::Lbc,
        MethodName::Srste,
        MethodName::NmMagnitude,
    ];

    /// The dst-core method, for the unstructured / constant fan-in ones.
    pub fn dst(self) -> Option<dst_core::Method> {
        Some(match self {
            MethodName::Static => dst_core::Method::Static,
            MethodName::Set => dst_core::Method::Set,
            MethodName::Rigl => dst_core::Method::Rigl,
            MethodName::Srigl => dst_core::Method::Srigl,
            _ => return None,
        })
    }

    /// True for the N:M methods (LBC, SR-STE, one-shot magnitude).
    pub fn is_nm(self) -> bool {
        matches!(
            self,
            MethodName::Lbc | MethodName::Srste | MethodName::NmMagnitude
        )
    }

    /// The kebab-case name used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            MethodName::Dense => "dense",
            MethodName::Static => "static",
            MethodName::Set => "set",
            MethodName::Rigl => "rigl",
            MethodName::Srigl => "srigl",
            MethodName::Lbc => "lbc",
            MethodName::Srste => "srste",
            MethodName::NmMagnitude => "nm-magnitude",
        }
    }
}

impl std::str::FromStr for MethodName {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        MethodName::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown method `{s}` (one of: {})",
                    MethodName::ALL.map(|m| m.as_str()).join(", ")
                )
            })
    }
}

/// How a dst method initialises the weights its initial masks keep (docs/algorithms.md §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitKind {
    /// Sparse He: every kept weight redrawn from `N(0, 2/k)`, `k` its row's active fan-in (the
    /// SRigL reference's sparse initialisation, with its std fixed to `√(2/k)`).
    SparseHe,
    /// The layer's dense initialisation, masked (what the RigL, SET and Static references do).
    Dense,
}

impl InitKind {
    /// The kebab-case name used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            InitKind::SparseHe => "sparse-he",
            InitKind::Dense => "dense",
        }
    }
}

/// Which optimizer trains LBC's scores (docs/algorithms.md §7.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LbcScores {
    /// The weights' optimizer and its settings (SGD's momentum, Nesterov and weight decay, or
    /// AdamW's betas, ε and weight decay), as the reference does.
    Weights,
    /// SGD with momentum 0.9, weight decay 1e-4, no Nesterov, whatever the weights use (what
    /// this toolkit did before issue #18).
    Sgd,
}

/// The method and its parameters; fields that do not apply to the chosen method are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodConfig {
    /// Which method.
    pub name: MethodName,
    /// Global target sparsity in `[0, 1)` (dst methods).
    pub sparsity: f64,
    /// How the sparsity is spread over layers (dst methods).
    pub distribution: Distribution,
    /// Mask-update period ΔT in optimizer steps.
    pub delta_t: usize,
    /// Initial drop fraction α (cosine-annealed).
    pub alpha: f64,
    /// Mask updates stop at this fraction of the run (T_end = fraction · total steps).
    pub t_end_fraction: f64,
    /// RigL/SRigL: an update grows by the mean dense gradient of this many steps (the update
    /// step and the ones before it), `1 ≤ n ≤ delta_t`; 1 = the update step's alone.
    pub grad_accumulation: usize,
    /// SRigL's γ_sal.
    pub gamma_sal: f64,
    /// SRigL's dynamic neuron ablation.
    pub ablation: bool,
    /// Initialisation of the kept weights (dst methods; `None`: the method's reference,
    /// [`MethodConfig::init_for_method`]).
    pub init: Option<InitKind>,
    /// Weight names kept dense (e.g. `fc1.weight`). Dst methods count them in the global
    /// budget; N:M methods build them as ordinary dense layers (needed for a stem whose fan-in
    /// has no N:M groups, e.g. ResNet-18's `conv1.weight` on 3 input channels).
    pub dense_layers: Vec<String>,
    /// Weight names protected from ablation (`None`: the output layer).
    pub protected_layers: Option<Vec<String>>,
    /// N of N:M.
    pub n: usize,
    /// M of N:M.
    pub m: usize,
    /// LBC: first epoch of combination removal.
    pub lbc_t_i: usize,
    /// LBC: epoch from which one combination is left (`None`: [`lbc::schedule::T_F_FRACTION`]
    /// of the epochs).
    pub lbc_t_f: Option<usize>,
    /// LBC: exponent of the removal schedule.
    pub lbc_power: f64,
    /// LBC: the scores' optimizer (at the weights' learning rate, every step).
    pub lbc_scores: LbcScores,
    /// LBC: stop training the scores once one combination is left per group (`None`: when
    /// they train with SGD, as the reference's ResNet script; with AdamW they keep training,
    /// as its DeiT script — which changes no mask here, removals being permanent).
    pub lbc_freeze_scores: Option<bool>,
    /// SR-STE's λ_W.
    pub srste_lambda: f32,
    /// nm-magnitude (ASP): epochs of dense training before the trained weights are pruned once
    /// to N:M by magnitude; the remaining epochs fine-tune with the mask fixed, the optimizer
    /// state reset and the learning-rate schedule restarted, as ASP does. 0 prunes the
    /// initialisation (magnitude pruning at init). `None`: half the epochs
    /// ([`lbc::baselines::default_prune_epoch`]).
    pub nm_prune_epoch: Option<usize>,
}

impl Default for MethodConfig {
    fn default() -> Self {
        let schedule = dst_core::UpdateSchedule::new(0);
        let srigl = dst_core::SriglParams::default();
        let removal = RemovalSchedule::default();
        MethodConfig {
            name: MethodName::Srigl,
            sparsity: 0.9,
            distribution: Distribution::default(),
            delta_t: schedule.delta_t,
            alpha: schedule.alpha,
            t_end_fraction: dst_core::schedule::T_END_FRACTION,
            grad_accumulation: schedule.grad_accumulation,
            gamma_sal: srigl.gamma_sal,
            ablation: srigl.ablation,
            init: None,
            dense_layers: Vec::new(),
            protected_layers: None,
            n: 2,
            m: 4,
            lbc_t_i: removal.t_i,
            lbc_t_f: None,
            lbc_power: removal.power,
            lbc_scores: LbcScores::Weights,
            lbc_freeze_scores: None,
            srste_lambda: 2e-4,
            nm_prune_epoch: None,
        }
    }
}

impl MethodConfig {
    /// The initialisation this run uses: `init` if set, else the method's reference — sparse He
    /// for SRigL (its reference re-initialises sparsely), the dense initialisation masked for
    /// RigL, SET and Static (their references), irrelevant to the others.
    pub fn init_for_method(&self) -> InitKind {
        self.init.unwrap_or(match self.name.dst() {
            Some(d) if d.reference_sparse_init() => InitKind::SparseHe,
            _ => InitKind::Dense,
        })
    }
}

/// Shape of the learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrKind {
    /// Constant.
    Constant,
    /// Multiplied by `gamma` at each milestone epoch.
    Step,
    /// Cosine decay to 0 at the last step.
    Cosine,
}

/// Learning-rate schedule: linear warm-up, then constant, step or cosine. The optimizer's own
/// `lr` is the peak.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrSchedule {
    /// The shape after warm-up.
    pub kind: LrKind,
    /// Warm-up length in epochs (may be fractional); the rate rises linearly to the peak.
    pub warmup_epochs: f64,
    /// Epochs at which a step schedule multiplies the rate by `gamma`.
    pub milestones: Vec<usize>,
    /// Step factor.
    pub gamma: f64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule {
            kind: LrKind::Cosine,
            warmup_epochs: 0.0,
            milestones: Vec::new(),
            gamma: 0.1,
        }
    }
}

impl LrSchedule {
    /// The rate used for the optimizer step that follows `step` completed steps.
    pub fn lr(&self, peak: f64, step: usize, steps_per_epoch: usize, total_steps: usize) -> f64 {
        let warm = (self.warmup_epochs * steps_per_epoch as f64).round() as usize;
        if step < warm {
            return peak * (step + 1) as f64 / warm as f64;
        }
        match self.kind {
            LrKind::Constant => peak,
            LrKind::Step => {
                let epoch = step / steps_per_epoch.max(1);
                let passed = self.milestones.iter().filter(|&&m| epoch >= m).count();
                peak * self.gamma.powi(passed as i32)
            }
            LrKind::Cosine => {
                let span = total_steps.saturating_sub(warm).max(1) as f64;
                let t = (step - warm) as f64 / span;
                peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// A number that must be finite and in a range.
fn check_range(
    field: &'static str,
    v: f64,
    ok: impl Fn(f64) -> bool,
    range: &str,
) -> std::result::Result<(), (&'static str, String)> {
    if v.is_finite() && ok(v) {
        Ok(())
    } else {
        Err((field, format!("{v} is outside {range}")))
    }
}

/// The largest width of a layer (an MLP's hidden width, ResNet's first-stage channels, a ViT's
/// embedding or MLP width) a config may ask for.
pub const MAX_WIDTH: usize = 1 << 16;

/// The most epochs a config may ask for.
pub const MAX_EPOCHS: usize = 1_000_000;

/// The largest batch a config may ask for.
pub const MAX_BATCH: usize = 1 << 20;

/// Checks `v` against `1..=max`, naming the field.
fn check_count(
    field: &'static str,
    v: usize,
    max: usize,
) -> std::result::Result<(), (&'static str, String)> {
    if (1..=max).contains(&v) {
        Ok(())
    } else {
        Err((field, format!("{v} is outside [1, {max}]")))
    }
}

/// Every size of a model, bounded before anything is allocated (a config or a checkpoint can
/// hold any number).
pub(crate) fn check_model(m: &ModelConfig) -> std::result::Result<(), (&'static str, String)> {
    match m {
        ModelConfig::Mlp { hidden } => {
            if hidden.len() > 64 {
                return Err((
                    "model.hidden",
                    format!("{} hidden layers, at most 64", hidden.len()),
                ));
            }
            for &h in hidden {
                check_count("model.hidden", h, MAX_WIDTH)?;
            }
            Ok(())
        }
        ModelConfig::Lenet5 => Ok(()),
        ModelConfig::Resnet18 { width } => check_count("model.width", *width, 1024),
        ModelConfig::Vit {
            patch,
            dim,
            depth,
            heads,
            mlp_dim,
        } => {
            check_count("model.patch", *patch, 1024)?;
            check_count("model.dim", *dim, MAX_WIDTH)?;
            check_count("model.depth", *depth, 1024)?;
            check_count("model.heads", *heads, *dim)?;
            check_count("model.mlp_dim", *mlp_dim, MAX_WIDTH)
        }
    }
}

impl TrainConfig {
    /// Reads a TOML config; an unknown or malformed key is an error naming its path (e.g.
    /// `optimizer.momentun: unknown field`).
    pub fn from_toml(text: &str) -> std::result::Result<TrainConfig, String> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| e.message().to_string())?;
        serde_path_to_error::deserialize(de).map_err(|e| path_error(e.path(), e.inner().message()))
    }

    /// Reads a JSON config (see [`TrainConfig::from_toml`]).
    pub fn from_json(text: &str) -> std::result::Result<TrainConfig, String> {
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de)
            .map_err(|e| path_error(e.path(), &e.inner().to_string()))
    }

    /// Checks every field that can be checked without the data; the error names the field and
    /// its valid range. The one validation pass of a configuration.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        let m = &self.method;
        check_count("epochs", self.epochs, MAX_EPOCHS)?;
        check_count("batch_size", self.batch_size, MAX_BATCH)?;
        check_model(&self.model)?;
        if m.name.is_nm() && (m.n == 0 || m.n > m.m) {
            return Err((
                "method.n",
                format!("N:M needs 0 < N ≤ M, got {}:{}", m.n, m.m),
            ));
        }
        check_range(
            "method.t_end_fraction",
            m.t_end_fraction,
            |v| (0.0..=1.0).contains(&v),
            "[0, 1]",
        )?;
        // The dst-core and lbc settings are checked by their own crates' validation (the
        // sparsifier settings of every method, so that a typo fails whichever method runs).
        let mut sc = SparsifierConfig::new(dst_core::Method::Static, m.sparsity, 1);
        self.copy_dst_settings(&mut sc, 1);
        sc.validate().map_err(|e| match e {
            dst_core::DstError::Config { field, reason } => (method_field(field), reason),
            other => ("method", other.to_string()),
        })?;
        let removal = self.removal_schedule();
        match m.name {
            // The epochs bound matters only to the method that follows the schedule.
            MethodName::Lbc => removal.validate_for(self.epochs),
            _ => removal.validate(),
        }
        .map_err(|(f, r)| (method_field(f), r))?;
        if let (MethodName::NmMagnitude, Some(p)) = (m.name, m.nm_prune_epoch) {
            if p >= self.epochs {
                return Err((
                    "method.nm_prune_epoch",
                    format!(
                        "{p} is not before the end of the run: 0 ≤ nm_prune_epoch ≤ epochs − 1 = {}",
                        self.epochs - 1
                    ),
                ));
            }
        }
        check_range(
            "method.srste_lambda",
            m.srste_lambda.into(),
            |v| v >= 0.0,
            "[0, ∞)",
        )?;
        check_range(
            "data.validation_fraction",
            self.data.validation_fraction,
            |v| (0.0..1.0).contains(&v),
            "[0, 1)",
        )?;
        check_range(
            "label_smoothing",
            self.label_smoothing,
            |v| (0.0..1.0).contains(&v),
            "[0, 1)",
        )?;
        check_range(
            "lr_schedule.warmup_epochs",
            self.lr_schedule.warmup_epochs,
            |v| v >= 0.0,
            "[0, ∞)",
        )?;
        check_range(
            "lr_schedule.gamma",
            self.lr_schedule.gamma,
            |v| v > 0.0,
            "(0, ∞)",
        )?;
        if self.engine == EngineKind::Sparse
            && ((m.name.dst().is_none() && !m.name.is_nm()) || m.name == MethodName::Srste)
        {
            return Err((
                "engine",
                format!(
                    "the sparse engine trains dst methods (static, set, rigl, srigl) and N:M \
                     layers once their masks are final (lbc from t_f, nm-magnitude after the \
                     prune), not `{}`",
                    m.name.as_str()
                ),
            ));
        }
        if self.threads == Some(0) {
            return Err(("threads", "must be at least 1".into()));
        }
        self.optimizer.validate().map_err(|e| match e {
            dst_core::DstError::Config { field, reason } => (optimizer_field(field), reason),
            other => ("optimizer", other.to_string()),
        })
    }

    /// The engine this run trains with: `Auto` resolved by what the train bench measured
    /// (`cargo bench -p models --bench train -- --engine-rule`, docs/benchmarks.md "Which
    /// engine `auto` picks"). The decision is per layer: in a sparse-engine run a layer goes to
    /// sparse storage when its mask's density is at most [`crate::engine::MAX_SPARSE_DENSITY`]
    /// (the measured crossover of the kernels against the GEMMs) and otherwise trains exactly
    /// as dense-mask. So `Auto` is the sparse engine for every method it trains — Static, SET,
    /// RigL, SRigL at any sparsity, and nm-magnitude / LBC whose N:M density `n / m` is at most
    /// that limit (2:4 keeps every layer dense, so it stays dense-mask) — on the models the bench
    /// measures (MLPs, LeNet-5, ResNet-18): there it trained 1.1–4.6× faster than dense-mask
    /// whenever a layer went sparse and the same otherwise. The ViT (not measured), SR-STE and
    /// dense training run dense-mask.
    pub fn engine_for_run(&self) -> EngineKind {
        match self.engine {
            EngineKind::Auto => {
                let measured = matches!(
                    self.model,
                    ModelConfig::Mlp { .. } | ModelConfig::Lenet5 | ModelConfig::Resnet18 { .. }
                );
                let m = &self.method;
                let sparse_method = m.name.dst().is_some()
                    || (matches!(m.name, MethodName::Lbc | MethodName::NmMagnitude)
                        && m.n as f64 <= crate::engine::MAX_SPARSE_DENSITY * m.m as f64);
                if measured && sparse_method {
                    EngineKind::Sparse
                } else {
                    EngineKind::DenseMask
                }
            }
            e => e,
        }
    }

    /// The optimizer's peak learning rate.
    pub fn peak_lr(&self) -> f64 {
        self.optimizer.lr()
    }

    /// The kind of layers the network of this run is built from.
    pub(crate) fn layer_kind(&self) -> LayerKind {
        if self.method.name.is_nm() {
            LayerKind::Nm
        } else if self.engine_for_run() == EngineKind::Sparse {
            LayerKind::Engine
        } else {
            LayerKind::Dst
        }
    }

    /// The dst-core sparsifier settings of this run (dst methods) for `total_steps` steps.
    pub fn sparsifier_config(&self, total_steps: usize) -> Option<SparsifierConfig> {
        let m = &self.method;
        let mut sc = SparsifierConfig::new(m.name.dst()?, m.sparsity, total_steps);
        self.copy_dst_settings(&mut sc, total_steps);
        Some(sc)
    }

    /// The one place the method's dst settings become dst-core's.
    fn copy_dst_settings(&self, sc: &mut SparsifierConfig, total_steps: usize) {
        let m = &self.method;
        sc.distribution = m.distribution;
        sc.schedule.delta_t = m.delta_t;
        sc.schedule.alpha = m.alpha;
        sc.schedule.grad_accumulation = m.grad_accumulation;
        sc.schedule.t_end = (m.t_end_fraction * total_steps as f64) as usize;
        sc.seed = self.seed;
        sc.dense_layers = m.dense_layers.clone();
        sc.protected_layers = m.protected_layers.clone();
        sc.srigl.gamma_sal = m.gamma_sal;
        sc.srigl.ablation = m.ablation;
        sc.sparse_init = m.init_for_method() == InitKind::SparseHe;
    }

    /// nm-magnitude's (ASP's) prune epoch of this run; `None` for other methods.
    pub fn nm_prune_epoch(&self) -> Option<usize> {
        (self.method.name == MethodName::NmMagnitude).then(|| {
            self.method
                .nm_prune_epoch
                .unwrap_or_else(|| lbc::baselines::default_prune_epoch(self.epochs))
        })
    }

    /// The first step (0-based count of completed steps) of the phase holding `step` and the
    /// phase's length, in a run of `total_steps` steps of `steps_per_epoch`: one phase, or for
    /// nm-magnitude (ASP) the dense phase and the fine-tuning phase, each with the whole
    /// learning-rate schedule and (the trainer resets it) a fresh optimizer.
    pub fn phase(&self, step: usize, steps_per_epoch: usize, total_steps: usize) -> (usize, usize) {
        match self.nm_prune_epoch() {
            Some(p) if p > 0 => {
                let split = (p * steps_per_epoch).min(total_steps);
                if step < split {
                    (0, split)
                } else {
                    (split, total_steps - split)
                }
            }
            _ => (0, total_steps),
        }
    }

    /// The learning rate of the optimizer step that follows `step` completed steps: the
    /// schedule over the step's [`TrainConfig::phase`].
    pub fn lr_at(&self, step: usize, steps_per_epoch: usize, total_steps: usize) -> f64 {
        let (start, len) = self.phase(step, steps_per_epoch, total_steps);
        self.lr_schedule
            .lr(self.peak_lr(), step - start, steps_per_epoch, len)
    }

    /// LBC's score optimizer of this run (`method.lbc_scores`), at the peak learning rate (the
    /// trainer sets the scheduled rate every step).
    pub fn lbc_score_optimizer(&self) -> ScoreOpt {
        let lr = self.peak_lr() as f32;
        match (self.method.lbc_scores, &self.optimizer) {
            (LbcScores::Weights, OptimizerConfig::Sgd(c)) => ScoreOpt::Sgd(ScoreSgd {
                lr,
                momentum: c.momentum as f32,
                weight_decay: c.weight_decay as f32,
                nesterov: c.nesterov,
            }),
            (LbcScores::Weights, OptimizerConfig::AdamW(c)) => ScoreOpt::AdamW(ScoreAdamW {
                lr,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                eps: c.eps as f32,
                weight_decay: c.weight_decay as f32,
            }),
            (LbcScores::Sgd, _) => ScoreOpt::Sgd(ScoreSgd {
                lr,
                momentum: 0.9,
                weight_decay: 1e-4,
                nesterov: false,
            }),
        }
    }

    /// LBC's removal schedule of this run.
    pub fn removal_schedule(&self) -> RemovalSchedule {
        let m = &self.method;
        RemovalSchedule {
            t_i: m.lbc_t_i,
            t_f: m
                .lbc_t_f
                .unwrap_or_else(|| RemovalSchedule::default_t_f(self.epochs)),
            power: m.lbc_power,
        }
    }

    /// The method of this run over the layers `built`, as the trainer drives it, and the
    /// weights it leaves dense (every weight for dense training; the `dense_layers` of an N:M
    /// method). The one place a method name becomes an implementation.
    pub(crate) fn build_method(
        &self,
        built: &BuiltLayers,
        total_steps: usize,
    ) -> Result<(Box<dyn Sparsify>, Vec<SparseParam>)> {
        let m = &self.method;
        if let Some(sc) = self.sparsifier_config(total_steps) {
            return Ok((
                Box::new(Sparsifier::new(built.sparse.clone(), sc)?),
                Vec::new(),
            ));
        }
        if !m.name.is_nm() {
            return Ok((Box::new(NoSparsity), built.sparse.clone()));
        }
        let names: Vec<&str> = built
            .sparse
            .iter()
            .map(|p| p.name())
            .chain(built.nm.iter().map(|l| l.name()))
            .collect();
        if let Some(n) = m.dense_layers.iter().find(|n| !names.contains(&n.as_str())) {
            return Err(config_err(
                "method.dense_layers",
                format!("unknown layer `{n}` (layers: {})", names.join(", ")),
            ));
        }
        let method = match m.name {
            MethodName::Lbc => {
                let scores = self.lbc_score_optimizer();
                NmMethod::Lbc {
                    schedule: self.removal_schedule(),
                    scores,
                    freeze_scores: m
                        .lbc_freeze_scores
                        .unwrap_or(matches!(scores, ScoreOpt::Sgd(_))),
                    max_scores: 1 << 24,
                }
            }
            MethodName::Srste => NmMethod::SrSte {
                lambda_w: m.srste_lambda,
            },
            _ => NmMethod::OneShot {
                prune_epoch: self.nm_prune_epoch().unwrap_or(0),
            },
        };
        let nm = NmSparsifier::new(built.nm.clone(), NmPattern::new(m.n, m.m), method)
            .map_err(|e| config_err("method.m", e))?;
        Ok((Box::new(nm), built.sparse.clone()))
    }
}

/// The config path of a method setting named by dst-core or lbc.
fn method_field(field: &str) -> &'static str {
    match field {
        "sparsity" => "method.sparsity",
        "delta_t" => "method.delta_t",
        "grad_accumulation" => "method.grad_accumulation",
        "alpha" => "method.alpha",
        "gamma_sal" => "method.gamma_sal",
        "distribution.power_scale" => "method.distribution.power_scale",
        "lbc_power" => "method.lbc_power",
        "lbc_t_i" => "method.lbc_t_i",
        "lbc_t_f" => "method.lbc_t_f",
        _ => "method",
    }
}

/// The config path of an optimizer setting.
fn optimizer_field(field: &str) -> &'static str {
    match field {
        "lr" => "optimizer.lr",
        "momentum" => "optimizer.momentum",
        "weight_decay" => "optimizer.weight_decay",
        "beta1" => "optimizer.beta1",
        "beta2" => "optimizer.beta2",
        "eps" => "optimizer.eps",
        _ => "optimizer",
    }
}

/// `path: message` of a deserialisation error (the path is `.` for the top level), on one line.
fn path_error(path: &serde_path_to_error::Path, message: &str) -> String {
    let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
    match path.to_string().as_str() {
        "." => message,
        p => format!("{p}: {message}"),
    }
}
