//! trainer: S-VAE and AR training, sampling and import on libtorch (tch).
//!
//! Module map: [`layers`] (blocks shared by the VAE and the AR model), [`psd`] (Power Spherical
//! posterior), [`vae`] (the S-VAE), [`optim`] (AdamW + schedule), [`checkpoint`] (safetensors
//! checkpoints), [`fit_vae`] and [`fit_ar`] (the training stages, over [`fitloop`]), [`ar`] (the AR
//! transformer and diffusion head), [`sample`] (the reference sampler).

pub mod ar;
pub mod checkpoint;
pub mod error;
pub mod fit_ar;
pub mod fit_vae;
pub mod fitloop;
pub mod import;
pub mod layers;
pub mod optim;
pub mod progress;
pub mod psd;
pub mod sample;
pub mod vae;

pub use error::{Result, TrainError};
