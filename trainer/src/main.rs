//! `trainer`: trains, samples and imports SphereAR models on libtorch.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use spherear_core::data::{parse_source, save_grid_png};
use trainer::ar::ArModel;
use trainer::fit_ar::{fit_ar, ArFitArgs};
use trainer::fit_vae::{fit_vae, VaeFitArgs};
use trainer::fitloop::{FitSummary, TrainArgs};
use trainer::sample::{decode, sample_tokens, SampleRequest};

#[derive(Parser)]
#[command(name = "trainer", version, about = "Train, sample and import SphereAR models with libtorch.")]
struct Cli {
    /// CPU threads for libtorch (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Stage {
    /// The S-VAE: reconstruction + KL of the Power Spherical posterior to the uniform sphere.
    Vae,
    /// The AR transformer + diffusion head on frozen VAE latents (needs --vae).
    Ar,
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
    /// Total optimisation steps (default: 2000 for each stage).
    #[arg(long)]
    steps: Option<usize>,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Peak learning rate (AdamW, β = 0.9/0.95, weight decay 0.05 except norms, biases, embeddings).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Linear warmup steps before the cosine decay.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// VAE stage: weight of the KL term (mean over tokens).
    #[arg(long, default_value_t = 0.004)]
    kl_weight: f64,
    /// AR stage: EMA decay of the shipped weights (warmed up as min(decay, (1+t)/(10+t))).
    #[arg(long, default_value_t = 0.999)]
    ema_decay: f64,
    /// Gradient clipping: maximum global L2 norm.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Write a resumable checkpoint every N steps.
    #[arg(long, default_value_t = 250)]
    ckpt_every: usize,
    /// Seed for initialisation, shuffling, augmentation and label dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// VAE stage: random horizontal flips.
    #[arg(long)]
    flip: bool,
    /// Use only the first N training images.
    #[arg(long)]
    limit: Option<usize>,
    /// VAE stage: held-out images scored for PSNR at the end.
    #[arg(long, default_value_t = 1000)]
    eval_images: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
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
    /// Classifier-free guidance scale (1 = none; linear schedule from 1 at token 0 to cfg).
    #[arg(long, default_value_t = 3.0)]
    cfg: f32,
    /// Euler–Maruyama steps of the diffusion head per token (plus one final Euler step).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Noise seed: image j of the request uses noise stream j of this seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per forward batch (before CFG doubling); results do not depend on it.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Output PNG grid: one row per class, images edge to edge.
    #[arg(long)]
    out: PathBuf,
    /// Also write the sampled tokens [N, L, d] here (safetensors, key "tokens").
    #[arg(long)]
    tokens_out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a stage. Rerunning the same command resumes from the last checkpoint in --out;
    /// Ctrl-C writes a checkpoint before exiting.
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
    /// Output run folder (ar.safetensors + config.json).
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
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
        },
        Cmd::Sample(s) => sample_cmd(&s),
        Cmd::Import(i) => {
            let r = trainer::import::import_official(&i.official, i.vae.as_deref(), &i.preset, &i.out)
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

fn interrupted(step: usize, total: usize) -> ! {
    eprintln!("stopped at step {step}/{total}; rerun the same command to resume");
    std::process::exit(130);
}

fn train_args(f: &FitArgs, default_steps: usize) -> TrainArgs {
    TrainArgs {
        steps: f.steps.unwrap_or(default_steps),
        batch: f.batch,
        lr: f.lr,
        min_lr_ratio: 0.05,
        warmup: f.warmup,
        clip: f.clip,
        ckpt_every: f.ckpt_every,
        seed: f.seed,
        limit: f.limit,
        progress: !f.quiet,
    }
}

fn fit_vae_cmd(f: &FitArgs, stop: &AtomicBool) -> Result<()> {
    let mut a = VaeFitArgs::new(&f.preset, parse_source(&f.data), f.out.clone());
    a.train = train_args(f, 2000);
    a.kl_weight = f.kl_weight;
    a.flip = f.flip;
    a.eval_images = f.eval_images;
    let r = fit_vae(&a, stop).with_context(|| format!("training the VAE into {}", f.out.display()))?;
    print_summary("vae", &r.run, "");
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
    a.train = train_args(f, 2000);
    a.ema_decay = f.ema_decay;
    let r = fit_ar(&a, stop).with_context(|| format!("training the AR model into {}", f.out.display()))?;
    let extra =
        format!(" (+{:.0} s latents); weights {}", r.latent_seconds, trainer::ar::weights_path(&f.out).display());
    print_summary("ar", &r.run, &extra);
    Ok(())
}

/// Exits 130 for an interrupted run; prints the one-line summary otherwise.
fn print_summary(stage: &str, r: &FitSummary, extra: &str) {
    if r.interrupted {
        interrupted(r.steps_done, r.total_steps);
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
}

fn sample_cmd(s: &SampleArgs) -> Result<()> {
    let m = ArModel::load(&s.checkpoint).with_context(|| format!("loading {}", s.checkpoint.display()))?;
    let nc = m.config.num_classes as i64;
    let rows = s.classes.clone().unwrap_or_else(|| (0..nc).collect());
    let req = SampleRequest::grid(&rows, s.per_class, s.cfg, s.steps, s.seed, s.batch)?;
    req.validate(m.config.num_classes)?;
    let bar = trainer::progress::bar(req.classes.len() as u64, 0, "sample", !s.quiet);
    let t0 = std::time::Instant::now();
    let tokens = sample_tokens(&m, &req, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let images = decode(&m, &tokens);
    let flat = Vec::<f32>::try_from(images.flatten(0, -1)).context("reading the decoded images")?;
    save_grid_png(&s.out, &flat, req.classes.len(), m.config.image_size, s.per_class)?;
    if let Some(p) = &s.tokens_out {
        let mut f = trainer::checkpoint::TensorFile::default();
        f.tensors.insert("tokens".into(), tokens.shallow_clone());
        trainer::checkpoint::save(p, &f)?;
    }
    let n = req.classes.len() as f64;
    let tok = n * m.config.num_tokens() as f64;
    println!(
        "sampled {} images in {secs:.2} s ({:.2} images/s, {:.1} tokens/s); grid {}",
        req.classes.len(),
        n / secs,
        tok / secs,
        s.out.display()
    );
    Ok(())
}
