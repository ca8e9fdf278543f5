//! The training recipe: the choices where the official SphereAR training (`train.py` of
//! guolinke/SphereAR with the commands of its README) and this trainer's earlier behaviour ("ours")
//! differ. The official choices are the defaults of the official presets (`spherear-b|l|h`); the small
//! presets (`fmnist-32`, `tiny`) keep ours, explicitly (README, "Training recipe"). Each choice has a flag;
//! a run records the flags' values in its training checkpoint ([`crate::identity::RunIdentity`]) and a
//! resume with another value is refused.
//!
//! The learning-rate schedule lives in [`crate::fitloop::TrainArgs`] (all stages have one); the defaults
//! of the official presets are [`vae_train_defaults`] and [`ar_train_defaults`].

use tch::{Kind, Tensor};

use crate::fitloop::TrainArgs;
use crate::layers::InitScheme;
use crate::optim::{DecayGroups, Ema, LrSchedule};

/// The VAE's reconstruction loss (`--recon-loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReconLoss {
    /// Mean absolute error (official `--reconstruction-loss l1`).
    L1,
    /// Mean squared error (ours): the loss whose minimum is the PSNR the demo reports.
    Mse,
}

impl ReconLoss {
    /// The loss of `recon` against `target`, the mean over every element.
    pub fn loss(self, recon: &Tensor, target: &Tensor) -> Tensor {
        let diff = recon - target;
        match self {
            ReconLoss::L1 => diff.abs().mean(Kind::Float),
            ReconLoss::Mse => diff.square().mean(Kind::Float),
        }
    }

    /// The flag value (`l1`, `mse`).
    pub fn name(self) -> &'static str {
        match self {
            ReconLoss::L1 => "l1",
            ReconLoss::Mse => "mse",
        }
    }
}

/// Official EMA decay (`train.py --ema 0.9999` in the README's AR command).
pub const OFFICIAL_EMA_DECAY: f64 = 0.9999;
/// Our EMA decay (with the warm-up): at 2000 steps the official constant 0.9999 would still hold
/// 0.9999²⁰⁰⁰ ≈ 82 % of the initial weights.
pub const OURS_EMA_DECAY: f64 = 0.999;
/// Official peak learning rates (README commands): VAE 1e-4 (constant), AR 3e-4.
pub const OFFICIAL_VAE_LR: f64 = 1e-4;
pub const OFFICIAL_AR_LR: f64 = 3e-4;
/// Official AR warmup and cosine start (`train.py` defaults `--warmup-steps 20000 --decay-start 20000`).
pub const OFFICIAL_AR_WARMUP: usize = 20_000;
pub const OFFICIAL_AR_DECAY_START: usize = 20_000;

/// The recipe choices other than the learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recipe {
    /// VAE stage: reconstruction loss.
    pub recon_loss: ReconLoss,
    /// VAE stage: initialisation of the layers left at the framework default.
    pub init: InitScheme,
    /// Both stages: which parameters get weight decay.
    pub decay_groups: DecayGroups,
    /// AR stage: the EMA of the shipped weights.
    pub ema: Ema,
    /// AR stage: augmented views cached per training image (0: none, the un-augmented image only).
    pub augment: usize,
}

impl Recipe {
    /// The official recipe. `augment` is 0 here too: the official code re-encodes a fresh crop and flip
    /// every batch, which a cache of N views only approximates at N × the latents' memory (README).
    pub const OFFICIAL: Recipe = Recipe {
        recon_loss: ReconLoss::L1,
        init: InitScheme::Pytorch,
        decay_groups: DecayGroups::Official,
        ema: Ema { decay: OFFICIAL_EMA_DECAY, warmup: false },
        augment: 0,
    };
    /// Ours, the recipe of the small presets.
    pub const OURS: Recipe = Recipe {
        recon_loss: ReconLoss::Mse,
        init: InitScheme::Tch,
        decay_groups: DecayGroups::Ours,
        ema: Ema { decay: OURS_EMA_DECAY, warmup: true },
        augment: 0,
    };

    /// Whether `preset` is one of the official presets (`spherear-b|l|h`).
    pub fn is_official_preset(preset: &str) -> bool {
        matches!(preset, "spherear-b" | "spherear-l" | "spherear-h")
    }

    /// The recipe `preset` trains with unless flags say otherwise.
    pub fn for_preset(preset: &str) -> Recipe {
        if Self::is_official_preset(preset) {
            Self::OFFICIAL
        } else {
            Self::OURS
        }
    }

    /// What a VAE run records (flag → value), with its schedule `train`.
    pub fn vae_record(&self, train: &TrainArgs) -> Vec<(&'static str, String)> {
        let mut r = vec![
            ("--recon-loss", self.recon_loss.name().to_string()),
            ("--init", self.init.name().to_string()),
            ("--decay-groups", self.decay_groups.name().to_string()),
        ];
        r.extend(train.schedule_record());
        r
    }

    /// What an AR run records (flag → value), with its schedule `train`.
    pub fn ar_record(&self, train: &TrainArgs) -> Vec<(&'static str, String)> {
        let mut r = vec![
            ("--decay-groups", self.decay_groups.name().to_string()),
            ("--ema-decay", self.ema.decay.to_string()),
            ("--ema-warmup", self.ema.warmup.to_string()),
            ("--augment", self.augment.to_string()),
        ];
        r.extend(train.schedule_record());
        r
    }
}

/// The VAE stage's loop defaults for `preset`: `small` (the stage's `TRAIN_DEFAULTS`) for the small
/// presets; for the official ones the official constant learning rate 1e-4 (no warmup, no decay).
pub fn vae_train_defaults(preset: &str, small: TrainArgs) -> TrainArgs {
    if !Recipe::is_official_preset(preset) {
        return small;
    }
    TrainArgs {
        lr: OFFICIAL_VAE_LR,
        warmup: 0,
        schedule: LrSchedule::Official,
        min_lr: None,
        decay_start: None,
        ..small
    }
}

/// The AR stage's loop defaults for `preset`: `small` for the small presets; for the official ones peak
/// 3e-4, warmup 20000 steps, cosine from step 20000 to 1e-5 ([`crate::optim::OFFICIAL_MIN_LR`]) at the last step.
pub fn ar_train_defaults(preset: &str, small: TrainArgs) -> TrainArgs {
    if !Recipe::is_official_preset(preset) {
        return small;
    }
    TrainArgs {
        lr: OFFICIAL_AR_LR,
        warmup: OFFICIAL_AR_WARMUP,
        schedule: LrSchedule::Official,
        min_lr: None,
        decay_start: Some(OFFICIAL_AR_DECAY_START),
        ..small
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_and_mse_on_a_known_pair() {
        let a = Tensor::from_slice(&[0.0f32, 1.0, -1.0, 0.5]);
        let b = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 0.0]);
        // Differences −1, 0, −2, 0.5: L1 = 3.5/4, MSE = 5.25/4.
        assert!((ReconLoss::L1.loss(&a, &b).double_value(&[]) - 0.875).abs() < 1e-7);
        assert!((ReconLoss::Mse.loss(&a, &b).double_value(&[]) - 1.3125).abs() < 1e-7);
    }

    #[test]
    fn presets_pick_their_recipe() {
        for p in ["spherear-b", "spherear-l", "spherear-h"] {
            assert_eq!(Recipe::for_preset(p), Recipe::OFFICIAL);
            let vae = vae_train_defaults(p, TrainArgs::DEFAULT);
            assert_eq!((vae.lr_at(0), vae.lr_at(1999)), (1e-4, 1e-4));
            let ar = ar_train_defaults(p, TrainArgs { steps: 1_000_800, ..TrainArgs::DEFAULT });
            assert_eq!((ar.lr_at(0), ar.lr_at(20_000)), (0.0, 3e-4));
            assert!((ar.lr_at(1_000_800) - 1e-5).abs() < 1e-15);
        }
        for p in ["fmnist-32", "tiny"] {
            assert_eq!(Recipe::for_preset(p), Recipe::OURS);
            let t = ar_train_defaults(p, TrainArgs::DEFAULT);
            assert_eq!(t.schedule, LrSchedule::Ours);
            assert!((t.lr_at(0) - 1e-5).abs() < 1e-15 && (t.lr_at(2000) - 5e-5).abs() < 1e-15);
        }
    }
}
