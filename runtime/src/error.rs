//! Typed errors of the runtime library. Every message is one line meant for the user.

use spherear_core::CoreError;

/// Errors of the runtime library.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Bad request or option (class id, steps, batch, cfg, flags).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The export folder: manifest, graph files, graph signatures.
    #[error("model error: {0}")]
    Model(String),
    /// The ONNX Runtime shared library could not be found or loaded.
    #[error("{0}")]
    Library(String),
    /// An execution provider could not be used (only with `strict`).
    #[error("provider error: {0}")]
    Provider(String),
    /// ONNX Runtime failed while running a graph.
    #[error("onnx runtime error in {context}: {msg}")]
    Ort { context: String, msg: String },
    /// Writing outputs.
    #[error("{0}")]
    Io(String),
    /// A graph produced NaN or ±Inf: the export's weights are corrupt or the model diverged.
    #[error("{graph} produced non-finite values ({what}) at {at}: the export's weights are corrupt or the model diverged")]
    NonFinite { graph: String, what: String, at: String },
    /// The caller asked to stop (Ctrl-C, a cancelled request).
    #[error("cancelled")]
    Cancelled,
    /// Errors of the core crate (manifest, schedule, noise, PNG writing).
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// Result of the runtime library.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Maps an `ort` error (any recover type) into [`RuntimeError::Ort`] with a context, on one line.
pub fn ort_err<E: std::fmt::Display>(context: impl Into<String>) -> impl FnOnce(E) -> RuntimeError {
    let context = context.into();
    move |e| RuntimeError::Ort { context, msg: one_line(&e.to_string()) }
}

/// Collapses whitespace runs (including newlines) into single spaces.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
