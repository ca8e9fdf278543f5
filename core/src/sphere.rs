//! Projection onto the hypersphere of radius R.
//!
//! SphereAR constrains every continuous token z ∈ ℝ^d to the sphere of radius R = √d:
//! the S-VAE's latents live there, and each token produced by the autoregressive model is
//! mapped back onto it by z ↦ R · z / ‖z‖ before it is decoded or fed back as the next input.
//! Fixing the scale of the tokens this way is what keeps the variance of the latents from
//! collapsing or exploding under classifier-free guidance.
//!
//! The norm is accumulated in f64 and guarded by [`NORM_EPS`], so a zero token stays zero
//! instead of producing NaNs.

use crate::CoreError;

/// Lower bound on ‖z‖ in the projection z ↦ R · z / max(‖z‖, ε).
pub const NORM_EPS: f32 = 1e-7;

/// The paper's sphere radius for tokens of dimension `d`: R = √d.
pub fn radius(d: usize) -> f32 {
    (d as f64).sqrt() as f32
}

/// Projects every row of the row-major matrix `z` ([rows, d]) onto the sphere of radius `radius`:
/// row ← radius · row / max(‖row‖, [`NORM_EPS`]).
///
/// Errors when `d` is 0, when `z.len()` is not a multiple of `d`, or when `radius` is not a
/// finite positive number.
pub fn project_rows(z: &mut [f32], d: usize, radius: f32) -> Result<(), CoreError> {
    if d == 0 || !z.len().is_multiple_of(d) {
        return Err(CoreError::Invalid(format!(
            "cannot project a buffer of {} values onto the sphere in rows of d = {d}",
            z.len()
        )));
    }
    if !(radius.is_finite() && radius > 0.0) {
        return Err(CoreError::Invalid(format!("sphere radius must be finite and positive, got {radius}")));
    }
    for row in z.chunks_exact_mut(d) {
        let norm = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
        let scale = f64::from(radius) / norm.max(f64::from(NORM_EPS));
        for v in row.iter_mut() {
            *v = (f64::from(*v) * scale) as f32;
        }
    }
    Ok(())
}

/// Returns the projection of one token onto the sphere of radius `radius`
/// (see [`project_rows`]; an empty token is an error).
pub fn project(row: &[f32], radius: f32) -> Result<Vec<f32>, CoreError> {
    let mut out = row.to_vec();
    project_rows(&mut out, row.len(), radius)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn three_four_five() {
        // ‖(3, 4)‖ = 5, so R = 2 gives (3, 4) · 2/5 = (1.2, 1.6).
        let p = project(&[3.0, 4.0], 2.0).unwrap();
        assert!((p[0] - 1.2).abs() < 1e-6 && (p[1] - 1.6).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn zero_row_stays_zero() {
        let mut z = vec![0.0f32, 0.0, 0.0, 3.0, 0.0, 4.0];
        project_rows(&mut z, 3, 10.0).unwrap();
        assert_eq!(&z[..3], &[0.0, 0.0, 0.0]);
        // (3, 0, 4) · 10/5 = (6, 0, 8)
        assert!((z[3] - 6.0).abs() < 1e-5 && z[4] == 0.0 && (z[5] - 8.0).abs() < 1e-5, "{z:?}");
    }

    #[test]
    fn random_rows_land_on_the_sphere() {
        let d = 16;
        let r = radius(d);
        assert_eq!(r, 4.0);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut z: Vec<f32> = (0..d * 50).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        project_rows(&mut z, d, r).unwrap();
        for row in z.chunks(d) {
            let n = row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            assert!((n - 4.0).abs() < 1e-5, "norm {n}");
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(project_rows(&mut [1.0, 2.0, 3.0], 2, 1.0).is_err());
        assert!(project_rows(&mut [1.0], 0, 1.0).is_err());
        assert!(project(&[], 1.0).is_err());
        assert!(project(&[1.0], f32::NAN).is_err());
        assert!(project(&[1.0], -1.0).is_err());
    }
}
