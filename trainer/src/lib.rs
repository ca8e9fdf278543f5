//! trainer: S-VAE and AR training, sampling and import on libtorch (tch).
//!
//! Module map: [`layers`] (blocks shared by the VAE and the AR model), [`psd`] (Power Spherical
//! posterior), [`vae`] (the S-VAE), [`optim`] (AdamW + schedule), [`checkpoint`] (safetensors
//! checkpoints), [`fit_vae`] (the VAE stage).

pub mod checkpoint;
pub mod error;
pub mod fit_vae;
pub mod layers;
pub mod optim;
pub mod progress;
pub mod psd;
pub mod vae;

pub use error::{Result, TrainError};
