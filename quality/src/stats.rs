//! Feature statistics for quality evaluation: the Gaussian (mean, covariance) of a feature set and the
//! Fréchet distance between two Gaussians (the FID formula, here over the judge's features):
//!
//! d² = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½
//!
//! The matrix square roots use symmetric eigendecompositions (nalgebra), which keeps every intermediate
//! symmetric; eigenvalues below zero (rounding on rank-deficient covariances) are clamped to zero.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use crate::error::QualityError;

/// Mean and covariance (unbiased, n − 1) of a set of feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Gaussian {
    pub mean: DVector<f64>,
    pub cov: DMatrix<f64>,
    pub count: usize,
}

impl Gaussian {
    /// Fits `rows` vectors of length `dim` stored row-major in `data`.
    pub fn fit(data: &[f32], dim: usize) -> Result<Self, QualityError> {
        if dim == 0 || data.len() % dim != 0 {
            return Err(QualityError::Invalid(format!("{} feature values do not form rows of {dim}", data.len())));
        }
        let n = data.len() / dim;
        if n < 2 {
            return Err(QualityError::Invalid(format!("a covariance needs at least 2 samples, got {n}")));
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err(QualityError::Invalid("features contain NaN or infinity".into()));
        }
        let x = DMatrix::<f64>::from_iterator(dim, n, data.iter().map(|&v| v as f64));
        let mean = x.column_mean();
        let mut centered = x;
        for mut c in centered.column_iter_mut() {
            c -= &mean;
        }
        let cov = (&centered * centered.transpose()) / (n as f64 - 1.0);
        Ok(Gaussian { mean, cov, count: n })
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }
}

/// Square root of a symmetric positive semi-definite matrix (negative eigenvalues clamped to 0).
pub fn sqrtm_psd(m: &DMatrix<f64>) -> DMatrix<f64> {
    let sym = (m + m.transpose()) * 0.5;
    let e = SymmetricEigen::new(sym);
    let s = DMatrix::from_diagonal(&e.eigenvalues.map(|v| v.max(0.0).sqrt()));
    &e.eigenvectors * s * e.eigenvectors.transpose()
}

/// Squared Fréchet distance between two Gaussians of the same dimension.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> Result<f64, QualityError> {
    if a.dim() != b.dim() {
        return Err(QualityError::Invalid(format!("feature dimensions differ: {} vs {}", a.dim(), b.dim())));
    }
    let diff = &a.mean - &b.mean;
    let sa = sqrtm_psd(&a.cov);
    let m = &sa * &b.cov * &sa;
    let sym = (&m + m.transpose()) * 0.5;
    let cross: f64 = SymmetricEigen::new(sym).eigenvalues.iter().map(|v| v.max(0.0).sqrt()).sum();
    let d = diff.dot(&diff) + a.cov.trace() + b.cov.trace() - 2.0 * cross;
    // Rounding can push identical distributions a hair below zero.
    Ok(d.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    fn gauss(mean: &[f64], cov: &[f64]) -> Gaussian {
        let d = mean.len();
        Gaussian { mean: DVector::from_column_slice(mean), cov: DMatrix::from_row_slice(d, d, cov), count: 0 }
    }

    #[test]
    fn diagonal_gaussians_closed_form() {
        // For commuting (here diagonal) covariances d² = |Δμ|² + Σ (σ₁ᵢ − σ₂ᵢ)².
        let a = gauss(&[0.0, 1.0, 2.0], &[4.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 9.0]);
        let b = gauss(&[1.0, 1.0, 0.0], &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 16.0]);
        let want = (1.0 + 0.0 + 4.0) + (2.0f64 - 1.0).powi(2) + 0.0 + (3.0f64 - 4.0).powi(2);
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!((frechet_distance(&b, &a).unwrap() - want).abs() < 1e-9);
        assert!(frechet_distance(&a, &a).unwrap() < 1e-9);
    }

    #[test]
    fn scaled_full_covariance_closed_form() {
        // Σ₂ = c² Σ₁ (non-diagonal): tr(Σ₁^½ Σ₂ Σ₁^½)^½ = c tr Σ₁, so d² = |Δμ|² + (1 − c)² tr Σ₁.
        let s1 = [2.0, 0.6, 0.3, 0.6, 1.0, -0.2, 0.3, -0.2, 0.5];
        let c: f64 = 1.7;
        let s2: Vec<f64> = s1.iter().map(|v| v * c * c).collect();
        let a = gauss(&[0.0, 0.0, 0.0], &s1);
        let b = gauss(&[0.5, -1.0, 0.0], &s2);
        let want = 1.25 + (1.0 - c).powi(2) * 3.5;
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn fitted_from_samples_converges() {
        // Samples of N(μ, diag σ²): the fitted Gaussian and the distance approach the analytic values.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let n = 20000;
        let draw = |rng: &mut rand_chacha::ChaCha8Rng, mu: [f64; 2], sd: [f64; 2]| -> Vec<f32> {
            (0..n)
                .flat_map(|_| {
                    let z0: f64 = StandardNormal.sample(rng);
                    let z1: f64 = StandardNormal.sample(rng);
                    [(mu[0] + sd[0] * z0) as f32, (mu[1] + sd[1] * z1) as f32]
                })
                .collect()
        };
        let a = Gaussian::fit(&draw(&mut rng, [0.0, 0.0], [1.0, 2.0]), 2).unwrap();
        let b = Gaussian::fit(&draw(&mut rng, [1.0, 0.0], [1.0, 1.0]), 2).unwrap();
        assert_eq!(a.count, n);
        assert!((a.cov[(1, 1)] - 4.0).abs() < 0.15, "{}", a.cov[(1, 1)]);
        let want = 1.0 + 0.0 + 1.0; // |Δμ|² = 1, (2 − 1)² = 1
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - want).abs() < 0.1, "{got} vs {want}");
    }

    #[test]
    fn bad_input() {
        assert!(Gaussian::fit(&[1.0, 2.0, 3.0], 2).is_err());
        assert!(Gaussian::fit(&[1.0, 2.0], 2).is_err());
        assert!(Gaussian::fit(&[1.0, f32::NAN, 3.0, 4.0], 2).is_err());
        let a = gauss(&[0.0], &[1.0]);
        let b = gauss(&[0.0, 0.0], &[1.0, 0.0, 0.0, 1.0]);
        assert!(frechet_distance(&a, &b).is_err());
    }
}
