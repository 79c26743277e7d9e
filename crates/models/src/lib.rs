//! Architectures, data sets, the training loop, checkpoints and metrics (layer L4).
//!
//! - [`data`]: IDX (MNIST, Fashion-MNIST) and CIFAR-10 readers, the [`DatasetName`]s,
//!   data-set discovery, validation split, subsets;
//! - [`nets`]: MLPs, LeNet-5, CIFAR ResNet-18 and a small ViT whose every linear/conv layer is
//!   a dst-core or lbc sparse layer;
//! - [`config`]: [`TrainConfig`], one serde struct describing a run, with its one validation
//!   pass and the one place a method name becomes a [`dst_core::Sparsify`];
//! - [`trainer`]: the [`Trainer`] loop and its progress [`Event`]s;
//! - [`engine`]: the storage engines (dense-mask, and sparse: weights in sparse storage between
//!   mask updates) behind one [`Engine`] type that owns the optimizer;
//! - [`checkpoint`]: the checkpoint files and the state ⇄ tensors mapping;
//! - [`metrics`]: per-layer statistics, epoch records, `metrics.jsonl`;
//! - [`error`]: the error type, [`TrainError`];
//! - [`alloc`]: the allocator setting of a training process ([`alloc::keep_freed_memory`]);
//! - [`process`]: what a training process sets first thing in `main` ([`process::init`]).
//!
//! ```no_run
//! use models::{Datasets, Silent, TrainConfig, Trainer};
//!
//! let mut cfg = TrainConfig::default(); // LeNet-300-100, SRigL 90% (ERK), Fashion-MNIST
//! cfg.epochs = 2;
//! let data = Datasets::load(&cfg)?;
//! let summary = Trainer::new(cfg, data)?.run(&mut Silent)?;
//! println!("test accuracy {:.4}", summary.test_accuracy);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod alloc;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod inference;
pub mod metrics;
pub mod nets;
pub mod process;
pub mod trainer;

pub use config::{
    DataConfig, EngineKind, InitKind, LbcScores, LrKind, LrSchedule, MethodConfig, MethodName,
    TrainConfig,
};
pub use data::{DatasetName, Datasets};
pub use engine::Engine;
pub use error::TrainError;
pub use metrics::{EpochMetrics, LayerStats, StepProfile, Summary};
pub use nets::ModelConfig;
pub use trainer::{Control, Event, Progress, Silent, Trainer};
