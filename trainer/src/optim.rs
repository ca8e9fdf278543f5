//! AdamW with decoupled weight decay (official or our decay groups), the learning-rate schedules (the
//! official warmup/constant/cosine of `train.py`, and ours), the EMA of the weights, and global-norm gradient
//! clipping. Written out (rather than tch's C++ optimizer) so that its moments can be checkpointed and a run
//! resumes exactly where it stopped.

use std::collections::{BTreeMap, HashMap};
use tch::{nn::VarStore, Kind, Tensor};

/// Hyper-parameters (official defaults: β = (0.9, 0.95), weight decay 0.05). `Default` has our decay groups
/// (the judge's); the VAE and AR stages set `groups` from their recipe.
#[derive(Debug, Clone)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub groups: DecayGroups,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05, groups: DecayGroups::Ours }
    }
}

/// Which parameters get weight decay (`--decay-groups`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecayGroups {
    /// The official `create_optimizer`: every tensor with ≥ 2 dims except names containing `proj_in` or
    /// `cls_embedding` (so `pos_for_diff` and the VAE's `register_token` are decayed).
    Official,
    /// Ours before: also exempts `pos_for_diff` and `register_token`.
    Ours,
}

impl DecayGroups {
    /// The flag value (`official`, `ours`).
    pub fn name(self) -> &'static str {
        match self {
            DecayGroups::Official => "official",
            DecayGroups::Ours => "ours",
        }
    }
}

struct Param {
    name: String,
    var: Tensor,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Param>,
    pub step: i64,
}

/// Whether the parameter `name` gets weight decay: tensors with ≥ 2 dims (matrices, convolution kernels,
/// embeddings), except the names of [`DecayGroups`] (never norms or biases).
pub fn decays(name: &str, t: &Tensor, groups: DecayGroups) -> bool {
    const OFFICIAL: &[&str] = &["proj_in", "cls_embedding"];
    const OURS: &[&str] = &["proj_in", "cls_embedding", "register_token", "pos_for_diff"];
    let exempt = match groups {
        DecayGroups::Official => OFFICIAL,
        DecayGroups::Ours => OURS,
    };
    t.dim() >= 2 && !exempt.iter().any(|k| name.contains(k))
}

impl AdamW {
    /// Optimises every trainable variable of `vs` whose name `include` accepts.
    pub fn new(vs: &VarStore, include: impl Fn(&str) -> bool, cfg: AdamWConfig) -> Self {
        let trainable: Vec<Tensor> = vs.trainable_variables();
        let is_trainable = |t: &Tensor| trainable.iter().any(|x| x.data_ptr() == t.data_ptr());
        let mut params: Vec<Param> = vs
            .variables()
            .into_iter()
            .filter(|(n, t)| include(n) && is_trainable(t))
            .map(|(name, var)| Param {
                decay: decays(&name, &var, cfg.groups),
                m: var.zeros_like(),
                v: var.zeros_like(),
                name,
                var,
            })
            .collect();
        params.sort_by(|a, b| a.name.cmp(&b.name));
        AdamW { cfg, params, step: 0 }
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.var.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Scales gradients so that their global L2 norm is at most `max`; returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max: f64) -> f64 {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(|p| p.var.grad()).filter(|g| g.defined()).collect();
            if grads.is_empty() {
                return 0.0;
            }
            let sq: Vec<Tensor> = grads.iter().map(|g| g.square().sum(Kind::Float)).collect();
            let total = Tensor::stack(&sq, 0).sum(Kind::Float).sqrt().double_value(&[]);
            if total.is_finite() && total > max {
                let s = max / (total + 1e-6);
                for mut g in grads {
                    let _ = g.g_mul_scalar_(s);
                }
            }
            total
        })
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.var.grad();
                if !g.defined() {
                    continue;
                }
                if p.decay && c.weight_decay > 0.0 {
                    let _ = p.var.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = p.m.g_mul_scalar_(c.beta1);
                let _ = p.m.g_add_(&(&g * (1.0 - c.beta1)));
                let _ = p.v.g_mul_scalar_(c.beta2);
                let _ = p.v.g_add_(&(g.square() * (1.0 - c.beta2)));
                let denom = (&p.v / bc2).sqrt() + c.eps;
                let _ = p.var.g_sub_(&(&p.m / &denom * (lr / bc1)));
            }
        });
    }

    /// Optimizer moments for a checkpoint: `optim.m.<key>`, `optim.v.<key>`.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            out.insert(format!("optim.m.{}", p.name), p.m.copy());
            out.insert(format!("optim.v.{}", p.name), p.v.copy());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`]; missing entries are an error naming the key.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: i64) -> Result<(), String> {
        for p in &mut self.params {
            for (kind, dst) in [("m", &mut p.m), ("v", &mut p.v)] {
                let key = format!("optim.{kind}.{}", p.name);
                let src = tensors.get(&key).ok_or_else(|| format!("optimizer state lacks {key}"))?;
                if src.size() != dst.size() {
                    return Err(format!("optimizer state {key} has shape {:?}, expected {:?}", src.size(), dst.size()));
                }
                tch::no_grad(|| dst.copy_(src));
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Which learning-rate schedule a stage follows (`--lr-schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LrSchedule {
    /// The official `adjust_learning_rate` (`lr_official`): warmup peak·step/W, then the peak, then from
    /// `--decay-start` (if any) a cosine to the absolute `--min-lr` at the last step.
    Official,
    /// Ours before (`lr_at`): warmup peak·(step+1)/W, then a cosine from the end of the warmup to
    /// `--min-lr` (default 0.05 × peak) at the last step.
    Ours,
}

impl LrSchedule {
    /// The flag value (`official`, `ours`).
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Official => "official",
            LrSchedule::Ours => "ours",
        }
    }
}

/// Floor of our cosine as a fraction of the peak, unless `--min-lr` is given.
pub const OURS_MIN_LR_RATIO: f64 = 0.05;
/// Floor of the official cosine (`train.py --min-lr`).
pub const OFFICIAL_MIN_LR: f64 = 1e-5;

/// The official schedule at 0-based `step` of `total`: peak·step/warmup during the warmup, then `peak`;
/// with `decay_start = Some(s)` and s < total, from step s a cosine from `peak` to `min_lr` (absolute) at
/// `total`. `decay_start = None` (the official VAE run's `--decay-start -1`) keeps the peak to the end.
pub fn lr_official(
    step: usize,
    total: usize,
    warmup: usize,
    decay_start: Option<usize>,
    peak: f64,
    min_lr: f64,
) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * step as f64 / warmup as f64;
    }
    match decay_start {
        Some(s) if step >= s && s < total => {
            let p = (step - s) as f64 / (total - s) as f64;
            min_lr + (peak - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
        _ => peak,
    }
}

/// Our schedule: linear warmup from peak/warmup to `peak` over `warmup` steps, then cosine decay to
/// `peak · min_ratio` at `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup.min(step)) as f64 / span).min(1.0);
    let min = peak * min_ratio;
    min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
}

/// The exponential moving average of the trained weights that ships: after optimizer step t (1-based),
/// e ← d_t·e + (1 − d_t)·p, starting from an exact copy of the initial weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ema {
    /// The decay d (`--ema-decay`; official 0.9999).
    pub decay: f64,
    /// `--ema-warmup`: d_t = min(d, (1 + t)/(10 + t)) (ours) instead of the official constant d_t = d.
    pub warmup: bool,
}

impl Ema {
    /// The decay applied after optimizer step `t` (1-based).
    pub fn decay_at(&self, t: i64) -> f64 {
        let t = t as f64;
        if self.warmup {
            self.decay.min((1.0 + t) / (10.0 + t))
        } else {
            self.decay
        }
    }

    /// Moves every tensor of `ema` towards the variable of the same name in `vars`, after step `t`.
    pub fn update(&self, ema: &mut BTreeMap<String, Tensor>, vars: &HashMap<String, Tensor>, t: i64) {
        let decay = self.decay_at(t);
        tch::no_grad(|| {
            for (name, e) in ema.iter_mut() {
                if let Some(p) = vars.get(name) {
                    let _ = e.g_mul_scalar_(decay);
                    let _ = e.g_add_(&(p * (1.0 - decay)));
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_hand_values() {
        assert!((lr_at(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0, 0.1) - 0.55).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn official_ar_schedule_hand_values() {
        // The official AR run: peak 3e-4, warmup = decay start = 20000, min 1e-5; 100000 steps here.
        let lr = |s| lr_official(s, 100_000, 20_000, Some(20_000), 3e-4, 1e-5);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        assert!(close(lr(0), 0.0));
        assert!(close(lr(5_000), 7.5e-5));
        assert!(close(lr(19_999), 3e-4 * 19_999.0 / 20_000.0));
        assert!(close(lr(20_000), 3e-4));
        // Halfway through the decay: the mean of peak and floor; a quarter: floor + (peak − floor)(1 + cos π/4)/2.
        assert!(close(lr(60_000), (3e-4 + 1e-5) / 2.0));
        let q = 1e-5 + 2.9e-4 * 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2);
        assert!(close(lr(40_000), q));
        assert!(close(lr(100_000), 1e-5));
        // A decay start at or past the end never decays.
        assert!(close(lr_official(50, 40, 10, Some(40), 1.0, 0.0), 1.0));
    }

    #[test]
    fn official_vae_schedule_is_constant() {
        // The official VAE run: --lr 1e-4 --warmup-steps -1 --decay-start -1.
        for s in [0, 1, 999, 500_000] {
            assert_eq!(lr_official(s, 500_400, 0, None, 1e-4, OFFICIAL_MIN_LR), 1e-4);
        }
    }

    #[test]
    fn ema_one_step_by_hand() {
        let vars: HashMap<String, Tensor> = [("w".to_string(), Tensor::from_slice(&[3.0f32]))].into();
        let one = || -> BTreeMap<String, Tensor> { [("w".to_string(), Tensor::from_slice(&[1.0f32]))].into() };
        let value = |e: &BTreeMap<String, Tensor>| e["w"].double_value(&[0]);
        // Official: constant 0.9999 → 0.9999·1 + 0.0001·3 = 1.0002.
        let mut e = one();
        Ema { decay: 0.9999, warmup: false }.update(&mut e, &vars, 1);
        assert!((value(&e) - 1.0002).abs() < 1e-6, "{}", value(&e));
        // Warm-up after step 1: d = min(0.9999, 2/11) → 2/11·1 + 9/11·3 = 29/11.
        let mut e = one();
        let w = Ema { decay: 0.9999, warmup: true };
        assert!((w.decay_at(1) - 2.0 / 11.0).abs() < 1e-15);
        w.update(&mut e, &vars, 1);
        assert!((value(&e) - 29.0 / 11.0).abs() < 1e-6, "{}", value(&e));
        // Late in training the warm-up reaches the constant.
        assert_eq!(w.decay_at(1_000_000), 0.9999);
    }

    #[test]
    fn decay_groups_on_official_names() {
        let m = Tensor::zeros([4, 4], (Kind::Float, tch::Device::Cpu));
        let v = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
        // (name, tensor, official decays, ours decays); names from the official SphereAR-B state dict.
        let cases = [
            ("proj_in.weight", &m, false, false),
            ("proj_in.bias", &v, false, false),
            ("cls_embedding.weight", &m, false, false),
            ("pos_for_diff.weight", &m, true, false),
            ("vae.encoder.register_token.weight", &m, true, false),
            ("vae.decoder.register_token.weight", &m, true, false),
            ("layers.0.attention.wqkv.weight", &m, true, true),
            ("head.net.input_proj.weight", &m, true, true),
            ("head.net.res_blocks.0.norm.weight", &v, false, false),
            ("emb_norm.weight", &v, false, false),
            ("vae.quant_proj.bias", &v, false, false),
        ];
        for (name, t, official, ours) in cases {
            assert_eq!(decays(name, t, DecayGroups::Official), official, "{name} (official)");
            assert_eq!(decays(name, t, DecayGroups::Ours), ours, "{name} (ours)");
        }
    }

    #[test]
    fn adamw_minimises_a_quadratic_and_decay_groups() {
        let vs = VarStore::new(tch::Device::Cpu);
        let w = (vs.root() / "lin").var("weight", &[4, 4], tch::nn::Init::Const(1.0));
        let b = (vs.root() / "lin").var("bias", &[4], tch::nn::Init::Const(1.0));
        let mut opt = AdamW::new(&vs, |_| true, AdamWConfig::default());
        assert!(opt.params.iter().find(|p| p.name == "lin.weight").unwrap().decay);
        assert!(!opt.params.iter().find(|p| p.name == "lin.bias").unwrap().decay);
        let first = (w.square().sum(Kind::Float) + b.square().sum(Kind::Float)).double_value(&[]);
        for _ in 0..200 {
            opt.zero_grad();
            let loss = w.square().sum(Kind::Float) + b.square().sum(Kind::Float);
            loss.backward();
            opt.clip_grad_norm(1.0);
            opt.step(0.05);
        }
        let last = (w.square().sum(Kind::Float) + b.square().sum(Kind::Float)).double_value(&[]);
        assert!(last < first * 0.01, "{first} -> {last}");
        assert_eq!(opt.state().len(), 4);
    }
}
