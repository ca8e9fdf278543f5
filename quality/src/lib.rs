//! quality: how good generated images are, and the reports that show it. Kept out of the `runtime`
//! library so that generating images needs no plotting, fonts, datasets, judge or Fréchet distance.
//!
//! - [`eval`]: quality evaluation with a judge classifier (`runtime eval`, the quantization gate):
//!   class accuracy and the Fréchet distance of the judge's features against a test split
//! - [`stats`]: feature Gaussians and the Fréchet distance
//! - [`report`]: markdown tables and PNG line charts (eval, benchmarks)
//!
//! Generation is the caller's: [`eval::evaluate`] takes a function that turns a sample request into decoded
//! images (the runtime's `Generator::generate_images`), so this crate depends on the core crate and ONNX
//! Runtime (for the judge) only.

pub mod error;
pub mod eval;
pub mod report;
pub mod stats;

pub use error::{QualityError, Result};
