//! The training loop shared by every stage: progress bar, per-step seeding, periodic atomic checkpoints,
//! Ctrl-C and `--stop-after` (a checkpoint, then a clean stop), divergence check; and the checks every
//! stage makes on its run folder before any work ([`previous_run`], [`remove_stage_files`]).
//!
//! **Exact resume.** All randomness of step `s` is drawn after re-seeding from
//! [`spherear_core::noise::step_seed`]`(seed, s)`: [`run`] seeds libtorch's generator before every step,
//! and stages draw host-side randomness (flips) from [`step_rng`]. Together with the position-based
//! shuffler and the checkpointed weights, AdamW moments and step count (and EMA), a run resumed at any
//! step is bit-identical to one that never stopped (same thread count).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use spherear_core::noise::step_seed;
use spherear_core::validate::{at_least, positive};

use crate::checkpoint::TrainHeader;
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
    /// Train at most this many steps in this invocation, then checkpoint and stop as on Ctrl-C.
    pub stop_after: Option<usize>,
    /// Start the stage afresh: ignore and remove its earlier checkpoint, weights, metrics (and caches).
    pub force: bool,
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
            stop_after: None,
            force: false,
        }
    }

    /// Learning rate at `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        crate::optim::lr_at(step, self.steps, self.warmup, self.lr, self.min_lr_ratio)
    }

    /// Checks every value (the messages name the command-line flags).
    pub fn validate(&self) -> Result<()> {
        at_least("--steps", self.steps, 1)?;
        at_least("--batch", self.batch, 1)?;
        positive("--lr", self.lr)?;
        positive("--clip", self.clip)?;
        at_least("--ckpt-every", self.ckpt_every, 1)?;
        if let Some(n) = self.limit {
            at_least("--limit", n, 1)?;
        }
        if let Some(n) = self.stop_after {
            at_least("--stop-after", n, 1)?;
        }
        Ok(())
    }
}

/// The host-side RNG of step `step` (flip augmentation): ChaCha8 seeded with `step_seed(seed, step)`,
/// stream 1 (libtorch's generator gets the same seed; the stream keeps the two apart by construction).
pub fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(step_seed(seed, step as u64));
    rng.set_stream(1);
    rng
}

/// Decides, before any work, what an earlier run of `stage` in the run folder means for this one
/// (`header`: its training checkpoint, `weights`: its final weights, `changes`: how this invocation's
/// inputs differ from the ones the checkpoint recorded):
/// - with `--force`: nothing; the caller starts afresh (see [`remove_stage_files`]);
/// - changed inputs: an error naming them (resuming would mix two trainings);
/// - final weights and a checkpoint at ≥ `--steps` that had also reached its own `total_steps`: the
///   stage is finished — `Some(summary)`, and the caller must leave every file as it is;
/// - final weights without a checkpoint (an imported or copied run): an error, they are never overwritten;
/// - otherwise `None`: train (resuming from the checkpoint if there is one).
pub fn previous_run(
    stage: &str,
    ckpt: &Path,
    weights: &Path,
    header: Option<&TrainHeader>,
    changes: &[String],
    args: &TrainArgs,
) -> Result<Option<FitSummary>> {
    if args.force {
        return Ok(None);
    }
    match header {
        Some(_) if !changes.is_empty() => Err(crate::identity::changed_error(ckpt, stage, changes)),
        Some(h) if h.step >= args.steps.max(h.total_steps) && weights.exists() => {
            Ok(Some(FitSummary::finished(h.step, h.total_steps)))
        }
        Some(h) => {
            if !h.metadata.contains_key(crate::identity::DATA_SHA256) {
                eprintln!(
                    "note: {} records no data identity (older trainer); its inputs are not checked",
                    ckpt.display()
                );
            }
            Ok(None)
        }
        None if weights.exists() => Err(TrainError::Mismatch(format!(
            "{} exists without its training checkpoint {} (an imported or copied run?); it is never overwritten: \
             pass --force to train the {stage} stage afresh, or use a new --out",
            weights.display(),
            ckpt.display()
        ))),
        None => Ok(None),
    }
}

/// `--force`: removes the files `names` of a stage from `out` (missing ones are fine; only files and
/// symbolic links are removed, never a folder).
pub fn remove_stage_files(out: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        let p = out.join(name);
        match std::fs::symlink_metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Ok(m) if m.is_dir() => {
                return Err(TrainError::Io(format!("--force: {} is a folder; remove it yourself", p.display())))
            }
            _ => {}
        }
        std::fs::remove_file(&p).map_err(|e| TrainError::Io(format!("--force: cannot remove {}: {e}", p.display())))?;
    }
    Ok(())
}

/// What a stage reports about its run of the loop (also written to `<stage>-metrics.json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FitSummary {
    /// The stage had finished before this invocation, which did nothing (`steps_done`/`total_steps`
    /// are the finished run's).
    #[serde(skip)]
    pub already_finished: bool,
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
            already_finished: false,
            resumed_from: start,
            steps_done: o.step,
            total_steps: total,
            interrupted: o.interrupted,
            first_loss: o.first_loss,
            last_loss: o.last_loss,
            train_seconds: o.seconds,
        }
    }

    /// A stage found finished at `step` of `total` steps; nothing was done.
    pub fn finished(step: usize, total: usize) -> Self {
        FitSummary {
            already_finished: true,
            resumed_from: step,
            steps_done: step,
            total_steps: total,
            interrupted: false,
            first_loss: None,
            last_loss: None,
            train_seconds: 0.0,
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

/// Runs `step_fn(step)` (returning the loss and a status message) from `start` to `args.steps`, seeding
/// libtorch with `step_seed(args.seed, step)` before each; saves with `save(step)` every
/// `args.ckpt_every` steps and when the loop ends — at `args.steps`, when `stop` is raised (Ctrl-C), or
/// after `args.stop_after` steps of this invocation (both reported as `interrupted`).
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
        let time_boxed = args.stop_after.is_some_and(|n| step - start >= n);
        if stop.load(Ordering::SeqCst) || time_boxed {
            interrupted = true;
            break;
        }
        tch::manual_seed(step_seed(args.seed, step as u64) as i64);
        let (loss, msg) = step_fn(step)?;
        if !loss.is_finite() {
            return Err(TrainError::Mismatch(format!("{label} loss became {loss} at step {step}; lower --lr")));
        }
        losses.push(loss);
        step += 1;
        bar.set_position(step as u64);
        bar.set_message(msg);
        if step.is_multiple_of(ckpt_every.max(1)) && step < total {
            save(step)?;
        }
    }
    // Nothing to save when no step ran (the checkpoint on disk is already at `step`).
    if step > start {
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
