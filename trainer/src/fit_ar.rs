//! `trainer fit --stage ar`: trains the AR transformer and diffusion head on frozen S-VAE latents.
//!
//! Latent caching: the frozen encoder runs once over the training set and its posterior parameters
//! (μ, κ per token; Gaussian posteriors: μ, log σ² per element) are kept in `<out>/latents.safetensors`;
//! every step draws a fresh posterior sample from them (Power Spherical: scaled to radius R), which is what
//! the official code sees when it encodes each batch anew (minus flip augmentation, which is not used for
//! Fashion-MNIST). The cache is stamped with the VAE's SHA-256 and the data identity ([`crate::identity`])
//! and rebuilt when either changes.
//!
//! The posterior family is the VAE's (`--posterior`, when given, must name the same one). Gaussian latents
//! are not of norm R, so the AR model sees them scaled by one factor s = 1/√mean(μ² + σ²) over the whole
//! cached training set (the expected per-element mean square of a sample), giving unit per-dimension RMS like
//! the sphere's R = √d, as the diffusion head's noise schedule assumes (the latent-diffusion scale factor).
//! s is computed from the cache when the stage is built (so a resume recomputes the same value) and folded
//! into the shipped VAE: `ar.safetensors` holds `vae.quant_proj` with its μ rows scaled by s and its log σ²
//! bias raised by 2 ln s, and `vae.post_quant_proj` divided by s. That VAE's latent space is the AR model's,
//! so sampling, export and the runtime need no scale of their own; `vae.safetensors` stays the VAE as
//! trained, and `ar-metrics.json` records s (`latent_scale`).
//!
//! The training checkpoint records the same identities: resuming with another `--vae`, `--data` or
//! `--limit` is an error (`--force` starts the stage afresh), so the cached latents, the transformer and
//! the VAE shipped in `ar.safetensors` always belong together.
//!
//! `--augment N` ([`crate::recipe`]): the cache holds the posteriors of N augmented views of every image
//! (the official crop + flip, [`crate::augment`], fixed by `--seed`; its stamp names N and the seed), and
//! each step uses one view per image, drawn from the step's RNG ([`view_rows`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use rand::Rng;
use spherear_core::data::{self, DataSource, Split};
use spherear_core::validate::in_range;
use spherear_core::{ModelConfig, Posterior};
use tch::{Kind, Tensor};

use crate::ar::ArModel;
use crate::augment::augment_batch;
use crate::checkpoint::{self, TensorFile};
use crate::error::{Result, TrainError};
use crate::fit_vae::{self, batch_tensor, VaeModel};
use crate::fitloop::{self, FitSummary, Plan, Stage, StageFiles, TrainArgs};
use crate::gaussian::DiagonalGaussian;
use crate::identity::{self, DataIdentity, RunIdentity};
use crate::optim::{AdamW, AdamWConfig, DecayGroups, Ema};
use crate::progress;
use crate::recipe::Recipe;
use crate::vae::PosteriorParams;

/// Loop settings of the AR stage unless given (small presets; the official ones:
/// [`crate::recipe::ar_train_defaults`]).
pub const TRAIN_DEFAULTS: TrainArgs = TrainArgs::DEFAULT;

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
    /// The training recipe (`--decay-groups`, `--ema-decay`, `--ema-warmup`, `--augment`; [`crate::recipe`]).
    pub recipe: Recipe,
    /// The posterior family expected of the VAE (`--posterior`); `None`: whatever the VAE has.
    pub posterior: Option<Posterior>,
}

impl ArFitArgs {
    pub fn new(vae: PathBuf, preset: &str, data: DataSource, out: PathBuf) -> Self {
        ArFitArgs {
            vae,
            preset: preset.to_string(),
            data,
            out,
            train: crate::recipe::ar_train_defaults(preset, TRAIN_DEFAULTS),
            recipe: Recipe::for_preset(preset),
            posterior: None,
        }
    }

    /// Checks every value (the messages name the command-line flags).
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        in_range("--ema-decay", self.recipe.ema.decay, 0.0, 1.0)?;
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
    /// Gaussian posteriors: the factor s the AR model's tokens are the VAE's latents scaled by (folded into
    /// the shipped VAE); absent for latents on the sphere.
    pub latent_scale: Option<f64>,
}

/// Posterior parameters of a whole dataset.
pub struct Latents {
    pub params: PosteriorParams,
    pub labels: Tensor,
}

impl Latents {
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A fresh posterior sample for the images `idx`, projected to radius `radius` when given, times `scale`:
    /// ([B, L, d], labels [B]).
    pub fn sample(&self, idx: &[usize], radius: Option<f64>, scale: f64) -> (Tensor, Tensor) {
        let i = Tensor::from_slice(&idx.iter().map(|&v| v as i64).collect::<Vec<_>>());
        let q = self.params.index_select(&i);
        (tch::no_grad(|| q.rsample(radius) * scale), self.labels.index_select(0, &i))
    }

    /// The Gaussian latent scale s = 1/√mean(μ² + σ²) over every element of the set: E[z²] of a sample is
    /// μ² + σ², so s·z has unit per-element RMS. `None` for the spherical posterior.
    pub fn gaussian_scale(&self) -> Option<f64> {
        match &self.params {
            PosteriorParams::Spherical { .. } => None,
            PosteriorParams::Gaussian { mean, logvar } => {
                let q = DiagonalGaussian::new(mean, logvar);
                let ms = (q.mean.square() + q.logvar.exp()).mean(Kind::Double).double_value(&[]);
                Some(1.0 / ms.max(1e-12).sqrt())
            }
        }
    }
}

/// Folds the latent scale `s` into the VAE tensors of `t` (official names): μ rows of `vae.quant_proj` × s,
/// its log σ² bias + 2 ln s, `vae.post_quant_proj` ÷ s. The result encodes to s·z and decodes s·z as the
/// original decoded z.
pub fn fold_latent_scale(t: &mut BTreeMap<String, Tensor>, latent_dim: i64, s: f64) -> Result<()> {
    let get = |t: &BTreeMap<String, Tensor>, k: &str| {
        t.get(k)
            .map(|v| v.detach().copy())
            .ok_or_else(|| TrainError::Mismatch(format!("no {k} to fold the scale into")))
    };
    let (w, b, p) =
        (get(t, "vae.quant_proj.weight")?, get(t, "vae.quant_proj.bias")?, get(t, "vae.post_quant_proj.weight")?);
    let d = latent_dim;
    if w.size()[0] != 2 * d || b.size()[0] != 2 * d {
        return Err(TrainError::Mismatch(format!("vae.quant_proj has {} outputs, not 2·{d} (Gaussian)", w.size()[0])));
    }
    tch::no_grad(|| {
        let _ = w.narrow(0, 0, d).g_mul_scalar_(s);
        let _ = b.narrow(0, 0, d).g_mul_scalar_(s);
        let _ = b.narrow(0, d, d).g_add_scalar_(2.0 * s.ln());
    });
    t.insert("vae.quant_proj.weight".into(), w);
    t.insert("vae.quant_proj.bias".into(), b);
    t.insert("vae.post_quant_proj.weight".into(), p / s);
    Ok(())
}

/// Encodes a dataset with the frozen VAE (batches of 200), or reads the cache when its stamp equals
/// `stamp` (the VAE's SHA-256 and the data identity).
pub fn encode_dataset(vae: &VaeModel, stamp: &str, args: &ArFitArgs, cache: &Path) -> Result<Latents> {
    let family = vae.config.vae.posterior;
    if let Ok(f) = checkpoint::load(cache) {
        if f.metadata.get("stamp").map(String::as_str) == Some(stamp) {
            let params = PosteriorParams::from_named(family, |k| f.tensors.get(k).map(Tensor::shallow_clone));
            if let (Some(params), Some(labels)) = (params, f.tensors.get("labels")) {
                eprintln!("using cached latents {}", cache.display());
                return Ok(Latents { params, labels: labels.to_kind(Kind::Int64) });
            }
        }
    }
    let ds = data::load(&args.data, Split::Train, vae.config.image_size, args.train.limit)?;
    let n = ds.len();
    // `--augment N`: rows v·n .. (v+1)·n hold view v of every image ([`crate::augment`]).
    let views = args.recipe.augment;
    let bar = progress::bar((n * views.max(1)) as u64, 0, "encode", args.train.progress);
    let mut parts = Vec::new();
    for view in 0..views.max(1) {
        for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
            let mut x = batch_tensor(&ds, chunk, None);
            if views > 0 {
                x = augment_batch(&x, chunk, args.train.seed, view);
            }
            parts.push(tch::no_grad(|| vae.vae.posterior(&x)));
            bar.inc(chunk.len() as u64);
        }
    }
    bar.finish_and_clear();
    let params = PosteriorParams::cat(&parts).ok_or_else(|| {
        TrainError::Mismatch(format!("--data {}: no training images", crate::fit_judge::dataset_name(&args.data)))
    })?;
    let lat = Latents { params, labels: Tensor::from_slice(&ds.labels).repeat([views.max(1) as i64]) };
    let mut f = TensorFile::default();
    for (name, t) in lat.params.named() {
        f.tensors.insert(name.into(), t.shallow_clone());
    }
    f.tensors.insert("labels".into(), lat.labels.to_kind(Kind::Float));
    f.metadata.insert("stamp".into(), stamp.to_string());
    checkpoint::save(cache, &f)?;
    Ok(lat)
}

/// The cache rows of the images `batch` at `step`: with `views` > 0 cached views of each of `images`
/// images, view v of image i is row v·images + i, v drawn uniformly per image from the step's RNG
/// ([`fitloop::step_rng`]); without views, the images themselves.
pub fn view_rows(batch: &[usize], views: usize, images: usize, seed: u64, step: usize) -> Vec<usize> {
    if views == 0 {
        return batch.to_vec();
    }
    let mut rng = fitloop::step_rng(seed, step);
    batch.iter().map(|&i| rng.gen_range(0..views) * images + i).collect()
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

    /// [`ArTrainer::new`] whose optimizer decays the parameters of `groups`.
    pub fn with_decay_groups(cfg: &ModelConfig, vae: Option<&VaeModel>, groups: DecayGroups) -> Result<Self> {
        let mut tr = Self::new(cfg, vae)?;
        tr.opt = AdamW::new(&tr.model.vs, is_ar_key, AdamWConfig { groups, ..AdamWConfig::default() });
        Ok(tr)
    }

    /// One step of the rectified-flow loss on tokens z [B, L, d] with class ids [B] (after dropout).
    pub fn step(&mut self, z: &Tensor, labels: &Tensor, lr: f64, clip: f64, ema: Ema) -> f64 {
        let cfg = &self.model.config;
        let (dim, d, mul) = (cfg.ar.dim as i64, cfg.latent_dim as i64, cfg.ar.diff_batch_mul as i64);
        self.opt.zero_grad();
        let cond = self.model.ar.conditions(z, labels).reshape([-1, dim]).repeat([mul, 1]);
        let target = z.reshape([-1, d]).repeat([mul, 1]);
        let loss = self.model.ar.head.loss(&target, &cond);
        loss.backward();
        self.opt.clip_grad_norm(clip);
        self.opt.step(lr);
        ema.update(&mut self.ema, &self.model.vs.variables(), self.opt.step);
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
    /// Gaussian posterior: the scale of the AR model's tokens ([`Latents::gaussian_scale`]).
    latent_scale: Option<f64>,
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
        let family = vae.config.vae.posterior;
        if let Some(asked) = args.posterior.filter(|&p| p != family) {
            return Err(TrainError::Mismatch(format!(
                "--posterior {asked} but the VAE {} was trained with the {family} posterior (the AR stage takes the \
                 VAE's; leave --posterior out or give {family})",
                vae_file.display()
            )));
        }
        let mut config = ModelConfig::preset(&args.preset)?;
        config.vae.posterior = family;
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
        let recipe = args.recipe.ar_record(&args.train);
        let identity = RunIdentity { data, vae: Some((vae_file, vae_sha)), recipe };
        // config.json is written with the weights (ArModel::save_tensors).
        Ok((Plan { out: &args.out, train: &args.train, config, identity, config_file: None }, vae))
    }

    fn finished(_: &ArFitArgs, _: &Plan<'_, ModelConfig>, run: FitSummary) -> ArFitReport {
        ArFitReport { run, latent_seconds: 0.0, latent_scale: None }
    }

    fn load(_: &ArFitArgs, _: &Plan<'_, ModelConfig>) -> Result<()> {
        Ok(())
    }

    fn build(args: &ArFitArgs, plan: &Plan<'_, ModelConfig>, vae: VaeModel, _: ()) -> Result<Self> {
        let t_lat = std::time::Instant::now();
        let vae_sha = plan.identity.vae.as_ref().map_or("", |(_, sha)| sha.as_str());
        let mut stamp = format!("vae sha256 {vae_sha}, {}", plan.identity.data.stamp());
        if args.recipe.augment > 0 {
            stamp += &format!(", augment {} views, seed {}", args.recipe.augment, args.train.seed);
        }
        let latents = encode_dataset(&vae, &stamp, args, &latents_path(&args.out))?;
        let latent_seconds = t_lat.elapsed().as_secs_f64();
        // Gaussian+norm tokens lie on the sphere already: only the plain Gaussian posterior is scaled.
        let latent_scale = if plan.config.vae.posterior.on_sphere() { None } else { latents.gaussian_scale() };
        if let Some(s) = latent_scale {
            eprintln!("Gaussian latents: the AR model sees them scaled by s = {s:.4} (unit per-element RMS)");
        }
        let tr = ArTrainer::with_decay_groups(&plan.config, Some(&vae), args.recipe.decay_groups)?;
        Ok(ArStage { args: args.clone(), tr, latents, latent_seconds, latent_scale, smooth: None })
    }

    /// The training images (the cache holds `--augment` views of each).
    fn examples(&self) -> usize {
        self.latents.len() / self.args.recipe.augment.max(1)
    }

    fn step(&mut self, step: usize, batch: &[usize]) -> Result<(f64, String)> {
        let (a, cfg) = (&self.args, &self.tr.model.config);
        let radius = cfg.token_radius().map(f64::from);
        let rows = view_rows(batch, self.args.recipe.augment, self.examples(), a.train.seed, step);
        let (z, labels) = self.latents.sample(&rows, radius, self.latent_scale.unwrap_or(1.0));
        let labels = self.tr.drop_labels(&labels, cfg.ar.class_dropout);
        let lr = a.train.lr_at(step);
        let loss = self.tr.step(&z, &labels, lr, a.train.clip, a.recipe.ema);
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
        ArFitReport { run, latent_seconds: self.latent_seconds, latent_scale: self.latent_scale }
    }

    /// Writes `ar.safetensors` (the EMA weights + the VAE, the Gaussian latent scale folded into it) and
    /// `config.json` beside it.
    fn finish(&mut self, run: FitSummary, _weights: &Path) -> Result<ArFitReport> {
        let mut tensors = self.tr.export_tensors();
        if let Some(s) = self.latent_scale {
            fold_latent_scale(&mut tensors, self.tr.model.config.latent_dim as i64, s)?;
        }
        self.tr.model.save_tensors(&self.args.out, tensors, Self::NAME)?;
        Ok(self.report(run))
    }
}
