//! exporter: writes a SphereAR checkpoint (safetensors + config.json) as ONNX graphs plus a manifest,
//! without libtorch.
//!
//! - [`onnx`]: a small typed graph builder over the ONNX protos, with checkpoint weights streamed into one
//!   external-data file shared by all graphs
//! - [`checkpoint`]: reading and validating checkpoints
//! - [`graphs`]: the four graphs (`ar_prefill`, `ar_step`, `head_step`, `decoder`)
//! - [`export`]: the `exporter onnx` command: atomic output folder and `manifest.json`
//! - [`judge`]: the `exporter judge` command: the judge classifier as `judge.onnx` + core's judge manifest
//! - `random` (cargo feature `random-init`): random-init checkpoint folders for tests and benchmarks
//!
//! Library users who only export: `default-features = false` (no command-line crates, no random writers).

pub mod checkpoint;
pub mod error;
pub mod export;
pub mod graphs;
pub mod judge;
pub mod onnx;
#[cfg(any(test, feature = "random-init"))]
pub mod random;

pub use error::{ExportError, Result};
pub use export::{export, ExportOptions};
pub use spherear_core::manifest::{Attention, Manifest};
