//! What the trainer reports while it runs ([`Event`]) and how a front end answers
//! ([`Control`]): the library prints nothing, a [`Progress`] decides what to show.

use std::path::Path;

use dst_core::UpdateReport;

use crate::metrics::EpochMetrics;

/// What the trainer reports while it runs.
#[derive(Debug)]
pub enum Event<'a> {
    /// The run (or the resumed run) starts.
    Start {
        /// Steps in the whole run.
        total_steps: usize,
        /// Steps per epoch.
        steps_per_epoch: usize,
        /// Steps already done (resumed runs).
        done: usize,
    },
    /// An optimizer step finished.
    Step {
        /// Steps so far.
        step: usize,
        /// 1-based epoch.
        epoch: usize,
        /// The batch's loss.
        loss: f32,
        /// Learning rate used.
        lr: f64,
    },
    /// A mask update happened (dst methods).
    MaskUpdate(&'a UpdateReport),
    /// An epoch finished and was evaluated.
    Epoch(&'a EpochMetrics),
    /// A checkpoint was written to this folder.
    Checkpoint(&'a Path),
}

/// What a front end tells the trainer after each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep going.
    Continue,
    /// Stop after this step (a checkpoint is written first when there is an output folder).
    Stop,
}

/// Receives the trainer's events (progress bars, logs, Ctrl-C handling). `Send`, because a
/// run with `threads` set executes inside its own thread pool.
pub trait Progress {
    /// Called for every event; return [`Control::Stop`] to end the run early.
    fn on_event(&mut self, event: &Event<'_>) -> Control;
}

impl<F: FnMut(&Event<'_>) -> Control> Progress for F {
    fn on_event(&mut self, event: &Event<'_>) -> Control {
        self(event)
    }
}

/// A [`Progress`] that ignores everything.
pub struct Silent;

impl Progress for Silent {
    fn on_event(&mut self, _: &Event<'_>) -> Control {
        Control::Continue
    }
}
