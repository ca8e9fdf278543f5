//! `trainer import`: official `torch.save` checkpoints → our checkpoint format, without executing pickle
//! code (see [`crate::torch_pickle`]). Every key and shape is checked against the preset's layout
//! (`spherear_core::keys`) and all mismatches are listed in the error.

use std::collections::BTreeMap;
use std::path::Path;

use spherear_core::fsutil;
use spherear_core::keys::{all_keys, param_count};
use spherear_core::ModelConfig;
use tch::Tensor;

use crate::ar::ArModel;
use crate::checkpoint;
use crate::error::{Result, TrainError};
use crate::torch_pickle::{read_torch_checkpoint, TorchCheckpoint};

/// What an import read and wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Which state dict of the main file was used: `ema`, `model` or `state_dict`.
    pub source: String,
    pub tensors: usize,
    pub parameters: usize,
    /// Non-float entries that were left out (e.g. integer buffers).
    pub skipped: Vec<String>,
}

fn to_tensors(ck: TorchCheckpoint, add_vae_prefix: bool) -> BTreeMap<String, Tensor> {
    ck.tensors
        .into_iter()
        .map(|(name, raw)| {
            let shape: Vec<i64> = raw.shape.iter().map(|&s| s as i64).collect();
            let name = if add_vae_prefix && !name.starts_with("vae.") { format!("vae.{name}") } else { name };
            (name, Tensor::from_slice(&raw.data).view(shape.as_slice()))
        })
        .collect()
}

/// Reads the official checkpoint (and optionally a separate VAE checkpoint whose keys may lack the
/// `vae.` prefix; its tensors replace the main file's `vae.*`), checks the layout against `cfg`.
pub fn read_official(
    official: &Path,
    vae: Option<&Path>,
    cfg: &ModelConfig,
) -> Result<(BTreeMap<String, Tensor>, ImportReport)> {
    let ck = read_torch_checkpoint(official)?;
    let (source, mut skipped) = (ck.source.clone(), ck.skipped.clone());
    let mut tensors = to_tensors(ck, false);
    if let Some(v) = vae {
        let vck = read_torch_checkpoint(v)?;
        skipped.extend(vck.skipped.iter().cloned());
        tensors.extend(to_tensors(vck, true));
    }
    let expected = all_keys(cfg);
    let mut problems = Vec::new();
    for k in &expected {
        match tensors.get(&k.name) {
            None => problems.push(format!("missing {}", k.name)),
            Some(t) => {
                let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
                if shape != k.shape {
                    problems
                        .push(format!("{}: shape {:?}, preset '{}' expects {:?}", k.name, shape, cfg.name, k.shape));
                }
            }
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|k| k.name.as_str()).collect();
    problems.extend(tensors.keys().filter(|n| !known.contains(n.as_str())).map(|n| format!("unexpected {n}")));
    if !problems.is_empty() {
        let n = problems.len();
        let shown = problems.into_iter().take(10).collect::<Vec<_>>().join("; ");
        let more = if n > 10 { format!(" (+{} more)", n - 10) } else { String::new() };
        return Err(TrainError::Mismatch(format!(
            "{} does not match preset '{}': {shown}{more}",
            official.display(),
            cfg.name
        )));
    }
    let report = ImportReport { source, tensors: tensors.len(), parameters: param_count(&expected), skipped };
    Ok((tensors, report))
}

/// Whether `dir` holds a run: a `config.json` that parses as a model config. Only such a folder is ever
/// replaced by an import (with `force`).
pub fn holds_run(dir: &Path) -> bool {
    ModelConfig::load(&dir.join("config.json")).is_ok()
}

/// Imports into the run folder `out` (ar.safetensors + config.json), loadable by `ArModel::load`.
///
/// `out` is checked before anything is read ([`fsutil::check_folder_output`]): a new or empty folder is
/// fine; an existing non-empty one only with `force`, only when it holds a run ([`holds_run`]), and
/// never when it is or contains `official` or `vae`. The folder is written whole
/// ([`fsutil::write_folder_atomically`]): a failed import leaves nothing behind and an earlier run as it
/// was; with `force` a successful one replaces the whole folder.
pub fn import_official(
    official: &Path,
    vae: Option<&Path>,
    preset: &str,
    out: &Path,
    force: bool,
) -> Result<ImportReport> {
    let cfg = ModelConfig::preset(preset)?;
    let inputs: Vec<&Path> = std::iter::once(official).chain(vae).collect();
    fsutil::check_folder_output(&fsutil::FolderOutput {
        out,
        force,
        kind: "a run folder",
        is_ours: &holds_run,
        inputs: &inputs,
    })?;
    let (tensors, report) = read_official(official, vae, &cfg)?;
    let model = ArModel::new(&cfg)?;
    checkpoint::load_into(&model.vs, &tensors, "", &format!("{}", official.display()))?;
    fsutil::write_folder_atomically(out, |staging| model.save(staging, "import"))?;
    Ok(report)
}
