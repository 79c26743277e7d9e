//! `dst eval`, `dst export`, `dst inspect` and `dst bench`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use models::data::ImageSet;
use models::inference::{ModelDescription, SparseModel};
use models::{Datasets, Trainer};
use serde::Serialize;
use sparse_formats::io::SparseLayer;
use sparse_formats::{Condensed, LayerStats, Mask, NmPattern, NmSparse};
use sparse_kernels::{Exec, SparseWeight};

/// `dst eval` flags.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A run folder (its checkpoint/ is used), a checkpoint folder, or a model file written by
    /// `dst export` (run on the sparse kernels, without the run folder).
    path: PathBuf,
    /// Folder holding the data set (overrides the run's).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `dst predict` flags.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A model file written by `dst export`.
    file: PathBuf,
    /// IDX image file (`[n, rows, cols]` bytes, plain or gzip).
    #[arg(long, value_name = "IDX")]
    input: PathBuf,
    /// Print JSON (`{"predictions": [...]}`) instead of one class per line.
    #[arg(long)]
    json: bool,
}

/// `dst export` flags.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A run folder or a checkpoint folder.
    run: PathBuf,
    /// Target format of the sparse layers.
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// Output file (.safetensors), written atomically.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum ExportFormat {
    Condensed,
    Nm,
    Csr,
}

/// `dst inspect` flags.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A safetensors file written by `dst export`, `dst train` (masks) or sparse-formats.
    file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Print the mask of this layer as a text grid (# active, . inactive).
    #[arg(long, value_name = "LAYER")]
    show_mask: Option<String>,
}

/// `dst bench` flags.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// An exported file; without it, synthetic 3072→768 layers at 90% and 99% and 2:4.
    file: Option<PathBuf>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    batch: Vec<usize>,
    /// Threads for both the sparse kernels and candle's dense matmul (0: all).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Time the whole model of a model file (batch 1 latency, batch 256 throughput) on the
    /// sparse kernels against the same model run dense, instead of single layers.
    #[arg(long)]
    end_to_end: bool,
}

/// The checkpoint folder of a run folder, or the folder itself.
fn checkpoint_dir(path: &Path) -> Result<PathBuf> {
    for p in [path.join("checkpoint"), path.to_path_buf()] {
        if p.join("checkpoint.json").exists() {
            return Ok(p);
        }
    }
    bail!(
        "{}: not a run folder or checkpoint (no checkpoint.json in it or in its checkpoint/)",
        path.display()
    )
}

/// One placeholder example of the data set's shape: enough to rebuild a network for export.
fn placeholder(cfg: &models::TrainConfig) -> Result<Datasets> {
    let [c, s, _] = cfg.data.name.image_shape();
    let set = ImageSet {
        images: vec![0.5; c * s * s],
        labels: vec![0],
        channels: c,
        rows: s,
        cols: s,
        classes: 10,
    };
    Ok(Datasets {
        train: set.clone(),
        validation: set.limit(0),
        test: set,
    })
}

/// `dst eval`.
pub fn eval(a: EvalArgs) -> Result<ExitCode> {
    if a.path.is_file() {
        return eval_file(a);
    }
    let ck = checkpoint_dir(&a.path)?;
    let mut cfg = Trainer::checkpoint_config(&ck)?;
    if let Some(d) = a.data_dir {
        cfg.data.dir = Some(d);
    }
    let data = Datasets::load(&cfg)?;
    let t = Trainer::resume(&ck, data)?;
    let (loss, acc) = t.evaluate(&t.data().test)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"test_accuracy": acc, "test_loss": loss, "step": t.step()})
        );
    } else {
        println!(
            "test accuracy {acc:.4}  test loss {loss:.4}  ({} test examples, step {})",
            t.data().test.len(),
            t.step()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `dst eval FILE`: the exported model on its data set's test split.
fn eval_file(a: EvalArgs) -> Result<ExitCode> {
    let model = SparseModel::load(&a.path)?;
    let d = model.description();
    let dir = models::data::find_dataset(d.dataset, a.data_dir.as_deref())?;
    let test = d.dataset.load(&dir, models::data::Split::Test)?;
    let (loss, acc) = model.evaluate(&test)?;
    let sparse: Vec<String> = model
        .sparse_layers()
        .iter()
        .map(|(n, f)| format!("{n} ({f})"))
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"test_accuracy": acc, "test_loss": loss, "sparse_layers": sparse})
        );
    } else {
        println!(
            "test accuracy {acc:.4}  test loss {loss:.4}  ({} test examples; on the sparse \
             kernels: {})",
            test.len(),
            if sparse.is_empty() {
                "none".to_string()
            } else {
                sparse.join(", ")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `dst predict`.
pub fn predict(a: PredictArgs) -> Result<ExitCode> {
    let model = SparseModel::load(&a.file)?;
    let set = models::data::read_idx_images(&a.input, model.description().classes)?;
    let classes = model
        .predict(&set)
        .with_context(|| format!("--input {}", a.input.display()))?;
    if a.json {
        println!("{}", serde_json::json!({ "predictions": classes }));
    } else {
        let mut out = String::with_capacity(classes.len() * 2);
        for c in classes {
            out.push_str(&c.to_string());
            out.push('\n');
        }
        print!("{out}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `dst bench FILE --end-to-end`: whole-model latency (batch 1) and throughput (batch 256) on
/// the sparse kernels against the same model dense, in one run.
fn bench_end_to_end(a: &BenchArgs) -> Result<ExitCode> {
    let Some(file) = &a.file else {
        bail!("--end-to-end needs a model file (written by `dst export`)");
    };
    let sparse = SparseModel::load(file)?;
    let dense = SparseModel::load_dense(file)?;
    let [c, h, w] = sparse.description().image;
    println!(
        "{:<8} {:>14} {:>14} {:>9}",
        "batch", "sparse µs", "dense µs", "speed-up"
    );
    let mut rng = dst_core::Rng::new(7);
    for batch in [1usize, 256] {
        let x: Vec<f32> = (0..batch * c * h * w)
            .map(|_| rng.normal() as f32)
            .collect();
        let x = Tensor::from_vec(x, (batch, c, h, w), &Device::Cpu)?;
        let time = |m: &SparseModel| -> Result<f64> {
            m.forward(&x)?;
            let mut times = Vec::new();
            let start = Instant::now();
            while times.len() < 5 || (start.elapsed().as_secs_f64() < 1.0 && times.len() < 1000) {
                let t = Instant::now();
                std::hint::black_box(m.forward(&x)?);
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            Ok(times[times.len() / 2] * 1e6)
        };
        let (s, d) = (time(&sparse)?, time(&dense)?);
        println!("{batch:<8} {s:>14.1} {d:>14.1} {:>8.2}×", d / s);
    }
    for (name, layout) in sparse.small_batch_layers() {
        println!("batches below 8 run {name} as {layout}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `dst export`: the run's checkpoint as a model file (`models::inference::export_layers` and
/// the model description).
pub fn export(a: ExportArgs) -> Result<ExitCode> {
    let ck = checkpoint_dir(&a.run)?;
    let cfg = Trainer::checkpoint_config(&ck)?;
    let t = Trainer::resume(&ck, placeholder(&cfg)?)?;
    let normalization = match Trainer::checkpoint_normalization(&ck)? {
        Some(n) => n,
        // A checkpoint from before model files: the statistics of the training set.
        None => Datasets::load(&cfg)
            .with_context(|| {
                format!(
                    "{}: the checkpoint predates stored input statistics, and the run's data \
                     set (needed for them) cannot be read",
                    ck.display()
                )
            })?
            .train
            .channel_stats(),
    };
    let format = match a.format {
        ExportFormat::Condensed => models::inference::ExportFormat::Condensed,
        ExportFormat::Nm => models::inference::ExportFormat::Nm,
        ExportFormat::Csr => models::inference::ExportFormat::Csr,
    };
    let layers = models::inference::export_layers(&t, format)
        .with_context(|| format!("run `{}`", a.run.display()))?;
    let description = ModelDescription::of(&cfg, normalization);
    sparse_formats::io::save_with_metadata(&a.out, &layers, &description.to_metadata())
        .with_context(|| format!("--out {}", a.out.display()))?;
    println!("{} tensors → {}", layers.len(), a.out.display());
    Ok(ExitCode::SUCCESS)
}

/// One layer as `dst inspect` shows it: its mask statistics, format and N:M patterns.
#[derive(Serialize)]
struct LayerInfo {
    #[serde(flatten)]
    stats: LayerStats,
    format: String,
    /// The layer's N:M pattern, or the standard patterns its mask meets exactly.
    nm: Vec<String>,
}

fn mask_of(layer: &SparseLayer) -> Option<Mask> {
    Some(match layer {
        SparseLayer::Dense(_) => return None,
        SparseLayer::Mask(m) => m.clone(),
        SparseLayer::Condensed(c) => c.to_mask(),
        SparseLayer::Nm(n) => n.to_mask(),
        SparseLayer::Csr(c) => c.to_mask(),
    })
}

fn exact_nm(mask: &Mask, n: usize, m: usize) -> bool {
    mask.fan_in().is_multiple_of(m)
        && (0..mask.rows()).all(|r| {
            mask.row(r)
                .chunks(m)
                .all(|g| g.iter().filter(|&&b| b).count() == n)
        })
}

/// The most entries (`rows × fan_in`) of a layer that `dst inspect` lays out as a dense mask
/// (one byte each: 2 GiB). A file's header can declare any shape while storing a few values.
const MAX_INSPECT_ENTRIES: usize = 1 << 31;

/// Refuses a layer larger than [`MAX_INSPECT_ENTRIES`] before its mask is laid out.
fn check_inspectable(name: &str, layer: &SparseLayer) -> Result<()> {
    let (rows, fan_in) = match layer {
        SparseLayer::Dense(d) => (
            d.shape.first().copied().unwrap_or(0),
            d.shape.iter().skip(1).product::<usize>(),
        ),
        SparseLayer::Mask(m) => (m.rows(), m.fan_in()),
        SparseLayer::Condensed(c) => (c.rows(), c.fan_in()),
        SparseLayer::Nm(n) => (n.rows(), n.fan_in()),
        SparseLayer::Csr(c) => (c.rows(), c.fan_in()),
    };
    if rows
        .checked_mul(fan_in)
        .is_none_or(|n| n > MAX_INSPECT_ENTRIES)
    {
        bail!(
            "layer `{name}`: [{rows}, {fan_in}] has more than {MAX_INSPECT_ENTRIES} entries, the \
             most `dst inspect` lays out (its statistics need the dense mask)"
        );
    }
    Ok(())
}

fn info(name: &str, layer: &SparseLayer) -> Result<LayerInfo> {
    check_inspectable(name, layer)?;
    let (mask, nm) = match (mask_of(layer), layer) {
        (None, SparseLayer::Dense(d)) => {
            let fan_in = d.shape.iter().skip(1).product::<usize>();
            let rows = d.shape.first().copied().unwrap_or(0);
            (Mask::from_dense(rows, fan_in, &d.values)?, vec![])
        }
        (Some(mask), SparseLayer::Nm(n)) => (mask, vec![format!("{}:{}", n.n(), n.m())]),
        (Some(mask), _) => {
            let nm = [(2, 4), (1, 4), (2, 8), (1, 16)]
                .into_iter()
                .filter(|&(n, m)| exact_nm(&mask, n, m))
                .map(|(n, m)| format!("{n}:{m}"))
                .collect();
            (mask, nm)
        }
        (None, _) => unreachable!("only dense layers have no mask"),
    };
    Ok(LayerInfo {
        stats: LayerStats::of(name, &mask),
        format: layer.format_name().to_string(),
        nm,
    })
}

/// `dst inspect`.
pub fn inspect(a: InspectArgs) -> Result<ExitCode> {
    let layers = sparse_formats::io::load(&a.file)?;
    if let Some(name) = &a.show_mask {
        let (_, layer) = layers.iter().find(|(n, _)| n == name).with_context(|| {
            format!(
                "--show-mask: no layer `{name}` in {} (layers: {})",
                a.file.display(),
                layers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        check_inspectable(name, layer)?;
        let mask = mask_of(layer)
            .with_context(|| format!("--show-mask: layer `{name}` is dense (no mask)"))?;
        print!("{}", mask.render());
        return Ok(ExitCode::SUCCESS);
    }
    let infos = layers
        .iter()
        .map(|(n, l)| info(n, l))
        .collect::<Result<Vec<_>>>()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:<10} {:>14} {:>9} {:>8} {:>13} {:>7}  n:m",
        "layer", "format", "shape", "nnz", "sparsity", "fan-in", "ablated"
    );
    for i in infos {
        let s = &i.stats;
        let shape = s
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        println!(
            "{:<28} {:<10} {:>14} {:>9} {:>8.4} {:>13} {:>7}  {}",
            s.name,
            i.format,
            shape,
            s.nnz,
            s.sparsity,
            format!("{}..{}", s.min_fan_in, s.max_fan_in),
            s.ablated_rows,
            if i.nm.is_empty() {
                "-".into()
            } else {
                i.nm.join(",")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn median_ns(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed().as_secs_f64() < 0.3 && times.len() < 200) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_nanos() as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn synthetic() -> Result<Vec<(String, SparseLayer)>> {
    let (rows, fan_in) = (768, 3072);
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let values: Vec<f32> = (0..rows * fan_in)
        .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let mut out = Vec::new();
    for (label, k) in [
        ("condensed-90%", fan_in / 10),
        ("condensed-99%", fan_in / 100),
    ] {
        let mut mask = Mask::zeros(rows, fan_in);
        for r in 0..rows {
            let mut picked = 0;
            while picked < k {
                let c = (next() % fan_in as u64) as usize;
                if !mask.get(r, c) {
                    mask.set(r, c, true);
                    picked += 1;
                }
            }
        }
        out.push((
            label.to_string(),
            SparseLayer::Condensed(Condensed::from_dense(rows, fan_in, &values, &mask, None)?),
        ));
    }
    let mut mask = Mask::zeros(rows, fan_in);
    for r in 0..rows {
        for g in 0..fan_in / 4 {
            let a = (next() % 4) as usize;
            let b = (a + 1 + (next() % 3) as usize) % 4;
            mask.set(r, g * 4 + a, true);
            mask.set(r, g * 4 + b, true);
        }
    }
    out.push((
        "nm-2:4".to_string(),
        SparseLayer::Nm(NmSparse::from_dense(
            rows,
            fan_in,
            NmPattern::new(2, 4),
            &values,
            &mask,
        )?),
    ));
    Ok(out)
}

/// The most `f32`s `dst bench` allocates for one layer (dense weight, input and outputs at the
/// largest `--batch`): 4 GiB.
const MAX_BENCH_FLOATS: usize = 1 << 30;

/// `dst bench`: in a pool of `--threads` threads, so that candle's matmul uses as many.
pub fn bench(a: BenchArgs) -> Result<ExitCode> {
    if a.threads == 0 {
        return bench_in_pool(a);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build()?
        .install(|| bench_in_pool(a))
}

fn bench_in_pool(a: BenchArgs) -> Result<ExitCode> {
    if a.end_to_end {
        return bench_end_to_end(&a);
    }
    let layers = match &a.file {
        Some(f) => sparse_formats::io::load(f)?,
        None => synthetic()?,
    };
    if a.batch.contains(&0) {
        bail!("--batch: batch sizes must be at least 1");
    }
    // Every buffer is checked against a limit before anything is allocated or printed: per
    // layer the dense weight, and the input and both outputs at the largest batch.
    let largest = a.batch.iter().copied().max().unwrap_or(1);
    for (name, layer) in &layers {
        let (rows, fan_in) = match layer {
            SparseLayer::Condensed(c) => (c.rows(), c.fan_in()),
            SparseLayer::Nm(n) => (n.rows(), n.fan_in()),
            SparseLayer::Csr(c) => (c.rows(), c.fan_in()),
            _ => continue,
        };
        let floats = largest
            .checked_mul(fan_in + 2 * rows)
            .and_then(|io| io.checked_add(rows.checked_mul(fan_in)?));
        if floats.is_none_or(|f| f > MAX_BENCH_FLOATS) {
            bail!(
                "--batch: batch {largest} on layer `{name}` ([{rows}, {fan_in}]) needs more than \
                 {} GiB of buffers (lower --batch)",
                (MAX_BENCH_FLOATS * 4) >> 30
            );
        }
    }
    let exec = Exec::default().with_threads(a.threads);
    println!(
        "{:<28} {:<10} {:>6} {:>12} {:>12} {:>8}",
        "layer", "format", "batch", "sparse µs", "dense µs", "speed-up"
    );
    let dev = Device::Cpu;
    for (name, layer) in &layers {
        let (w, values): (SparseWeight, &[f32]) = match layer {
            SparseLayer::Condensed(c) => (c.into(), c.values()),
            SparseLayer::Nm(n) => (n.into(), n.values()),
            SparseLayer::Csr(c) => (c.into(), c.values()),
            _ => continue,
        };
        let (rows, fan_in) = (w.rows(), w.fan_in());
        let dense_w = Tensor::from_vec(
            mask_of(layer)
                .map(|m| {
                    let mut d = vec![0.0f32; rows * fan_in];
                    for (i, b) in m.as_slice().iter().enumerate() {
                        d[i] = if *b { 0.5 } else { 0.0 };
                    }
                    d
                })
                .unwrap_or_default(),
            (rows, fan_in),
            &dev,
        )?
        .t()?
        .contiguous()?;
        for &b in &a.batch {
            let x: Vec<f32> = (0..b * fan_in).map(|i| (i % 7) as f32 * 0.1).collect();
            let xt = Tensor::from_vec(x.clone(), (b, fan_in), &dev)?;
            let sparse = median_ns(|| {
                sparse_kernels::forward(w, values, None, &x, b, exec)?;
                Ok(())
            })?;
            let dense = median_ns(|| {
                xt.matmul(&dense_w)?;
                Ok(())
            })?;
            println!(
                "{:<28} {:<10} {:>6} {:>12.1} {:>12.1} {:>7.2}x",
                name,
                layer.format_name(),
                b,
                sparse / 1e3,
                dense / 1e3,
                dense / sparse
            );
        }
    }
    println!(
        "(threads: {}; dense = candle's matmul on the same shapes, same process)",
        if a.threads == 0 {
            "all".to_string()
        } else {
            a.threads.to_string()
        }
    );
    Ok(ExitCode::SUCCESS)
}
