//! `exporter`: SphereAR checkpoint → ONNX graphs + manifest (no libtorch).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use exporter::checkpoint::Stage;
use exporter::{export, Attention, ExportOptions};

#[derive(Parser)]
#[command(name = "exporter", version, about = "Export SphereAR checkpoints as ONNX graphs with a manifest")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum AttentionArg {
    Gqa,
    Standard,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write ar_prefill, ar_step, head_step and decoder graphs, weights.bin and manifest.json.
    Onnx {
        /// Checkpoint folder written by the trainer: config.json plus ar.safetensors (all graphs) or
        /// vae.safetensors (decoder only).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output folder; it appears whole or not at all. Must not exist or be empty unless --force.
        #[arg(long)]
        out: PathBuf,
        /// Weights, activations and KV cache in fp16; norm statistics, softmax and the time embedding stay fp32.
        #[arg(long)]
        fp16: bool,
        /// Largest batch the runtime will use (recorded in the manifest for TensorRT profiles; graphs
        /// are batch-agnostic). CFG doubles the batch, so count both halves.
        #[arg(long, default_value_t = 64)]
        max_batch: usize,
        /// How ar_step attends over the KV cache: `gqa` (com.microsoft.GroupQueryAttention as
        /// onnxruntime-genai emits it: RoPE fused, each row attends only its filled prefix; ONNX Runtime CPU/CUDA)
        /// or `standard` (opset-21 ops over the whole preallocated cache with a mask: runs on every provider,
        /// TensorRT included). Same numbers either way.
        #[arg(long, value_enum, default_value_t = AttentionArg::Gqa)]
        attention: AttentionArg,
        /// Replace an existing export in --out (never a folder that is not an export, nor the checkpoint).
        #[arg(long)]
        force: bool,
    },
    /// Write the judge classifier as judge.onnx (fp32, weights in judge.weights.bin beside it) and
    /// manifest.json (config, test accuracy, dataset).
    Judge {
        /// Judge run folder written by `trainer fit --stage judge` (judge-config.json, judge.safetensors,
        /// judge-metrics.json).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output folder; it appears whole or not at all. Must not exist or be empty unless --force.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing judge export in --out (never a folder that is not one, nor the checkpoint).
        #[arg(long)]
        force: bool,
    },
    /// Write a random-init checkpoint folder for a preset (tests, size checks; not for sampling).
    RandomCheckpoint {
        /// Preset name (spherear-b, spherear-l, spherear-h, fmnist-32, tiny).
        #[arg(long)]
        preset: String,
        /// Checkpoint folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write only the S-VAE (vae.safetensors, as after `trainer fit --stage vae`).
        #[arg(long)]
        vae_only: bool,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Onnx { checkpoint, out, fp16, max_batch, attention, force } => {
            let attention = match attention {
                AttentionArg::Gqa => Attention::Gqa,
                AttentionArg::Standard => Attention::Standard,
            };
            let opts = ExportOptions { checkpoint, out, fp16, max_batch, force, attention };
            let m = export(&opts).context("export failed")?;
            println!(
                "wrote {} ({} graphs, {} parameters in {} = {} bytes, {:?})",
                opts.out.display(),
                m.graphs.len(),
                m.weights.parameters,
                m.weights.file,
                m.weights.bytes,
                m.precision.compute
            );
        }
        Cmd::Judge { checkpoint, out, force } => {
            let opts = exporter::judge::JudgeExportOptions { checkpoint, out, force };
            let m = exporter::judge::export_judge(&opts).context("judge export failed")?;
            println!(
                "wrote {} ({}, {} conv blocks, {} features, {} classes; test accuracy {})",
                opts.out.display(),
                m.file,
                m.config.channels.len(),
                m.config.feature_dim,
                m.config.num_classes,
                m.test_accuracy.map(|a| format!("{:.2}%", 100.0 * a)).unwrap_or_else(|| "unknown".into())
            );
        }
        Cmd::RandomCheckpoint { preset, out, seed, vae_only } => {
            let stage = if vae_only { Stage::Vae } else { Stage::Ar };
            let cfg = spherear_core::ModelConfig::preset(&preset)?;
            exporter::random::write_random(&cfg, &out, seed, stage)
                .with_context(|| format!("cannot write a random checkpoint to {}", out.display()))?;
            println!("wrote random {preset} checkpoint to {}", out.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
