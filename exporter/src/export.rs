//! `exporter onnx`: checkpoint folder → export folder with `manifest.json`, the graphs and `weights.bin`.
//!
//! The export is written into a temporary sibling folder and renamed into place at the end, so the output
//! folder appears whole or not at all. An existing non-empty output folder is refused unless `force`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use spherear_core::schedule::{LAST_DT, TIME_FACTOR};
use spherear_core::ModelConfig;

use crate::checkpoint::{Checkpoint, Stage};
use crate::error::{io_err, ExportError, Result};
use crate::graphs;
use crate::onnx::{Builder, DType, IoSpec, WeightFile, IR_VERSION, OPSET};

/// Version of the manifest layout; bumped on any incompatible change.
pub const MANIFEST_VERSION: u32 = 1;
/// Name of the shared external-data file.
pub const WEIGHTS_FILE: &str = "weights.bin";

/// What to export and where.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub checkpoint: PathBuf,
    pub out: PathBuf,
    pub fp16: bool,
    pub max_batch: usize,
    pub force: bool,
}

/// One graph in the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct GraphEntry {
    pub file: String,
    pub doc: String,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
}

/// The external-data file.
#[derive(Debug, Clone, Serialize)]
pub struct WeightsEntry {
    pub file: String,
    pub dtype: DType,
    pub parameters: usize,
    pub bytes: u64,
    pub doc: String,
}

/// Precision of the export.
#[derive(Debug, Clone, Serialize)]
pub struct Precision {
    /// Weights, matmuls, convolutions and the KV cache.
    pub compute: DType,
    /// Parts computed in fp32 whatever `compute` is.
    pub fp32: Vec<String>,
    /// Graph inputs/outputs: fp32, except the KV cache which is in `compute`.
    pub io: String,
}

/// KV-cache contract shared by `ar_prefill` and `ar_step`.
#[derive(Debug, Clone, Serialize)]
pub struct KvCache {
    pub layers: usize,
    pub heads: usize,
    pub seq_len: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub layout: String,
    pub binding: String,
}

/// Facts of the reference sampler a runtime needs.
#[derive(Debug, Clone, Serialize)]
pub struct Sampler {
    pub cfg_schedule: String,
    pub head_sampler: String,
    pub last_euler_dt: f32,
    pub time_factor: f32,
    pub default_steps: usize,
    pub notes: Vec<String>,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub producer: String,
    pub onnx_ir_version: i64,
    pub onnx_opset: i64,
    pub stage: Stage,
    pub config: ModelConfig,
    pub radius: f32,
    pub latent_dim: usize,
    pub num_classes: usize,
    pub null_class_id: usize,
    pub cls_token_num: usize,
    pub num_tokens: usize,
    pub grid: usize,
    pub image_size: usize,
    pub max_batch: usize,
    pub precision: Precision,
    pub weights: WeightsEntry,
    pub kv_cache: Option<KvCache>,
    pub sampler: Sampler,
    pub provider_hints: BTreeMap<String, String>,
    pub graphs: BTreeMap<String, GraphEntry>,
}

/// Why `head_step` is a velocity graph (see the manifest's sampler notes and the README of the export).
pub const HEAD_STEP_DOC: &str = "head_step returns the velocity; the runtime does guidance and the \
Euler-Maruyama update (core::schedule::{guide, em_update, euler_update}). Measured with ONNX Runtime CPU \
(2 threads, random SphereAR-B head): batch 2x64, velocity graph + update outside 97 ms vs a fused guided-EM \
graph (noise as input) 102 ms, i.e. no gain: the head's matmuls dominate and the update is a few elementwise \
ops on [B, 16]; the velocity graph also keeps the unguided token 0 and the final Euler step in one place (the \
core schedule). Precomputing cond_embed once per token: 38.5 vs 39 ms at batch 16 and 143 vs 146 ms at batch \
128, within run-to-run noise (it is ~1/37 of the head's matmul work), so the condition embedding stays inside \
head_step and there is no second head graph.";

fn out_err(path: &Path, msg: impl Into<String>) -> ExportError {
    ExportError::Output { path: path.display().to_string(), msg: msg.into() }
}

fn is_nonempty_dir(p: &Path) -> Result<bool> {
    if !p.exists() {
        return Ok(false);
    }
    if !p.is_dir() {
        return Err(out_err(p, "exists and is not a folder"));
    }
    let mut rd = std::fs::read_dir(p).map_err(io_err(format!("cannot list {}", p.display())))?;
    Ok(rd.next().is_some())
}

fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "export".into());
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Runs the export. On any error nothing is left at `opts.out` (nor a temporary folder).
pub fn export(opts: &ExportOptions) -> Result<Manifest> {
    if opts.max_batch == 0 {
        return Err(ExportError::Invalid("--max-batch must be at least 1".into()));
    }
    check_out(&opts.out, opts.force)?;
    let ckpt = Checkpoint::load(&opts.checkpoint)?;
    write_folder_atomically(&opts.out, |tmp| write_all(&ckpt, opts, tmp))
}

/// Refuses an existing non-empty output folder unless `force`.
pub(crate) fn check_out(out: &Path, force: bool) -> Result<()> {
    if is_nonempty_dir(out)? && !force {
        return Err(out_err(out, "exists and is not empty (pass --force to replace it)"));
    }
    Ok(())
}

/// Fills a temporary sibling folder of `out` with `write`, then renames it into place (replacing an
/// existing `out`), so `out` appears whole or not at all. On any error nothing is left behind.
pub(crate) fn write_folder_atomically<T>(out: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err(format!("cannot create {}", parent.display())))?;
    }
    let tmp = sibling(out, "tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io_err(format!("cannot create {}", tmp.display())))?;
    let value = match write(&tmp) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let old = sibling(out, "old");
    let had_old = out.exists();
    let swap = (|| {
        if had_old {
            std::fs::rename(out, &old)?;
        }
        std::fs::rename(&tmp, out)
    })();
    if let Err(e) = swap {
        let _ = std::fs::remove_dir_all(&tmp);
        if had_old && !out.exists() {
            let _ = std::fs::rename(&old, out);
        }
        return Err(out_err(out, format!("cannot move the export into place: {e}")));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(value)
}

type GraphFn<'a> = Box<dyn Fn(&mut Builder) -> Result<()> + 'a>;

fn write_all(ckpt: &Checkpoint, opts: &ExportOptions, dir: &Path) -> Result<Manifest> {
    let cfg = &ckpt.config;
    let dtype = if opts.fp16 { DType::Float16 } else { DType::Float32 };
    let mut weights = WeightFile::create(ckpt, dir, WEIGHTS_FILE, dtype)?;
    let mut list: Vec<(&str, &str, GraphFn)> = Vec::new();
    if ckpt.stage == Stage::Ar {
        list.push((
            "ar_prefill",
            "Class tokens through the causal transformer: condition for image token 0 and the KV cache of the \
             class positions (full length, rest zero).",
            Box::new(|b| graphs::ar_prefill(b, cfg)),
        ));
        list.push((
            "ar_step",
            "One image token at `position` through the causal transformer with the preallocated KV cache: \
             condition for the next token. Attention covers positions <= `position`.",
            Box::new(|b| graphs::ar_step(b, cfg)),
        ));
        list.push(("head_step", HEAD_STEP_DOC, Box::new(|b| graphs::head_step(b, cfg))));
    }
    list.push((
        "decoder",
        "S-VAE decoder: post_quant_proj, ViT with register tokens, CNN un-patchifier; output clipped to [-1, 1] \
         (pixel = clamp(127.5 x + 128, 0, 255)).",
        Box::new(|b| graphs::decoder(b, ckpt)),
    ));
    let mut graphs_out = BTreeMap::new();
    for (name, doc, build) in list {
        let mut b = Builder::new(&mut weights);
        build(&mut b)?;
        let (inputs, outputs) = (b.input_specs.clone(), b.output_specs.clone());
        let file = format!("{name}.onnx");
        b.write(name, doc, &dir.join(&file))?;
        graphs_out.insert(name.to_string(), GraphEntry { file, doc: doc.to_string(), inputs, outputs });
    }
    let (parameters, bytes) = (weights.parameters(), weights.bytes());
    weights.finish()?;
    let a = &cfg.ar;
    let kv_cache = (ckpt.stage == Stage::Ar).then(|| KvCache {
        layers: a.n_layer,
        heads: a.n_head,
        seq_len: cfg.ar_seq_len(),
        head_dim: a.head_dim_attn(),
        dtype,
        layout: "[batch, heads, seq, head_dim]; seq = cls_token_num + num_tokens - 1".into(),
        binding: "Allocate past_key_values.N.* once per generation from ar_prefill's present.N.* and bind each \
                  ar_step's present.N.* to the same buffers as its past_key_values.N.*: ar_step writes only the \
                  new position (ScatterND over (row, head, position); ONNX Runtime skips ScatterND's copy when input \
                  and output share a buffer) and reads the rest in place, so no step copies the cache. Measured, \
                  random SphereAR-B, ORT CPU, 2 threads: ScatterElements copied the cache on every call even in \
                  place (12.6 ms of a 72 ms step at batch 1); ScatterND in place costs 0.01 ms. For CFG run the batch doubled (conditional rows, then null-class rows); graphs are batch-agnostic."
            .into(),
    });
    let fp32 = if opts.fp16 {
        vec![
            "RMSNorm / LayerNorm / GroupNorm statistics".into(),
            "attention scores + mask and softmax".into(),
            "sinusoidal time embedding of head_step".into(),
            "graph inputs and outputs other than the KV cache".into(),
        ]
    } else {
        vec!["everything".into()]
    };
    let weights_doc = "Every exported checkpoint tensor once, in the export dtype, as ONNX external data \
                       (graphs reference it by offset; linear weights stored transposed to [in, out]). Keep it \
                       beside the .onnx files.";
    let stage_note = match ckpt.stage {
        Stage::Ar => "stage ar: all graphs".to_string(),
        Stage::Vae => "stage vae: the checkpoint holds only the S-VAE, so only the decoder is exported".to_string(),
    };
    Ok(Manifest {
        format: "spherear-onnx".into(),
        format_version: MANIFEST_VERSION,
        producer: format!("spherear exporter {}", env!("CARGO_PKG_VERSION")),
        onnx_ir_version: IR_VERSION,
        onnx_opset: OPSET,
        stage: ckpt.stage,
        config: cfg.clone(),
        radius: cfg.radius(),
        latent_dim: cfg.latent_dim,
        num_classes: cfg.num_classes,
        null_class_id: cfg.null_class(),
        cls_token_num: cfg.cls_token_num,
        num_tokens: cfg.num_tokens(),
        grid: cfg.grid(),
        image_size: cfg.image_size,
        max_batch: opts.max_batch,
        precision: Precision {
            compute: dtype,
            fp32,
            io: "float32 except past_key_values.*/present.* (compute dtype)".into(),
        },
        weights: WeightsEntry { file: WEIGHTS_FILE.into(), dtype, parameters, bytes, doc: weights_doc.into() },
        kv_cache,
        sampler: Sampler {
            cfg_schedule: "linear: g_i = 1 + (cfg - 1) i / num_tokens (core::schedule::token_plan)".into(),
            head_sampler: "Euler-Maruyama, dt = (1 - 0.04) / steps, then one Euler step of 0.04 at t = 0.96".into(),
            last_euler_dt: LAST_DT,
            time_factor: TIME_FACTOR,
            default_steps: 100,
            notes: vec![
                stage_note,
                HEAD_STEP_DOC.into(),
                "Token 0 under CFG is not guided: all 2B rows sampled independently (official quirk).".into(),
                "Each new token is projected to the sphere, z <- R z / max(|z|, 1e-7), before ar_step and decoder."
                    .into(),
            ],
        },
        provider_hints: [
            (
                "batch".to_string(),
                format!("dynamic axis 'batch', 1..={} (TensorRT optimisation profile)", opts.max_batch),
            ),
            ("tensorrt".to_string(), "all other axes are static; opset 21 ops only".to_string()),
        ]
        .into(),
        graphs: graphs_out,
    })
    .and_then(|m| {
        let text = serde_json::to_string_pretty(&m).map_err(|e| ExportError::Io(format!("manifest: {e}")))?;
        std::fs::write(dir.join("manifest.json"), text).map_err(io_err("cannot write manifest.json"))?;
        Ok(m)
    })
}
