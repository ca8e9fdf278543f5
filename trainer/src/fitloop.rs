//! The skeleton every training stage shares. A stage implements [`Stage`] (its checks, inputs, model,
//! step, checkpoint contents, final weights and report); [`fit`] drives it: the run folder's earlier
//! state ([`previous_run`]: finished, changed inputs, `--force` with [`remove_stage_files`]), folder and
//! config file, seeding, restore from the checkpoint, the loop ([`run`]: progress bar, per-step seeding,
//! the shuffled batches, periodic atomic checkpoints, Ctrl-C and `--stop-after` — a checkpoint, then a
//! clean stop —, divergence check), the final weights and `<stage>-metrics.json`.
//!
//! **Exact resume.** All randomness of step `s` is drawn after re-seeding from
//! [`spherear_core::noise::step_seed`]`(seed, s)`: [`run`] seeds libtorch's generator before every step,
//! and stages draw host-side randomness (flips) from [`step_rng`]. Together with the position-based
//! shuffler and the checkpointed weights, AdamW moments and step count (and EMA), a run resumed at any
//! step is bit-identical to one that never stopped (same thread count).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use spherear_core::data::Shuffler;
use spherear_core::noise::step_seed;
use spherear_core::validate::{at_least, positive};
use tch::Tensor;

use crate::checkpoint::{self, StageConfig, TensorFile, TrainHeader};
use crate::error::{Result, TrainError};
use crate::identity::RunIdentity;
use crate::optim::{self, LrSchedule};
use crate::progress;

/// Optimisation and loop settings shared by every stage.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    pub steps: usize,
    pub batch: usize,
    /// Peak learning rate; warmup over `warmup` steps, then `schedule`.
    pub lr: f64,
    pub warmup: usize,
    /// `--lr-schedule`: the official one or ours ([`crate::optim::LrSchedule`]).
    pub schedule: LrSchedule,
    /// `--min-lr`: the floor of the cosine (absolute); `None`: official 1e-5, ours 0.05 × `lr`.
    pub min_lr: Option<f64>,
    /// `--decay-start` (official schedule only): the step the cosine starts at; `None`: no decay.
    pub decay_start: Option<usize>,
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
    /// The settings a stage starts from; each stage's `TRAIN_DEFAULTS` changes what it needs (the
    /// command line reads the defaults from there).
    pub const DEFAULT: TrainArgs = TrainArgs {
        steps: 2000,
        batch: 32,
        lr: 1e-3,
        warmup: 100,
        schedule: LrSchedule::Ours,
        min_lr: None,
        decay_start: None,
        clip: 1.0,
        ckpt_every: 250,
        seed: 0,
        limit: None,
        progress: true,
        stop_after: None,
        force: false,
    };

    /// [`TrainArgs::DEFAULT`] with `steps` steps.
    pub fn new(steps: usize) -> Self {
        TrainArgs { steps, ..Self::DEFAULT }
    }

    /// The floor of the cosine: `--min-lr`, else the schedule's default.
    pub fn min_lr(&self) -> f64 {
        self.min_lr.unwrap_or(match self.schedule {
            LrSchedule::Official => optim::OFFICIAL_MIN_LR,
            LrSchedule::Ours => self.lr * optim::OURS_MIN_LR_RATIO,
        })
    }

    /// Learning rate at `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        match self.schedule {
            LrSchedule::Official => {
                optim::lr_official(step, self.steps, self.warmup, self.decay_start, self.lr, self.min_lr())
            }
            LrSchedule::Ours => optim::lr_at(step, self.steps, self.warmup, self.lr, self.min_lr() / self.lr),
        }
    }

    /// The schedule's settings as a run records them (flag → value), so that a resume with another
    /// schedule is refused.
    pub fn schedule_record(&self) -> Vec<(&'static str, String)> {
        let min_lr = match (self.min_lr, self.schedule) {
            (Some(v), _) => v.to_string(),
            (None, LrSchedule::Official) => optim::OFFICIAL_MIN_LR.to_string(),
            (None, LrSchedule::Ours) => format!("{} x lr", optim::OURS_MIN_LR_RATIO),
        };
        let decay_start = self.decay_start.map_or_else(|| "none".to_string(), |s| s.to_string());
        vec![("--lr-schedule", self.schedule.name().to_string()), ("--min-lr", min_lr), ("--decay-start", decay_start)]
    }

    /// Checks every value (the messages name the command-line flags).
    pub fn validate(&self) -> Result<()> {
        at_least("--steps", self.steps, 1)?;
        at_least("--batch", self.batch, 1)?;
        positive("--lr", self.lr)?;
        positive("--clip", self.clip)?;
        if let Some(m) = self.min_lr {
            spherear_core::validate::in_range("--min-lr", m, 0.0, self.lr)?;
        }
        if self.decay_start.is_some() && self.schedule != LrSchedule::Official {
            return Err(spherear_core::CoreError::Invalid(
                "--decay-start applies to --lr-schedule official only".into(),
            )
            .into());
        }
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

/// A stage's own files in the run folder, by name.
#[derive(Debug, Clone, Copy)]
pub struct StageFiles {
    /// The resumable training checkpoint, `train-<stage>.safetensors`.
    pub checkpoint: &'static str,
    /// The final weights.
    pub weights: &'static str,
    /// The report, `<stage>-metrics.json`.
    pub metrics: &'static str,
    /// The stage's other files (`--force` removes them too).
    pub others: &'static [&'static str],
}

impl StageFiles {
    /// Every file of the stage: what `--force` removes.
    pub fn all(&self) -> Vec<&'static str> {
        [self.checkpoint, self.weights, self.metrics].into_iter().chain(self.others.iter().copied()).collect()
    }
}

/// What a stage settles before any work, for [`fit`].
pub struct Plan<'a, C> {
    /// The run folder.
    pub out: &'a Path,
    pub train: &'a TrainArgs,
    /// The config the stage trains; a checkpoint made for another is refused.
    pub config: C,
    /// What the run is made from, recorded in its checkpoint; a resume with other inputs is refused.
    pub identity: RunIdentity,
    /// The run folder's config file (its name), written once when missing (the AR stage writes
    /// `config.json` with its weights instead).
    pub config_file: Option<&'static str>,
}

/// A training stage, as [`fit`] drives it. The associated functions run before the stage exists (in this
/// order: [`Stage::plan`], [`Stage::finished`] or [`Stage::load`], [`Stage::build`]); the methods train it.
pub trait Stage: Sized {
    /// `vae`, `ar` or `judge`: the checkpoint's `stage`, the progress label, messages.
    const NAME: &'static str;
    /// How the resume message names the stage (`resuming VAE training from step N`).
    const TITLE: &'static str;
    const FILES: StageFiles;
    /// The config its checkpoints and weights record.
    type Config: StageConfig;
    /// The stage's settings.
    type Args;
    /// What the checks of [`Stage::plan`] produced and [`Stage::build`] needs (the AR stage: the VAE).
    type Checked;
    /// What is loaded before anything is written (the data), so that bad input fails before `--force`
    /// removes a file.
    type Loaded;
    /// What a run reports (also `<stage>-metrics.json`).
    type Report: serde::Serialize;

    /// The checks before any work (values, config against the run folder, inputs) and the plan.
    fn plan(args: &Self::Args) -> Result<(Plan<'_, Self::Config>, Self::Checked)>;
    /// The report of a stage that had finished before this invocation (nothing was done).
    fn finished(args: &Self::Args, plan: &Plan<'_, Self::Config>, run: FitSummary) -> Self::Report;
    /// Loads the inputs, before anything is written.
    fn load(args: &Self::Args, plan: &Plan<'_, Self::Config>) -> Result<Self::Loaded>;
    /// The freshly initialised stage (libtorch was just seeded with `--seed`; the run folder exists).
    fn build(
        args: &Self::Args,
        plan: &Plan<'_, Self::Config>,
        checked: Self::Checked,
        loaded: Self::Loaded,
    ) -> Result<Self>;

    /// The number of training examples (the shuffler draws batches of their indices).
    fn examples(&self) -> usize;
    /// One optimisation step `step` on the examples `batch`: (loss, progress message).
    fn step(&mut self, step: usize, batch: &[usize]) -> Result<(f64, String)>;
    /// Everything a training checkpoint holds.
    fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor>;
    /// Restores what [`Stage::checkpoint_tensors`] saved, from the checkpoint `path` at `step`.
    fn restore(&mut self, file: &TensorFile, step: usize, path: &Path) -> Result<()>;
    /// The report of an interrupted run.
    fn report(&self, run: FitSummary) -> Self::Report;
    /// After the last step: writes the final weights to `weights`, evaluates, reports.
    fn finish(&mut self, run: FitSummary, weights: &Path) -> Result<Self::Report>;
}

/// Trains (or resumes) stage `S`; `stop` is polled every step (Ctrl-C) and triggers a checkpoint.
///
/// Before any work: the stage's checks ([`Stage::plan`]), then its checkpoint's config and inputs and
/// the run's earlier state ([`previous_run`]: a finished stage returns at once with `already_finished`
/// and touches no file; a checkpoint made from other inputs is an error). Then the inputs are loaded;
/// with `--force` the stage's files ([`Stage::FILES`]) are removed; the folder and its config file are
/// created; libtorch is seeded, the stage built and restored from its checkpoint; the loop runs
/// ([`run`]); an uninterrupted run ends with the final weights ([`Stage::finish`]) and the metrics.
pub fn fit<S: Stage>(args: &S::Args, stop: &AtomicBool) -> Result<S::Report> {
    let (plan, checked) = S::plan(args)?;
    let (out, ta) = (plan.out, plan.train);
    let (ckpt, weights) = (out.join(S::FILES.checkpoint), out.join(S::FILES.weights));
    let header = if ta.force { None } else { checkpoint::read_train_header(&ckpt, S::NAME)? };
    if let Some(h) = &header {
        S::Config::check(&ckpt, S::NAME, &h.config(&ckpt)?, &plan.config)?;
    }
    let changes = header.as_ref().map(|h| plan.identity.changes(&h.metadata)).unwrap_or_default();
    if let Some(run) = previous_run(S::NAME, &ckpt, &weights, header.as_ref(), &changes, ta)? {
        return Ok(S::finished(args, &plan, run));
    }
    let loaded = S::load(args, &plan)?;
    if ta.force {
        remove_stage_files(out, &S::FILES.all())?;
    }
    std::fs::create_dir_all(out).map_err(|e| TrainError::Io(format!("cannot create {}: {e}", out.display())))?;
    if let Some(path) = plan.config_file.map(|name| out.join(name)).filter(|p| !p.exists()) {
        plan.config.save_file(&path)?;
    }
    let mut meta = HashMap::new();
    plan.identity.record(&mut meta);

    tch::manual_seed(ta.seed as i64);
    let mut stage = S::build(args, &plan, checked, loaded)?;
    let mut start = 0;
    if let Some((step, file)) = checkpoint::load_train(&ckpt, S::NAME, &plan.config)? {
        stage.restore(&file, step, &ckpt)?;
        start = step;
        eprintln!("resuming {} training from step {start} ({})", S::TITLE, ckpt.display());
    }
    let outcome = run(&mut stage, start, ta, stop, |stage, step| {
        checkpoint::save_train(&ckpt, S::NAME, step, ta.steps, &plan.config, stage.checkpoint_tensors(), &meta)
    })?;
    let summary = FitSummary::new(start, ta.steps, &outcome);
    if outcome.interrupted {
        return Ok(stage.report(summary));
    }
    let report = stage.finish(summary, &weights)?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| TrainError::Io(format!("metrics: {e}")))?;
    spherear_core::fsutil::write_atomic(&out.join(S::FILES.metrics), json.as_bytes())?;
    Ok(report)
}

/// Runs `stage` from step `start` to `args.steps`: before each step libtorch is seeded with
/// `step_seed(args.seed, step)` and the next batch drawn from the position-based shuffler; saves with
/// `save(stage, step)` every `args.ckpt_every` steps and when the loop ends — at `args.steps`, when `stop`
/// is raised (Ctrl-C), or after `args.stop_after` steps of this invocation (both reported as
/// `interrupted`).
pub fn run<S: Stage>(
    stage: &mut S,
    start: usize,
    args: &TrainArgs,
    stop: &AtomicBool,
    mut save: impl FnMut(&S, usize) -> Result<()>,
) -> Result<LoopOutcome> {
    let (total, ckpt_every) = (args.steps, args.ckpt_every);
    let label = S::NAME;
    let mut shuffler = Shuffler::with_position(stage.examples(), args.seed, (start * args.batch) as u64);
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
        let (loss, msg) = stage.step(step, &shuffler.next_batch(args.batch))?;
        if !loss.is_finite() {
            return Err(TrainError::Mismatch(format!("{label} loss became {loss} at step {step}; lower --lr")));
        }
        losses.push(loss);
        step += 1;
        bar.set_position(step as u64);
        bar.set_message(msg);
        if step.is_multiple_of(ckpt_every.max(1)) && step < total {
            save(&*stage, step)?;
        }
    }
    // Nothing to save when no step ran (the checkpoint on disk is already at `step`).
    if step > start {
        save(&*stage, step)?;
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
