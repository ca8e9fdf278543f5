//! What a training run was made from, recorded so that a resume can tell when it changed.
//!
//! - **Data identity** ([`DataIdentity`]): a SHA-256 fingerprint of the training split plus `--limit`.
//!   Fashion-MNIST: the bytes of the split's two IDX files (as stored, plain or `.gz`). ImageFolder: the
//!   sorted list of image files relative to the root, each with its size in bytes (so renaming, adding,
//!   removing or resizing a file changes it; rewriting a file with the same size does not).
//! - **VAE identity**: the SHA-256 of `vae.safetensors` ([`file_sha256`]).
//!
//! Both go into the metadata of the training checkpoints (`data_sha256`, `data_limit`, and for the AR
//! stage `vae_sha256`; [`RunIdentity`] records and compares them) and into the stamp of the latents cache.
//! The checkpoints also record the training recipe (`recipe`, [`crate::recipe`]), compared the same way.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use spherear_core::data::{self, DataSource, Split};

use crate::error::{Result, TrainError};

/// Checkpoint metadata keys.
pub const DATA_SHA256: &str = "data_sha256";
pub const DATA_LIMIT: &str = "data_limit";
pub const VAE_SHA256: &str = "vae_sha256";
/// The training recipe (JSON object: flag → value, see [`crate::recipe`]).
pub const RECIPE: &str = "recipe";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Io(format!("cannot read {}: {e}", path.display()))
}

/// Feeds the whole file into `h`.
fn hash_file_into(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(path, e))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// SHA-256 of a file's bytes, as lowercase hex.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    hash_file_into(&mut h, path)?;
    Ok(hex(&h.finalize()))
}

/// The identity of a run's training data: the training split's fingerprint and `--limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIdentity {
    /// SHA-256 (hex) of the training split, see the module documentation.
    pub sha256: String,
    pub limit: Option<usize>,
}

impl DataIdentity {
    /// Fingerprints the training split of `source` (reads the IDX files, or lists the ImageFolder; no
    /// image is decoded). Errors like loading would when the data is missing.
    pub fn of(source: &DataSource, limit: Option<usize>) -> Result<Self> {
        let files = data::split_files(source, Split::Train)?;
        let mut h = Sha256::new();
        match source {
            DataSource::FashionMnist { .. } => {
                h.update(b"fashion-mnist idx\n");
                for f in &files {
                    hash_file_into(&mut h, f)?;
                }
            }
            DataSource::ImageFolder { root } => {
                h.update(b"image folder\n");
                for f in &files {
                    let size = std::fs::metadata(f).map_err(|e| io_err(f, e))?.len();
                    let rel = f.strip_prefix(root).unwrap_or(f);
                    h.update(format!("{}\t{size}\n", rel.display()).as_bytes());
                }
            }
        }
        Ok(DataIdentity { sha256: hex(&h.finalize()), limit })
    }

    fn limit_text(&self) -> String {
        self.limit.map_or_else(|| "none".into(), |n| n.to_string())
    }

    /// Records this identity in checkpoint metadata.
    pub fn record(&self, meta: &mut HashMap<String, String>) {
        meta.insert(DATA_SHA256.into(), self.sha256.clone());
        meta.insert(DATA_LIMIT.into(), self.limit_text());
    }

    /// One-line stamp for caches.
    pub fn stamp(&self) -> String {
        format!("data sha256 {}, limit {}", self.sha256, self.limit_text())
    }

    /// What changed between the identity recorded in `meta` and this one, one phrase each; empty when
    /// nothing did (or nothing was recorded: checkpoints written before identities were recorded).
    pub fn changes(&self, meta: &HashMap<String, String>) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(old) = meta.get(DATA_SHA256) {
            if *old != self.sha256 {
                out.push(format!("the training data differs (fingerprint {} now {})", short(old), short(&self.sha256)));
            }
        }
        if let Some(old) = meta.get(DATA_LIMIT) {
            if *old != self.limit_text() {
                out.push(format!("--limit was {old}, now {}", self.limit_text()));
            }
        }
        out
    }
}

/// Everything a stage's training checkpoint records about its inputs: the data and, for the AR stage,
/// the VAE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunIdentity {
    pub data: DataIdentity,
    /// The VAE weights file and its SHA-256 (hex).
    pub vae: Option<(PathBuf, String)>,
    /// The recipe flags and their values ([`crate::recipe::Recipe::vae_record`]); empty: none recorded.
    pub recipe: Vec<(&'static str, String)>,
}

impl RunIdentity {
    /// The identity of a stage trained on `data` alone.
    pub fn data(data: DataIdentity) -> Self {
        RunIdentity { data, vae: None, recipe: Vec::new() }
    }

    /// This identity with the recipe `recipe` (flag → value).
    pub fn with_recipe(self, recipe: Vec<(&'static str, String)>) -> Self {
        RunIdentity { recipe, ..self }
    }

    /// Records this identity in checkpoint metadata.
    pub fn record(&self, meta: &mut HashMap<String, String>) {
        if let Some((_, sha)) = &self.vae {
            meta.insert(VAE_SHA256.into(), sha.clone());
        }
        if !self.recipe.is_empty() {
            let map: serde_json::Map<String, serde_json::Value> =
                self.recipe.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.clone()))).collect();
            meta.insert(RECIPE.into(), serde_json::Value::Object(map).to_string());
        }
        self.data.record(meta);
    }

    /// What changed between the identity recorded in `meta` and this one, one phrase each (the VAE
    /// first, then the data); empty when nothing did or nothing was recorded.
    pub fn changes(&self, meta: &HashMap<String, String>) -> Vec<String> {
        let mut out = Vec::new();
        if let Some((file, sha)) = &self.vae {
            if let Some(old) = meta.get(VAE_SHA256).filter(|old| *old != sha) {
                out.push(format!(
                    "the VAE differs ({} has sha256 {}, the run was trained with {})",
                    file.display(),
                    short(sha),
                    short(old)
                ));
            }
        }
        out.extend(self.data.changes(meta));
        out.extend(self.recipe_changes(meta));
        out
    }

    /// The recipe flags whose recorded value differs ("--recon-loss was mse, now l1"); a flag the
    /// checkpoint does not record (an older trainer) is not checked.
    fn recipe_changes(&self, meta: &HashMap<String, String>) -> Vec<String> {
        let old: serde_json::Map<String, serde_json::Value> =
            meta.get(RECIPE).and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default();
        self.recipe
            .iter()
            .filter_map(|(flag, now)| match old.get(*flag).and_then(|v| v.as_str()) {
                Some(was) if was != now => Some(format!("{flag} was {was}, now {now}")),
                _ => None,
            })
            .collect()
    }
}

/// The first 12 hex digits, for messages.
pub fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The error for a resume whose inputs changed: names the checkpoint, what changed, and the ways out.
pub fn changed_error(ckpt: &Path, stage: &str, changes: &[String]) -> TrainError {
    TrainError::Mismatch(format!(
        "cannot resume {}: {} since it was written; pass --force to start the {stage} stage afresh, or use a new --out",
        ckpt.display(),
        changes.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_recipe_is_named() {
        let data = DataIdentity { sha256: "ab".into(), limit: None };
        let run = |loss: &str| {
            RunIdentity::data(data.clone()).with_recipe(vec![("--recon-loss", loss.into()), ("--init", "tch".into())])
        };
        let mut meta = HashMap::new();
        run("mse").record(&mut meta);
        assert!(run("mse").changes(&meta).is_empty());
        assert_eq!(run("l1").changes(&meta), vec!["--recon-loss was mse, now l1".to_string()]);
        // A checkpoint without a recipe (older trainer) is not checked.
        meta.remove(RECIPE);
        assert!(run("l1").changes(&meta).is_empty());
    }

    #[test]
    fn sha256_of_known_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(file_sha256(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
