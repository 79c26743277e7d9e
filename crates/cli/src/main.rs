//! `dst`: the command line of the sparse-training toolkit.
//!
//! Only the skeleton exists so far: subcommands land with the training and CLI issues.

use clap::{Parser, Subcommand};

/// Train sparse neural networks and run them fast.
#[derive(Parser)]
#[command(name = "dst", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a sparse model (not yet available).
    Train {
        /// Any flags; ignored until training lands.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Train { .. } => {
            eprintln!(
                "dst train: not yet available — training lands with the models and CLI issues; \
                 see README.md for what works today"
            );
            std::process::exit(2);
        }
    }
}
