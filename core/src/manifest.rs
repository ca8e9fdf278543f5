//! `manifest.json` of an ONNX export: the serde types every reader of an export shares, and
//! [`Manifest::load`], which checks the format name and version before anything else.
//!
//! The exporter writes this layout (its own `exporter::export::Manifest` serialises to exactly these
//! fields; `tests/tests/runtime_*.rs` checks that a fresh export parses here). Readers such as the
//! runtime depend only on this module, never on the exporter.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::CoreError;

/// Value of the manifest's `format` field.
pub const MANIFEST_FORMAT: &str = "spherear-onnx";
/// Version of the manifest layout this crate reads; bumped on any incompatible change.
pub const MANIFEST_VERSION: u32 = 1;
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

/// One graph of the export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphEntry {
    pub file: String,
    #[serde(default)]
    pub doc: String,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
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

/// Precision of the export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Precision {
    /// Weights, matmuls, convolutions and the KV cache.
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
    #[serde(default)]
    pub layout: String,
    #[serde(default)]
    pub binding: String,
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
    #[serde(default)]
    pub provider_hints: BTreeMap<String, String>,
    pub graphs: BTreeMap<String, GraphEntry>,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> CoreError {
    CoreError::Config(format!("{}: {msg}", path.display()))
}

impl Manifest {
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
        let m: Manifest =
            serde_json::from_value(value).map_err(|e| CoreError::Config(format!("invalid manifest: {e}")))?;
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
        if self.max_batch == 0 {
            return err("max_batch must be at least 1".into());
        }
        for (name, g) in &self.graphs {
            if g.file.is_empty() || g.file.contains("..") || Path::new(&g.file).is_absolute() {
                return err(format!("graph {name}: file '{}' must be a plain name inside the export", g.file));
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

    /// Pretty JSON of the manifest.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
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
        };
        Manifest {
            format: MANIFEST_FORMAT.into(),
            format_version: MANIFEST_VERSION,
            producer: "test".into(),
            onnx_ir_version: 10,
            onnx_opset: 21,
            stage: Stage::Ar,
            radius: cfg.radius(),
            latent_dim: cfg.latent_dim,
            num_classes: cfg.num_classes,
            null_class_id: cfg.null_class(),
            cls_token_num: cfg.cls_token_num,
            num_tokens: cfg.num_tokens(),
            grid: cfg.grid(),
            image_size: cfg.image_size,
            max_batch: 8,
            precision: Precision { compute: TensorDType::Float16, fp32: vec![], io: String::new() },
            weights: WeightsEntry {
                file: "weights.bin".into(),
                dtype: TensorDType::Float16,
                parameters: 1,
                bytes: 2,
                doc: String::new(),
            },
            kv_cache: Some(KvCache {
                layers: cfg.ar.n_layer,
                heads: cfg.ar.n_head,
                seq_len: cfg.ar_seq_len(),
                head_dim: cfg.ar.dim / cfg.ar.n_head,
                dtype: TensorDType::Float16,
                layout: String::new(),
                binding: String::new(),
            }),
            sampler: Sampler {
                cfg_schedule: String::new(),
                head_sampler: String::new(),
                last_euler_dt: 0.04,
                time_factor: 1000.0,
                default_steps: 100,
                notes: vec![],
            },
            provider_hints: BTreeMap::new(),
            graphs: ["ar_prefill", "ar_step", "head_step", "decoder"]
                .iter()
                .map(|n| (n.to_string(), g(&format!("{n}.onnx"))))
                .collect(),
            config: cfg,
        }
    }

    #[test]
    fn round_trip_and_dims() {
        let m = sample();
        let back = Manifest::from_json(&m.to_json()).unwrap();
        assert_eq!(back.kv_cache.unwrap().dtype, TensorDType::Float16);
        let spec: IoSpec =
            serde_json::from_str(r#"{"name":"k","dtype":"float16","shape":["batch",2,17,16],"meaning":""}"#).unwrap();
        assert_eq!(spec.shape, vec![Dim::Sym("batch".into()), Dim::N(2), Dim::N(17), Dim::N(16)]);
    }

    #[test]
    fn version_and_format_are_checked_first() {
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        v["format_version"] = 2.into();
        v.as_object_mut().unwrap().remove("graphs");
        let msg = Manifest::from_json(&v.to_string()).unwrap_err().to_string();
        assert!(msg.contains("version 2") && msg.contains("version 1"), "{msg}");
        v["format"] = "other".into();
        let msg = Manifest::from_json(&v.to_string()).unwrap_err().to_string();
        assert!(msg.contains("not a SphereAR ONNX manifest"), "{msg}");
    }

    #[test]
    fn inconsistent_manifests_are_rejected() {
        let mut m = sample();
        m.num_tokens += 1;
        assert!(Manifest::from_json(&m.to_json()).unwrap_err().to_string().contains("num_tokens"));
        let mut m = sample();
        m.graphs.remove("ar_step");
        assert!(Manifest::from_json(&m.to_json()).unwrap_err().to_string().contains("ar_step"));
        let mut m = sample();
        if let Some(g) = m.graphs.get_mut("decoder") {
            g.file = "../x.onnx".into();
        }
        assert!(Manifest::from_json(&m.to_json()).is_err());
    }

    #[test]
    fn missing_folder_is_one_clear_error() {
        let msg = Manifest::load(Path::new("/nonexistent/spherear-export")).unwrap_err().to_string();
        assert!(msg.contains("does not exist"), "{msg}");
    }
}
