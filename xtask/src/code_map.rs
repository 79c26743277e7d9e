//! `cargo xtask check-code-map`: every source file of the workspace is named in
//! docs/ARCHITECTURE.md, in the section of its crate (a `### \`crates/NAME\`` heading, or
//! `### \`xtask\`` / `### \`examples\``), by its path inside the crate (`src/engine.rs`,
//! `benches/train.rs`; examples by file name). Crate roots (`src/lib.rs`, `src/main.rs`) and
//! test files (`tests/`) are exempt: the crate paragraph is the root's description, and tests sit
//! next to what they test.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs" || e == "cu") {
            out.push(p);
        }
    }
}

/// The crate folders and, per folder, its source files relative to it.
fn sources(root: &Path) -> Vec<(String, Vec<String>)> {
    let mut crates: Vec<String> = std::fs::read_dir(root.join("crates"))
        .map(|d| {
            d.flatten()
                .map(|e| format!("crates/{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    crates.sort();
    crates.push("xtask".into());
    crates.push("examples".into());
    crates
        .into_iter()
        .map(|c| {
            let base = root.join(&c);
            let mut files = Vec::new();
            for sub in ["src", "benches", "examples"] {
                rust_files(&base.join(sub), &mut files);
            }
            if c == "examples" {
                rust_files(&base, &mut files);
                files.sort();
                files.dedup();
            }
            let rel = files
                .iter()
                .filter_map(|f| f.strip_prefix(&base).ok())
                .map(|f| f.to_string_lossy().replace('\\', "/"))
                .filter(|f| !matches!(f.as_str(), "src/lib.rs" | "src/main.rs"))
                .filter(|f| !f.starts_with("tests/") && !f.contains("/tests/"))
                .collect();
            (c, rel)
        })
        .collect()
}

/// The text of the section of ARCHITECTURE.md whose heading names `krate`.
fn section<'a>(doc: &'a str, krate: &str) -> Option<&'a str> {
    let heading = format!("### `{krate}`");
    let start = doc.find(&heading)?;
    let rest = &doc[start + heading.len()..];
    let end = rest.find("\n### ").or_else(|| rest.find("\n## "));
    Some(&rest[..end.unwrap_or(rest.len())])
}

/// Source files not named in their crate's section, as `crate/path`.
pub fn missing(root: &Path) -> Result<Vec<String>> {
    let path = root.join("docs/ARCHITECTURE.md");
    let doc = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut out = Vec::new();
    for (krate, files) in sources(root) {
        let Some(text) = section(&doc, &krate) else {
            out.push(format!("{krate} (no section)"));
            continue;
        };
        for f in files {
            let name = if krate == "examples" {
                f.rsplit('/').next().unwrap_or(&f).to_string()
            } else {
                f.clone()
            };
            if !text.contains(&name) {
                out.push(format!("{krate}/{f}"));
            }
        }
    }
    Ok(out)
}

/// Fails naming every source file the code map does not mention.
pub fn check(root: &Path) -> Result<()> {
    let m = missing(root)?;
    if !m.is_empty() {
        bail!(
            "docs/ARCHITECTURE.md's code map does not name: {}",
            m.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_source_file_is_in_the_code_map() {
        super::check(&crate::workspace_root()).unwrap();
    }
}
