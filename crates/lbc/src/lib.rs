//! N:M sparse training (layer L3).
//!
//! Not yet implemented: this crate is filled by the lbc issue (LBC, SR-STE and one-shot
//! magnitude N:M, exporting to `sparse_formats::NmSparse`).
