//! `cargo xtask release [--dry-run] [--verify] [--allow-dirty]`: checks that every published
//! crate has the workspace version and that every internal dependency asks for it, that
//! `CHANGELOG.md` has an entry for it, packages the whole workspace in dependency (= layer)
//! order with `cargo publish --workspace --dry-run` (one run, so each crate is checked against
//! the packaged lower layers rather than crates.io), and tags `v<version>`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Options of the release task.
pub struct Options {
    dry_run: bool,
    verify: bool,
    allow_dirty: bool,
}

impl Options {
    /// Parses the flags.
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            dry_run: false,
            verify: false,
            allow_dirty: false,
        };
        for a in args {
            match a.as_str() {
                "--dry-run" => o.dry_run = true,
                "--verify" => o.verify = true,
                "--allow-dirty" => o.allow_dirty = true,
                other => bail!("release: unknown flag `{other}`"),
            }
        }
        Ok(o)
    }
}

/// The single version of the published crates, or every disagreement, one line each.
pub fn check_versions(metadata: &Value) -> Result<String, Vec<String>> {
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let published: Vec<&Value> = packages
        .iter()
        .filter(|p| p["publish"].as_array().is_none_or(|r| !r.is_empty()))
        .collect();
    let names: Vec<&str> = published
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    let Some(first) = published.first() else {
        return Err(vec!["no publishable crate".into()]);
    };
    let version = first["version"].as_str().unwrap_or_default().to_string();
    let mut problems = Vec::new();
    for p in &published {
        let (name, v) = (
            p["name"].as_str().unwrap_or("?"),
            p["version"].as_str().unwrap_or("?"),
        );
        if v != version {
            problems.push(format!("{name} is at {v}, {} at {version}", names[0]));
        }
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let dep = d["name"].as_str().unwrap_or("?");
            if names.contains(&dep) {
                let req = d["req"].as_str().unwrap_or("*");
                if req != format!("^{version}") {
                    problems.push(format!(
                        "{name} depends on {dep} `{req}`, not `^{version}` (set `version` in the \
                         root Cargo.toml's [workspace.dependencies])"
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(version)
    } else {
        Err(problems)
    }
}

/// The `## [version]` (or `## version`) heading of `version`'s CHANGELOG entry, if any.
fn entry_heading<'a>(changelog: &'a str, version: &str) -> Option<&'a str> {
    changelog.lines().map(str::trim).find(|l| {
        l.starts_with("## ")
            && (l[3..].starts_with(&format!("[{version}]")) || l[3..].starts_with(version))
    })
}

/// Why `version` cannot be released by its CHANGELOG entry: there is none, or its heading
/// still says "unreleased" (a release gets its date first). `None` when it is ready.
pub fn changelog_blocker(changelog: &str, version: &str) -> Option<String> {
    match entry_heading(changelog, version) {
        None => Some(format!("CHANGELOG.md has no `## [{version}]` entry")),
        Some(h) if h.to_lowercase().contains("unreleased") => Some(format!(
            "CHANGELOG.md: the {version} entry is headed `{h}`; put the release date in its \
             heading first"
        )),
        Some(_) => None,
    }
}

fn run(root: &Path, program: &str, args: &[&str]) -> Result<String> {
    eprintln!("$ {program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .current_dir(root)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the release checks, packages, and tags unless `--dry-run`.
pub fn release(root: &Path, o: Options) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let meta: Value = serde_json::from_str(&run(
        root,
        &cargo,
        &["metadata", "--format-version", "1", "--no-deps"],
    )?)?;
    let version = check_versions(&meta).map_err(|p| anyhow::anyhow!("{}", p.join("; ")))?;
    let changelog =
        std::fs::read_to_string(root.join("CHANGELOG.md")).context("CHANGELOG.md: cannot read")?;
    if let Some(why) = changelog_blocker(&changelog, &version) {
        bail!("{why}");
    }
    let tag = format!("v{version}");
    if !o.allow_dirty
        && !run(root, "git", &["status", "--porcelain"])?
            .trim()
            .is_empty()
    {
        bail!("the working tree has uncommitted changes (commit them or pass --allow-dirty)");
    }
    if !run(root, "git", &["tag", "--list", &tag])?
        .trim()
        .is_empty()
    {
        bail!("tag {tag} exists already: bump the version first");
    }
    let mut args = vec!["publish", "--workspace", "--dry-run"];
    if !o.verify {
        args.push("--no-verify");
    }
    if o.allow_dirty {
        args.push("--allow-dirty");
    }
    crate::cargo(&args)?;
    if o.dry_run {
        println!("release {version}: checks and packaging passed (dry run: no tag)");
    } else {
        run(
            root,
            "git",
            &["tag", "-a", &tag, "-m", &format!("release {version}")],
        )?;
        println!(
            "tagged {tag}; publish with `git push origin {tag}` and `cargo publish --workspace`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pkg(name: &str, version: &str, deps: &[(&str, &str)]) -> Value {
        json!({
            "name": name, "version": version, "publish": null,
            "dependencies": deps.iter().map(|(n, r)| json!({"name": n, "req": r})).collect::<Vec<_>>()
        })
    }

    #[test]
    fn versions_must_agree_and_internal_requirements_match() {
        let good = json!({"packages": [
            pkg("sparse-formats", "0.2.0", &[("thiserror", "^2")]),
            pkg("dst-core", "0.2.0", &[("sparse-formats", "^0.2.0")]),
            json!({"name": "xtask", "version": "9.9.9", "publish": [], "dependencies": []}),
        ]});
        assert_eq!(check_versions(&good).unwrap(), "0.2.0");
        let bad = json!({"packages": [
            pkg("sparse-formats", "0.2.0", &[]),
            pkg("dst-core", "0.3.0", &[("sparse-formats", "^0.1.0")]),
        ]});
        let p = check_versions(&bad).unwrap_err();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("dst-core is at 0.3.0"));
        assert!(p[1].contains("`^0.1.0`"));
    }

    #[test]
    fn changelog_entries() {
        let log = "# Changelog\n\n## [0.2.0] - 2026-12-01\n- x\n\n## 0.1.0\n";
        assert!(entry_heading(log, "0.2.0").is_some());
        assert!(entry_heading(log, "0.1.0").is_some());
        assert!(entry_heading(log, "0.3.0").is_none());
        assert!(entry_heading("- 0.3.0 mentioned in a list\n", "0.3.0").is_none());
    }

    /// A release needs a dated entry: a missing one and one headed "unreleased" are refused.
    #[test]
    fn release_refuses_a_missing_or_unreleased_entry() {
        let log = "## [0.3.0] - Unreleased\n- y\n\n## [0.2.0] - 2026-12-01\n- x\n";
        assert_eq!(changelog_blocker(log, "0.2.0"), None);
        let why = changelog_blocker(log, "0.3.0").unwrap();
        assert!(why.contains("Unreleased") && why.contains("date"), "{why}");
        let why = changelog_blocker(log, "0.4.0").unwrap();
        assert!(why.contains("no `## [0.4.0]` entry"), "{why}");
    }

    /// The real workspace passes both checks (versions agree, CHANGELOG has the entry).
    #[test]
    fn this_workspace_is_consistent() {
        let root = crate::workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let meta: Value = serde_json::from_str(
            &run(
                &root,
                &cargo,
                &["metadata", "--format-version", "1", "--no-deps"],
            )
            .unwrap(),
        )
        .unwrap();
        let v = check_versions(&meta).unwrap();
        let log = std::fs::read_to_string(root.join("CHANGELOG.md")).unwrap();
        assert!(entry_heading(&log, &v).is_some(), "CHANGELOG.md lacks {v}");
    }
}
