//! Checkpoint files: a folder holding `checkpoint.json` (counters, the configuration, the
//! metrics history and the name of the tensor file) and `state-<step>.safetensors` (weights,
//! BatchNorm statistics, optimizer state, masks, ITOP unions, LBC scores).
//!
//! Both are written to temporary files and renamed; the tensor file first, then the JSON that
//! points at it, then older tensor files are removed. A reader therefore always finds a
//! complete pair, even if the writer was killed half-way.
//!
//! This module owns the mapping between a run's state and the tensors: `var.<name>` (every
//! variable, dense whichever engine trained it), `opt.<name>.<i>` (optimizer state, laid out
//! like the variable), and the method's own tensors ([`dst_core::Sparsify::save`]: `mask.<weight>`
//! and `ever.<weight>` for dynamic sparse training, `nm.<weight>`, `nm.started` and
//! `lbc.<weight>.<field>` for N:M).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use dst_core::Sparsify;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::engine::Engine;
use crate::error::TrainError;
use crate::metrics::EpochMetrics;

/// Version of the checkpoint layout (2: the N:M "started" flag moved from the JSON into the
/// method's tensors).
pub const FORMAT_VERSION: u32 = 2;

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
    /// Seconds of training so far.
    pub wall_s: f64,
    /// The tensor file, relative to the checkpoint folder.
    pub tensors: String,
    /// The run's configuration.
    pub config: TrainConfig,
    /// Metrics of the completed epochs.
    pub history: Vec<EpochMetrics>,
    /// Per-channel `(mean, std)` of the training pixels, with which inputs are normalised
    /// (what a model file needs; absent in checkpoints written before model files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalization: Option<Vec<(f32, f32)>>,
    /// Ranks of the data-parallel run that wrote it (1 for a single process, and for
    /// checkpoints written before data-parallel training); a resume must use as many.
    #[serde(default = "one_rank")]
    pub ranks: usize,
}

fn one_rank() -> usize {
    1
}

use crate::error::file_err as err;

/// Writes `bytes` to `path` through a temporary file in the same folder, fsync and a rename:
/// the one writer of every file the project writes.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    sparse_formats::io::write_atomic(path, bytes).map_err(|e| match e {
        // Already names the file.
        sparse_formats::FormatError::Io { error, .. } => err(path, error),
        other => err(path, other),
    })
}

/// Removes the temporary files that [`write_atomic`] leaves when a process is killed mid-write
/// (`.tmp-*`) from a run folder `dir` and its `checkpoint/`; best effort (a file that cannot be
/// removed stays, harmlessly).
pub fn remove_temporaries(dir: &Path) {
    for d in [dir.to_path_buf(), dir.join("checkpoint")] {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Writes named tensors to a safetensors file atomically ([`write_atomic`]).
pub fn save_tensors_atomic(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), TrainError> {
    let bytes = safetensors::serialize(tensors.iter(), None).map_err(|e| err(path, e))?;
    write_atomic(path, &bytes)
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

/// The variables of `varmap`, sorted by name.
pub(crate) fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The tensors of a run's state: variables and optimizer state (dense layout, whichever
/// engine), and the method's own.
pub(crate) fn capture(
    varmap: &VarMap,
    engine: &Engine,
    method: &dyn Sparsify,
) -> Result<HashMap<String, Tensor>, TrainError> {
    engine.sync_dense()?;
    let mut t = HashMap::new();
    for (name, var) in named_vars(varmap) {
        t.insert(format!("var.{name}"), var.as_tensor().copy()?);
        for (i, s) in engine.dense_state(&var)?.into_iter().enumerate() {
            t.insert(format!("opt.{name}.{i}"), s);
        }
    }
    t.extend(method.save()?);
    Ok(t)
}

/// Restores what [`capture`] took into a freshly built run (same config); `path` names the
/// tensor file in errors.
pub(crate) fn restore(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    varmap: &VarMap,
    engine: &mut Engine,
    method: &mut dyn Sparsify,
) -> Result<(), TrainError> {
    let get = |name: String| {
        tensors
            .get(&name)
            .cloned()
            .ok_or_else(|| err(path, format!("missing tensor `{name}`")))
    };
    let vars = named_vars(varmap);
    for (name, var) in &vars {
        let v = get(format!("var.{name}"))?;
        if v.dims() != var.dims() {
            return Err(err(
                path,
                format!(
                    "`var.{name}` has shape {:?}, the model {:?}",
                    v.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&v.to_dtype(var.dtype())?)?;
    }
    method.restore(tensors, engine)?;
    // Sparse storage: lay the restored weights out again (fresh state, replaced below).
    engine.reload()?;
    for (name, var) in &vars {
        let n = engine.state_len(var);
        if n > 0 {
            let st = (0..n)
                .map(|i| get(format!("opt.{name}.{i}")))
                .collect::<Result<Vec<_>, _>>()?;
            engine.set_dense_state(var, st)?;
        }
    }
    Ok(())
}
