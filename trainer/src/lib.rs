//! trainer: S-VAE and AR training, sampling and import on libtorch (tch).
//!
//! Module map: [`layers`] (blocks shared by the VAE and the AR model), [`psd`] (Power Spherical
//! posterior), [`gaussian`] (the diagonal Gaussian posterior of the baselines), [`vae`] (the S-VAE),
//! [`optim`] (AdamW, schedules, EMA), [`recipe`] (official vs our training choices), [`augment`]
//! (the official crop + flip), [`checkpoint`] (safetensors checkpoints), [`identity`] (data and VAE
//! fingerprints recorded for resumes), [`fit_vae`], [`fit_ar`] and [`fit_judge`] (the training stages:
//! each a [`fitloop::Stage`] driven by [`fitloop::fit`]), [`ar`] (the AR transformer and diffusion head),
//! [`sample`] (the reference sampler), [`judge`]
//! (the judge classifier for quality evaluation), [`import`] over [`torch_pickle`] (official `torch.save`
//! checkpoints read without executing pickle code).

pub mod ar;
pub mod augment;
pub mod checkpoint;
pub mod error;
pub mod fit_ar;
pub mod fit_judge;
pub mod fit_vae;
pub mod fitloop;
pub mod gaussian;
pub mod identity;
pub mod import;
pub mod judge;
pub mod layers;
pub mod optim;
pub mod progress;
pub mod psd;
pub mod recipe;
pub mod sample;
pub mod torch_pickle;
pub mod vae;

pub use error::{Result, TrainError};
