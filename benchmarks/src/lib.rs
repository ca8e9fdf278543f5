//! benchmarks: how fast the toolchain samples, and how far that is from what the machine allows.
//!
//! - [`cost`]: the analytic cost model: FLOPs / weight bytes of sampling and the roofline bound
//! - [`micro`]: machine peaks (ONNX Runtime MatMul rate, memory read bandwidth)
//! - [`speed`]: `bench speed`: runtime vs the libtorch reference across batch sizes, steps and
//!   precisions, with per-stage breakdown, peak RSS, roofline percentages and GPU projections
//! - [`serve`]: `bench serve`: a Poisson load generator for `runtime serve`, continuous vs static batching
//! - [`ablation`]: `bench ablation`: the posterior ablation's summary (spherical vs Gaussian latents)

pub mod ablation;
pub mod cost;
pub mod micro;
pub mod serve;
pub mod speed;
