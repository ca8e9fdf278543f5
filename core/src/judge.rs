//! The judge: a small CNN classifier used to score generated images (class accuracy and a Fréchet
//! distance in its penultimate-layer features). This module holds the layout every crate shares:
//! the network's shape ([`JudgeConfig`]) and the `manifest.json` of its ONNX export ([`JudgeManifest`]).
//!
//! Graph contract of `judge.onnx`: input `image` [batch, channels, H, W] float32 in [−1, 1] (the same
//! tensors the VAE and the decoder see); outputs `logits` [batch, num_classes] and `features`
//! [batch, feature_dim] (the penultimate layer, after its activation).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::keys::KeySpec;
use crate::CoreError;

/// Value of the judge manifest's `format` field.
pub const JUDGE_FORMAT: &str = "spherear-judge";
/// Version of the judge manifest layout.
pub const JUDGE_VERSION: u32 = 1;
/// File name of the judge graph inside a judge export folder.
pub const JUDGE_GRAPH_FILE: &str = "judge.onnx";

/// Weights of a trained judge inside a trainer run folder (safetensors, keys of [`judge_keys`]).
pub const JUDGE_WEIGHTS_FILE: &str = "judge.safetensors";
/// The [`JudgeConfig`] of a trainer run folder.
pub const JUDGE_CONFIG_FILE: &str = "judge-config.json";
/// Training summary of a trainer run folder (`test_accuracy` among other fields).
pub const JUDGE_METRICS_FILE: &str = "judge-metrics.json";
/// Resumable training checkpoint of a trainer run folder.
pub const JUDGE_TRAIN_FILE: &str = "train-judge.safetensors";
/// External-data file of `judge.onnx` inside a judge export folder (keep it beside the graph).
pub const JUDGE_WEIGHTS_DATA_FILE: &str = "judge.weights.bin";
/// The `stage` metadata of judge weight and training files.
pub const JUDGE_STAGE: &str = "judge";

/// Key of the weight of conv block `i` (`[channels[i], in, 3, 3]`).
pub fn conv_weight_key(i: usize) -> String {
    format!("convs.{i}.weight")
}
/// Key of the bias of conv block `i` (`[channels[i]]`).
pub fn conv_bias_key(i: usize) -> String {
    format!("convs.{i}.bias")
}
/// Prefix of the feature layer (`fc.weight` `[feature_dim, flat_dim]`, `fc.bias`).
pub const FC_PREFIX: &str = "fc";
/// Prefix of the logits layer (`out.weight` `[num_classes, feature_dim]`, `out.bias`).
pub const OUT_PREFIX: &str = "out";

/// Every weight of a judge in layer order: `convs.{i}.weight/bias`, `fc.weight/bias`, `out.weight/bias`.
/// Linear weights are `[out, in]`, convolution kernels `[out, in, 3, 3]` (PyTorch layouts); `fc` reads the
/// last feature map flattened in C, H, W order.
pub fn judge_keys(cfg: &JudgeConfig) -> Vec<KeySpec> {
    let mut keys = Vec::with_capacity(2 * cfg.channels.len() + 4);
    let mut prev = cfg.in_channels;
    for (i, &c) in cfg.channels.iter().enumerate() {
        keys.push(KeySpec { name: conv_weight_key(i), shape: vec![c, prev, 3, 3] });
        keys.push(KeySpec { name: conv_bias_key(i), shape: vec![c] });
        prev = c;
    }
    for (p, out, inp) in [(FC_PREFIX, cfg.feature_dim, cfg.flat_dim()), (OUT_PREFIX, cfg.num_classes, cfg.feature_dim)]
    {
        keys.push(KeySpec { name: format!("{p}.weight"), shape: vec![out, inp] });
        keys.push(KeySpec { name: format!("{p}.bias"), shape: vec![out] });
    }
    keys
}

/// Shape of the judge CNN: `conv3x3 → ReLU → maxpool2` per entry of `channels`, then a linear layer of
/// `feature_dim` with ReLU (the features), then a linear layer to `num_classes` (the logits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JudgeConfig {
    pub image_size: usize,
    pub in_channels: usize,
    pub channels: Vec<usize>,
    pub feature_dim: usize,
    pub num_classes: usize,
}

impl JudgeConfig {
    /// The default judge for an image size and class count: channels 32, 64, 128 and 128 features.
    pub fn default_for(image_size: usize, num_classes: usize) -> Self {
        JudgeConfig { image_size, in_channels: 3, channels: vec![32, 64, 128], feature_dim: 128, num_classes }
    }

    pub fn validate(&self) -> Result<(), CoreError> {
        let err = |m: String| Err(CoreError::Config(m));
        if self.channels.is_empty() || self.channels.contains(&0) {
            return err(format!("judge channels must be non-empty and positive, got {:?}", self.channels));
        }
        // 2^blocks; a list of 64 or more blocks has no such usize (and no image size could fit it).
        let down = u32::try_from(self.channels.len()).ok().and_then(|n| 1usize.checked_shl(n));
        if self.image_size == 0 || down.is_none_or(|down| !self.image_size.is_multiple_of(down)) {
            return err(format!(
                "judge image_size {} must be a positive multiple of 2^{} (one max-pool per conv block)",
                self.image_size,
                self.channels.len()
            ));
        }
        if self.in_channels == 0 || self.feature_dim == 0 || self.num_classes < 2 {
            return err("judge in_channels and feature_dim must be ≥ 1 and num_classes ≥ 2".into());
        }
        Ok(())
    }

    /// Reads and validates a `judge-config.json`.
    pub fn load(path: &Path) -> Result<Self, CoreError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| CoreError::Io(format!("cannot read {}: {e}", path.display())))?;
        let c: JudgeConfig = serde_json::from_str(&text)
            .map_err(|e| CoreError::Config(format!("{}: invalid judge config: {e}", path.display())))?;
        c.validate()?;
        Ok(c)
    }

    /// Writes `judge-config.json` atomically.
    pub fn save(&self, path: &Path) -> Result<(), CoreError> {
        crate::fsutil::write_atomic(path, self.to_json().as_bytes())
    }

    /// Pretty JSON (also stored in the metadata of judge safetensors files).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Side of the last feature map (after every max-pool).
    pub fn final_side(&self) -> usize {
        self.image_size >> self.channels.len()
    }

    /// Inputs of the first linear layer: last channels × final side².
    pub fn flat_dim(&self) -> usize {
        self.channels.last().copied().unwrap_or(0) * self.final_side() * self.final_side()
    }
}

/// `manifest.json` of a judge export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeManifest {
    pub format: String,
    pub format_version: u32,
    pub producer: String,
    pub config: JudgeConfig,
    /// Graph file name inside the folder (normally [`JUDGE_GRAPH_FILE`]).
    pub file: String,
    /// Accuracy on the dataset's test split measured at training time, if known.
    #[serde(default)]
    pub test_accuracy: Option<f64>,
    /// Dataset the judge was trained on (e.g. `fashion-mnist`).
    #[serde(default)]
    pub dataset: String,
}

impl JudgeManifest {
    pub fn new(config: JudgeConfig, test_accuracy: Option<f64>, dataset: &str) -> Self {
        JudgeManifest {
            format: JUDGE_FORMAT.into(),
            format_version: JUDGE_VERSION,
            producer: format!("spherear exporter {}", env!("CARGO_PKG_VERSION")),
            config,
            file: JUDGE_GRAPH_FILE.into(),
            test_accuracy,
            dataset: dataset.into(),
        }
    }

    /// Reads `DIR/manifest.json` of a judge export and checks format, version and config.
    pub fn load(dir: &Path) -> Result<Self, CoreError> {
        let file = if dir.is_dir() { dir.join(crate::manifest::MANIFEST_FILE) } else { dir.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| {
            CoreError::Io(format!("cannot read {}: {e} (is this an `exporter judge` folder?)", file.display()))
        })?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| CoreError::Config(format!("{}: invalid JSON: {e}", file.display())))?;
        let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
        if format != JUDGE_FORMAT {
            return Err(CoreError::Config(format!(
                "{}: not a judge manifest (format '{format}', expected '{JUDGE_FORMAT}')",
                file.display()
            )));
        }
        let m: JudgeManifest = serde_json::from_value(value)
            .map_err(|e| CoreError::Config(format!("{}: invalid judge manifest: {e}", file.display())))?;
        if m.format_version != JUDGE_VERSION {
            return Err(CoreError::Config(format!(
                "{}: judge manifest version {} is not supported (this build reads {JUDGE_VERSION})",
                file.display(),
                m.format_version
            )));
        }
        m.config.validate()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_shapes() {
        let c = JudgeConfig::default_for(32, 10);
        c.validate().unwrap();
        assert_eq!(c.final_side(), 4);
        assert_eq!(c.flat_dim(), 128 * 16);
        assert!(JudgeConfig { image_size: 20, ..c.clone() }.validate().is_err());
        assert!(JudgeConfig { channels: vec![], ..c.clone() }.validate().is_err());
        // 64 blocks: 2^64 does not fit (a plain shift wrapped to 2^0 and let any image size through).
        assert!(JudgeConfig { channels: vec![32; 64], ..c.clone() }.validate().is_err());
        let keys = judge_keys(&c);
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(
            names,
            ["convs.0.weight", "convs.0.bias", "convs.1.weight", "convs.1.bias", "convs.2.weight", "convs.2.bias"]
                .into_iter()
                .chain(["fc.weight", "fc.bias", "out.weight", "out.bias"])
                .collect::<Vec<_>>()
        );
        assert_eq!(keys[2].shape, vec![64, 32, 3, 3]);
        assert_eq!(keys[6].shape, vec![128, 2048]);
        assert_eq!(keys[8].shape, vec![10, 128]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(JUDGE_CONFIG_FILE);
        c.save(&p).unwrap();
        assert_eq!(JudgeConfig::load(&p).unwrap(), c);
    }

    #[test]
    fn manifest_round_trip_and_format_check() {
        let dir = tempfile::tempdir().unwrap();
        let m = JudgeManifest::new(JudgeConfig::default_for(32, 10), Some(0.91), "fashion-mnist");
        std::fs::write(dir.path().join("manifest.json"), serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(JudgeManifest::load(dir.path()).unwrap(), m);
        std::fs::write(dir.path().join("manifest.json"), r#"{"format":"spherear-onnx"}"#).unwrap();
        assert!(JudgeManifest::load(dir.path()).unwrap_err().to_string().contains("not a judge manifest"));
    }
}
