//! Architectures, data sets, the training loop, checkpoints and metrics (layer L4).
//!
//! Not yet implemented: this crate is filled by the models issue.
