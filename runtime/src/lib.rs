//! runtime: SphereAR generation on ONNX Runtime from an `exporter onnx` folder — prefill and KV-cached
//! AR steps, classifier-free guidance with the linear schedule, Euler–Maruyama head sampling, projection of
//! every token onto the radius-R sphere (none for a Gaussian VAE: the manifest's `posterior`), decoding to
//! images. It reproduces `trainer sample` (same core
//! schedule, noise and projection functions, same noise order) up to float error.
//!
//! - [`Generator`]: an export loaded once (sessions, manifest, provider decision); `generate_tokens` and
//!   `decode` take `&self` and keep all per-request state (KV cache, bound buffers) in a batch state
//! - [`provider`]: cpu / cuda / tensorrt registration with logged CPU fallback (or `strict`)
//! - [`ortlib`]: locating and loading `libonnxruntime.so`
//! - [`job`]: a grid request run piece by piece (memory grows with the batch, not the request; Ctrl-C)
//! - [`output`]: output checks before any work; PNG grid, per-image PNGs, tokens safetensors (atomic writes)
//! - [`serve`]: `runtime serve`, the HTTP image service with token-level continuous batching over KV slots
//!
//! Depends on the core crate only (never on the exporter or libtorch). Quality evaluation (`runtime eval`)
//! and report charts live in the `quality` crate, which only the binary uses (cargo feature `cli`, on by
//! default): a library user can depend on `runtime` with `default-features = false` and get no plotting,
//! fonts, judge or Fréchet distance, nor the command-line crates.

pub mod error;
pub mod generator;
pub mod job;
pub mod ortlib;
pub mod output;
pub mod provider;
pub mod serve;

pub use error::{Result, RuntimeError};
pub use generator::{GenerateRequest, GenerateStats, Generator, GeneratorOptions, Tokens};
pub use output::OutputOptions;
pub use provider::{Provider, ProviderOptions, ProviderReport, TensorRtOptions};
pub use spherear_core::manifest::Manifest;
