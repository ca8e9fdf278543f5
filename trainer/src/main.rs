//! `trainer`: trains the SphereAR S-VAE (and, later, the AR model) on libtorch.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use spherear_core::data::parse_source;
use trainer::fit_vae::{fit_vae, VaeFitArgs};

#[derive(Parser)]
#[command(name = "trainer", version, about = "Train SphereAR models (S-VAE and AR) with libtorch.")]
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
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a stage. Rerunning the same command resumes from the last checkpoint in --out;
    /// Ctrl-C writes a checkpoint before exiting.
    Fit {
        /// Which model to train.
        #[arg(long, value_enum)]
        stage: Stage,
        /// Model preset: fmnist-32 (CPU default), tiny (tests), spherear-b|l|h (official sizes).
        #[arg(long, default_value = "fmnist-32")]
        preset: String,
        /// Training data: `fashion-mnist` (Debian package dataset-fashion-mnist), `fashion-mnist:DIR`,
        /// or an ImageFolder root (one subfolder per class; optional train/ and test/ splits).
        #[arg(long, default_value = "fashion-mnist")]
        data: String,
        /// Run folder: config.json, checkpoints, weights, metrics and PNGs go here.
        #[arg(long)]
        out: PathBuf,
        /// Total optimisation steps.
        #[arg(long, default_value_t = 3000)]
        steps: usize,
        /// Images per step.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Peak learning rate (AdamW, β = 0.9/0.95, weight decay 0.05 except norms, biases, embeddings).
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Linear warmup steps before the cosine decay.
        #[arg(long, default_value_t = 100)]
        warmup: usize,
        /// Weight of the KL term (mean over tokens).
        #[arg(long, default_value_t = 0.004)]
        kl_weight: f64,
        /// Gradient clipping: maximum global L2 norm.
        #[arg(long, default_value_t = 1.0)]
        clip: f64,
        /// Write a resumable checkpoint every N steps.
        #[arg(long, default_value_t = 250)]
        ckpt_every: usize,
        /// Seed for initialisation, shuffling and augmentation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Random horizontal flips.
        #[arg(long)]
        flip: bool,
        /// Use only the first N training images.
        #[arg(long)]
        limit: Option<usize>,
        /// Held-out images scored for PSNR at the end.
        #[arg(long, default_value_t = 1000)]
        eval_images: usize,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
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
        Cmd::Fit {
            stage: Stage::Vae,
            preset,
            data,
            out,
            steps,
            batch,
            lr,
            warmup,
            kl_weight,
            clip,
            ckpt_every,
            seed,
            flip,
            limit,
            eval_images,
            quiet,
        } => {
            let mut a = VaeFitArgs::new(&preset, parse_source(&data), out.clone());
            a.steps = steps;
            a.batch = batch;
            a.lr = lr;
            a.warmup = warmup;
            a.kl_weight = kl_weight;
            a.clip = clip;
            a.ckpt_every = ckpt_every;
            a.seed = seed;
            a.flip = flip;
            a.limit = limit;
            a.eval_images = eval_images;
            a.progress = !quiet;
            let r = fit_vae(&a, &stop).with_context(|| format!("training the VAE into {}", out.display()))?;
            if r.interrupted {
                eprintln!("stopped at step {}/{}; rerun the same command to resume", r.steps_done, r.total_steps);
                std::process::exit(130);
            }
            println!(
                "vae: steps {}/{} (resumed from {}), {:.0} s, loss {:.4} -> {:.4}",
                r.steps_done,
                r.total_steps,
                r.resumed_from,
                r.train_seconds,
                r.first_loss.unwrap_or(f64::NAN),
                r.last_loss.unwrap_or(f64::NAN)
            );
            match (r.psnr_mode_db, r.psnr_sample_db) {
                (Some(m), Some(s)) => println!(
                    "held-out PSNR: {m:.2} dB (posterior mode), {s:.2} dB (posterior sample); grid {}",
                    out.join("vae-recon.png").display()
                ),
                _ => bail!("no evaluation was produced"),
            }
        }
    }
    Ok(())
}
