//! What the benchmark suites share: synthetic data and timing a trainer step by step.
#![allow(dead_code)] // each bench uses its own subset

use std::time::Instant;

use models::data::ImageSet;
use models::distributed::CommStats;
use models::{Control, Datasets, Event, ModelConfig, Silent, StepProfile, TrainConfig, Trainer};

/// The MLPs of the train and scaling suites: name, hidden widths, image channels and side.
pub const MLPS: [(&str, &[usize], usize, usize); 2] = [
    ("784-1000-1000-1000-10", &[1000, 1000, 1000], 1, 28),
    ("3072-3072-3072-10", &[3072, 3072], 3, 32),
];

/// An MLP case of the suites: batch-128 training for 20 epochs (no checkpoints) on 25 batches
/// of synthetic `c`×`side`×`side` images, a batch of test images; the method is the default
/// until the caller sets it.
pub fn mlp_case(hidden: &[usize], c: usize, side: usize) -> (TrainConfig, Datasets) {
    let base = TrainConfig {
        model: ModelConfig::Mlp {
            hidden: hidden.to_vec(),
        },
        batch_size: 128,
        epochs: 20,
        checkpoint_every: 0,
        ..TrainConfig::default()
    };
    let data = Datasets::split(
        synthetic(128 * 25, c, side, 1),
        synthetic(128, c, side, 2),
        &base,
    );
    (base, data)
}

/// `n` random images of `c`×`side`×`side` with random labels of 10 classes (xorshift, `seed`).
pub fn synthetic(n: usize, c: usize, side: usize, seed: u64) -> ImageSet {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    ImageSet {
        images: (0..n * c * side * side)
            .map(|_| (next() % 256) as f32 / 255.0)
            .collect(),
        labels: (0..n).map(|_| (next() % 10) as u8).collect(),
        channels: c,
        rows: side,
        cols: side,
        classes: 10,
    }
}

/// Timings of `steps` optimizer steps after `warm` warm-up steps.
pub struct Timing {
    /// Wall seconds per step, everything included.
    pub s_per_step: f64,
    /// Median seconds of a step without a mask update.
    pub median_step: f64,
    /// Median extra seconds of a step with a mask update, and of the step after it, over the
    /// median step (0 without updates): the median, not the mean, because on a shared VM one of
    /// a handful of update steps can take a spike that is not the update's.
    pub update_extra: f64,
    /// The collective operations of the timed steps (zero in a single process).
    pub comm: CommStats,
    /// Where the timed steps' time went, part by part.
    pub phases: StepProfile,
}

impl Timing {
    /// Share of training time spent on mask updates at one update every `delta_t` steps.
    pub fn overhead_at(&self, delta_t: usize) -> f64 {
        self.update_extra / (delta_t as f64 * self.median_step + self.update_extra)
    }

    /// Seconds per step with one update every `delta_t` steps: the median step plus one
    /// measured update's extra cost spread over `delta_t` steps.
    pub fn s_per_step_at(&self, delta_t: usize) -> f64 {
        self.median_step + self.update_extra / delta_t as f64
    }
}

/// Times every step through the trainer's events, so the cost of a mask update is measured on
/// the update steps themselves (robust to run-to-run noise, unlike a difference of two runs).
/// An epoch-end evaluation inside the timed steps counts, as it does in training; the
/// summary's test evaluation after the last step does not.
pub fn time_steps(cfg: &TrainConfig, data: &Datasets, warm: usize, steps: usize) -> Timing {
    let mut t = Trainer::new(cfg.clone(), data.clone()).expect("trainer");
    time_trainer(&mut t, warm, steps)
}

/// [`time_steps`] on a trainer built by the caller (e.g. one rank of a data-parallel run); the
/// timing also holds the communication of the timed steps.
pub fn time_trainer(t: &mut Trainer, warm: usize, steps: usize) -> Timing {
    assert!(
        warm + steps <= t.total_steps(),
        "{warm} warm-up and {steps} timed steps do not fit the run's {} steps: raise its epochs",
        t.total_steps()
    );
    t.run_until(warm, &mut Silent).expect("warm-up");
    let comm_before = t.communication();
    let phases_before = t.step_profile();
    let start = Instant::now();
    let mut last = start;
    let mut durations: Vec<(usize, f64)> = Vec::new();
    let mut updates: Vec<usize> = Vec::new();
    // Steps after which an epoch ended: the evaluation then falls in the next step's interval.
    let mut epoch_ends: Vec<usize> = Vec::new();
    t.run_until(warm + steps, &mut |e: &Event| {
        match e {
            Event::Step { step, .. } => {
                let now = Instant::now();
                durations.push((*step, (now - last).as_secs_f64()));
                last = now;
            }
            Event::MaskUpdate(r) => updates.push(r.step),
            Event::Epoch(m) => epoch_ends.push(m.step),
            _ => {}
        }
        Control::Continue
    })
    .expect("steps");
    // Up to the last step's event: `run_until` then evaluates the test set for its summary,
    // which is not part of training throughput.
    let total = (last - start).as_secs_f64();
    let mut normal: Vec<f64> = durations
        .iter()
        .filter(|(s, _)| !updates.contains(s))
        .map(|&(_, d)| d)
        .collect();
    normal.sort_by(f64::total_cmp);
    let median_step = normal[normal.len() / 2];
    // An update's cost is its step's excess and the next step's: the first sparse step after
    // an update builds the new layout's transpose for the input gradient, work the update
    // caused (the next step counts only when it is timed, not an update itself, and holds no
    // epoch-end evaluation).
    let mut extra: Vec<f64> = durations
        .iter()
        .enumerate()
        .filter(|(_, (s, _))| updates.contains(s))
        .map(|(i, &(s, d))| {
            let next = durations
                .get(i + 1)
                .filter(|(n, _)| *n == s + 1 && !updates.contains(n) && !epoch_ends.contains(&s))
                .map_or(0.0, |&(_, d)| d - median_step);
            (d - median_step + next).max(0.0)
        })
        .collect();
    extra.sort_by(f64::total_cmp);
    let comm_after = t.communication();
    Timing {
        comm: CommStats {
            seconds: comm_after.seconds - comm_before.seconds,
            bytes: comm_after.bytes - comm_before.bytes,
            calls: comm_after.calls - comm_before.calls,
        },
        phases: t.step_profile().since(&phases_before),
        s_per_step: total / steps as f64,
        median_step,
        update_extra: match extra.len() {
            0 => 0.0,
            n if n % 2 == 0 => (extra[n / 2 - 1] + extra[n / 2]) / 2.0,
            n => extra[n / 2],
        },
    }
}
