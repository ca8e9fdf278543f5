//! trainer: S-VAE and AR training, sampling and import on libtorch (tch).
//!
//! Module map: [`layers`] (blocks shared by the VAE and the AR model), [`psd`] (Power Spherical
//! posterior), [`vae`] (the S-VAE), [`optim`] (AdamW + schedule), [`checkpoint`] (safetensors
//! checkpoints), [`identity`] (data and VAE fingerprints recorded for resumes), [`fit_vae`], [`fit_ar`] and
//! [`fit_judge`] (the training stages: each a [`fitloop::Stage`] driven by [`fitloop::fit`]),
//! [`ar`] (the AR transformer and diffusion head), [`sample`] (the reference sampler), [`judge`]
//! (the judge classifier for quality evaluation).

pub mod ar;
pub mod checkpoint;
pub mod error;
pub mod fit_ar;
pub mod fit_judge;
pub mod fit_vae;
pub mod fitloop;
pub mod identity;
pub mod import;
pub mod judge;
pub mod layers;
pub mod optim;
pub mod progress;
pub mod psd;
pub mod sample;
pub mod vae;

pub use error::{Result, TrainError};
