//! `trainer fit --stage ar`: trains the AR transformer and diffusion head on frozen S-VAE latents.
//!
//! Latent caching: the frozen encoder runs once over the training set and its posterior parameters
//! (μ, κ per token) are kept in `<out>/latents.safetensors`; every step draws a fresh Power Spherical
//! sample from them (scaled to radius R), which is what the official code sees when it encodes each batch
//! anew (minus flip augmentation, which is not used for Fashion-MNIST). The cache is stamped with the
//! VAE's SHA-256 and the data identity ([`crate::identity`]) and rebuilt when either changes.
//!
//! The training checkpoint records the same identities: resuming with another `--vae`, `--data` or
//! `--limit` is an error (`--force` starts the stage afresh), so the cached latents, the transformer and
//! the VAE shipped in `ar.safetensors` always belong together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use spherear_core::data::{self, DataSource, Split};
use spherear_core::validate::in_range;
use spherear_core::ModelConfig;
use tch::{Kind, Tensor};

use crate::ar::ArModel;
use crate::checkpoint::{self, TensorFile};
use crate::error::{Result, TrainError};
use crate::fit_vae::{self, batch_tensor, VaeModel};
use crate::fitloop::{self, FitSummary, Plan, Stage, StageFiles, TrainArgs};
use crate::identity::{self, DataIdentity, RunIdentity};
use crate::optim::{AdamW, AdamWConfig};
use crate::progress;
use crate::psd::PowerSpherical;

/// Loop settings of the AR stage unless given.
pub const TRAIN_DEFAULTS: TrainArgs = TrainArgs::DEFAULT;
/// EMA decay of the shipped weights unless given.
pub const DEFAULT_EMA_DECAY: f64 = 0.999;

/// Settings of the AR stage.
#[derive(Debug, Clone)]
pub struct ArFitArgs {
    /// Run folder of a finished VAE stage (vae.safetensors + config.json).
    pub vae: PathBuf,
    /// Preset of the AR model; its VAE part must equal the VAE run's.
    pub preset: String,
    pub data: DataSource,
    pub out: PathBuf,
    pub train: TrainArgs,
    pub ema_decay: f64,
}

impl ArFitArgs {
    pub fn new(vae: PathBuf, preset: &str, data: DataSource, out: PathBuf) -> Self {
        ArFitArgs { vae, preset: preset.to_string(), data, out, train: TRAIN_DEFAULTS, ema_decay: DEFAULT_EMA_DECAY }
    }

    /// Checks every value (the messages name the command-line flags).
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        in_range("--ema-decay", self.ema_decay, 0.0, 1.0)?;
        Ok(())
    }
}

/// The latents cache of a run folder.
pub fn latents_path(out: &Path) -> PathBuf {
    out.join(LATENTS_FILE)
}

const LATENTS_FILE: &str = "latents.safetensors";

#[derive(Debug, Clone, serde::Serialize)]
pub struct ArFitReport {
    #[serde(flatten)]
    pub run: FitSummary,
    /// Time spent encoding the training set (0 when the cache was reused).
    pub latent_seconds: f64,
}

/// Posterior parameters of a whole dataset.
pub struct Latents {
    pub mu: Tensor,
    pub kappa: Tensor,
    pub labels: Tensor,
}

impl Latents {
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A fresh posterior sample on the radius-R sphere for the images `idx`: ([B, L, d], labels [B]).
    pub fn sample(&self, idx: &[usize], radius: f64) -> (Tensor, Tensor) {
        let i = Tensor::from_slice(&idx.iter().map(|&v| v as i64).collect::<Vec<_>>());
        let q = PowerSpherical::new(&self.mu.index_select(0, &i), &self.kappa.index_select(0, &i));
        (tch::no_grad(|| q.rsample() * radius), self.labels.index_select(0, &i))
    }
}

/// Encodes a dataset with the frozen VAE (batches of 200), or reads the cache when its stamp equals
/// `stamp` (the VAE's SHA-256 and the data identity).
pub fn encode_dataset(vae: &VaeModel, stamp: &str, args: &ArFitArgs, cache: &Path) -> Result<Latents> {
    if let Ok(f) = checkpoint::load(cache) {
        if f.metadata.get("stamp").map(String::as_str) == Some(stamp) {
            if let (Some(mu), Some(kappa), Some(labels)) =
                (f.tensors.get("mu"), f.tensors.get("kappa"), f.tensors.get("labels"))
            {
                eprintln!("using cached latents {}", cache.display());
                let labels = labels.to_kind(Kind::Int64);
                return Ok(Latents { mu: mu.shallow_clone(), kappa: kappa.shallow_clone(), labels });
            }
        }
    }
    let ds = data::load(&args.data, Split::Train, vae.config.image_size, args.train.limit)?;
    let n = ds.len();
    let bar = progress::bar(n as u64, 0, "encode", args.train.progress);
    let (mut mus, mut kappas) = (Vec::new(), Vec::new());
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let x = batch_tensor(&ds, chunk, None);
        let p = tch::no_grad(|| vae.vae.posterior(&x));
        mus.push(p.mu);
        kappas.push(p.kappa);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let lat =
        Latents { mu: Tensor::cat(&mus, 0), kappa: Tensor::cat(&kappas, 0), labels: Tensor::from_slice(&ds.labels) };
    let mut f = TensorFile::default();
    f.tensors.insert("mu".into(), lat.mu.shallow_clone());
    f.tensors.insert("kappa".into(), lat.kappa.shallow_clone());
    f.tensors.insert("labels".into(), lat.labels.to_kind(Kind::Float));
    f.metadata.insert("stamp".into(), stamp.to_string());
    checkpoint::save(cache, &f)?;
    Ok(lat)
}

/// Names of the trained (non-VAE) weights.
pub fn is_ar_key(name: &str) -> bool {
    !name.starts_with("vae.")
}

/// The AR trainer: model, optimizer and EMA of the AR weights.
pub struct ArTrainer {
    pub model: ArModel,
    pub opt: AdamW,
    pub ema: BTreeMap<String, Tensor>,
}

impl ArTrainer {
    /// A fresh AR model around a (frozen) VAE.
    pub fn new(cfg: &ModelConfig, vae: Option<&VaeModel>) -> Result<Self> {
        let model = ArModel::new(cfg)?;
        if let Some(v) = vae {
            checkpoint::load_into(&model.vs, &checkpoint::named_tensors(&v.vs, "vae."), "vae.", "the VAE")?;
        }
        for (name, t) in model.vs.variables() {
            if !is_ar_key(&name) {
                let _ = t.set_requires_grad(false);
            }
        }
        let opt = AdamW::new(&model.vs, is_ar_key, AdamWConfig::default());
        let ema = checkpoint::named_tensors(&model.vs, "").into_iter().filter(|(n, _)| is_ar_key(n)).collect();
        Ok(ArTrainer { model, opt, ema })
    }

    /// One step of the rectified-flow loss on tokens z [B, L, d] with class ids [B] (after dropout).
    pub fn step(&mut self, z: &Tensor, labels: &Tensor, lr: f64, clip: f64, ema_decay: f64) -> f64 {
        let cfg = &self.model.config;
        let (dim, d, mul) = (cfg.ar.dim as i64, cfg.latent_dim as i64, cfg.ar.diff_batch_mul as i64);
        self.opt.zero_grad();
        let cond = self.model.ar.conditions(z, labels).reshape([-1, dim]).repeat([mul, 1]);
        let target = z.reshape([-1, d]).repeat([mul, 1]);
        let loss = self.model.ar.head.loss(&target, &cond);
        loss.backward();
        self.opt.clip_grad_norm(clip);
        self.opt.step(lr);
        // EMA with the usual warm-up: decay_t = min(decay, (1 + t)/(10 + t)).
        let t = self.opt.step as f64;
        let decay = ema_decay.min((1.0 + t) / (10.0 + t));
        let vars = self.model.vs.variables();
        tch::no_grad(|| {
            for (name, e) in self.ema.iter_mut() {
                if let Some(p) = vars.get(name) {
                    let _ = e.g_mul_scalar_(decay);
                    let _ = e.g_add_(&(p * (1.0 - decay)));
                }
            }
        });
        loss.double_value(&[])
    }

    /// Replaces class ids by the null class with probability p.
    pub fn drop_labels(&self, labels: &Tensor, p: f64) -> Tensor {
        let drop = Tensor::rand([labels.size()[0]], (Kind::Float, tch::Device::Cpu)).lt(p);
        labels.where_self(&drop.logical_not(), &labels.full_like(self.model.config.null_class() as i64))
    }

    /// The official-layout weights to ship: EMA AR weights + the VAE.
    pub fn export_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut t = checkpoint::named_tensors(&self.model.vs, "vae.");
        t.extend(self.ema.iter().map(|(n, e)| (n.clone(), e.shallow_clone())));
        t
    }
}

pub fn train_ckpt_path(out: &Path) -> PathBuf {
    out.join(ArStage::FILES.checkpoint)
}

/// The number of classes of the training data, checked against the preset (before any work: an extra
/// class would be trained as the null class, and more would fail inside libtorch after encoding).
fn check_class_count(data: &DataSource, config: &ModelConfig) -> Result<()> {
    let n = data::num_classes(data, Split::Train)?;
    if n > config.num_classes {
        return Err(TrainError::Mismatch(format!(
            "--data {} has {n} classes but preset '{}' has {} (num_classes); use a preset with at least {n} classes",
            crate::fit_judge::dataset_name(data),
            config.name,
            config.num_classes
        )));
    }
    Ok(())
}

/// Trains (or resumes) the AR stage.
///
/// Before any work: the values, the VAE run and the preset, the class count of the data, and the run's
/// earlier state ([`fitloop::fit`]: a finished stage returns at once with `already_finished` and touches
/// no file; a checkpoint made with another VAE, data or `--limit` is an error). With `force` the stage's
/// files ([`ArStage::FILES`]) are removed and it starts afresh.
pub fn fit_ar(args: &ArFitArgs, stop: &AtomicBool) -> Result<ArFitReport> {
    fitloop::fit::<ArStage>(args, stop)
}

/// The AR stage for [`fitloop::fit`]: the trainer and the cached latents.
pub struct ArStage {
    args: ArFitArgs,
    tr: ArTrainer,
    latents: Latents,
    latent_seconds: f64,
    /// Smoothed loss, for the progress message.
    smooth: Option<f64>,
}

impl Stage for ArStage {
    const NAME: &'static str = "ar";
    const TITLE: &'static str = "AR";
    const FILES: StageFiles = StageFiles {
        checkpoint: "train-ar.safetensors",
        weights: "ar.safetensors",
        metrics: "ar-metrics.json",
        others: &[LATENTS_FILE],
    };
    type Config = ModelConfig;
    type Args = ArFitArgs;
    /// The frozen VAE.
    type Checked = VaeModel;
    /// Nothing: the data is encoded (or the cache read) once the folder exists.
    type Loaded = ();
    type Report = ArFitReport;

    fn plan(args: &ArFitArgs) -> Result<(Plan<'_, ModelConfig>, VaeModel)> {
        args.validate()?;
        let vae_file = fit_vae::weights_path(&args.vae);
        if !vae_file.exists() {
            return Err(TrainError::Checkpoint {
                path: vae_file.display().to_string(),
                msg: "not found: train the VAE first (trainer fit --stage vae)".into(),
            });
        }
        let vae = VaeModel::load(&vae_file, None)?;
        let config = ModelConfig::preset(&args.preset)?;
        if !config.same_vae(&vae.config) {
            return Err(TrainError::Checkpoint {
                path: vae_file.display().to_string(),
                msg: format!(
                    "its VAE (preset '{}') differs from the VAE of preset '{}' (image size, patch, latent or VAE widths)",
                    vae.config.name, config.name
                ),
            });
        }
        fit_vae::check_run_folder(&args.out, &config)?;
        check_class_count(&args.data, &config)?;
        let vae_sha = identity::file_sha256(&vae_file)?;
        let data = DataIdentity::of(&args.data, args.train.limit)?;
        let identity = RunIdentity { data, vae: Some((vae_file, vae_sha)) };
        // config.json is written with the weights (ArModel::save_tensors).
        Ok((Plan { out: &args.out, train: &args.train, config, identity, config_file: None }, vae))
    }

    fn finished(_: &ArFitArgs, _: &Plan<'_, ModelConfig>, run: FitSummary) -> ArFitReport {
        ArFitReport { run, latent_seconds: 0.0 }
    }

    fn load(_: &ArFitArgs, _: &Plan<'_, ModelConfig>) -> Result<()> {
        Ok(())
    }

    fn build(args: &ArFitArgs, plan: &Plan<'_, ModelConfig>, vae: VaeModel, _: ()) -> Result<Self> {
        let t_lat = std::time::Instant::now();
        let vae_sha = plan.identity.vae.as_ref().map_or("", |(_, sha)| sha.as_str());
        let stamp = format!("vae sha256 {vae_sha}, {}", plan.identity.data.stamp());
        let latents = encode_dataset(&vae, &stamp, args, &latents_path(&args.out))?;
        let latent_seconds = t_lat.elapsed().as_secs_f64();
        let tr = ArTrainer::new(&plan.config, Some(&vae))?;
        Ok(ArStage { args: args.clone(), tr, latents, latent_seconds, smooth: None })
    }

    fn examples(&self) -> usize {
        self.latents.len()
    }

    fn step(&mut self, step: usize, batch: &[usize]) -> Result<(f64, String)> {
        let (a, cfg) = (&self.args, &self.tr.model.config);
        let (z, labels) = self.latents.sample(batch, cfg.radius() as f64);
        let labels = self.tr.drop_labels(&labels, cfg.ar.class_dropout);
        let lr = a.train.lr_at(step);
        let loss = self.tr.step(&z, &labels, lr, a.train.clip, a.ema_decay);
        let sm = self.smooth.map_or(loss, |v| 0.98 * v + 0.02 * loss);
        self.smooth = Some(sm);
        Ok((loss, format!("loss {loss:.4} (avg {sm:.4}) lr {lr:.1e}")))
    }

    /// The AR weights, the AdamW moments and the EMA (`ema.*`).
    fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor> {
        let tr = &self.tr;
        let mut t: BTreeMap<String, Tensor> =
            checkpoint::named_tensors(&tr.model.vs, "").into_iter().filter(|(n, _)| is_ar_key(n)).collect();
        t.extend(tr.opt.state());
        t.extend(tr.ema.iter().map(|(n, e)| (format!("ema.{n}"), e.shallow_clone())));
        t
    }

    fn restore(&mut self, file: &TensorFile, step: usize, path: &Path) -> Result<()> {
        let (tr, what) = (&mut self.tr, format!("checkpoint {}", path.display()));
        for (name, var) in tr.model.vs.variables().into_iter().filter(|(n, _)| is_ar_key(n)) {
            let src = file.tensors.get(&name).ok_or_else(|| TrainError::Mismatch(format!("{what} lacks {name}")))?;
            let ema = file
                .tensors
                .get(&format!("ema.{name}"))
                .ok_or_else(|| TrainError::Mismatch(format!("{what} lacks ema.{name}")))?;
            if src.size() != var.size() || ema.size() != var.size() {
                return Err(TrainError::Mismatch(format!(
                    "{what}: {name} has shape {:?}, expected {:?}",
                    src.size(),
                    var.size()
                )));
            }
            tch::no_grad(|| {
                let mut v = var.shallow_clone();
                v.copy_(src);
            });
            if let Some(e) = tr.ema.get_mut(&name) {
                tch::no_grad(|| e.copy_(ema));
            }
        }
        tr.opt
            .load_state(&file.tensors, step as i64)
            .map_err(|msg| TrainError::Checkpoint { path: path.display().to_string(), msg })
    }

    fn report(&self, run: FitSummary) -> ArFitReport {
        ArFitReport { run, latent_seconds: self.latent_seconds }
    }

    /// Writes `ar.safetensors` (the EMA weights + the VAE) and `config.json` beside it.
    fn finish(&mut self, run: FitSummary, _weights: &Path) -> Result<ArFitReport> {
        self.tr.model.save_tensors(&self.args.out, self.tr.export_tensors(), Self::NAME)?;
        Ok(self.report(run))
    }
}
