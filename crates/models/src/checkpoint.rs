//! Checkpoint files: a folder holding `checkpoint.json` (counters, the configuration, the
//! metrics history and the name of the tensor file) and `state-<step>.safetensors` (weights,
//! BatchNorm statistics, optimizer state, masks, ITOP unions, LBC scores).
//!
//! Both are written to temporary files and renamed; the tensor file first, then the JSON that
//! points at it, then older tensor files are removed. A reader therefore always finds a
//! complete pair, even if the writer was killed half-way.
//!
//! Tensor names: `var.<name>` (every variable), `opt.<name>.<i>` (optimizer state),
//! `mask.<weight>` and `ever.<weight>` (dst masks and ITOP unions, `u8`), `nm.<weight>` (N:M
//! masks, `u8`), `lbc.<weight>.<field>` (LBC state, `f64`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::trainer::{EpochMetrics, TrainError};

/// Version of the checkpoint layout.
pub const FORMAT_VERSION: u32 = 1;

/// The JSON half of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Optimizer steps done.
    pub step: usize,
    /// Loss sum, correct count and examples of the current (unfinished) epoch.
    pub epoch_acc: (f64, f64, usize),
    /// The optimizer's step counter.
    pub optimizer_steps: u64,
    /// Whether the N:M sparsifier has chosen its first masks.
    pub nm_started: bool,
    /// Seconds of training so far.
    pub wall_s: f64,
    /// The tensor file, relative to the checkpoint folder.
    pub tensors: String,
    /// The run's configuration.
    pub config: TrainConfig,
    /// Metrics of the completed epochs.
    pub history: Vec<EpochMetrics>,
}

fn err(path: &Path, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    sparse_formats::io::write_atomic(path, bytes).map_err(|e| err(path, e))
}

/// Writes named tensors to a safetensors file through a temporary file in the same folder and
/// a rename.
pub fn save_tensors_atomic(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), TrainError> {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into());
    let tmp = path.with_file_name(format!(".tmp-{name}"));
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| err(path, e))
}

/// Writes a checkpoint into `dir` (created if missing).
pub fn save(
    dir: &Path,
    mut state: CheckpointState,
    tensors: &HashMap<String, Tensor>,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, format!("cannot create: {e}")))?;
    let name = format!("state-{:09}.safetensors", state.step);
    save_tensors_atomic(&dir.join(&name), tensors)?;
    state.tensors = name.clone();
    let json = serde_json::to_vec_pretty(&state).expect("checkpoint state serialises");
    write_atomic(&dir.join("checkpoint.json"), &json)?;
    // Only now may older tensor files go.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let f = e.file_name().to_string_lossy().to_string();
            if f.starts_with("state-") && f.ends_with(".safetensors") && f != name {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(dir.to_path_buf())
}

/// Reads a checkpoint folder: its JSON state and its tensors.
pub fn load(dir: &Path) -> Result<(CheckpointState, HashMap<String, Tensor>), TrainError> {
    let json_path = dir.join("checkpoint.json");
    let bytes = std::fs::read(&json_path).map_err(|e| err(&json_path, e))?;
    let state: CheckpointState =
        serde_json::from_slice(&bytes).map_err(|e| err(&json_path, format!("malformed: {e}")))?;
    if state.format_version != FORMAT_VERSION {
        return Err(err(
            &json_path,
            format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                state.format_version
            ),
        ));
    }
    let tpath = dir.join(&state.tensors);
    let tensors =
        candle_core::safetensors::load(&tpath, &Device::Cpu).map_err(|e| err(&tpath, e))?;
    Ok((state, tensors))
}
