//! `exporter judge`: a trainer judge run folder (`judge-config.json`, `judge.safetensors`, optional
//! `judge-metrics.json`) → an export folder with `judge.onnx`, its external data `judge.weights.bin`
//! and `manifest.json` (core's [`JudgeManifest`]). fp32 only; the folder appears whole or not at all.
//!
//! Graph (IR 10, opset 21): `image` [batch, in_channels, S, S] → per conv block
//! `Conv(3×3, pad 1) → Relu → MaxPool(2, stride 2)` → `Flatten` → `Gemm(fc) → Relu` = `features`
//! [batch, feature_dim] → `Gemm(out)` = `logits` [batch, num_classes].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use spherear_core::config::WEIGHTS_FORMAT;
use spherear_core::judge::{
    conv_bias_key, conv_weight_key, judge_keys, JudgeConfig, JudgeManifest, FC_PREFIX, JUDGE_CONFIG_FILE, JUDGE_FORMAT,
    JUDGE_GRAPH_FILE, JUDGE_METRICS_FILE, JUDGE_STAGE, JUDGE_WEIGHTS_DATA_FILE, JUDGE_WEIGHTS_FILE, OUT_PREFIX,
};
use spherear_core::manifest::MANIFEST_FILE;

use crate::checkpoint::{check_finite, read_keys, Tensor};
use crate::error::{io_err, ExportError, Result};
use crate::export::{check_output, holds_manifest_of};
use crate::onnx::{ai, ais, Builder, DType, Dim, Layout, Value, WeightFile, WeightSource, BATCH};
use spherear_core::fsutil::write_folder_atomically;

/// Dataset recorded in the manifest when the run folder has no `judge-metrics.json`.
pub const DEFAULT_DATASET: &str = "fashion-mnist";

fn ck(path: &Path, msg: impl Into<String>) -> ExportError {
    ExportError::Checkpoint { path: path.display().to_string(), msg: msg.into() }
}

/// A validated judge run folder held in memory as f32.
#[derive(Debug)]
pub struct JudgeCheckpoint {
    pub dir: PathBuf,
    pub config: JudgeConfig,
    /// From `judge-metrics.json`, if present.
    pub test_accuracy: Option<f64>,
    /// From `judge-metrics.json`, else [`DEFAULT_DATASET`].
    pub dataset: String,
    tensors: HashMap<String, Tensor>,
}

impl WeightSource for JudgeCheckpoint {
    fn tensor(&self, key: &str) -> Result<&Tensor> {
        self.tensors.get(key).ok_or_else(|| ck(&self.dir, format!("tensor {key} is not in this checkpoint")))
    }
}

impl JudgeCheckpoint {
    /// Reads and validates `dir`: config, format and stage metadata, config in the metadata equal to
    /// `judge-config.json`, every key and shape of [`judge_keys`] and nothing else.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ck(dir, "no such checkpoint folder (expected a `trainer fit --stage judge` run folder)"));
        }
        let config = JudgeConfig::load(&dir.join(JUDGE_CONFIG_FILE)).map_err(|e| ck(dir, e.to_string()))?;
        let path = dir.join(JUDGE_WEIGHTS_FILE);
        if !path.is_file() {
            return Err(ck(dir, format!("holds no {JUDGE_WEIGHTS_FILE} (has the judge run finished?)")));
        }
        let bytes = std::fs::read(&path).map_err(|e| ck(&path, format!("cannot read: {e}")))?;
        let bad = |e: safetensors::SafeTensorError| ck(&path, format!("not a valid safetensors file ({e})"));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(bad)?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| meta.get(k).map(String::as_str).ok_or_else(|| ck(&path, format!("metadata '{k}' missing")));
        if get("format")? != WEIGHTS_FORMAT || get("stage")? != JUDGE_STAGE {
            return Err(ck(&path, format!("is not a judge weights file ({WEIGHTS_FORMAT}, stage {JUDGE_STAGE})")));
        }
        let stored: JudgeConfig = serde_json::from_str(get("config")?)
            .map_err(|e| ck(&path, format!("invalid judge config in the metadata: {e}")))?;
        if stored != config {
            return Err(ck(
                &path,
                format!("checkpoint/config mismatch: weights for {stored:?} but {JUDGE_CONFIG_FILE} says {config:?}"),
            ));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(bad)?;
        let want = judge_keys(&config);
        let (tensors, mut problems) = read_keys(&st, &want);
        problems.extend(
            st.names().into_iter().filter(|n| !want.iter().any(|k| &k.name == *n)).map(|n| format!("unexpected {n}")),
        );
        if !problems.is_empty() {
            problems.sort();
            return Err(ck(&path, format!("checkpoint/config mismatch: {}", problems.join("; "))));
        }
        check_finite(&path, &tensors)?;
        let (mut test_accuracy, mut dataset) = (None, DEFAULT_DATASET.to_string());
        let metrics = dir.join(JUDGE_METRICS_FILE);
        if metrics.is_file() {
            let text = std::fs::read_to_string(&metrics).map_err(|e| ck(&metrics, format!("cannot read: {e}")))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ck(&metrics, format!("invalid JSON: {e}")))?;
            test_accuracy = v.get("test_accuracy").and_then(|a| a.as_f64());
            if let Some(d) = v.get("dataset").and_then(|d| d.as_str()) {
                dataset = d.to_string();
            }
        }
        Ok(JudgeCheckpoint { dir: dir.to_path_buf(), config, test_accuracy, dataset, tensors })
    }

    /// Scalars in the checkpoint.
    pub fn parameters(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum()
    }
}

/// What `exporter judge` exports and where.
#[derive(Debug, Clone)]
pub struct JudgeExportOptions {
    pub checkpoint: PathBuf,
    pub out: PathBuf,
    pub force: bool,
}

/// Builds `judge.onnx` (graph contract in the module docs).
pub fn judge_graph(b: &mut Builder, cfg: &JudgeConfig) -> Result<()> {
    let s = cfg.image_size;
    let image = b.input(
        "image",
        DType::Float32,
        vec![BATCH, Dim::N(cfg.in_channels), Dim::N(s), Dim::N(s)],
        "images in [-1, 1] (pixel / 127.5 - 1), the tensors the VAE and the decoder see",
    )?;
    let mut x = image;
    for i in 0..cfg.channels.len() {
        // Keys from core (`convs.{i}.weight/bias`); nodes named under `convs.{i}`.
        let w = b.get(&conv_weight_key(i), Layout::AsIs)?;
        let bias = b.get(&conv_bias_key(i), Layout::AsIs)?;
        let mut b = b.pp(format!("convs.{i}"));
        let attrs = vec![ais("kernel_shape", &[3, 3]), ais("pads", &[1, 1, 1, 1]), ais("strides", &[1, 1])];
        let c = b.op("Conv", &[&x, &w, &bias], attrs)?;
        let r = b.op("Relu", &[&c], vec![])?;
        x = b.op("MaxPool", &[&r], vec![ais("kernel_shape", &[2, 2]), ais("strides", &[2, 2])])?;
    }
    let flat = b.op("Flatten", &[&x], vec![ai("axis", 1)])?;
    let h = gemm(b, &flat, FC_PREFIX)?;
    let features = b.op_to("Relu", &[&h], vec![], "features")?;
    let logits = gemm(b, &features, OUT_PREFIX)?;
    b.output(&logits, "logits", DType::Float32, vec![BATCH, Dim::N(cfg.num_classes)], "class logits (pre-softmax)")?;
    b.output(
        &features,
        "features",
        DType::Float32,
        vec![BATCH, Dim::N(cfg.feature_dim)],
        "penultimate-layer features after ReLU (for the Frechet distance)",
    )
}

/// `x @ p.weightᵀ + p.bias` for a PyTorch `[out, in]` linear weight.
fn gemm(b: &mut Builder, x: &Value, p: &str) -> Result<Value> {
    let mut b = b.pp(p);
    let w = b.get("weight", Layout::AsIs)?;
    let bias = b.get("bias", Layout::AsIs)?;
    b.op("Gemm", &[x, &w, &bias], vec![ai("transB", 1)])
}

/// Runs `exporter judge`. On any error nothing is left at `opts.out` (nor a temporary folder).
pub fn export_judge(opts: &JudgeExportOptions) -> Result<JudgeManifest> {
    check_output(&opts.out, opts.force, "a judge export", &|d| holds_manifest_of(d, JUDGE_FORMAT), &opts.checkpoint)?;
    let ckpt = JudgeCheckpoint::load(&opts.checkpoint)?;
    write_folder_atomically(&opts.out, |dir| {
        let mut weights = WeightFile::create(&ckpt, dir, JUDGE_WEIGHTS_DATA_FILE, DType::Float32)?;
        let mut b = Builder::new(&mut weights);
        judge_graph(&mut b, &ckpt.config)?;
        let doc = format!(
            "Judge classifier ({} conv blocks {:?}, {} features, {} classes); weights in {JUDGE_WEIGHTS_DATA_FILE} \
             (ONNX external data, keep it beside this file).",
            ckpt.config.channels.len(),
            ckpt.config.channels,
            ckpt.config.feature_dim,
            ckpt.config.num_classes
        );
        b.write("judge", &doc, &dir.join(JUDGE_GRAPH_FILE))?;
        if weights.parameters() != ckpt.parameters() {
            return Err(ExportError::Graph(format!(
                "the graph uses {} of the checkpoint's {} parameters",
                weights.parameters(),
                ckpt.parameters()
            )));
        }
        weights.finish()?;
        let m = JudgeManifest::new(ckpt.config.clone(), ckpt.test_accuracy, &ckpt.dataset);
        let text = serde_json::to_string_pretty(&m).map_err(|e| ExportError::Io(format!("manifest: {e}")))?;
        std::fs::write(dir.join(MANIFEST_FILE), text).map_err(io_err(format!("cannot write {MANIFEST_FILE}")))?;
        Ok(m)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> JudgeConfig {
        JudgeConfig { image_size: 8, in_channels: 3, channels: vec![4, 8], feature_dim: 6, num_classes: 3 }
    }

    #[test]
    fn export_writes_graph_weights_and_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("run");
        crate::random::write_random_judge(&small(), &ckpt, 1).unwrap();
        std::fs::write(ckpt.join(JUDGE_METRICS_FILE), r#"{"test_accuracy": 0.5, "dataset": "toy"}"#).unwrap();
        let out = tmp.path().join("export");
        let opts = JudgeExportOptions { checkpoint: ckpt.clone(), out: out.clone(), force: false };
        let m = export_judge(&opts).unwrap();
        assert_eq!(m.test_accuracy, Some(0.5));
        assert_eq!(m.dataset, "toy");
        assert_eq!(JudgeManifest::load(&out).unwrap(), m);
        let params: usize = judge_keys(&small()).iter().map(|k| k.shape.iter().product::<usize>()).sum();
        let bin = std::fs::metadata(out.join(JUDGE_WEIGHTS_DATA_FILE)).unwrap().len();
        assert_eq!(bin, 4 * params as u64);
        assert!(out.join(JUDGE_GRAPH_FILE).is_file());
        // A non-empty output folder needs --force; with it the folder is replaced.
        let err = export_judge(&opts).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        export_judge(&JudgeExportOptions { force: true, ..opts }).unwrap();
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary folders left: {names:?}");
    }

    #[test]
    fn bad_checkpoints_are_refused_without_output() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("export");
        let opts = |c: &Path| JudgeExportOptions { checkpoint: c.to_path_buf(), out: out.clone(), force: false };
        let err = export_judge(&opts(&tmp.path().join("missing"))).unwrap_err().to_string();
        assert!(err.contains("no such checkpoint folder") && !err.contains('\n'), "{err}");
        assert!(!out.exists());
        // Config and weights that disagree.
        let ckpt = tmp.path().join("run");
        crate::random::write_random_judge(&small(), &ckpt, 1).unwrap();
        JudgeConfig { feature_dim: 7, ..small() }.save(&ckpt.join(JUDGE_CONFIG_FILE)).unwrap();
        let err = export_judge(&opts(&ckpt)).unwrap_err().to_string();
        assert!(err.contains("checkpoint/config mismatch"), "{err}");
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
