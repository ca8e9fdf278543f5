//! `bench`: SphereAR speed benchmarks.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use benchmarks::speed::{self, Precision, SpeedOptions};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "bench", version, about = "SphereAR speed benchmarks (runtime vs libtorch reference, roofline)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Images/s and s/image for every batch size x steps x precision, with a per-stage breakdown, peak RSS,
    /// the libtorch reference (`trainer sample`) on the same checkpoint, and % of this machine's roofline.
    /// Writes speed.json, speed.md and speed.png (throughput vs batch size) into --out.
    Speed(Box<SpeedArgs>),
    /// Load test of `runtime serve` on loopback: Poisson arrivals at several offered loads, bounded in count
    /// and time, against continuous and static batching on the same in-process server; reports throughput,
    /// p50/p95/p99 latency and time to first token. Writes serve.json, serve.md and serve.png (latency vs
    /// offered load) into --out.
    Serve(Box<ServeArgs>),
    /// Summary of the posterior ablation (`make ablation`): reads every RUNS/<posterior>-seed<N>/ run folder
    /// (config.json, vae-metrics.json, ar-metrics.json, eval/eval.json from `runtime eval`) and writes
    /// ablation.json, ablation.md (Fréchet distance and judge accuracy per posterior and cfg: mean [min, max]
    /// over seeds; VAE PSNR) and ablation.png (Fréchet distance vs CFG, one line per posterior) into --out.
    Ablation(AblationArgs),
}

#[derive(Args)]
struct AblationArgs {
    /// Folder holding one run folder per (posterior, seed), named <posterior>-seed<N>.
    #[arg(long, default_value = "runs/ablation")]
    runs: PathBuf,
    /// Output folder.
    #[arg(long, default_value = "bench/ablation")]
    out: PathBuf,
}

fn ablation_cmd(a: &AblationArgs) -> anyhow::Result<()> {
    let r = benchmarks::ablation::run(&a.runs, &a.out)?;
    println!("{}", r.markdown());
    println!("wrote {}/ablation.json, ablation.md, ablation.png", a.out.display());
    Ok(())
}

#[derive(Args)]
struct ServeArgs {
    /// Export folder from `exporter onnx`.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated offered loads in requests/s (default: 0.25, 0.5, 0.75, 1 and 1.25 times a capacity
    /// measured first with one burst of concurrent requests).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Requests per (scheduler, rate) at most.
    #[arg(long, default_value_t = 40)]
    requests: usize,
    /// Seconds of arrivals per (scheduler, rate) at most.
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    /// KV slot rows of the server (CFG images take two).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Head steps per token of every request.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// CFG scale of every request.
    #[arg(long, default_value_t = 3.0)]
    cfg: f32,
    /// Images per request.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Comma-separated schedulers to compare.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "continuous,static")]
    scheduler: Vec<runtime::serve::Scheduler>,
    /// Server deadline per request in seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout_s: f64,
    /// Seed of the arrival process (request i uses noise seed SEED + i, class i mod classes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder for serve.json, serve.md, serve.png.
    #[arg(long)]
    out: PathBuf,
    /// Intra-op threads of ONNX Runtime.
    #[arg(long)]
    threads: Option<usize>,
    /// Path of libonnxruntime.so (default: $ORT_DYLIB_PATH, else the onnxruntime wheel in the workspace .venv).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

fn serve_cmd(a: &ServeArgs) -> anyhow::Result<()> {
    let o = benchmarks::serve::ServeBenchOptions {
        model: a.model.clone(),
        rates: a.rates.clone(),
        requests: a.requests,
        duration_s: a.duration_s,
        max_batch: a.max_batch,
        steps: a.steps,
        cfg: a.cfg,
        n: a.n,
        schedulers: a.scheduler.clone(),
        timeout_s: a.timeout_s,
        threads: a.threads,
        ort_lib: a.ort_lib.clone(),
        seed: a.seed,
        out: a.out.clone(),
    };
    let quiet = a.quiet;
    let r = benchmarks::serve::run(&o, |line| {
        if !quiet {
            eprintln!("{line}");
        }
    })?;
    println!("{}", benchmarks::serve::markdown(&r));
    println!("wrote {}/serve.json, serve.md, serve.png", a.out.display());
    Ok(())
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum PrecisionArg {
    /// The fp32 export.
    Fp32,
    /// The fp16 export (no native fp16 arithmetic on most CPUs: for GPUs).
    Fp16,
    /// Weight-only int8 (`calibration quantize --weights int8`, block 128, accuracy level 4).
    W8,
    /// Weight-only int4 (`calibration quantize --weights int4`, block 32, accuracy level 4).
    W4,
    /// Int8 QDQ (`calibration calibrate`, calibrated on 2 images: enough for speed, not for quality).
    Int8,
}

#[derive(Args)]
struct SpeedArgs {
    /// Export folder(s) from `exporter onnx` (give one per precision, or let --checkpoint export them).
    #[arg(long)]
    model: Vec<PathBuf>,
    /// Trainer run folder (ar.safetensors + config.json): the reference sampler's model, and the source of
    /// exports for precisions no --model provides (exported afresh to OUT/export-fp32|fp16).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Comma-separated batch sizes (images, before CFG doubling).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    batch_sizes: Vec<usize>,
    /// Comma-separated head steps per token.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    steps: Vec<usize>,
    /// Comma-separated precisions of the runtime graphs; each one without a --model export is made from
    /// --checkpoint (w8/w4 by quantizing the fp32 export). Roofline bytes are each export's real bytes.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "fp32,fp16")]
    precision: Vec<PrecisionArg>,
    /// Classifier-free guidance scale (> 1 doubles the rows, as in real sampling).
    #[arg(long, default_value_t = 3.0)]
    cfg: f32,
    /// Tokens per image to time in each setting (0 = all); the rest is extrapolated from per-call means and
    /// labelled as such. Bounds the run time on big models.
    #[arg(long, default_value_t = 8)]
    tokens: usize,
    /// Output folder for speed.json, speed.md, speed.png.
    #[arg(long)]
    out: PathBuf,
    /// The trainer binary for the reference rows (default: next to this executable).
    #[arg(long)]
    trainer: Option<PathBuf>,
    /// Skip the reference (libtorch) rows.
    #[arg(long)]
    no_baseline: bool,
    /// Intra-op threads (ONNX Runtime sessions, libtorch, bandwidth probe); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds each machine microbenchmark (MatMul rate, bandwidth) runs.
    #[arg(long, default_value_t = 2.0)]
    micro_seconds: f64,
    /// Path of libonnxruntime.so (default: $ORT_DYLIB_PATH, else the onnxruntime wheel in the workspace .venv).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn speed_cmd(a: &SpeedArgs) -> anyhow::Result<()> {
    let o = SpeedOptions {
        models: a.model.clone(),
        checkpoint: a.checkpoint.clone(),
        batch_sizes: a.batch_sizes.clone(),
        steps: a.steps.clone(),
        precisions: a
            .precision
            .iter()
            .map(|p| match p {
                PrecisionArg::Fp32 => Precision::Fp32,
                PrecisionArg::Fp16 => Precision::Fp16,
                PrecisionArg::W8 => Precision::W8,
                PrecisionArg::W4 => Precision::W4,
                PrecisionArg::Int8 => Precision::Int8,
            })
            .collect(),
        cfg: a.cfg,
        tokens: a.tokens,
        out: a.out.clone(),
        trainer: a.trainer.clone(),
        no_baseline: a.no_baseline,
        threads: a.threads,
        micro_seconds: a.micro_seconds,
        ort_lib: a.ort_lib.clone(),
        progress: !a.quiet && std::io::stderr().is_terminal(),
    };
    let r = speed::run(&o)?;
    println!("{}", speed::markdown(&r));
    println!("wrote {}/speed.json, speed.md, speed.png", a.out.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUNTIME_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ort=error")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
    let res = match &cli.cmd {
        Cmd::Speed(a) => speed_cmd(a),
        Cmd::Serve(a) => serve_cmd(a),
        Cmd::Ablation(a) => ablation_cmd(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", runtime::error::one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
