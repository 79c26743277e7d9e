//! Architectures, data sets, the training loop, checkpoints and metrics (layer L4).
//!
//! So far: [`data`], the IDX reader for MNIST / Fashion-MNIST with data-set discovery and
//! validation. Architectures and the training loop come with the rest of the models issue.

#![warn(missing_docs)]

pub mod data;
