//! Project automation (the matklad/cargo-xtask pattern): `cargo xtask <task>`.
//!
//! Tasks:
//! - `check-layers`: fail, naming the edge, if a crate depends on its own or a higher layer;
//! - `bench`: the benchmark suites with ratios against dense (see `bench.rs`);
//! - `accuracy`: the Fashion-MNIST results table (see `accuracy.rs`);
//! - `release`: version / changelog checks, workspace packaging, tag (see `release.rs`);
//! - `check-report`: a `dst report` page in headless Chromium (see `report_check.rs`);
//! - `examples`: every example once at small sizes (see `examples.rs`);
//! - `fuzz`: the loaders' mutation fuzzer, `examples/fuzz_loaders.rs`, for a given time;
//! - `check-code-map`: every source file is named in docs/ARCHITECTURE.md (see `code_map.rs`);
//! - `ci`: runs `.ci/run`, the one definition of CI.
//!
//! xtask never depends on candle, so it builds in seconds.

mod accuracy;
mod bench;
mod code_map;
mod examples;
mod layers;
mod release;
mod report_check;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const HELP: &str = "\
cargo xtask <TASK>

Tasks:
  check-layers   fail if a crate depends on a crate of its own or a higher layer
                 (sparse-formats < sparse-kernels < dst-core < lbc < models < cli),
                 or if xtask depends on candle
  bench [--quick] [--gpu] [--peers] [--scaling] [--out DIR]
                 run the kernel benchmarks (1 thread and all threads) against candle's
                 dense matmul in the same run; writes DIR/bench.json and DIR/bench.md
                 (default DIR: target/bench); --gpu runs only the CUDA suite against
                 cuBLAS (needs an NVIDIA GPU, driver and NVRTC) and writes DIR/gpu.json;
                 --peers times PyTorch dense / masked-dense and SparseProp training beside
                 ours at 1 and 2 threads (creates target/peers/venv from PyPI once, ~4 GB)
                 and writes DIR/peers.{json,md}; --scaling times data-parallel training
                 of the wide MLP (1 process x 1 and 2 threads, 2 MPI ranks; needs Open MPI)
                 and writes DIR/scaling.{json,md}
  accuracy [--seeds 3] [--epochs 20] [--jobs 2] [--out DIR] [--only NAME] [--render]
                 train LeNet-300-100 (every method x sparsity / N:M pattern) and LeNet-5
                 on Fashion-MNIST x seed through `dst train`; writes DIR/results.md (mean ± std,
                 each row's command) (default DIR: target/accuracy; runs under DIR/e<epochs>/;
                 finished runs are not run again; --render: only write the tables)
  release [--dry-run] [--verify] [--allow-dirty]
                 check that crate versions and internal requirements agree and that
                 CHANGELOG.md has the version, run `cargo publish --workspace --dry-run`
                 (dependency = layer order), then tag v<version> (not with --dry-run)
  check-report FILE.html [--screenshot PNG]
                 render a `dst report` page in headless Chromium; fail on any console
                 message or a missing screenshot (needs chromium)
  examples       run every example once at small sizes (the README's try-it commands;
                 the loaders' fuzzer among them, for 20 s)
  fuzz [--time SECONDS] [--seed N]
                 fuzz every loader (safetensors layers, checkpoints, IDX, CIFAR-10,
                 configs) for SECONDS (default 600) after the regression corpus in
                 examples/fuzz_corpus; findings go to target/fuzz/findings
  check-code-map fail if a source file is not named in docs/ARCHITECTURE.md's code map
  ci             run .ci/run (fmt, clippy, layers, code map, the README test command,
                 examples, the CUDA build and PTX test)
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check-layers") => {
            layers::check(&workspace_root())?;
            println!("layers ok: {}", layers::LAYERS.join(" < "));
            Ok(())
        }
        Some("ci") => ci(),
        Some("examples") => examples::run(&workspace_root()),
        Some("fuzz") => fuzz(&args[1..]),
        Some("check-code-map") => {
            code_map::check(&workspace_root())?;
            println!("code map ok");
            Ok(())
        }
        Some("release") => {
            release::release(&workspace_root(), release::Options::parse(&args[1..])?)
        }
        Some("check-report") => report_check::run(&args[1..]),
        Some("accuracy") => accuracy::run(
            &workspace_root(),
            accuracy::Options::parse(&args[1..], &workspace_root())?,
        ),
        Some("bench") => bench::run(
            &workspace_root(),
            bench::Options::parse(&args[1..], &workspace_root())?,
        ),
        Some("help" | "--help" | "-h") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n\n{HELP}"),
    }
}

/// The workspace root: xtask's manifest folder's parent.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `cargo xtask fuzz [--time S] [--seed N]`: the fuzz example in release mode, 600 s by default.
fn fuzz(args: &[String]) -> Result<()> {
    let mut run = vec![
        "run",
        "--release",
        "-p",
        "examples",
        "--example",
        "fuzz_loaders",
        "--",
    ];
    let mut i = 0;
    let mut time_given = false;
    while i < args.len() {
        match args[i].as_str() {
            flag @ ("--time" | "--seed") => {
                let v = args
                    .get(i + 1)
                    .with_context(|| format!("{flag} needs a value"))?;
                time_given |= flag == "--time";
                run.extend([flag, v.as_str()]);
                i += 2;
            }
            other => bail!("fuzz: unknown option `{other}` (--time SECONDS, --seed N)"),
        }
    }
    if !time_given {
        run.extend(["--time", "600"]);
    }
    cargo(&run)
}

/// `.ci/run` is the one definition of CI; this runs it.
fn ci() -> Result<()> {
    let script = workspace_root().join(".ci/run");
    let status = Command::new("bash")
        .arg(&script)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}
