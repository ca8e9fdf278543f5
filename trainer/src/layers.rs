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

/// `nn.Linear` with tch's default initialisation: weight Kaiming-uniform with the ReLU gain,
/// U(±√6/√fan_in), bias U(±1/√fan_in). This is *not* PyTorch's default (weight and bias U(±1/√fan_in), a
/// √6 ≈ 2.45× narrower weight); [`InitScheme::Pytorch`] re-draws such layers with
/// [`reset_pytorch_default`].
pub fn linear_default(vs: nn::Path, inp: i64, out: i64, bias: bool) -> nn::Linear {
    nn::linear(vs, inp, out, nn::LinearConfig { bias, ..Default::default() })
}

/// How the layers the official code leaves at the framework's default initialisation are initialised
/// (`--init`): the S-VAE's convolutions and its `encoder.output`, `quant_proj` and `post_quant_proj`
/// linears. Every other layer has an explicit initialisation, the official one, under both schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitScheme {
    /// PyTorch's `nn.Linear`/`nn.Conv2d`/`nn.ConvTranspose2d` default (official): weight and bias
    /// U(±1/√fan_in).
    Pytorch,
    /// tch's default (ours before): weight U(±√6/√fan_in) (Kaiming-uniform, ReLU gain), linear bias
    /// U(±1/√fan_in).
    Tch,
}

impl InitScheme {
    /// The flag value (`pytorch`, `tch`).
    pub fn name(self) -> &'static str {
        match self {
            InitScheme::Pytorch => "pytorch",
            InitScheme::Tch => "tch",
        }
    }
}

/// PyTorch's fan-in of a weight: `size(1)` × the kernel's elements (`[out, in]` linear → in;
/// `[out, in, k, k]` conv → in·k²; `[in, out, k, k]` transposed conv → out·k², as PyTorch computes it).
pub fn pytorch_fan_in(shape: &[i64]) -> i64 {
    shape.get(1).copied().unwrap_or(1) * shape.iter().skip(2).product::<i64>()
}

/// Re-draws the variables of `vs` that `select` accepts with PyTorch's default initialisation: a weight
/// from U(±1/√fan_in) ([`pytorch_fan_in`]), a bias `X.bias` from U(±1/√fan_in of `X.weight`). Variables
/// are visited in name order, so the result depends only on libtorch's seed.
pub fn reset_pytorch_default(vs: &nn::VarStore, select: impl Fn(&str, &Tensor) -> bool) {
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().filter(|n| select(n, &vars[*n])).collect();
    names.sort();
    for name in names {
        let weight = match name.strip_suffix(".bias") {
            Some(stem) => vars.get(&format!("{stem}.weight")),
            None => vars.get(name),
        };
        let Some(weight) = weight else { continue };
        let bound = 1.0 / (pytorch_fan_in(&weight.size()) as f64).sqrt();
        let mut t = vars[name].shallow_clone();
        tch::no_grad(|| {
            let _ = t.uniform_(-bound, bound);
        });
    }
}

/// RMSNorm with a learned weight (eps 1e-6): x · rsqrt(mean(x²) + eps) · w.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vs: nn::Path, dim: i64) -> Self {
        RmsNorm { weight: vs.ones("weight", &[dim]), eps: spherear_core::config::NORM_EPS }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// (max |w|, std) of a tensor.
    fn spread(t: &Tensor) -> (f64, f64) {
        (t.abs().max().double_value(&[]), t.std(true).double_value(&[]))
    }

    #[test]
    fn pytorch_default_bounds_for_linear_and_conv() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let lin = linear_default(&vs.root() / "lin", 256, 512, true);
        let conv_cfg = nn::ConvConfig { bias: false, ..Default::default() };
        let conv = nn::conv2d(&vs.root() / "conv", 32, 64, 3, conv_cfg);
        let convt = nn::conv_transpose2d(&vs.root() / "convt", 64, 16, 4, Default::default());
        let lin_bound = 1.0 / 256f64.sqrt();
        let conv_bound = 1.0 / (32.0 * 9.0f64).sqrt();
        // tch's default (ours before): √6 ≈ 2.45× wider weights than PyTorch's.
        let (m, sd) = spread(&lin.ws);
        assert!(m > 2.0 * lin_bound && m <= 6f64.sqrt() * lin_bound, "tch linear max {m}");
        assert!((sd / (6f64.sqrt() * lin_bound / 3f64.sqrt()) - 1.0).abs() < 0.03, "tch linear std {sd}");
        assert_eq!(pytorch_fan_in(&conv.ws.size()), 32 * 9);
        // ConvTranspose2d weight [in 64, out 16, 4, 4]: PyTorch's fan-in is 16·16.
        assert_eq!(pytorch_fan_in(&convt.ws.size()), 16 * 16);

        reset_pytorch_default(&vs, |n, _| n != "convt.bias");
        for (t, bound, what) in [
            (&lin.ws, lin_bound, "linear weight"),
            (lin.bs.as_ref().unwrap(), lin_bound, "linear bias"),
            (&conv.ws, conv_bound, "conv weight"),
            (&convt.ws, 1.0 / 16.0, "conv-transpose weight"),
        ] {
            let (m, sd) = spread(t);
            // U(±b): max |w| just under b, std b/√3.
            assert!(m <= bound && m > 0.97 * bound, "{what}: max {m} vs bound {bound}");
            let rel = if t.numel() > 10_000 { 0.03 } else { 0.15 };
            assert!((sd / (bound / 3f64.sqrt()) - 1.0).abs() < rel, "{what}: std {sd} vs {}", bound / 3f64.sqrt());
        }
        // Unselected variables keep their values (the conv-transpose bias starts at 0 in tch).
        assert_eq!(convt.bs.as_ref().unwrap().abs().max().double_value(&[]), 0.0);
    }
}
