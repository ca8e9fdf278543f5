//! The diagonal Gaussian posterior N(μ, diag σ²) of the Gaussian VAE baselines (the paper's G-xx and, with
//! the samples projected onto the sphere, N-xx): reparameterised sampling z = μ + σ·ε and the closed-form KL
//! to the standard normal prior, per element: ½(μ² + σ² − 1 − log σ²).

use tch::Tensor;

/// Bounds of log σ² (as latent-diffusion VAEs clamp it): keeps exp finite for an untrained encoder.
pub const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);

/// Diagonal Gaussian with means `mean` and log-variances `logvar` (same shape, [..., d]).
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// log σ², clamped to [`LOGVAR_RANGE`].
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    pub fn new(mean: &Tensor, logvar: &Tensor) -> Self {
        DiagonalGaussian { mean: mean.shallow_clone(), logvar: logvar.clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1) }
    }

    /// σ = exp(½ log σ²).
    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    /// Reparameterised sample μ + σ·ε, ε ~ N(0, I) (gradients flow to μ and log σ²).
    pub fn rsample(&self) -> Tensor {
        &self.mean + self.std() * self.mean.randn_like()
    }

    /// KL(q ‖ N(0, I)) of every element, shape of `mean`: ½(μ² + σ² − 1 − log σ²); zero at μ = 0, σ = 1.
    pub fn kl_to_standard_normal(&self) -> Tensor {
        (self.mean.square() + self.logvar.exp() - 1.0 - &self.logvar) * 0.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn vec(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1).to_kind(Kind::Float)).unwrap()
    }

    #[test]
    fn kl_matches_the_closed_form() {
        // Hand values: ½(μ² + σ² − 1 − log σ²).
        let mean = Tensor::from_slice(&[0.0f32, 0.0, 1.0, -2.0, 0.5]);
        let logvar = Tensor::from_slice(&[0.0f32, 2f32.ln(), 0.0, -1.0, 1.0]);
        let kl = vec(&DiagonalGaussian::new(&mean, &logvar).kl_to_standard_normal());
        let e = std::f64::consts::E;
        let want =
            [0.0, 0.5 * (2.0 - 1.0 - 2f64.ln()), 0.5, 0.5 * (4.0 + 1.0 / e - 1.0 + 1.0), 0.5 * (0.25 + e - 1.0 - 1.0)];
        for (k, w) in kl.iter().zip(want) {
            assert!((*k as f64 - w).abs() < 1e-6, "KL {kl:?} vs {want:?}");
        }
        assert_eq!(kl[0], 0.0, "KL is exactly 0 at μ = 0, σ = 1");
        // The clamp keeps an untrained encoder's extreme log-variances finite.
        let wild = DiagonalGaussian::new(&Tensor::from_slice(&[0.0f32]), &Tensor::from_slice(&[500.0f32]));
        assert_eq!(vec(&wild.logvar), vec![20.0]);
        assert!(vec(&wild.kl_to_standard_normal())[0].is_finite());
    }

    #[test]
    fn samples_have_the_posterior_mean_and_std() {
        tch::manual_seed(3);
        let n = 40000;
        let mean = Tensor::from_slice(&[1.5f32, -0.5, 0.0]).view([1, 3]).repeat([n, 1]);
        let sigma = [0.2f64, 1.0, 3.0];
        let logvar = Tensor::from_slice(&sigma.map(|s| (2.0 * s.ln()) as f32)).view([1, 3]).repeat([n, 1]);
        let q = DiagonalGaussian::new(&mean, &logvar);
        let z = q.rsample();
        let m = vec(&z.mean_dim([0i64].as_slice(), false, Kind::Float));
        let s = vec(&z.std_dim([0i64].as_slice(), true, false));
        for (i, (want_m, want_s)) in [(1.5, 0.2), (-0.5, 1.0), (0.0, 3.0)].into_iter().enumerate() {
            let se = want_s / (n as f64).sqrt();
            assert!((m[i] as f64 - want_m).abs() < 4.0 * se, "dim {i}: mean {} vs {want_m}", m[i]);
            assert!((s[i] as f64 / want_s - 1.0).abs() < 0.02, "dim {i}: std {} vs {want_s}", s[i]);
        }
    }

    #[test]
    fn gradients_flow_to_mean_and_logvar() {
        tch::manual_seed(4);
        let mean = Tensor::randn([8, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let logvar = Tensor::zeros([8, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let q = DiagonalGaussian::new(&mean, &logvar);
        let loss = q.rsample().square().sum(Kind::Float) + q.kl_to_standard_normal().sum(Kind::Float);
        loss.backward();
        for (name, g) in [("mean", mean.grad()), ("logvar", logvar.grad())] {
            let a = g.abs().sum(Kind::Float).double_value(&[]);
            assert!(a > 1e-3 && a.is_finite(), "no gradient to {name}: {a}");
        }
    }
}
