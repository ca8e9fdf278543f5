//! The analytic cost model of sampling: FLOPs and weight bytes per call of each graph, per image, and
//! the roofline time bound they imply on a machine with a given FLOP rate and memory bandwidth.
//!
//! What is counted (documented so the numbers can be checked by hand):
//! - **FLOPs = 2 × multiply–accumulates of every matrix product and convolution**, plus attention
//!   (q·kᵀ and attention·v, 2 × 2 × context × dim per row and layer). Norms, activations, softmax, RoPE,
//!   residual adds and the host-side Euler–Maruyama update are not counted (they are O(dim) per row, not
//!   O(dim²)).
//! - **Attention context is causal**: a row at sequence position p attends to p + 1 keys. Per image the
//!   AR steps therefore see on average `cls_token_num + (num_tokens − 1) / 2` keys — the work the model
//!   needs. (The exported `ar_step` attends over the whole preallocated cache with a mask; that extra work
//!   is an implementation cost, not part of the model's.)
//! - **Weight bytes**: every weight a call uses is read once per call (the batch shares it), in the
//!   export's dtype. The KV cache a step reads (keys and values up to its position, per row) is counted
//!   with the weights as memory traffic. Activations are not counted.
//! - **Rows**: under CFG (cfg > 1) the AR graphs and the head run 2 rows per image (conditional and
//!   null class); without CFG 1 row. The head is evaluated `steps + 1` times per token (Euler–Maruyama
//!   steps plus the final Euler step).
//!
//! The roofline bound of a call is max(FLOPs / peak FLOP/s, bytes / bandwidth); a generation's bound is the
//! sum over its calls. At batch 1 every call is bandwidth-bound (weights re-read for one or two rows); at
//! large batch the matrix products become FLOP-bound.

use serde::{Deserialize, Serialize};

use spherear_core::config::{ffn_hidden, head_hidden, ModelConfig};
use spherear_core::keys::{ar_keys, param_count, vae_keys, TIME_FREQ_DIM};
use spherear_core::schedule::head_evals;

/// FLOPs and memory traffic of one call, per row (FLOPs) and per call (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CallCost {
    /// FLOPs per row (image for the decoder).
    pub flops_per_row: f64,
    /// Parameters the call reads (once per call, whatever the batch).
    pub weight_params: f64,
    /// The weight bytes a call reads as an export stores them (quantized blocks and scales included), when
    /// known; otherwise `weight_params × bytes_per_elem`.
    #[serde(default)]
    pub weight_bytes: Option<f64>,
    /// KV-cache elements read per row (AR step), 0 otherwise.
    pub kv_elems_per_row: f64,
}

impl CallCost {
    /// Bytes moved by one call over `rows` rows with a `bytes_per_elem`-byte cache (and weights, unless
    /// their stored size is known).
    pub fn bytes(&self, rows: f64, bytes_per_elem: f64) -> f64 {
        self.weight_bytes.unwrap_or(self.weight_params * bytes_per_elem) + self.kv_elems_per_row * rows * bytes_per_elem
    }
    pub fn flops(&self, rows: f64) -> f64 {
        self.flops_per_row * rows
    }
}

/// Cost of every graph of a model (per call).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelCost {
    /// Class tokens through the transformer (one call per batch).
    pub prefill: CallCost,
    /// One AR step at the average causal context (one call per token after the first).
    pub ar_step: CallCost,
    /// One diffusion-head evaluation (`steps + 1` calls per token).
    pub head: CallCost,
    /// Decoding one image (one call per batch; `flops_per_row` per image).
    pub decoder: CallCost,
    pub num_tokens: usize,
}

/// A sampling setting: images per batch, head steps, whether CFG doubles the rows, bytes per weight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Setting {
    pub batch: usize,
    pub steps: usize,
    pub cfg: bool,
    /// 4 for fp32 exports, 2 for fp16.
    pub bytes_per_elem: usize,
}

/// Totals per image of a setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageCost {
    pub flops: f64,
    pub bytes: f64,
    /// FLOPs and bytes of the head alone (its share of the work).
    pub head_flops: f64,
    pub head_bytes: f64,
}

/// A machine for the roofline: peak matrix-multiply FLOP/s and memory bandwidth in bytes/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub name: String,
    pub flops_per_s: f64,
    pub bytes_per_s: f64,
    /// Where the figures come from (measured here, or a datasheet).
    pub source: String,
}

/// Roofline bound of a setting, per image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    /// Σ over calls of max(FLOP time, byte time), per image.
    pub seconds: f64,
    /// FLOPs / peak: the time if every call were compute-bound.
    pub flop_seconds: f64,
    /// Bytes / bandwidth: the time if every call were bandwidth-bound.
    pub byte_seconds: f64,
}

impl Bound {
    pub fn images_per_second(&self) -> f64 {
        1.0 / self.seconds.max(1e-30)
    }
}

/// FLOPs of a pre-norm transformer block (SwiGLU FFN) of width `dim` for one row with `ctx` keys.
pub fn block_flops(dim: usize, ctx: f64) -> f64 {
    let (d, h) = (dim as f64, ffn_hidden(dim) as f64);
    // wqkv (3d×d) + wo (d×d) + w1 (2h×d) + w2 (d×h), then attention over ctx keys.
    2.0 * (3.0 * d * d + d * d + 2.0 * h * d + h * d) + 4.0 * ctx * d
}

/// FLOPs of one head evaluation for one row.
pub fn head_flops(cfg: &ModelConfig) -> f64 {
    let a = &cfg.ar;
    let (c, dim, d) = (a.head_dim as f64, a.dim as f64, cfg.latent_dim as f64);
    let hh = head_hidden(a.head_dim) as f64;
    let embed = TIME_FREQ_DIM as f64 * c + c * c + dim * c + d * c;
    let blocks = a.head_blocks as f64 * (c * 2.0 * hh + hh * c);
    let ada = a.head_adaln_blocks as f64 * c * 3.0 * c + c * 2.0 * c;
    2.0 * (embed + blocks + ada + c * d)
}

/// FLOPs of decoding one image (S-VAE decoder: projection, conv_in, ViT blocks, CNN unpatchify, conv_out).
pub fn decoder_flops(cfg: &ModelConfig) -> f64 {
    let v = &cfg.vae;
    let (z, l, g) = (v.z_channels as f64, cfg.num_tokens() as f64, cfg.grid() as f64);
    let s = (v.register_tokens + cfg.num_tokens()) as f64;
    let mut f = 2.0 * l * cfg.latent_dim as f64 * z; // post_quant_proj
    f += 2.0 * g * g * z * z * 9.0; // conv_in 3×3
    f += v.decoder_layers as f64 * s * block_flops(v.z_channels, s);
    let chs: Vec<f64> = v.cnn_chs.iter().rev().map(|&c| c as f64).collect();
    let mut side = g;
    for w in chs.windows(2) {
        let (ci, co) = (w[0], w[1]);
        let out = 2.0 * side;
        // block.2: ConvTranspose 4×4 stride 2 (MACs = input pixels × ci × co × 16); shortcut 2×2 stride 2;
        // block.5, block2.2, block2.5: 3×3 convolutions co→co at the output resolution.
        f += 2.0 * side * side * ci * co * (16.0 + 4.0);
        f += 2.0 * out * out * co * co * 9.0 * 3.0;
        side = out;
    }
    f += 2.0 * side * side * v.cnn_chs[0] as f64 * 3.0 * 9.0; // conv_out
    f
}

impl ModelCost {
    pub fn new(cfg: &ModelConfig) -> Self {
        let a = &cfg.ar;
        let (dim, l, cls) = (a.dim, cfg.num_tokens(), cfg.cls_token_num);
        let keys = ar_keys(cfg);
        let count = |pred: &dyn Fn(&str) -> bool| {
            keys.iter().filter(|k| pred(&k.name)).map(|k| k.shape.iter().product::<usize>()).sum::<usize>() as f64
        };
        let layers = count(&|n| n.starts_with("layers.")) + count(&|n| n == "norm.weight");
        let head_params = count(&|n| n.starts_with("head."));
        // Prefill: cls rows through every layer, row i attending to i + 1 keys (mean (cls + 1) / 2).
        let prefill_ctx = (cls as f64 + 1.0) / 2.0;
        let prefill = CallCost {
            flops_per_row: cls as f64 * a.n_layer as f64 * block_flops(dim, prefill_ctx),
            // The transformer plus one class-embedding row (dim × cls) per class looked up.
            weight_params: layers + (dim * cls) as f64,
            weight_bytes: None,
            kv_elems_per_row: 0.0,
        };
        // A step at sequence position p = cls + i − 1 (i = 1..L−1) attends to p + 1 = cls + i keys:
        // mean over i of cls + i = cls + L / 2.
        let ctx = cls as f64 + l as f64 / 2.0;
        let ar_step = CallCost {
            flops_per_row: 2.0 * (cfg.latent_dim * dim) as f64 + a.n_layer as f64 * block_flops(dim, ctx),
            weight_params: layers + count(&|n| n.starts_with("proj_in")) + count(&|n| n == "emb_norm.weight"),
            weight_bytes: None,
            kv_elems_per_row: 2.0 * a.n_layer as f64 * ctx * dim as f64,
        };
        let head = CallCost {
            flops_per_row: head_flops(cfg),
            weight_params: head_params,
            weight_bytes: None,
            kv_elems_per_row: 0.0,
        };
        let dec_params = vae_keys(cfg)
            .iter()
            .filter(|k| k.name.starts_with("vae.decoder.") || k.name == "vae.post_quant_proj.weight")
            .filter(|k| !k.name.ends_with("freqs_cis"))
            .map(|k| k.shape.iter().product::<usize>())
            .sum::<usize>() as f64;
        let decoder = CallCost {
            flops_per_row: decoder_flops(cfg),
            weight_params: dec_params,
            weight_bytes: None,
            kv_elems_per_row: 0.0,
        };
        ModelCost { prefill, ar_step, head, decoder, num_tokens: l }
    }

    /// The same model with the weight bytes each graph of an export really reads per call
    /// (`manifest.json`'s per-graph `weight_bytes`: quantized blocks and scales, constants), where the
    /// manifest records them. The cost of looked-up rows stays the model's estimate.
    pub fn with_export_bytes(mut self, m: &spherear_core::manifest::Manifest) -> Self {
        let bytes = |g: &str| m.graph_precision(g).and_then(|p| p.weight_bytes).map(|b| b as f64);
        for (call, g) in [
            (&mut self.prefill, "ar_prefill"),
            (&mut self.ar_step, "ar_step"),
            (&mut self.head, "head_step"),
            (&mut self.decoder, "decoder"),
        ] {
            call.weight_bytes = bytes(g);
        }
        self
    }

    /// (call, calls per batch, rows per call) of a setting; per batch of `s.batch` images.
    fn calls(&self, s: &Setting) -> [(CallCost, f64, f64); 4] {
        let rows = if s.cfg { 2.0 } else { 1.0 } * s.batch as f64;
        let l = self.num_tokens as f64;
        [
            (self.prefill, 1.0, rows),
            (self.ar_step, l - 1.0, rows),
            (self.head, l * head_evals(s.steps) as f64, rows),
            (self.decoder, 1.0, s.batch as f64),
        ]
    }

    /// FLOPs and bytes per image of a setting.
    pub fn per_image(&self, s: &Setting) -> ImageCost {
        let mut c = ImageCost::default();
        let b = s.batch as f64;
        for (i, (call, n, rows)) in self.calls(s).into_iter().enumerate() {
            let f = n * call.flops(rows) / b;
            let by = n * call.bytes(rows, s.bytes_per_elem as f64) / b;
            c.flops += f;
            c.bytes += by;
            if i == 2 {
                c.head_flops = f;
                c.head_bytes = by;
            }
        }
        c
    }

    /// Roofline bound per image of a setting on a machine.
    pub fn bound(&self, s: &Setting, m: &Machine) -> Bound {
        let mut out = Bound::default();
        let b = s.batch as f64;
        for (call, n, rows) in self.calls(s) {
            let ft = call.flops(rows) / m.flops_per_s;
            let bt = call.bytes(rows, s.bytes_per_elem as f64) / m.bytes_per_s;
            out.seconds += n * ft.max(bt) / b;
            out.flop_seconds += n * ft / b;
            out.byte_seconds += n * bt / b;
        }
        out
    }
}

/// Parameters of the AR transformer + head (what `ModelCost` reads per token), for reports.
pub fn ar_params(cfg: &ModelConfig) -> usize {
    param_count(&ar_keys(cfg))
}

/// Datasheet figures of the GPUs the paper and users care about (dense, no sparsity), for projections.
/// FP32 uses the CUDA-core rate (ONNX Runtime's CUDA provider does not enable TF32 by default); FP16 the
/// tensor-core rate.
pub fn datasheet_gpus(fp16: bool) -> Vec<Machine> {
    let (a100, h100) = if fp16 { (312e12, 989e12) } else { (19.5e12, 67e12) };
    let prec = if fp16 { "fp16 tensor core, dense" } else { "fp32 CUDA cores" };
    vec![
        Machine {
            name: "A100 80GB SXM".into(),
            flops_per_s: a100,
            bytes_per_s: 2.039e12,
            source: format!("NVIDIA datasheet: {} TFLOP/s {prec}, 2039 GB/s HBM2e", a100 / 1e12),
        },
        Machine {
            name: "H100 SXM".into(),
            flops_per_s: h100,
            bytes_per_s: 3.35e12,
            source: format!("NVIDIA datasheet: {} TFLOP/s {prec}, 3350 GB/s HBM3", h100 / 1e12),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use spherear_core::config::{ArConfig, VaeConfig};

    /// A config small enough to count by hand.
    fn hand() -> ModelConfig {
        ModelConfig {
            name: "hand".into(),
            image_size: 4,
            patch_size: 2,
            latent_dim: 2,
            num_classes: 3,
            cls_token_num: 1,
            ar: ArConfig {
                dim: 6,
                n_layer: 1,
                n_head: 1,
                head_blocks: 1,
                head_dim: 4,
                head_adaln_blocks: 1,
                diff_batch_mul: 1,
                class_dropout: 0.1,
            },
            vae: VaeConfig {
                z_channels: 4,
                n_head: 1,
                cnn_chs: vec![2, 4],
                encoder_layers: 1,
                decoder_layers: 1,
                register_tokens: 1,
                posterior: Default::default(),
            },
        }
    }

    #[test]
    fn hand_counted_tiny_config() {
        let cfg = hand();
        // dim 6: ffn hidden = round_up(2·4·6/3 = 16, 256) = 256.
        assert_eq!(ffn_hidden(6), 256);
        // Block, one row with ctx keys: 2·(3·36 + 36 + 2·256·6 + 256·6) + 4·ctx·6
        //   = 2·(108 + 36 + 3072 + 1536) + 24·ctx = 9504 + 24·ctx.
        assert_eq!(block_flops(6, 3.0), 9504.0 + 72.0);
        let c = ModelCost::new(&cfg);
        // 4 tokens (grid 2×2), cls 1: step context = 1 + 4/2 = 3; proj_in 2·2·6 = 24.
        assert_eq!(c.ar_step.flops_per_row, 24.0 + 9504.0 + 72.0);
        // Prefill: 1 class row, context (1+1)/2 = 1.
        assert_eq!(c.prefill.flops_per_row, 9504.0 + 24.0);
        // KV read per row: 2 (k, v) · 1 layer · 3 keys · 6 = 36.
        assert_eq!(c.ar_step.kv_elems_per_row, 36.0);
        // Head, c = 4, hidden 6, d = 2: embed 256·4 + 16 + 24 + 8 = 1072; block 4·12 + 6·4 = 72;
        // adaLN 4·12 + final modulation 4·8 = 80; final linear 8 → 2·1232 = 2464.
        assert_eq!(head_flops(&cfg), 2464.0);
        // Decoder, z 4, 4 tokens, grid 2, 1 register: post_quant 2·4·2·4 = 64; conv_in 2·4·16·9 = 1152;
        // one block over 5 rows with 5 keys: 5 · (2·(48 + 16 + 2048 + 1024) + 4·5·4 = 6352) = 31760;
        // one CNN stage 4→2 from side 2 to 4: 2·4·4·2·20 = 1280 and 2·16·4·27 = 3456; conv_out 2·16·2·27 = 1728.
        assert_eq!(ffn_hidden(4), 256);
        assert_eq!(decoder_flops(&cfg), 64.0 + 1152.0 + 31760.0 + 1280.0 + 3456.0 + 1728.0);
        // Weight params of a step = transformer layers + final norm + proj_in + emb_norm.
        let layer = 3.0 * 36.0 + 36.0 + 2.0 * 256.0 * 6.0 + 6.0 * 256.0 + 12.0;
        assert_eq!(c.ar_step.weight_params, layer + 6.0 + (12.0 + 6.0) + 6.0);
    }

    #[test]
    fn per_image_totals_and_roofline() {
        let cfg = hand();
        let c = ModelCost::new(&cfg);
        let s = Setting { batch: 2, steps: 3, cfg: true, bytes_per_elem: 4 };
        let img = c.per_image(&s);
        // Per image: 2 rows for prefill and the 3 steps; 4 tokens × 4 head evaluations × 2 rows; 1 decode.
        let want = 2.0 * c.prefill.flops_per_row
            + 3.0 * 2.0 * c.ar_step.flops_per_row
            + 16.0 * 2.0 * c.head.flops_per_row
            + c.decoder.flops_per_row;
        assert!((img.flops - want).abs() < 1e-6);
        assert!((img.head_flops - 32.0 * c.head.flops_per_row).abs() < 1e-6);
        // Weights are shared by the batch: bytes per image halve (minus the per-row KV part) at batch 2.
        let s1 = Setting { batch: 1, ..s };
        let b1 = c.per_image(&s1).bytes;
        let kv = 3.0 * c.ar_step.kv_elems_per_row * 2.0 * 4.0;
        assert!(((b1 - kv) / 2.0 - (img.bytes - kv)).abs() < 1e-6);
        // Bandwidth-only machine: the bound is the byte time; FLOP-only: the FLOP time.
        let slow_mem = Machine { name: "m".into(), flops_per_s: 1e30, bytes_per_s: 1.0, source: String::new() };
        let bm = c.bound(&s, &slow_mem);
        assert!((bm.seconds - img.bytes).abs() / img.bytes < 1e-9);
        let slow_alu = Machine { name: "m".into(), flops_per_s: 1.0, bytes_per_s: 1e30, source: String::new() };
        assert!((c.bound(&s, &slow_alu).seconds - img.flops).abs() / img.flops < 1e-9);
    }

    #[test]
    fn spherear_b_magnitudes() {
        let cfg = ModelConfig::preset("spherear-b").unwrap();
        let c = ModelCost::new(&cfg);
        // One AR step reads the transformer weights (~0.68 GB fp32); a head call ~90 MB.
        let step_gb = c.ar_step.weight_params * 4.0 / 1e9;
        assert!((0.6..0.75).contains(&step_gb), "{step_gb}");
        let head_mb = c.head.weight_params * 4.0 / 1e6;
        assert!((80.0..100.0).contains(&head_mb), "{head_mb}");
        // Matmul FLOPs per row ≈ 2 × parameters used.
        assert!((c.ar_step.flops_per_row / (2.0 * c.ar_step.weight_params) - 1.0).abs() < 0.05);
        assert!((c.head.flops_per_row / (2.0 * c.head.weight_params) - 1.0).abs() < 0.05);
    }
}
