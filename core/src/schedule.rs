//! Sampling schedules: the linear classifier-free-guidance schedule over tokens and the
//! Euler–Maruyama time grid of the per-token diffusion head.
//!
//! SphereAR samples the L tokens of an image one after another. For token i the guidance scale
//! grows linearly, g_i = 1 + (cfg − 1) · i / L. Each token is produced by integrating the head's
//! velocity field v(x, t) from t = 0 (noise) to t = 1 with the stochastic Euler–Maruyama scheme
//!
//!   x ← x + ((1 + t) · v − x) · dt + √(2 (1 − t) dt) · ε,   ε ~ N(0, I),
//!
//! over `steps` equal steps of dt = (1 − 0.04) / steps, followed by one deterministic Euler step
//! x ← x + v · 0.04 at t = 0.96. The head is therefore evaluated steps + 1 times per token.
//! All of the grid's arithmetic is done in f32, in the same order as the official code, so that
//! every runtime integrates over bit-identical times.
//!
//! [`em_update`], [`euler_update`] and [`guide`] are the single definitions of these updates
//! that every crate of the toolchain uses.

use crate::CoreError;

/// Length of the final deterministic Euler step (and the time left after the EM steps).
pub const LAST_DT: f32 = 0.04;
/// Euler–Maruyama steps of the official sampler (`--steps` default of an export).
pub const DEFAULT_STEPS: usize = 100;
/// Most Euler–Maruyama steps a time grid may have: far beyond any useful sampler, and small enough that
/// the grid (8 bytes a step) never exhausts memory.
pub const MAX_STEPS: usize = 1_000_000;

/// Guidance scale of token `token` out of `num_tokens` under the linear CFG schedule:
/// 1 + (cfg − 1) · token / num_tokens when cfg > 1 (evaluated left to right in f64, as the
/// official Python does, then rounded to f32), else 1. With `num_tokens == 0` it is 1.
pub fn cfg_for_token(cfg: f32, token: usize, num_tokens: usize) -> f32 {
    if cfg > 1.0 && num_tokens > 0 {
        let start = 1.0f64;
        (start + (f64::from(cfg) - start) * token as f64 / num_tokens as f64) as f32
    } else {
        1.0
    }
}

/// Checks a user-supplied CFG scale: it must be a finite number ≥ 1 (1 disables guidance).
pub fn validate_cfg(cfg: f32) -> Result<(), CoreError> {
    if cfg.is_finite() && cfg >= 1.0 {
        Ok(())
    } else {
        Err(CoreError::Invalid(format!("cfg scale must be a finite number >= 1, got {cfg}")))
    }
}

/// How one token is sampled under a given CFG scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenPlan {
    /// cfg > 1: the AR model runs 2B rows, the B conditional rows followed by B null-class rows.
    pub doubled_batch: bool,
    /// The head's velocities are guided, v = v_u + g · (v_c − v_u), and the single resulting token
    /// is fed to both halves of the batch.
    pub guided: bool,
    /// The scale g of the linear schedule for this token.
    pub guidance: f32,
    /// Noise rows drawn per image for every draw of this token (1 or 2).
    pub noise_rows_per_image: usize,
}

/// The plan for token `token` of `num_tokens`.
///
/// Official quirk, kept on purpose: at token 0 the linear schedule gives g = 1 and the official
/// sampler then does not guide at all. All 2B rows are sampled independently (2 noise rows per
/// image), so each CFG half keeps its own token 0. From token 1 on, B noise rows are drawn, the
/// velocities are guided and the one token is fed to both halves.
pub fn token_plan(cfg: f32, token: usize, num_tokens: usize) -> TokenPlan {
    let doubled_batch = cfg > 1.0;
    let guidance = cfg_for_token(cfg, token, num_tokens);
    let guided = doubled_batch && guidance > 1.0;
    TokenPlan { doubled_batch, guided, guidance, noise_rows_per_image: if doubled_batch && !guided { 2 } else { 1 } }
}

/// The Euler–Maruyama time grid of one token.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeGrid {
    /// Number of EM steps.
    pub steps: usize,
    /// EM step length (1 − 0.04) / steps.
    pub dt: f32,
    /// `times[k]`: the time t of EM step k (t_0 = 0, t_{k+1} = t_k + dt in f32).
    pub times: Vec<f32>,
    /// `noise_scales[k]` = √(2 (1 − t_k) dt), in f32.
    pub noise_scales: Vec<f32>,
    /// Time of the final Euler step: 1 − 0.04.
    pub last_t: f32,
    /// Length of the final Euler step: 0.04.
    pub last_dt: f32,
}

/// Builds the time grid for `steps` EM steps (at least 1).
pub fn em_time_grid(steps: usize) -> Result<TimeGrid, CoreError> {
    if steps == 0 {
        return Err(CoreError::Invalid("the Euler–Maruyama sampler needs at least 1 step".into()));
    }
    if steps > MAX_STEPS {
        return Err(CoreError::Invalid(format!(
            "the Euler–Maruyama sampler takes at most {MAX_STEPS} steps, got {steps}"
        )));
    }
    let dt = (1.0f32 - LAST_DT) / steps as f32;
    let times: Vec<f32> = std::iter::successors(Some(0.0f32), |t| Some(t + dt)).take(steps).collect();
    let noise_scales = times.iter().map(|t| (2.0f32 * (1.0 - t) * dt).sqrt()).collect();
    Ok(TimeGrid { steps, dt, times, noise_scales, last_t: 1.0 - LAST_DT, last_dt: LAST_DT })
}

/// Head evaluations per token: one per EM step plus the final Euler step.
pub fn head_evals(steps: usize) -> usize {
    steps + 1
}

fn check_len(what: &str, expect: usize, lens: &[usize]) -> Result<(), CoreError> {
    match lens.iter().find(|&&n| n != expect) {
        Some(n) => Err(CoreError::Invalid(format!("{what}: buffer of {n} values, expected {expect}"))),
        None => Ok(()),
    }
}

/// One Euler–Maruyama step at time `t`: x ← x + ((1 + t) · v − x) · dt + noise_scale · ε.
/// Errors when `v` or `eps` is not as long as `x`.
pub fn em_update(x: &mut [f32], v: &[f32], eps: &[f32], t: f32, dt: f32, noise_scale: f32) -> Result<(), CoreError> {
    check_len("em_update", x.len(), &[v.len(), eps.len()])?;
    for ((xi, &vi), &ei) in x.iter_mut().zip(v).zip(eps) {
        let drift = (1.0 + t) * vi - *xi;
        *xi = *xi + drift * dt + noise_scale * ei;
    }
    Ok(())
}

/// The final deterministic Euler step: x ← x + v · dt. Errors when `v` is not as long as `x`.
pub fn euler_update(x: &mut [f32], v: &[f32], dt: f32) -> Result<(), CoreError> {
    check_len("euler_update", x.len(), &[v.len()])?;
    for (xi, &vi) in x.iter_mut().zip(v) {
        *xi += vi * dt;
    }
    Ok(())
}

/// Classifier-free guidance of the head's velocity: out = v_u + g · (v_c − v_u).
/// Errors when the three buffers differ in length.
pub fn guide(v_cond: &[f32], v_uncond: &[f32], g: f32, out: &mut [f32]) -> Result<(), CoreError> {
    check_len("guide", out.len(), &[v_cond.len(), v_uncond.len()])?;
    for ((o, &c), &u) in out.iter_mut().zip(v_cond).zip(v_uncond) {
        *o = u + g * (c - u);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn linear_cfg_schedule() {
        assert_eq!(cfg_for_token(3.0, 0, 64), 1.0);
        assert_eq!(cfg_for_token(3.0, 5, 64), 1.15625); // 1 + 2·5/64
        assert_eq!(cfg_for_token(3.0, 8, 64), 1.25); // 1 + 2·8/64
        assert_eq!(cfg_for_token(3.0, 5, 40), 1.25); // 1 + 2·5/40
        assert_eq!(cfg_for_token(1.0, 5, 64), 1.0);
        assert_eq!(cfg_for_token(0.5, 5, 64), 1.0);
        assert_eq!(cfg_for_token(3.0, 5, 0), 1.0);
    }

    #[test]
    fn plans() {
        let off = TokenPlan { doubled_batch: false, guided: false, guidance: 1.0, noise_rows_per_image: 1 };
        assert_eq!(token_plan(1.0, 0, 64), off);
        assert_eq!(token_plan(1.0, 5, 64), off);
        // Token 0 under CFG: both halves sampled independently, 2 noise rows per image.
        let first = TokenPlan { doubled_batch: true, guided: false, guidance: 1.0, noise_rows_per_image: 2 };
        assert_eq!(token_plan(3.0, 0, 64), first);
        let fifth = TokenPlan { doubled_batch: true, guided: true, guidance: 1.15625, noise_rows_per_image: 1 };
        assert_eq!(token_plan(3.0, 5, 64), fifth);
        assert_eq!(token_plan(3.0, 5, 40).guidance, 1.25);
    }

    #[test]
    fn cfg_validation() {
        assert!(validate_cfg(1.0).is_ok() && validate_cfg(4.5).is_ok());
        for bad in [f32::NAN, 0.5, f32::INFINITY] {
            let msg = validate_cfg(bad).unwrap_err().to_string();
            assert!(msg.contains(&bad.to_string()), "{msg}");
        }
    }

    #[test]
    fn one_step_grid() {
        let g = em_time_grid(1).unwrap();
        assert_eq!(g.dt, 0.96);
        assert_eq!(g.times, vec![0.0]);
        close(&g.noise_scales, &[1.385_640_6], 1e-6); // √1.92
        assert_eq!((g.last_t, g.last_dt, g.steps), (0.96, 0.04, 1));
        assert_eq!(head_evals(1), 2);
        // A step count from a flag is bounded before anything is allocated for it.
        assert!(em_time_grid(MAX_STEPS + 1).unwrap_err().to_string().contains("at most 1000000 steps"));
        assert!(em_time_grid(usize::MAX).is_err());
    }

    #[test]
    fn four_step_grid() {
        let g = em_time_grid(4).unwrap();
        assert!((g.dt - 0.24).abs() < 1e-7);
        close(&g.times, &[0.0, 0.24, 0.48, 0.72], 1e-6);
        // √(2 (1 − t) 0.24) for t = 0, 0.24, 0.48, 0.72
        close(&g.noise_scales, &[0.692_820_3, 0.603_986_75, 0.499_599_84, 0.366_606_06], 1e-6);
        assert!(em_time_grid(0).is_err());
        assert_eq!(head_evals(4), 5);
    }

    #[test]
    fn updates_by_hand() {
        // drift = 1.5·(0.5, 1) − (1, −2) = (−0.25, 3.5);
        // x = (1 − 0.025 + 0.2, −2 + 0.35 − 0.2) = (1.175, −1.85).
        let mut x = [1.0f32, -2.0];
        em_update(&mut x, &[0.5, 1.0], &[1.0, -1.0], 0.5, 0.1, 0.2).unwrap();
        close(&x, &[1.175, -1.85], 1e-6);

        let mut y = [1.0f32, 2.0];
        euler_update(&mut y, &[0.5, -1.0], 0.04).unwrap();
        close(&y, &[1.02, 1.96], 1e-6);

        // (0, 4) + 1.5·((1, 2) − (0, 4)) = (1.5, 1)
        let mut out = [0.0f32; 2];
        guide(&[1.0, 2.0], &[0.0, 4.0], 1.5, &mut out).unwrap();
        close(&out, &[1.5, 1.0], 1e-6);

        assert!(em_update(&mut x, &[0.0], &[0.0, 0.0], 0.0, 0.1, 0.1).is_err());
        assert!(euler_update(&mut y, &[0.0; 3], 0.1).is_err());
        assert!(guide(&[1.0, 2.0], &[0.0], 1.5, &mut out).is_err());
    }
}

/// Factor applied to t ∈ [0, 1] before the sinusoidal time embedding of the diffusion head.
pub const TIME_FACTOR: f32 = 1000.0;
/// Longest period of the sinusoidal time embedding.
pub const TIME_MAX_PERIOD: f32 = 10000.0;

/// Frequencies of the head's sinusoidal time embedding of width `dim`: f_j = exp(−ln(10000)·j/(dim/2)),
/// j < dim/2, computed in f32 as the official code does.
pub fn timestep_frequencies(dim: usize) -> Vec<f32> {
    let half = dim / 2;
    (0..half).map(|j| (-TIME_MAX_PERIOD.ln() * j as f32 / half as f32).exp()).collect()
}

#[cfg(test)]
mod time_embedding_tests {
    use super::*;

    #[test]
    fn hand_values() {
        let f = timestep_frequencies(4);
        assert_eq!(f.len(), 2);
        assert!((f[0] - 1.0).abs() < 1e-7 && (f[1] - 0.01).abs() < 1e-7, "{f:?}");
    }
}
