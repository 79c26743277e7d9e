//! Architectures, data sets, the training loop, checkpoints and metrics (layer L4).
//!
//! So far: [`data`], the IDX reader for MNIST / Fashion-MNIST with data-set discovery and
//! validation, and [`train`], an MLP training loop (dense or any dst-core method). Other
//! architectures, LBC in the loop, checkpoints and metrics files come with the rest of the
//! models issue.

#![warn(missing_docs)]

pub mod data;
pub mod train;
