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
    /// Rollouts and replays in ONNX Runtime (`calibration calibrate`, the quality gate).
    #[error("{0}")]
    Runtime(String),
    /// No candidate export passed the quality gate.
    #[error("quality gate: {0}")]
    Gate(String),
    /// Manifest, output-folder and other core errors.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// ONNX reading/writing errors of the exporter's ONNX layer.
    #[error(transparent)]
    Onnx(#[from] ExportError),
}

impl From<runtime::RuntimeError> for CalibError {
    fn from(e: runtime::RuntimeError) -> Self {
        CalibError::Runtime(e.to_string())
    }
}

impl From<quality::QualityError> for CalibError {
    fn from(e: quality::QualityError) -> Self {
        CalibError::Runtime(e.to_string())
    }
}

pub type Result<T, E = CalibError> = std::result::Result<T, E>;
