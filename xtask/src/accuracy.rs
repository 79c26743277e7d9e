//! `cargo xtask accuracy`: the Fashion-MNIST results table of `docs/results.md`, by running
//! `dst train` for every method × sparsity (or N:M pattern) × seed and summarising mean ± std.
//!
//! Runs go to `DIR/e<epochs>/<config>-s<seed>` and a finished run (one with `summary.json`) is not run
//! again, so an interrupted sweep continues where it stopped. Runs execute `--jobs` at a time,
//! each on one thread (results do not depend on the thread count).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};

/// Settings of the sweep.
pub struct Options {
    seeds: u64,
    epochs: usize,
    jobs: usize,
    out: PathBuf,
    only: Option<String>,
    /// Only write the tables from the runs already finished (start none).
    render: bool,
}

impl Options {
    /// `[--seeds N] [--epochs N] [--jobs N] [--out DIR] [--only SUBSTRING] [--render]`.
    pub fn parse(args: &[String], root: &Path) -> Result<Options> {
        let mut o = Options {
            seeds: 3,
            epochs: 20,
            jobs: 2,
            out: root.join("target/accuracy"),
            only: None,
            render: false,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--seeds" => o.seeds = value()?.parse().context("--seeds")?,
                "--epochs" => o.epochs = value()?.parse().context("--epochs")?,
                "--jobs" => o.jobs = value()?.parse::<usize>().context("--jobs")?.max(1),
                "--out" => o.out = PathBuf::from(value()?),
                "--only" => o.only = Some(value()?.clone()),
                "--render" => o.render = true,
                other => bail!("accuracy: unknown flag `{other}`"),
            }
        }
        Ok(o)
    }
}

/// One row of the table: a name, the network it trains and the `dst train` flags that define
/// it (every flag that a default could change is passed: engine, initialisation).
struct Config {
    name: String,
    label: String,
    model: &'static str,
    flags: Vec<String>,
}

const MLP: &str = "LeNet-300-100";
const LENET5: &str = "LeNet-5";

fn configs() -> Vec<Config> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let pct = |sp: &str| (sp.parse::<f64>().unwrap() * 100.0).round();
    let mut c = vec![Config {
        name: "dense".into(),
        label: "dense".into(),
        model: MLP,
        flags: s(&["--method", "dense"]),
    }];
    // Each dst method with the initialisation its reference uses (docs/algorithms.md §6.2).
    let dst = [
        ("static", "Static", "dense", &[][..]),
        ("set", "SET", "dense", &[][..]),
        ("rigl", "RigL", "dense", &[][..]),
        (
            "srigl",
            "SRigL, no ablation",
            "sparse-he",
            &["--no-ablation"][..],
        ),
        ("srigl", "SRigL", "sparse-he", &[][..]),
    ];
    for sp in ["0.8", "0.9", "0.95", "0.99"] {
        for (m, label, init, extra) in dst {
            let mut flags = s(&["--method", m, "--sparsity", sp, "--distribution", "erk"]);
            flags.extend(s(&["--init", init]));
            flags.extend(s(extra));
            let tag = if extra.is_empty() { "" } else { "-noabl" };
            c.push(Config {
                name: format!("{m}{tag}-{sp}"),
                label: format!("{label} {}%", pct(sp)),
                model: MLP,
                flags,
            });
        }
    }
    // The sparse training engine (same SRigL, weights in condensed storage): its accuracy must
    // match the dense-mask rows above within seed noise.
    for sp in ["0.9", "0.99"] {
        c.push(Config {
            name: format!("srigl-sparse-engine-{sp}"),
            label: format!("SRigL {}%, sparse engine", pct(sp)),
            model: MLP,
            flags: s(&[
                "--method",
                "srigl",
                "--sparsity",
                sp,
                "--distribution",
                "erk",
                "--init",
                "sparse-he",
                "--engine",
                "sparse",
            ]),
        });
    }
    let nm_methods: [(&str, &str, &[&str]); 4] = [
        ("lbc", "LBC", &["--method", "lbc"]),
        ("srste", "SR-STE", &["--method", "srste"]),
        (
            "asp",
            "ASP (dense ½, prune, fine-tune ½)",
            &["--method", "nm-magnitude"],
        ),
        (
            "nm-init",
            "magnitude at init",
            &["--method", "nm-magnitude", "--nm-prune-epoch", "0"],
        ),
    ];
    for (n, m) in [(2, 4), (1, 4), (2, 8), (1, 16)] {
        for (tag, label, method) in nm_methods {
            let mut flags = s(method);
            flags.extend(s(&["--n", &n.to_string(), "--m", &m.to_string()]));
            // The output layer stays dense (as in the references); fc2's fan-in of 300 has no
            // groups of 8 or 16, so for those patterns it stays dense too.
            flags.extend(s(&["--dense-layer", "fc3.weight"]));
            if m > 4 {
                flags.extend(s(&["--dense-layer", "fc2.weight"]));
            }
            c.push(Config {
                name: format!("{tag}-{n}of{m}"),
                label: format!("{label} {n}:{m}"),
                model: MLP,
                flags,
            });
        }
    }
    // LeNet-5: dense, RigL and SRigL at 90 / 95%, the N:M methods at 2:4 on fc1 and fc2 (conv1
    // has one input channel and conv2 six, so neither splits into groups of 4 channels — the
    // hardware axis, docs/algorithms.md §1.3 — and fc3 is the output layer).
    // lr 0.01: at the default 0.1 dense LeNet-5 collapses to chance (seed 1: 10.00% after 20
    // epochs, every prediction one class).
    let l5 = |v: &[&str]| {
        let mut f = s(&["--model", "lenet5", "--lr", "0.01"]);
        f.extend(s(v));
        f
    };
    c.push(Config {
        name: "lenet5-dense".into(),
        label: "dense".into(),
        model: LENET5,
        flags: l5(&["--method", "dense"]),
    });
    for sp in ["0.9", "0.95"] {
        for (m, label, init) in [("rigl", "RigL", "dense"), ("srigl", "SRigL", "sparse-he")] {
            c.push(Config {
                name: format!("lenet5-{m}-{sp}"),
                label: format!("{label} {}%", pct(sp)),
                model: LENET5,
                flags: l5(&[
                    "--method",
                    m,
                    "--sparsity",
                    sp,
                    "--distribution",
                    "erk",
                    "--init",
                    init,
                ]),
            });
        }
    }
    for (tag, label, method) in &nm_methods[..3] {
        let mut flags = l5(method);
        flags.extend(s(&["--n", "2", "--m", "4"]));
        for l in ["conv1", "conv2", "fc3"] {
            flags.extend(s(&["--dense-layer", &format!("{l}.weight")]));
        }
        c.push(Config {
            name: format!("lenet5-{tag}-2of4"),
            label: format!("{label} 2:4 (fc1, fc2)"),
            model: LENET5,
            flags,
        });
    }
    // Every row names its engine: the default (`auto`) picks by method and sparsity, so a row
    // without the flag would silently change engine with the default.
    for cfg in &mut c {
        if !cfg.flags.iter().any(|f| f == "--engine") {
            cfg.flags.extend(s(&["--engine", "dense-mask"]));
        }
    }
    c
}

/// The initialisation a row's flags name (`—` for dense and N:M rows, which start from the
/// dense initialisation).
fn init_of(c: &Config) -> &str {
    c.flags
        .iter()
        .position(|f| f == "--init")
        .and_then(|i| c.flags.get(i + 1))
        .map_or("—", String::as_str)
}

/// The engine a row's flags name.
fn engine_of(c: &Config) -> &str {
    c.flags
        .iter()
        .position(|f| f == "--engine")
        .and_then(|i| c.flags.get(i + 1))
        .map_or("?", String::as_str)
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Runs the sweep and writes `DIR/results.md`.
pub fn run(root: &Path, o: Options) -> Result<()> {
    if !o.render {
        crate::cargo(&["build", "--release", "-p", "cli"])?;
    }
    let dst = root.join("target/release/dst");
    std::fs::create_dir_all(&o.out).with_context(|| format!("{}", o.out.display()))?;
    let all: Vec<Config> = configs()
        .into_iter()
        .filter(|c| o.only.as_ref().is_none_or(|s| c.name.contains(s.as_str())))
        .collect();
    let mut queue = VecDeque::new();
    for (i, c) in all.iter().enumerate() {
        for seed in 1..=o.seeds {
            let dir = o.out.join(format!("e{}/{}-s{seed}", o.epochs, c.name));
            if !o.render && !dir.join("summary.json").exists() {
                let _ = std::fs::remove_dir_all(&dir); // an unfinished run starts over
                queue.push_back((i, seed, dir));
            }
        }
    }
    let total = queue.len();
    eprintln!(
        "{total} runs to do ({} configs × {} seeds)",
        all.len(),
        o.seeds
    );
    let queue = Arc::new(Mutex::new(queue));
    let failures = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        for _ in 0..o.jobs {
            scope.spawn(|| loop {
                let Some((i, seed, dir)) = queue.lock().expect("queue").pop_front() else {
                    break;
                };
                let c = &all[i];
                let status = Command::new(&dst)
                    .arg("train")
                    .args(&c.flags)
                    .args([
                        "--epochs",
                        &o.epochs.to_string(),
                        "--seed",
                        &seed.to_string(),
                    ])
                    .args([
                        "--threads",
                        "1",
                        "--checkpoint-every",
                        "0",
                        "--quiet",
                        "--out",
                    ])
                    .arg(&dir)
                    .status();
                let left = queue.lock().expect("queue").len();
                match status {
                    Ok(s) if s.success() => eprintln!("done {} seed {seed} ({left} left)", c.name),
                    other => failures
                        .lock()
                        .expect("failures")
                        .push(format!("{} seed {seed}: {other:?}", c.name)),
                }
            });
        }
    });
    let failures = failures.lock().expect("failures").clone();
    let mut md = String::new();
    let mut model = "";
    for c in &all {
        if c.model != model {
            model = c.model;
            md.push_str(&format!(
                "\n### {model}\n\n| method | engine | init | test accuracy (mean ± std over {} \
                 seeds, %) | sparsity | wall s / run | command (`--seed 1..{}`) |\n\
                 |---|---|---|---|---|---|---|\n",
                o.seeds, o.seeds
            ));
        }
        let (mut acc, mut sparsity, mut wall) = (Vec::new(), Vec::new(), Vec::new());
        for seed in 1..=o.seeds {
            let p = o
                .out
                .join(format!("e{}/{}-s{seed}/summary.json", o.epochs, c.name));
            if let Ok(bytes) = std::fs::read(&p) {
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).with_context(|| format!("{}", p.display()))?;
                acc.push(v["test_accuracy"].as_f64().unwrap_or(f64::NAN) * 100.0);
                sparsity.push(v["sparsity"].as_f64().unwrap_or(f64::NAN));
                wall.push(v["wall_s"].as_f64().unwrap_or(f64::NAN));
            }
        }
        if acc.is_empty() {
            continue;
        }
        let (m, s) = mean_std(&acc);
        md.push_str(&format!(
            "| {} | {} | {} | {m:.2} ± {s:.2}{} | {:.4} | {:.0} | `dst train {} --epochs {}` |\n",
            c.label,
            engine_of(c),
            init_of(c),
            if acc.len() < o.seeds as usize {
                format!(" ({} seeds)", acc.len())
            } else {
                String::new()
            },
            mean_std(&sparsity).0,
            mean_std(&wall).0,
            c.flags.join(" "),
            o.epochs
        ));
    }
    let path = o.out.join("results.md");
    std::fs::write(&path, &md).with_context(|| format!("{}", path.display()))?;
    print!("{md}");
    eprintln!("→ {}", path.display());
    if !failures.is_empty() {
        bail!("{} runs failed: {}", failures.len(), failures.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row names its engine explicitly, and only the sparse-engine rows run the sparse
    /// engine (a row relying on `auto` compared the sparse engine with itself once `auto`
    /// became the default).
    #[test]
    fn every_row_names_its_engine() {
        for c in configs() {
            let e = engine_of(&c);
            let expect = if c.name.contains("sparse-engine") {
                "sparse"
            } else {
                "dense-mask"
            };
            assert_eq!(e, expect, "{}", c.name);
        }
    }

    /// Every dst row names its initialisation, the one its method's reference uses, so a change
    /// of the default cannot change a row silently.
    #[test]
    fn every_dst_row_names_its_reference_initialisation() {
        for c in configs() {
            let method =
                c.flags[c.flags.iter().position(|f| f == "--method").unwrap() + 1].as_str();
            let expect = match method {
                "srigl" => "sparse-he",
                "static" | "set" | "rigl" => "dense",
                _ => "—",
            };
            assert_eq!(init_of(&c), expect, "{}", c.name);
        }
    }
}
