//! The S-VAE of SphereAR: a CNN patchifier and a bidirectional ViT encode an image into a grid of tokens;
//! `quant_proj` gives a mean direction μ and a concentration κ = softplus(·) + 1 per token; a Power Spherical
//! posterior is sampled and scaled to the radius-R sphere; a ViT and a CNN un-patchifier decode it.
//! With `posterior` = gaussian the same network is the diagonal-Gaussian baseline: `quant_proj` gives
//! (μ, log σ²) per token and z = μ + σ·ε goes to the decoder as it is (gaussian-norm: projected to radius R).
//! Module and weight names are the official ones (`vae.encoder.*`, `vae.decoder.*`, `vae.quant_proj`, ...).

use spherear_core::config::{ModelConfig, Posterior, VaeConfig};
use spherear_core::rope::rope_2d;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::gaussian::DiagonalGaussian;
use crate::layers::{linear_default, rope_tensor, RmsNorm, TransformerBlock, INIT_STD};
use crate::psd::{l2_normalize, PowerSpherical};

fn gn(vs: nn::Path, groups: i64, ch: i64) -> nn::GroupNorm {
    nn::group_norm(vs, groups, ch, nn::GroupNormConfig { eps: spherear_core::config::NORM_EPS, ..Default::default() })
}

fn conv(vs: nn::Path, i: i64, o: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(vs, i, o, k, nn::ConvConfig { stride, padding, bias: false, ..Default::default() })
}

fn conv_t(vs: nn::Path, i: i64, o: i64, k: i64, stride: i64, padding: i64) -> nn::ConvTranspose2D {
    let cfg = nn::ConvTransposeConfig { stride, padding, bias: false, ..Default::default() };
    nn::conv_transpose2d(vs, i, o, k, cfg)
}

fn groups(ch: i64) -> i64 {
    spherear_core::config::group_norm_groups(ch as usize) as i64
}

/// Whether the S-VAE variable `name` (relative to the VAE, e.g. `quant_proj.bias`) is one the official
/// code leaves at the framework's default initialisation: every convolution kernel and the
/// `encoder.output`, `quant_proj` and `post_quant_proj` linears ([`crate::layers::InitScheme`]).
pub fn has_framework_default_init(name: &str, t: &Tensor) -> bool {
    const LINEARS: [&str; 3] = ["encoder.output", "quant_proj", "post_quant_proj"];
    let layer = name.rsplit_once('.').map_or(name, |(layer, _)| layer);
    t.dim() == 4 || LINEARS.contains(&layer)
}

/// [N, C, H, W] → [N, H·W, C]
pub fn nchw_to_nlc(x: &Tensor) -> Tensor {
    let (n, c, h, w) = x.size4().unwrap_or((0, 0, 0, 0));
    x.permute([0, 2, 3, 1]).reshape([n, h * w, c])
}

/// [N, L, C] → [N, C, √L, √L]
pub fn nlc_to_nchw(x: &Tensor) -> Tensor {
    let (n, l, c) = x.size3().unwrap_or((0, 0, 0));
    let side = (l as f64).sqrt().round() as i64;
    x.view([n, side, side, c]).permute([0, 3, 1, 2])
}

/// Stride-2 residual down block: `block.{0,2,3,5}` (GN, SiLU, 3×3/2 conv, GN, SiLU, 3×3 conv) + 2×2/2 `shortcut`.
#[derive(Debug)]
pub struct ResDownBlock {
    n0: nn::GroupNorm,
    c2: nn::Conv2D,
    n3: nn::GroupNorm,
    c5: nn::Conv2D,
    shortcut: nn::Conv2D,
}

impl ResDownBlock {
    pub fn new(vs: nn::Path, i: i64, o: i64) -> Self {
        let b = &vs / "block";
        ResDownBlock {
            n0: gn(&b / "0", groups(i), i),
            c2: conv(&b / "2", i, o, 3, 2, 1),
            n3: gn(&b / "3", groups(o), o),
            c5: conv(&b / "5", o, o, 3, 1, 1),
            shortcut: conv(&vs / "shortcut", i, o, 2, 2, 0),
        }
    }
}

impl Module for ResDownBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.n0).silu().apply(&self.c2).apply(&self.n3).silu().apply(&self.c5);
        x.apply(&self.shortcut) + h
    }
}

/// Stride-2 residual up block: transposed 4×4/2 main path + 2×2/2 transposed `shortcut`, then a second
/// residual pair of 3×3 convs (`block2`).
#[derive(Debug)]
pub struct ResUpBlock {
    n0: nn::GroupNorm,
    c2: nn::ConvTranspose2D,
    n3: nn::GroupNorm,
    c5: nn::Conv2D,
    shortcut: nn::ConvTranspose2D,
    m0: nn::GroupNorm,
    d2: nn::Conv2D,
    m3: nn::GroupNorm,
    d5: nn::Conv2D,
}

impl ResUpBlock {
    pub fn new(vs: nn::Path, i: i64, o: i64) -> Self {
        let (b, b2) = (&vs / "block", &vs / "block2");
        ResUpBlock {
            n0: gn(&b / "0", groups(i), i),
            c2: conv_t(&b / "2", i, o, 4, 2, 1),
            n3: gn(&b / "3", groups(o), o),
            c5: conv(&b / "5", o, o, 3, 1, 1),
            shortcut: conv_t(&vs / "shortcut", i, o, 2, 2, 0),
            m0: gn(&b2 / "0", groups(o), o),
            d2: conv(&b2 / "2", o, o, 3, 1, 1),
            m3: gn(&b2 / "3", groups(o), o),
            d5: conv(&b2 / "5", o, o, 3, 1, 1),
        }
    }
}

impl Module for ResUpBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.n0).silu().apply(&self.c2).apply(&self.n3).silu().apply(&self.c5);
        let x = x.apply(&self.shortcut) + h;
        let h2 = x.apply(&self.m0).silu().apply(&self.d2).apply(&self.m3).silu().apply(&self.d5);
        x + h2
    }
}

/// Learned register tokens, the bidirectional blocks and the persistent RoPE buffer `freqs_cis`
/// shared by both ViT halves.
#[derive(Debug)]
struct VitTrunk {
    register_token: Tensor,
    layers: Vec<TransformerBlock>,
    freqs_cis: Tensor,
}

impl VitTrunk {
    fn new(vs: &nn::Path, cfg: &ModelConfig, n_layers: usize) -> Result<Self> {
        let v = &cfg.vae;
        let z = v.z_channels as i64;
        let register_token = (vs / "register_token").var(
            "weight",
            &[v.register_tokens as i64, z],
            nn::Init::Randn { mean: 0.0, stdev: INIT_STD },
        );
        let layers =
            (0..n_layers).map(|i| TransformerBlock::new(vs / "layers" / i, z, v.n_head as i64, false)).collect();
        // The table depends only on the config; the official checkpoints carry it as a persistent buffer.
        let table = rope_tensor(&rope_2d(cfg.grid(), v.head_dim(), v.register_tokens)?);
        let freqs_cis = vs.add("freqs_cis", table, false);
        Ok(VitTrunk { register_token, layers, freqs_cis })
    }

    /// Prepends the registers, runs the blocks, drops the registers.
    fn forward(&self, x: &Tensor) -> Tensor {
        let (n, _, c) = x.size3().unwrap_or((0, 0, 0));
        let r = self.register_token.size()[0];
        let regs = self.register_token.view([1, r, c]).expand([n, r, c], false);
        let mut h = Tensor::cat(&[regs, x.shallow_clone()], 1);
        for layer in &self.layers {
            h = layer.forward(&h, &self.freqs_cis);
        }
        h.narrow(1, r, h.size()[1] - r)
    }
}

/// `vae.encoder`: conv_in → patchify (stride-2 residual blocks) → tokens → ViT → norm → output.
#[derive(Debug)]
pub struct VitEncoder {
    conv_in: nn::Conv2D,
    patchify: Vec<ResDownBlock>,
    trunk: VitTrunk,
    norm: RmsNorm,
    output: nn::Linear,
}

impl VitEncoder {
    pub fn new(vs: nn::Path, cfg: &ModelConfig) -> Result<Self> {
        let v = &cfg.vae;
        let chs: Vec<i64> = v.cnn_chs.iter().map(|&c| c as i64).collect();
        let z = v.z_channels as i64;
        let net = &vs / "patchify" / "0" / "net";
        Ok(VitEncoder {
            conv_in: conv(&vs / "conv_in", 3, chs[0], 3, 1, 1),
            patchify: chs.windows(2).enumerate().map(|(i, w)| ResDownBlock::new(&net / i, w[0], w[1])).collect(),
            trunk: VitTrunk::new(&vs, cfg, v.encoder_layers)?,
            norm: RmsNorm::new(&vs / "norm", z),
            output: linear_default(&vs / "output", z, z, false),
        })
    }

    /// image [N, 3, H, W] → features [N, L, z_channels]
    pub fn forward(&self, image: &Tensor) -> Tensor {
        let mut x = image.apply(&self.conv_in);
        for b in &self.patchify {
            x = x.apply(b);
        }
        self.trunk.forward(&nchw_to_nlc(&x)).apply(&self.norm).apply(&self.output)
    }
}

/// `vae.decoder`: conv_in on the token grid → ViT → unpatchify (stride-2 up blocks) → conv_out.
#[derive(Debug)]
pub struct VitDecoder {
    conv_in: nn::Conv2D,
    trunk: VitTrunk,
    unpatchify: Vec<ResUpBlock>,
    out_norm: nn::GroupNorm,
    out_conv: nn::Conv2D,
}

impl VitDecoder {
    pub fn new(vs: nn::Path, cfg: &ModelConfig) -> Result<Self> {
        let v = &cfg.vae;
        let chs: Vec<i64> = v.cnn_chs.iter().rev().map(|&c| c as i64).collect();
        let z = v.z_channels as i64;
        let last = *chs.last().unwrap_or(&16);
        let net = &vs / "unpatchify" / "1" / "net";
        Ok(VitDecoder {
            conv_in: conv(&vs / "conv_in" / "1", z, z, 3, 1, 1),
            trunk: VitTrunk::new(&vs, cfg, v.decoder_layers)?,
            unpatchify: chs.windows(2).enumerate().map(|(i, w)| ResUpBlock::new(&net / i, w[0], w[1])).collect(),
            out_norm: gn(&vs / "conv_out" / "0", spherear_core::config::OUT_NORM_GROUPS as i64, last),
            out_conv: conv(&vs / "conv_out" / "2", last, 3, 3, 1, 1),
        })
    }

    /// features [N, L, z_channels] → image [N, 3, H, W]
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = nchw_to_nlc(&nlc_to_nchw(x).apply(&self.conv_in));
        let mut x = nlc_to_nchw(&self.trunk.forward(&x));
        for b in &self.unpatchify {
            x = x.apply(b);
        }
        x.apply(&self.out_norm).silu().apply(&self.out_conv)
    }
}

/// Posterior parameters of a batch, as `quant_proj` gives them (and as the AR stage caches them).
pub enum PosteriorParams {
    /// Power Spherical: unit mean directions μ [N, L, d] and concentrations κ [N, L].
    Spherical { mu: Tensor, kappa: Tensor },
    /// Diagonal Gaussian (also Gaussian+norm): means μ and log-variances log σ², both [N, L, d].
    Gaussian { mean: Tensor, logvar: Tensor },
}

impl PosteriorParams {
    /// The two tensors under their cache names (`mu`/`kappa` or `mean`/`logvar`).
    pub fn named(&self) -> [(&'static str, &Tensor); 2] {
        match self {
            PosteriorParams::Spherical { mu, kappa } => [("mu", mu), ("kappa", kappa)],
            PosteriorParams::Gaussian { mean, logvar } => [("mean", mean), ("logvar", logvar)],
        }
    }

    /// Rebuilds the parameters of `family` from tensors named as in [`PosteriorParams::named`].
    pub fn from_named(family: Posterior, get: impl Fn(&str) -> Option<Tensor>) -> Option<Self> {
        Some(match family {
            Posterior::PowerSpherical => PosteriorParams::Spherical { mu: get("mu")?, kappa: get("kappa")? },
            Posterior::Gaussian | Posterior::GaussianNorm => {
                PosteriorParams::Gaussian { mean: get("mean")?, logvar: get("logvar")? }
            }
        })
    }

    /// The rows `idx` (first axis) of both tensors.
    pub fn index_select(&self, idx: &Tensor) -> Self {
        match self {
            PosteriorParams::Spherical { mu, kappa } => {
                PosteriorParams::Spherical { mu: mu.index_select(0, idx), kappa: kappa.index_select(0, idx) }
            }
            PosteriorParams::Gaussian { mean, logvar } => {
                PosteriorParams::Gaussian { mean: mean.index_select(0, idx), logvar: logvar.index_select(0, idx) }
            }
        }
    }

    /// Concatenates batches along the first axis (all of the same family).
    pub fn cat(parts: &[PosteriorParams]) -> Option<Self> {
        let pick = |k: usize| parts.iter().map(|p| p.named()[k].1.shallow_clone()).collect::<Vec<_>>();
        let (a, b) = (Tensor::cat(&pick(0), 0), Tensor::cat(&pick(1), 0));
        Some(match parts.first()? {
            PosteriorParams::Spherical { .. } => PosteriorParams::Spherical { mu: a, kappa: b },
            PosteriorParams::Gaussian { .. } => PosteriorParams::Gaussian { mean: a, logvar: b },
        })
    }

    /// A reparameterised token sample: R·u with u ~ Power Spherical (`radius` must be given), or μ + σ·ε,
    /// projected onto the radius-`radius` sphere when given (Gaussian+norm).
    pub fn rsample(&self, radius: Option<f64>) -> Tensor {
        match self {
            PosteriorParams::Spherical { mu, kappa } => {
                PowerSpherical::new(mu, kappa).rsample() * radius.unwrap_or(1.0)
            }
            PosteriorParams::Gaussian { mean, logvar } => {
                project(DiagonalGaussian::new(mean, logvar).rsample(), radius)
            }
        }
    }

    /// The deterministic token: R·μ (spherical), μ (Gaussian), R·μ/‖μ‖ (Gaussian+norm).
    pub fn mode(&self, radius: Option<f64>) -> Tensor {
        match self {
            PosteriorParams::Spherical { mu, .. } => mu * radius.unwrap_or(1.0),
            PosteriorParams::Gaussian { mean, .. } => project(mean.shallow_clone(), radius),
        }
    }

    /// The KL term of the loss: to the uniform sphere, one value per token, averaged over tokens; to N(0, I),
    /// one value per element, averaged over all elements (the paper's convention, footnote 2).
    pub fn kl_mean(&self) -> Tensor {
        match self {
            PosteriorParams::Spherical { mu, kappa } => {
                PowerSpherical::new(mu, kappa).kl_to_uniform().mean(Kind::Float)
            }
            PosteriorParams::Gaussian { mean, logvar } => {
                DiagonalGaussian::new(mean, logvar).kl_to_standard_normal().mean(Kind::Float)
            }
        }
    }
}

/// z projected onto the radius-`radius` sphere when a radius is given.
fn project(z: Tensor, radius: Option<f64>) -> Tensor {
    match radius {
        Some(r) => l2_normalize(&z) * r,
        None => z,
    }
}

/// The S-VAE, rooted at `vae.` in a var store.
#[derive(Debug)]
pub struct Vae {
    pub encoder: VitEncoder,
    pub decoder: VitDecoder,
    pub quant_proj: nn::Linear,
    pub post_quant_proj: nn::Linear,
    pub latent_dim: i64,
    pub radius: f64,
    /// Posterior family (fixes `quant_proj`'s width).
    pub posterior: Posterior,
}

impl Vae {
    pub fn new(vs: nn::Path, cfg: &ModelConfig) -> Result<Self> {
        let VaeConfig { z_channels, posterior, .. } = cfg.vae;
        let (z, d) = (z_channels as i64, cfg.latent_dim as i64);
        let q_out = posterior.quant_proj_out(cfg.latent_dim) as i64;
        Ok(Vae {
            encoder: VitEncoder::new(&vs / "encoder", cfg)?,
            decoder: VitDecoder::new(&vs / "decoder", cfg)?,
            quant_proj: linear_default(&vs / "quant_proj", z, q_out, true),
            post_quant_proj: linear_default(&vs / "post_quant_proj", d, z, false),
            latent_dim: d,
            radius: cfg.radius() as f64,
            posterior,
        })
    }

    /// The radius tokens are projected to: R, or `None` for the plain Gaussian posterior.
    pub fn token_radius(&self) -> Option<f64> {
        self.posterior.on_sphere().then_some(self.radius)
    }

    /// The posterior parameters from `quant_proj`: spherical μ = normalize(first d outputs), κ = softplus(last)
    /// + 1; Gaussian μ = first d outputs, log σ² = last d.
    pub fn posterior(&self, image: &Tensor) -> PosteriorParams {
        let h = self.encoder.forward(image).apply(&self.quant_proj);
        let d = self.latent_dim;
        match self.posterior {
            Posterior::PowerSpherical => PosteriorParams::Spherical {
                mu: l2_normalize(&h.narrow(-1, 0, d)),
                kappa: h.select(-1, d).softplus() + 1.0,
            },
            Posterior::Gaussian | Posterior::GaussianNorm => {
                PosteriorParams::Gaussian { mean: h.narrow(-1, 0, d), logvar: h.narrow(-1, d, d) }
            }
        }
    }

    /// Projects tokens onto the radius-R sphere (the official `normalize`).
    pub fn normalize(&self, z: &Tensor) -> Tensor {
        l2_normalize(z) * self.radius
    }

    /// Training-time encoding: a posterior sample in token space ([`PosteriorParams::rsample`]) and the mean KL.
    pub fn encode(&self, image: &Tensor) -> (Tensor, Tensor) {
        let q = self.posterior(image);
        (q.rsample(self.token_radius()), q.kl_mean())
    }

    /// Deterministic encoding: the posterior mode ([`PosteriorParams::mode`]).
    pub fn encode_mode(&self, image: &Tensor) -> Tensor {
        self.posterior(image).mode(self.token_radius())
    }

    /// tokens [N, L, d] → image [N, 3, H, W] (≈ [−1, 1]).
    pub fn decode(&self, z: &Tensor) -> Tensor {
        self.decoder.forward(&z.apply(&self.post_quant_proj))
    }
}
