//! The training loop shared by every stage: progress bar, periodic atomic checkpoints, Ctrl-C
//! (a checkpoint, then a clean stop), divergence check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::error::{Result, TrainError};
use crate::progress;

/// Optimisation and loop settings shared by every stage.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    pub steps: usize,
    pub batch: usize,
    /// Peak learning rate; linear warmup over `warmup` steps, then cosine decay to `lr · min_lr_ratio`.
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup: usize,
    /// Maximum global gradient norm.
    pub clip: f64,
    pub ckpt_every: usize,
    pub seed: u64,
    /// Use only the first N training images (tests, quick runs).
    pub limit: Option<usize>,
    pub progress: bool,
}

impl TrainArgs {
    pub fn new(steps: usize) -> Self {
        TrainArgs {
            steps,
            batch: 32,
            lr: 1e-3,
            min_lr_ratio: 0.05,
            warmup: 100,
            clip: 1.0,
            ckpt_every: 250,
            seed: 0,
            limit: None,
            progress: true,
        }
    }

    /// Learning rate at `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        crate::optim::lr_at(step, self.steps, self.warmup, self.lr, self.min_lr_ratio)
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 || self.steps == 0 {
            return Err(spherear_core::CoreError::Invalid("--steps and --batch must be ≥ 1".into()).into());
        }
        Ok(())
    }
}

/// What a stage reports about its run of the loop (also written to `<stage>-metrics.json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FitSummary {
    pub resumed_from: usize,
    pub steps_done: usize,
    pub total_steps: usize,
    pub interrupted: bool,
    /// Mean loss of the first and last (up to) 50 steps of this invocation.
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub train_seconds: f64,
}

impl FitSummary {
    pub fn new(start: usize, total: usize, o: &LoopOutcome) -> Self {
        FitSummary {
            resumed_from: start,
            steps_done: o.step,
            total_steps: total,
            interrupted: o.interrupted,
            first_loss: o.first_loss,
            last_loss: o.last_loss,
            train_seconds: o.seconds,
        }
    }
}

/// How a run of the loop ended.
#[derive(Debug, Clone)]
pub struct LoopOutcome {
    pub step: usize,
    pub interrupted: bool,
    /// Mean loss of the first and last (up to) 50 steps of this invocation.
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub seconds: f64,
}

/// Runs `step_fn(step)` (returning the loss and a status message) from `start` to `args.steps`, saving
/// with `save(step)` every `args.ckpt_every` steps, at the end, and when `stop` is raised.
pub fn run(
    label: &str,
    start: usize,
    args: &TrainArgs,
    stop: &AtomicBool,
    mut step_fn: impl FnMut(usize) -> Result<(f64, String)>,
    mut save: impl FnMut(usize) -> Result<()>,
) -> Result<LoopOutcome> {
    let (total, ckpt_every) = (args.steps, args.ckpt_every);
    let bar = progress::bar(total as u64, start as u64, label, args.progress);
    let t0 = Instant::now();
    let mut losses: Vec<f64> = Vec::new();
    let mut step = start;
    let mut interrupted = false;
    while step < total {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let (loss, msg) = step_fn(step)?;
        if !loss.is_finite() {
            return Err(TrainError::Mismatch(format!("{label} loss became {loss} at step {step}; lower --lr")));
        }
        losses.push(loss);
        step += 1;
        bar.set_position(step as u64);
        bar.set_message(msg);
        if step % ckpt_every.max(1) == 0 && step < total {
            save(step)?;
        }
    }
    if step > start || !interrupted {
        save(step)?;
    }
    bar.finish_and_clear();
    let mean = |s: &[f64]| (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64);
    let k = losses.len().min(50);
    Ok(LoopOutcome {
        step,
        interrupted,
        first_loss: mean(&losses[..k]),
        last_loss: mean(&losses[losses.len() - k..]),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
