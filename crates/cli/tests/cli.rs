//! The `dst` binary end to end on the committed Fashion-MNIST slice: train → eval → export →
//! inspect → report, one mask update, and bad input → one line naming the problem, exit code 2,
//! nothing half-written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dst(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dst"))
        .args(args)
        .env_remove("DST_DATA_DIR")
        .output()
        .expect("run dst")
}

fn data_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures/fashion-mnist-tiny")
        .display()
        .to_string()
}

fn ok(o: &Output) -> String {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "stdout: {out}\nstderr: {err}");
    out.into_owned()
}

/// Fails with exit code 2 and a single stderr line containing every `needle`.
fn fails(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// A short `dst train` run with the user's default engine rule named (`auto`: the dst methods
/// on this MLP train in the sparse engine; dense, SR-STE and 2:4 runs dense-mask).
fn train(dir: &Path, extra: &[&str]) -> PathBuf {
    let out = dir.display().to_string();
    let data = data_dir();
    let mut args = vec![
        "train",
        "--data-dir",
        &data,
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--delta-t",
        "5",
        "--limit",
        "400",
        "--engine",
        "auto",
        "--quiet",
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    let out = ok(&dst(&args));
    // The summary line, then where the steps' time went (`Trainer::step_profile`).
    assert!(out.contains("test accuracy "), "{out}");
    let profile = out
        .lines()
        .find(|l| l.starts_with("steps: batch "))
        .unwrap_or_else(|| panic!("no step profile in {out}"));
    assert!(
        profile.contains(" ms/step") && profile.contains("mask update"),
        "{profile}"
    );
    dir.to_path_buf()
}

#[test]
fn train_eval_export_inspect_report() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train(
        &tmp.path().join("srigl"),
        &["--method", "srigl", "--sparsity", "0.9"],
    );
    for f in [
        "config.toml",
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "masks.safetensors",
        "report.html",
        "checkpoint/checkpoint.json",
    ] {
        assert!(run.join(f).exists(), "{f}");
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let acc = summary["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "{acc}");
    // The resolved config re-reads as the same run.
    let toml_cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(toml_cfg.contains("name = \"srigl\""), "{toml_cfg}");

    let eval = ok(&dst(&[
        "eval",
        run.to_str().unwrap(),
        "--data-dir",
        &data_dir(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&eval).unwrap();
    assert!((v["test_accuracy"].as_f64().unwrap() - acc).abs() < 1e-6);

    for format in ["condensed", "csr"] {
        let file = tmp.path().join(format!("{format}.safetensors"));
        ok(&dst(&[
            "export",
            run.to_str().unwrap(),
            "--format",
            format,
            "--out",
            file.to_str().unwrap(),
        ]));
        let layers = sparse_formats::io::load(&file).unwrap();
        assert!(
            layers.iter().any(|(_, l)| l.format_name() == format),
            "{format}"
        );
        let json = ok(&dst(&["inspect", file.to_str().unwrap(), "--json"]));
        let info: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
        let fc1 = info.iter().find(|l| l["name"] == "fc1.weight").unwrap();
        assert_eq!(
            fc1["min_fan_in"], fc1["max_fan_in"],
            "constant fan-in survives export"
        );
        assert!(fc1["sparsity"].as_f64().unwrap() > 0.8);

        // The file runs on its own, on the sparse kernels in its format, to the run's accuracy
        // (condensed: the kernels the run was evaluated with; CSR: other kernels, so rounding
        // may move one or two of the 500 test images).
        let json = ok(&dst(&[
            "eval",
            file.to_str().unwrap(),
            "--data-dir",
            &data_dir(),
            "--json",
        ]));
        let e: serde_json::Value = serde_json::from_str(&json).unwrap();
        let file_acc = e["test_accuracy"].as_f64().unwrap();
        let tolerance = if format == "condensed" { 1e-6 } else { 0.005 };
        assert!(
            (file_acc - acc).abs() < tolerance,
            "{format}: {file_acc} vs {acc}"
        );
        let on_sparse = e["sparse_layers"].as_array().unwrap();
        assert!(
            on_sparse.iter().any(|l| l
                .as_str()
                .unwrap()
                .contains(&format!("fc1.weight ({format})"))),
            "{json}"
        );
    }

    // `dst predict` on the test images agrees with the evaluated accuracy.
    let file = tmp.path().join("condensed.safetensors");
    let images = Path::new(&data_dir()).join("t10k-images-idx3-ubyte.gz");
    let predicted = ok(&dst(&[
        "predict",
        file.to_str().unwrap(),
        "--input",
        images.to_str().unwrap(),
    ]));
    let labels = models::data::read_idx(&Path::new(&data_dir()).join("t10k-labels-idx1-ubyte.gz"))
        .unwrap()
        .data;
    let classes: Vec<u8> = predicted.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(classes.len(), labels.len());
    let right = classes.iter().zip(&labels).filter(|(a, b)| a == b).count();
    assert!((right as f64 / labels.len() as f64 - acc).abs() < 1e-6);
    // Whole-model timing against the same model dense.
    let bench = ok(&dst(&["bench", file.to_str().unwrap(), "--end-to-end"]));
    assert!(
        bench.lines().any(|l| l.starts_with("1 ")) && bench.lines().any(|l| l.starts_with("256 ")),
        "{bench}"
    );
    // Bad input: a plain layer file (no model description), an image file of another shape.
    fails(
        &dst(&[
            "eval",
            run.join("masks.safetensors").to_str().unwrap(),
            "--data-dir",
            &data_dir(),
        ]),
        &["masks.safetensors", "dst.model"],
    );
    fails(
        &dst(&[
            "predict",
            file.to_str().unwrap(),
            "--input",
            Path::new(&data_dir())
                .join("t10k-labels-idx1-ubyte.gz")
                .to_str()
                .unwrap(),
        ]),
        &["t10k-labels-idx1-ubyte.gz", "dimension"],
    );
    let grid = ok(&dst(&[
        "inspect",
        run.join("masks.safetensors").to_str().unwrap(),
        "--show-mask",
        "fc2.weight",
    ]));
    assert_eq!(grid.lines().count(), 100);
    assert!(grid
        .lines()
        .all(|l| l.len() == 300 && l.chars().all(|c| c == '#' || c == '.')));

    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("fc1.weight") && html.ends_with("</html>\n"));

    // N:M export of an SRigL run is refused, naming the layer; nothing is written.
    let nm = tmp.path().join("nm.safetensors");
    fails(
        &dst(&[
            "export",
            run.to_str().unwrap(),
            "--format",
            "nm",
            "--out",
            nm.to_str().unwrap(),
        ]),
        &["fc1.weight", "2:4"],
    );
    assert!(!nm.exists());
}

#[test]
fn lbc_run_exports_to_nm_and_two_runs_compare() {
    let tmp = tempfile::tempdir().unwrap();
    let lbc = train(
        &tmp.path().join("lbc"),
        &["--method", "lbc", "--n", "2", "--m", "4", "--lbc-t-f", "1"],
    );
    let dense = train(&tmp.path().join("dense"), &["--method", "dense"]);
    let file = tmp.path().join("lbc.safetensors");
    ok(&dst(&[
        "export",
        lbc.to_str().unwrap(),
        "--format",
        "nm",
        "--out",
        file.to_str().unwrap(),
    ]));
    let text = ok(&dst(&["inspect", file.to_str().unwrap()]));
    assert!(
        text.contains("fc1.weight") && text.contains("nm") && text.contains("2:4"),
        "{text}"
    );
    // The N:M file runs on the N:M kernels to the run's accuracy (within two of 500 images:
    // the run evaluated dense-mask products).
    let acc = |args: &[&str]| -> f64 {
        let v: serde_json::Value = serde_json::from_str(&ok(&dst(args))).unwrap();
        v["test_accuracy"].as_f64().unwrap()
    };
    let data = data_dir();
    let run_acc = acc(&["eval", lbc.to_str().unwrap(), "--data-dir", &data, "--json"]);
    let file_acc = acc(&[
        "eval",
        file.to_str().unwrap(),
        "--data-dir",
        &data,
        "--json",
    ]);
    assert!(
        (run_acc - file_acc).abs() < 0.005,
        "{run_acc} vs {file_acc}"
    );
    // A run with no N:M mask is not written as an N:M file.
    let none = tmp.path().join("dense.safetensors");
    fails(
        &dst(&[
            "export",
            dense.to_str().unwrap(),
            "--format",
            "nm",
            "--out",
            none.to_str().unwrap(),
        ]),
        &["no N:M layer", "dense"],
    );
    assert!(!none.exists());
    let page = tmp.path().join("compare.html");
    ok(&dst(&[
        "report",
        lbc.to_str().unwrap(),
        dense.to_str().unwrap(),
        "--out",
        page.to_str().unwrap(),
    ]));
    let html = std::fs::read_to_string(page).unwrap();
    assert!(html.contains("lbc 2:4") && html.contains("dense"));
    let bench = ok(&dst(&["bench", file.to_str().unwrap(), "--batch", "1"]));
    assert!(
        bench.contains("fc1.weight") && bench.contains('x'),
        "{bench}"
    );
}

#[test]
fn mask_update_applies_one_srigl_update() {
    use candle_core::{Device, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let (rows, fan_in) = (8, 16);
    let w: Vec<f32> = (0..rows * fan_in)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let g: Vec<f32> = (0..rows * fan_in)
        .map(|i| ((i * 104_729) % 89) as f32 / 89.0 - 0.5)
        .collect();
    let m: Vec<f32> = (0..rows * fan_in)
        .map(|i| f32::from(u8::from(i % 16 < 4)))
        .collect();
    let wm: Vec<f32> = w.iter().zip(&m).map(|(a, b)| a * b).collect();
    let mut t = std::collections::HashMap::new();
    t.insert(
        "fc.weight".to_string(),
        Tensor::from_vec(wm, (rows, fan_in), &Device::Cpu).unwrap(),
    );
    t.insert(
        "fc.grad".to_string(),
        Tensor::from_vec(g, (rows, fan_in), &Device::Cpu).unwrap(),
    );
    t.insert(
        "fc.mask".to_string(),
        Tensor::from_vec(m, (rows, fan_in), &Device::Cpu).unwrap(),
    );
    let input = tmp.path().join("in.safetensors");
    candle_core::safetensors::save(&t, &input).unwrap();
    let out = tmp.path().join("out.safetensors");
    let text = ok(&dst(&[
        "mask-update",
        "--method",
        "srigl",
        "--state",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--drop-fraction",
        "0.5",
        "--no-ablation",
    ]));
    assert!(text.contains("fc"), "{text}");
    let res = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let mask = res["fc.mask"].to_vec2::<f32>().unwrap();
    let weight = res["fc.weight"].to_vec2::<f32>().unwrap();
    for (mr, wr) in mask.iter().zip(&weight) {
        assert_eq!(
            mr.iter().filter(|&&b| b == 1.0).count(),
            4,
            "constant fan-in 4"
        );
        for (b, w) in mr.iter().zip(wr) {
            assert!(*b == 1.0 || *w == 0.0, "inactive weight is zero");
        }
    }
    assert_ne!(mask[0][..4], [1.0; 4], "the update moved something");
    // A mask value other than 0/1 and a NaN in the weights or the gradient are refused, naming
    // the tensor, and the output is not written.
    std::fs::remove_file(&out).unwrap();
    let run = |t: &std::collections::HashMap<String, Tensor>| {
        candle_core::safetensors::save(t, &input).unwrap();
        dst(&[
            "mask-update",
            "--method",
            "srigl",
            "--state",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let spoil = |t: &mut std::collections::HashMap<String, Tensor>, name: &str, v: f32| {
        let mut x = t[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        x[5] = v;
        t.insert(
            name.into(),
            Tensor::from_vec(x, (rows, fan_in), &Device::Cpu).unwrap(),
        );
    };
    for (name, v, needles) in [
        ("fc.mask", 0.5, ["fc.mask", "0 and 1"]),
        ("fc.weight", f32::NAN, ["fc.weight", "finite"]),
        ("fc.grad", f32::INFINITY, ["fc.grad", "finite"]),
    ] {
        let mut bad = t.clone();
        spoil(&mut bad, name, v);
        fails(&run(&bad), &needles);
        assert!(!out.exists(), "{name}: nothing written");
    }
    // Missing gradient for a gradient-based method names the tensor.
    t.remove("fc.grad");
    candle_core::safetensors::save(&t, &input).unwrap();
    fails(
        &dst(&[
            "mask-update",
            "--method",
            "rigl",
            "--state",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]),
        &["fc.grad"],
    );
}

/// Dense layers are left alone by `dst mask-update`, as by the trainer: a layer whose mask is
/// all ones (no --sparsity), and a layer that ERK makes dense under --sparsity (a 4x4 layer
/// beside a 64x256 one at 50%). SET and RigL reject --sparsity (they keep each layer's count).
#[test]
fn mask_update_leaves_dense_layers_untouched() {
    use candle_core::{Device, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let layer = |rows: usize, fan_in: usize, dense: bool| {
        let n = rows * fan_in;
        let m: Vec<f32> = (0..n)
            .map(|i| f32::from(u8::from(dense || i % 4 == 0)))
            .collect();
        let w: Vec<f32> = (0..n)
            .map(|i| (((i * 7919) % 97) as f32 / 97.0 - 0.5) * m[i])
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729) % 89) as f32 / 89.0 - 0.5)
            .collect();
        let t = |v: Vec<f32>| Tensor::from_vec(v, (rows, fan_in), &Device::Cpu).unwrap();
        (t(w), t(g), t(m))
    };
    let mut t = std::collections::HashMap::new();
    for (name, rows, fan_in, dense) in [("big", 64, 256, false), ("small", 4, 4, true)] {
        let (w, g, m) = layer(rows, fan_in, dense);
        t.insert(format!("{name}.weight"), w);
        t.insert(format!("{name}.grad"), g);
        t.insert(format!("{name}.mask"), m);
    }
    let input = tmp.path().join("in.safetensors");
    candle_core::safetensors::save(&t, &input).unwrap();
    let out = tmp.path().join("out.safetensors");
    let run = |method: &str, extra: &[&str]| {
        let mut args = vec![
            "mask-update",
            "--method",
            method,
            "--state",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--drop-fraction",
            "0.5",
            "--gamma-sal",
            "0.9",
        ];
        args.extend_from_slice(extra);
        dst(&args)
    };
    let same = |name: &str| {
        let res = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        for part in ["weight", "mask"] {
            let k = format!("{name}.{part}");
            let (a, b) = (
                res[&k].to_vec2::<f32>().unwrap(),
                t[&k].to_vec2::<f32>().unwrap(),
            );
            assert_eq!(a, b, "{k} changed");
        }
        let big = res["big.mask"].to_vec2::<f32>().unwrap();
        assert_ne!(big, t["big.mask"].to_vec2::<f32>().unwrap(), "big moved");
    };
    for method in ["set", "rigl", "srigl"] {
        let text = ok(&run(method, &[]));
        assert!(text.contains("small") && text.contains("dense"), "{text}");
        same("small");
    }
    // ERK at 50% over these two layers: the 4x4 layer would need density > 1, so it is dense.
    ok(&run("srigl", &["--sparsity", "0.5"]));
    same("small");
    for method in ["set", "rigl"] {
        fails(
            &run(method, &["--sparsity", "0.5"]),
            &["--sparsity", "srigl"],
        );
    }
}

#[test]
fn run_folders_are_never_dead_ends_or_clobbered() {
    let tmp = tempfile::tempdir().unwrap();
    let a = train(&tmp.path().join("a"), &["--method", "srigl"]);
    // A run that stopped before its first checkpoint: its config.json, some metrics, a
    // temporary file of a killed write, no checkpoint. `--resume` starts it again from step 0
    // and ends where an uninterrupted run ends.
    let b = tmp.path().join("b");
    std::fs::create_dir(&b).unwrap();
    std::fs::copy(a.join("config.json"), b.join("config.json")).unwrap();
    std::fs::copy(a.join("metrics.jsonl"), b.join("metrics.jsonl")).unwrap();
    std::fs::write(b.join(".tmp-killed"), "partial").unwrap();
    let o = dst(&["train", "--resume", b.to_str().unwrap(), "--quiet"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("from step 0"));
    assert!(
        !b.join(".tmp-killed").exists(),
        "temporary files are cleaned up"
    );
    assert!(
        std::fs::read(a.join("masks.safetensors")).unwrap()
            == std::fs::read(b.join("masks.safetensors")).unwrap(),
        "the same masks file as the uninterrupted run"
    );
    let epochs = |d: &Path| {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"kind\":\"epoch\""))
            .count()
    };
    assert_eq!(epochs(&b), epochs(&a), "metrics read as one run");
    // A folder of other files, or a run that lost its config.json, is never written into.
    for (name, file) in [("c", "notes.txt"), ("d", "metrics.jsonl")] {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(file), "keep").unwrap();
        if name == "d" {
            std::fs::create_dir(dir.join("checkpoint")).unwrap();
        }
        fails(
            &dst(&["train", "--out", dir.to_str().unwrap(), "--quiet"]),
            &["not empty", file],
        );
        assert_eq!(std::fs::read_to_string(dir.join(file)).unwrap(), "keep");
        assert!(!dir.join("config.json").exists());
    }
    fails(
        &dst(&["train", "--out", a.to_str().unwrap()]),
        &["holds a run", "--resume"],
    );
}

/// SIGKILL at several points of a run (right after it starts, around the first checkpoint
/// write, later), then `--resume`: the final masks and checkpoint tensors are byte-identical to
/// an uninterrupted run's. The kill points race with the run on purpose — every point must
/// resume to the same bytes.
#[test]
fn a_killed_run_resumes_to_the_same_bytes() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir();
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--data-dir",
            &data,
            "--epochs",
            "4",
            "--batch-size",
            "50",
            "--delta-t",
            "3",
            "--limit",
            "400",
            "--method",
            "srigl",
            "--checkpoint-every",
            "1",
            "--json",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([out.display().to_string()])
        .collect()
    };
    let whole = tmp.path().join("whole");
    ok(&dst(&args(&whole)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()));
    let final_bytes = |dir: &Path| -> Vec<Vec<u8>> {
        let ck = dir.join("checkpoint");
        let mut states: Vec<PathBuf> = std::fs::read_dir(&ck)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        states.sort();
        assert_eq!(states.len(), 1, "one state file in {}", ck.display());
        vec![
            std::fs::read(dir.join("masks.safetensors")).unwrap(),
            std::fs::read(&states[0]).unwrap(),
        ]
    };
    let want = final_bytes(&whole);
    // (epoch lines to read before the kill; 0 = as soon as the run folder has its config)
    for (case, epochs_seen) in [0usize, 1, 3].into_iter().enumerate() {
        let dir = tmp.path().join(format!("killed{case}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_dst"))
            .args(args(&dir))
            .env_remove("DST_DATA_DIR")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if epochs_seen == 0 {
            while !dir.join("config.json").exists() {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        } else {
            let out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut seen = 0;
            for line in out.lines() {
                seen += line.unwrap().contains("\"kind\":\"epoch\"") as usize;
                if seen == epochs_seen {
                    break;
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        ok(&dst(&[
            "train",
            "--resume",
            dir.to_str().unwrap(),
            "--quiet",
        ]));
        assert!(
            final_bytes(&dir) == want,
            "killed after {epochs_seen} epochs: resumed run differs from the uninterrupted one"
        );
    }
}

#[test]
fn bad_input_is_one_line_and_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let data = data_dir();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(
        &dst(&["train", "--data-dir", empty.to_str().unwrap(), "--out", o]),
        &["fashion-mnist", "not found", "apt-get"],
    );
    fails(
        &dst(&["train", "--sparsity", "1.5", "--out", o]),
        &["--sparsity", "[0, 1)"],
    );
    fails(
        &dst(&[
            "train", "--method", "lbc", "--n", "4", "--m", "2", "--out", o,
        ]),
        &["N:M", "4:2"],
    );
    fails(
        &dst(&[
            "train",
            "--method",
            "lbc",
            "--n",
            "2",
            "--m",
            "7",
            "--data-dir",
            &data,
            "--out",
            o,
        ]),
        &["method.m", "fc2.weight", "300"],
    );
    // LBC whose masks would not reach N:M within the run (it ended dense, exit 0, before).
    fails(
        &dst(&[
            "train",
            "--method",
            "lbc",
            "--n",
            "2",
            "--m",
            "4",
            "--epochs",
            "2",
            "--lbc-t-f",
            "2",
            "--data-dir",
            &data,
            "--out",
            o,
        ]),
        &["method.lbc_t_f", "epochs − 1 = 1"],
    );
    // C(56, 28) ≈ 7.6e15 combinations per group: refused before enumerating (it grew until
    // the machine ran out of memory).
    fails(
        &dst(&[
            "train",
            "--method",
            "lbc",
            "--n",
            "28",
            "--m",
            "56",
            "--dense-layer",
            "fc2.weight",
            "--dense-layer",
            "fc3.weight",
            "--data-dir",
            &data,
            "--out",
            o,
        ]),
        &["28:56", "65536"],
    );
    fails(
        &dst(&[
            "train",
            "--method",
            "rigl",
            "--dense-layer",
            "fc9.weight",
            "--data-dir",
            &data,
            "--out",
            o,
        ]),
        &["fc9.weight"],
    );
    fails(
        &dst(&["train", "--method", "magic", "--out", o]),
        &["--method", "magic"],
    );
    // A negative number is a value, not a flag, and reaches validation.
    fails(
        &dst(&["train", "--sparsity", "-0.1", "--out", o]),
        &["--sparsity", "-0.1", "[0, 1)"],
    );
    // clap's own errors are one line too (no usage block, no help hint).
    fails(
        &dst(&["train", "--epochs", "ten", "--out", o]),
        &["--epochs", "ten"],
    );
    fails(&dst(&["train", "--no-such-flag"]), &["--no-such-flag"]);
    // A batch whose buffers would exceed the limit is refused before anything is allocated.
    let o2 = dst(&["bench", "--batch", "100000000"]);
    fails(&o2, &["--batch", "100000000", "GiB"]);
    assert!(o2.stdout.is_empty(), "nothing printed before the error");
    fails(&dst(&["frobnicate"]), &["frobnicate"]);
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "epochs = \"ten\"\n").unwrap();
    fails(
        &dst(&["train", "--config", cfg.to_str().unwrap(), "--out", o]),
        &["bad.toml", "malformed"],
    );
    std::fs::write(&cfg, "epoch = 3\n").unwrap();
    fails(
        &dst(&["train", "--config", cfg.to_str().unwrap(), "--out", o]),
        &["bad.toml", "epoch"],
    );
    assert!(!out.exists(), "nothing written for rejected runs");
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let under_file = blocker.join("run");
    fails(
        &dst(&[
            "train",
            "--data-dir",
            &data,
            "--out",
            under_file.to_str().unwrap(),
        ]),
        &["--out"],
    );
    fails(
        &dst(&[
            "inspect",
            tmp.path().join("nope.safetensors").to_str().unwrap(),
        ]),
        &["nope.safetensors"],
    );
    // A message names its file once, repeats no OS error, and calls no other file a checkpoint.
    let notes = tmp.path().join("notes.txt");
    std::fs::write(&notes, "not a safetensors file at all").unwrap();
    for (args, needle) in [
        (vec!["inspect", notes.to_str().unwrap()], "notes.txt"),
        (
            vec![
                "inspect",
                tmp.path().join("gone.safetensors").to_str().unwrap(),
            ],
            "gone.safetensors",
        ),
        (
            vec![
                "train",
                "--data-dir",
                &data,
                "--out",
                under_file.to_str().unwrap(),
            ],
            "run",
        ),
    ] {
        let o = dst(&args);
        fails(&o, &[needle]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(err.matches(needle).count(), 1, "{needle} named once: {err}");
        assert!(
            !err.contains("checkpoint") && !err.contains("at path"),
            "{err}"
        );
        assert!(err.matches("(os error").count() <= 1, "{err}");
    }
    // A tiny, self-consistent file whose header declares 2^31 rows of which one is stored:
    // refused before a 16 GiB mask is laid out (inspect aborted on the allocation; bench
    // checks its buffers the same way).
    let huge = tmp.path().join("huge.safetensors");
    let layer = sparse_formats::Condensed::from_parts(
        1 << 31,
        8,
        1,
        vec![0],
        vec![1.0],
        sparse_formats::IndexVec::collect_for_fan_in(8, [3]),
        None,
    )
    .unwrap();
    sparse_formats::io::save(
        &huge,
        &[(
            "fc.weight".to_string(),
            sparse_formats::io::SparseLayer::Condensed(layer),
        )],
    )
    .unwrap();
    assert!(std::fs::metadata(&huge).unwrap().len() < 4096);
    let h = huge.to_str().unwrap();
    fails(
        &dst(&["inspect", h]),
        &["fc.weight", "2147483648", "entries"],
    );
    fails(
        &dst(&["inspect", h, "--show-mask", "fc.weight"]),
        &["fc.weight", "entries"],
    );
    fails(&dst(&["bench", h]), &["fc.weight", "GiB"]);
    fails(
        &dst(&["eval", empty.to_str().unwrap()]),
        &["not a run folder"],
    );
    fails(
        &dst(&["report", empty.to_str().unwrap()]),
        &["not a run folder"],
    );
}

/// The config example in README.md is a valid config (trained for one short epoch).
#[test]
fn readme_config_example_trains() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let start = readme.find("```toml\n").expect("README has a TOML example") + 8;
    let end = start + readme[start..].find("```").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, &readme[start..end]).unwrap();
    let out = tmp.path().join("run");
    ok(&dst(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--epochs",
        "1",
        "--limit",
        "100",
        "--data-dir",
        &data_dir(),
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]));
    let toml_cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        toml_cfg.contains("kind = \"lenet5\"") && toml_cfg.contains("sparsity = 0.95"),
        "{toml_cfg}"
    );
}
