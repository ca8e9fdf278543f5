//! `trainer fit --stage vae`: reconstruction (MSE) + KL-to-uniform training of the S-VAE.
//!
//! Not included, and why: the paper's perceptual (LPIPS/VGG) loss needs pretrained weights that cannot be
//! fetched here, so it is left out rather than faked; the PatchGAN adversarial loss is not implemented yet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use rand_chacha::ChaCha8Rng;
use spherear_core::data::{self, DataSource, Dataset, Shuffler, Split};
use spherear_core::validate::{at_least, non_negative};
use spherear_core::ModelConfig;
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::checkpoint::{self, TensorFile, WEIGHTS_FORMAT};
use crate::error::{Result, TrainError};
use crate::fitloop::{self, FitSummary, TrainArgs};
use crate::identity::DataIdentity;
use crate::optim::{AdamW, AdamWConfig};
use crate::vae::Vae;

/// The VAE stage's own files in a run folder (what `--force` removes; `config.json` is shared with the
/// AR stage and stays).
pub const STAGE_FILES: [&str; 4] = ["train-vae.safetensors", "vae.safetensors", "vae-metrics.json", "vae-recon.png"];

/// Settings of the VAE stage.
#[derive(Debug, Clone)]
pub struct VaeFitArgs {
    pub preset: String,
    pub data: DataSource,
    pub out: PathBuf,
    pub train: TrainArgs,
    pub kl_weight: f64,
    pub flip: bool,
    /// Held-out images scored for PSNR at the end.
    pub eval_images: usize,
}

impl VaeFitArgs {
    pub fn new(preset: &str, data: DataSource, out: PathBuf) -> Self {
        VaeFitArgs {
            preset: preset.to_string(),
            data,
            out,
            train: TrainArgs::new(2000),
            kl_weight: 0.004,
            flip: false,
            eval_images: 1000,
        }
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
    /// PSNR (dB) of held-out reconstructions from the posterior mode R·μ.
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
        let mut f = TensorFile { tensors: checkpoint::named_tensors(&self.vs, "vae."), ..Default::default() };
        f.metadata.insert("format".into(), WEIGHTS_FORMAT.into());
        f.metadata.insert("stage".into(), "vae".into());
        f.metadata.insert("config".into(), self.config.to_json());
        checkpoint::save(path, &f)
    }

    /// Reconstructs a batch [N, 3, H, W]; `sample` draws from the posterior, otherwise uses its mode.
    pub fn reconstruct(&self, images: &Tensor, sample: bool) -> Tensor {
        tch::no_grad(|| {
            let z = if sample { self.vae.encode(images).0 } else { self.vae.encode_mode(images) };
            self.vae.decode(&z)
        })
    }
}

/// PSNR in dB for images in [−1, 1] (peak-to-peak 2), reconstructions clamped to that range.
pub fn psnr_db(original: &Tensor, recon: &Tensor) -> f64 {
    let mse = (recon.clamp(-1.0, 1.0) - original).square().mean(Kind::Float).double_value(&[]);
    10.0 * (4.0 / mse.max(1e-12)).log10()
}

/// One optimisation step of reconstruction + kl_weight · KL.
pub fn train_step(m: &VaeModel, opt: &mut AdamW, images: &Tensor, kl_weight: f64, clip: f64, lr: f64) -> StepStats {
    opt.zero_grad();
    let (z, kl) = m.vae.encode(images);
    let recon = m.vae.decode(&z);
    let rec = (&recon - images).square().mean(Kind::Float);
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
    out.join("train-vae.safetensors")
}

pub fn weights_path(out: &Path) -> PathBuf {
    out.join("vae.safetensors")
}

fn save_train_state(
    path: &Path,
    m: &VaeModel,
    opt: &AdamW,
    step: usize,
    total: usize,
    meta: &HashMap<String, String>,
) -> Result<()> {
    let mut tensors = checkpoint::named_tensors(&m.vs, "vae.");
    tensors.extend(opt.state());
    checkpoint::save_train(path, "vae", step, total, &m.config, tensors, meta)
}

/// Resolves the run's config: an existing run folder fixes it (and must match the preset asked for).
pub fn run_config(out: &Path, preset: &str) -> Result<ModelConfig> {
    let wanted = ModelConfig::preset(preset)?;
    let cfg_path = out.join("config.json");
    if cfg_path.exists() {
        let stored = ModelConfig::load(&cfg_path)?;
        checkpoint::check_stage_config(&cfg_path, "vae", &stored, &wanted)?;
    }
    Ok(wanted)
}

/// Trains (or resumes) the VAE stage; `stop` is polled every step (Ctrl-C) and triggers a checkpoint.
///
/// Before any work: the values, the preset against the run folder, the data, and the run's earlier state
/// ([`fitloop::previous_run`]: a finished stage returns at once with `already_finished` and touches no
/// file; a checkpoint made from other data is an error). With `force` the stage's files
/// ([`STAGE_FILES`]) are removed and it starts afresh.
pub fn fit_vae(args: &VaeFitArgs, stop: &AtomicBool) -> Result<VaeFitReport> {
    let ta = &args.train;
    args.validate()?;
    let config = run_config(&args.out, &args.preset)?;
    let data_id = DataIdentity::of(&args.data, ta.limit)?;
    let (ckpt, weights) = (train_ckpt_path(&args.out), weights_path(&args.out));
    let header = if ta.force { None } else { checkpoint::read_train_header(&ckpt, "vae")? };
    if let Some(h) = &header {
        checkpoint::check_stage_config(&ckpt, "vae", &h.config(&ckpt)?, &config)?;
    }
    let changes = header.as_ref().map(|h| data_id.changes(&h.metadata)).unwrap_or_default();
    if let Some(run) = fitloop::previous_run("vae", &ckpt, &weights, header.as_ref(), &changes, ta)? {
        return Ok(VaeFitReport { run, psnr_mode_db: None, psnr_sample_db: None });
    }
    let train = data::load(&args.data, Split::Train, config.image_size, ta.limit)?;
    let held_out = data::load(&args.data, Split::Test, config.image_size, Some(args.eval_images))?;
    if ta.force {
        fitloop::remove_stage_files(&args.out, &STAGE_FILES)?;
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| TrainError::Io(format!("cannot create {}: {e}", args.out.display())))?;
    let cfg_path = args.out.join("config.json");
    if !cfg_path.exists() {
        config.save(&cfg_path)?;
    }
    let mut meta = HashMap::new();
    data_id.record(&mut meta);

    tch::manual_seed(ta.seed as i64);
    let m = VaeModel::new(&config)?;
    let mut opt = AdamW::new(&m.vs, |n| n.starts_with("vae."), AdamWConfig::default());
    let mut start = 0usize;
    if let Some((step, file)) = checkpoint::load_train(&ckpt, "vae", &config)? {
        start = step;
        checkpoint::load_into(&m.vs, &file.tensors, "vae.", &format!("checkpoint {}", ckpt.display()))?;
        opt.load_state(&file.tensors, start as i64)
            .map_err(|msg| TrainError::Checkpoint { path: ckpt.display().to_string(), msg })?;
        eprintln!("resuming VAE training from step {start} ({})", ckpt.display());
    }

    let mut shuffler = Shuffler::with_position(train.len(), ta.seed, (start * ta.batch) as u64);
    let mut smooth = None::<f64>;
    let opt = std::cell::RefCell::new(opt);
    let outcome = fitloop::run(
        "vae",
        start,
        ta,
        stop,
        |step| {
            let idx = shuffler.next_batch(ta.batch);
            let mut flip_rng = args.flip.then(|| fitloop::step_rng(ta.seed, step));
            let x = batch_tensor(&train, &idx, flip_rng.as_mut());
            let lr = ta.lr_at(step);
            let s = train_step(&m, &mut opt.borrow_mut(), &x, args.kl_weight, ta.clip, lr);
            let sm = smooth.map_or(s.recon, |v| 0.95 * v + 0.05 * s.recon);
            smooth = Some(sm);
            let db = 10.0 * (4.0 / sm.max(1e-12)).log10();
            Ok((s.loss, format!("loss {:.4} rec {:.4} kl {:.2} ~{db:.1} dB lr {lr:.1e}", s.loss, s.recon, s.kl)))
        },
        |step| save_train_state(&ckpt, &m, &opt.borrow(), step, ta.steps, &meta),
    )?;
    let interrupted = outcome.interrupted;
    let mut report =
        VaeFitReport { run: FitSummary::new(start, ta.steps, &outcome), psnr_mode_db: None, psnr_sample_db: None };
    if interrupted {
        return Ok(report);
    }
    m.save_weights(&weights)?;
    // The posterior samples of the evaluation do not depend on where the training stopped.
    tch::manual_seed(ta.seed as i64);
    let (pm, ps) = evaluate(&m, &held_out, &args.out.join("vae-recon.png"))?;
    report.psnr_mode_db = Some(pm);
    report.psnr_sample_db = Some(ps);
    let json = serde_json::to_string_pretty(&report).map_err(|e| TrainError::Io(format!("metrics: {e}")))?;
    spherear_core::fsutil::write_atomic(&args.out.join("vae-metrics.json"), json.as_bytes())?;
    Ok(report)
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
    let to_db = |se: f64| 10.0 * (4.0 / (se / n as f64).max(1e-12)).log10();
    let s = held_out.size;
    let count = shown.len() / (3 * s * s);
    data::save_grid_png(png, &shown, count, s, 8.min(count).max(1))?;
    Ok((to_db(se_mode), to_db(se_sample)))
}
