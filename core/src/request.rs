//! A sampling request, shared by the reference sampler (`trainer sample`) and the runtime
//! (`runtime generate`): the same fields, the same validation, the same grid layout.

use crate::schedule::{validate_cfg, MAX_STEPS};
use crate::CoreError;

/// What to sample. Image j of the request (in `classes` order) uses noise stream `first_image + j` of
/// `seed`, so the result does not depend on `batch`, nor on how a long request is split into pieces.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    /// One class id per image, in output order.
    pub classes: Vec<i64>,
    /// Classifier-free guidance scale (1 = none; linear schedule from 1 at token 0).
    pub cfg: f32,
    /// Euler–Maruyama steps of the head per token (plus one final Euler step).
    pub steps: usize,
    pub seed: u64,
    /// Noise stream of `classes[0]` (0 for a whole request; the index of its first image for a piece of one).
    pub first_image: u64,
    /// Images per forward batch, before CFG doubling.
    pub batch: usize,
    /// Benchmarking only: sample just the first n tokens of every image (the rest stay zero) and
    /// extrapolate the time with [`crate::timing::Timing`]. `None` samples whole images.
    pub token_limit: Option<usize>,
}

impl SampleRequest {
    /// `rows` classes with `per_class` images each, row by row: the PNG grid layout (one row per class).
    pub fn grid(
        rows: &[i64],
        per_class: usize,
        cfg: f32,
        steps: usize,
        seed: u64,
        batch: usize,
    ) -> Result<Self, CoreError> {
        if per_class == 0 {
            return Err(CoreError::Invalid("--per-class must be ≥ 1".into()));
        }
        let classes = rows.iter().flat_map(|&c| std::iter::repeat_n(c, per_class)).collect();
        Ok(SampleRequest { classes, cfg, steps, seed, first_image: 0, batch, token_limit: None })
    }

    /// Tokens per image this request samples for a model with `num_tokens` tokens.
    pub fn tokens_to_sample(&self, num_tokens: usize) -> usize {
        self.token_limit.map_or(num_tokens, |n| n.min(num_tokens))
    }

    /// Checks the request against a model with `num_classes` classes; the message names the bad value.
    pub fn validate(&self, num_classes: usize) -> Result<(), CoreError> {
        validate_cfg(self.cfg)?;
        if self.steps == 0 {
            return Err(CoreError::Invalid("--steps must be ≥ 1".into()));
        }
        if self.steps > MAX_STEPS {
            return Err(CoreError::Invalid(format!("--steps must be at most {MAX_STEPS}, got {}", self.steps)));
        }
        if self.batch == 0 {
            return Err(CoreError::Invalid("--batch must be ≥ 1".into()));
        }
        if self.token_limit == Some(0) {
            return Err(CoreError::Invalid("--token-limit must be ≥ 1".into()));
        }
        if self.classes.is_empty() {
            return Err(CoreError::Invalid("no classes to sample".into()));
        }
        if let Some(c) = self.classes.iter().find(|&&c| c < 0 || c as usize >= num_classes) {
            return Err(CoreError::Invalid(format!(
                "class id {c} is outside 0..{num_classes} (the model has {num_classes} classes)"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_layout_and_validation() {
        let r = SampleRequest::grid(&[3, 7], 2, 3.0, 10, 1, 16).unwrap();
        assert_eq!(r.classes, vec![3, 3, 7, 7]);
        assert!(r.validate(10).is_ok());
        assert!(r.validate(7).unwrap_err().to_string().contains("class id 7 is outside 0..7"));
        assert!(SampleRequest::grid(&[1], 0, 3.0, 10, 1, 16).is_err());
        let bad = |f: &dyn Fn(&mut SampleRequest)| {
            let mut r = SampleRequest::grid(&[1], 1, 3.0, 10, 1, 16).unwrap();
            f(&mut r);
            r.validate(10).is_err()
        };
        assert!(bad(&|r| r.steps = 0));
        assert!(bad(&|r| r.steps = MAX_STEPS + 1));
        assert!(!bad(&|r| r.steps = MAX_STEPS));
        assert!(bad(&|r| r.batch = 0));
        assert!(bad(&|r| r.cfg = f32::NAN));
        assert!(bad(&|r| r.cfg = 0.5));
        assert!(bad(&|r| r.classes = vec![-1]));
        assert!(bad(&|r| r.classes.clear()));
        assert!(bad(&|r| r.token_limit = Some(0)));
    }
}
