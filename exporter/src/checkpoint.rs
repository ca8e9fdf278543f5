//! Checkpoint folders as the trainer writes them: `config.json` plus `ar.safetensors` (AR EMA weights and
//! `vae.*`) or, after the VAE stage only, `vae.safetensors` (`vae.*` only). Reading validates the format
//! tag, that the config stored in the safetensors metadata equals `config.json`, and every key and shape
//! against [`spherear_core::keys`]. Random-init checkpoints for tests are written by [`crate::random`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use spherear_core::config::WEIGHTS_FORMAT;
use spherear_core::keys::{all_keys, vae_keys, KeySpec};
use spherear_core::ModelConfig;

use crate::error::{ExportError, Result};

/// Which training stage a checkpoint comes from (`ar.safetensors`: all four graphs; `vae.safetensors`:
/// the decoder only).
pub use spherear_core::manifest::Stage;

/// One f32 tensor.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A validated checkpoint held in memory as f32.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub stage: Stage,
    tensors: HashMap<String, Tensor>,
}

fn ck(path: &Path, msg: impl Into<String>) -> ExportError {
    ExportError::Checkpoint { path: path.display().to_string(), msg: msg.into() }
}

/// Reads every key of `want` from `st` as f32: the tensors found with the right shape and dtype, and one
/// message per missing, misshapen or unsupported key.
pub(crate) fn read_keys(st: &safetensors::SafeTensors, want: &[KeySpec]) -> (HashMap<String, Tensor>, Vec<String>) {
    let mut problems = Vec::new();
    let mut tensors = HashMap::with_capacity(want.len());
    for KeySpec { name, shape } in want {
        match st.tensor(name) {
            Err(_) => problems.push(format!("missing {name}")),
            Ok(v) if v.shape() != shape.as_slice() => {
                problems.push(format!("{name} has shape {:?}, config wants {shape:?}", v.shape()))
            }
            Ok(v) => match to_f32(v.dtype(), v.data()) {
                Some(data) => {
                    tensors.insert(name.clone(), Tensor { shape: shape.clone(), data });
                }
                None => problems.push(format!("{name} has unsupported dtype {:?}", v.dtype())),
            },
        }
    }
    (tensors, problems)
}

/// Refuses tensors with NaN or ±Inf values (a diverged or corrupt checkpoint must not be exported): the
/// error names every such tensor (sorted, at most 6) with its count of non-finite values.
pub(crate) fn check_finite(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut bad: Vec<(String, usize)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.data.iter().filter(|v| !v.is_finite()).count()))
        .filter(|(_, n)| *n > 0)
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    bad.sort();
    let n = bad.len();
    let shown: Vec<String> = bad.iter().take(6).map(|(k, c)| format!("{k} ({c})")).collect();
    Err(ck(
        path,
        format!(
            "non-finite (NaN/Inf) values in {n} tensor(s): {}{}; the checkpoint is corrupt or training diverged, \
             refusing to export it",
            shown.join(", "),
            if n > 6 { format!(" (+{} more)", n - 6) } else { String::new() }
        ),
    ))
}

pub(crate) fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let b2 = |c: &[u8]| [c[0], c[1]];
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes(b2(c)).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes(b2(c)).to_f32()).collect(),
        _ => return None,
    })
}

impl Checkpoint {
    /// Reads and validates the checkpoint folder `dir`.
    pub fn load(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            return Err(ck(dir, "no such checkpoint folder"));
        }
        let config = ModelConfig::load(&dir.join("config.json")).map_err(|e| ck(dir, e.to_string()))?;
        let stage = [Stage::Ar, Stage::Vae]
            .into_iter()
            .find(|s| dir.join(s.weights_file()).is_file())
            .ok_or_else(|| ck(dir, "holds neither ar.safetensors nor vae.safetensors"))?;
        let path = dir.join(stage.weights_file());
        let bytes = std::fs::read(&path).map_err(|e| ck(&path, format!("cannot read: {e}")))?;
        let bad = |e: safetensors::SafeTensorError| ck(&path, format!("not a valid safetensors file ({e})"));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(bad)?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| meta.get(k).map(String::as_str).ok_or_else(|| ck(&path, format!("metadata '{k}' missing")));
        if get("format")? != WEIGHTS_FORMAT {
            return Err(ck(&path, format!("format '{}' is not {WEIGHTS_FORMAT}", get("format")?)));
        }
        let stored = ModelConfig::from_json(get("config")?).map_err(|e| ck(&path, e.to_string()))?;
        if stored != config {
            return Err(ck(
                &path,
                format!(
                    "checkpoint/config mismatch: the weights were written for config '{}' but config.json describes \
                     '{}' (fields that differ: {})",
                    stored.name,
                    config.name,
                    config_diff(&stored, &config).join(", ")
                ),
            ));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(bad)?;
        let want = match stage {
            Stage::Ar => all_keys(&config),
            Stage::Vae => vae_keys(&config),
        };
        let (tensors, mut problems) = read_keys(&st, &want);
        let extra = st.names().into_iter().filter(|n| !tensors.contains_key(*n) && !want.iter().any(|k| &k.name == *n));
        problems.extend(extra.map(|n| format!("unexpected {n}")));
        if !problems.is_empty() {
            problems.sort();
            let n = problems.len();
            problems.truncate(6);
            return Err(ck(
                &path,
                format!(
                    "checkpoint/config mismatch: {}{}",
                    problems.join("; "),
                    if n > 6 { format!(" (+{} more)", n - 6) } else { String::new() }
                ),
            ));
        }
        check_finite(&path, &tensors)?;
        Ok(Checkpoint { dir: dir.to_path_buf(), config, stage, tensors })
    }

    /// The tensor `key` (validated at load time).
    pub fn tensor(&self, key: &str) -> Result<&Tensor> {
        self.tensors.get(key).ok_or_else(|| ck(&self.dir, format!("tensor {key} is not in this checkpoint")))
    }
}

/// Dotted paths of the fields where two configs differ.
fn config_diff(a: &ModelConfig, b: &ModelConfig) -> Vec<String> {
    fn walk(a: &serde_json::Value, b: &serde_json::Value, path: String, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                for (k, v) in x {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(v, y.get(k).unwrap_or(&serde_json::Value::Null), p, out);
                }
            }
            _ if a != b => out.push(path),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let (x, y) = (serde_json::to_value(a), serde_json::to_value(b));
    if let (Ok(x), Ok(y)) = (x, y) {
        walk(&x, &y, String::new(), &mut out);
    }
    out
}
