//! calibration: post-training quantization of SphereAR exports, without libtorch.
//!
//! - [`nbits`]: blockwise symmetric int8/int4 packing in ONNX Runtime's `MatMulNBits` layout, byte-identical
//!   to ONNX Runtime's reference quantizer
//! - [`quantize`]: the `calibration quantize` command: an fp32 export → a complete export folder whose
//!   selected graphs use `MatMulNBits`, with per-graph precision in `manifest.json`
//!
//! ONNX reading/writing and the external-data layout are the exporter's ([`exporter::onnx`]); the manifest
//! types and the atomic folder write are the core crate's.

pub mod error;
pub mod nbits;
pub mod quantize;

pub use error::{CalibError, Result};
pub use quantize::{quantize_export, QuantizeOptions, QuantizeReport, WeightBits};
