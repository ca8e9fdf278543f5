//! spherear-core: the math and formats every crate of the toolchain shares, with no libtorch.
//!
//! - [`config`]: model presets and config.json
//! - [`timing`]: per-stage timing of sampling runs, extrapolation, peak RSS
//! - [`noise`]: the seeded noise source and its documented draw order
//! - [`sphere`]: projection onto the radius-R sphere
//! - [`rope`]: the 2-D RoPE table
//! - [`schedule`]: linear CFG schedule and the Euler–Maruyama time grid
//! - [`sampler`]: the token loop both samplers run (generic over a [`sampler::TokenBackend`]), its stats
//! - `data` (cargo feature `datasets`): Fashion-MNIST IDX and ImageFolder loading
//! - [`grid`]: the PNG grid canvas, filled image by image
//! - [`fsutil`]: safe output writes: atomic files and folders that never replace what is not ours
//! - [`validate`]: checks of numeric command-line values with one message shape
//! - [`judge`]: the judge classifier's config and export manifest (quality evaluation)
//! - [`manifest`]: `manifest.json` of an ONNX export (serde types, load + format-version check)

pub mod config;
#[cfg(feature = "datasets")]
pub mod data;
pub mod fsutil;
pub mod grid;
pub mod judge;
pub mod keys;
pub mod manifest;
pub mod noise;
pub mod request;
pub mod rope;
pub mod sampler;
pub mod schedule;
pub mod sphere;
pub mod timing;
pub mod validate;

pub use config::{ArConfig, ModelConfig, Posterior, VaeConfig};

/// Errors of the core library; each carries a one-line message meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("config error: {0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
    #[error("data error: {0}")]
    Data(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A model stage produced NaN or ±Inf while sampling (see [`sampler`]).
    #[error("{graph} produced non-finite values ({what}) at {at}: the weights are corrupt or the model diverged")]
    NonFinite { graph: String, what: String, at: String },
}
