//! The SphereAR autoregressive model: class-token prefix, a causal transformer with 2-D RoPE over the
//! image tokens, and a per-token diffusion head (a rectified-flow MLP with shared adaLN blocks).
//! Weight names are the official keys (`cls_embedding`, `proj_in`, `emb_norm`, `layers.N.*`, `norm`,
//! `pos_for_diff`, `head.net.*`), with the S-VAE beside them under `vae.*`.

use std::path::{Path, PathBuf};

use spherear_core::config::{head_hidden, ModelConfig};
use spherear_core::keys::TIME_FREQ_DIM;
use spherear_core::rope::rope_2d;
use spherear_core::schedule::{timestep_frequencies, TIME_FACTOR};
use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::checkpoint;
use crate::error::{Result, TrainError};
use crate::layers::{linear_std, rope_tensor, RmsNorm, TransformerBlock, INIT_STD};
use crate::vae::Vae;

/// Xavier-uniform linear layer with zero bias (the head's initialisation).
fn linear_xavier(vs: nn::Path, inp: i64, out: i64) -> nn::Linear {
    let a = (6.0 / (inp + out) as f64).sqrt();
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Uniform { lo: -a, up: a },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(vs, inp, out, cfg)
}

fn linear_zero(vs: nn::Path, inp: i64, out: i64) -> nn::Linear {
    let cfg = nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true };
    nn::linear(vs, inp, out, cfg)
}

/// LayerNorm over the last axis (eps 1e-6), with or without affine parameters.
fn layer_norm(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>) -> Tensor {
    let c = *x.size().last().unwrap_or(&1);
    x.layer_norm([c].as_slice(), w, b, 1e-6, false)
}

/// One residual block of the head: adaLN-modulated LayerNorm → SwiGLU MLP, gated residual.
#[derive(Debug)]
pub struct HeadResBlock {
    norm_w: Tensor,
    norm_b: Tensor,
    w1: nn::Linear,
    w2: nn::Linear,
}

impl HeadResBlock {
    fn new(vs: nn::Path, c: i64) -> Self {
        let hh = head_hidden(c as usize) as i64;
        HeadResBlock {
            norm_w: (&vs / "norm").ones("weight", &[c]),
            norm_b: (&vs / "norm").zeros("bias", &[c]),
            w1: linear_xavier(&vs / "w1", c, 2 * hh),
            w2: linear_xavier(&vs / "w2", hh, c),
        }
    }

    fn forward(&self, x: &Tensor, scale: &Tensor, shift: &Tensor, gate: &Tensor) -> Tensor {
        let h = layer_norm(x, Some(&self.norm_w), Some(&self.norm_b)) * (scale + 1.0) + shift;
        let ab = h.apply(&self.w1).chunk(2, -1);
        x + (ab[0].silu() * &ab[1]).apply(&self.w2) * gate
    }
}

/// The diffusion head `head.net`: velocity v(x_t, t | condition).
#[derive(Debug)]
pub struct DiffHead {
    time_mlp0: nn::Linear,
    time_mlp2: nn::Linear,
    cond_embed: nn::Linear,
    input_proj: nn::Linear,
    res_blocks: Vec<HeadResBlock>,
    ada_ln_blocks: Vec<nn::Linear>,
    final_modulation: nn::Linear,
    final_linear: nn::Linear,
    freqs: Tensor,
    blocks_per_adaln: usize,
}

impl DiffHead {
    pub fn new(vs: nn::Path, cfg: &ModelConfig) -> Self {
        let a = &cfg.ar;
        let (c, dim, d) = (a.head_dim as i64, a.dim as i64, cfg.latent_dim as i64);
        let te = &vs / "time_embed" / "mlp";
        let randn = nn::Init::Randn { mean: 0.0, stdev: INIT_STD };
        let time0 = nn::LinearConfig { ws_init: randn, bs_init: Some(nn::Init::Const(0.0)), bias: true };
        let fl = &vs / "final_layer";
        DiffHead {
            time_mlp0: nn::linear(&te / "0", TIME_FREQ_DIM as i64, c, time0),
            time_mlp2: nn::linear(&te / "2", c, c, time0),
            cond_embed: linear_xavier(&vs / "cond_embed", dim, c),
            input_proj: linear_xavier(&vs / "input_proj", d, c),
            res_blocks: (0..a.head_blocks).map(|i| HeadResBlock::new(&vs / "res_blocks" / i, c)).collect(),
            ada_ln_blocks: (0..a.head_adaln_blocks).map(|i| linear_zero(&vs / "ada_ln_blocks" / i, c, 3 * c)).collect(),
            final_modulation: linear_zero(&fl / "ada_ln_modulation", c, 2 * c),
            final_linear: linear_zero(&fl / "linear", c, d),
            freqs: Tensor::from_slice(&timestep_frequencies(TIME_FREQ_DIM)),
            blocks_per_adaln: (a.head_blocks / a.head_adaln_blocks).max(1),
        }
    }

    /// time_embed(t): MLP over [cos(1000·t·f), sin(1000·t·f)].
    pub fn time_embed(&self, t: &Tensor) -> Tensor {
        let args = (t.to_kind(Kind::Float) * TIME_FACTOR as f64).unsqueeze(-1) * self.freqs.unsqueeze(0);
        let emb = Tensor::cat(&[args.cos(), args.sin()], -1);
        emb.apply(&self.time_mlp0).silu().apply(&self.time_mlp2)
    }

    /// The condition embedding `cond_embed(c)`: constant across the sampling steps of one token.
    pub fn embed_condition(&self, c: &Tensor) -> Tensor {
        c.apply(&self.cond_embed)
    }

    /// Velocity from x_t [N, d], t [N] and an embedded condition [N, C].
    pub fn forward_embedded(&self, x: &Tensor, t: &Tensor, cond_emb: &Tensor) -> Tensor {
        let y = (self.time_embed(t) + cond_emb).silu();
        let mut h = x.apply(&self.input_proj);
        let mut mods: Vec<Tensor> = Vec::new();
        for (i, block) in self.res_blocks.iter().enumerate() {
            if i % self.blocks_per_adaln == 0 {
                mods = y.apply(&self.ada_ln_blocks[i / self.blocks_per_adaln]).chunk(3, -1);
            }
            h = block.forward(&h, &mods[0], &mods[1], &mods[2]);
        }
        let m = y.apply(&self.final_modulation).chunk(2, -1);
        (layer_norm(&h, None, None) * (&m[0] + 1.0) + &m[1]).apply(&self.final_linear)
    }

    /// Velocity v(x_t, t | c) for x [N, d], t [N], c [N, dim].
    pub fn forward(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Tensor {
        self.forward_embedded(x, t, &self.embed_condition(c))
    }

    /// Rectified-flow loss: t = sigmoid(n), n ~ N(0, 1); x_t = (1 − t)·ε + t·z; target velocity z − ε; MSE.
    pub fn loss(&self, target: &Tensor, c: &Tensor) -> Tensor {
        let n = target.size()[0];
        let t = Tensor::randn([n], (Kind::Float, target.device())).sigmoid();
        let noise = target.randn_like();
        let ti = t.unsqueeze(-1);
        let xt = (ti.ones_like() - &ti) * &noise + &ti * target;
        let v = target - &noise;
        (self.forward(&xt, &t, c) - v).square().mean(Kind::Float)
    }
}

/// Per-layer key/value buffers [B, H, T, hd], preallocated to the full sequence length T.
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, batch: usize) -> Self {
        let a = &cfg.ar;
        let shape = [batch as i64, a.n_head as i64, cfg.ar_seq_len() as i64, a.head_dim_attn() as i64];
        let z = || Tensor::zeros(shape, (Kind::Float, Device::Cpu));
        KvCache { k: (0..a.n_layer).map(|_| z()).collect(), v: (0..a.n_layer).map(|_| z()).collect() }
    }
}

/// The AR transformer with its diffusion head.
#[derive(Debug)]
pub struct SphereAr {
    pub cls_embedding: Tensor,
    pub proj_in: nn::Linear,
    pub emb_norm: RmsNorm,
    pub layers: Vec<TransformerBlock>,
    pub norm: RmsNorm,
    pub pos_for_diff: Tensor,
    pub head: DiffHead,
    /// RoPE rows for class tokens + the first L − 1 image tokens (not a checkpoint entry).
    pub rope: Tensor,
    cls_tokens: i64,
    dim: i64,
}

impl SphereAr {
    pub fn new(vs: nn::Path, cfg: &ModelConfig) -> Result<Self> {
        let a = &cfg.ar;
        let (dim, d, l) = (a.dim as i64, cfg.latent_dim as i64, cfg.num_tokens() as i64);
        let randn = nn::Init::Randn { mean: 0.0, stdev: INIT_STD };
        let rope = rope_tensor(&rope_2d(cfg.grid(), a.head_dim_attn(), cfg.cls_token_num)?.truncated(cfg.ar_seq_len()));
        Ok(SphereAr {
            cls_embedding: (&vs / "cls_embedding").var(
                "weight",
                &[cfg.num_classes as i64 + 1, dim * cfg.cls_token_num as i64],
                randn,
            ),
            proj_in: linear_std(&vs / "proj_in", d, dim, true),
            emb_norm: RmsNorm::new(&vs / "emb_norm", dim),
            layers: (0..a.n_layer)
                .map(|i| TransformerBlock::new(&vs / "layers" / i, dim, a.n_head as i64, true))
                .collect(),
            norm: RmsNorm::new(&vs / "norm", dim),
            pos_for_diff: (&vs / "pos_for_diff").var("weight", &[l, dim], randn),
            head: DiffHead::new(&vs / "head" / "net", cfg),
            rope,
            cls_tokens: cfg.cls_token_num as i64,
            dim,
        })
    }

    /// Class tokens [B, cls, dim] for class ids [B] (id = num_classes is the null class).
    pub fn class_tokens(&self, class_ids: &Tensor) -> Tensor {
        let b = class_ids.size()[0];
        self.cls_embedding.index_select(0, class_ids).view([b, self.cls_tokens, self.dim])
    }

    /// Full causal forward: the head condition for every image token, [B, L, dim], from tokens
    /// z [B, L, d] (only z_0 … z_{L−2} are inputs) and class ids [B].
    pub fn conditions(&self, z: &Tensor, class_ids: &Tensor) -> Tensor {
        let l = z.size()[1];
        let x = z.narrow(1, 0, l - 1).apply(&self.proj_in);
        let mut h = Tensor::cat(&[self.class_tokens(class_ids), x], 1).apply(&self.emb_norm);
        for layer in &self.layers {
            h = layer.forward(&h, &self.rope);
        }
        h.narrow(1, self.cls_tokens - 1, l).apply(&self.norm) + &self.pos_for_diff
    }

    /// Runs `x` [B, S, dim] at sequence positions start..start+S through the blocks, reading and
    /// writing the cache; returns norm(h) [B, S, dim].
    fn forward_cached(&self, x: &Tensor, start: i64, cache: &mut KvCache) -> Tensor {
        let s = x.size()[1];
        let rope = self.rope.narrow(0, start, s);
        let end = start + s;
        // Query i (at position start + i) sees keys 0..=start + i.
        let mask = (s > 1).then(|| {
            let qi = Tensor::arange(s, (Kind::Int64, Device::Cpu)).unsqueeze(1) + start;
            let kj = Tensor::arange(end, (Kind::Int64, Device::Cpu)).unsqueeze(0);
            kj.le_tensor(&qi)
        });
        let mut h = x.apply(&self.emb_norm);
        for (li, layer) in self.layers.iter().enumerate() {
            let att = &layer.attention;
            let (q, k, v) = att.qkv(&h.apply(&layer.attention_norm), &rope);
            cache.k[li].narrow(2, start, s).copy_(&k);
            cache.v[li].narrow(2, start, s).copy_(&v);
            let keys = cache.k[li].narrow(2, 0, end);
            let values = cache.v[li].narrow(2, 0, end);
            let o = Tensor::scaled_dot_product_attention(&q, &keys, &values, mask.as_ref(), 0.0, false, None, false);
            let h1 = &h + att.out(&o);
            h = &h1 + h1.apply(&layer.ffn_norm).apply(&layer.feed_forward);
        }
        h.apply(&self.norm)
    }

    /// Prefill: runs the class tokens and returns the head condition for image token 0, [B, dim].
    pub fn prefill(&self, class_ids: &Tensor, cache: &mut KvCache) -> Tensor {
        let h = self.forward_cached(&self.class_tokens(class_ids), 0, cache);
        h.select(1, self.cls_tokens - 1) + self.pos_for_diff.get(0)
    }

    /// One step: consumes image token i − 1 ([B, d]) at sequence position cls + i − 1 and returns the
    /// head condition for image token i, [B, dim].
    pub fn step(&self, token: &Tensor, i: usize, cache: &mut KvCache) -> Tensor {
        let x = token.apply(&self.proj_in).unsqueeze(1);
        let h = self.forward_cached(&x, self.cls_tokens + i as i64 - 1, cache);
        h.select(1, 0) + self.pos_for_diff.get(i as i64)
    }
}

/// The whole model in one var store: the AR model at the root, the S-VAE under `vae.`.
pub struct ArModel {
    pub vs: nn::VarStore,
    pub ar: SphereAr,
    pub vae: Vae,
    pub config: ModelConfig,
}

/// Weights file of a finished AR run.
pub fn weights_path(dir: &Path) -> PathBuf {
    dir.join("ar.safetensors")
}

impl ArModel {
    pub fn new(cfg: &ModelConfig) -> Result<Self> {
        let vs = nn::VarStore::new(Device::Cpu);
        let vae = Vae::new(vs.root() / "vae", cfg)?;
        let ar = SphereAr::new(vs.root(), cfg)?;
        Ok(ArModel { vs, ar, vae, config: cfg.clone() })
    }

    /// Loads `ar.safetensors` (a run folder or the file itself); every key and shape must match.
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() { weights_path(path) } else { path.to_path_buf() };
        if !file.exists() {
            return Err(TrainError::Checkpoint {
                path: file.display().to_string(),
                msg: "not found (train one with `trainer fit --stage ar` or import one with `trainer import`)".into(),
            });
        }
        let tf = checkpoint::load(&file)?;
        let cfg = tf.config(&file)?;
        let m = ArModel::new(&cfg)?;
        checkpoint::load_into(&m.vs, &tf.tensors, "", &format!("checkpoint {}", file.display()))?;
        Ok(m)
    }

    /// Writes all weights (official layout) plus config.json beside them.
    pub fn save(&self, dir: &Path, stage: &str) -> Result<()> {
        self.save_tensors(dir, checkpoint::named_tensors(&self.vs, ""), stage)
    }

    /// Writes the given full set of official-layout tensors with this model's config.
    pub fn save_tensors(
        &self,
        dir: &Path,
        tensors: std::collections::BTreeMap<String, Tensor>,
        stage: &str,
    ) -> Result<()> {
        self.config.save(&dir.join("config.json"))?;
        checkpoint::save_weights(&weights_path(dir), stage, &self.config, tensors)
    }
}
