//! `cargo xtask check-layers`: the workspace's crates form strict layers.
//!
//! Order: sparse-formats (L0) < sparse-kernels (L1) < dst-core (L2) < lbc (L3) < models (L4)
//! < cli (L5). A crate may depend (normally, for build or for tests) only on crates of lower
//! layers; xtask never depends on candle, so that every `cargo xtask` stays a seconds-long build.

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The layered crates, lowest first.
pub const LAYERS: [&str; 6] = [
    "sparse-formats",
    "sparse-kernels",
    "dst-core",
    "lbc",
    "models",
    "cli",
];

fn layer_of(name: &str) -> Option<usize> {
    LAYERS.iter().position(|&l| l == name)
}

/// Every violation found in `cargo metadata --format-version 1 --no-deps` output, one line each.
pub fn violations(metadata: &Value) -> Result<Vec<String>> {
    let packages = metadata["packages"]
        .as_array()
        .context("cargo metadata: no `packages` array")?;
    let mut out = Vec::new();
    for p in packages {
        let name = p["name"].as_str().context("package without a name")?;
        let deps = p["dependencies"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for d in deps {
            let dep = d["name"].as_str().context("dependency without a name")?;
            let kind = d["kind"].as_str().unwrap_or("normal");
            if name == "xtask" && dep.starts_with("candle") {
                out.push(format!(
                    "`xtask` depends on `{dep}` ({kind}): xtask must never depend on candle"
                ));
            }
            if let (Some(lp), Some(ld)) = (layer_of(name), layer_of(dep)) {
                if ld >= lp {
                    out.push(format!(
                        "`{name}` (L{lp}) depends on `{dep}` (L{ld}) ({kind} dependency): a crate \
                         may only depend on lower layers ({})",
                        LAYERS.join(" < ")
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// Runs `cargo metadata` in `dir` and fails, naming every bad edge, if the layering is broken.
pub fn check(dir: &std::path::Path) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(dir)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let v = violations(&meta)?;
    if v.is_empty() {
        Ok(())
    } else {
        bail!("layering violated:\n  {}", v.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pkg(name: &str, deps: &[(&str, Option<&str>)]) -> Value {
        json!({
            "name": name,
            "dependencies": deps.iter().map(|(d, k)| json!({"name": d, "kind": k})).collect::<Vec<_>>()
        })
    }

    #[test]
    fn downward_edges_pass() {
        let meta = json!({"packages": [
            pkg("sparse-formats", &[("candle-core", None)]),
            pkg("dst-core", &[("sparse-formats", None), ("sparse-kernels", None)]),
            pkg("cli", &[("models", None), ("sparse-formats", None)]),
            pkg("xtask", &[("anyhow", None)]),
        ]});
        assert!(violations(&meta).unwrap().is_empty());
    }

    #[test]
    fn upward_same_layer_and_dev_edges_fail_naming_the_edge() {
        let meta = json!({"packages": [
            pkg("sparse-formats", &[("dst-core", None)]),
            pkg("lbc", &[("lbc", Some("dev"))]),
            pkg("sparse-kernels", &[("models", Some("dev"))]),
            pkg("xtask", &[("candle-core", None)]),
        ]});
        let v = violations(&meta).unwrap();
        assert_eq!(v.len(), 4, "{v:#?}");
        assert!(v[0].contains("`sparse-formats` (L0) depends on `dst-core` (L2)"));
        assert!(v[1].contains("`lbc` (L3) depends on `lbc` (L3) (dev dependency)"));
        assert!(v[2].contains("`sparse-kernels` (L1) depends on `models` (L4)"));
        assert!(v[3].contains("xtask must never depend on candle"));
    }

    /// The real thing: a throw-away workspace with a planted upward dependency, read through
    /// `cargo metadata`, is refused with the edge named; the fixed workspace passes.
    #[test]
    fn planted_upward_dependency_in_a_real_workspace_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let write = |rel: &str, text: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        write(
            "Cargo.toml",
            "[workspace]\nresolver = \"2\"\nmembers = [\"sparse-formats\", \"dst-core\"]\n",
        );
        let krate = |name: &str, deps: &str| {
            write(
                &format!("{name}/Cargo.toml"),
                &format!(
                    "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\n{deps}"
                ),
            );
            write(&format!("{name}/src/lib.rs"), "");
        };
        krate("sparse-formats", "dst-core = { path = \"../dst-core\" }\n");
        krate("dst-core", "");
        let err = check(root).unwrap_err().to_string();
        assert!(
            err.contains("`sparse-formats` (L0) depends on `dst-core` (L2)"),
            "{err}"
        );
        krate("sparse-formats", "");
        krate(
            "dst-core",
            "sparse-formats = { path = \"../sparse-formats\" }\n",
        );
        check(root).unwrap();
    }
}
