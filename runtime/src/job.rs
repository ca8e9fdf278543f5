//! A grid request (`rows` classes × `per_class` images) run piece by piece, so that memory grows with the
//! batch and not with the request: each piece of `batch` images is sampled, decoded and handed to the
//! [`OutputWriter`] before the next one starts. Image j uses noise stream j of the seed whatever the
//! pieces are (the pieces carry `first_image`), so the result equals one whole-request call.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::error::{Result, RuntimeError};
use crate::generator::{validate_request, GenerateRequest, GenerateStats, Generator};
use crate::output::OutputWriter;
use crate::Manifest;

/// `rows.len() × per_class` images, row by row (the grid layout), sampled with one cfg, steps and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct GridJob {
    pub rows: Vec<i64>,
    pub per_class: usize,
    pub cfg: f32,
    pub steps: usize,
    pub seed: u64,
    /// Images per piece (before CFG doubling).
    pub batch: usize,
}

/// What a job did.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobReport {
    pub images: usize,
    /// images × tokens per image.
    pub tokens: usize,
    /// Token sampling time summed over the pieces (as [`GenerateStats::sample_seconds`]).
    pub sample_seconds: f64,
    pub decode_seconds: f64,
    /// Images per piece actually used.
    pub batch: usize,
}

impl JobReport {
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.sample_seconds.max(1e-12)
    }
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.sample_seconds.max(1e-12)
    }
}

impl GridJob {
    /// Number of images; an error when it overflows.
    pub fn total(&self) -> Result<usize> {
        if self.per_class == 0 {
            return Err(RuntimeError::Invalid("--per-class must be ≥ 1".into()));
        }
        self.rows.len().checked_mul(self.per_class).ok_or_else(|| {
            RuntimeError::Invalid(format!("{} classes × {} images per class is too many images", self.rows.len(), self.per_class))
        })
    }

    /// The request of images `start .. start + len`.
    pub fn piece(&self, start: usize, len: usize) -> GenerateRequest {
        GenerateRequest {
            classes: (start..start + len).map(|j| self.rows[j / self.per_class]).collect(),
            cfg: self.cfg,
            steps: self.steps,
            seed: self.seed,
            first_image: start as u64,
            batch: self.batch,
            token_limit: None,
        }
    }

    /// Checks the job against an export before any work (the rules of [`validate_request`]).
    pub fn validate(&self, m: &Manifest) -> Result<()> {
        self.total()?;
        let probe = GenerateRequest { classes: self.rows.clone(), ..self.piece(0, 0) };
        validate_request(&probe, m)
    }

    /// Runs the job: samples and decodes piece by piece and hands every piece to `out`. `progress(n)` is
    /// called after every token step with the images of the piece. Stops with
    /// [`RuntimeError::Cancelled`] at the next token step once `cancel` is set; the pieces finished
    /// before stay written ([`OutputWriter::images_written`]).
    pub fn run(
        &self,
        g: &Generator,
        out: &mut OutputWriter,
        cancel: &AtomicBool,
        mut progress: impl FnMut(usize),
    ) -> Result<JobReport> {
        let total = self.total()?;
        let batch = g.effective_batch(&self.piece(0, 0)).max(1);
        let mut report = JobReport { batch, ..Default::default() };
        let mut start = 0;
        while start < total {
            let len = batch.min(total - start);
            let req = self.piece(start, len);
            let (tokens, stats): (_, GenerateStats) = g.generate_tokens_until(&req, |n| {
                progress(n);
                if cancel.load(Ordering::SeqCst) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
            let t0 = Instant::now();
            let images = g.decode(&tokens, len)?;
            report.decode_seconds += t0.elapsed().as_secs_f64();
            out.push(start, &req.classes, &tokens, &images)?;
            report.images += stats.images;
            report.tokens += stats.tokens;
            report.sample_seconds += stats.sample_seconds;
            start += len;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_follow_the_grid_and_the_noise_streams() {
        let job = GridJob { rows: vec![3, 7, 1], per_class: 2, cfg: 2.0, steps: 4, seed: 9, batch: 4 };
        assert_eq!(job.total().unwrap(), 6);
        let p = job.piece(3, 3);
        assert_eq!(p.classes, vec![7, 1, 1]);
        assert_eq!(p.first_image, 3);
        assert_eq!((p.cfg, p.steps, p.seed, p.batch), (2.0, 4, 9, 4));
        let huge = GridJob { per_class: usize::MAX, ..job.clone() };
        assert!(huge.total().unwrap_err().to_string().contains("too many"));
        assert!(GridJob { per_class: 0, ..job }.total().is_err());
    }
}
