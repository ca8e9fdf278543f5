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
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", runtime::error::one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
