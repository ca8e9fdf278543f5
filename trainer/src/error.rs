//! Typed errors of the trainer library; each message is one line meant for the user.

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Core(#[from] spherear_core::CoreError),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("{0}")]
    Mismatch(String),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Io(String),
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T> = std::result::Result<T, TrainError>;
