//! AdamW with decoupled weight decay, a warmup + cosine learning-rate schedule and global-norm gradient
//! clipping. Written out (rather than tch's C++ optimizer) so that its moments can be checkpointed and a run
//! resumes exactly where it stopped.

use std::collections::BTreeMap;
use tch::{nn::VarStore, Kind, Tensor};

/// Hyper-parameters (official defaults: β = (0.9, 0.95), weight decay 0.05).
#[derive(Debug, Clone)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05 }
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

/// Weight decay applies to matrices and convolution kernels, not to norms, biases or embeddings
/// (register tokens, class embedding, positional embeddings, `proj_in` as in the official code).
pub fn decays(name: &str, t: &Tensor) -> bool {
    const NO_DECAY: [&str; 4] = ["register_token", "cls_embedding", "pos_for_diff", "proj_in"];
    t.dim() >= 2 && !NO_DECAY.iter().any(|k| name.contains(k))
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
                decay: decays(&name, &var),
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

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to `peak · min_ratio` at `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup.min(step)) as f64 / span).min(1.0);
    let min = peak * min_ratio;
    min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
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
