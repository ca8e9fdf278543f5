//! `calibration`: post-training quantization of SphereAR exports (no libtorch).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use calibration::quantize;
use calibration::{quantize_export, QuantizeOptions, WeightBits};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Parser)]
#[command(name = "calibration", version, about = "Post-training quantization of SphereAR ONNX exports")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Weights {
    /// 8-bit weights (default block size 128).
    Int8,
    /// 4-bit weights (default block size 32).
    Int4,
}

#[derive(Subcommand)]
enum Cmd {
    /// Weight-only quantization: every MatMul with a checkpoint weight becomes com.microsoft.MatMulNBits.
    #[command(long_about = "Weight-only quantization of an fp32 export (`exporter onnx` without --fp16).\n\n\
        In each selected graph every MatMul whose weight is a checkpoint tensor becomes ONNX Runtime's \
        com.microsoft.MatMulNBits: symmetric blockwise int8/int4 weights with one fp32 scale per block of \
        --block-size weights along the input dimension, packed byte for byte as ONNX Runtime's \
        MatMulNBitsQuantizer (is_symmetric=True) packs them. Attention MatMuls (activation x activation) and \
        the constant RoPE rotation stay fp32, as do graph inputs, outputs and the KV cache, so \
        `runtime generate --model OUT` needs nothing else.\n\n\
        The output is a complete export folder (manifest.json, the graphs, its own weights.bin; graphs not \
        quantized are re-pointed to it), written atomically. The manifest records every graph's precision \
        (kind, block size, accuracy level, kept weights, weight bytes per call).")]
    Quantize {
        /// The fp32 export folder to quantize (left unchanged).
        #[arg(long)]
        model: PathBuf,
        /// Output export folder; it appears whole or not at all. Must not exist or be empty unless --force.
        #[arg(long)]
        out: PathBuf,
        /// Weight width.
        #[arg(long, value_enum)]
        weights: Weights,
        /// Weights per quantization block along K: a power of two from 16 to 256 (the sizes ONNX Runtime's
        /// quantizer implements). Smaller blocks: lower error, more scale bytes. Default: 32 for int4, 128 for
        /// int8 (the reference quantizer's own default).
        #[arg(long)]
        block_size: Option<usize>,
        /// Graphs to quantize, comma-separated. The decoder is conv-heavy (its convolutions cannot be
        /// MatMulNBits) and stays fp32 unless named here.
        /// [default: ar_prefill,ar_step,head_step]
        #[arg(long, value_delimiter = ',')]
        graphs: Option<Vec<String>>,
        /// MatMulNBits accuracy_level, the lowest precision its computation may use. 4 = int8 compute
        /// (activations quantized per block on the fly) is the level ONNX Runtime has fast CPU kernels for:
        /// on this CPU (AVX-512 VNNI, 2 threads) a SphereAR-B ar_step at 2 rows took 18.5 ms (int8) / 14.6 ms
        /// (int4) at level 4 vs 34 ms in fp32, but 169 ms / 44 ms at level 0. 0 (unset) dequantizes to fp32
        /// (slightly more accurate, slow); 1-3 ask for fp32/fp16/bf16 compute.
        #[arg(long, default_value_t = quantize::DEFAULT_ACCURACY_LEVEL)]
        accuracy_level: u8,
        /// MatMul weights to keep at fp32, comma-separated: exact checkpoint keys
        /// (head.net.final_layer.linear.weight) or key prefixes (head.net.res_blocks.0.). A name that matches
        /// no weight of the selected graphs is an error.
        #[arg(long, value_delimiter = ',')]
        keep: Vec<String>,
        /// Replace an existing export at --out (never the input export or a folder containing it).
        #[arg(long)]
        force: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Quantize { model, out, weights, block_size, graphs, accuracy_level, keep, force, quiet } => {
            let weights = match weights {
                Weights::Int8 => WeightBits::Int8,
                Weights::Int4 => WeightBits::Int4,
            };
            let opts = QuantizeOptions { model, out, weights, block_size, graphs, accuracy_level, keep, force };
            let bar = ProgressBar::new(0);
            if quiet {
                bar.set_draw_target(ProgressDrawTarget::hidden());
            }
            bar.set_style(
                ProgressStyle::with_template("quantize [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            let report = quantize_export(&opts, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            });
            bar.finish_and_clear();
            let report = report.context("quantize failed")?;
            let bits = if weights == WeightBits::Int8 { "int8" } else { "int4" };
            println!(
                "wrote {} ({bits} weights, block size {}, accuracy level {})",
                opts.out.display(),
                report.block_size,
                accuracy_level
            );
            for line in quantize::summary(&report) {
                println!("{line}");
            }
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
