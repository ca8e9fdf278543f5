//! Building blocks shared by the S-VAE and the AR transformer: RMSNorm, 2-D RoPE attention, SwiGLU
//! feed-forward, the pre-norm transformer block. Weight names follow the official state dict.

use spherear_core::config::ffn_hidden;
use tch::nn::{self, Module};
use tch::Tensor;

/// Standard deviation of the official normal initialisation of linear and embedding weights.
pub const INIT_STD: f64 = 0.02;

/// `nn.Linear` with the official N(0, 0.02) weight and zero bias initialisation.
pub fn linear_std(vs: nn::Path, inp: i64, out: i64, bias: bool) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: INIT_STD },
        bs_init: Some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(vs, inp, out, cfg)
}

/// `nn.Linear` with PyTorch's default (Kaiming-uniform) initialisation.
pub fn linear_default(vs: nn::Path, inp: i64, out: i64, bias: bool) -> nn::Linear {
    nn::linear(vs, inp, out, nn::LinearConfig { bias, ..Default::default() })
}

/// RMSNorm with a learned weight (eps 1e-6): x · rsqrt(mean(x²) + eps) · w.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vs: nn::Path, dim: i64) -> Self {
        RmsNorm { weight: vs.ones("weight", &[dim]), eps: 1e-6 }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let ms = x.square().mean_dim(-1, true, x.kind());
        x * (ms + self.eps).rsqrt() * &self.weight
    }
}

/// Rotates interleaved pairs of `x` [B, S, H, hd] by the RoPE table rows `rope` [S, hd/2, 2] (cos, sin).
pub fn apply_rope(x: &Tensor, rope: &Tensor) -> Tensor {
    let (b, s, h, hd) = x.size4().unwrap_or((0, 0, 0, 0));
    let xs = x.view([b, s, h, hd / 2, 2]);
    let (x0, x1) = (xs.select(-1, 0), xs.select(-1, 1));
    let r = rope.view([1, s, 1, hd / 2, 2]);
    let (c, sn) = (r.select(-1, 0), r.select(-1, 1));
    Tensor::stack(&[&x0 * &c - &x1 * &sn, &x1 * &c + &x0 * &sn], -1).flatten(3, -1)
}

/// Multi-head self-attention with 2-D RoPE (`attention.wqkv`, `attention.wo`, no biases).
#[derive(Debug)]
pub struct Attention {
    pub wqkv: nn::Linear,
    pub wo: nn::Linear,
    pub n_head: i64,
    pub head_dim: i64,
    pub causal: bool,
}

impl Attention {
    pub fn new(vs: nn::Path, dim: i64, n_head: i64, causal: bool) -> Self {
        Attention {
            wqkv: linear_std(&vs / "wqkv", dim, 3 * dim, false),
            wo: linear_std(&vs / "wo", dim, dim, false),
            n_head,
            head_dim: dim / n_head,
            causal,
        }
    }

    /// q, k, v as [B, H, S, hd], with RoPE applied to q and k.
    pub fn qkv(&self, x: &Tensor, rope: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, s, _) = x.size3().unwrap_or((0, 0, 0));
        let shape = [b, s, self.n_head, self.head_dim];
        let parts = x.apply(&self.wqkv).chunk(3, -1);
        let q = apply_rope(&parts[0].view(shape), rope).transpose(1, 2);
        let k = apply_rope(&parts[1].view(shape), rope).transpose(1, 2);
        let v = parts[2].view(shape).transpose(1, 2);
        (q, k, v)
    }

    /// Attention output projection of per-head results [B, H, S, hd].
    pub fn out(&self, o: &Tensor) -> Tensor {
        let (b, _, s, _) = o.size4().unwrap_or((0, 0, 0, 0));
        o.transpose(1, 2).contiguous().view([b, s, self.n_head * self.head_dim]).apply(&self.wo)
    }

    /// Full-sequence attention over `x` [B, S, dim] with RoPE rows `rope` [S, hd/2, 2].
    pub fn forward(&self, x: &Tensor, rope: &Tensor) -> Tensor {
        let (q, k, v) = self.qkv(x, rope);
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, self.causal, None, false);
        self.out(&o)
    }
}

/// SwiGLU feed-forward: `w1` (dim → 2·hidden) split a, b → `w2`(silu(a)·b).
#[derive(Debug)]
pub struct FeedForward {
    pub w1: nn::Linear,
    pub w2: nn::Linear,
}

impl FeedForward {
    pub fn new(vs: nn::Path, dim: i64) -> Self {
        let hidden = ffn_hidden(dim as usize) as i64;
        FeedForward {
            w1: linear_std(&vs / "w1", dim, 2 * hidden, false),
            w2: linear_std(&vs / "w2", hidden, dim, false),
        }
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Tensor {
        let ab = x.apply(&self.w1).chunk(2, -1);
        (ab[0].silu() * &ab[1]).apply(&self.w2)
    }
}

/// Pre-norm transformer block: x + attn(norm(x)), then h + ffn(norm(h)).
#[derive(Debug)]
pub struct TransformerBlock {
    pub attention: Attention,
    pub feed_forward: FeedForward,
    pub attention_norm: RmsNorm,
    pub ffn_norm: RmsNorm,
}

impl TransformerBlock {
    pub fn new(vs: nn::Path, dim: i64, n_head: i64, causal: bool) -> Self {
        TransformerBlock {
            attention: Attention::new(&vs / "attention", dim, n_head, causal),
            feed_forward: FeedForward::new(&vs / "feed_forward", dim),
            attention_norm: RmsNorm::new(&vs / "attention_norm", dim),
            ffn_norm: RmsNorm::new(&vs / "ffn_norm", dim),
        }
    }

    pub fn forward(&self, x: &Tensor, rope: &Tensor) -> Tensor {
        let h = x + self.attention.forward(&x.apply(&self.attention_norm), rope);
        &h + h.apply(&self.ffn_norm).apply(&self.feed_forward)
    }
}

/// The core RoPE table as a tensor [P, hd/2, 2].
pub fn rope_tensor(table: &spherear_core::rope::RopeTable) -> Tensor {
    Tensor::from_slice(&table.data).view([table.positions as i64, table.pairs as i64, 2])
}
