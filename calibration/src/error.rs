//! Typed errors of the calibration library; every message is one line meant for the user.

use exporter::ExportError;
use spherear_core::CoreError;

#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    /// A bad option value (block size, graph or --keep name, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The input export cannot be quantized (already quantized, fp16, inconsistent, corrupt).
    #[error("model {path}: {msg}")]
    Model { path: String, msg: String },
    #[error("{0}")]
    Io(String),
    /// Manifest, output-folder and other core errors.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// ONNX reading/writing errors of the exporter's ONNX layer.
    #[error(transparent)]
    Onnx(#[from] ExportError),
}

pub type Result<T, E = CalibError> = std::result::Result<T, E>;
