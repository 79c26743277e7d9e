//! `cargo xtask bench [--quick] [--out DIR]`: runs the benchmark suites in release mode, once with
//! one thread and once with all threads, and writes `DIR/bench.json` (every record, plus the
//! machine) and `DIR/bench.md` (tables and the targets of the kernels issue).
//!
//! Each suite is a `harness = false` bench target that prints JSON records; this task only
//! orchestrates (xtask never depends on candle).
//!
//! `--scaling` runs the data-parallel suite (`models/benches/scaling.rs`, built with the
//! `distributed` feature): the wide MLP's dense, dense-mask and sparse-engine training at
//! 1 process × 1 thread, 1 × 2 threads and 2 MPI ranks × 1 thread, and the all-reduce alone;
//! writes `DIR/scaling.json` and `DIR/scaling.md`. Needs Open MPI and libclang (Debian:
//! `libopenmpi-dev openmpi-bin libclang-dev`).
//!
//! `--peers` runs the peer suite instead (`xtask/peers/peers.py`): PyTorch dense, PyTorch
//! masked-dense and SparseProp training on the train suite's MLPs, beside our train suite, at 1
//! and 2 threads, in one run; writes `DIR/peers.json` and `DIR/peers.md` with the ratios ours ÷
//! theirs. It creates (once) a Python environment under `target/peers/venv` from PyPI (torch,
//! numpy, scipy, pybind11, then sparseprop, which compiles its C++ kernels): a download of
//! about 4 GB, so it is not part of CI.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Parsed command line of `cargo xtask bench`.
pub struct Options {
    quick: bool,
    gpu: bool,
    peers: bool,
    scaling: bool,
    out: PathBuf,
}

impl Options {
    /// Parses the arguments after `bench`.
    pub fn parse(args: &[String], root: &Path) -> Result<Options> {
        let (mut quick, mut gpu, mut peers, mut scaling) = (false, false, false, false);
        let mut out = root.join("target").join("bench");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => quick = true,
                "--gpu" => gpu = true,
                "--peers" => peers = true,
                "--scaling" => scaling = true,
                "--out" => {
                    out = PathBuf::from(it.next().context("--out needs a folder")?);
                }
                other => {
                    bail!(
                    "cargo xtask bench: unknown flag `{other}` (flags: --quick, --gpu, --peers, --scaling, --out DIR)"
                )
                }
            }
        }
        Ok(Options {
            quick,
            gpu,
            peers,
            scaling,
            out,
        })
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn command_output(cmd: &str, args: &[&str], dir: &Path) -> Option<String> {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The machine and commit a run's numbers come from.
fn machine(root: &Path, quick: bool) -> Value {
    json!({
        "cpu": cpu_model(),
        "logical_cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "os": std::env::consts::OS,
        "date_utc": command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"], root),
        "git_commit": command_output("git", &["rev-parse", "--short", "HEAD"], root),
        "quick": quick,
    })
}

/// Runs the whole benchmark and writes the files.
pub fn run(root: &Path, opts: Options) -> Result<()> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    // The bench binary runs in its package folder: hand it an absolute path.
    let out = opts
        .out
        .canonicalize()
        .with_context(|| format!("resolving {}", opts.out.display()))?;
    if opts.gpu {
        return run_gpu(root, &out);
    }
    if opts.peers {
        return run_peers(root, &out, opts.quick);
    }
    if opts.scaling {
        return run_scaling(root, &out, opts.quick);
    }
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut thread_counts = vec![1];
    if all > 1 {
        thread_counts.push(all);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut records: Vec<Value> = Vec::new();
    for &threads in &thread_counts {
        let part = out.join(format!("kernels-{threads}t.json"));
        let mut args = vec!["bench", "-p", "sparse-kernels", "--bench", "kernels", "--"];
        if opts.quick {
            args.push("--quick");
        }
        let part_s = part.to_string_lossy().to_string();
        args.extend(["--json", &part_s]);
        eprintln!("$ RAYON_NUM_THREADS={threads} cargo {}", args.join(" "));
        let status = Command::new(&cargo)
            .args(&args)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .current_dir(root)
            .status()
            .context("running cargo bench")?;
        if !status.success() {
            bail!("the kernels benchmark failed ({status})");
        }
        let text = std::fs::read_to_string(&part)
            .with_context(|| format!("reading {}", part.display()))?;
        let mut recs: Vec<Value> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", part.display()))?;
        records.append(&mut recs);
        std::fs::remove_file(&part).ok();
    }
    // The train suite (models/benches/train.rs): all threads, one run.
    records.extend(train_suite(
        root,
        &out.join("train.json"),
        opts.quick,
        None,
    )?);
    write_doc(
        &out.join("bench.json"),
        machine(root, opts.quick),
        records,
        render_markdown,
    )
}

/// Runs the train suite (`models/benches/train.rs`) with `threads` rayon threads (all when
/// `None`), its JSON going through `part`; returns its records.
fn train_suite(
    root: &Path,
    part: &Path,
    quick: bool,
    threads: Option<usize>,
) -> Result<Vec<Value>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let part_s = part.to_string_lossy().to_string();
    let mut args = vec!["bench", "-p", "models", "--bench", "train", "--"];
    if quick {
        args.push("--quick");
    }
    args.extend(["--json", &part_s]);
    let mut cmd = Command::new(&cargo);
    cmd.args(&args).current_dir(root);
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
        eprintln!("$ RAYON_NUM_THREADS={t} cargo {}", args.join(" "));
    } else {
        eprintln!("$ cargo {}", args.join(" "));
    }
    let status = cmd.status().context("running cargo bench")?;
    if !status.success() {
        bail!("the train benchmark failed ({status})");
    }
    read_records(part)
}

/// Writes `{machine, records}` to `json_path` and its rendering to the `.md` beside it.
fn write_doc(
    json_path: &Path,
    machine: Value,
    records: Vec<Value>,
    render: fn(&Value) -> String,
) -> Result<()> {
    let doc = json!({ "machine": machine, "records": records });
    write_atomic(json_path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    let md = render(&doc);
    let md_path = json_path.with_extension("md");
    write_atomic(&md_path, md.as_bytes())?;
    println!("{md}");
    eprintln!("wrote {} and {}", json_path.display(), md_path.display());
    Ok(())
}

/// The GPU suite (`--gpu`): sparse-kernels' `gpu_bench` example built with the `cuda` feature;
/// it prints the table (or why no GPU can be used) and writes `DIR/gpu.json`.
fn run_gpu(root: &Path, out: &Path) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let json_path = out.join("gpu.json");
    let json_s = json_path.to_string_lossy().to_string();
    let args = [
        "run",
        "--release",
        "-p",
        "sparse-kernels",
        "--features",
        "cuda",
        "--example",
        "gpu_bench",
        "--",
        "--json",
        &json_s,
    ];
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root)
        .status()
        .context("running the GPU benchmark")?;
    if !status.success() {
        bail!("the GPU benchmark failed ({status})");
    }
    if json_path.exists() {
        eprintln!("wrote {}", json_path.display());
    }
    Ok(())
}

/// The Python of the peer environment, created (once) with torch and sparseprop from PyPI.
fn peer_python(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/peers/venv");
    let python = venv.join("bin/python");
    let ready = |py: &Path| {
        Command::new(py)
            .args(["-c", "import torch, sparseprop"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if python.exists() && ready(&python) {
        return Ok(python);
    }
    let run = |cmd: &Path, args: &[&str]| -> Result<()> {
        eprintln!("$ {} {}", cmd.display(), args.join(" "));
        let status = Command::new(cmd)
            .args(args)
            .status()
            .with_context(|| format!("running {}", cmd.display()))?;
        if !status.success() {
            bail!("{} {} failed ({status})", cmd.display(), args.join(" "));
        }
        Ok(())
    };
    if !python.exists() {
        let v = venv.to_string_lossy().to_string();
        run(Path::new("python3"), &["-m", "venv", &v])?;
    }
    let pip = ["-m", "pip", "install", "--disable-pip-version-check"];
    let mut a = pip.to_vec();
    a.extend(["torch", "numpy", "scipy", "pybind11"]);
    run(&python, &a)?;
    let mut a = pip.to_vec();
    a.extend(["--no-build-isolation", "sparseprop"]);
    run(&python, &a)?;
    Ok(python)
}

/// The peer suite (see the module documentation).
fn run_peers(root: &Path, out: &Path, quick: bool) -> Result<()> {
    let python = peer_python(root)?;
    let script = root.join("xtask/peers/peers.py");
    let mut records: Vec<Value> = Vec::new();
    for threads in [1usize, 2] {
        let t = threads.to_string();
        let part = out.join(format!("peers-{threads}t.json"));
        let part_s = part.to_string_lossy().to_string();
        let mut args = vec![
            script.to_string_lossy().to_string(),
            "--threads".into(),
            t.clone(),
        ];
        args.extend(["--json".into(), part_s.clone()]);
        if quick {
            args.push("--quick".into());
        }
        eprintln!(
            "$ OMP_NUM_THREADS={t} {} {}",
            python.display(),
            args.join(" ")
        );
        let status = Command::new(&python)
            .args(&args)
            .env("OMP_NUM_THREADS", &t)
            .env("MKL_NUM_THREADS", &t)
            .status()
            .context("running the peer suite")?;
        if !status.success() {
            bail!("the peer suite failed ({status})");
        }
        records.extend(read_records(&part)?);
        let ours = out.join(format!("train-{threads}t.json"));
        records.extend(train_suite(root, &ours, quick, Some(threads))?);
    }
    write_doc(
        &out.join("peers.json"),
        machine(root, quick),
        records,
        render_peers,
    )
}

/// The data-parallel suite (`--scaling`): one `scaling` bench binary (built with the
/// `distributed` feature) run as 1 process × 1 thread, 1 × 2 threads and 2 MPI ranks × 1
/// thread.
fn run_scaling(root: &Path, out: &Path, quick: bool) -> Result<()> {
    if Command::new("mpirun").arg("--version").output().is_err() {
        bail!(
            "--scaling needs mpirun and an MPI library (Debian: apt-get install libopenmpi-dev \
             openmpi-bin libclang-dev)"
        );
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = [
        "bench",
        "-p",
        "models",
        "--bench",
        "scaling",
        "--features",
        "distributed",
        "--no-run",
        "--message-format=json",
    ];
    eprintln!("$ cargo {}", build.join(" "));
    let built = Command::new(&cargo)
        .args(build)
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the scaling benchmark")?;
    if !built.status.success() {
        bail!("building the scaling benchmark failed ({})", built.status);
    }
    let exe = String::from_utf8_lossy(&built.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["target"]["name"] == "scaling")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo named no executable for the scaling benchmark")?;
    let mut records = Vec::new();
    // (label, ranks, threads per rank)
    for (label, ranks, threads) in [("1x1", 1, 1), ("1x2", 1, 2), ("2x1", 2, 1)] {
        let part = out.join(format!("scaling-{label}.json"));
        let part_s = part.to_string_lossy().to_string();
        let exe_s = exe.to_string_lossy().to_string();
        let mut args: Vec<String> = Vec::new();
        let program = if ranks > 1 {
            args.extend(["--allow-run-as-root", "--oversubscribe", "-np"].map(String::from));
            args.push(ranks.to_string());
            args.push(exe_s);
            args.push("--distributed".into());
            "mpirun".to_string()
        } else {
            exe_s
        };
        args.extend(["--json".into(), part_s]);
        if quick {
            args.push("--quick".into());
        }
        eprintln!("$ RAYON_NUM_THREADS={threads} {program} {}", args.join(" "));
        let status = Command::new(&program)
            .args(&args)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .current_dir(root)
            .status()
            .context("running the scaling benchmark")?;
        if !status.success() {
            bail!("the scaling benchmark ({label}) failed ({status})");
        }
        records.extend(read_records(&part)?);
    }
    write_doc(
        &out.join("scaling.json"),
        machine(root, quick),
        records,
        render_scaling,
    )
}

/// The tables of `scaling.md`: steps/s of each path per configuration, the ratios of 2 ranks to
/// one process, the collectives' share of a 2-rank step, and the all-reduce's bandwidth.
pub fn render_scaling(doc: &Value) -> String {
    let m = &doc["machine"];
    let recs = doc["records"].as_array().cloned().unwrap_or_default();
    let mut md = format!(
        "Machine: {} ({} logical CPUs), {}, commit {}{}.\n\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["logical_cpus"],
        m["date_utc"].as_str().unwrap_or("?"),
        m["git_commit"].as_str().unwrap_or("?"),
        if m["quick"] == true {
            ", `--quick`"
        } else {
            ""
        }
    );
    md += "| model | path | 1 process × 1 thread | 1 × 2 threads | 2 ranks × 1 thread | \
           2 ranks ÷ 1×1 | 2 ranks ÷ 1×2 | collectives, s/step (share) | MB/step to collectives |\n\
           |---|---|---|---|---|---|---|---|---|\n";
    let find = |model: &Value, path: &Value, ranks: u64, threads: u64| {
        recs.iter().find(|r| {
            r["suite"] == "scaling"
                && &r["model"] == model
                && &r["path"] == path
                && r["ranks"] == ranks
                && r["threads"] == threads
        })
    };
    for r in recs
        .iter()
        .filter(|r| r["suite"] == "scaling" && r["ranks"] == 1 && r["threads"] == 1)
    {
        let (model, path) = (&r["model"], &r["path"]);
        let sps = |x: Option<&Value>| x.and_then(|x| x["s_per_step"].as_f64()).map(|s| 1.0 / s);
        let (a, b) = (sps(Some(r)), sps(find(model, path, 1, 2)));
        let two = find(model, path, 2, 1);
        let c = sps(two);
        let cell = |x: Option<f64>| x.map_or("–".into(), |x| format!("{x:.2}"));
        let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) => format!("{:.2}×", x / y),
            _ => "–".into(),
        };
        let comm = two.map_or("–".into(), |t| {
            let cs = t["comm_s_per_step"].as_f64().unwrap_or(0.0);
            let s = t["s_per_step"].as_f64().unwrap_or(1.0);
            format!("{cs:.4} ({:.0}%)", 100.0 * cs / s)
        });
        let mb = two.map_or("–".into(), |t| {
            format!(
                "{:.1}",
                t["comm_bytes_per_step"].as_f64().unwrap_or(0.0) / 1e6
            )
        });
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {comm} | {mb} |\n",
            model.as_str().unwrap_or("?"),
            path.as_str().unwrap_or("?"),
            cell(a),
            cell(b),
            cell(c),
            ratio(c, a),
            ratio(c, b)
        );
    }
    md += "\n| all-reduce (2 ranks) of | seconds | buffer ÷ time |\n|---|---|---|\n";
    for r in recs.iter().filter(|r| r["suite"] == "allreduce") {
        md += &format!(
            "| {} MiB | {:.5} | {:.2} GB/s |\n",
            r["bytes"].as_u64().unwrap_or(0) >> 20,
            r["seconds"].as_f64().unwrap_or(0.0),
            r["algbw_gb_s"].as_f64().unwrap_or(0.0)
        );
    }
    md
}

fn read_records(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let recs =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    std::fs::remove_file(path).ok();
    Ok(recs)
}

/// The table of `peers.md`: steps/s of every path and the ratios ours ÷ theirs.
pub fn render_peers(doc: &Value) -> String {
    let m = &doc["machine"];
    let recs = doc["records"].as_array().cloned().unwrap_or_default();
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let mut s = format!(
        "Machine: {} ({} logical CPUs), {}, commit {}{}. Training steps per second, batch 128, SGD with Nesterov momentum; ours: candle dense, dense-mask SRigL and sparse-engine SRigL (mask updates every 100 steps included: the median step plus one measured update over 100 steps); theirs: PyTorch {} dense and masked-dense (the SRigL reference's masking), SparseProp static sparse. Ratios: ours ÷ theirs (> 1: we are faster).

",
        m["cpu"].as_str().unwrap_or("?"),
        m["logical_cpus"],
        m["date_utc"].as_str().unwrap_or("?"),
        m["git_commit"].as_str().unwrap_or("?"),
        if m["quick"] == true { ", `--quick`" } else { "" },
        recs.iter()
            .find_map(|r| r["torch"].as_str())
            .unwrap_or("?"),
    );
    s.push_str(
        "| model | sparsity | threads | candle dense | torch dense | dense ÷ torch | dense-mask SRigL | torch masked | dense-mask ÷ torch masked | sparse SRigL | SparseProp | sparse ÷ SparseProp | sparse ÷ torch dense |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
",
    );
    for p in recs.iter().filter(|r| r["suite"] == "peers") {
        let Some(o) = recs.iter().find(|r| {
            r["suite"] == "train"
                && r["model"] == p["model"]
                && r["threads"] == p["threads"]
                && (f(r, "sparsity") - f(p, "sparsity")).abs() < 1e-9
        }) else {
            continue;
        };
        let sps = |r: &Value, k: &str| 1.0 / f(r, k);
        // The sparse engine at ΔT = 100 whatever ΔT the suite ran with (`--quick` updates
        // every 20 steps): the median step plus one update's measured cost spread over 100.
        let os = 1.0 / (f(o, "sparse_median_step_s") + f(o, "update_extra_s") / 100.0);
        let (od, om) = (sps(o, "dense_s_per_step"), sps(o, "dense_mask_s_per_step"));
        let (td, tm, sp) = (
            sps(p, "torch_dense_s_per_step"),
            sps(p, "torch_masked_s_per_step"),
            sps(p, "sparseprop_s_per_step"),
        );
        s.push_str(&format!(
            "| {} | {:.0}% | {} | {od:.2} | {td:.2} | {:.2}× | {om:.2} | {tm:.2} | {:.2}× | {os:.2} | {sp:.2} | {:.2}× | {:.2}× |
",
            p["model"].as_str().unwrap_or("?"),
            f(p, "sparsity") * 100.0,
            p["threads"],
            od / td,
            om / tm,
            os / sp,
            os / td,
        ));
    }
    s.push_str(&render_peer_convs(&recs));
    s
}

/// The conv-net part of `peers.md`: our dense and dense-mask steps/s beside PyTorch's, with the
/// issue's ≥ 0.7× target checked per row.
fn render_peer_convs(recs: &[Value]) -> String {
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let mut s = String::new();
    for p in recs.iter().filter(|r| r["suite"] == "peers-conv") {
        let Some(o) = recs.iter().find(|r| {
            r["suite"] == "train-conv" && r["model"] == p["model"] && r["threads"] == p["threads"]
        }) else {
            continue;
        };
        if s.is_empty() {
            s.push_str(
                "\nConv nets (batch 128; dense-mask SRigL and PyTorch masked-dense at 90% on every conv weight; target: ours ≥ 0.7× PyTorch):\n\n\
                 | model | threads | candle dense | torch dense | dense ÷ torch | dense-mask SRigL | torch masked | dense-mask ÷ torch masked |\n\
                 |---|---|---|---|---|---|---|---|\n",
            );
        }
        let (od, om) = (
            1.0 / f(o, "dense_s_per_step"),
            1.0 / f(o, "dense_mask_s_per_step"),
        );
        let (td, tm) = (
            1.0 / f(p, "torch_dense_s_per_step"),
            1.0 / f(p, "torch_masked_s_per_step"),
        );
        let mark = |r: f64| {
            if r >= 0.7 {
                format!("{r:.2}×")
            } else {
                format!("**{r:.2}×**")
            }
        };
        s.push_str(&format!(
            "| {} | {} | {od:.3} | {td:.3} | {} | {om:.3} | {tm:.3} | {} |\n",
            p["model"].as_str().unwrap_or("?"),
            p["threads"],
            mark(od / td),
            mark(om / tm),
        ));
    }
    s
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn label(r: &Value) -> String {
    match (r["n"].as_u64(), r["m"].as_u64()) {
        (Some(n), Some(m)) => format!("{n}:{m}"),
        _ => format!("{:.0}%", r["sparsity"].as_f64().unwrap_or(0.0) * 100.0),
    }
}

fn us(ns: &Value) -> String {
    format!("{:.1}", ns.as_f64().unwrap_or(f64::NAN) / 1e3)
}

/// Finds the speedup of one record.
fn speedup(
    doc: &Value,
    op: &str,
    format: &str,
    lab: &str,
    fan_in: u64,
    batch: u64,
    threads: u64,
) -> Option<f64> {
    doc["records"].as_array()?.iter().find_map(|r| {
        (r["op"] == op
            && r["format"] == format
            && label(r) == lab
            && r["in"] == fan_in
            && r["batch"] == batch
            && r["threads"] == threads)
            .then(|| r["speedup_vs_dense"].as_f64())
            .flatten()
    })
}

fn median_ns(
    doc: &Value,
    op: &str,
    format: &str,
    lab: &str,
    fan_in: u64,
    batch: u64,
) -> Option<f64> {
    doc["records"].as_array()?.iter().find_map(|r| {
        (r["op"] == op
            && r["format"] == format
            && label(r) == lab
            && r["in"] == fan_in
            && r["batch"] == batch
            && r["threads"] == 1)
            .then(|| r["median_ns"].as_f64())
            .flatten()
    })
}

/// The tables of `bench.md`.
pub fn render_markdown(doc: &Value) -> String {
    let m = &doc["machine"];
    let mut s = String::new();
    s.push_str(&format!(
        "Machine: {} ({} logical CPUs, {}), {}, commit {}{}.\n\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["logical_cpus"],
        m["os"].as_str().unwrap_or("?"),
        m["date_utc"].as_str().unwrap_or("?"),
        m["git_commit"].as_str().unwrap_or("?"),
        if m["quick"] == true {
            ", `--quick`"
        } else {
            ""
        }
    ));
    s.push_str("Times are medians in µs (fp32); `×dense` = candle dense matmul time / sparse time, measured interleaved in the same run. Dense counterparts: forward `x·Wᵀ`, input gradient `gy·W`, value gradient `gyᵀ·x` (the dense weight gradient).\n\n");
    s.push_str("### Targets (1 thread)\n\n| target | measured | met |\n|---|---|---|\n");
    let targets: [(&str, Option<f64>, f64); 7] = [
        (
            "condensed 3072→768 90% batch 1 ≥ 5×",
            speedup(doc, "forward", "condensed", "90%", 3072, 1, 1),
            5.0,
        ),
        (
            "condensed 3072→768 90% batch 256 ≥ 2×",
            speedup(doc, "forward", "condensed", "90%", 3072, 256, 1),
            2.0,
        ),
        (
            "condensed 3072→768 99% batch 1 ≥ 20×",
            speedup(doc, "forward", "condensed", "99%", 3072, 1, 1),
            20.0,
        ),
        (
            "2:4 3072→768 batch 1 ≥ 1.6×",
            speedup(doc, "forward", "nm", "2:4", 3072, 1, 1),
            1.6,
        ),
        (
            "1:16 3072→768 batch 1 ≥ 6×",
            speedup(doc, "forward", "nm", "1:16", 3072, 1, 1),
            6.0,
        ),
        (
            "2:4 batch 1, packed inference layout ≥ 1.6×",
            speedup(doc, "forward", "nm-packed", "2:4", 3072, 1, 1),
            1.6,
        ),
        (
            "1:16 batch 1, packed inference layout ≥ 6×",
            speedup(doc, "forward", "nm-packed", "1:16", 3072, 1, 1),
            6.0,
        ),
    ];
    for (name, got, want) in targets {
        match got {
            Some(v) => s.push_str(&format!(
                "| {name} | {v:.2}× | {} |\n",
                if v >= want { "yes" } else { "**no**" }
            )),
            None => s.push_str(&format!("| {name} | not measured in this run | – |\n")),
        }
    }
    for (lab, batch) in [("90%", 1u64), ("90%", 256)] {
        if let (Some(c), Some(r)) = (
            median_ns(doc, "forward", "condensed", lab, 3072, batch),
            median_ns(doc, "forward", "csr", lab, 3072, batch),
        ) {
            let ratio = r / c;
            s.push_str(&format!(
                "| CSR within 1.5× of condensed, 90% batch {batch} | CSR/condensed time {ratio:.2} | {} |\n",
                if ratio <= 1.5 { "yes" } else { "no" }
            ));
        }
    }
    s.push('\n');
    let recs = doc["records"].as_array().cloned().unwrap_or_default();
    let ceilings: Vec<&Value> = recs.iter().filter(|r| r["suite"] == "ceiling").collect();
    if !ceilings.is_empty() {
        s.push_str("### Measured ceilings (batch 1)\n\n| threads | random L1 reads /ns | dense weight stream floats/ns | speed-up bound at density d |\n|---|---|---|---|\n");
        for r in &ceilings {
            let b = r["batch1_speedup_bound_times_density"]
                .as_f64()
                .unwrap_or(f64::NAN);
            s.push_str(&format!(
                "| {} | {:.2} | {:.2} | {b:.3} / d (90%: {:.2}×, 99%: {:.1}×) |\n",
                r["threads"],
                r["random_reads_per_ns"].as_f64().unwrap_or(f64::NAN),
                r["dense_stream_floats_per_ns"].as_f64().unwrap_or(f64::NAN),
                b / 0.1,
                b / 0.01
            ));
        }
        s.push('\n');
        let batched: Vec<&&Value> = ceilings
            .iter()
            .filter(|r| r["tile_l2_ns_per_weight"].is_number())
            .collect();
        if !batched.is_empty() {
            s.push_str(
                "### Measured ceilings (batched, one thread): a stored weight's 64-example tile column\n\n\
                 | run's threads | from a 768 KiB tile (L2) ns | from a 32 KiB tile (L1) ns | candle dense ns per 64 FMAs | speed-up bound at density d |\n|---|---|---|---|---|\n",
            );
            for r in batched {
                let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
                let b = f("batched_speedup_bound_times_density");
                s.push_str(&format!(
                    "| {} | {:.2} | {:.2} | {:.2} | {b:.3} / d (90%: {:.2}×) |\n",
                    r["threads"],
                    f("tile_l2_ns_per_weight"),
                    f("tile_l1_ns_per_weight"),
                    f("dense_ns_per_64_fma"),
                    b / 0.1,
                ));
            }
            s.push('\n');
        }
    }
    let train: Vec<&Value> = recs.iter().filter(|r| r["suite"] == "train").collect();
    if !train.is_empty() {
        s.push_str(
            "### Training steps per second (batch 128, all threads)

| model | sparsity | dense | \
             dense-mask SRigL | sparse-engine SRigL | sparse ÷ dense | one mask update | \
             mask-update overhead at ΔT = 100 |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        for r in &train {
            s.push_str(&format!(
                "| {} | {:.0}% | {:.2} | {:.2} | {:.2} | {:.2}× | {:.3} s | {:.1}% |\n",
                r["model"].as_str().unwrap_or("?"),
                f(r, "sparsity") * 100.0,
                1.0 / f(r, "dense_s_per_step"),
                1.0 / f(r, "dense_mask_s_per_step"),
                1.0 / f(r, "sparse_s_per_step"),
                f(r, "speedup_sparse_vs_dense"),
                f(r, "update_extra_s"),
                f(r, "update_overhead") * 100.0,
            ));
        }
        s.push_str("\n| train target | measured | met |\n|---|---|---|\n");
        for (sp, want) in [(0.9, 2.0), (0.99, 5.0)] {
            if let Some(r) = train
                .iter()
                .find(|r| r["model"] == "3072-3072-3072-10" && (f(r, "sparsity") - sp).abs() < 1e-9)
            {
                let v = f(r, "speedup_sparse_vs_dense");
                s.push_str(&format!(
                    "| sparse-engine SRigL {:.0}% on 3072-3072-3072-10 ≥ {want}× dense | {v:.2}× | {} |\n",
                    sp * 100.0,
                    if v >= want { "yes" } else { "**no**" }
                ));
            }
        }
        let worst = train
            .iter()
            .map(|r| f(r, "update_overhead"))
            .fold(0.0f64, f64::max);
        s.push_str(&format!(
            "| mask-update overhead ≤ 5% | worst {:.1}% | {} |\n\n",
            worst * 100.0,
            if worst <= 0.05 { "yes" } else { "**no**" }
        ));
    }
    let convs: Vec<&Value> = recs.iter().filter(|r| r["suite"] == "train-conv").collect();
    if !convs.is_empty() {
        s.push_str(
            "### Conv nets: training steps per second (batch 128, all threads)\n\n\
             | model | dense | dense-mask SRigL 90% | sparse-engine SRigL 90% | sparse ÷ dense-mask |\n\
             |---|---|---|---|---|\n",
        );
        let sps = |r: &Value, k: &str| 1.0 / r[k].as_f64().unwrap_or(f64::NAN);
        for r in &convs {
            s.push_str(&format!(
                "| {} | {:.3} | {:.3} | {:.3} | {:.2}× |\n",
                r["model"].as_str().unwrap_or("?"),
                sps(r, "dense_s_per_step"),
                sps(r, "dense_mask_s_per_step"),
                sps(r, "sparse_s_per_step"),
                sps(r, "sparse_s_per_step") / sps(r, "dense_mask_s_per_step"),
            ));
        }
        s.push_str("\n| conv target (issue #17) | measured | met |\n|---|---|---|\n");
        for (model, want) in [("lenet5", 2.0), ("resnet18", 1.5)] {
            if let Some(r) = convs.iter().find(|r| r["model"] == model) {
                let v = sps(r, "sparse_s_per_step") / sps(r, "dense_mask_s_per_step");
                s.push_str(&format!(
                    "| {model} sparse engine ≥ {want}× dense-mask | {v:.2}× | {} |\n",
                    if v >= want { "yes" } else { "**no**" }
                ));
            }
        }
        s.push('\n');
    }
    let rule: Vec<&Value> = recs
        .iter()
        .filter(|r| r["suite"] == "engine-rule")
        .collect();
    if !rule.is_empty() {
        s.push_str(
            "### Which engine `auto` picks: dense-mask vs sparse engine (batch 128, steps per second)\n\n\
             | model | method | sparsity / pattern | threads | layers in sparse storage | dense-mask | sparse | sparse ÷ dense-mask |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        let sps = |r: &Value, k: &str| 1.0 / r[k].as_f64().unwrap_or(f64::NAN);
        for r in &rule {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2}× |\n",
                r["model"].as_str().unwrap_or("?"),
                r["method"].as_str().unwrap_or("?"),
                r["setting"].as_str().unwrap_or("?"),
                r["threads"],
                r["sparse_layers"],
                sps(r, "dense_mask_s_per_step"),
                sps(r, "sparse_s_per_step"),
                sps(r, "sparse_s_per_step") / sps(r, "dense_mask_s_per_step"),
            ));
        }
        s.push('\n');
    }
    let sconv: Vec<&Value> = recs
        .iter()
        .filter(|r| r["suite"] == "sparse-conv")
        .collect();
    if !sconv.is_empty() {
        s.push_str(
            "### Sparse conv vs the GEMM conv (forward + backward, batch 32; condensed)\n\n\
             | threads | shape | density | sparse ms | GEMM conv ms | ×GEMM |\n|---|---|---|---|---|---|\n",
        );
        for r in sconv {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.2} | {:.2} | {:.2} |\n",
                r["threads"],
                r["shape"].as_str().unwrap_or("?"),
                f("density"),
                f("median_ns") / 1e6,
                f("dense_median_ns") / 1e6,
                f("speedup_vs_dense"),
            ));
        }
        s.push('\n');
    }
    // Layer ops against candle's: (suite, heading and header, decimals of the times, last
    // column's key and decimals).
    let layer_tables = [
        (
            "conv",
            "### Conv layers: `sparse_kernels::conv::conv2d` vs candle's `conv2d` (+ bias), batch 32\n\n\
             | threads | pass | shape | ours ms | candle ms | ×candle | GFLOP/s |\n|---|---|---|---|---|---|---|\n",
            2,
            ("gflop_per_s", 1),
        ),
        (
            "norm",
            "### Batch norm + ReLU: `sparse_kernels::norm::batch_norm_relu_train` vs candle-nn's `BatchNorm::forward_train` + `relu`, batch 32\n\n\
             | threads | pass | channels × plane | ours ms | candle-nn ms | ×candle-nn | GB/s |\n|---|---|---|---|---|---|---|\n",
            3,
            ("effective_gb_per_s", 1),
        ),
    ];
    for (suite, heading, ms_dp, (last, last_dp)) in layer_tables {
        let rows: Vec<&Value> = recs.iter().filter(|r| r["suite"] == suite).collect();
        if rows.is_empty() {
            continue;
        }
        s.push_str(heading);
        for r in rows {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            s.push_str(&format!(
                "| {} | {} | {} | {:.ms_dp$} | {:.ms_dp$} | {:.2} | {:.last_dp$} |\n",
                r["threads"],
                r["op"].as_str().unwrap_or("?"),
                r["shape"].as_str().unwrap_or("?"),
                f("median_ns") / 1e6,
                f("candle_median_ns") / 1e6,
                f("speedup_vs_candle"),
                f(last),
            ));
        }
        s.push('\n');
    }
    let mut threads: Vec<u64> = recs
        .iter()
        .filter(|r| r["suite"] == "kernels")
        .filter_map(|r| r["threads"].as_u64())
        .collect();
    threads.sort_unstable();
    threads.dedup();
    for t in threads {
        for op in ["forward", "input_grad", "value_grad"] {
            let rows: Vec<&Value> = recs
                .iter()
                .filter(|r| r["threads"] == t && r["op"] == op)
                .collect();
            if rows.is_empty() {
                continue;
            }
            s.push_str(&format!(
                "### {op}, {t} thread{}\n\n| format | sparsity | in→out | batch | sparse µs | dense µs | ×dense | GB/s |\n|---|---|---|---|---|---|---|---|\n",
                if t == 1 { "" } else { "s" }
            ));
            for r in rows {
                s.push_str(&format!(
                    "| {} | {} | {}→{} | {} | {} | {} | {:.2} | {:.1} |\n",
                    r["format"].as_str().unwrap_or("?"),
                    label(r),
                    r["in"],
                    r["out"],
                    r["batch"],
                    us(&r["median_ns"]),
                    us(&r["dense_median_ns"]),
                    r["speedup_vs_dense"].as_f64().unwrap_or(f64::NAN),
                    r["effective_gb_per_s"].as_f64().unwrap_or(f64::NAN),
                ));
            }
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let root = Path::new("/r");
        let o = Options::parse(&[], root).unwrap();
        assert!(!o.quick);
        assert_eq!(o.out, PathBuf::from("/r/target/bench"));
        let o = Options::parse(&["--quick".into(), "--out".into(), "x".into()], root).unwrap();
        assert!(o.quick);
        assert_eq!(o.out, PathBuf::from("x"));
        assert!(Options::parse(&["--gpu".into()], root).unwrap().gpu);
        assert!(Options::parse(&["--peers".into()], root).unwrap().peers);
        assert!(Options::parse(&["--scaling".into()], root).unwrap().scaling);
        assert!(Options::parse(&["--fast".into()], root).is_err());
        assert!(Options::parse(&["--out".into()], root).is_err());
    }

    #[test]
    fn peers_table_pairs_our_rows_with_theirs() {
        let doc = json!({
            "machine": {"cpu": "Test CPU", "logical_cpus": 2, "date_utc": "d", "git_commit": "abc", "quick": false},
            "records": [
                {"suite": "peers", "model": "m", "sparsity": 0.9, "threads": 1, "torch": "2.x",
                 "torch_dense_s_per_step": 0.2, "torch_masked_s_per_step": 0.25,
                 "sparseprop_s_per_step": 0.05},
                {"suite": "train", "model": "m", "sparsity": 0.9, "threads": 1,
                 "dense_s_per_step": 0.5, "dense_mask_s_per_step": 0.5, "sparse_s_per_step": 0.2,
                 "sparse_median_step_s": 0.09, "update_extra_s": 1.0},
                {"suite": "train", "model": "m", "sparsity": 0.9, "threads": 2,
                 "dense_s_per_step": 0.3, "dense_mask_s_per_step": 0.3, "sparse_s_per_step": 0.06}
            ]
        });
        let md = render_peers(&doc);
        assert!(md.contains("PyTorch 2.x"), "{md}");
        // ours dense 2 steps/s vs torch 5: 0.40×; sparse 10 vs SparseProp 20: 0.50×; vs torch
        // dense 2.00×. The 2-thread row has no peer record and is left out.
        assert!(
            md.contains("| m | 90% | 1 | 2.00 | 5.00 | 0.40× | 2.00 | 4.00 | 0.50× | 10.00 | 20.00 | 0.50× | 2.00× |"),
            "{md}"
        );
        assert_eq!(md.matches("| m |").count(), 1, "{md}");
        assert!(!md.contains("Conv nets"), "{md}");
    }

    #[test]
    fn scaling_table_compares_two_ranks_with_one_process() {
        let rec = |path: &str, ranks: u64, threads: u64, s: f64, comm: f64| {
            json!({"suite": "scaling", "model": "m", "path": path, "ranks": ranks,
                   "threads": threads, "s_per_step": s, "comm_s_per_step": comm,
                   "comm_bytes_per_step": 75.6e6})
        };
        let doc = json!({
            "machine": {"cpu": "Test CPU", "logical_cpus": 2, "date_utc": "d", "git_commit": "abc", "quick": true},
            "records": [
                rec("dense", 1, 1, 0.2, 0.0), rec("dense", 1, 2, 0.125, 0.0),
                rec("dense", 2, 1, 0.1, 0.025),
                rec("sparse", 1, 1, 0.05, 0.0),
                {"suite": "allreduce", "ranks": 2, "threads": 1, "bytes": 4u64 << 20,
                 "seconds": 0.002, "algbw_gb_s": 2.1}
            ]
        });
        let md = render_scaling(&doc);
        // 5 → 8 → 10 steps/s: 2 ranks 2.00× one thread, 1.25× two; collectives 25% of a step.
        assert!(
            md.contains(
                "| m | dense | 5.00 | 8.00 | 10.00 | 2.00× | 1.25× | 0.0250 (25%) | 75.6 |"
            ),
            "{md}"
        );
        // A path measured in one configuration only shows the others as missing.
        assert!(
            md.contains("| m | sparse | 20.00 | – | – | – | – | – | – |"),
            "{md}"
        );
        assert!(md.contains("| 4 MiB | 0.00200 | 2.10 GB/s |"), "{md}");
        assert!(md.contains("`--quick`"), "{md}");
    }

    #[test]
    fn peers_table_has_conv_rows_with_the_target_marked() {
        let doc = json!({
            "machine": {"cpu": "Test CPU", "logical_cpus": 2, "date_utc": "d", "git_commit": "abc", "quick": false},
            "records": [
                {"suite": "peers-conv", "model": "lenet5", "threads": 1, "torch": "2.x",
                 "torch_dense_s_per_step": 0.01, "torch_masked_s_per_step": 0.02},
                {"suite": "train-conv", "model": "lenet5", "threads": 1,
                 "dense_s_per_step": 0.02, "dense_mask_s_per_step": 0.025},
                {"suite": "train-conv", "model": "lenet5", "threads": 2,
                 "dense_s_per_step": 0.01, "dense_mask_s_per_step": 0.01}
            ]
        });
        let md = render_peers(&doc);
        // dense 50 vs 100 steps/s: 0.50× (below 0.7×, marked); masked 40 vs 50: 0.80×.
        assert!(
            md.contains("| lenet5 | 1 | 50.000 | 100.000 | **0.50×** | 40.000 | 50.000 | 0.80× |"),
            "{md}"
        );
        assert_eq!(md.matches("| lenet5 |").count(), 1, "{md}");
    }

    #[test]
    fn markdown_reports_targets_and_tables() {
        let rec = |format: &str, sparsity: f64, batch: u64, sparse: f64, dense: f64| {
            json!({"suite": "kernels", "op": "forward", "format": format, "in": 3072, "out": 768,
                   "batch": batch, "sparsity": sparsity, "n": null, "m": null, "threads": 1,
                   "median_ns": sparse, "dense_median_ns": dense, "speedup_vs_dense": dense / sparse,
                   "effective_gb_per_s": 1.0})
        };
        let doc = json!({
            "machine": {"cpu": "Test CPU", "logical_cpus": 2, "os": "linux", "date_utc": "d", "git_commit": "abc", "quick": true},
            "records": [rec("condensed", 0.9, 1, 20_000.0, 140_000.0), rec("csr", 0.9, 1, 40_000.0, 140_000.0),
                        rec("condensed", 0.9, 256, 4e6, 12e6),
                        json!({"suite": "conv", "op": "forward", "shape": "64→64 32×32 3×3 s1",
                               "batch": 32, "threads": 1, "median_ns": 2e6, "candle_median_ns": 6e6,
                               "speedup_vs_candle": 3.0, "gflop_per_s": 80.0}),
                        json!({"suite": "norm", "op": "forward", "shape": "64×32×32",
                               "batch": 32, "threads": 2, "median_ns": 2.5e6, "candle_median_ns": 1e7,
                               "speedup_vs_candle": 4.0, "effective_gb_per_s": 10.1}),
                        json!({"suite": "train-conv", "model": "lenet5", "threads": 2,
                               "dense_s_per_step": 0.02, "dense_mask_s_per_step": 0.04,
                               "sparse_s_per_step": 0.025}),
                        json!({"suite": "engine-rule", "model": "m", "method": "rigl",
                               "setting": "90%", "threads": 1, "sparse_layers": 3,
                               "dense_mask_s_per_step": 0.04, "sparse_s_per_step": 0.01}),
                        json!({"suite": "sparse-conv", "op": "forward+backward",
                               "shape": "64→64 32×32 3×3", "batch": 32, "density": 0.1,
                               "threads": 1, "median_ns": 5e7, "dense_median_ns": 1e8,
                               "speedup_vs_dense": 2.0}),
                        json!({"suite": "ceiling", "threads": 1, "random_reads_per_ns": 3.0,
                               "dense_stream_floats_per_ns": 15.0, "batch1_speedup_bound_times_density": 0.2,
                               "tile_l2_ns_per_weight": 2.8, "tile_l1_ns_per_weight": 1.6,
                               "dense_ns_per_64_fma": 1.12, "batched_speedup_bound_times_density": 0.4})]
        });
        let md = render_markdown(&doc);
        assert!(
            md.contains("Machine: Test CPU (2 logical CPUs, linux)"),
            "{md}"
        );
        assert!(
            md.contains("| condensed 3072→768 90% batch 1 ≥ 5× | 7.00× | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| condensed 3072→768 90% batch 256 ≥ 2× | 3.00× | yes |"),
            "{md}"
        );
        assert!(
            md.contains("99% batch 1 ≥ 20× | not measured in this run"),
            "{md}"
        );
        assert!(md.contains("CSR/condensed time 2.00 | no |"), "{md}");
        // 50 / 25 / 40 steps/s: the sparse engine 1.60× dense-mask, below the 2× target.
        assert!(
            md.contains("| lenet5 | 50.000 | 25.000 | 40.000 | 1.60× |"),
            "{md}"
        );
        assert!(
            md.contains("| lenet5 sparse engine ≥ 2× dense-mask | 1.60× | **no** |"),
            "{md}"
        );
        assert!(
            md.contains("| m | rigl | 90% | 1 | 3 | 25.00 | 100.00 | 4.00× |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | 64→64 32×32 3×3 | 0.1 | 50.00 | 100.00 | 2.00 |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | forward | 64→64 32×32 3×3 s1 | 2.00 | 6.00 | 3.00 | 80.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | 2.80 | 1.60 | 1.12 | 0.400 / d (90%: 4.00×) |"),
            "{md}"
        );
        assert!(
            md.contains("| 2 | forward | 64×32×32 | 2.500 | 10.000 | 4.00 | 10.1 |"),
            "{md}"
        );
        assert!(
            md.contains("| condensed | 90% | 3072→768 | 1 | 20.0 | 140.0 | 7.00 | 1.0 |"),
            "{md}"
        );
    }
}
