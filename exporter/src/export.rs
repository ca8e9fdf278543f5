//! `exporter onnx`: checkpoint folder → export folder with `manifest.json`, the graphs and `weights.bin`.
//!
//! The export is written into a temporary sibling folder and renamed into place at the end, so the output
//! folder appears whole or not at all. An existing non-empty output folder is refused unless `force`, and
//! `force` replaces only an earlier export, never the checkpoint or a folder containing it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use spherear_core::manifest::{GraphEntry, GraphPrecision, Manifest, Stage, TensorDType, WeightsEntry, MANIFEST_FILE};

use crate::checkpoint::Checkpoint;
use crate::error::{io_err, ExportError, Result};
use spherear_core::fsutil::{self, write_folder_atomically, FolderOutput};
use crate::graphs::{self, Attention};
use crate::onnx::{Builder, DType, WeightFile, IR_VERSION, OPSET};

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
    /// How `ar_step` attends over the KV cache.
    pub attention: Attention,
}

impl ExportOptions {
    /// fp32, max batch 64, no `force`, GroupQueryAttention.
    pub fn new(checkpoint: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        ExportOptions {
            checkpoint: checkpoint.into(),
            out: out.into(),
            fp16: false,
            max_batch: 64,
            force: false,
            attention: Attention::default(),
        }
    }
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

/// Whether `dir` holds a `manifest.json` whose `format` is `format` (any version).
pub fn holds_manifest_of(dir: &Path, format: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(spherear_core::manifest::MANIFEST_FILE)) else { return false };
    let value = serde_json::from_str::<serde_json::Value>(&text).ok();
    value.as_ref().and_then(|v| v.get("format")).and_then(|f| f.as_str()) == Some(format)
}

/// Whether `dir` holds an export (a `spherear-onnx` manifest): the only kind of folder `--force` replaces.
pub fn holds_export(dir: &Path) -> bool {
    holds_manifest_of(dir, spherear_core::manifest::MANIFEST_FORMAT)
}

/// Runs the export. On any error nothing is left at `opts.out` (nor a staging folder).
pub fn export(opts: &ExportOptions) -> Result<Manifest> {
    if opts.max_batch == 0 {
        return Err(ExportError::Invalid("--max-batch must be at least 1".into()));
    }
    check_output(&opts.out, opts.force, "an export", &holds_export, &opts.checkpoint)?;
    let ckpt = Checkpoint::load(&opts.checkpoint)?;
    write_folder_atomically(&opts.out, |tmp| write_all(&ckpt, opts, tmp))
}

/// What may be at an export's `--out` ([`fsutil::check_folder_output`]): nothing, an empty folder, or with
/// `force` a folder of the same kind (`is_ours`) — never the checkpoint folder or a folder containing it.
pub(crate) fn check_output(
    out: &Path,
    force: bool,
    kind: &str,
    is_ours: &dyn Fn(&Path) -> bool,
    checkpoint: &Path,
) -> Result<()> {
    fsutil::check_folder_output(&FolderOutput { out, force, kind, is_ours, inputs: &[checkpoint] })?;
    Ok(())
}

type GraphFn<'a> = Box<dyn Fn(&mut Builder) -> Result<()> + 'a>;

fn write_all(ckpt: &Checkpoint, opts: &ExportOptions, dir: &Path) -> Result<Manifest> {
    let cfg = &ckpt.config;
    let dtype = if opts.fp16 { DType::Float16 } else { DType::Float32 };
    let compute = if opts.fp16 { TensorDType::Float16 } else { TensorDType::Float32 };
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
            "One image token per row at that row's `position` through the causal transformer with the \
             preallocated KV cache: condition for each row's next token. Row r attends to positions <= \
             position[r]; rows may be at different positions.",
            Box::new(|b| graphs::ar_step(b, cfg, opts.attention)),
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
        let (weight_bytes, lookup_bytes) = b.initializer_bytes();
        let precision = GraphPrecision {
            weight_bytes: Some(weight_bytes),
            lookup_bytes: Some(lookup_bytes),
            ..GraphPrecision::source(compute)
        };
        let file = format!("{name}.onnx");
        b.write(name, doc, &dir.join(&file))?;
        let entry = GraphEntry { file, doc: doc.to_string(), inputs, outputs, precision: Some(precision) };
        graphs_out.insert(name.to_string(), entry);
    }
    let (parameters, bytes) = (weights.parameters(), weights.bytes());
    weights.finish()?;
    let mut m = Manifest::new(cfg.clone(), ckpt.stage, compute, opts.max_batch, opts.attention);
    m.producer = format!("spherear exporter {}", env!("CARGO_PKG_VERSION"));
    (m.onnx_ir_version, m.onnx_opset) = (IR_VERSION, OPSET);
    if let Some(kv) = &mut m.kv_cache {
        kv.binding = "Allocate past_key_values.N.* once per generation from ar_prefill's present.N.* and bind each \
                      ar_step's present.N.* to the same buffers as its past_key_values.N.*: ar_step writes only each \
                      row's new position (GroupQueryAttention with a shared buffer, or ScatterND over (row, head, \
                      position), whose copy ONNX Runtime skips when input and output share a buffer) and reads the \
                      rest in place, so no step copies the cache. For CFG run the batch doubled (conditional rows, \
                      then null-class rows); graphs are batch-agnostic."
            .into();
    }
    m.precision.fp32 = if opts.fp16 {
        vec![
            "RMSNorm / LayerNorm / GroupNorm statistics".into(),
            "attention scores + mask and softmax".into(),
            "sinusoidal time embedding of head_step".into(),
            "graph inputs and outputs other than the KV cache".into(),
        ]
    } else {
        vec!["everything".into()]
    };
    m.precision.io = "float32 except past_key_values.*/present.* (compute dtype)".into();
    m.weights = WeightsEntry {
        file: WEIGHTS_FILE.into(),
        dtype: compute,
        parameters,
        bytes,
        doc: "Every exported checkpoint tensor once, in the export dtype, as ONNX external data (graphs reference \
              it by offset; linear weights stored transposed to [in, out]). Keep it beside the .onnx files."
            .into(),
    };
    let stage_note = match ckpt.stage {
        Stage::Ar => "stage ar: all graphs".to_string(),
        Stage::Vae => "stage vae: the checkpoint holds only the S-VAE, so only the decoder is exported".to_string(),
    };
    m.sampler.notes = vec![
        stage_note,
        HEAD_STEP_DOC.into(),
        "Token 0 under CFG is not guided: all 2B rows sampled independently (official quirk).".into(),
        "Each new token is projected to the sphere, z <- R z / max(|z|, 1e-7), before ar_step and decoder.".into(),
    ];
    let trt = match opts.attention {
        Attention::Standard => "all other axes are static; opset 21 ops only",
        Attention::Gqa => "all other axes are static; opset 21 ops except ar_step's GroupQueryAttention (runs on \
                           CUDA): export with --attention standard for an all-TensorRT ar_step",
    };
    m.provider_hints = [
        ("batch".to_string(), format!("dynamic axis 'batch', 1..={} (TensorRT optimisation profile)", opts.max_batch)),
        ("tensorrt".to_string(), trt.to_string()),
    ]
    .into();
    m.graphs = graphs_out;
    // Validated as every reader will see it before it is written.
    let m = Manifest::from_json(&m.to_json()?)?;
    std::fs::write(dir.join(MANIFEST_FILE), m.to_json()?).map_err(io_err("cannot write manifest.json"))?;
    Ok(m)
}
