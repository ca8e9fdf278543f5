//! calibration: post-training quantization of SphereAR exports, without libtorch.
//!
//! - [`nbits`]: blockwise symmetric int8/int4 packing in ONNX Runtime's `MatMulNBits` layout, byte-identical
//!   to ONNX Runtime's reference quantizer
//! - [`quantize`]: the `calibration quantize` command: an fp32 export → a complete export folder whose
//!   selected graphs use `MatMulNBits`, with per-graph precision in `manifest.json`
//! - [`calibrate`]: the `calibration calibrate` command: activation ranges from real rollouts of the
//!   runtime's sampler ([`runtime::generator::GraphObserver`]), an int8 QDQ export ([`qdq`]) and TensorRT
//!   calibration tables ([`trt`]); ranges from histograms as ONNX Runtime computes them ([`histogram`])
//!
//! - [`gate`]: the quality gate every quantized export passes before it is written (judge accuracy and
//!   Fréchet distance against fp32 under the same noise, token error), keeping the layers that fail at
//!   fp32
//!
//! ONNX reading/writing and the external-data layout are the exporter's ([`exporter::onnx`]); the manifest
//! types and the atomic folder write are the core crate's.

pub mod calibrate;
pub mod error;
pub mod gate;
pub mod histogram;
pub mod nbits;
pub mod qdq;
pub mod quantize;
pub mod trt;

pub use error::{CalibError, Result};
pub use quantize::{quantize_export, QuantizeOptions, QuantizeReport, WeightBits};
