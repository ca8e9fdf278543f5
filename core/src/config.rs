//! Model configuration: presets with the official dimensions, a small preset for CPU machines,
//! JSON (de)serialisation with validation.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::CoreError;

/// Everything that fixes the shapes of a SphereAR model (AR transformer, diffusion head and S-VAE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Preset name this config came from (informational, checked when resuming/importing).
    pub name: String,
    /// Square image side in pixels.
    pub image_size: usize,
    /// Pixels per token side: the grid is (image_size / patch_size)².
    pub patch_size: usize,
    /// Token (latent) dimension d; the sphere radius is √d.
    pub latent_dim: usize,
    /// Number of real classes; class id `num_classes` is the null class (CFG, label dropout).
    pub num_classes: usize,
    /// Number of class-embedding prefix tokens.
    pub cls_token_num: usize,
    pub ar: ArConfig,
    pub vae: VaeConfig,
}

/// Causal transformer + per-token diffusion head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArConfig {
    pub dim: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Residual blocks of the diffusion head (`head.net.res_blocks.N`).
    pub head_blocks: usize,
    /// Width C of the diffusion head.
    pub head_dim: usize,
    /// Shared adaLN blocks of the head (`head.net.ada_ln_blocks.M`); divides `head_blocks`.
    pub head_adaln_blocks: usize,
    /// Each (condition, target) pair is repeated this many times in the head loss.
    pub diff_batch_mul: usize,
    /// Probability of replacing the class label by the null class during training.
    pub class_dropout: f64,
}

/// S-VAE: CNN patchifier + ViT encoder, a posterior of the family `posterior`, ViT + CNN decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeConfig {
    /// Width of the ViT blocks (the official `z_channels`); heads are `z_channels / 64`
    /// unless `n_head` says otherwise.
    pub z_channels: usize,
    pub n_head: usize,
    /// Channel ladder of the CNN patchifier, first = `conv_in` output, last = `z_channels`.
    /// Its length minus one is the number of stride-2 stages, so 2^(len-1) = patch_size.
    pub cnn_chs: Vec<usize>,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    /// Learned register tokens prepended in both ViTs (official: 4).
    pub register_tokens: usize,
    /// Posterior family of the latents; it fixes the width of `quant_proj` and whether tokens lie on the
    /// radius-R sphere. Configs, checkpoints and manifests written before it existed are Power Spherical.
    #[serde(default)]
    pub posterior: Posterior,
}

/// The VAE's posterior family (`trainer fit --stage vae --posterior NAME`; JSON: the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Posterior {
    /// Power Spherical on the unit sphere, sampled tokens scaled to radius R (SphereAR): `quant_proj` gives
    /// d + 1 values per token (direction, concentration); the AR model's tokens are projected onto the sphere.
    #[default]
    #[serde(rename = "spherical")]
    PowerSpherical,
    /// Diagonal Gaussian (the paper's G-xx baselines): `quant_proj` gives 2d values (μ, log σ²), z = μ + σ·ε,
    /// KL to N(0, I); tokens are not projected anywhere.
    #[serde(rename = "gaussian")]
    Gaussian,
    /// Diagonal Gaussian whose samples are projected onto the radius-R sphere before the decoder and in the AR
    /// model (the paper's "Gaussian+norm", N-xx); the KL is still the Gaussian one.
    #[serde(rename = "gaussian-norm")]
    GaussianNorm,
}

impl Posterior {
    /// Every family, in the order of [`Posterior::name`]s shown to users.
    pub const ALL: [Posterior; 3] = [Posterior::PowerSpherical, Posterior::Gaussian, Posterior::GaussianNorm];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Posterior::PowerSpherical => "spherical",
            Posterior::Gaussian => "gaussian",
            Posterior::GaussianNorm => "gaussian-norm",
        }
    }

    /// Output width of `quant_proj` for tokens of dimension `d`: d + 1 (μ direction, κ) or 2d (μ, log σ²).
    pub fn quant_proj_out(self, d: usize) -> usize {
        match self {
            Posterior::PowerSpherical => d + 1,
            Posterior::Gaussian | Posterior::GaussianNorm => 2 * d,
        }
    }

    /// True when tokens lie on the radius-R sphere (decoder input, AR training targets, sampled tokens).
    pub fn on_sphere(self) -> bool {
        !matches!(self, Posterior::Gaussian)
    }
}

impl std::fmt::Display for Posterior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &["spherear-b", "spherear-l", "spherear-h", "fmnist-32", "tiny"];

/// The `format` metadata of our safetensors weight files (the trainer writes it, the exporter checks it).
pub const WEIGHTS_FORMAT: &str = "spherear-weights-v1";

/// Epsilon of every RMSNorm, LayerNorm and GroupNorm of the model.
pub const NORM_EPS: f64 = 1e-6;

/// GroupNorm groups of a VAE CNN block with `channels` channels: min(channels / 4, 32).
pub fn group_norm_groups(channels: usize) -> usize {
    (channels / 4).min(32)
}

/// GroupNorm groups of the VAE decoder's output norm (`conv_out.0`).
pub const OUT_NORM_GROUPS: usize = 16;

/// Round `n` up to a multiple of `k`.
pub fn find_multiple(n: usize, k: usize) -> usize {
    n.div_ceil(k) * k
}

/// Hidden width of the SwiGLU feed-forward of a transformer block of width `dim`:
/// int(2·4·dim/3) rounded up to a multiple of 256 (768→2048, 512→1536).
pub fn ffn_hidden(dim: usize) -> usize {
    find_multiple(2 * 4 * dim / 3, 256)
}

/// Hidden width of a diffusion-head residual block of width `c`: ⌊1.5·c⌋.
pub fn head_hidden(c: usize) -> usize {
    c * 3 / 2
}

impl VaeConfig {
    /// The official S-VAE (shared by B, L and H).
    pub fn official() -> Self {
        VaeConfig {
            z_channels: 512,
            n_head: 8,
            cnn_chs: vec![64, 64, 128, 256, 512],
            encoder_layers: 6,
            decoder_layers: 12,
            register_tokens: 4,
            posterior: Posterior::PowerSpherical,
        }
    }
    pub fn head_dim(&self) -> usize {
        self.z_channels / self.n_head
    }
}

impl ArConfig {
    fn official(dim: usize, n_layer: usize, n_head: usize, head_blocks: usize, adaln: usize) -> Self {
        ArConfig {
            dim,
            n_layer,
            n_head,
            head_blocks,
            head_dim: dim,
            head_adaln_blocks: adaln,
            diff_batch_mul: 4,
            class_dropout: 0.1,
        }
    }
    pub fn head_dim_attn(&self) -> usize {
        self.dim / self.n_head
    }
}

impl ModelConfig {
    /// A named preset. The three official presets have the exact dimensions of the published
    /// checkpoints; `fmnist-32` is the CPU default (32×32, 8×8 tokens); `tiny` is for tests.
    pub fn preset(name: &str) -> Result<Self, CoreError> {
        let official = |name: &str, ar: ArConfig| ModelConfig {
            name: name.to_string(),
            image_size: 256,
            patch_size: 16,
            latent_dim: 16,
            num_classes: 1000,
            cls_token_num: 16,
            ar,
            vae: VaeConfig::official(),
        };
        let cfg = match name {
            "spherear-b" => official(name, ArConfig::official(768, 24, 12, 6, 2)),
            "spherear-l" => official(name, ArConfig::official(1024, 32, 16, 8, 2)),
            "spherear-h" => official(name, ArConfig::official(1280, 40, 20, 12, 3)),
            "fmnist-32" => ModelConfig {
                name: name.to_string(),
                image_size: 32,
                patch_size: 4,
                latent_dim: 16,
                num_classes: 10,
                cls_token_num: 4,
                ar: ArConfig {
                    dim: 128,
                    n_layer: 4,
                    n_head: 4,
                    head_blocks: 2,
                    head_dim: 128,
                    head_adaln_blocks: 1,
                    diff_batch_mul: 4,
                    class_dropout: 0.1,
                },
                vae: VaeConfig {
                    z_channels: 128,
                    n_head: 2,
                    cnn_chs: vec![32, 64, 128],
                    encoder_layers: 2,
                    decoder_layers: 2,
                    register_tokens: 4,
                    posterior: Posterior::PowerSpherical,
                },
            },
            "tiny" => ModelConfig {
                name: name.to_string(),
                image_size: 16,
                patch_size: 4,
                latent_dim: 8,
                num_classes: 4,
                cls_token_num: 2,
                ar: ArConfig {
                    dim: 32,
                    n_layer: 2,
                    n_head: 2,
                    head_blocks: 2,
                    head_dim: 32,
                    head_adaln_blocks: 1,
                    diff_batch_mul: 2,
                    class_dropout: 0.1,
                },
                vae: VaeConfig {
                    z_channels: 32,
                    n_head: 2,
                    cnn_chs: vec![16, 16, 32],
                    encoder_layers: 1,
                    decoder_layers: 1,
                    register_tokens: 4,
                    posterior: Posterior::PowerSpherical,
                },
            },
            other => {
                return Err(CoreError::Config(format!("unknown preset '{other}' (known: {})", PRESETS.join(", "))))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Tokens per side of the latent grid.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Image tokens L = grid².
    pub fn num_tokens(&self) -> usize {
        self.grid() * self.grid()
    }
    /// Sphere radius R = √d.
    pub fn radius(&self) -> f32 {
        (self.latent_dim as f32).sqrt()
    }
    /// The radius every sampled token is projected to: R when the posterior's tokens lie on the sphere,
    /// `None` (no projection) for a plain Gaussian posterior.
    pub fn token_radius(&self) -> Option<f32> {
        self.vae.posterior.on_sphere().then(|| self.radius())
    }
    /// The guidance scale samplers use when none is given: the official defaults for the official presets
    /// (4.5 for SphereAR-B and -H, 4.6 for -L); 5 for `fmnist-32`, the demo model's lowest Fréchet distance
    /// (README, "Quality evaluation"); 3 otherwise.
    pub fn default_cfg(&self) -> f32 {
        match self.name.as_str() {
            "spherear-b" | "spherear-h" => 4.5,
            "spherear-l" => 4.6,
            "fmnist-32" => 5.0,
            _ => 3.0,
        }
    }
    /// Class id used for the unconditional (null) branch.
    pub fn null_class(&self) -> usize {
        self.num_classes
    }
    /// Length of the AR input sequence: class tokens + the first L−1 image tokens.
    pub fn ar_seq_len(&self) -> usize {
        self.cls_token_num + self.num_tokens() - 1
    }

    /// Checks every shape constraint the modules rely on; the message names the field.
    pub fn validate(&self) -> Result<(), CoreError> {
        let err = |m: String| Err(CoreError::Config(m));
        if self.image_size == 0 || self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            return err(format!(
                "image_size {} must be a positive multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.latent_dim < 2 {
            return err(format!("latent_dim must be ≥ 2, got {}", self.latent_dim));
        }
        if self.num_classes == 0 || self.cls_token_num == 0 {
            return err("num_classes and cls_token_num must be ≥ 1".into());
        }
        let a = &self.ar;
        if a.n_head == 0 || a.dim % a.n_head != 0 || (a.dim / a.n_head) % 4 != 0 {
            return err(format!(
                "ar.dim {} must split into ar.n_head {} heads whose size is a multiple of 4 (2-D RoPE)",
                a.dim, a.n_head
            ));
        }
        if a.head_adaln_blocks == 0 || a.head_blocks % a.head_adaln_blocks != 0 {
            return err(format!(
                "ar.head_blocks {} must be a multiple of ar.head_adaln_blocks {}",
                a.head_blocks, a.head_adaln_blocks
            ));
        }
        if a.head_dim == 0 || a.diff_batch_mul == 0 {
            return err("ar.head_dim and ar.diff_batch_mul must be ≥ 1".into());
        }
        if !(0.0..1.0).contains(&a.class_dropout) {
            return err(format!("ar.class_dropout must be in [0, 1), got {}", a.class_dropout));
        }
        let v = &self.vae;
        if v.cnn_chs.len() < 2 {
            return err("vae.cnn_chs needs at least two entries".into());
        }
        // 2^stages; 64 or more stages have no such usize (and match no patch size).
        let stages = v.cnn_chs.len() - 1;
        let patch = u32::try_from(stages).ok().and_then(|n| 1usize.checked_shl(n));
        if patch != Some(self.patch_size) {
            return err(format!(
                "vae.cnn_chs has {stages} stride-2 stages, so the patch size would be 2^{stages}, not {}",
                self.patch_size
            ));
        }
        if *v.cnn_chs.last().unwrap_or(&0) != v.z_channels {
            return err(format!("vae.cnn_chs must end with vae.z_channels {}", v.z_channels));
        }
        for &c in &v.cnn_chs {
            if c < 4 || c % 4 != 0 || c % (c / 4).min(32) != 0 {
                return err(format!("vae.cnn_chs entry {c} must be a multiple of 4 that GroupNorm can split"));
            }
        }
        if v.cnn_chs[0] % 16 != 0 {
            return err(format!("vae.cnn_chs[0] = {} must be a multiple of 16 (decoder GroupNorm(16))", v.cnn_chs[0]));
        }
        if v.n_head == 0 || v.z_channels % v.n_head != 0 || (v.z_channels / v.n_head) % 4 != 0 {
            return err(format!(
                "vae.z_channels {} must split into vae.n_head {} heads whose size is a multiple of 4",
                v.z_channels, v.n_head
            ));
        }
        Ok(())
    }

    /// True when the S-VAE of `other` is interchangeable with this one (same image grid, latent and VAE
    /// layout): an AR model of this config can be trained on that VAE's latents.
    pub fn same_vae(&self, other: &ModelConfig) -> bool {
        self.image_size == other.image_size
            && self.patch_size == other.patch_size
            && self.latent_dim == other.latent_dim
            && self.vae == other.vae
    }

    pub fn from_json(text: &str) -> Result<Self, CoreError> {
        let cfg: ModelConfig =
            serde_json::from_str(text).map_err(|e| CoreError::Config(format!("invalid config JSON: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        // A struct of plain numbers and strings always serialises.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn load(path: &Path) -> Result<Self, CoreError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CoreError::Io(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| match e {
            CoreError::Config(m) => CoreError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Writes config.json atomically (temporary name, then rename).
    pub fn save(&self, path: &Path) -> Result<(), CoreError> {
        crate::fsutil::write_atomic(path, self.to_json().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cfg_follows_the_preset() {
        let cfg = |n: &str| ModelConfig::preset(n).unwrap().default_cfg();
        assert_eq!([cfg("spherear-b"), cfg("spherear-l"), cfg("spherear-h"), cfg("fmnist-32"), cfg("tiny")], [4.5, 4.6, 4.5, 5.0, 3.0]);
    }

    #[test]
    fn official_ffn_widths() {
        assert_eq!(ffn_hidden(768), 2048);
        assert_eq!(ffn_hidden(1024), 2816);
        assert_eq!(ffn_hidden(1280), 3584);
        assert_eq!(ffn_hidden(512), 1536);
        assert_eq!(head_hidden(768), 1152);
    }

    #[test]
    fn presets_validate_and_roundtrip() {
        for name in PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            let back = ModelConfig::from_json(&cfg.to_json()).unwrap();
            assert_eq!(cfg, back);
        }
        let b = ModelConfig::preset("spherear-b").unwrap();
        assert_eq!(b.num_tokens(), 256);
        assert_eq!(b.ar_seq_len(), 16 + 255);
        assert_eq!(b.radius(), 4.0);
        assert_eq!(b.null_class(), 1000);
        assert_eq!(b.vae.head_dim(), 64);
        let f = ModelConfig::preset("fmnist-32").unwrap();
        assert_eq!(f.grid(), 8);
    }

    #[test]
    fn posterior_defaults_to_spherical_and_roundtrips() {
        // A config written before the field existed (no "posterior") is Power Spherical.
        let json = ModelConfig::preset("tiny").unwrap().to_json().replace(",\n    \"posterior\": \"spherical\"", "");
        assert!(!json.contains("posterior"), "{json}");
        let old = ModelConfig::from_json(&json).unwrap();
        assert_eq!(old.vae.posterior, Posterior::PowerSpherical);
        assert_eq!(old.token_radius(), Some(8f32.sqrt()));
        for p in Posterior::ALL {
            let mut c = ModelConfig::preset("tiny").unwrap();
            c.vae.posterior = p;
            let text = c.to_json();
            assert!(text.contains(&format!("\"posterior\": \"{}\"", p.name())), "{text}");
            assert_eq!(ModelConfig::from_json(&text).unwrap(), c);
        }
        let mut g = ModelConfig::preset("tiny").unwrap();
        g.vae.posterior = Posterior::Gaussian;
        assert_eq!(g.token_radius(), None);
        assert!(!g.same_vae(&ModelConfig::preset("tiny").unwrap()), "the posterior is part of the VAE");
        assert_eq!((Posterior::PowerSpherical.quant_proj_out(16), Posterior::Gaussian.quant_proj_out(16)), (17, 32));
        g.vae.posterior = Posterior::GaussianNorm;
        assert_eq!(g.token_radius(), Some(8f32.sqrt()));
        let bad = g.to_json().replace("gaussian-norm", "gauss");
        let e = ModelConfig::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("unknown variant `gauss`") && e.contains("`gaussian-norm`"), "{e}");
    }

    #[test]
    fn bad_configs_are_named() {
        assert!(ModelConfig::preset("spherear-x").unwrap_err().to_string().contains("unknown preset"));
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.patch_size = 8;
        assert!(c.validate().unwrap_err().to_string().contains("stride-2 stages"));
        // 65 entries: 2^64 has no usize (a plain shift overflowed); an error, not a panic or a wrap.
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.vae.cnn_chs = vec![32; 65];
        assert!(c.validate().unwrap_err().to_string().contains("64 stride-2 stages"));
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.ar.head_blocks = 3;
        c.ar.head_adaln_blocks = 2;
        assert!(c.validate().unwrap_err().to_string().contains("head_blocks"));
        let json = ModelConfig::preset("tiny").unwrap().to_json().replace("\"latent_dim\"", "\"latent_dimm\"");
        assert!(ModelConfig::from_json(&json).is_err());
    }
}
