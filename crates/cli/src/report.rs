//! `dst report`: one self-contained HTML page (inline SVG charts drawn with plotters) for one or
//! more run folders: loss and accuracy curves, per-layer sparsity and fan-in, ablated neurons
//! over time, mask heat-maps, and a comparison table.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use models::{EpochMetrics, TrainConfig};
use plotters::prelude::*;
use sparse_formats::io::SparseLayer;
use sparse_formats::Mask;

/// `dst report` flags.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run folders written by `dst train`.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output file (default: RUN_DIR/report.html for one run, report.html otherwise).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

struct Run {
    label: String,
    config: TrainConfig,
    epochs: Vec<EpochMetrics>,
    masks: Vec<(String, Mask)>,
}

fn load_run(dir: &Path) -> Result<Run> {
    let cfg_path = dir.join("config.json");
    let config: TrainConfig = serde_json::from_slice(
        &std::fs::read(&cfg_path)
            .with_context(|| format!("{}: not a run folder", dir.display()))?,
    )
    .with_context(|| format!("{}: malformed", cfg_path.display()))?;
    let metrics_path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics_path)
        .with_context(|| format!("{}", metrics_path.display()))?;
    let mut epochs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: malformed", metrics_path.display(), i + 1))?;
        if v["kind"] == "epoch" {
            epochs.push(serde_json::from_value(v).with_context(|| {
                format!("{} line {}: malformed", metrics_path.display(), i + 1)
            })?);
        }
    }
    let masks_path = dir.join("masks.safetensors");
    let masks = if masks_path.exists() {
        sparse_formats::io::load(&masks_path)?
            .into_iter()
            .filter_map(|(n, l)| match l {
                SparseLayer::Mask(m) => Some((n, m)),
                _ => None,
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(Run {
        label: dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |f| f.to_string_lossy().into()),
        config,
        epochs,
        masks,
    })
}

type Series = (String, Vec<(f64, f64)>);

fn line_chart(title: &str, y_label: &str, series: &[Series]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let pts = series.iter().flat_map(|(_, p)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        // A flat series (no ablation, constant sparsity) still gets a readable axis.
        let pad = ((y1 - y0) * 0.05).max(y1.abs().max(1.0) * 0.05);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(y_label)
            .draw()?;
        for (i, (name, p)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// A density heat-map of a mask, averaged over at most 64×128 cells.
fn heat_map(name: &str, mask: &Mask) -> Result<String> {
    let (rows, cols) = (mask.rows(), mask.fan_in());
    let (gr, gc) = (rows.min(64), cols.min(128));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 340)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{name} ({rows}×{cols}, density {:.4})", mask.density()),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(25)
            .y_label_area_size(40)
            .build_cartesian_2d(0..gc, 0..gr)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("input (binned)")
            .y_desc("neuron")
            .draw()?;
        let mut cells = Vec::with_capacity(gr * gc);
        for r in 0..gr {
            let (ra, rb) = (r * rows / gr, ((r + 1) * rows / gr).max(r * rows / gr + 1));
            for c in 0..gc {
                let (ca, cb) = (c * cols / gc, ((c + 1) * cols / gc).max(c * cols / gc + 1));
                let mut on = 0;
                for rr in ra..rb {
                    on += mask.row(rr)[ca..cb].iter().filter(|&&b| b).count();
                }
                let d = on as f64 / ((rb - ra) * (cb - ca)) as f64;
                let shade = (255.0 * (1.0 - d)) as u8;
                cells.push(Rectangle::new(
                    [(c, gr - 1 - r), (c + 1, gr - r)],
                    RGBColor(shade, shade, 255).filled(),
                ));
            }
        }
        chart.draw_series(cells)?;
        root.present()?;
    }
    Ok(svg)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn series(runs: &[Run], f: impl Fn(&EpochMetrics) -> f64, suffix: &str) -> Vec<Series> {
    runs.iter()
        .map(|r| {
            (
                format!("{}{suffix}", r.label),
                r.epochs.iter().map(|m| (m.epoch as f64, f(m))).collect(),
            )
        })
        .collect()
}

/// Writes the report of `dirs` to `out` (atomically).
pub fn write(dirs: &[PathBuf], out: &Path) -> Result<()> {
    let runs = dirs
        .iter()
        .map(|d| load_run(d))
        .collect::<Result<Vec<_>>>()?;
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>dst report</title>\
         <style>body{font-family:sans-serif;max-width:1320px;margin:2em auto;color:#222}\
         table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}\
         th{background:#eee}td:first-child{text-align:left}.charts{display:flex;flex-wrap:wrap;gap:8px}\
         </style></head><body>\n<h1>dst report</h1>\n",
    );
    html.push_str(
        "<h2>Runs</h2><table><tr><th>run</th><th>model</th><th>method</th><th>sparsity</th>\
         <th>epochs</th><th>test accuracy</th><th>test loss</th><th>ablated</th><th>wall s</th></tr>\n",
    );
    for r in &runs {
        let last = r.epochs.last();
        let m = &r.config.method;
        let method = if m.name.is_nm() {
            format!("{} {}:{}", m.name.as_str(), m.n, m.m)
        } else {
            m.name.as_str().to_string()
        };
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&r.label),
            esc(&format!("{:?}", r.config.model)),
            esc(&method),
            last.map_or("-".into(), |l| format!("{:.4}", l.sparsity)),
            r.epochs.len(),
            last.map_or("-".into(), |l| format!("{:.4}", l.test_accuracy)),
            last.map_or("-".into(), |l| format!("{:.4}", l.test_loss)),
            last.map_or("-".into(), |l| l.ablated_neurons.to_string()),
            last.map_or("-".into(), |l| format!("{:.0}", l.wall_s)),
        ));
    }
    html.push_str("</table>\n<h2>Training curves</h2><div class=\"charts\">\n");
    let mut loss = series(&runs, |m| m.train_loss as f64, " train");
    loss.extend(series(&runs, |m| m.test_loss as f64, " test"));
    html.push_str(&line_chart("Loss", "cross-entropy", &loss)?);
    let mut acc = series(&runs, |m| m.train_accuracy as f64, " train");
    acc.extend(series(&runs, |m| m.test_accuracy as f64, " test"));
    html.push_str(&line_chart("Accuracy", "accuracy", &acc)?);
    html.push_str(&line_chart(
        "Ablated neurons",
        "neurons",
        &series(&runs, |m| m.ablated_neurons as f64, ""),
    )?);
    html.push_str(&line_chart(
        "Global sparsity",
        "sparsity",
        &series(&runs, |m| m.sparsity, ""),
    )?);
    html.push_str("</div>\n");
    for r in &runs {
        html.push_str(&format!("<h2>{}: layers</h2>\n", esc(&r.label)));
        if let Some(last) = r.epochs.last() {
            html.push_str(
                "<table><tr><th>layer</th><th>shape</th><th>sparsity</th><th>fan-in min</th>\
                 <th>fan-in max</th><th>ablated</th></tr>\n",
            );
            for l in &last.layers {
                html.push_str(&format!(
                    "<tr><td>{}</td><td>{}×{}</td><td>{:.4}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                    esc(&l.name), l.shape[0], l.shape[1], l.sparsity, l.min_fan_in, l.max_fan_in, l.ablated_rows
                ));
            }
            html.push_str("</table>\n<div class=\"charts\">\n");
            let names: Vec<String> = last.layers.iter().map(|l| l.name.clone()).collect();
            let per_layer = |f: fn(&models::LayerStats) -> f64| -> Vec<Series> {
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let pts = r
                            .epochs
                            .iter()
                            .filter_map(|m| m.layers.get(i).map(|l| (m.epoch as f64, f(l))))
                            .collect();
                        (n.clone(), pts)
                    })
                    .collect()
            };
            let fan = per_layer(|l| l.max_fan_in as f64);
            html.push_str(&line_chart("Max fan-in per layer", "fan-in", &fan)?);
            let sp = per_layer(|l| l.sparsity);
            html.push_str(&line_chart("Sparsity per layer", "sparsity", &sp)?);
            html.push_str("</div>\n");
        }
        if !r.masks.is_empty() {
            html.push_str("<h3>Final masks</h3><div class=\"charts\">\n");
            for (n, m) in &r.masks {
                html.push_str(&heat_map(n, m)?);
            }
            html.push_str("</div>\n");
        }
    }
    html.push_str("</body></html>\n");
    // The error names the file.
    models::checkpoint::write_atomic(out, html.as_bytes()).context("--out")?;
    Ok(())
}

/// `dst report`.
pub fn run(a: ReportArgs) -> Result<ExitCode> {
    let out = match (&a.out, a.runs.as_slice()) {
        (Some(o), _) => o.clone(),
        (None, [one]) => one.join("report.html"),
        (None, _) => PathBuf::from("report.html"),
    };
    if out.extension().is_none_or(|e| e != "html") {
        bail!("--out {}: the report is an .html file", out.display());
    }
    write(&a.runs, &out)?;
    println!("report → {}", out.display());
    Ok(ExitCode::SUCCESS)
}
