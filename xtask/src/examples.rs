//! `cargo xtask examples`: runs every example of `examples/Cargo.toml` once, at small sizes, so
//! that the README's "try it" commands cannot rot. An example without an entry in [`ARGS`]
//! fails the task: a new example must say how CI runs it.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The committed Fashion-MNIST slice (1,000 train / 500 test images).
const FIXTURE: &str = "crates/models/tests/fixtures/fashion-mnist-tiny";

/// Per example, the arguments of its CI run (`{fixture}` is replaced by [`FIXTURE`]).
const ARGS: &[(&str, &[&str])] = &[
    ("formats", &[]),
    ("kernels", &[]),
    ("srigl_custom_loop", &[]),
    ("lbc_nm", &[]),
    (
        "train_fashion_mnist",
        &["--data-dir", "{fixture}", "--epochs", "1"],
    ),
    ("fuzz_loaders", &["--time", "20"]),
    ("model_file", &["--data-dir", "{fixture}", "--epochs", "2"]),
    (
        "nm_mask_study",
        &["--data-dir", "{fixture}", "--epochs", "2", "--lbc-t-f", "1"],
    ),
];

/// The `name = "..."` of every `[[example]]` table of `examples/Cargo.toml`.
pub fn declared(root: &Path) -> Result<Vec<String>> {
    let path = root.join("examples/Cargo.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut names = Vec::new();
    let mut in_example = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_example = line == "[[example]]";
        } else if in_example {
            if let Some(v) = line.strip_prefix("name") {
                let v = v
                    .trim_start()
                    .trim_start_matches('=')
                    .trim()
                    .trim_matches('"');
                names.push(v.to_string());
            }
        }
    }
    Ok(names)
}

/// Builds every example of the workspace in release mode the way the README's test command
/// does (`--workspace`: the dependencies get that build's features, so after the test command
/// nothing is compiled again; `cargo run -p examples` would rebuild candle with
/// `examples`' features alone), and returns the executables of `examples/`'s examples by name.
fn build(root: &Path) -> Result<HashMap<String, PathBuf>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let args = [
        "build",
        "--release",
        "--workspace",
        "--examples",
        "--message-format=json-render-diagnostics",
    ];
    eprintln!("$ cargo {}", args.join(" "));
    let out = Command::new(cargo)
        .args(args)
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build --examples")?;
    if !out.status.success() {
        bail!("cargo {} failed ({})", args.join(" "), out.status);
    }
    let manifest = root.join("examples/Cargo.toml").canonicalize()?;
    let mut exes = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_example = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "example"));
        if msg["reason"] != "compiler-artifact"
            || !is_example
            || msg["manifest_path"]
                .as_str()
                .and_then(|p| Path::new(p).canonicalize().ok())
                != Some(manifest.clone())
        {
            continue;
        }
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            exes.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    Ok(exes)
}

/// Runs every declared example with its [`ARGS`].
pub fn run(root: &Path) -> Result<()> {
    let names = declared(root)?;
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !ARGS.iter().any(|(a, _)| a == n))
        .collect();
    if !missing.is_empty() {
        bail!(
            "examples without a CI run in xtask/src/examples.rs: {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let exes = build(root)?;
    for name in &names {
        let (_, args) = ARGS.iter().find(|(a, _)| a == name).expect("checked");
        let exe = exes
            .get(name)
            .with_context(|| format!("cargo built no executable for example {name}"))?;
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "{fixture}" { FIXTURE } else { a })
            .collect();
        eprintln!("$ {} {}", exe.display(), args.join(" "));
        let status = Command::new(exe)
            .args(&args)
            .current_dir(root)
            .status()
            .with_context(|| format!("running example {name}"))?;
        if !status.success() {
            bail!("example {name} failed ({status})");
        }
    }
    println!("{} examples ran", names.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_has_a_ci_run_and_every_run_an_example() {
        let names = declared(&crate::workspace_root()).unwrap();
        assert!(names.len() >= 6, "{names:?}");
        for n in &names {
            assert!(ARGS.iter().any(|(a, _)| a == n), "no CI run for {n}");
        }
        for (a, _) in ARGS {
            assert!(names.iter().any(|n| n == a), "{a} is not an example");
        }
    }
}
