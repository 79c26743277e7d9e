//! A mutation fuzzer for every loader of the workspace, on the stable toolchain, in process:
//! safetensors layer files (`sparse_formats::io::from_bytes`), training checkpoints
//! (`models::Trainer::resume` on a mutated `checkpoint.json` or state file), model files
//! (`sparse_formats::io::from_bytes_with_metadata`, `ModelDescription::from_metadata`,
//! `SparseModel::from_layers`: what `SparseModel::load` does), IDX files (plain and gzip,
//! `models::data::decode_idx`), CIFAR-10 binary files (`models::data::parse_cifar10`) and
//! configs (`TrainConfig::from_toml` / `from_json` + `validate`).
//!
//! Each input is a seed (valid files made here, or the committed fixture) changed by a few
//! random edits — bit flips, interesting bytes, extreme 32/64-bit integers, truncation,
//! duplication — or, for the JSON inside safetensors headers and checkpoints, one number
//! replaced by an extreme value with the header kept self-consistent. A loader may return an
//! error; it must not panic, run longer than a second, or make an allocation above 256 MiB (the
//! global allocator refuses it, after saving the input). Findings are written to `--out` and the
//! run exits 1. The regression corpus (`examples/fuzz_corpus/<target>/`, past findings and
//! edge cases) runs first, every time.
//!
//! `cargo run --release -p examples --example fuzz_loaders -- [--time SECONDS] [--seed N]
//! [--out DIR]`, or `cargo xtask fuzz --time 600`.

use std::alloc::{GlobalAlloc, Layout};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dst_core::Rng;
use models::data::{decode_idx, parse_cifar10, Datasets, ImageSet};
use models::{ModelConfig, Silent, TrainConfig, Trainer};
use sparse_formats::{io, Condensed, Csr, Mask, NmPattern, NmSparse, SparseLayer};

/// The largest single allocation a loader may make on these small inputs.
const CAP: usize = 256 << 20;

/// The input under test, so that the allocator and the watchdog can save it.
static CURRENT: Mutex<Option<(String, Vec<u8>)>> = Mutex::new(None);
static OUT_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
static IN_ALLOC_FINDING: AtomicBool = AtomicBool::new(false);

/// mimalloc, refusing (after saving the input) any allocation above [`CAP`].
struct Capped;

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > CAP && !IN_ALLOC_FINDING.swap(true, Ordering::SeqCst) {
            save_current(&format!("allocation of {} bytes", l.size()));
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { mimalloc::MiMalloc.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > CAP && !IN_ALLOC_FINDING.swap(true, Ordering::SeqCst) {
            save_current(&format!("reallocation to {new} bytes"));
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { mimalloc::MiMalloc.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Capped = Capped;

/// Writes the current input to the output folder and says why (best effort).
fn save_current(why: &str) {
    let Ok(cur) = CURRENT.try_lock() else { return };
    let Some((target, bytes)) = cur.as_ref() else {
        return;
    };
    let dir = OUT_DIR
        .try_lock()
        .ok()
        .and_then(|d| d.clone())
        .unwrap_or_else(|| PathBuf::from("."));
    let _ = std::fs::create_dir_all(&dir);
    let name = format!("{target}-{:016x}.bin", fnv(bytes));
    let _ = std::fs::write(dir.join(&name), bytes);
    eprintln!(
        "finding: {target}: {why}; input saved as {}",
        dir.join(name).display()
    );
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

const EXTREMES: [u64; 12] = [
    0,
    1,
    2,
    255,
    65_535,
    65_536,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 53,
    u64::MAX,
];

/// One to four random byte-level edits.
fn mutate_bytes(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len().max(1));
        match rng.below(7) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[at] = [0, 0xff, 0x7f, 0x80, b'9', b'-', b'"'][rng.below(7)],
            2 if b.len() >= at + 4 => {
                let v = EXTREMES[rng.below(EXTREMES.len())] as u32;
                let bytes = if rng.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                b[at..at + 4].copy_from_slice(&bytes);
            }
            3 if b.len() >= at + 8 => {
                let v = EXTREMES[rng.below(EXTREMES.len())];
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            4 => b.truncate(at),
            5 if !b.is_empty() => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                let chunk = b[at..end].to_vec();
                b.splice(at..at, chunk);
            }
            _ => b.push(rng.next_u64() as u8),
        }
    }
    b
}

/// Replaces one number of a JSON text by an extreme value (`None` if it has no number).
fn mutate_json_number(rng: &mut Rng, text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let starts: Vec<usize> = (0..bytes.len())
        .filter(|&i| bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric()))
        .collect();
    if starts.is_empty() {
        return None;
    }
    let start = starts[rng.below(starts.len())];
    let end = (start..bytes.len())
        .find(|&i| !(bytes[i].is_ascii_digit() || bytes[i] == b'.'))
        .unwrap_or(bytes.len());
    let v = match rng.below(4) {
        0 => "-1".to_string(),
        1 => "1e308".to_string(),
        2 => "NaN".to_string(),
        _ => EXTREMES[rng.below(EXTREMES.len())].to_string(),
    };
    Some(format!("{}{v}{}", &text[..start], &text[end..]))
}

/// A safetensors file with one number of its JSON header changed and the length prefix fixed:
/// self-consistent headers with extreme shapes, offsets and layer metadata.
fn mutate_safetensors_header(rng: &mut Rng, seed: &[u8]) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(seed.get(..8)?.try_into().ok()?) as usize;
    let header = std::str::from_utf8(seed.get(8..8 + n)?).ok()?;
    let new = mutate_json_number(rng, header.trim_end())?;
    let mut out = (new.len() as u64).to_le_bytes().to_vec();
    out.extend(new.as_bytes());
    out.extend(&seed[8 + n..]);
    Some(out)
}

/// Runs one input through a loader.
type Run = Box<dyn Fn(&[u8])>;

/// What one target needs: its seeds and how to run an input.
struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    /// A safetensors file or a text holding JSON: header-aware mutation applies.
    json: bool,
    run: Run,
}

fn layer_seeds() -> Result<Vec<Vec<u8>>> {
    let mask = Mask::parse("#.#.\n.##.\n#..#")?;
    let w: Vec<f32> = (0..12).map(|i| i as f32 - 5.5).collect();
    let layers = vec![
        ("m.weight".to_string(), SparseLayer::Mask(mask.clone())),
        (
            "c.weight".to_string(),
            SparseLayer::Condensed(Condensed::from_dense(3, 4, &w, &mask, Some(&[1., 2., 3.]))?),
        ),
        (
            "r.weight".to_string(),
            SparseLayer::Csr(Csr::from_dense(3, 4, &w, &mask)?),
        ),
        (
            "n.weight".to_string(),
            SparseLayer::Nm(NmSparse::from_dense(
                3,
                4,
                NmPattern::new(2, 4),
                &w,
                &Mask::parse("##..\n..##\n#..#")?,
            )?),
        ),
    ];
    Ok(layers
        .iter()
        .map(|l| io::to_bytes(std::slice::from_ref(l)))
        .chain([io::to_bytes(&layers)])
        .collect::<std::result::Result<_, _>>()?)
}

fn idx_seeds(fixture: &Path) -> Result<Vec<Vec<u8>>> {
    let mut seeds = Vec::new();
    for f in ["t10k-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"] {
        let gz = std::fs::read(fixture.join(f)).with_context(|| f.to_string())?;
        let raw = decode_idx(&gz).map_err(anyhow::Error::msg)?;
        let mut plain = vec![0, 0, 8, raw.dims.len() as u8];
        for d in &raw.dims {
            plain.extend((*d as u32).to_be_bytes());
        }
        // A slice of the images keeps inputs small.
        plain.extend(&raw.data[..raw.data.len().min(28 * 28 * 3)]);
        if raw.dims.len() == 3 {
            plain[4..8].copy_from_slice(&3u32.to_be_bytes());
        } else {
            plain[4..8].copy_from_slice(&(raw.data.len() as u32).to_be_bytes());
        }
        seeds.push(plain);
        if gz.len() < 4096 {
            seeds.push(gz);
        }
    }
    Ok(seeds)
}

fn config_seeds() -> Vec<Vec<u8>> {
    let toml = "epochs = 2\nbatch_size = 64\nseed = 3\n[method]\nname = \"srigl\"\nsparsity = 0.9\ndelta_t = 100\n[optimizer]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.9\n";
    let json = serde_json::to_string(&TrainConfig::default()).expect("config serialises");
    vec![toml.as_bytes().to_vec(), json.into_bytes()]
}

fn config_target(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    for cfg in [TrainConfig::from_toml(text), TrainConfig::from_json(text)]
        .into_iter()
        .flatten()
    {
        let _ = cfg.validate();
    }
}

/// The tiny run's data, its `checkpoint.json`, state file and state file name, and its model
/// file.
struct Fixture {
    data: Datasets,
    json: Vec<u8>,
    state: Vec<u8>,
    state_name: String,
    model_file: Vec<u8>,
}

/// A tiny run's checkpoint (1 epoch of a small MLP on a few synthetic images), the data it
/// resumes on, and its model file.
fn checkpoint_fixture(dir: &Path) -> Result<Fixture> {
    let set = |n: usize| ImageSet {
        images: (0..n * 64).map(|i| (i % 7) as f32 / 7.0).collect(),
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        channels: 1,
        rows: 8,
        cols: 8,
        classes: 10,
    };
    let cfg = TrainConfig {
        model: ModelConfig::Mlp { hidden: vec![16] },
        epochs: 1,
        batch_size: 8,
        ..TrainConfig::default()
    };
    let data = Datasets::split(set(32), set(8), &cfg);
    let mut t = Trainer::new(cfg, data.clone())?.with_output(dir)?;
    t.run(&mut Silent)?;
    let ck = dir.join("checkpoint");
    let json = std::fs::read(ck.join("checkpoint.json"))?;
    let state: serde_json::Value = serde_json::from_slice(&json)?;
    let tensors = state["tensors"].as_str().context("tensors")?.to_string();
    let st = std::fs::read(ck.join(&tensors))?;
    Ok(Fixture {
        data,
        json,
        state: st,
        state_name: tensors,
        model_file: model_file_seed(&t)?,
    })
}

/// A model file (`dst export --format condensed` of the tiny run) as bytes.
fn model_file_seed(t: &Trainer) -> Result<Vec<u8>> {
    use models::inference::{export_layers, ExportFormat, ModelDescription};
    let layers = export_layers(t, ExportFormat::Condensed)?;
    let desc = ModelDescription::of(t.config(), t.normalization().to_vec());
    Ok(io::to_bytes_with_metadata(&layers, &desc.to_metadata())?)
}

/// Loads a model file from bytes as `SparseModel::load` loads one from disk.
fn model_file_target(bytes: &[u8]) {
    use models::inference::{ModelDescription, SparseModel};
    let Ok((layers, meta)) = io::from_bytes_with_metadata(bytes) else {
        return;
    };
    let Ok(desc) = ModelDescription::from_metadata(Path::new("fuzzed.safetensors"), &meta) else {
        return;
    };
    let _ = SparseModel::from_layers(desc, layers, false);
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let time: f64 = flag("--time")
        .map_or(Ok(30.0), |v| v.parse())
        .context("--time")?;
    if !(time.is_finite() && time >= 0.0) {
        anyhow::bail!("--time: {time} is not a number of seconds ≥ 0");
    }
    let seed: u64 = flag("--seed")
        .map_or(Ok(1), |v| v.parse())
        .context("--seed")?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = flag("--out").map_or_else(|| root.join("target/fuzz/findings"), PathBuf::from);
    *OUT_DIR.lock().expect("out dir") = Some(out.clone());
    let fixture = root.join("crates/models/tests/fixtures/fashion-mnist-tiny");

    let work = tempfile::tempdir()?;
    let Fixture {
        data,
        json: ck_json,
        state: ck_state,
        state_name: ck_tensors,
        model_file,
    } = checkpoint_fixture(&work.path().join("run"))?;
    let ck_dir = work.path().join("fuzzed-checkpoint");
    std::fs::create_dir_all(&ck_dir)?;
    let resume = move |json: &[u8], state: &[u8]| {
        let _ = std::fs::write(ck_dir.join("checkpoint.json"), json);
        let _ = std::fs::write(ck_dir.join(&ck_tensors), state);
        // Loading and restoring is the loader; a valid config may ask for any length of run.
        let _ = Trainer::resume(&ck_dir, data.clone());
    };
    let resume = std::sync::Arc::new(resume);
    let (r1, r2) = (resume.clone(), resume.clone());
    let (state_for_json, json_for_state) = (ck_state.clone(), ck_json.clone());

    let targets = vec![
        Target {
            name: "safetensors",
            seeds: layer_seeds()?,
            json: true,
            run: Box::new(|b| {
                let _ = io::from_bytes(b);
            }),
        },
        Target {
            name: "model-file",
            seeds: vec![model_file],
            json: true,
            run: Box::new(model_file_target),
        },
        Target {
            name: "idx",
            seeds: idx_seeds(&fixture)?,
            json: false,
            run: Box::new(|b| {
                let _ = decode_idx(b);
            }),
        },
        Target {
            name: "cifar",
            seeds: vec![[3u8]
                .iter()
                .copied()
                .chain((0..3072).map(|i| i as u8))
                .chain([9u8])
                .chain((0..3072).map(|i| (i * 7) as u8))
                .collect()],
            json: false,
            run: Box::new(|b| {
                let _ = parse_cifar10(b);
            }),
        },
        Target {
            name: "config",
            seeds: config_seeds(),
            json: true,
            run: Box::new(config_target),
        },
        Target {
            name: "checkpoint-json",
            seeds: vec![ck_json],
            json: true,
            run: Box::new(move |b| r1(b, &state_for_json)),
        },
        Target {
            name: "checkpoint-state",
            seeds: vec![ck_state],
            json: true,
            run: Box::new(move |b| r2(&json_for_state, b)),
        },
    ];

    // A hang: the watchdog saves the input and aborts the process.
    let started = std::sync::Arc::new(AtomicUsize::new(0));
    {
        let started = started.clone();
        let t0 = Instant::now();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let s = started.load(Ordering::SeqCst);
            if s != 0 && t0.elapsed().as_millis() as usize > s + 10_000 {
                save_current("ran longer than 10 s");
                std::process::abort();
            }
        });
    }
    let t0 = Instant::now();
    let findings = AtomicUsize::new(0);
    let mut counts = vec![0usize; targets.len()];
    let mut slow = Duration::ZERO;
    let run_one = |t: &Target, input: &[u8], slow: &mut Duration| {
        *CURRENT.lock().expect("current") = Some((t.name.to_string(), input.to_vec()));
        started.store(t0.elapsed().as_millis() as usize + 1, Ordering::SeqCst);
        let begin = Instant::now();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(input)));
        let took = begin.elapsed();
        started.store(0, Ordering::SeqCst);
        *slow = (*slow).max(took);
        if panicked.is_err() || took > Duration::from_secs(1) {
            save_current(if panicked.is_err() {
                "panic"
            } else {
                "took more than 1 s"
            });
            findings.fetch_add(1, Ordering::SeqCst);
        }
    };
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));

    // The regression corpus first.
    let corpus = root.join("examples/fuzz_corpus");
    let mut corpus_files = 0;
    for t in &targets {
        let Ok(entries) = std::fs::read_dir(corpus.join(t.name)) else {
            continue;
        };
        for e in entries.flatten() {
            run_one(t, &std::fs::read(e.path())?, &mut slow);
            corpus_files += 1;
        }
    }

    let mut rng = Rng::new(seed);
    let mut round = 0usize;
    while t0.elapsed().as_secs_f64() < time || round == 0 {
        for (i, t) in targets.iter().enumerate() {
            // The checkpoint targets build a trainer per input: fewer of them.
            let per_round = if t.name.starts_with("checkpoint") {
                2
            } else {
                200
            };
            for _ in 0..per_round {
                let s = &t.seeds[rng.below(t.seeds.len())];
                let input = if t.json && rng.below(3) == 0 {
                    let edited =
                        if matches!(t.name, "safetensors" | "checkpoint-state" | "model-file") {
                            mutate_safetensors_header(&mut rng, s)
                        } else {
                            std::str::from_utf8(s)
                                .ok()
                                .and_then(|text| mutate_json_number(&mut rng, text))
                                .map(String::into_bytes)
                        };
                    edited.unwrap_or_else(|| mutate_bytes(&mut rng, s))
                } else {
                    mutate_bytes(&mut rng, s)
                };
                run_one(t, &input, &mut slow);
                counts[i] += 1;
            }
        }
        round += 1;
    }
    let total: usize = counts.iter().sum();
    println!(
        "fuzzed {total} inputs in {:.0} s ({} corpus files first; slowest input {:.0} ms):",
        t0.elapsed().as_secs_f64(),
        corpus_files,
        slow.as_secs_f64() * 1e3
    );
    for (t, c) in targets.iter().zip(&counts) {
        println!("  {:<17} {c}", t.name);
    }
    let f = findings.load(Ordering::SeqCst);
    if f > 0 {
        eprintln!("{f} findings in {}", out.display());
        std::process::exit(1);
    }
    println!("no panic, hang or allocation above {} MiB", CAP >> 20);
    Ok(())
}
