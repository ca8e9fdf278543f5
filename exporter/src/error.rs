//! Typed errors of the exporter library; every message is one line meant for the user.

use spherear_core::CoreError;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("output folder {path}: {msg}")]
    Output { path: String, msg: String },
    #[error("{0}")]
    Io(String),
    #[error("graph construction: {0}")]
    Graph(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error(transparent)]
    Core(#[from] CoreError),
}

pub type Result<T, E = ExportError> = std::result::Result<T, E>;

/// Maps an io::Error to [`ExportError::Io`] naming what was being done.
pub fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ExportError {
    move |e| ExportError::Io(format!("{what}: {e}"))
}
