//! Training: the loop, its optimizer pieces, objectives, checkpoints and logs.

pub mod checkpoint;
pub mod heldout;
pub mod logging;
pub mod objective;
pub mod optim;
pub mod recompute;
pub mod reward;
pub mod trainer;

use std::sync::atomic::{AtomicBool, Ordering};

pub use trainer::{TrainOptions, TrainOutcome, train};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks running training loops to checkpoint and stop after the current step (Ctrl-C).
pub fn request_interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
