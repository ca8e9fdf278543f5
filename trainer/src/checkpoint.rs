//! Checkpoint files: safetensors with string metadata, written atomically (temporary name, then rename).
//!
//! - Weights files (`vae.safetensors`, `ar.safetensors` under the official key names, `judge.safetensors`):
//!   metadata `format = spherear-weights-v1`, `stage`, `config` (the config JSON), all written by
//!   [`save_weights`].
//! - `train-<stage>.safetensors`: everything needed to resume: weights, optimizer moments
//!   (`optim.m.<key>`, `optim.v.<key>`), EMA weights (`ema.<key>`) where the stage keeps them, and
//!   metadata `format = spherear-train-v1`, `stage`, `step`, `total_steps`, `config`, and what the run
//!   was made from (`data_sha256`, `data_limit`, `vae_sha256`: see [`crate::identity`]); written by
//!   [`save_train`], read by [`load_train`] and [`read_train_header`], for every stage's config type
//!   ([`StageConfig`]: [`ModelConfig`] for vae and ar, [`JudgeConfig`] for the judge).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use spherear_core::config::WEIGHTS_FORMAT;
use spherear_core::fsutil;
use spherear_core::judge::JudgeConfig;
use spherear_core::ModelConfig;
use tch::{nn::VarStore, Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::optim::AdamW;

pub const TRAIN_FORMAT: &str = "spherear-train-v1";

fn ck_err(path: &Path, msg: impl Into<String>) -> TrainError {
    TrainError::Checkpoint { path: path.display().to_string(), msg: msg.into() }
}

/// Tensors by name plus string metadata, as read from or written to one file.
#[derive(Default)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    pub fn meta(&self, path: &Path, key: &str) -> Result<&str> {
        self.metadata.get(key).map(|s| s.as_str()).ok_or_else(|| ck_err(path, format!("metadata '{key}' missing")))
    }

    /// The model config stored in the metadata.
    pub fn config(&self, path: &Path) -> Result<ModelConfig> {
        self.stage_config(path)
    }

    /// The config of any stage stored in the metadata.
    pub fn stage_config<C: StageConfig>(&self, path: &Path) -> Result<C> {
        C::from_metadata(path, self.meta(path, "config")?)
    }
}

/// A stage's config as checkpoints store it (metadata `config`) and as a run folder holds it
/// (`config.json`, `judge-config.json`).
pub trait StageConfig: Sized {
    /// The JSON stored in the metadata.
    fn metadata_json(&self) -> String;
    /// Parses the metadata `json` of the file `path`.
    fn from_metadata(path: &Path, json: &str) -> Result<Self>;
    /// Errors (naming `path`) when `stored`, the config of a checkpoint of `stage` or of a run folder,
    /// does not fit `wanted`, the one asked for.
    fn check(path: &Path, stage: &str, stored: &Self, wanted: &Self) -> Result<()>;
    /// Writes the run folder's config file atomically.
    fn save_file(&self, path: &Path) -> Result<()>;
}

impl StageConfig for ModelConfig {
    fn metadata_json(&self) -> String {
        self.to_json()
    }

    fn from_metadata(path: &Path, json: &str) -> Result<Self> {
        ModelConfig::from_json(json).map_err(|e| ck_err(path, e.to_string()))
    }

    /// For the VAE stage only the VAE part (and the preset name) must agree.
    fn check(path: &Path, stage: &str, stored: &Self, wanted: &Self) -> Result<()> {
        check_stage_config(path, stage, stored, wanted)
    }

    fn save_file(&self, path: &Path) -> Result<()> {
        Ok(self.save(path)?)
    }
}

impl StageConfig for JudgeConfig {
    fn metadata_json(&self) -> String {
        self.to_json()
    }

    fn from_metadata(path: &Path, json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| ck_err(path, format!("invalid judge config in the metadata: {e}")))
    }

    fn check(path: &Path, _stage: &str, stored: &Self, wanted: &Self) -> Result<()> {
        if stored != wanted {
            return Err(ck_err(
                path,
                format!("was made for judge config {stored:?} but {wanted:?} was asked for (use a new --out)"),
            ));
        }
        Ok(())
    }

    fn save_file(&self, path: &Path) -> Result<()> {
        Ok(self.save(path)?)
    }
}

/// Writes f32 tensors and metadata atomically.
pub fn save(path: &Path, file: &TensorFile) -> Result<()> {
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(file.tensors.len());
    for (name, t) in &file.tensors {
        let t = t.detach().to_kind(Kind::Float).contiguous();
        let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
        let numel: usize = shape.iter().product();
        let mut bytes = vec![0u8; numel * 4];
        t.f_copy_data_u8(&mut bytes, numel)?;
        bufs.push((name.clone(), shape, bytes));
    }
    let views = bufs
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)).map_err(|e| ck_err(path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, &Some(file.metadata.clone())).map_err(|e| ck_err(path, e.to_string()))?;
    fsutil::write_atomic(path, &bytes)?;
    Ok(())
}

/// Reads a safetensors file (f32, f16 or bf16 tensors, converted to f32).
pub fn load(path: &Path) -> Result<TensorFile> {
    let bytes = std::fs::read(path).map_err(|e| ck_err(path, format!("cannot read: {e}")))?;
    let corrupt = |e: safetensors::SafeTensorError| ck_err(path, format!("not a valid safetensors file ({e})"));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(corrupt)?;
    let mut out = TensorFile { metadata: meta.metadata().clone().unwrap_or_default(), ..Default::default() };
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            other => return Err(ck_err(path, format!("tensor '{name}' has unsupported dtype {other:?}"))),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?.to_kind(Kind::Float);
        out.tensors.insert(name, t);
    }
    Ok(out)
}

/// Copies `tensors` into the variables of `vs` whose names start with `prefix`. Every such variable must
/// be present with the same shape; every tensor under `prefix` must be a variable. The error lists all
/// mismatches.
pub fn load_into(vs: &VarStore, tensors: &BTreeMap<String, Tensor>, prefix: &str, what: &str) -> Result<()> {
    let vars = vs.variables();
    let mut problems = Vec::new();
    for (name, var) in vars.iter().filter(|(n, _)| n.starts_with(prefix)) {
        match tensors.get(name) {
            None => problems.push(format!("missing key {name}")),
            Some(t) if t.size() != var.size() => {
                problems.push(format!("{name}: shape {:?}, expected {:?}", t.size(), var.size()))
            }
            _ => {}
        }
    }
    for name in tensors.keys().filter(|n| n.starts_with(prefix)) {
        if !vars.contains_key(name) {
            problems.push(format!("unexpected key {name}"));
        }
    }
    if !problems.is_empty() {
        problems.sort();
        let n = problems.len();
        let shown: Vec<_> = problems.into_iter().take(8).collect();
        let more = if n > 8 { format!(" (+{} more)", n - 8) } else { String::new() };
        return Err(TrainError::Mismatch(format!("{what} does not fit the model: {}{more}", shown.join("; "))));
    }
    tch::no_grad(|| {
        for (name, var) in vars.iter().filter(|(n, _)| n.starts_with(prefix)) {
            if let Some(t) = tensors.get(name) {
                let mut v = var.shallow_clone();
                v.copy_(t);
            }
        }
    });
    Ok(())
}

/// The variables of `vs` whose names start with `prefix`, detached copies.
pub fn named_tensors(vs: &VarStore, prefix: &str) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().filter(|(n, _)| n.starts_with(prefix)).map(|(n, t)| (n, t.detach().copy())).collect()
}

/// Checks that a stored model config matches the one asked for, naming both presets when they differ.
/// For the VAE stage only the VAE part (and the preset name) must agree.
pub fn check_stage_config(path: &Path, stage: &str, stored: &ModelConfig, wanted: &ModelConfig) -> Result<()> {
    let same = if stage == "vae" { stored.name == wanted.name && stored.same_vae(wanted) } else { stored == wanted };
    let (sp, wp) = (stored.vae.posterior, wanted.vae.posterior);
    if !same && sp != wp {
        return Err(ck_err(
            path,
            format!("was made with the {sp} posterior but {wp} was asked for (use --posterior {sp} or a new --out)"),
        ));
    }
    if !same {
        return Err(ck_err(
            path,
            format!(
                "was made for preset '{}' but '{}' was asked for (use the matching --preset or a new --out)",
                stored.name, wanted.name
            ),
        ));
    }
    Ok(())
}

/// Writes a weights file: `tensors` with the metadata `format` ([`WEIGHTS_FORMAT`]), `stage` and
/// `config` (its JSON).
pub fn save_weights<C: StageConfig>(
    path: &Path,
    stage: &str,
    config: &C,
    tensors: BTreeMap<String, Tensor>,
) -> Result<()> {
    let mut f = TensorFile { tensors, ..Default::default() };
    f.metadata.insert("format".into(), WEIGHTS_FORMAT.into());
    f.metadata.insert("stage".into(), stage.into());
    f.metadata.insert("config".into(), config.metadata_json());
    save(path, &f)
}

/// Writes a resumable training checkpoint of `stage` at `step`; `extra` is added to the metadata.
pub fn save_train<C: StageConfig>(
    path: &Path,
    stage: &str,
    step: usize,
    total: usize,
    config: &C,
    tensors: BTreeMap<String, Tensor>,
    extra: &HashMap<String, String>,
) -> Result<()> {
    let mut f = TensorFile { tensors, metadata: extra.clone() };
    f.metadata.insert("format".into(), TRAIN_FORMAT.into());
    f.metadata.insert("stage".into(), stage.into());
    f.metadata.insert("step".into(), step.to_string());
    f.metadata.insert("total_steps".into(), total.to_string());
    f.metadata.insert("config".into(), config.metadata_json());
    save(path, &f)
}

/// Reads a training checkpoint of `stage` made for `config`, if one exists: (step, file).
pub fn load_train<C: StageConfig>(path: &Path, stage: &str, config: &C) -> Result<Option<(usize, TensorFile)>> {
    if !path.exists() {
        return Ok(None);
    }
    let file = load(path)?;
    if file.meta(path, "format")? != TRAIN_FORMAT || file.meta(path, "stage")? != stage {
        return Err(ck_err(path, format!("is not a {stage} training checkpoint")));
    }
    C::check(path, stage, &file.stage_config(path)?, config)?;
    let step = file.meta(path, "step")?.parse().map_err(|_| ck_err(path, "metadata 'step' is not a number"))?;
    Ok(Some((step, file)))
}

/// The variables of `vs` under `prefix` and the moments of `opt`: what a checkpoint of a stage without
/// EMA holds.
pub fn train_tensors(vs: &VarStore, prefix: &str, opt: &AdamW) -> BTreeMap<String, Tensor> {
    let mut tensors = named_tensors(vs, prefix);
    tensors.extend(opt.state());
    tensors
}

/// Restores what [`train_tensors`] saved, from the checkpoint `path` at `step`: the variables of `vs`
/// under `prefix` (every one present with its shape) and the moments of `opt`.
pub fn restore_train(
    vs: &VarStore,
    prefix: &str,
    opt: &mut AdamW,
    file: &TensorFile,
    step: usize,
    path: &Path,
) -> Result<()> {
    let weights: BTreeMap<String, Tensor> = file
        .tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("optim."))
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    load_into(vs, &weights, prefix, &format!("checkpoint {}", path.display()))?;
    opt.load_state(&file.tensors, step as i64).map_err(|msg| ck_err(path, msg))
}

/// The string metadata of a safetensors file, read from its header only (no tensor data).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let corrupt = |msg: String| ck_err(path, format!("not a valid safetensors file ({msg})"));
    let mut f = std::fs::File::open(path).map_err(|e| ck_err(path, format!("cannot read: {e}")))?;
    let len = f.metadata().map_err(|e| ck_err(path, format!("cannot read: {e}")))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| corrupt(format!("no header: {e}")))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100_000_000 {
        return Err(corrupt(format!("header length {n} does not fit a {len}-byte file")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| corrupt(format!("cannot read the header: {e}")))?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| corrupt(format!("header: {e}")))?;
    let meta = v.get("__metadata__").and_then(|m| m.as_object());
    Ok(meta
        .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string()))).collect())
        .unwrap_or_default())
}

/// What a training checkpoint says about itself (its header only).
#[derive(Debug, Clone)]
pub struct TrainHeader {
    pub step: usize,
    /// The run's `--steps` when it was written.
    pub total_steps: usize,
    pub metadata: HashMap<String, String>,
}

impl TrainHeader {
    /// The config stored in the metadata.
    pub fn config<C: StageConfig>(&self, path: &Path) -> Result<C> {
        let text = self.metadata.get("config").ok_or_else(|| ck_err(path, "metadata 'config' missing"))?;
        C::from_metadata(path, text)
    }
}

/// Reads the header of the training checkpoint of `stage` at `path`, if one exists; errors when it is
/// not a training checkpoint of that stage.
pub fn read_train_header(path: &Path, stage: &str) -> Result<Option<TrainHeader>> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(None);
    }
    let metadata = read_metadata(path)?;
    let get = |key: &str| metadata.get(key).ok_or_else(|| ck_err(path, format!("metadata '{key}' missing")));
    if get("format")? != TRAIN_FORMAT || get("stage")? != stage {
        return Err(ck_err(path, format!("is not a {stage} training checkpoint")));
    }
    let number = |key: &str| -> Result<usize> {
        get(key)?.parse().map_err(|_| ck_err(path, format!("metadata '{key}' is not a number")))
    };
    let (step, total_steps) = (number("step")?, number("total_steps")?);
    Ok(Some(TrainHeader { step, total_steps, metadata }))
}
