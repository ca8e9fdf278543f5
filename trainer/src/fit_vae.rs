//! `trainer fit --stage vae`: reconstruction (`--recon-loss`: L1 or MSE) + KL-to-uniform training of the
//! S-VAE (or, with `--posterior gaussian`, reconstruction + KL-to-N(0, I) training of the diagonal-Gaussian
//! baseline).
//!
//! Not included, and why: the paper's perceptual (LPIPS/VGG) loss needs pretrained weights that cannot be
//! fetched here, so it is left out rather than faked; the PatchGAN adversarial loss is not implemented yet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use rand_chacha::ChaCha8Rng;
use spherear_core::data::{self, DataSource, Dataset, Split};
use spherear_core::validate::{at_least, non_negative};
use spherear_core::{ModelConfig, Posterior};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::checkpoint::{self, StageConfig, TensorFile};
use crate::error::Result;
use crate::fitloop::{self, FitSummary, Plan, Stage, StageFiles, TrainArgs};
use crate::identity::{DataIdentity, RunIdentity};
use crate::layers::{reset_pytorch_default, InitScheme};
use crate::optim::{AdamW, AdamWConfig};
use crate::recipe::{Recipe, ReconLoss};
use crate::vae::{has_framework_default_init, Vae};

/// Loop settings of the VAE stage unless given.
pub const TRAIN_DEFAULTS: TrainArgs = TrainArgs::DEFAULT;
/// Weight of the KL term unless given (Power Spherical posterior: the paper's S-04).
pub const DEFAULT_KL_WEIGHT: f64 = 0.004;
/// Weight of the KL term of the Gaussian posteriors unless given: 0.01, the paper's G-01. The paper averages
/// the Gaussian KL over all elements rather than summing it (footnote 2: its 1e-2 matches a conventional
/// summed weight of ~2e-6); both loss terms here are such means, so the weight carries over unchanged to
/// other image and token-grid sizes.
pub const DEFAULT_GAUSSIAN_KL_WEIGHT: f64 = 0.01;

/// The KL weight of `posterior` unless given.
pub fn default_kl_weight(posterior: Posterior) -> f64 {
    match posterior {
        Posterior::PowerSpherical => DEFAULT_KL_WEIGHT,
        Posterior::Gaussian | Posterior::GaussianNorm => DEFAULT_GAUSSIAN_KL_WEIGHT,
    }
}
/// Held-out images scored for PSNR unless given.
pub const DEFAULT_EVAL_IMAGES: usize = 1000;

/// Settings of the VAE stage.
#[derive(Debug, Clone)]
pub struct VaeFitArgs {
    pub preset: String,
    pub data: DataSource,
    pub out: PathBuf,
    pub train: TrainArgs,
    /// Posterior family (recorded in the run's config).
    pub posterior: Posterior,
    pub kl_weight: f64,
    pub flip: bool,
    /// Held-out images scored for PSNR at the end.
    pub eval_images: usize,
    /// The training recipe (`--recon-loss`, `--init`, `--decay-groups`; [`crate::recipe`]).
    pub recipe: Recipe,
}

impl VaeFitArgs {
    pub fn new(preset: &str, data: DataSource, out: PathBuf) -> Self {
        VaeFitArgs {
            preset: preset.to_string(),
            data,
            out,
            train: crate::recipe::vae_train_defaults(preset, TRAIN_DEFAULTS),
            recipe: Recipe::for_preset(preset),
            posterior: Posterior::PowerSpherical,
            kl_weight: DEFAULT_KL_WEIGHT,
            flip: false,
            eval_images: DEFAULT_EVAL_IMAGES,
        }
    }

    /// The same settings for another posterior family, with that family's default KL weight.
    pub fn with_posterior(self, posterior: Posterior) -> Self {
        VaeFitArgs { posterior, kl_weight: default_kl_weight(posterior), ..self }
    }

    /// Checks every value (the messages name the command-line flags).
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        non_negative("--kl-weight", self.kl_weight)?;
        at_least("--eval-images", self.eval_images, 1)?;
        Ok(())
    }
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VaeFitReport {
    #[serde(flatten)]
    pub run: FitSummary,
    /// PSNR (dB) of held-out reconstructions from the posterior mode (R·μ; Gaussian: μ).
    pub psnr_mode_db: Option<f64>,
    /// PSNR (dB) from one posterior sample per token.
    pub psnr_sample_db: Option<f64>,
}

/// Loss terms of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub loss: f64,
    pub recon: f64,
    pub kl: f64,
    pub grad_norm: f64,
}

/// The S-VAE with its var store (weights under `vae.*`).
pub struct VaeModel {
    pub vs: VarStore,
    pub vae: Vae,
    pub config: ModelConfig,
}

impl VaeModel {
    pub fn new(config: &ModelConfig) -> Result<Self> {
        let vs = VarStore::new(Device::Cpu);
        let vae = Vae::new(vs.root() / "vae", config)?;
        Ok(VaeModel { vs, vae, config: config.clone() })
    }

    /// A fresh VAE whose framework-default layers follow `init` ([`crate::layers::InitScheme`]).
    pub fn with_init(config: &ModelConfig, init: InitScheme) -> Result<Self> {
        let m = Self::new(config)?;
        if init == InitScheme::Pytorch {
            let select = |n: &str, t: &Tensor| n.strip_prefix("vae.").is_some_and(|r| has_framework_default_init(r, t));
            reset_pytorch_default(&m.vs, select);
        }
        Ok(m)
    }

    /// Loads a weights file or a training checkpoint whose config must equal `config` when given.
    pub fn load(path: &Path, config: Option<&ModelConfig>) -> Result<Self> {
        let file = checkpoint::load(path)?;
        let stored = file.config(path)?;
        if let Some(c) = config {
            checkpoint::check_stage_config(path, "vae", &stored, c)?;
        }
        let m = VaeModel::new(&stored)?;
        checkpoint::load_into(&m.vs, &file.tensors, "vae.", &format!("checkpoint {}", path.display()))?;
        Ok(m)
    }

    pub fn save_weights(&self, path: &Path) -> Result<()> {
        checkpoint::save_weights(path, VaeStage::NAME, &self.config, checkpoint::named_tensors(&self.vs, "vae."))
    }

    /// Reconstructs a batch [N, 3, H, W]; `sample` draws from the posterior, otherwise uses its mode.
    pub fn reconstruct(&self, images: &Tensor, sample: bool) -> Tensor {
        tch::no_grad(|| {
            let z = if sample { self.vae.encode(images).0 } else { self.vae.encode_mode(images) };
            self.vae.decode(&z)
        })
    }
}

/// PSNR in dB of a mean squared error of images in [−1, 1] (peak-to-peak 2): 10·log10(4 / mse).
fn psnr_db(mse: f64) -> f64 {
    10.0 * (4.0 / mse.max(1e-12)).log10()
}

/// One optimisation step of reconstruction (`recon_loss`) + kl_weight · KL.
pub fn train_step(
    m: &VaeModel,
    opt: &mut AdamW,
    images: &Tensor,
    kl_weight: f64,
    clip: f64,
    lr: f64,
    recon_loss: ReconLoss,
) -> StepStats {
    opt.zero_grad();
    let (z, kl) = m.vae.encode(images);
    let recon = m.vae.decode(&z);
    let rec = recon_loss.loss(&recon, images);
    let loss = &rec + &kl * kl_weight;
    loss.backward();
    let grad_norm = opt.clip_grad_norm(clip);
    opt.step(lr);
    StepStats { loss: loss.double_value(&[]), recon: rec.double_value(&[]), kl: kl.double_value(&[]), grad_norm }
}

/// A batch of dataset images as a tensor [B, 3, S, S].
pub fn batch_tensor(ds: &Dataset, idx: &[usize], flip: Option<&mut ChaCha8Rng>) -> Tensor {
    let mut buf = Vec::new();
    ds.gather_batch(idx, &mut buf, flip);
    let s = ds.size as i64;
    Tensor::from_slice(&buf).view([idx.len() as i64, 3, s, s])
}

pub fn train_ckpt_path(out: &Path) -> PathBuf {
    out.join(VaeStage::FILES.checkpoint)
}

pub fn weights_path(out: &Path) -> PathBuf {
    out.join(VaeStage::FILES.weights)
}

/// Resolves the run's config (the preset with the posterior family): an existing run folder fixes it (and
/// must match the preset and posterior asked for).
pub fn run_config(out: &Path, preset: &str, posterior: Posterior) -> Result<ModelConfig> {
    let mut wanted = ModelConfig::preset(preset)?;
    wanted.vae.posterior = posterior;
    check_run_folder(out, &wanted)?;
    Ok(wanted)
}

/// Checks the run folder's `config.json`, if there is one, against `wanted`: the preset name and the VAE
/// part must agree (the VAE and AR stages share the folder).
pub fn check_run_folder(out: &Path, wanted: &ModelConfig) -> Result<()> {
    let cfg_path = out.join("config.json");
    if cfg_path.exists() {
        ModelConfig::check(&cfg_path, VaeStage::NAME, &ModelConfig::load(&cfg_path)?, wanted)?;
    }
    Ok(())
}

/// Trains (or resumes) the VAE stage; `stop` is polled every step (Ctrl-C) and triggers a checkpoint.
///
/// Before any work: the values, the preset against the run folder, the data, and the run's earlier state
/// ([`fitloop::fit`]: a finished stage returns at once with `already_finished` and touches no file; a
/// checkpoint made from other data is an error). With `force` the stage's files
/// ([`VaeStage::FILES`]) are removed and it starts afresh.
pub fn fit_vae(args: &VaeFitArgs, stop: &AtomicBool) -> Result<VaeFitReport> {
    fitloop::fit::<VaeStage>(args, stop)
}

/// The VAE stage for [`fitloop::fit`]: model, optimizer, the training and held-out images.
pub struct VaeStage {
    args: VaeFitArgs,
    m: VaeModel,
    opt: AdamW,
    train: Dataset,
    held_out: Dataset,
    /// Smoothed reconstruction loss, for the progress message.
    smooth: Option<f64>,
}

impl Stage for VaeStage {
    const NAME: &'static str = "vae";
    const TITLE: &'static str = "VAE";
    /// `config.json` is shared with the AR stage and is not among them.
    const FILES: StageFiles = StageFiles {
        checkpoint: "train-vae.safetensors",
        weights: "vae.safetensors",
        metrics: "vae-metrics.json",
        others: &["vae-recon.png"],
    };
    type Config = ModelConfig;
    type Args = VaeFitArgs;
    type Checked = ();
    /// The training images and the held-out ones.
    type Loaded = (Dataset, Dataset);
    type Report = VaeFitReport;

    fn plan(args: &VaeFitArgs) -> Result<(Plan<'_, ModelConfig>, ())> {
        args.validate()?;
        let config = run_config(&args.out, &args.preset, args.posterior)?;
        let identity = RunIdentity::data(DataIdentity::of(&args.data, args.train.limit)?)
            .with_recipe(args.recipe.vae_record(&args.train));
        Ok((Plan { out: &args.out, train: &args.train, config, identity, config_file: Some("config.json") }, ()))
    }

    fn finished(_: &VaeFitArgs, _: &Plan<'_, ModelConfig>, run: FitSummary) -> VaeFitReport {
        VaeFitReport { run, psnr_mode_db: None, psnr_sample_db: None }
    }

    fn load(args: &VaeFitArgs, plan: &Plan<'_, ModelConfig>) -> Result<(Dataset, Dataset)> {
        let size = plan.config.image_size;
        let train = data::load(&args.data, Split::Train, size, args.train.limit)?;
        Ok((train, data::load(&args.data, Split::Test, size, Some(args.eval_images))?))
    }

    fn build(args: &VaeFitArgs, plan: &Plan<'_, ModelConfig>, _: (), loaded: (Dataset, Dataset)) -> Result<Self> {
        let m = VaeModel::with_init(&plan.config, args.recipe.init)?;
        let opt_cfg = AdamWConfig { groups: args.recipe.decay_groups, ..AdamWConfig::default() };
        let opt = AdamW::new(&m.vs, |n| n.starts_with("vae."), opt_cfg);
        let (train, held_out) = loaded;
        Ok(VaeStage { args: args.clone(), m, opt, train, held_out, smooth: None })
    }

    fn examples(&self) -> usize {
        self.train.len()
    }

    fn step(&mut self, step: usize, batch: &[usize]) -> Result<(f64, String)> {
        let (a, ta) = (&self.args, &self.args.train);
        let mut flip_rng = a.flip.then(|| fitloop::step_rng(ta.seed, step));
        let x = batch_tensor(&self.train, batch, flip_rng.as_mut());
        let lr = ta.lr_at(step);
        let s = train_step(&self.m, &mut self.opt, &x, a.kl_weight, ta.clip, lr, a.recipe.recon_loss);
        let sm = self.smooth.map_or(s.recon, |v| 0.95 * v + 0.05 * s.recon);
        self.smooth = Some(sm);
        let db = psnr_db(sm);
        Ok((s.loss, format!("loss {:.4} rec {:.4} kl {:.2} ~{db:.1} dB lr {lr:.1e}", s.loss, s.recon, s.kl)))
    }

    fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor> {
        checkpoint::train_tensors(&self.m.vs, "vae.", &self.opt)
    }

    fn restore(&mut self, file: &TensorFile, step: usize, path: &Path) -> Result<()> {
        checkpoint::restore_train(&self.m.vs, "vae.", &mut self.opt, file, step, path)
    }

    fn report(&self, run: FitSummary) -> VaeFitReport {
        VaeFitReport { run, psnr_mode_db: None, psnr_sample_db: None }
    }

    fn finish(&mut self, run: FitSummary, weights: &Path) -> Result<VaeFitReport> {
        self.m.save_weights(weights)?;
        // The posterior samples of the evaluation do not depend on where the training stopped.
        tch::manual_seed(self.args.train.seed as i64);
        let (pm, ps) = evaluate(&self.m, &self.held_out, &self.args.out.join("vae-recon.png"))?;
        Ok(VaeFitReport { run, psnr_mode_db: Some(pm), psnr_sample_db: Some(ps) })
    }
}

/// Held-out PSNR (mode, sample) and a PNG: rows alternate 8 originals and their reconstructions.
pub fn evaluate(m: &VaeModel, held_out: &Dataset, png: &Path) -> Result<(f64, f64)> {
    let n = held_out.len();
    let (mut se_mode, mut se_sample) = (0.0, 0.0);
    let mut shown: Vec<f32> = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let x = batch_tensor(held_out, chunk, None);
        let rm = m.reconstruct(&x, false).clamp(-1.0, 1.0);
        let rs = m.reconstruct(&x, true).clamp(-1.0, 1.0);
        let w = chunk.len() as f64;
        se_mode += (&rm - &x).square().mean(Kind::Float).double_value(&[]) * w;
        se_sample += (&rs - &x).square().mean(Kind::Float).double_value(&[]) * w;
        if shown.is_empty() {
            let k = chunk.len().min(16) as i64;
            for g in 0..(k + 7) / 8 {
                let c = 8.min(k - g * 8);
                for t in [&x, &rm] {
                    shown.extend(Vec::<f32>::try_from(t.narrow(0, g * 8, c).flatten(0, -1))?);
                }
            }
        }
    }
    let to_db = |se: f64| psnr_db(se / n as f64);
    let s = held_out.size;
    let count = shown.len() / (3 * s * s);
    spherear_core::grid::save_grid_png(png, &shown, count, s, 8.min(count).max(1))?;
    Ok((to_db(se_mode), to_db(se_sample)))
}
