//! Dense weight → constant fan-in (condensed) → safetensors file → back to dense, plus the N:M
//! and CSR layouts of the same kind of weight.
//!
//! Run: `cargo run --release -p examples --example formats`

use anyhow::{ensure, Context, Result};
use sparse_formats::{io, Condensed, Csr, Mask, NmPattern, NmSparse, SparseLayer};

fn main() -> Result<()> {
    // A 6×16 linear weight where every active output neuron keeps 4 inputs (75% sparse per
    // row) and neuron 3 is ablated, as SRigL produces.
    let (rows, fan_in, k) = (6, 16, 4);
    let mut mask = Mask::zeros(rows, fan_in);
    let mut w = vec![0.0f32; rows * fan_in];
    for r in (0..rows).filter(|&r| r != 3) {
        for j in 0..k {
            let c = (r * 5 + j * 3) % fan_in;
            mask.set(r, c, true);
            w[r * fan_in + c] = (r as f32 + 1.0) * if j % 2 == 0 { 0.5 } else { -0.25 };
        }
    }
    let bias: Vec<f32> = (0..rows).map(|r| r as f32 * 0.1).collect();
    println!(
        "mask ({}% sparse):\n{}",
        (mask.sparsity() * 100.0).round(),
        mask.render()
    );

    let condensed = Condensed::from_dense(rows, fan_in, &w, &mask, Some(&bias))?;
    println!(
        "condensed: {} active rows {:?}, k = {}, {:?} indices",
        condensed.n_active(),
        condensed.active_rows(),
        condensed.k(),
        condensed.indices().index_type()
    );

    // N:M needs a different mask: 2 of every 4 consecutive weights.
    let nm_mask = Mask::from_dense(
        rows,
        fan_in,
        &(0..rows * fan_in)
            .map(|i| if i % 4 == 1 || i % 4 == 2 { 1.0 } else { 0.0 })
            .collect::<Vec<f32>>(),
    )?;
    let nm_w: Vec<f32> = (0..rows * fan_in)
        .map(|i| if nm_mask.as_slice()[i] { i as f32 } else { 0.0 })
        .collect();
    let nm = NmSparse::from_dense(rows, fan_in, NmPattern::new(2, 4), &nm_w, &nm_mask)?;
    let nvidia = nm.to_nvidia_2to4()?;
    println!(
        "2:4: {} values, NVIDIA metadata words {:04x?}",
        nm.values().len(),
        &nvidia.metadata[..2]
    );
    let csr = Csr::from_dense(rows, fan_in, &w, &mask)?;

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("layers.safetensors");
    io::save(
        &path,
        &[
            ("fc1".into(), SparseLayer::Condensed(condensed)),
            ("fc2".into(), SparseLayer::Nm(nm)),
            ("fc3".into(), SparseLayer::Csr(csr)),
        ],
    )?;
    println!(
        "saved {} bytes to {}",
        std::fs::metadata(&path)?.len(),
        path.display()
    );

    for (name, layer) in io::load(&path).context("loading the file back")? {
        let dense = match &layer {
            SparseLayer::Condensed(c) => c.to_dense(),
            SparseLayer::Nm(n) => n.to_dense(),
            SparseLayer::Csr(c) => c.to_dense(),
            other => anyhow::bail!("unexpected layer {other:?}"),
        };
        let expected = if name == "fc2" { &nm_w } else { &w };
        ensure!(&dense == expected, "{name} did not round-trip");
        println!("{name}: {} → dense round trip exact", layer.format_name());
    }
    Ok(())
}
