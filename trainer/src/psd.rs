//! The Power Spherical distribution (De Cao & Aziz, 2020) on the unit sphere S^{m−1}, used as the S-VAE
//! posterior: density ∝ (1 + μᵀx)^κ. Sampling is reparameterised: the cosine to μ comes from a Beta variate
//! built as Gamma / (Gamma + Gamma), whose gradient flows to κ; the rest is a uniform tangent direction and a
//! Householder reflection taking e₁ to μ, which is differentiable in μ.

use std::f64::consts::{LN_2, PI};
use tch::{Kind, Tensor};

/// Smallest norm used when normalising (the official `l2_norm` eps).
pub const EPS: f64 = 1e-7;

/// x / max(‖x‖, eps) along the last axis.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x.norm_scalaropt_dim(2, [-1i64].as_slice(), true).clamp_min(EPS);
    x / n
}

/// Power Spherical distribution with mean direction `mu` [..., m] and concentration `kappa` [...].
pub struct PowerSpherical {
    pub mu: Tensor,
    pub kappa: Tensor,
    /// Beta parameters of (1 + μᵀx)/2: α = κ + (m−1)/2, β = (m−1)/2.
    pub alpha: Tensor,
    pub beta: Tensor,
    m: i64,
}

impl PowerSpherical {
    pub fn new(mu: &Tensor, kappa: &Tensor) -> Self {
        let mu = l2_normalize(mu);
        let kappa = kappa.clamp_min(0.0);
        let m = *mu.size().last().unwrap_or(&1);
        let half = 0.5 * (m - 1) as f64;
        let alpha = &kappa + half;
        let beta = kappa.ones_like() * half;
        PowerSpherical { mu, kappa, alpha, beta, m }
    }

    /// Mean of the cosine μᵀx: (α − β)/(α + β).
    pub fn mean_cosine(&self) -> Tensor {
        (&self.alpha - &self.beta) / (&self.alpha + &self.beta)
    }

    fn log_normalizer(&self) -> Tensor {
        let ab = &self.alpha + &self.beta;
        -(&ab * LN_2) - &self.beta * PI.ln() - self.alpha.lgamma() + ab.lgamma()
    }

    /// Differential entropy H(q).
    pub fn entropy(&self) -> Tensor {
        let ab = &self.alpha + &self.beta;
        -(self.log_normalizer() + &self.kappa * (self.alpha.digamma() - ab.digamma() + LN_2))
    }

    /// KL(q ‖ U(S^{m−1})) = log|S^{m−1}| − H(q); zero at κ = 0, increasing in κ.
    pub fn kl_to_uniform(&self) -> Tensor {
        let half_m = 0.5 * self.m as f64;
        let log_area = LN_2 + half_m * PI.ln() - Tensor::from(half_m).lgamma().double_value(&[]);
        log_area - self.entropy()
    }

    /// Reparameterised sample on the unit sphere, shape of `mu`.
    pub fn rsample(&self) -> Tensor {
        // Beta(α, β) = Ga / (Ga + Gb); standard_gamma is differentiable in its concentration.
        let ga = self.alpha.internal_standard_gamma();
        let gb = self.beta.internal_standard_gamma();
        let t = (ga.shallow_clone() / (ga + gb) * 2.0 - 1.0).unsqueeze(-1);
        let mut shape = self.mu.size();
        if let Some(last) = shape.last_mut() {
            *last -= 1;
        }
        let v = l2_normalize(&Tensor::randn(shape.as_slice(), (self.mu.kind(), self.mu.device())));
        let y = Tensor::cat(&[t.shallow_clone(), (t.square().neg() + 1.0).clamp_min(0.0).sqrt() * v], -1);
        // Householder reflection H = I − 2uuᵀ with u = (e₁ − μ)/‖e₁ − μ‖ maps e₁ to μ.
        let e1 = self.mu.zeros_like();
        let _ = e1.narrow(-1, 0, 1).fill_(1.0);
        let u = l2_normalize(&(&e1 - &self.mu));
        let z = &y - (&y * &u).sum_dim_intlist(-1, true, Kind::Float) * 2.0 * &u;
        // When μ = e₁ the reflection is undefined: the sample is y itself.
        let parallel = (&self.mu - &e1).abs().sum_dim_intlist(-1, true, Kind::Float).lt(1e-6);
        z.where_self(&parallel.logical_not(), &y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vec(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1).to_kind(Kind::Float)).unwrap()
    }

    #[test]
    fn samples_have_unit_norm_and_match_mean_cosine() {
        tch::manual_seed(0);
        let m = 16;
        for kappa in [0.5f64, 5.0, 50.0] {
            let n = 20000;
            let mu = Tensor::randn([1, m], (Kind::Float, tch::Device::Cpu)).repeat([n, 1]);
            let kap = Tensor::full([n], kappa, (Kind::Float, tch::Device::Cpu));
            let q = PowerSpherical::new(&mu, &kap);
            let x = q.rsample();
            let norms = vec(&x.norm_scalaropt_dim(2, [-1i64].as_slice(), false));
            assert!(norms.iter().all(|v| (v - 1.0).abs() < 1e-5), "norms off for kappa {kappa}");
            let cos = (&x * &q.mu).sum_dim_intlist(-1, false, Kind::Float);
            let mean = cos.mean(Kind::Float).double_value(&[]);
            let se = cos.std(true).double_value(&[]) / (n as f64).sqrt();
            let alpha = kappa + 7.5;
            let expect = (alpha - 7.5) / (alpha + 7.5);
            assert!((mean - expect).abs() < 3.0 * se, "kappa {kappa}: mean {mean} vs {expect} (se {se})");
            let closed = q.mean_cosine().mean(Kind::Float).double_value(&[]);
            assert!((closed - expect).abs() < 1e-6);
        }
    }

    #[test]
    fn kl_is_zero_at_zero_and_increasing() {
        let mu = Tensor::randn([6, 16], (Kind::Float, tch::Device::Cpu));
        let kap = Tensor::from_slice(&[0.0f32, 0.1, 1.0, 10.0, 100.0, 1000.0]);
        let kl = vec(&PowerSpherical::new(&mu, &kap).kl_to_uniform());
        assert!(kl[0].abs() < 1e-4, "KL at kappa 0 = {}", kl[0]);
        for w in kl.windows(2) {
            assert!(w[1] > w[0] && w[1] > 0.0, "KL not increasing: {kl:?}");
        }
    }

    #[test]
    fn gradients_flow_to_mu_and_kappa() {
        tch::manual_seed(1);
        let mu = Tensor::randn([32, 16], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let kap = (Tensor::ones([32], (Kind::Float, tch::Device::Cpu)) * 3.0).set_requires_grad(true);
        let q = PowerSpherical::new(&mu, &kap);
        let target = Tensor::randn([32, 16], (Kind::Float, tch::Device::Cpu));
        let loss = (q.rsample() - target).square().sum(Kind::Float) + q.kl_to_uniform().sum(Kind::Float);
        loss.backward();
        let gm = mu.grad().abs().sum(Kind::Float).double_value(&[]);
        let gk = kap.grad().abs().sum(Kind::Float).double_value(&[]);
        assert!(gm > 1e-3 && gm.is_finite(), "no gradient to mu: {gm}");
        assert!(gk > 1e-3 && gk.is_finite(), "no gradient to kappa: {gk}");
    }
}
