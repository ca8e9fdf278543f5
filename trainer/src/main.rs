//! `trainer`: trains, samples and imports SphereAR models on libtorch.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use spherear_core::data::parse_source;
use spherear_core::grid::save_grid_png;
use spherear_core::validate::{at_least, in_range, non_negative, positive};
use spherear_core::{CoreError, Posterior};
use trainer::ar::ArModel;
use trainer::fit_ar::{self, fit_ar, ArFitArgs};
use trainer::fit_judge::{self, fit_judge, JudgeFitArgs};
use trainer::fit_vae::{self, fit_vae, VaeFitArgs};
use trainer::fitloop::{FitSummary, TrainArgs};
use trainer::layers::InitScheme;
use trainer::optim::{DecayGroups, LrSchedule};
use trainer::recipe::{self, ReconLoss};
use trainer::sample::{decode_timed, sample_tokens_with_stats, SampleRequest};

#[derive(Parser)]
#[command(name = "trainer", version, about = "Train, sample and import SphereAR models with libtorch.")]
struct Cli {
    /// CPU threads for libtorch, ≥ 1 (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `--posterior` (the names of [`Posterior`]).
#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum PosteriorArg {
    Spherical,
    Gaussian,
    GaussianNorm,
}

impl From<PosteriorArg> for Posterior {
    fn from(p: PosteriorArg) -> Self {
        match p {
            PosteriorArg::Spherical => Posterior::PowerSpherical,
            PosteriorArg::Gaussian => Posterior::Gaussian,
            PosteriorArg::GaussianNorm => Posterior::GaussianNorm,
        }
    }
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Stage {
    /// The S-VAE: reconstruction + KL of the Power Spherical posterior to the uniform sphere (or of the
    /// Gaussian posterior to N(0, I) with --posterior gaussian).
    Vae,
    /// The AR transformer + diffusion head on frozen VAE latents (needs --vae).
    Ar,
    /// The judge: a small CNN classifier (cross entropy) used to score generated images; ends with
    /// its test-split accuracy. Uses only the image size of --preset.
    Judge,
}

#[derive(Args)]
struct FitArgs {
    /// Which model to train.
    #[arg(long, value_enum)]
    stage: Stage,
    /// Model preset: fmnist-32 (CPU default), tiny (tests), spherear-b|l|h (official sizes). For the AR
    /// stage the preset's VAE part must equal the VAE run's.
    #[arg(long, default_value = "fmnist-32")]
    preset: String,
    /// AR stage: run folder of the trained VAE (vae.safetensors + config.json).
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Training data: `fashion-mnist` (Debian package dataset-fashion-mnist), `fashion-mnist:DIR`,
    /// or an ImageFolder root (one subfolder per class; optional train/ and test/ splits).
    #[arg(long, default_value = "fashion-mnist")]
    data: String,
    /// Run folder: config.json, checkpoints, weights, metrics and PNGs go here.
    #[arg(long)]
    out: PathBuf,
    // The defaults of the flags below are the library's (`TRAIN_DEFAULTS`, `DEFAULT_*` of each stage);
    // their help texts read them from there.
    #[arg(long, help = stage_default("Total optimisation steps", |t| t.steps))]
    steps: Option<usize>,
    #[arg(long, help = stage_default("Images per step", |t| t.batch))]
    batch: Option<usize>,
    #[arg(long, help = format!(
        "{}; official presets: {} for vae, {} for ar",
        stage_default("Peak learning rate (AdamW, β = 0.9/0.95, weight decay 0.05, see --decay-groups)", |t| t.lr),
        recipe::OFFICIAL_VAE_LR,
        recipe::OFFICIAL_AR_LR
    ))]
    lr: Option<f64>,
    #[arg(long, help = format!(
        "{}; official presets: 0 for vae, {} for ar",
        stage_default("Linear warmup steps", |t| t.warmup),
        recipe::OFFICIAL_AR_WARMUP
    ))]
    warmup: Option<usize>,
    /// Learning-rate schedule after the warmup. official: the peak, then from --decay-start a cosine to
    /// --min-lr (the official VAE run has no decay: a constant 1e-4); ours: a cosine from the end of the
    /// warmup to --min-lr. Default: official for spherear-b|l|h (vae and ar), ours for the small presets and
    /// the judge.
    #[arg(long, value_enum)]
    lr_schedule: Option<LrSchedule>,
    /// Floor of the cosine, absolute (default: 1e-5 for --lr-schedule official, 0.05 × --lr for ours).
    #[arg(long)]
    min_lr: Option<f64>,
    /// --lr-schedule official: the step the cosine starts at, or `none` for no decay (default: 20000 for
    /// the AR stage of the official presets, none for their VAE stage).
    #[arg(long, value_name = "STEP|none", value_parser = parse_decay_start)]
    decay_start: Option<DecayStart>,
    #[arg(long, help = format!(
        "VAE stage: weight of the KL term (spherical: mean over tokens; Gaussian: mean over all elements) \
         (default: {} for spherical, {} for gaussian and gaussian-norm)",
        fit_vae::DEFAULT_KL_WEIGHT,
        fit_vae::DEFAULT_GAUSSIAN_KL_WEIGHT
    ))]
    kl_weight: Option<f64>,
    /// Posterior family of the VAE, recorded in its config (VAE stage; default spherical). spherical: Power
    /// Spherical, tokens on the radius-√d sphere (SphereAR); gaussian: diagonal Gaussian, z = μ + σ·ε, KL to
    /// N(0, I), tokens never projected (the AR model sees them scaled to unit RMS, see README); gaussian-norm:
    /// the Gaussian posterior with samples projected onto the sphere (the paper's "Gaussian+norm"). The AR
    /// stage takes the VAE's; given there, it must name the same.
    #[arg(long, value_enum)]
    posterior: Option<PosteriorArg>,
    #[arg(long, help = format!(
        "AR stage: EMA decay of the shipped weights, from a copy of the initial weights (default: {} for \
         spherear-b|l|h, {} for the small presets)",
        recipe::OFFICIAL_EMA_DECAY,
        recipe::OURS_EMA_DECAY
    ))]
    ema_decay: Option<f64>,
    /// AR stage: warm the EMA decay up as min(decay, (1+t)/(10+t)) after step t (ours) instead of the
    /// official constant decay (default: false for spherear-b|l|h, true for the small presets).
    #[arg(long, value_name = "true|false", action = clap::ArgAction::Set)]
    ema_warmup: Option<bool>,
    /// VAE stage: reconstruction loss (default: l1 for spherear-b|l|h, mse for the small presets, whose
    /// demo reports PSNR, the quantity MSE optimises).
    #[arg(long, value_enum)]
    recon_loss: Option<ReconLoss>,
    /// VAE stage: initialisation of the convolutions and the encoder.output/quant_proj/post_quant_proj
    /// linears, the layers the official code leaves at the framework default (default: pytorch for
    /// spherear-b|l|h, tch for the small presets). All other layers get the official explicit init.
    #[arg(long, value_enum)]
    init: Option<InitScheme>,
    /// VAE and AR stages: which parameters get weight decay (default: official for spherear-b|l|h, ours for
    /// the small presets).
    #[arg(long, value_enum)]
    decay_groups: Option<DecayGroups>,
    /// AR stage: cache the latents of N augmented views per training image (the official random crop of
    /// 80–100 % of the side + 50 % horizontal flip, fixed by --seed) and draw one view per image per
    /// batch; 0 = none. Memory and encoding time grow N-fold (default: 0).
    #[arg(long, value_name = "N")]
    augment: Option<usize>,
    #[arg(long, help = stage_default("Gradient clipping: maximum global L2 norm", |t| t.clip))]
    clip: Option<f64>,
    #[arg(long, help = stage_default("Write a resumable checkpoint every N steps", |t| t.ckpt_every))]
    ckpt_every: Option<usize>,
    #[arg(long, help = stage_default("Seed for initialisation, shuffling, augmentation and label dropout", |t| t.seed))]
    seed: Option<u64>,
    /// VAE and judge stages: random horizontal flips.
    #[arg(long)]
    flip: bool,
    /// Use only the first N training images.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, help = format!(
        "VAE stage: held-out images scored for PSNR at the end (default {}). Judge stage: test images scored \
         for accuracy (default: the whole test split)",
        fit_vae::DEFAULT_EVAL_IMAGES
    ))]
    eval_images: Option<usize>,
    /// Train at most N steps in this invocation, then write a checkpoint and stop exactly as Ctrl-C does
    /// (exit code 130); rerunning the command continues, bit-identically to a run that never stopped (with
    /// the same --threads). A way to time-box a session.
    #[arg(long, value_name = "N")]
    stop_after: Option<usize>,
    /// Start this stage afresh: remove its own files from --out (train-<stage>.safetensors, its final
    /// weights and metrics; vae: vae-recon.png; ar: latents.safetensors; judge: judge-config.json), then
    /// train from step 0. Needed to retrain a finished stage, or to resume a stage with another --data,
    /// --limit or --vae. config.json and the other stages' files stay.
    #[arg(long)]
    force: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl FitArgs {
    /// Checks every numeric flag before any work (one line naming the flag).
    fn validate(&self) -> Result<(), CoreError> {
        let count = |flag: &str, v: Option<usize>| v.map_or(Ok(()), |v| at_least(flag, v, 1));
        count("--steps", self.steps)?;
        count("--batch", self.batch)?;
        count("--limit", self.limit)?;
        count("--eval-images", self.eval_images)?;
        count("--stop-after", self.stop_after)?;
        count("--ckpt-every", self.ckpt_every)?;
        if let Some(lr) = self.lr {
            positive("--lr", lr)?;
        }
        if let Some(w) = self.kl_weight {
            non_negative("--kl-weight", w)?;
        }
        if let Some(d) = self.ema_decay {
            in_range("--ema-decay", d, 0.0, 1.0)?;
        }
        if let Some(c) = self.clip {
            positive("--clip", c)?;
        }
        if let Some(m) = self.min_lr {
            non_negative("--min-lr", m)?;
        }
        let only = |flag: &str, given: bool, stages: &[Stage], names: &str| -> Result<(), CoreError> {
            if given && !stages.contains(&self.stage) {
                return Err(CoreError::Invalid(format!("{flag} applies to {names} only")));
            }
            Ok(())
        };
        only("--recon-loss", self.recon_loss.is_some(), &[Stage::Vae], "--stage vae")?;
        only("--init", self.init.is_some(), &[Stage::Vae], "--stage vae")?;
        only("--ema-warmup", self.ema_warmup.is_some(), &[Stage::Ar], "--stage ar")?;
        only("--augment", self.augment.is_some(), &[Stage::Ar], "--stage ar")?;
        only("--decay-groups", self.decay_groups.is_some(), &[Stage::Vae, Stage::Ar], "--stage vae and ar")?;
        Ok(())
    }
}

/// `--decay-start`: a step, or no decay.
#[derive(Clone, Copy)]
struct DecayStart(Option<usize>);

fn parse_decay_start(s: &str) -> Result<DecayStart, String> {
    match s {
        "none" => Ok(DecayStart(None)),
        _ => s.parse().map(|n| DecayStart(Some(n))).map_err(|_| format!("expected a step or `none`, got '{s}'")),
    }
}

/// `text` with the stages' default of one loop setting, read from the library: one value when every
/// stage has the same, else the value of each group of stages ("2000 for vae and ar, 1500 for judge").
fn stage_default<T: PartialEq + std::fmt::Display>(text: &str, get: fn(&TrainArgs) -> T) -> String {
    let stages =
        [("vae", &fit_vae::TRAIN_DEFAULTS), ("ar", &fit_ar::TRAIN_DEFAULTS), ("judge", &fit_judge::TRAIN_DEFAULTS)];
    let mut groups: Vec<(T, Vec<&str>)> = Vec::new();
    for (name, defaults) in stages {
        let v = get(defaults);
        match groups.iter_mut().find(|(g, _)| *g == v) {
            Some((_, names)) => names.push(name),
            None => groups.push((v, vec![name])),
        }
    }
    let text_of = |(v, names): &(T, Vec<&str>)| format!("{v} for {}", names.join(" and "));
    match groups.as_slice() {
        [(v, _)] => format!("{text} (default: {v})"),
        _ => format!("{text} (default: {})", groups.iter().map(text_of).collect::<Vec<_>>().join(", ")),
    }
}

#[derive(Args)]
struct SampleArgs {
    /// Run folder (or file) holding ar.safetensors + config.json.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Comma-separated class ids, one grid row each, in this order (default: every class).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    classes: Option<Vec<i64>>,
    /// Images per class (grid columns).
    #[arg(long, default_value_t = 1)]
    per_class: usize,
    /// Guidance scale (CFG), at least 1; 1 turns guidance off. It grows linearly from 1 at the first token.
    /// [default: the model's own, the same as `runtime generate` uses (see its --help)]
    #[arg(long, allow_negative_numbers = true)]
    cfg: Option<f32>,
    /// Euler–Maruyama steps of the diffusion head per token (plus one final Euler step).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Noise seed: image j of the request uses noise stream j of this seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per forward batch (before CFG doubling); results do not depend on it.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Output PNG grid: one row per class, images edge to edge (required unless --timing-json).
    #[arg(long, required_unless_present = "timing_json")]
    out: Option<PathBuf>,
    /// Also write the sampled tokens [N, L, d] here (safetensors, key "tokens").
    #[arg(long)]
    tokens_out: Option<PathBuf>,
    /// Write the per-stage timing (prefill, AR steps, head, host, decoder; calls; peak RSS) as JSON.
    #[arg(long)]
    timing_json: Option<PathBuf>,
    /// Benchmarking: sample only the first N tokens of each image and extrapolate the time to full
    /// images (the timing JSON says so). Writes no images.
    #[arg(long, conflicts_with_all = ["out", "tokens_out"])]
    token_limit: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a stage. Rerunning the same command resumes from the last checkpoint in --out (exactly:
    /// the result equals an uninterrupted run); Ctrl-C writes a checkpoint before exiting (code 130); a
    /// finished stage is left as it is (--force retrains it). Resuming with another --data, --limit, --vae
    /// or recipe (--recon-loss, --init, --decay-groups, --ema-decay, --ema-warmup, --augment, --lr-schedule,
    /// --min-lr, --decay-start) is refused.
    Fit(Box<FitArgs>),
    /// Sample a class-conditional PNG grid with the reference (libtorch) sampler.
    Sample(SampleArgs),
    /// Convert an official torch.save checkpoint (state dict under `ema`, else `model`) into our format,
    /// without executing pickle code; every key and shape is checked against the preset.
    Import(ImportArgs),
}

#[derive(Args)]
struct ImportArgs {
    /// The official checkpoint, e.g. SphereAR_B.pt.
    #[arg(long)]
    official: PathBuf,
    /// A separate official VAE checkpoint; its weights replace the main file's `vae.*`.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Preset whose layout the checkpoint must match (spherear-b|l|h, or a small preset).
    #[arg(long)]
    preset: String,
    /// Output run folder (ar.safetensors + config.json), written whole or not at all. An existing
    /// non-empty folder is refused unless --force.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing --out that holds a run (a config.json of a model config): the whole folder is
    /// replaced once the import succeeded. Never replaces a folder that is or contains --official/--vae.
    #[arg(long)]
    force: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        at_least("--threads", t, 1)?;
    }
    match &cli.cmd {
        Cmd::Fit(f) => f.validate()?,
        Cmd::Sample(s) => {
            if let Some(n) = s.token_limit {
                at_least("--token-limit", n, 1)?;
            }
        }
        Cmd::Import(_) => {}
    }
    let threads = cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    tch::set_num_threads(threads as i32);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: writing a checkpoint, then exiting (press Ctrl-C again to abort)");
        })
        .context("installing the Ctrl-C handler")?;
    }
    match cli.cmd {
        Cmd::Fit(f) => match f.stage {
            Stage::Vae => fit_vae_cmd(&f, &stop),
            Stage::Ar => fit_ar_cmd(&f, &stop),
            Stage::Judge => fit_judge_cmd(&f, &stop),
        },
        Cmd::Sample(s) => sample_cmd(&s),
        Cmd::Import(i) => {
            let r = trainer::import::import_official(&i.official, i.vae.as_deref(), &i.preset, &i.out, i.force)
                .with_context(|| format!("importing {}", i.official.display()))?;
            println!(
                "imported {} tensors ({} parameters) from the '{}' state dict into {}{}",
                r.tensors,
                r.parameters,
                r.source,
                i.out.display(),
                if r.skipped.is_empty() { String::new() } else { format!("; skipped {}", r.skipped.join(", ")) }
            );
            Ok(())
        }
    }
}

/// The loop settings: the flags given, else the stage's defaults `d` (the library's).
fn train_args(f: &FitArgs, d: &TrainArgs) -> TrainArgs {
    let schedule = f.lr_schedule.unwrap_or(d.schedule);
    let same_schedule = schedule == d.schedule;
    TrainArgs {
        steps: f.steps.unwrap_or(d.steps),
        batch: f.batch.unwrap_or(d.batch),
        lr: f.lr.unwrap_or(d.lr),
        warmup: f.warmup.unwrap_or(d.warmup),
        schedule,
        // Another schedule than the default drops the default's floor and decay start.
        min_lr: f.min_lr.or(d.min_lr.filter(|_| same_schedule)),
        decay_start: f.decay_start.map_or(d.decay_start.filter(|_| same_schedule), |s| s.0),
        clip: f.clip.unwrap_or(d.clip),
        ckpt_every: f.ckpt_every.unwrap_or(d.ckpt_every),
        seed: f.seed.unwrap_or(d.seed),
        limit: f.limit,
        progress: !f.quiet,
        stop_after: f.stop_after,
        force: f.force,
    }
}

fn fit_vae_cmd(f: &FitArgs, stop: &AtomicBool) -> Result<()> {
    let posterior = f.posterior.map_or(Posterior::default(), Posterior::from);
    let mut a = VaeFitArgs::new(&f.preset, parse_source(&f.data), f.out.clone()).with_posterior(posterior);
    a.train = train_args(f, &a.train);
    a.kl_weight = f.kl_weight.unwrap_or(a.kl_weight);
    a.recipe.recon_loss = f.recon_loss.unwrap_or(a.recipe.recon_loss);
    a.recipe.init = f.init.unwrap_or(a.recipe.init);
    a.recipe.decay_groups = f.decay_groups.unwrap_or(a.recipe.decay_groups);
    a.flip = f.flip;
    a.eval_images = f.eval_images.unwrap_or(a.eval_images);
    let r = fit_vae(&a, stop).with_context(|| format!("training the VAE into {}", f.out.display()))?;
    if !print_summary("vae", &r.run, f, stop, "") {
        return Ok(());
    }
    match (r.psnr_mode_db, r.psnr_sample_db) {
        (Some(m), Some(s)) => println!(
            "held-out PSNR: {m:.2} dB (posterior mode), {s:.2} dB (posterior sample); grid {}",
            f.out.join("vae-recon.png").display()
        ),
        _ => bail!("no evaluation was produced"),
    }
    Ok(())
}

fn fit_ar_cmd(f: &FitArgs, stop: &AtomicBool) -> Result<()> {
    let Some(vae) = f.vae.clone() else { bail!("--stage ar needs --vae RUN_FOLDER (a finished VAE stage)") };
    let mut a = ArFitArgs::new(vae, &f.preset, parse_source(&f.data), f.out.clone());
    a.train = train_args(f, &a.train);
    a.posterior = f.posterior.map(Posterior::from);
    a.recipe.ema.decay = f.ema_decay.unwrap_or(a.recipe.ema.decay);
    a.recipe.ema.warmup = f.ema_warmup.unwrap_or(a.recipe.ema.warmup);
    a.recipe.decay_groups = f.decay_groups.unwrap_or(a.recipe.decay_groups);
    a.recipe.augment = f.augment.unwrap_or(a.recipe.augment);
    let r = fit_ar(&a, stop).with_context(|| format!("training the AR model into {}", f.out.display()))?;
    let extra =
        format!(" (+{:.0} s latents); weights {}", r.latent_seconds, trainer::ar::weights_path(&f.out).display());
    print_summary("ar", &r.run, f, stop, &extra);
    Ok(())
}

fn fit_judge_cmd(f: &FitArgs, stop: &AtomicBool) -> Result<()> {
    let image_size = spherear_core::ModelConfig::preset(&f.preset)?.image_size;
    let mut a = JudgeFitArgs::new(parse_source(&f.data), f.out.clone(), image_size);
    a.train = train_args(f, &a.train);
    a.flip = f.flip;
    a.eval_images = f.eval_images.or(a.eval_images);
    let r = fit_judge(&a, stop).with_context(|| format!("training the judge into {}", f.out.display()))?;
    if !print_summary("judge", &r.run, f, stop, "") {
        return Ok(());
    }
    match r.test_accuracy {
        Some(acc) => println!(
            "judge test accuracy: {:.2}% on {} test images; weights {}",
            100.0 * acc,
            r.test_images,
            fit_judge::weights_path(&f.out).display()
        ),
        None => bail!("no evaluation was produced"),
    }
    Ok(())
}

/// Exits 130 for an interrupted run (Ctrl-C or --stop-after); prints one line saying so for a stage
/// that had finished before (returns false: nothing more to report); prints the one-line summary
/// otherwise (returns true).
fn print_summary(stage: &str, r: &FitSummary, f: &FitArgs, stop: &AtomicBool, extra: &str) -> bool {
    if r.interrupted {
        let why = match f.stop_after {
            Some(n) if !stop.load(Ordering::SeqCst) => format!(" (--stop-after {n})"),
            _ => String::new(),
        };
        eprintln!("stopped at step {}/{}{why}; rerun the same command to resume", r.steps_done, r.total_steps);
        std::process::exit(130);
    }
    if r.already_finished {
        println!(
            "{stage} stage already finished ({}/{} steps); its files are left as they are — use a new --out or \
             --force to retrain",
            r.steps_done, r.total_steps
        );
        return false;
    }
    println!(
        "{stage}: steps {}/{} (resumed from {}), {:.0} s, loss {:.4} -> {:.4}{extra}",
        r.steps_done,
        r.total_steps,
        r.resumed_from,
        r.train_seconds,
        r.first_loss.unwrap_or(f64::NAN),
        r.last_loss.unwrap_or(f64::NAN)
    );
    true
}

fn sample_cmd(s: &SampleArgs) -> Result<()> {
    let m = ArModel::load(&s.checkpoint).with_context(|| format!("loading {}", s.checkpoint.display()))?;
    let nc = m.config.num_classes as i64;
    let rows = s.classes.clone().unwrap_or_else(|| (0..nc).collect());
    let cfg = s.cfg.unwrap_or(m.config.default_cfg());
    let mut req = SampleRequest::grid(&rows, s.per_class, cfg, s.steps, s.seed, s.batch)?;
    req.token_limit = s.token_limit;
    req.validate(m.config.num_classes)?;
    // Outputs are checked before any work: a target that is not a regular file, or a folder that cannot be
    // written, fails now rather than after the sampling.
    let outs: Vec<&PathBuf> = [&s.out, &s.tokens_out, &s.timing_json].into_iter().flatten().collect();
    for (i, p) in outs.iter().enumerate() {
        if outs[..i].contains(p) {
            bail!("{} is given for two outputs; give each output its own file", p.display());
        }
        spherear_core::fsutil::check_file_output(p)?;
    }
    if s.token_limit.is_some() {
        // Benchmark mode: one untimed 2-token pass first (allocator and thread-pool warm-up), as the
        // benchmarks do for the runtime.
        let warm = SampleRequest { token_limit: Some(2), seed: s.seed.wrapping_add(1), ..req.clone() };
        let _ = sample_tokens_with_stats(&m, &warm, |_| {})?;
    }
    let bar = trainer::progress::bar(req.classes.len() as u64, 0, "sample", !s.quiet);
    spherear_core::timing::reset_peak_rss();
    let t0 = std::time::Instant::now();
    let (stats, tokens) = sample_tokens_with_stats(&m, &req, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let mut timing = stats.timing;
    let images = decode_timed(&m, &tokens, req.batch, &mut timing);
    timing.peak_rss_bytes = spherear_core::timing::peak_rss_bytes();
    if let Some(p) = &s.timing_json {
        let text = serde_json::to_string_pretty(&timing).context("serialising the timing")?;
        spherear_core::fsutil::write_atomic(p, text.as_bytes()).with_context(|| format!("writing {}", p.display()))?;
    }
    if s.token_limit.is_some() {
        println!(
            "timed {} tokens of {} per image: {:.3} s per image extrapolated ({:.3} images/s)",
            timing.tokens_timed,
            timing.num_tokens,
            timing.seconds_per_image(),
            timing.images_per_second()
        );
        return Ok(());
    }
    let flat = Vec::<f32>::try_from(images.flatten(0, -1)).context("reading the decoded images")?;
    if let Some(out) = &s.out {
        save_grid_png(out, &flat, req.classes.len(), m.config.image_size, s.per_class)?;
    }
    if let Some(p) = &s.tokens_out {
        let mut f = trainer::checkpoint::TensorFile::default();
        f.tensors.insert("tokens".into(), tokens.shallow_clone());
        trainer::checkpoint::save(p, &f)?;
    }
    let n = req.classes.len() as f64;
    let tok = n * m.config.num_tokens() as f64;
    println!(
        "sampled {} images in {secs:.2} s ({:.2} images/s, {:.1} tokens/s){}",
        req.classes.len(),
        n / secs,
        tok / secs,
        s.out.as_ref().map(|o| format!("; grid {}", o.display())).unwrap_or_default()
    );
    Ok(())
}
