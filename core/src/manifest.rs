//! `manifest.json` of an ONNX export: the serde types every reader of an export shares, and
//! [`Manifest::load`], which checks the format name and version before anything else.
//!
//! The exporter writes this type and readers such as the runtime and `calibration` read it; readers depend
//! only on this module, never on the exporter.
//!
//! Version 2: `ar_step`'s `position` is per row ([batch]: each row at its own token, for continuous
//! batching) and [`KvCache::attention`] says how `ar_step` attends. Version 1 exports (one shared
//! `position` [1]) are refused with a message asking for a re-export.
//!
//! [`Manifest::posterior`] (and `config.vae.posterior`) are optional in the file, without a version bump:
//! manifests written before them load as Power Spherical, the only posterior there was.
//!
//! Per-graph precision ([`GraphEntry::precision`], [`GraphPrecision`]) is optional in the file: the
//! exporter does not write it (every graph is in `precision.compute`), `calibration quantize` writes it for
//! every graph (w8/w4 MatMulNBits graphs, weight bytes per call), and [`Manifest::from_json`] fills the
//! compute-dtype default where it is absent.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, Posterior};
use crate::CoreError;

/// Value of the manifest's `format` field.
pub const MANIFEST_FORMAT: &str = "spherear-onnx";
/// Version of the manifest layout this crate reads; bumped on any incompatible change.
pub const MANIFEST_VERSION: u32 = 2;
/// File name of the manifest inside an export folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Element type of a graph input or output (or of the weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorDType {
    Float32,
    Float16,
    Int64,
}

/// One axis of a declared shape: a fixed size or a symbolic name (`batch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    N(usize),
    Sym(String),
}

/// A graph input or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IoSpec {
    pub name: String,
    pub dtype: TensorDType,
    pub shape: Vec<Dim>,
    #[serde(default)]
    pub meaning: String,
}

/// Which training stage the exported checkpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// All four graphs.
    Ar,
    /// The decoder only.
    Vae,
}

impl Stage {
    /// The `stage` metadata value of weight files (`ar`, `vae`).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Ar => "ar",
            Stage::Vae => "vae",
        }
    }
    /// The final-weights file of a trainer run folder this stage exports from.
    pub fn weights_file(self) -> &'static str {
        match self {
            Stage::Ar => "ar.safetensors",
            Stage::Vae => "vae.safetensors",
        }
    }
}

/// One graph of the export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphEntry {
    pub file: String,
    #[serde(default)]
    pub doc: String,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    /// How this graph stores its weights and computes its matrix products. Absent in manifests written
    /// before per-graph precision existed (and in the exporter's own output, where every graph is in the
    /// export's compute dtype): [`Manifest::from_json`] fills it with [`GraphPrecision::source`] of
    /// `precision.compute`, so a loaded manifest has it for every graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<GraphPrecision>,
}

/// Storage and compute precision of one graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionKind {
    /// Everything in fp32 (the fp32 export).
    Fp32,
    /// Weights and activations in fp16 with fp32 islands (the `--fp16` export).
    Fp16,
    /// Weight-only int8: every checkpoint-weight MatMul is `com.microsoft.MatMulNBits` with bits = 8
    /// (symmetric, blockwise along K); activations stay in the compute dtype.
    W8,
    /// Weight-only int4 (MatMulNBits, bits = 4), otherwise as [`PrecisionKind::W8`].
    W4,
    /// Int8 weights and activations: a QDQ graph (`calibration calibrate`) whose quantized MatMul/Conv
    /// nodes read per-channel int8 weights through DequantizeLinear and per-tensor int8 activations
    /// through QuantizeLinear→DequantizeLinear with calibrated scales ([`GraphPrecision::quantized_matmuls`]
    /// counts those nodes).
    Int8,
}

impl PrecisionKind {
    /// Bits per quantized weight of a weight-only kind (8 or 4), `None` otherwise.
    pub fn weight_bits(self) -> Option<u32> {
        match self {
            PrecisionKind::W8 => Some(8),
            PrecisionKind::W4 => Some(4),
            _ => None,
        }
    }
    /// The kind of an unquantized graph whose weights are in `dtype`.
    pub fn of_dtype(dtype: TensorDType) -> Option<PrecisionKind> {
        match dtype {
            TensorDType::Float32 => Some(PrecisionKind::Fp32),
            TensorDType::Float16 => Some(PrecisionKind::Fp16),
            TensorDType::Int64 => None,
        }
    }
    /// The name used in `manifest.json` and on command lines (`fp32`, `w8`, ...).
    pub fn name(self) -> &'static str {
        match self {
            PrecisionKind::Fp32 => "fp32",
            PrecisionKind::Fp16 => "fp16",
            PrecisionKind::W8 => "w8",
            PrecisionKind::W4 => "w4",
            PrecisionKind::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for PrecisionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Smallest MatMulNBits block size (ONNX Runtime's contract: a power of two ≥ 16).
pub const MIN_BLOCK_SIZE: usize = 16;
/// Largest MatMulNBits accuracy level (4 = int8 compute).
pub const MAX_ACCURACY_LEVEL: u8 = 4;

/// Precision of one graph (`graphs.NAME.precision`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphPrecision {
    pub kind: PrecisionKind,
    /// w8/w4: weights per quantization block along K (one scale per block and output column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// w8/w4: MatMulNBits `accuracy_level` (0 = unset, 4 = int8 compute: the fast CPU path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_level: Option<u8>,
    /// w8/w4: number of MatMuls that run as MatMulNBits; int8: number of MatMul/Conv nodes with int8
    /// (QDQ) inputs.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub quantized_matmuls: usize,
    /// w8/w4: checkpoint keys of the MatMul weights kept at the source precision (`--keep`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<String>,
    /// Bytes of the initializers one call reads whole (weights, quantized blocks and scales, inline
    /// constants), each counted once; `None` where the producer did not count them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_bytes: Option<u64>,
    /// Bytes of the tables a call only looks rows up in (Gather data: class embedding, pos_for_diff, RoPE
    /// tables); a call reads `rows × row bytes` of them, not all. `None` where not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup_bytes: Option<u64>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl GraphPrecision {
    /// An unquantized graph of an export whose compute dtype is `compute` (the default of a manifest
    /// without per-graph precision); byte counts unknown.
    pub fn source(compute: TensorDType) -> GraphPrecision {
        GraphPrecision {
            kind: PrecisionKind::of_dtype(compute).unwrap_or(PrecisionKind::Fp32),
            block_size: None,
            accuracy_level: None,
            quantized_matmuls: 0,
            kept: Vec::new(),
            weight_bytes: None,
            lookup_bytes: None,
        }
    }

    /// Checks the fields against each other and against the export's compute dtype.
    pub fn validate(&self, compute: TensorDType) -> Result<(), String> {
        match self.kind.weight_bits() {
            Some(_) => {
                let Some(bs) = self.block_size else { return Err(format!("{} needs a block_size", self.kind)) };
                if bs < MIN_BLOCK_SIZE || !bs.is_power_of_two() {
                    return Err(format!("block_size {bs} is not a power of two >= {MIN_BLOCK_SIZE}"));
                }
                match self.accuracy_level {
                    None => return Err(format!("{} needs an accuracy_level", self.kind)),
                    Some(a) if a > MAX_ACCURACY_LEVEL => {
                        return Err(format!("accuracy_level {a} is not in 0..={MAX_ACCURACY_LEVEL}"))
                    }
                    Some(_) => {}
                }
                if self.quantized_matmuls == 0 {
                    return Err(format!("{} but no MatMul is quantized", self.kind));
                }
            }
            None => {
                let int8 = self.kind == PrecisionKind::Int8;
                if self.block_size.is_some()
                    || self.accuracy_level.is_some()
                    || (self.quantized_matmuls > 0 && !int8)
                    || !self.kept.is_empty()
                {
                    return Err(format!(
                        "{} graphs have no block_size, accuracy_level, quantized_matmuls or kept",
                        self.kind
                    ));
                }
            }
        }
        let source = PrecisionKind::of_dtype(compute);
        let fits = match self.kind {
            PrecisionKind::Fp32 | PrecisionKind::Fp16 => source == Some(self.kind),
            _ => true,
        };
        if !fits {
            return Err(format!("kind {} does not match the export's compute dtype {compute:?}", self.kind));
        }
        if self.kept.iter().any(|k| k.is_empty()) {
            return Err("kept lists an empty weight name".into());
        }
        Ok(())
    }
}

impl GraphEntry {
    /// The input called `name`.
    pub fn input(&self, name: &str) -> Option<&IoSpec> {
        self.inputs.iter().find(|s| s.name == name)
    }
    /// The output called `name`.
    pub fn output(&self, name: &str) -> Option<&IoSpec> {
        self.outputs.iter().find(|s| s.name == name)
    }
    /// This graph's precision, or the default of an export computing in `compute` when the manifest
    /// does not say (see [`GraphEntry::precision`]).
    pub fn precision_or(&self, compute: TensorDType) -> GraphPrecision {
        self.precision.clone().unwrap_or_else(|| GraphPrecision::source(compute))
    }
}

/// The external-data file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WeightsEntry {
    pub file: String,
    pub dtype: TensorDType,
    pub parameters: usize,
    pub bytes: u64,
    #[serde(default)]
    pub doc: String,
}

/// Precision of the export (per-graph weight storage: [`GraphEntry::precision`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Precision {
    /// Activations, the KV cache, and the weights of every graph whose [`GraphPrecision`] is fp32/fp16
    /// (a w8/w4 graph keeps its activations in this dtype and stores its MatMul weights quantized).
    pub compute: TensorDType,
    /// Parts computed in fp32 whatever `compute` is.
    #[serde(default)]
    pub fp32: Vec<String>,
    /// Graph inputs/outputs: fp32, except the KV cache which is in `compute`.
    #[serde(default)]
    pub io: String,
}

/// KV-cache contract shared by `ar_prefill` and `ar_step`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvCache {
    pub layers: usize,
    pub heads: usize,
    pub seq_len: usize,
    pub head_dim: usize,
    pub dtype: TensorDType,
    /// How `ar_step` attends over the cache.
    pub attention: Attention,
    #[serde(default)]
    pub layout: String,
    #[serde(default)]
    pub binding: String,
}

/// How `ar_step` attends over the preallocated KV cache. Both read and write the same cache layout
/// in place and compute the same function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// `com.microsoft.GroupQueryAttention`, as onnxruntime-genai's model builder emits it: RoPE fused,
    /// each row attends only its own filled prefix, past and present share one buffer. ONNX Runtime CPU
    /// and CUDA; under TensorRT these nodes run on CUDA.
    #[default]
    Gqa,
    /// Standard opset-21 ops (ScatterND, MatMul, Softmax) over the whole preallocated cache with a
    /// per-row mask: runs on every provider, TensorRT included.
    Standard,
}

impl Attention {
    /// The name in the manifest and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Attention::Gqa => "gqa",
            Attention::Standard => "standard",
        }
    }
}

/// Facts of the reference sampler a runtime needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sampler {
    pub cfg_schedule: String,
    pub head_sampler: String,
    pub last_euler_dt: f32,
    pub time_factor: f32,
    pub default_steps: usize,
    #[serde(default)]
    pub notes: Vec<String>,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub producer: String,
    pub onnx_ir_version: i64,
    pub onnx_opset: i64,
    pub stage: Stage,
    pub config: ModelConfig,
    /// The sphere radius R = √d (tokens are projected onto it only when [`Manifest::posterior`] says so).
    pub radius: f32,
    /// The VAE's posterior family (= `config.vae.posterior`): whether sampled tokens are projected onto the
    /// radius-R sphere ([`Manifest::token_radius`]). Absent in manifests written before it existed, which
    /// are all Power Spherical.
    #[serde(default)]
    pub posterior: Posterior,
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
    #[serde(default)]
    pub provider_hints: BTreeMap<String, String>,
    pub graphs: BTreeMap<String, GraphEntry>,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> CoreError {
    CoreError::Config(format!("{}: {msg}", path.display()))
}

impl Manifest {
    /// The manifest of an export of `config` in `compute` precision: format and version, every field
    /// derived from the config, the KV-cache contract (stage ar: layers, heads, sequence, head width,
    /// `attention`) and the sampler facts of [`crate::schedule`]. The caller fills `graphs` (and
    /// `weights`, documentation, provider hints); [`Manifest::validate`] checks the result.
    pub fn new(config: ModelConfig, stage: Stage, compute: TensorDType, max_batch: usize, attention: Attention) -> Self {
        let a = &config.ar;
        let kv_cache = (stage == Stage::Ar).then(|| KvCache {
            layers: a.n_layer,
            heads: a.n_head,
            seq_len: config.ar_seq_len(),
            head_dim: a.head_dim_attn(),
            dtype: compute,
            attention,
            layout: "[batch, heads, seq, head_dim]; seq = cls_token_num + num_tokens - 1".into(),
            binding: String::new(),
        });
        Manifest {
            format: MANIFEST_FORMAT.into(),
            format_version: MANIFEST_VERSION,
            producer: String::new(),
            onnx_ir_version: 10,
            onnx_opset: 21,
            stage,
            radius: config.radius(),
            posterior: config.vae.posterior,
            latent_dim: config.latent_dim,
            num_classes: config.num_classes,
            null_class_id: config.null_class(),
            cls_token_num: config.cls_token_num,
            num_tokens: config.num_tokens(),
            grid: config.grid(),
            image_size: config.image_size,
            max_batch,
            precision: Precision { compute, fp32: Vec::new(), io: String::new() },
            weights: WeightsEntry {
                file: "weights.bin".into(),
                dtype: compute,
                parameters: 0,
                bytes: 0,
                doc: String::new(),
            },
            kv_cache,
            sampler: Sampler {
                cfg_schedule: "linear: g_i = 1 + (cfg - 1) i / num_tokens (core::schedule::token_plan)".into(),
                head_sampler: "Euler-Maruyama, dt = (1 - 0.04) / steps, then one Euler step of 0.04 at t = 0.96".into(),
                last_euler_dt: crate::schedule::LAST_DT,
                time_factor: crate::schedule::TIME_FACTOR,
                default_steps: crate::schedule::DEFAULT_STEPS,
                notes: Vec::new(),
            },
            provider_hints: BTreeMap::new(),
            graphs: BTreeMap::new(),
            config,
        }
    }

    /// Reads `DIR/manifest.json` (or the file itself when `path` is a file) and validates it.
    ///
    /// The format name and version are checked before the rest of the layout, so a manifest of another
    /// version fails with a message naming both versions rather than with a missing-field error.
    pub fn load(path: &Path) -> Result<Manifest, CoreError> {
        let file = if path.is_dir() { path.join(MANIFEST_FILE) } else { path.to_path_buf() };
        if !path.exists() {
            return Err(CoreError::Io(format!("model folder {} does not exist", path.display())));
        }
        let text = std::fs::read_to_string(&file).map_err(|e| {
            CoreError::Io(format!("cannot read {}: {e} (is this an `exporter onnx` folder?)", file.display()))
        })?;
        Self::from_json(&text).map_err(|e| match e {
            CoreError::Config(m) => bad(&file, m),
            other => other,
        })
    }

    /// Parses and validates manifest JSON.
    pub fn from_json(text: &str) -> Result<Manifest, CoreError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| CoreError::Config(format!("invalid manifest JSON: {e}")))?;
        let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
        if format != MANIFEST_FORMAT {
            return Err(CoreError::Config(format!(
                "not a SphereAR ONNX manifest (format '{format}', expected '{MANIFEST_FORMAT}')"
            )));
        }
        let version = value.get("format_version").and_then(|v| v.as_u64());
        if version != Some(u64::from(MANIFEST_VERSION)) {
            let v = version.map(|v| v.to_string()).unwrap_or_else(|| "missing".into());
            return Err(CoreError::Config(format!(
                "manifest format version {v} is not supported (this build reads version {MANIFEST_VERSION}); \
                 re-export the checkpoint with a matching `exporter onnx`"
            )));
        }
        let mut m: Manifest =
            serde_json::from_value(value).map_err(|e| CoreError::Config(format!("invalid manifest: {e}")))?;
        let compute = m.precision.compute;
        for g in m.graphs.values_mut() {
            if g.precision.is_none() {
                g.precision = Some(GraphPrecision::source(compute));
            }
        }
        m.validate()?;
        Ok(m)
    }

    /// Checks that the manifest is self-consistent (config vs the derived fields, graph files named).
    pub fn validate(&self) -> Result<(), CoreError> {
        let err = |m: String| Err(CoreError::Config(m));
        self.config.validate()?;
        let c = &self.config;
        let derived = [
            ("latent_dim", self.latent_dim, c.latent_dim),
            ("num_classes", self.num_classes, c.num_classes),
            ("null_class_id", self.null_class_id, c.null_class()),
            ("cls_token_num", self.cls_token_num, c.cls_token_num),
            ("num_tokens", self.num_tokens, c.num_tokens()),
            ("grid", self.grid, c.grid()),
            ("image_size", self.image_size, c.image_size),
        ];
        for (name, got, want) in derived {
            if got != want {
                return err(format!("{name} is {got} but the config implies {want}"));
            }
        }
        if !(self.radius.is_finite() && self.radius > 0.0) {
            return err(format!("radius must be finite and positive, got {}", self.radius));
        }
        if self.posterior != c.vae.posterior {
            return err(format!(
                "posterior is {} but the config's VAE has the {} posterior",
                self.posterior, c.vae.posterior
            ));
        }
        if self.max_batch == 0 {
            return err("max_batch must be at least 1".into());
        }
        if self.precision.compute == TensorDType::Int64 {
            return err("precision.compute must be float32 or float16".into());
        }
        for (name, g) in &self.graphs {
            if g.file.is_empty() || g.file.contains("..") || Path::new(&g.file).is_absolute() {
                return err(format!("graph {name}: file '{}' must be a plain name inside the export", g.file));
            }
            if let Some(p) = &g.precision {
                p.validate(self.precision.compute)
                    .map_err(|m| CoreError::Config(format!("graph {name}: precision: {m}")))?;
            }
        }
        if self.stage == Stage::Ar {
            for g in ["ar_prefill", "ar_step", "head_step", "decoder"] {
                if !self.graphs.contains_key(g) {
                    return err(format!("stage ar export lacks the {g} graph"));
                }
            }
            let Some(kv) = &self.kv_cache else { return err("stage ar export lacks kv_cache".into()) };
            if kv.layers != c.ar.n_layer || kv.seq_len != c.ar_seq_len() || kv.heads * kv.head_dim != c.ar.dim {
                return err(format!(
                    "kv_cache ({} layers, {} heads × {}, seq {}) does not match the config",
                    kv.layers, kv.heads, kv.head_dim, kv.seq_len
                ));
            }
            if kv.dtype == TensorDType::Int64 {
                return err("kv_cache dtype must be float32 or float16".into());
            }
        } else if !self.graphs.contains_key("decoder") {
            return err("export lacks the decoder graph".into());
        }
        Ok(())
    }

    /// Precision of graph `name` (the compute-dtype default where the manifest does not say), or `None`
    /// if there is no such graph.
    pub fn graph_precision(&self, name: &str) -> Option<GraphPrecision> {
        self.graphs.get(name).map(|g| g.precision_or(self.precision.compute))
    }

    /// The radius sampled tokens are projected to: R for latents on the sphere, `None` for a Gaussian VAE.
    pub fn token_radius(&self) -> Option<f32> {
        self.posterior.on_sphere().then_some(self.radius)
    }

    /// Whether any graph stores quantized weights (w8/w4/int8).
    pub fn is_quantized(&self) -> bool {
        self.graphs
            .values()
            .any(|g| !matches!(g.precision_or(self.precision.compute).kind, PrecisionKind::Fp32 | PrecisionKind::Fp16))
    }

    /// Pretty JSON of the manifest.
    pub fn to_json(&self) -> Result<String, CoreError> {
        serde_json::to_string_pretty(self).map_err(|e| CoreError::Config(format!("cannot serialise the manifest: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let io = |n: &str, dt| IoSpec {
            name: n.into(),
            dtype: dt,
            shape: vec![Dim::Sym("batch".into())],
            meaning: "".into(),
        };
        let g = |f: &str| GraphEntry {
            file: f.into(),
            doc: String::new(),
            inputs: vec![io("x", TensorDType::Float32)],
            outputs: vec![io("y", TensorDType::Float32)],
            precision: None,
        };
        let mut m = Manifest::new(cfg, Stage::Ar, TensorDType::Float16, 8, Attention::Gqa);
        m.producer = "test".into();
        m.weights.parameters = 1;
        m.weights.bytes = 2;
        m.graphs = ["ar_prefill", "ar_step", "head_step", "decoder"]
            .iter()
            .map(|n| (n.to_string(), g(&format!("{n}.onnx"))))
            .collect();
        m
    }

    #[test]
    fn round_trip_and_dims() {
        let m = sample();
        let back = Manifest::from_json(&m.to_json().unwrap()).unwrap();
        assert_eq!(back.kv_cache.unwrap().dtype, TensorDType::Float16);
        let spec: IoSpec =
            serde_json::from_str(r#"{"name":"k","dtype":"float16","shape":["batch",2,17,16],"meaning":""}"#).unwrap();
        assert_eq!(spec.shape, vec![Dim::Sym("batch".into()), Dim::N(2), Dim::N(17), Dim::N(16)]);
    }

    #[test]
    fn version_and_format_are_checked_first() {
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json().unwrap()).unwrap();
        v["format_version"] = 1.into();
        v.as_object_mut().unwrap().remove("graphs");
        let msg = Manifest::from_json(&v.to_string()).unwrap_err().to_string();
        assert!(msg.contains("version 1 is not supported") && msg.contains("reads version 2"), "{msg}");
        v["format"] = "other".into();
        let msg = Manifest::from_json(&v.to_string()).unwrap_err().to_string();
        assert!(msg.contains("not a SphereAR ONNX manifest"), "{msg}");
    }

    #[test]
    fn inconsistent_manifests_are_rejected() {
        let mut m = sample();
        m.num_tokens += 1;
        assert!(Manifest::from_json(&m.to_json().unwrap()).unwrap_err().to_string().contains("num_tokens"));
        let mut m = sample();
        m.graphs.remove("ar_step");
        assert!(Manifest::from_json(&m.to_json().unwrap()).unwrap_err().to_string().contains("ar_step"));
        let mut m = sample();
        if let Some(g) = m.graphs.get_mut("decoder") {
            g.file = "../x.onnx".into();
        }
        assert!(Manifest::from_json(&m.to_json().unwrap()).is_err());
    }

    fn w4(kept: Vec<String>) -> GraphPrecision {
        GraphPrecision {
            kind: PrecisionKind::W4,
            block_size: Some(32),
            accuracy_level: Some(4),
            quantized_matmuls: 7,
            kept,
            weight_bytes: Some(1234),
            lookup_bytes: Some(64),
        }
    }

    #[test]
    fn posterior_is_recorded_and_old_manifests_are_spherical() {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.vae.posterior = Posterior::Gaussian;
        let mut g = sample();
        g.config = cfg.clone();
        g.posterior = cfg.vae.posterior;
        let text = g.to_json().unwrap();
        let back = Manifest::from_json(&text).unwrap();
        assert_eq!((back.posterior, back.token_radius()), (Posterior::Gaussian, None));
        // A manifest from before the field: neither the manifest nor its config names a posterior.
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json().unwrap()).unwrap();
        assert_eq!(v["posterior"], "spherical");
        v.as_object_mut().unwrap().remove("posterior");
        v["config"]["vae"].as_object_mut().unwrap().remove("posterior");
        let old = Manifest::from_json(&v.to_string()).unwrap();
        assert_eq!(old.posterior, Posterior::PowerSpherical);
        assert_eq!(old.token_radius(), Some(8f32.sqrt()));
        // The two records must agree.
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["posterior"] = "spherical".into();
        let e = Manifest::from_json(&v.to_string()).unwrap_err().to_string();
        assert!(e.contains("posterior is spherical but the config's VAE has the gaussian posterior"), "{e}");
    }

    #[test]
    fn graphs_without_precision_default_to_the_compute_dtype() {
        // The exporter's output (and every manifest before per-graph precision) has no `precision` per graph.
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json().unwrap()).unwrap();
        for g in v["graphs"].as_object_mut().unwrap().values_mut() {
            assert!(g.get("precision").is_none(), "None is not serialised");
            g.as_object_mut().unwrap().remove("precision");
        }
        let m = Manifest::from_json(&v.to_string()).unwrap();
        for g in m.graphs.values() {
            let p = g.precision.as_ref().expect("filled on load");
            assert_eq!(p, &GraphPrecision::source(TensorDType::Float16));
            assert_eq!(p.kind, PrecisionKind::Fp16);
        }
        assert!(!m.is_quantized());
        let mut m32 = sample();
        m32.precision.compute = TensorDType::Float32;
        let m32 = Manifest::from_json(&m32.to_json().unwrap()).unwrap();
        assert_eq!(m32.graph_precision("decoder").unwrap().kind, PrecisionKind::Fp32);
        assert!(m32.graph_precision("nope").is_none());
    }

    #[test]
    fn quantized_precision_round_trips_and_is_validated() {
        let mut m = sample();
        m.precision.compute = TensorDType::Float32;
        m.graphs.get_mut("ar_step").unwrap().precision = Some(w4(vec!["head.net.final_layer.linear.weight".into()]));
        let text = m.to_json().unwrap();
        assert!(text.contains("\"kind\": \"w4\"") && text.contains("\"block_size\": 32"), "{text}");
        let back = Manifest::from_json(&text).unwrap();
        assert_eq!(back.graph_precision("ar_step").unwrap(), w4(vec!["head.net.final_layer.linear.weight".into()]));
        assert_eq!(back.graph_precision("decoder").unwrap().kind, PrecisionKind::Fp32);
        assert!(back.is_quantized());

        let bad = |edit: &dyn Fn(&mut GraphPrecision), want: &str| {
            let mut m = sample();
            m.precision.compute = TensorDType::Float32;
            let mut p = w4(vec![]);
            edit(&mut p);
            m.graphs.get_mut("ar_step").unwrap().precision = Some(p);
            let msg = Manifest::from_json(&m.to_json().unwrap()).unwrap_err().to_string();
            assert!(msg.contains("graph ar_step: precision") && msg.contains(want), "{msg}");
        };
        bad(&|p| p.block_size = Some(24), "power of two");
        bad(&|p| p.block_size = Some(8), "power of two");
        bad(&|p| p.block_size = None, "needs a block_size");
        bad(&|p| p.accuracy_level = Some(5), "accuracy_level 5");
        bad(&|p| p.accuracy_level = None, "needs an accuracy_level");
        bad(&|p| p.quantized_matmuls = 0, "no MatMul is quantized");
        bad(&|p| p.kept = vec![String::new()], "empty weight name");
        bad(
            &|p| *p = GraphPrecision { block_size: Some(32), ..GraphPrecision::source(TensorDType::Float32) },
            "fp32 graphs have no",
        );
        // An fp16 graph in an fp32 export (or the reverse) contradicts precision.compute.
        bad(&|p| *p = GraphPrecision::source(TensorDType::Float16), "does not match");
    }

    #[test]
    fn missing_folder_is_one_clear_error() {
        let msg = Manifest::load(Path::new("/nonexistent/spherear-export")).unwrap_err().to_string();
        assert!(msg.contains("does not exist"), "{msg}");
    }
}
