//! `runtime`: SphereAR image generation on ONNX Runtime from an `exporter onnx` folder.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use runtime::error::one_line;
use runtime::job::GridJob;
use runtime::output::OutputWriter;
use runtime::{
    Generator, GeneratorOptions, Manifest, OutputOptions, Provider, ProviderOptions, RuntimeError, TensorRtOptions,
};

#[derive(Parser)]
#[command(
    name = "runtime",
    version,
    about = "Generate SphereAR images with ONNX Runtime (KV cache, CFG, Euler-Maruyama head, sphere projection)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sample class-conditional images from an export and write a PNG grid (same layout, noise and
    /// tokens as `trainer sample` with the same arguments).
    Generate(Box<GenerateArgs>),
    /// Score generated images with a judge classifier (`exporter judge` folder): class accuracy and the
    /// Fréchet distance of its penultimate-layer features to the dataset's test split, for every
    /// steps x cfg setting, plus a reference row of real test images against the training split.
    /// Prints a table; with --out also writes eval.json, eval.md and eval.png (distance vs CFG).
    Eval(Box<EvalArgs>),
    /// Serve images over HTTP with token-level continuous batching: POST /v1/images
    /// {"class": C, "cfg": 3.0, "steps": 10, "seed": 0, "n": 1} returns JSON (base64 PNGs + per-image
    /// timing) or, with `Accept: image/png`, one PNG (a 1 x n grid for n > 1); GET /healthz; GET /metrics
    /// (Prometheus text). Image k of a request is bit-identical to image k of
    /// `runtime generate --classes C --per-class n --cfg .. --steps .. --seed ..`. The model is loaded once;
    /// ONNX Runtime runs on one engine thread over a pool of --max-batch KV rows. SIGTERM/SIGINT: stop
    /// accepting, answer waiting requests 503, finish the running images, exit 0.
    Serve(Box<ServeArgs>),
}

#[derive(Args)]
struct ServeArgs {
    /// Export folder written by `exporter onnx` (manifest.json, *.onnx, weights.bin).
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (loopback by default; the service has no authentication).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// TCP port (0: any free port; the address is printed as `listening on http://HOST:PORT`).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// KV slot rows of the engine's pool, CFG rows included (an image with cfg > 1 takes two rows). Bounds
    /// the rows of every ar_step / head_step call and the KV memory (printed at start).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests that may wait for KV rows; a request beyond it gets 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Per-request deadline in seconds from arrival (queue wait included); past it the request gets 504 and
    /// its KV rows are freed.
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Largest `steps` a request may ask for (head Euler-Maruyama steps per token); requests without
    /// `steps` get the manifest's default capped at this.
    #[arg(long, default_value_t = 100)]
    max_steps: usize,
    /// Largest `n` (images per request).
    #[arg(long, default_value_t = 16)]
    max_n: usize,
    /// When waiting images may enter the pool.
    #[arg(long, value_enum, default_value_t = runtime::serve::Scheduler::Continuous)]
    scheduler: runtime::serve::Scheduler,
    /// The execution provider (the KV pool stays in host memory).
    #[command(flatten)]
    device: DeviceArgs,
    /// Threads of the one ONNX Runtime pool all sessions share (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Path of libonnxruntime.so (default: $ORT_DYLIB_PATH, else the onnxruntime wheel in the workspace .venv).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    /// Export folder written by `exporter onnx`.
    #[arg(long)]
    model: PathBuf,
    /// Judge folder written by `exporter judge` (manifest.json + judge.onnx).
    #[arg(long)]
    judge: PathBuf,
    /// Generated images per class for every setting.
    #[arg(long, default_value_t = 100)]
    per_class: usize,
    /// Comma-separated CFG scales.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
    cfg: Vec<f32>,
    /// Comma-separated head steps.
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    steps: Vec<usize>,
    /// Noise seed (image j uses stream j).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per generation batch (before CFG doubling).
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Real data: `fashion-mnist`, `fashion-mnist:DIR` or an ImageFolder root (test split = the target set).
    #[arg(long, default_value = "fashion-mnist")]
    data: String,
    /// Training images for the reference row's statistics (default: all).
    #[arg(long)]
    train_limit: Option<usize>,
    /// Folder for eval.json, eval.md, eval.png.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Threads of the one ONNX Runtime pool all sessions share (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Path of libonnxruntime.so (default: $ORT_DYLIB_PATH, else the onnxruntime wheel in the workspace .venv).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum ProviderArg {
    /// ONNX Runtime's CPU provider.
    Cpu,
    /// CUDA (falls back to CPU with a warning unless --strict-provider).
    Cuda,
    /// TensorRT with CUDA for the rest (falls back to CPU with a warning unless --strict-provider).
    Tensorrt,
}

#[derive(Args)]
struct GenerateArgs {
    /// Export folder written by `exporter onnx` (manifest.json, *.onnx, weights.bin).
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated class ids, one grid row each, in this order (default: every class).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    classes: Option<Vec<i64>>,
    /// Images per class (grid columns).
    #[arg(long, default_value_t = 1)]
    per_class: usize,
    /// Classifier-free guidance scale, >= 1 (1 = none; linear schedule from 1 at token 0 to cfg).
    /// [default: the model's: 4.5 for SphereAR-B/H, 4.6 for L (the official values), 5 for fmnist-32, 3 for tiny]
    #[arg(long, allow_negative_numbers = true)]
    cfg: Option<f32>,
    /// Euler-Maruyama steps of the diffusion head per token, plus one final Euler step
    /// (default: the manifest's default_steps, 100).
    #[arg(long)]
    steps: Option<usize>,
    /// Noise seed: image j of the request uses noise stream j of this seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per batch before CFG doubling; larger requests are split. Results do not depend on it.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Output PNG grid: one row per class, per-class images edge to edge (as `trainer sample`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write one PNG per image into this folder (NNNN-classC.png).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Also write the sampled tokens [N, L, d] here (safetensors, key "tokens").
    #[arg(long)]
    tokens_out: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    /// TensorRT: folder for built engines and the timing cache (reused across runs).
    #[arg(long)]
    trt_engine_cache: Option<PathBuf>,
    /// TensorRT: allow fp16 kernels.
    #[arg(long)]
    trt_fp16: bool,
    /// TensorRT: allow int8 kernels (give --trt-int8-calibration-table for graphs without Q/DQ nodes).
    #[arg(long)]
    trt_int8: bool,
    /// TensorRT: INT8 calibration table to use with --trt-int8: `calibration calibrate`'s
    /// tensorrt/calibration.flatbuffers (or a native TensorRT cache, detected by its `TRT-` header).
    #[arg(long)]
    trt_int8_calibration_table: Option<PathBuf>,
    /// Threads of the one ONNX Runtime pool all sessions share (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Path of libonnxruntime.so (default: $ORT_DYLIB_PATH, else the onnxruntime wheel in the workspace .venv).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Where the graphs run (shared by `generate` and `serve`).
#[derive(Args)]
struct DeviceArgs {
    /// Execution provider.
    #[arg(long, value_enum, default_value_t = ProviderArg::Cpu)]
    provider: ProviderArg,
    /// Fail instead of falling back to CPU when the requested provider cannot be used.
    #[arg(long)]
    strict_provider: bool,
    /// GPU ordinal for cuda / tensorrt.
    #[arg(long, default_value_t = 0)]
    device_id: i32,
}

impl DeviceArgs {
    fn options(&self, tensorrt: TensorRtOptions) -> ProviderOptions {
        ProviderOptions {
            provider: match self.provider {
                ProviderArg::Cpu => Provider::Cpu,
                ProviderArg::Cuda => Provider::Cuda,
                ProviderArg::Tensorrt => Provider::TensorRt,
            },
            strict: self.strict_provider,
            device_id: self.device_id,
            tensorrt,
        }
    }
}

fn provider_options(a: &GenerateArgs) -> ProviderOptions {
    a.device.options(TensorRtOptions {
        engine_cache: a.trt_engine_cache.clone(),
        fp16: a.trt_fp16,
        int8: a.trt_int8,
        int8_calibration_table: a.trt_int8_calibration_table.clone(),
    })
}

/// Exit status of a run stopped by Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

fn generate(a: &GenerateArgs) -> Result<ExitCode> {
    // Everything that can be checked without ONNX Runtime is checked first, so bad input costs nothing
    // and never leaves a file behind.
    let manifest = Manifest::load(&a.model)?;
    let rows = a.classes.clone().unwrap_or_else(|| (0..manifest.num_classes as i64).collect());
    let steps = a.steps.unwrap_or(manifest.sampler.default_steps);
    let cfg = a.cfg.unwrap_or(manifest.config.default_cfg());
    let job = GridJob { rows, per_class: a.per_class, cfg, steps, seed: a.seed, batch: a.batch };
    job.validate(&manifest)?;
    let total = job.total()?;
    let outputs =
        OutputOptions { grid: a.out.clone(), cols: a.per_class, dir: a.out_dir.clone(), tokens: a.tokens_out.clone() };
    outputs.check()?;
    outputs.check_memory(total, manifest.image_size, manifest.num_tokens, manifest.latent_dim)?;
    let options = GeneratorOptions { provider: provider_options(a), threads: a.threads, ort_lib: a.ort_lib.clone() };
    options.provider.validate()?;

    let generator = Generator::with_manifest(&a.model, manifest, &options)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let m = generator.manifest();
    let mut writer = OutputWriter::new(&outputs, total, m.image_size, m.num_tokens, m.latent_dim)?;
    let cancel = interrupt_flag()?;
    let bar = progress_bar((total as u64).saturating_mul(m.num_tokens as u64), a.quiet, "generate");
    let run = job.run(&generator, &mut writer, &cancel, |n| bar.inc(n as u64));
    bar.finish_and_clear();
    let report = match run {
        Err(RuntimeError::Cancelled) => {
            let dir = a.out_dir.as_ref().map(|d| format!(" to {}", d.display())).unwrap_or_default();
            eprintln!(
                "interrupted: wrote {} of {total} images{dir}; the grid and tokens files are written only by a run \
                 that finishes",
                writer.images_written()
            );
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
        other => other?,
    };
    writer.finish()?;

    let p = generator.provider();
    let written: Vec<String> = [("grid", &a.out), ("images", &a.out_dir), ("tokens", &a.tokens_out)]
        .iter()
        .filter_map(|(what, p)| p.as_ref().map(|p| format!("{what} {}", p.display())))
        .collect();
    println!(
        "sampled {} images in {:.2} s ({:.2} images/s, {:.1} tokens/s; decode {:.2} s) on {}{}, batch {}, {} steps, cfg {}; {}",
        report.images,
        report.sample_seconds,
        report.images_per_second(),
        report.tokens_per_second(),
        report.decode_seconds,
        p.active.name(),
        if p.fallback.is_some() { format!(" (requested {})", p.requested.name()) } else { String::new() },
        report.batch,
        job.steps,
        job.cfg,
        written.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// A flag raised by the first Ctrl-C (the run stops at the next token step and keeps what is written);
/// a second Ctrl-C exits at once.
fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(EXIT_INTERRUPTED as i32);
        }
        eprintln!("\ninterrupt: stopping after the current token step (press Ctrl-C again to abort)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(flag)
}

fn progress_bar(total: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    let style =
        ProgressStyle::with_template(&format!("{what} [{{bar:30}}] {{pos}}/{{len}} tokens  {{per_sec}}  eta {{eta}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    ProgressBar::new(total).with_style(style)
}

fn eval(a: &EvalArgs) -> Result<()> {
    let manifest = Manifest::load(&a.model)?;
    for &c in &a.cfg {
        spherear_core::schedule::validate_cfg(c)?;
    }
    if a.steps.contains(&0) || a.batch == 0 {
        anyhow::bail!("--steps and --batch must be ≥ 1");
    }
    if let Some(d) = &a.out {
        spherear_core::fsutil::check_dir_output(d)?;
    }
    // The judge shares the process's one ONNX Runtime environment (and its thread pool) with the generator.
    let (env, _) = runtime::ortlib::environment_with_threads(a.ort_lib.as_deref(), a.threads)?;
    let judge = quality::eval::Judge::load(&a.judge, &env)
        .with_context(|| format!("loading the judge {}", a.judge.display()))?;
    let options = GeneratorOptions { threads: a.threads, ort_lib: a.ort_lib.clone(), ..Default::default() };
    let per_setting = (a.per_class as u64).saturating_mul((manifest.num_classes * manifest.num_tokens) as u64);
    let generator = Generator::with_manifest(&a.model, manifest, &options)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let o = quality::eval::EvalOptions {
        per_class: a.per_class,
        cfgs: a.cfg.clone(),
        steps: a.steps.clone(),
        seed: a.seed,
        batch: a.batch,
        data: a.data.clone(),
        train_limit: a.train_limit,
        out: a.out.clone(),
    };
    let bar = progress_bar(per_setting * (a.cfg.len() * a.steps.len()) as u64, a.quiet, "eval");
    let r = quality::eval::evaluate(generator.manifest(), &judge, &o, |req| {
        generator.generate_images(req, |n| bar.inc(n as u64))
    })?;
    bar.finish_and_clear();
    println!("{}", quality::eval::markdown(&r));
    if let Some(d) = &a.out {
        println!("wrote {}/eval.json, eval.md, eval.png", d.display());
    }
    Ok(())
}

fn serve(a: &ServeArgs) -> Result<()> {
    use runtime::serve::{ServeConfig, Server};
    spherear_core::validate::seconds("--timeout-s", a.timeout_s)?;
    let config = ServeConfig {
        host: a.host.clone(),
        port: a.port,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        timeout: std::time::Duration::from_secs_f64(a.timeout_s),
        max_steps: a.max_steps,
        max_n: a.max_n,
        scheduler: a.scheduler,
    };
    config.validate()?;
    let provider = a.device.options(TensorRtOptions::default());
    let options = GeneratorOptions { provider, threads: a.threads, ort_lib: a.ort_lib.clone() };
    let manifest = Manifest::load(&a.model)?;
    let generator = Generator::with_manifest(&a.model, manifest, &options)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let pool = runtime::serve::pool_bytes(&generator, config.max_batch)?;
    let (scheduler, rows) = (config.scheduler.name(), config.max_batch);
    let server = Server::start(Arc::new(generator), config, true)?;
    println!(
        "listening on http://{} ({scheduler} batching, {rows} KV rows = {:.1} MiB)",
        server.addr(),
        pool as f64 / (1u64 << 20) as f64
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    server.wait()?;
    eprintln!("stopped");
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUNTIME_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ort=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let res = match &cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Eval(a) => eval(a).map(|()| ExitCode::SUCCESS),
        Cmd::Serve(a) => serve(a).map(|()| ExitCode::SUCCESS),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
