//! The judge classifier (quality evaluation): `conv3x3 → ReLU → maxpool2` per entry of
//! [`JudgeConfig::channels`], then `fc` (+ ReLU, the features) and `out` (the logits). Weight names are
//! core's [`judge_keys`], shared with the exporter.

use std::path::Path;

use spherear_core::judge::{JudgeConfig, FC_PREFIX, JUDGE_CONFIG_FILE, JUDGE_STAGE, JUDGE_WEIGHTS_FILE, OUT_PREFIX};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Tensor};

use crate::checkpoint;
use crate::error::{Result, TrainError};

/// The network (weights live in the var store it was built on).
#[derive(Debug)]
pub struct Judge {
    pub convs: Vec<nn::Conv2D>,
    pub fc: nn::Linear,
    pub out: nn::Linear,
}

impl Judge {
    /// Builds the layers under `vs` (names `convs.{i}.weight/bias`, `fc.*`, `out.*` relative to `vs`).
    pub fn new(vs: &nn::Path, cfg: &JudgeConfig) -> Self {
        let conv_cfg = nn::ConvConfig { padding: 1, ..Default::default() };
        let mut prev = cfg.in_channels as i64;
        let mut convs = Vec::with_capacity(cfg.channels.len());
        for (i, &c) in cfg.channels.iter().enumerate() {
            convs.push(nn::conv2d(vs / "convs" / i, prev, c as i64, 3, conv_cfg));
            prev = c as i64;
        }
        let fc = nn::linear(vs / FC_PREFIX, cfg.flat_dim() as i64, cfg.feature_dim as i64, Default::default());
        let out = nn::linear(vs / OUT_PREFIX, cfg.feature_dim as i64, cfg.num_classes as i64, Default::default());
        Judge { convs, fc, out }
    }

    /// `image` [B, in_channels, H, W] in [−1, 1] → (logits [B, num_classes], features [B, feature_dim]).
    pub fn forward(&self, image: &Tensor) -> (Tensor, Tensor) {
        let mut x = image.shallow_clone();
        for c in &self.convs {
            x = c.forward(&x).relu().max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        }
        let features = self.fc.forward(&x.flatten(1, -1)).relu();
        (self.out.forward(&features), features)
    }
}

/// A judge with its own var store and config.
pub struct JudgeModel {
    pub vs: VarStore,
    pub net: Judge,
    pub config: JudgeConfig,
}

impl JudgeModel {
    /// A randomly initialised judge (PyTorch default initialisation; seed with `tch::manual_seed`).
    pub fn new(config: &JudgeConfig) -> Result<Self> {
        config.validate()?;
        let vs = VarStore::new(Device::Cpu);
        let net = Judge::new(&vs.root(), config);
        Ok(JudgeModel { vs, net, config: config.clone() })
    }

    /// Loads a run folder (`judge.safetensors` + `judge-config.json`) or a `judge.safetensors` file
    /// (its config from the metadata).
    pub fn load(path: &Path) -> Result<Self> {
        let (file_path, config) = if path.is_dir() {
            (path.join(JUDGE_WEIGHTS_FILE), Some(JudgeConfig::load(&path.join(JUDGE_CONFIG_FILE))?))
        } else {
            (path.to_path_buf(), None)
        };
        let file = checkpoint::load(&file_path)?;
        let ck = |msg: String| TrainError::Checkpoint { path: file_path.display().to_string(), msg };
        if file.meta(&file_path, "stage")? != JUDGE_STAGE {
            return Err(ck("is not a judge weights file".into()));
        }
        let stored: JudgeConfig = file.stage_config(&file_path)?;
        if let Some(c) = &config {
            if *c != stored {
                return Err(ck(format!("was written for judge config {stored:?} but {JUDGE_CONFIG_FILE} says {c:?}")));
            }
        }
        let m = JudgeModel::new(&stored)?;
        checkpoint::load_into(&m.vs, &file.tensors, "", &format!("checkpoint {}", file_path.display()))?;
        Ok(m)
    }

    /// The weights under core's key names (detached copies).
    pub fn weights(&self) -> std::collections::BTreeMap<String, Tensor> {
        checkpoint::named_tensors(&self.vs, "")
    }

    /// Writes `judge.safetensors` (metadata: format, stage `judge`, config JSON) atomically.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        checkpoint::save_weights(path, JUDGE_STAGE, &self.config, self.weights())
    }

    /// Writes `judge.safetensors` and `judge-config.json` into `dir` (created if needed): the folder
    /// `exporter judge --checkpoint` reads.
    pub fn save_folder(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::Io(format!("cannot create {}: {e}", dir.display())))?;
        self.config.save(&dir.join(JUDGE_CONFIG_FILE))?;
        self.save_weights(&dir.join(JUDGE_WEIGHTS_FILE))
    }

    /// Inference: (logits, features) without gradients.
    pub fn forward(&self, image: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| self.net.forward(image))
    }
}
