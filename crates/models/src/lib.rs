//! Architectures, data sets, the training loop, checkpoints and metrics (layer L4).
//!
//! - [`data`]: IDX (MNIST, Fashion-MNIST) and CIFAR-10 readers, data-set discovery, validation
//!   split, subsets;
//! - [`nets`]: MLPs, LeNet-5, CIFAR ResNet-18 and a small ViT whose every linear/conv layer is
//!   a dst-core or lbc sparse layer;
//! - [`config`]: [`TrainConfig`], one serde struct describing a run;
//! - [`trainer`]: the [`Trainer`] (dense, Static, SET, RigL, SRigL, LBC, SR-STE, one-shot
//!   N:M), metrics JSON lines, progress events, checkpoints and exact resume;
//! - [`engine`]: the sparse training engine (weights in sparse storage between mask updates);
//! - [`checkpoint`]: the checkpoint files.
//!
//! ```no_run
//! use models::{Datasets, Silent, TrainConfig, Trainer};
//!
//! let mut cfg = TrainConfig::default(); // LeNet-300-100, SRigL 90% (ERK), Fashion-MNIST
//! cfg.epochs = 2;
//! let data = Datasets::load(&cfg)?;
//! let summary = Trainer::new(cfg, data)?.run(&mut Silent)?;
//! println!("test accuracy {:.4}", summary.test_accuracy);
//! # Ok::<(), models::TrainError>(())
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod engine;
pub mod nets;
pub mod trainer;

pub use config::{
    DataConfig, EngineKind, LrKind, LrSchedule, MethodConfig, MethodName, TrainConfig,
};
pub use nets::ModelConfig;
pub use trainer::{
    Control, Datasets, EpochMetrics, Event, LayerStats, Progress, Silent, Summary, TrainError,
    Trainer,
};
