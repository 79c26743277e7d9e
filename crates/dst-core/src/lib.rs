//! Dynamic sparse training on candle (layer L2).
//!
//! Not yet implemented: this crate is filled by the dst-core issue (sparsity distributions,
//! update schedules, Static / SET / RigL / SRigL, sparse layers, mask-aware optimizers).
