//! `dst`: the command line of the sparse-training toolkit.
//!
//! Every failure prints one line naming the file, field or flag at fault and exits with code 2;
//! outputs are written to temporary files and renamed, so nothing is left half-written.

mod export;
mod mask_update;
mod report;
mod train;

use std::process::ExitCode;

/// A caching allocator. candle allocates a fresh tensor for every operation, and glibc's malloc
/// hands every block above its mmap threshold (at most 32 MB; a 3072×3072 weight is 37.7 MB)
/// to mmap, so each such tensor is page-faulted and zeroed anew and unmapped when dropped: about
/// 30% of a dense training step on the wide MLP (perf, docs/benchmarks.md). mimalloc keeps
/// freed memory for reuse: the dense step there went from 0.84 s to 0.37 s; and
/// `models::alloc::keep_freed_memory` stops it handing that memory back to the OS between steps.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// Train sparse neural networks and run them fast.
#[derive(Parser)]
#[command(name = "dst", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (dense, Static, SET, RigL, SRigL, LBC, SR-STE, one-shot N:M as ASP).
    #[command(after_help = "Examples:\n  \
        dst train --model lenet-300-100 --method srigl --sparsity 0.9 --distribution erk \
        --epochs 20 --seed 1 --out runs/srigl90\n  \
        dst train --method lbc --n 2 --m 4 --out runs/lbc24\n  \
        dst train --method srigl --sparsity 0.9 --engine sparse --out runs/srigl90s\n  \
        dst train --config run.toml --epochs 5\n  \
        dst train --resume runs/srigl90")]
    Train(Box<train::TrainArgs>),
    /// Accuracy and loss of a trained run, or of an exported model file, on the test set.
    #[command(after_help = "Examples:\n  dst eval runs/srigl90\n  dst eval srigl90.safetensors")]
    Eval(export::EvalArgs),
    /// Predicted classes of the images of an IDX file, from an exported model file.
    #[command(after_help = "Example:\n  dst predict srigl90.safetensors --input \
                      /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")]
    Predict(export::PredictArgs),
    /// Export the trained layers to condensed, N:M or CSR (dense layers stay dense).
    #[command(
        after_help = "Examples:\n  dst export runs/srigl90 --format condensed --out srigl90.safetensors\n  \
                      dst export runs/lbc24 --format nm --out lbc24.safetensors"
    )]
    Export(export::ExportArgs),
    /// Per-layer format, shape, nnz, sparsity, fan-in and N:M validity of a safetensors file.
    #[command(after_help = "Examples:\n  dst inspect srigl90.safetensors\n  \
                      dst inspect runs/srigl90/masks.safetensors --show-mask fc3.weight")]
    Inspect(export::InspectArgs),
    /// Apply exactly one mask update to the layers of a state file.
    #[command(
        after_help = "The state file holds, per layer, `<layer>.weight`, `<layer>.grad` and \
                      `<layer>.mask` (f32, [rows, fan_in] or a conv shape).\n\nExample:\n  \
                      dst mask-update --method srigl --state in.safetensors --out out.safetensors \
                      --drop-fraction 0.3"
    )]
    MaskUpdate(mask_update::MaskUpdateArgs),
    /// Kernel timings against dense for an exported model's layers or for synthetic layers.
    #[command(
        after_help = "Examples:\n  dst bench\n  dst bench srigl90.safetensors --batch 1,64\n  \
                      dst bench srigl90.safetensors --end-to-end"
    )]
    Bench(export::BenchArgs),
    /// A self-contained HTML report (SVG charts) of one or more runs.
    #[command(after_help = "Examples:\n  dst report runs/srigl90\n  \
                      dst report runs/dense runs/rigl90 runs/srigl90 --out compare.html")]
    Report(report::ReportArgs),
}

/// Parses the command line. Help and version go to stdout (exit 0); a parse error is one line
/// on stderr with exit code 2 (clap's own message runs to three lines with a usage block).
fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, ExitCode> {
    use clap::{error::ErrorKind, CommandFactory, FromArgMatches};
    let cmd = Cli::command()
        .mut_subcommands(|c| c.allow_negative_numbers(true))
        .color(clap::ColorChoice::Never);
    let parsed = cmd
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m));
    match parsed {
        Ok(cli) => Ok(cli),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            print!("{e}");
            Err(ExitCode::SUCCESS)
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprint!("{e}");
            Err(ExitCode::from(2))
        }
        Err(e) => {
            eprintln!("{}", one_line(&e.to_string()));
            Err(ExitCode::from(2))
        }
    }
}

/// clap's message without its usage block and `--help` hint, on one line.
fn one_line(msg: &str) -> String {
    let first: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let line = first.join(" ");
    if line.starts_with("error:") {
        line
    } else {
        format!("error: {line}")
    }
}

fn main() -> ExitCode {
    models::process::init();
    let cli = match parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Train(a) => train::run(*a),
        Command::Eval(a) => export::eval(a),
        Command::Predict(a) => export::predict(a),
        Command::Export(a) => export::export(a),
        Command::Inspect(a) => export::inspect(a),
        Command::MaskUpdate(a) => mask_update::run(a),
        Command::Bench(a) => export::bench(a),
        Command::Report(a) => report::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(2)
        }
    }
}
