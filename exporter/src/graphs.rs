//! The four deployment graphs, built from the official weight names.
//!
//! Each module of the official model is a builder scope (`b.pp("layers.3")`, then `attention`, `wqkv`):
//! weights are read by their official keys relative to it and nodes are named after it.
//!
//! Precision: with fp16 activations the statistics of every norm (RMSNorm, LayerNorm, GroupNorm), the
//! attention softmax (with its mask) and the sinusoidal time embedding are computed in fp32 and cast back;
//! everything else — weights, matmuls, convolutions and the KV cache — is fp16. Graph inputs and outputs are
//! fp32 except the KV cache, which is in the activation dtype.

use spherear_core::config::{group_norm_groups, head_hidden, ModelConfig, OUT_NORM_GROUPS};
use spherear_core::keys::TIME_FREQ_DIM;
use spherear_core::rope::{rope_2d, RopeTable};
use spherear_core::schedule::{timestep_frequencies, TIME_FACTOR};

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::onnx::{af, ai, ais, Builder, DType, Dim, Layout, Value, BATCH};

/// [`spherear_core::config::NORM_EPS`] as the f32 the graphs' norms take.
const NORM_EPS: f32 = spherear_core::config::NORM_EPS as f32;
/// Added to masked attention scores (fp32).
const MASKED: f32 = -1e9;

type B<'a, 'w, 'c> = &'a mut Builder<'w, 'c>;

/// fp32 view of `x` (no node when it is fp32).
fn up(b: B, x: &Value) -> Result<Value> {
    if x.dtype == DType::Float32 {
        Ok(x.clone())
    } else {
        b.cast(x, DType::Float32)
    }
}
/// `x` (an fp32 island or graph input) in the activation dtype (no node when that is fp32).
fn down(b: B, x: &Value) -> Result<Value> {
    let act = b.act();
    if x.dtype == act {
        Ok(x.clone())
    } else {
        b.cast(x, act)
    }
}
fn silu(b: B, x: &Value) -> Result<Value> {
    let s = b.op("Sigmoid", &[x], vec![])?;
    b.mul(x, &s)
}
/// Scalar constant in the activation dtype (memoised).
fn scalar(b: B, v: f32) -> Value {
    b.memo(&format!("scalar {v}"), |b| b.c_act(&[], &[v]))
}

/// x @ Wᵀ (+ bias) for the official `[out, in]` weight `name.weight` (and `name.bias`).
fn linear(b: B, x: &Value, name: &str, bias: bool) -> Result<Value> {
    let mut b = b.pp(name);
    let w = b.get("weight", Layout::Transposed)?;
    let y = b.matmul(x, &w)?;
    if !bias {
        return Ok(y);
    }
    let bb = b.get("bias", Layout::AsIs)?;
    b.add(&y, &bb)
}

/// RMSNorm `name` over the last axis (statistics in fp32): x · 1/√(mean(x²) + 1e-6) · `name.weight`.
fn rms_norm(b: B, x: &Value, name: &str) -> Result<Value> {
    let mut b = b.pp(name);
    let x32 = up(&mut b, x)?;
    let sq = b.mul(&x32, &x32)?;
    let axes = b.memo("axes -1", |b| b.c_i64(&[1], &[-1]));
    let ms = b.op("ReduceMean", &[&sq, &axes], vec![ai("keepdims", 1)])?;
    let eps = b.memo("eps32", |b| b.c_f32(&[], &[NORM_EPS]));
    let ms = b.add(&ms, &eps)?;
    let r = b.op("Sqrt", &[&ms], vec![])?;
    let y = b.div(&x32, &r)?;
    let y = down(&mut b, &y)?;
    let w = b.get("weight", Layout::AsIs)?;
    b.mul(&y, &w)
}

fn ln_attrs() -> Vec<onnx_protobuf::AttributeProto> {
    vec![ai("axis", -1), af("epsilon", NORM_EPS)]
}

/// LayerNorm over the last axis of width `c` (eps 1e-6, statistics in fp32), affine with `p.weight`,
/// `p.bias` when `affine` is `Some(p)`.
fn layer_norm(b: B, x: &Value, c: usize, affine: Option<&str>) -> Result<Value> {
    let Some(p) = affine else { return layer_norm_fp32(b, x, c) };
    let mut b = b.pp(p);
    if b.act() == DType::Float32 {
        let w = b.get("weight", Layout::AsIs)?;
        let bb = b.get("bias", Layout::AsIs)?;
        return b.op("LayerNormalization", &[x, &w, &bb], ln_attrs());
    }
    let y = layer_norm_fp32(&mut b, x, c)?;
    let w = b.get("weight", Layout::AsIs)?;
    let bb = b.get("bias", Layout::AsIs)?;
    let y = b.mul(&y, &w)?;
    b.add(&y, &bb)
}

/// LayerNorm without affine computed in fp32, in the activation dtype.
fn layer_norm_fp32(b: B, x: &Value, c: usize) -> Result<Value> {
    let x32 = up(b, x)?;
    let ones = b.memo(&format!("ones32 {c}"), |b| b.c_f32(&[c], &vec![1.0; c]));
    let zeros = b.memo(&format!("zeros32 {c}"), |b| b.c_f32(&[c], &vec![0.0; c]));
    let y = b.op("LayerNormalization", &[&x32, &ones, &zeros], ln_attrs())?;
    down(b, &y)
}

/// GroupNorm `p` of NCHW `x` with `groups` groups (eps 1e-6, statistics in fp32) and affine `p.weight`,
/// `p.bias`: InstanceNormalization over the [N, groups, C/groups·H·W] view.
fn group_norm(b: B, x: &Value, p: &str, groups: usize) -> Result<Value> {
    let mut b = b.pp(p);
    let shape = b.op("Shape", &[x], vec![])?;
    let x32 = up(&mut b, x)?;
    let g = b.reshape(&x32, &[0, groups as i64, -1])?;
    let ones = b.memo(&format!("ones32 {groups}"), |b| b.c_f32(&[groups], &vec![1.0; groups]));
    let zeros = b.memo(&format!("zeros32 {groups}"), |b| b.c_f32(&[groups], &vec![0.0; groups]));
    let n = b.op("InstanceNormalization", &[&g, &ones, &zeros], vec![af("epsilon", NORM_EPS)])?;
    // Back to x's shape, so x's rank.
    let n = Value { rank: x.rank, ..b.op("Reshape", &[&n, &shape], vec![])? };
    let n = down(&mut b, &n)?;
    let w = b.get("weight", Layout::Channel)?;
    let bb = b.get("bias", Layout::Channel)?;
    let y = b.mul(&n, &w)?;
    b.add(&y, &bb)
}

/// Convolution `name` (kernel `name.weight`, no bias), square stride and padding.
fn conv(b: B, x: &Value, name: &str, stride: i64, pad: i64) -> Result<Value> {
    let mut b = b.pp(name);
    let w = b.get("weight", Layout::AsIs)?;
    b.op("Conv", &[x, &w], vec![ais("strides", &[stride, stride]), ais("pads", &[pad, pad, pad, pad])])
}
/// Transposed convolution `name` (kernel `name.weight`, no bias).
fn conv_t(b: B, x: &Value, name: &str, stride: i64, pad: i64) -> Result<Value> {
    let mut b = b.pp(name);
    let w = b.get("weight", Layout::AsIs)?;
    b.op("ConvTranspose", &[x, &w], vec![ais("strides", &[stride, stride]), ais("pads", &[pad, pad, pad, pad])])
}

/// RoPE cos/sin tables `[positions, hd]` from a core-layout table `[positions, hd/2, 2]`, each value
/// repeated for both members of its pair.
fn rope_expanded(t: &RopeTable) -> (Vec<f32>, Vec<f32>) {
    let cos = t.data.chunks_exact(2).flat_map(|cs| [cs[0], cs[0]]).collect();
    let sin = t.data.chunks_exact(2).flat_map(|cs| [cs[1], cs[1]]).collect();
    (cos, sin)
}

/// Rotates the interleaved pairs of the last axis (width `hd`) of `x`: x·cos + (x @ P)·sin, where the
/// ±1 permutation P maps pair (a, b) to (−b, a). `cos`/`sin` broadcast against `x`.
fn rope(b: B, x: &Value, cos: &Value, sin: &Value, hd: usize) -> Result<Value> {
    let p = b.memo(&format!("rope perm {hd}"), |b| {
        let mut m = vec![0f32; hd * hd];
        for i in 0..hd / 2 {
            m[(2 * i + 1) * hd + 2 * i] = -1.0;
            m[2 * i * hd + 2 * i + 1] = 1.0;
        }
        b.c_act(&[hd, hd], &m)
    });
    let r = b.matmul(x, &p)?;
    let a = b.mul(x, cos)?;
    let c = b.mul(&r, sin)?;
    b.add(&a, &c)
}

/// Softmax in fp32 along `axis` of `scores`, after adding an optional fp32 `mask`.
fn softmax(b: B, scores: &Value, mask: Option<&Value>, axis: i64) -> Result<Value> {
    let s = up(b, scores)?;
    let s = match mask {
        Some(m) => b.add(&s, m)?,
        None => s,
    };
    let p = b.op("Softmax", &[&s], vec![ai("axis", axis)])?;
    down(b, &p)
}

/// The SwiGLU feed-forward half of a block: h + w2(silu(a)·b), (a, b) = w1(ffn_norm(h)).
fn ffn(b: B, h: &Value, hidden: usize) -> Result<Value> {
    let n = rms_norm(b, h, "ffn_norm")?;
    let f = {
        let mut b = b.pp("feed_forward");
        let ab = linear(&mut b, &n, "w1", false)?;
        let ab = b.split(&ab, &[hidden, hidden])?;
        let a = silu(&mut b, &ab[0])?;
        let m = b.mul(&a, &ab[1])?;
        linear(&mut b, &m, "w2", false)?
    };
    b.add(h, &f)
}

/// Shapes of one transformer stack.
#[derive(Clone, Copy)]
struct Attn {
    dim: usize,
    heads: usize,
    hd: usize,
    hidden: usize,
}

impl Attn {
    fn new(dim: usize, heads: usize) -> Self {
        Attn { dim, heads, hd: dim / heads, hidden: spherear_core::config::ffn_hidden(dim) }
    }
    fn scale(&self) -> f32 {
        1.0 / (self.hd as f32).sqrt()
    }
}

/// A whole sequence of length `len` with its RoPE tables `cos`/`sin` [len, hd] and an optional fp32
/// attention mask [len, len] (causal) or none (bidirectional).
struct Seq<'s> {
    len: usize,
    cos: &'s Value,
    sin: &'s Value,
    mask: Option<&'s Value>,
}

/// A pre-norm block (the current scope, e.g. `layers.3`) over `x` [B, S, dim]. Returns the block output
/// and the rotated keys and values [B, H, S, hd].
fn block_seq(b: B, x: &Value, a: Attn, seq: &Seq) -> Result<[Value; 3]> {
    let Seq { len: s, cos, sin, mask } = *seq;
    let (h, hd, dim) = (a.heads as i64, a.hd as i64, a.dim as i64);
    let n = rms_norm(b, x, "attention_norm")?;
    let (o, k, v) = {
        let mut b = b.pp("attention");
        let qkv = linear(&mut b, &n, "wqkv", false)?;
        let parts = b.split(&qkv, &[a.dim; 3])?;
        let mut heads = Vec::with_capacity(3);
        for part in &parts {
            let r = b.reshape(part, &[0, s as i64, h, hd])?;
            heads.push(b.transpose(&r, &[0, 2, 1, 3])?);
        }
        let q = rope(&mut b, &heads[0], cos, sin, a.hd)?;
        let sc = scalar(&mut b, a.scale());
        let q = b.mul(&q, &sc)?;
        let k = rope(&mut b, &heads[1], cos, sin, a.hd)?;
        let kt = b.transpose(&k, &[0, 1, 3, 2])?;
        let scores = b.matmul(&q, &kt)?;
        let pr = softmax(&mut b, &scores, mask, -1)?;
        let o = b.matmul(&pr, &heads[2])?;
        let o = b.transpose(&o, &[0, 2, 1, 3])?;
        let o = b.reshape(&o, &[0, s as i64, dim])?;
        let o = linear(&mut b, &o, "wo", false)?;
        (o, k, heads.swap_remove(2))
    };
    let hres = b.add(x, &o)?;
    let out = ffn(b, &hres, a.hidden)?;
    Ok([out, k, v])
}

/// The AR model's RoPE table, cached positions T = cls + L − 1.
fn ar_rope(cfg: &ModelConfig) -> Result<RopeTable> {
    Ok(rope_2d(cfg.grid(), cfg.ar.head_dim_attn(), cfg.cls_token_num)?.truncated(cfg.ar_seq_len()))
}

fn kv_names(i: usize) -> [String; 4] {
    [
        format!("past_key_values.{i}.key"),
        format!("past_key_values.{i}.value"),
        format!("present.{i}.key"),
        format!("present.{i}.value"),
    ]
}

fn kv_shape(cfg: &ModelConfig) -> Vec<Dim> {
    let a = Attn::new(cfg.ar.dim, cfg.ar.n_head);
    vec![BATCH, Dim::N(a.heads), Dim::N(cfg.ar_seq_len()), Dim::N(a.hd)]
}

/// norm(h) + pos_for_diff[row] as the fp32 `condition` output.
fn condition_out(b: B, h: &Value, row: &Value, dim: usize, meaning: &str) -> Result<()> {
    let n = rms_norm(b, h, "norm")?;
    let pfd = b.w("pos_for_diff", Layout::AsIs)?;
    let r = b.op("Gather", &[&pfd, row], vec![ai("axis", 0)])?;
    let c = b.add(&n, &r)?;
    let c = up(b, &c)?;
    b.output(&c, "condition", DType::Float32, vec![BATCH, Dim::N(dim)], meaning)
}

/// `ar_prefill`: class ids [B] → condition of image token 0 and the KV cache with the class positions
/// filled (rest zero).
pub fn ar_prefill(b: B, cfg: &ModelConfig) -> Result<()> {
    let (cls, t_len) = (cfg.cls_token_num, cfg.ar_seq_len());
    let a = Attn::new(cfg.ar.dim, cfg.ar.n_head);
    let ids = b.input(
        "class_ids",
        DType::Int64,
        vec![BATCH],
        "class id per row, 0..num_classes-1, or null_class_id for the unconditional half of a CFG batch",
    )?;
    let emb = b.w("cls_embedding", Layout::AsIs)?;
    let e = b.op("Gather", &[&emb, &ids], vec![ai("axis", 0)])?;
    let e = b.reshape(&e, &[0, cls as i64, a.dim as i64])?;
    let mut x = rms_norm(b, &e, "emb_norm")?;
    let table = rope_2d(cfg.grid(), a.hd, cls)?.truncated(cls);
    let (cv, sv) = rope_expanded(&table);
    let cos = b.c_act(&[cls, a.hd], &cv);
    let sin = b.c_act(&[cls, a.hd], &sv);
    let mask: Vec<f32> = (0..cls * cls).map(|i| if i % cls > i / cls { MASKED } else { 0.0 }).collect();
    let mask = b.c_f32(&[cls, cls], &mask);
    let seq = Seq { len: cls, cos: &cos, sin: &sin, mask: Some(&mask) };
    let pads = b.c_i64(&[8], &[0, 0, 0, 0, 0, 0, (t_len - cls) as i64, 0]);
    for i in 0..cfg.ar.n_layer {
        let mut b = b.pp(format!("layers.{i}"));
        let [out, k, v] = block_seq(&mut b, &x, a, &seq)?;
        let [_, _, pk, pv] = kv_names(i);
        for (val, name, what) in [(&k, &pk, "keys (RoPE applied)"), (&v, &pv, "values")] {
            let kv = b.op_to("Pad", &[val, &pads], vec![], name)?;
            let meaning = format!(
                "layer {i} {what} [batch, heads, seq, head_dim]: positions 0..{cls} (class tokens) filled, the rest \
                 zero; bind as past_key_values.{i}.* of ar_step"
            );
            let act = b.act();
            b.output(&kv, name, act, kv_shape(cfg), &meaning)?;
        }
        x = out;
    }
    let last = b.c_i64(&[], &[cls as i64 - 1]);
    let h = b.op("Gather", &[&x, &last], vec![ai("axis", 1)])?;
    let zero = b.c_i64(&[], &[0]);
    condition_out(b, &h, &zero, a.dim, "head condition for image token 0: norm(h[cls-1]) + pos_for_diff[0]")
}

pub use spherear_core::manifest::Attention;

/// `ar_step`: one token per row at that row's sequence position `position[row]` with the preallocated KV
/// cache → condition for each row's next token. Rows may be at different positions (continuous
/// batching); each row's new key/value is written into the cache at its position, in place when
/// `present.*` is bound to the same buffers as `past_key_values.*`.
pub fn ar_step(b: B, cfg: &ModelConfig, attention: Attention) -> Result<()> {
    let (cls, t_len, d) = (cfg.cls_token_num, cfg.ar_seq_len(), cfg.latent_dim);
    let a = Attn::new(cfg.ar.dim, cfg.ar.n_head);
    let tok = b.input(
        "token",
        DType::Float32,
        vec![BATCH, Dim::N(d)],
        "image token i-1 of each row (on the radius-R sphere unless the posterior is gaussian); under CFG the same \
         token for both halves",
    )?;
    let pos = b.input(
        "position",
        DType::Int64,
        vec![BATCH],
        "sequence position each row writes: cls_token_num + i - 1 for its image token i-1, i in 1..num_tokens-1 \
         (rows may differ)",
    )?;
    let act = b.act();
    let mut past = Vec::new();
    for i in 0..cfg.ar.n_layer {
        let [pk, pv, _, _] = kv_names(i);
        let m = |w: &str| format!("layer {i} {w} cache [batch, heads, seq, head_dim], row r valid up to position[r]-1");
        past.push([b.input(&pk, act, kv_shape(cfg), &m("key"))?, b.input(&pv, act, kv_shape(cfg), &m("value"))?]);
    }
    let x = down(b, &tok)?;
    let x = linear(b, &x, "proj_in", true)?;
    let mut x = rms_norm(b, &x, "emb_norm")?;
    let table = ar_rope(cfg)?;
    let core = match attention {
        Attention::Gqa => StepAttention::gqa(b, &table, &pos, t_len, a.hd)?,
        Attention::Standard => StepAttention::standard(b, &table, &pos, &x, t_len, &a)?,
    };
    for (i, [pk, pv]) in past.iter().enumerate() {
        let mut b = b.pp(format!("layers.{i}"));
        let n = rms_norm(&mut b, &x, "attention_norm")?;
        let o = {
            let mut b = b.pp("attention");
            let qkv = linear(&mut b, &n, "wqkv", false)?;
            let parts = b.split(&qkv, &[a.dim; 3])?;
            let o = core.attend(&mut b, cfg, i, &a, &parts, pk, pv)?;
            linear(&mut b, &o, "wo", false)?
        };
        let hres = b.add(&x, &o)?;
        x = ffn(&mut b, &hres, a.hidden)?;
    }
    let off = b.c_i64(&[1], &[cls as i64 - 1]);
    let row = b.sub(&pos, &off)?;
    condition_out(
        b,
        &x,
        &row,
        a.dim,
        "head condition for each row's image token i = position - cls_token_num + 1: norm(h) + pos_for_diff[i]",
    )
}

/// The attention of one `ar_step` row over its cache, per [`Attention`] variant: the per-step constants
/// (built once, before the layers) and, per layer, q/k/v [B, dim] each → attention output [B, dim] (before
/// `wo`), writing `present.{i}.key/value`.
enum StepAttention {
    /// `com.microsoft.GroupQueryAttention`: RoPE caches [T, hd/2], cache lengths and the total length.
    Gqa { cos: Value, sin: Value, seqlens: Value, total: Value },
    /// Standard ops: each row's RoPE row [B, 1, hd], the mask [B, 1, T, 1], ScatterND indices, the scale.
    Standard { cos: Value, sin: Value, mask: Value, idx: Value, scale: Value },
}

impl StepAttention {
    fn gqa(b: B, table: &RopeTable, pos: &Value, t_len: usize, hd: usize) -> Result<Self> {
        // RoPE caches [T, hd/2]: angle j of position p rotates the interleaved pair (2j, 2j+1).
        let cos: Vec<f32> = table.data.chunks_exact(2).map(|cs| cs[0]).collect();
        let sin: Vec<f32> = table.data.chunks_exact(2).map(|cs| cs[1]).collect();
        let cos = b.c_act(&[t_len, hd / 2], &cos);
        let sin = b.c_act(&[t_len, hd / 2], &sin);
        // seqlens_k = tokens already in each row's cache = its position; total = longest row + 1.
        let seqlens = b.cast(pos, DType::Int32)?;
        let zero = b.c_i64(&[1], &[0]);
        let longest = b.op("ReduceMax", &[pos, &zero], vec![ai("keepdims", 0)])?;
        let one = b.c_i64(&[], &[1]);
        let total = b.add(&longest, &one)?;
        let total = b.cast(&total, DType::Int32)?;
        Ok(StepAttention::Gqa { cos, sin, seqlens, total })
    }

    /// `x` is the step's hidden state [B, dim] (for the batch size).
    fn standard(b: B, table: &RopeTable, pos: &Value, x: &Value, t_len: usize, a: &Attn) -> Result<Self> {
        let (h, hd) = (a.heads as i64, a.hd as i64);
        let (cv, sv) = rope_expanded(table);
        let cos_t = b.c_act(&[t_len, a.hd], &cv);
        let sin_t = b.c_act(&[t_len, a.hd], &sv);
        let cos = b.op("Gather", &[&cos_t, pos], vec![ai("axis", 0)])?;
        let sin = b.op("Gather", &[&sin_t, pos], vec![ai("axis", 0)])?;
        let cos = b.reshape(&cos, &[-1, 1, hd])?;
        let sin = b.reshape(&sin, &[-1, 1, hd])?;
        let ar: Vec<i64> = (0..t_len as i64).collect();
        let ar = b.c_i64(&[t_len], &ar);
        let pos_col = b.reshape(pos, &[-1, 1])?;
        let later = b.op("Greater", &[&ar, &pos_col], vec![])?;
        let neg = b.c_f32(&[], &[MASKED]);
        let zero = b.c_f32(&[], &[0.0]);
        let mask = b.op("Where", &[&later, &neg, &zero], vec![])?;
        let mask = b.reshape(&mask, &[-1, 1, t_len as i64, 1])?;
        // ScatterND indices [B, H, 1, 3] = (row, head, position[row]): each update is one contiguous
        // head_dim vector. ONNX Runtime's ScatterND skips its input-to-output copy when both are the same
        // buffer, so with in-place binding a step writes only the new positions (ScatterElements copies
        // the whole cache every call: measured 12.6 ms of a 72 ms SphereAR-B step at batch 1).
        let bsz = b.op("Shape", &[x], vec![ai("start", 0), ai("end", 1)])?;
        let rest = b.c_i64(&[3], &[h, 1, 1]);
        let idx_shape = b.op("Concat", &[&bsz, &rest], vec![ai("axis", 0)])?;
        let zero_i = b.c_i64(&[], &[0]);
        let one_i = b.c_i64(&[], &[1]);
        let bsz_s = b.reshape(&bsz, &[])?;
        let rows = b.op("Range", &[&zero_i, &bsz_s, &one_i], vec![])?;
        let rows = b.reshape(&rows, &[-1, 1, 1, 1])?;
        let heads: Vec<i64> = (0..h).collect();
        let heads = b.c_i64(&[1, h as usize, 1, 1], &heads);
        let p4 = b.reshape(pos, &[-1, 1, 1, 1])?;
        let parts =
            [rows, heads, p4].iter().map(|t| b.op("Expand", &[t, &idx_shape], vec![])).collect::<Result<Vec<_>>>()?;
        let idx = b.op("Concat", &[&parts[0], &parts[1], &parts[2]], vec![ai("axis", 3)])?;
        let scale = scalar(b, a.scale());
        Ok(StepAttention::Standard { cos, sin, mask, idx, scale })
    }

    /// Layer `i`'s attention (the current scope is `layers.{i}.attention`): `qkv` = [q, k, v], each [B, dim].
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        b: B,
        cfg: &ModelConfig,
        i: usize,
        a: &Attn,
        qkv: &[Value],
        pk: &Value,
        pv: &Value,
    ) -> Result<Value> {
        let (h, hd, dim) = (a.heads as i64, a.hd as i64, a.dim as i64);
        let [_, _, nk, nv] = kv_names(i);
        let act = b.act();
        match self {
            StepAttention::Gqa { cos, sin, seqlens, total } => {
                let qkv = qkv.iter().map(|t| b.reshape(t, &[0, 1, dim])).collect::<Result<Vec<_>>>()?;
                // A contrib op: its operands are checked and its outputs stated here.
                let ins = [&qkv[0], &qkv[1], &qkv[2], pk, pv, seqlens, total, cos, sin];
                for (v, want) in ins.iter().zip([act, act, act, act, act, DType::Int32, DType::Int32, act, act]) {
                    v.expect(want, "GroupQueryAttention")?;
                }
                let out = b.fresh_value("gqa", act, Some(3));
                let (nk, nv) = (Value::new(nk, act, Some(4)), Value::new(nv, act, Some(4)));
                b.op_ms(
                    "GroupQueryAttention",
                    &ins,
                    vec![
                        ai("num_heads", h),
                        ai("kv_num_heads", h),
                        ai("do_rotary", 1),
                        ai("rotary_interleaved", 1),
                        af("scale", a.scale()),
                    ],
                    &[&out, &nk, &nv],
                );
                kv_outputs(b, cfg, i, &nk, &nv)?;
                b.reshape(&out, &[0, dim])
            }
            StepAttention::Standard { cos, sin, mask, idx, scale } => {
                let q = b.reshape(&qkv[0], &[0, h, hd])?;
                let q = rope(b, &q, cos, sin, a.hd)?;
                let q = b.mul(&q, scale)?;
                let q = b.reshape(&q, &[0, h, hd, 1])?;
                let k = b.reshape(&qkv[1], &[0, h, hd])?;
                let k = rope(b, &k, cos, sin, a.hd)?;
                let k = b.reshape(&k, &[0, h, 1, hd])?;
                let v = b.reshape(&qkv[2], &[0, h, 1, hd])?;
                let kc = b.op_to("ScatterND", &[pk, idx, &k], vec![], &nk)?;
                let vc = b.op_to("ScatterND", &[pv, idx, &v], vec![], &nv)?;
                kv_outputs(b, cfg, i, &kc, &vc)?;
                // Scores as a column [B, H, T, 1] = K · q: the cache is read in place, never transposed.
                let s = b.matmul(&kc, &q)?;
                let pr = softmax(b, &s, Some(mask), 2)?;
                let pr = b.reshape(&pr, &[0, h, 1, cfg.ar_seq_len() as i64])?;
                let o = b.matmul(&pr, &vc)?;
                b.reshape(&o, &[0, dim])
            }
        }
    }
}

/// Declares `present.{i}.key/value` (`k`, `v`, already produced under those names) as outputs.
fn kv_outputs(b: B, cfg: &ModelConfig, i: usize, k: &Value, v: &Value) -> Result<()> {
    let act = b.act();
    for (value, w) in [(k, "key"), (v, "value")] {
        let meaning = format!(
            "layer {i} {w} cache with each row's `position` written; the rest is past_key_values.{i}.{w} unchanged \
             (bind to the same buffer for an in-place update)"
        );
        b.output(value, &format!("present.{i}.{w}"), act, kv_shape(cfg), &meaning)?;
    }
    Ok(())
}

/// `head_step`: (x_t, t, condition) → velocity of the diffusion head.
pub fn head_step(b: B, cfg: &ModelConfig) -> Result<()> {
    let (d, c, dim) = (cfg.latent_dim, cfg.ar.head_dim, cfg.ar.dim);
    let n_blocks = cfg.ar.head_blocks;
    let per = n_blocks / cfg.ar.head_adaln_blocks.max(1);
    let hh = head_hidden(c);
    let xt = b.input("x_t", DType::Float32, vec![BATCH, Dim::N(d)], "noisy token x_t")?;
    let t = b.input("t", DType::Float32, vec![BATCH], "time in [0, 1] per row (0 = noise, 1 = data)")?;
    let cond = b.input("condition", DType::Float32, vec![BATCH, Dim::N(dim)], "condition from ar_prefill/ar_step")?;
    let mut b = b.pp("head.net");

    // Sinusoidal time embedding in fp32: [cos(1000·t·f), sin(1000·t·f)].
    let tf = b.c_f32(&[], &[TIME_FACTOR]);
    let tt = b.mul(&t, &tf)?;
    let tt = b.unsqueeze(&tt, &[1])?;
    let freqs = timestep_frequencies(TIME_FREQ_DIM);
    let fr = b.c_f32(&[1, freqs.len()], &freqs);
    let args = b.mul(&tt, &fr)?;
    let cs = b.op("Cos", &[&args], vec![])?;
    let sn = b.op("Sin", &[&args], vec![])?;
    let emb = b.op("Concat", &[&cs, &sn], vec![ai("axis", -1)])?;
    let emb = down(&mut b, &emb)?;
    let te = linear(&mut b, &emb, "time_embed.mlp.0", true)?;
    let te = silu(&mut b, &te)?;
    let te = linear(&mut b, &te, "time_embed.mlp.2", true)?;
    let ce = down(&mut b, &cond)?;
    let ce = linear(&mut b, &ce, "cond_embed", true)?;
    let y = b.add(&te, &ce)?;
    let y = silu(&mut b, &y)?;
    let one = scalar(&mut b, 1.0);

    let x = down(&mut b, &xt)?;
    let mut x = linear(&mut b, &x, "input_proj", true)?;
    // adaLN block m = i / per serves res blocks m·per .. (m+1)·per − 1: (scale + 1, shift, gate).
    let mut ada = Vec::new();
    for i in 0..n_blocks {
        if i % per == 0 {
            let mods = linear(&mut b, &y, &format!("ada_ln_blocks.{}", i / per), true)?;
            ada = b.split(&mods, &[c; 3])?;
            ada[0] = b.add(&ada[0], &one)?;
        }
        let mut b = b.pp(format!("res_blocks.{i}"));
        let n = layer_norm(&mut b, &x, c, Some("norm"))?;
        let n = b.mul(&n, &ada[0])?;
        let n = b.add(&n, &ada[1])?;
        let ab = linear(&mut b, &n, "w1", true)?;
        let ab = b.split(&ab, &[hh, hh])?;
        let sa = silu(&mut b, &ab[0])?;
        let mm = b.mul(&sa, &ab[1])?;
        let o = linear(&mut b, &mm, "w2", true)?;
        let o = b.mul(&o, &ada[2])?;
        x = b.add(&x, &o)?;
    }
    let mut b = b.pp("final_layer");
    let mods = linear(&mut b, &y, "ada_ln_modulation", true)?;
    let parts = b.split(&mods, &[c; 2])?;
    let scale = b.add(&parts[0], &one)?;
    let n = layer_norm(&mut b, &x, c, None)?;
    let n = b.mul(&n, &scale)?;
    let n = b.add(&n, &parts[1])?;
    let out = linear(&mut b, &n, "linear", true)?;
    let out = up(&mut b, &out)?;
    b.output(&out, "velocity", DType::Float32, vec![BATCH, Dim::N(d)], "predicted velocity v(x_t, t | condition)")
}

/// `decoder`: tokens [B, L, d] → image [B, 3, H, W] clipped to [−1, 1].
pub fn decoder(b: B, ckpt: &Checkpoint) -> Result<()> {
    let cfg = &ckpt.config;
    let v = &cfg.vae;
    let (g, l, z, r) = (cfg.grid() as i64, cfg.num_tokens(), v.z_channels, v.register_tokens);
    let a = Attn::new(z, v.n_head);
    let tokens = b.input(
        "tokens",
        DType::Float32,
        vec![BATCH, Dim::N(l), Dim::N(cfg.latent_dim)],
        "image tokens in raster order, on the radius-R sphere unless the posterior is gaussian",
    )?;
    let mut b = b.pp("vae");
    let x = down(&mut b, &tokens)?;
    let x = linear(&mut b, &x, "post_quant_proj", false)?;
    let mut b = b.pp("decoder");
    let x = b.reshape(&x, &[0, g, g, z as i64])?;
    let x = b.transpose(&x, &[0, 3, 1, 2])?;
    let x = conv(&mut b, &x, "conv_in.1", 1, 1)?;
    let x = b.transpose(&x, &[0, 2, 3, 1])?;
    let x = b.reshape(&x, &[0, l as i64, z as i64])?;
    let reg = b.w("register_token", Layout::AsIs)?;
    let reg = b.unsqueeze(&reg, &[0])?;
    let bsz = b.op("Shape", &[&x], vec![ai("start", 0), ai("end", 1)])?;
    let rest = b.c_i64(&[2], &[r as i64, z as i64]);
    let rs = b.op("Concat", &[&bsz, &rest], vec![ai("axis", 0)])?;
    // Expanded to [B, registers, z]: the same rank.
    let reg = Value { rank: reg.rank, ..b.op("Expand", &[&reg, &rs], vec![])? };
    let mut x = b.op("Concat", &[&reg, &x], vec![ai("axis", 1)])?;
    let table = ckpt.tensor("vae.decoder.freqs_cis")?;
    let s = r + l;
    let (cv, sv) = rope_expanded(&RopeTable { positions: s, pairs: a.hd / 2, data: table.data.clone() });
    let cos = b.c_act(&[s, a.hd], &cv);
    let sin = b.c_act(&[s, a.hd], &sv);
    let seq = Seq { len: s, cos: &cos, sin: &sin, mask: None };
    for i in 0..v.decoder_layers {
        let [out, _, _] = block_seq(&mut b.pp(format!("layers.{i}")), &x, a, &seq)?;
        x = out;
    }
    let st = b.c_i64(&[1], &[r as i64]);
    let en = b.c_i64(&[1], &[s as i64]);
    let ax1 = b.c_i64(&[1], &[1]);
    let x = b.op("Slice", &[&x, &st, &en, &ax1], vec![])?;
    let x = b.reshape(&x, &[0, g, g, z as i64])?;
    let mut x = b.transpose(&x, &[0, 3, 1, 2])?;
    let chs: Vec<usize> = v.cnn_chs.iter().rev().copied().collect();
    for (i, w) in chs.windows(2).enumerate() {
        let (ci, co) = (w[0], w[1]);
        let mut b = b.pp(format!("unpatchify.1.net.{i}"));
        let hdn = group_norm(&mut b, &x, "block.0", group_norm_groups(ci))?;
        let hdn = silu(&mut b, &hdn)?;
        let hdn = conv_t(&mut b, &hdn, "block.2", 2, 1)?;
        let hdn = group_norm(&mut b, &hdn, "block.3", group_norm_groups(co))?;
        let hdn = silu(&mut b, &hdn)?;
        let hdn = conv(&mut b, &hdn, "block.5", 1, 1)?;
        let sc = conv_t(&mut b, &x, "shortcut", 2, 0)?;
        let y = b.add(&sc, &hdn)?;
        let h2 = group_norm(&mut b, &y, "block2.0", group_norm_groups(co))?;
        let h2 = silu(&mut b, &h2)?;
        let h2 = conv(&mut b, &h2, "block2.2", 1, 1)?;
        let h2 = group_norm(&mut b, &h2, "block2.3", group_norm_groups(co))?;
        let h2 = silu(&mut b, &h2)?;
        let h2 = conv(&mut b, &h2, "block2.5", 1, 1)?;
        x = b.add(&y, &h2)?;
    }
    let x = group_norm(&mut b, &x, "conv_out.0", OUT_NORM_GROUPS)?;
    let x = silu(&mut b, &x)?;
    let x = conv(&mut b, &x, "conv_out.2", 1, 1)?;
    let lo = scalar(&mut b, -1.0);
    let hi = scalar(&mut b, 1.0);
    let x = b.op("Clip", &[&x, &lo, &hi], vec![])?;
    let x = up(&mut b, &x)?;
    let side = Dim::N(cfg.image_size);
    b.output(&x, "image", DType::Float32, vec![BATCH, Dim::N(3), side.clone(), side], "RGB image in [-1, 1]")
}
