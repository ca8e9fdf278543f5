//! Typed errors of the quality library. Every message is one line meant for the user.

use spherear_core::CoreError;

/// Errors of the quality library.
#[derive(Debug, thiserror::Error)]
pub enum QualityError {
    /// Bad option or mismatched inputs (judge vs model vs data set, feature sizes).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The judge folder: manifest, graph file, outputs.
    #[error("model error: {0}")]
    Model(String),
    /// ONNX Runtime failed while running the judge.
    #[error("onnx runtime error in {context}: {msg}")]
    Ort { context: String, msg: String },
    /// Writing reports and charts.
    #[error("{0}")]
    Io(String),
    /// The caller's image generation failed (see [`crate::eval::evaluate`]).
    #[error(transparent)]
    Generate(Box<dyn std::error::Error + Send + Sync>),
    /// Errors of the core crate (data sets, judge manifest, atomic writes).
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// Result of the quality library.
pub type Result<T, E = QualityError> = std::result::Result<T, E>;

/// Maps an `ort` error into [`QualityError::Ort`] with a context, on one line.
pub(crate) fn ort_err<E: std::fmt::Display>(context: impl Into<String>) -> impl FnOnce(E) -> QualityError {
    let context = context.into();
    move |e| QualityError::Ort { context, msg: e.to_string().split_whitespace().collect::<Vec<_>>().join(" ") }
}
