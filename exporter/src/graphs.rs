//! The four deployment graphs, built from the official weight names.
//!
//! Precision: with fp16 activations the statistics of every norm (RMSNorm, LayerNorm, GroupNorm), the
//! attention softmax (with its mask) and the sinusoidal time embedding are computed in fp32 and cast back;
//! everything else — weights, matmuls, convolutions and the KV cache — is fp16. Graph inputs and outputs are
//! fp32 except the KV cache, which is in the activation dtype.

use spherear_core::config::{head_hidden, ModelConfig};
use spherear_core::keys::TIME_FREQ_DIM;
use spherear_core::rope::{rope_2d, RopeTable};
use spherear_core::schedule::{timestep_frequencies, TIME_FACTOR};

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::onnx::{af, ai, ais, Builder, DType, Dim, Layout, BATCH};

const NORM_EPS: f32 = 1e-6;
/// Added to masked attention scores (fp32).
const MASKED: f32 = -1e9;
/// `TensorProto.DataType.INT32` (GroupQueryAttention's sequence lengths).
const ONNX_INT32: i64 = 6;

type B<'a, 'w, 'c> = &'a mut Builder<'w, 'c>;

fn cast(b: B, x: &str, to: DType) -> String {
    b.op("Cast", &[x], vec![ai("to", to.onnx() as i64)])
}
/// fp32 view of an activation (no node when the graph is fp32).
fn up(b: B, x: &str) -> String {
    if b.act == DType::Float32 {
        x.to_string()
    } else {
        cast(b, x, DType::Float32)
    }
}
/// fp32 value (or fp32 graph input) in the activation dtype.
fn down(b: B, x: &str) -> String {
    if b.act == DType::Float32 {
        x.to_string()
    } else {
        let act = b.act;
        cast(b, x, act)
    }
}
fn add(b: B, x: &str, y: &str) -> String {
    b.op("Add", &[x, y], vec![])
}
fn mul(b: B, x: &str, y: &str) -> String {
    b.op("Mul", &[x, y], vec![])
}
fn silu(b: B, x: &str) -> String {
    let s = b.op("Sigmoid", &[x], vec![]);
    mul(b, x, &s)
}
fn reshape(b: B, x: &str, shape: &[i64]) -> String {
    let s = b.c_i64(&[shape.len()], shape);
    b.op("Reshape", &[x, &s], vec![])
}
fn transpose(b: B, x: &str, perm: &[i64]) -> String {
    b.op("Transpose", &[x], vec![ais("perm", perm)])
}
fn split(b: B, x: &str, sizes: &[usize]) -> Vec<String> {
    let s: Vec<i64> = sizes.iter().map(|&v| v as i64).collect();
    let sc = b.c_i64(&[s.len()], &s);
    b.op_n("Split", &[x, &sc], vec![ai("axis", -1)], sizes.len())
}
/// Scalar constant in the activation dtype (memoised).
fn scalar(b: B, v: f32) -> String {
    b.memo(&format!("scalar {v}"), |b| b.c_act(&[], &[v]))
}

/// x @ Wᵀ (+ bias) for the official `[out, in]` weight `p.weight`.
fn linear(b: B, x: &str, p: &str, bias: bool) -> Result<String> {
    let w = b.w(&format!("{p}.weight"), Layout::Transposed)?;
    let y = b.op("MatMul", &[x, &w], vec![]);
    if bias {
        let bb = b.w(&format!("{p}.bias"), Layout::AsIs)?;
        Ok(add(b, &y, &bb))
    } else {
        Ok(y)
    }
}

/// RMSNorm over the last axis (statistics in fp32): x · 1/√(mean(x²) + 1e-6) · w.
fn rms_norm(b: B, x: &str, key: &str) -> Result<String> {
    let x32 = up(b, x);
    let sq = mul(b, &x32, &x32);
    let axes = b.memo("axes -1", |b| b.c_i64(&[1], &[-1]));
    let ms = b.op("ReduceMean", &[&sq, &axes], vec![ai("keepdims", 1)]);
    let eps = b.memo("eps32", |b| b.c_f32(&[], &[NORM_EPS]));
    let ms = add(b, &ms, &eps);
    let r = b.op("Sqrt", &[&ms], vec![]);
    let y = b.op("Div", &[&x32, &r], vec![]);
    let y = down(b, &y);
    let w = b.w(key, Layout::AsIs)?;
    Ok(mul(b, &y, &w))
}

/// LayerNorm over the last axis of width `c` (eps 1e-6, statistics in fp32), affine with `p.weight`,
/// `p.bias` when `affine` is given.
fn layer_norm(b: B, x: &str, c: usize, affine: Option<&str>) -> Result<String> {
    let attrs = || vec![ai("axis", -1), af("epsilon", NORM_EPS)];
    if let (DType::Float32, Some(p)) = (b.act, affine) {
        let w = b.w(&format!("{p}.weight"), Layout::AsIs)?;
        let bb = b.w(&format!("{p}.bias"), Layout::AsIs)?;
        return Ok(b.op("LayerNormalization", &[x, &w, &bb], attrs()));
    }
    let x32 = up(b, x);
    let ones = b.memo(&format!("ones32 {c}"), |b| b.c_f32(&[c], &vec![1.0; c]));
    let zeros = b.memo(&format!("zeros32 {c}"), |b| b.c_f32(&[c], &vec![0.0; c]));
    let y = b.op("LayerNormalization", &[&x32, &ones, &zeros], attrs());
    let y = down(b, &y);
    match affine {
        None => Ok(y),
        Some(p) => {
            let w = b.w(&format!("{p}.weight"), Layout::AsIs)?;
            let bb = b.w(&format!("{p}.bias"), Layout::AsIs)?;
            let y = mul(b, &y, &w);
            Ok(add(b, &y, &bb))
        }
    }
}

/// GroupNorm of NCHW `x` with `groups` groups (eps 1e-6, statistics in fp32) and affine `p.weight`, `p.bias`:
/// InstanceNormalization over the [N, groups, C/groups·H·W] view.
fn group_norm(b: B, x: &str, p: &str, groups: usize) -> Result<String> {
    let shape = b.op("Shape", &[x], vec![]);
    let x32 = up(b, x);
    let g = reshape(b, &x32, &[0, groups as i64, -1]);
    let ones = b.memo(&format!("ones32 {groups}"), |b| b.c_f32(&[groups], &vec![1.0; groups]));
    let zeros = b.memo(&format!("zeros32 {groups}"), |b| b.c_f32(&[groups], &vec![0.0; groups]));
    let n = b.op("InstanceNormalization", &[&g, &ones, &zeros], vec![af("epsilon", NORM_EPS)]);
    let n = b.op("Reshape", &[&n, &shape], vec![]);
    let n = down(b, &n);
    let w = b.w(&format!("{p}.weight"), Layout::Channel)?;
    let bb = b.w(&format!("{p}.bias"), Layout::Channel)?;
    let y = mul(b, &n, &w);
    Ok(add(b, &y, &bb))
}

fn conv(b: B, x: &str, key: &str, stride: i64, pad: i64) -> Result<String> {
    let w = b.w(key, Layout::AsIs)?;
    Ok(b.op("Conv", &[x, &w], vec![ais("strides", &[stride, stride]), ais("pads", &[pad, pad, pad, pad])]))
}
fn conv_t(b: B, x: &str, key: &str, stride: i64, pad: i64) -> Result<String> {
    let w = b.w(key, Layout::AsIs)?;
    Ok(b.op("ConvTranspose", &[x, &w], vec![ais("strides", &[stride, stride]), ais("pads", &[pad, pad, pad, pad])]))
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
fn rope(b: B, x: &str, cos: &str, sin: &str, hd: usize) -> String {
    let p = b.memo(&format!("rope perm {hd}"), |b| {
        let mut m = vec![0f32; hd * hd];
        for i in 0..hd / 2 {
            m[(2 * i + 1) * hd + 2 * i] = -1.0;
            m[2 * i * hd + 2 * i + 1] = 1.0;
        }
        b.c_act(&[hd, hd], &m)
    });
    let r = b.op("MatMul", &[x, &p], vec![]);
    let a = mul(b, x, cos);
    let c = mul(b, &r, sin);
    add(b, &a, &c)
}

/// Softmax in fp32 along `axis` of `scores`, after adding an optional fp32 `mask`.
fn softmax(b: B, scores: &str, mask: Option<&str>, axis: i64) -> String {
    let s = up(b, scores);
    let s = match mask {
        Some(m) => add(b, &s, m),
        None => s,
    };
    let p = b.op("Softmax", &[&s], vec![ai("axis", axis)]);
    down(b, &p)
}

/// The SwiGLU feed-forward half of a block: h + w2(silu(a)·b), (a, b) = w1(ffn_norm(h)).
fn ffn(b: B, h: &str, p: &str, hidden: usize) -> Result<String> {
    let n = rms_norm(b, h, &format!("{p}.ffn_norm.weight"))?;
    let ab = linear(b, &n, &format!("{p}.feed_forward.w1"), false)?;
    let ab = split(b, &ab, &[hidden, hidden]);
    let a = silu(b, &ab[0]);
    let m = mul(b, &a, &ab[1]);
    let f = linear(b, &m, &format!("{p}.feed_forward.w2"), false)?;
    Ok(add(b, h, &f))
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
    cos: &'s str,
    sin: &'s str,
    mask: Option<&'s str>,
}

/// A pre-norm block over `x` [B, S, dim]. Returns the block output and the rotated keys and values
/// [B, H, S, hd].
fn block_seq(b: B, x: &str, p: &str, a: Attn, seq: &Seq) -> Result<[String; 3]> {
    let Seq { len: s, cos, sin, mask } = *seq;
    let (h, hd, dim) = (a.heads as i64, a.hd as i64, a.dim as i64);
    let n = rms_norm(b, x, &format!("{p}.attention_norm.weight"))?;
    let qkv = linear(b, &n, &format!("{p}.attention.wqkv"), false)?;
    let parts = split(b, &qkv, &[a.dim; 3]);
    let mut heads = Vec::with_capacity(3);
    for part in &parts {
        let r = reshape(b, part, &[0, s as i64, h, hd]);
        heads.push(transpose(b, &r, &[0, 2, 1, 3]));
    }
    let q = rope(b, &heads[0], cos, sin, a.hd);
    let sc = scalar(b, a.scale());
    let q = mul(b, &q, &sc);
    let k = rope(b, &heads[1], cos, sin, a.hd);
    let kt = transpose(b, &k, &[0, 1, 3, 2]);
    let scores = b.op("MatMul", &[&q, &kt], vec![]);
    let pr = softmax(b, &scores, mask, -1);
    let o = b.op("MatMul", &[&pr, &heads[2]], vec![]);
    let o = transpose(b, &o, &[0, 2, 1, 3]);
    let o = reshape(b, &o, &[0, s as i64, dim]);
    let o = linear(b, &o, &format!("{p}.attention.wo"), false)?;
    let hres = add(b, x, &o);
    let out = ffn(b, &hres, p, a.hidden)?;
    let v = heads.swap_remove(2);
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
fn condition_out(b: B, h: &str, row: &str, dim: usize, meaning: &str) -> Result<()> {
    let n = rms_norm(b, h, "norm.weight")?;
    let pfd = b.w("pos_for_diff.weight", Layout::AsIs)?;
    let r = b.op("Gather", &[&pfd, row], vec![ai("axis", 0)]);
    let c = add(b, &n, &r);
    let c = up(b, &c);
    b.output(&c, "condition", DType::Float32, vec![BATCH, Dim::N(dim)], meaning);
    Ok(())
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
    );
    let emb = b.w("cls_embedding.weight", Layout::AsIs)?;
    let e = b.op("Gather", &[&emb, &ids], vec![ai("axis", 0)]);
    let e = reshape(b, &e, &[0, cls as i64, a.dim as i64]);
    let mut x = rms_norm(b, &e, "emb_norm.weight")?;
    let table = rope_2d(cfg.grid(), a.hd, cls)?.truncated(cls);
    let (cv, sv) = rope_expanded(&table);
    let cos = b.c_act(&[cls, a.hd], &cv);
    let sin = b.c_act(&[cls, a.hd], &sv);
    let mask: Vec<f32> = (0..cls * cls).map(|i| if i % cls > i / cls { MASKED } else { 0.0 }).collect();
    let mask = b.c_f32(&[cls, cls], &mask);
    let seq = Seq { len: cls, cos: &cos, sin: &sin, mask: Some(&mask) };
    let pads = b.c_i64(&[8], &[0, 0, 0, 0, 0, 0, (t_len - cls) as i64, 0]);
    for i in 0..cfg.ar.n_layer {
        let [out, k, v] = block_seq(b, &x, &format!("layers.{i}"), a, &seq)?;
        let [_, _, pk, pv] = kv_names(i);
        for (val, name, what) in [(&k, &pk, "keys (RoPE applied)"), (&v, &pv, "values")] {
            b.op_to("Pad", &[val, &pads], vec![], name);
            let meaning = format!(
                "layer {i} {what} [batch, heads, seq, head_dim]: positions 0..{cls} (class tokens) filled, the rest \
                 zero; bind as past_key_values.{i}.* of ar_step"
            );
            let act = b.act;
            b.output(name, name, act, kv_shape(cfg), &meaning);
        }
        x = out;
    }
    let last = b.c_i64(&[], &[cls as i64 - 1]);
    let h = b.op("Gather", &[&x, &last], vec![ai("axis", 1)]);
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
    let (h, hd) = (a.heads as i64, a.hd as i64);
    let tok = b.input(
        "token",
        DType::Float32,
        vec![BATCH, Dim::N(d)],
        "image token i-1 of each row (on the radius-R sphere); under CFG the same token for both halves",
    );
    let pos = b.input(
        "position",
        DType::Int64,
        vec![BATCH],
        "sequence position each row writes: cls_token_num + i - 1 for its image token i-1, i in 1..num_tokens-1 \
         (rows may differ)",
    );
    let act = b.act;
    let mut past = Vec::new();
    for i in 0..cfg.ar.n_layer {
        let [pk, pv, _, _] = kv_names(i);
        let m = |w: &str| format!("layer {i} {w} cache [batch, heads, seq, head_dim], row r valid up to position[r]-1");
        past.push([b.input(&pk, act, kv_shape(cfg), &m("key")), b.input(&pv, act, kv_shape(cfg), &m("value"))]);
    }
    let x = down(b, &tok);
    let x = linear(b, &x, "proj_in", true)?;
    let mut x = rms_norm(b, &x, "emb_norm.weight")?;
    let table = ar_rope(cfg)?;

    match attention {
        Attention::Gqa => {
            // RoPE caches [T, hd/2]: angle j of position p rotates the interleaved pair (2j, 2j+1).
            let cos: Vec<f32> = table.data.chunks_exact(2).map(|cs| cs[0]).collect();
            let sin: Vec<f32> = table.data.chunks_exact(2).map(|cs| cs[1]).collect();
            let cos = b.c_act(&[t_len, a.hd / 2], &cos);
            let sin = b.c_act(&[t_len, a.hd / 2], &sin);
            // seqlens_k = tokens already in each row's cache = its position; total = longest row + 1.
            let seqlens = b.op("Cast", &[&pos], vec![ai("to", ONNX_INT32)]);
            let zero = b.c_i64(&[1], &[0]);
            let longest = b.op("ReduceMax", &[&pos, &zero], vec![ai("keepdims", 0)]);
            let one = b.c_i64(&[], &[1]);
            let total = add(b, &longest, &one);
            let total = b.op("Cast", &[&total], vec![ai("to", ONNX_INT32)]);
            for (i, [pk, pv]) in past.iter().enumerate() {
                let p = format!("layers.{i}");
                let n = rms_norm(b, &x, &format!("{p}.attention_norm.weight"))?;
                let qkv = linear(b, &n, &format!("{p}.attention.wqkv"), false)?;
                let parts = split(b, &qkv, &[a.dim; 3]);
                let qkv: Vec<String> = parts.iter().map(|t| reshape(b, t, &[0, 1, a.dim as i64])).collect();
                let [_, _, nk, nv] = kv_names(i);
                let out = b.fresh_name("gqa");
                b.op_ms(
                    "GroupQueryAttention",
                    &[&qkv[0], &qkv[1], &qkv[2], pk, pv, &seqlens, &total, &cos, &sin],
                    vec![
                        ai("num_heads", h),
                        ai("kv_num_heads", h),
                        ai("do_rotary", 1),
                        ai("rotary_interleaved", 1),
                        af("scale", a.scale()),
                    ],
                    &[&out, &nk, &nv],
                );
                kv_outputs(b, cfg, i);
                let o = reshape(b, &out, &[0, a.dim as i64]);
                let o = linear(b, &o, &format!("{p}.attention.wo"), false)?;
                let hres = add(b, &x, &o);
                x = ffn(b, &hres, &p, a.hidden)?;
            }
        }
        Attention::Standard => {
            // Per-step constants shared by all layers: each row's RoPE row, mask column, scatter indices.
            let (cv, sv) = rope_expanded(&table);
            let cos_t = b.c_act(&[t_len, a.hd], &cv);
            let sin_t = b.c_act(&[t_len, a.hd], &sv);
            let cos = b.op("Gather", &[&cos_t, &pos], vec![ai("axis", 0)]);
            let sin = b.op("Gather", &[&sin_t, &pos], vec![ai("axis", 0)]);
            let cos = reshape(b, &cos, &[-1, 1, hd]);
            let sin = reshape(b, &sin, &[-1, 1, hd]);
            let ar: Vec<i64> = (0..t_len as i64).collect();
            let ar = b.c_i64(&[t_len], &ar);
            let pos_col = reshape(b, &pos, &[-1, 1]);
            let later = b.op("Greater", &[&ar, &pos_col], vec![]);
            let neg = b.c_f32(&[], &[MASKED]);
            let zero = b.c_f32(&[], &[0.0]);
            let mask = b.op("Where", &[&later, &neg, &zero], vec![]);
            let mask = reshape(b, &mask, &[-1, 1, t_len as i64, 1]);
            // ScatterND indices [B, H, 1, 3] = (row, head, position[row]): each update is one contiguous
            // head_dim vector. ONNX Runtime's ScatterND skips its input-to-output copy when both are the same
            // buffer, so with in-place binding a step writes only the new positions (ScatterElements copies
            // the whole cache every call: measured 12.6 ms of a 72 ms SphereAR-B step at batch 1).
            let bsz = b.op("Shape", &[&x], vec![ai("start", 0), ai("end", 1)]);
            let rest = b.c_i64(&[3], &[h, 1, 1]);
            let idx_shape = b.op("Concat", &[&bsz, &rest], vec![ai("axis", 0)]);
            let zero_i = b.c_i64(&[], &[0]);
            let one_i = b.c_i64(&[], &[1]);
            let bsz_s = reshape(b, &bsz, &[]);
            let rows = b.op("Range", &[&zero_i, &bsz_s, &one_i], vec![]);
            let rows = reshape(b, &rows, &[-1, 1, 1, 1]);
            let heads: Vec<i64> = (0..h).collect();
            let heads = b.c_i64(&[1, h as usize, 1, 1], &heads);
            let p4 = reshape(b, &pos, &[-1, 1, 1, 1]);
            let parts: Vec<String> =
                [rows, heads, p4].iter().map(|t| b.op("Expand", &[t, &idx_shape], vec![])).collect();
            let idx = b.op("Concat", &[&parts[0], &parts[1], &parts[2]], vec![ai("axis", 3)]);
            let sc = scalar(b, a.scale());
            for (i, [pk, pv]) in past.iter().enumerate() {
                let p = format!("layers.{i}");
                let n = rms_norm(b, &x, &format!("{p}.attention_norm.weight"))?;
                let qkv = linear(b, &n, &format!("{p}.attention.wqkv"), false)?;
                let parts = split(b, &qkv, &[a.dim; 3]);
                let q = reshape(b, &parts[0], &[0, h, hd]);
                let q = rope(b, &q, &cos, &sin, a.hd);
                let q = mul(b, &q, &sc);
                let q = reshape(b, &q, &[0, h, hd, 1]);
                let k = reshape(b, &parts[1], &[0, h, hd]);
                let k = rope(b, &k, &cos, &sin, a.hd);
                let k = reshape(b, &k, &[0, h, 1, hd]);
                let v = reshape(b, &parts[2], &[0, h, 1, hd]);
                let [_, _, nk, nv] = kv_names(i);
                let kc = b.op_to("ScatterND", &[pk, &idx, &k], vec![], &nk);
                let vc = b.op_to("ScatterND", &[pv, &idx, &v], vec![], &nv);
                kv_outputs(b, cfg, i);
                // Scores as a column [B, H, T, 1] = K · q: the cache is read in place, never transposed.
                let s = b.op("MatMul", &[&kc, &q], vec![]);
                let pr = softmax(b, &s, Some(&mask), 2);
                let pr = reshape(b, &pr, &[0, h, 1, t_len as i64]);
                let o = b.op("MatMul", &[&pr, &vc], vec![]);
                let o = reshape(b, &o, &[0, a.dim as i64]);
                let o = linear(b, &o, &format!("{p}.attention.wo"), false)?;
                let hres = add(b, &x, &o);
                x = ffn(b, &hres, &p, a.hidden)?;
            }
        }
    }
    let off = b.c_i64(&[1], &[cls as i64 - 1]);
    let row = b.op("Sub", &[&pos, &off], vec![]);
    condition_out(
        b,
        &x,
        &row,
        a.dim,
        "head condition for each row's image token i = position - cls_token_num + 1: norm(h) + pos_for_diff[i]",
    )
}

/// Declares `present.{i}.key/value` (already produced by a node) as outputs.
fn kv_outputs(b: B, cfg: &ModelConfig, i: usize) {
    let [_, _, nk, nv] = kv_names(i);
    let act = b.act;
    for (name, w) in [(&nk, "key"), (&nv, "value")] {
        let meaning = format!(
            "layer {i} {w} cache with each row's `position` written; the rest is past_key_values.{i}.{w} unchanged \
             (bind to the same buffer for an in-place update)"
        );
        b.output(name, name, act, kv_shape(cfg), &meaning);
    }
}

/// `head_step`: (x_t, t, condition) → velocity of the diffusion head.
pub fn head_step(b: B, cfg: &ModelConfig) -> Result<()> {
    let (d, c, dim) = (cfg.latent_dim, cfg.ar.head_dim, cfg.ar.dim);
    let n_blocks = cfg.ar.head_blocks;
    let per = n_blocks / cfg.ar.head_adaln_blocks.max(1);
    let hh = head_hidden(c);
    let xt = b.input("x_t", DType::Float32, vec![BATCH, Dim::N(d)], "noisy token x_t");
    let t = b.input("t", DType::Float32, vec![BATCH], "time in [0, 1] per row (0 = noise, 1 = data)");
    let cond = b.input("condition", DType::Float32, vec![BATCH, Dim::N(dim)], "condition from ar_prefill/ar_step");
    let h = "head.net";

    // Sinusoidal time embedding in fp32: [cos(1000·t·f), sin(1000·t·f)].
    let tf = b.c_f32(&[], &[TIME_FACTOR]);
    let tt = mul(b, &t, &tf);
    let ax1 = b.c_i64(&[1], &[1]);
    let tt = b.op("Unsqueeze", &[&tt, &ax1], vec![]);
    let freqs = timestep_frequencies(TIME_FREQ_DIM);
    let fr = b.c_f32(&[1, freqs.len()], &freqs);
    let args = mul(b, &tt, &fr);
    let cs = b.op("Cos", &[&args], vec![]);
    let sn = b.op("Sin", &[&args], vec![]);
    let emb = b.op("Concat", &[&cs, &sn], vec![ai("axis", -1)]);
    let emb = down(b, &emb);
    let te = linear(b, &emb, &format!("{h}.time_embed.mlp.0"), true)?;
    let te = silu(b, &te);
    let te = linear(b, &te, &format!("{h}.time_embed.mlp.2"), true)?;
    let ce = down(b, &cond);
    let ce = linear(b, &ce, &format!("{h}.cond_embed"), true)?;
    let y = add(b, &te, &ce);
    let y = silu(b, &y);
    let one = scalar(b, 1.0);

    let x = down(b, &xt);
    let mut x = linear(b, &x, &format!("{h}.input_proj"), true)?;
    let mut ada: Option<(usize, Vec<String>)> = None;
    for i in 0..n_blocks {
        let m = i / per;
        if ada.as_ref().map(|(k, _)| *k) != Some(m) {
            let mods = linear(b, &y, &format!("{h}.ada_ln_blocks.{m}"), true)?;
            let mut parts = split(b, &mods, &[c; 3]);
            parts[0] = add(b, &parts[0], &one);
            ada = Some((m, parts));
        }
        let parts = ada.as_ref().map(|(_, p)| p.clone()).ok_or_else(|| ExportError::Graph("adaLN".into()))?;
        let p = format!("{h}.res_blocks.{i}");
        let n = layer_norm(b, &x, c, Some(&format!("{p}.norm")))?;
        let n = mul(b, &n, &parts[0]);
        let n = add(b, &n, &parts[1]);
        let ab = linear(b, &n, &format!("{p}.w1"), true)?;
        let ab = split(b, &ab, &[hh, hh]);
        let sa = silu(b, &ab[0]);
        let mm = mul(b, &sa, &ab[1]);
        let o = linear(b, &mm, &format!("{p}.w2"), true)?;
        let o = mul(b, &o, &parts[2]);
        x = add(b, &x, &o);
    }
    let mods = linear(b, &y, &format!("{h}.final_layer.ada_ln_modulation"), true)?;
    let parts = split(b, &mods, &[c; 2]);
    let scale = add(b, &parts[0], &one);
    let n = layer_norm(b, &x, c, None)?;
    let n = mul(b, &n, &scale);
    let n = add(b, &n, &parts[1]);
    let out = linear(b, &n, &format!("{h}.final_layer.linear"), true)?;
    let out = up(b, &out);
    b.output(&out, "velocity", DType::Float32, vec![BATCH, Dim::N(d)], "predicted velocity v(x_t, t | condition)");
    Ok(())
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
        "image tokens in raster order, on the radius-R sphere",
    );
    let dd = "vae.decoder";
    let x = down(b, &tokens);
    let x = linear(b, &x, "vae.post_quant_proj", false)?;
    let x = reshape(b, &x, &[0, g, g, z as i64]);
    let x = transpose(b, &x, &[0, 3, 1, 2]);
    let x = conv(b, &x, &format!("{dd}.conv_in.1.weight"), 1, 1)?;
    let x = transpose(b, &x, &[0, 2, 3, 1]);
    let x = reshape(b, &x, &[0, l as i64, z as i64]);
    let reg = b.w(&format!("{dd}.register_token.weight"), Layout::AsIs)?;
    let ax0 = b.c_i64(&[1], &[0]);
    let reg = b.op("Unsqueeze", &[&reg, &ax0], vec![]);
    let bsz = b.op("Shape", &[&x], vec![ai("start", 0), ai("end", 1)]);
    let rest = b.c_i64(&[2], &[r as i64, z as i64]);
    let rs = b.op("Concat", &[&bsz, &rest], vec![ai("axis", 0)]);
    let reg = b.op("Expand", &[&reg, &rs], vec![]);
    let mut x = b.op("Concat", &[&reg, &x], vec![ai("axis", 1)]);
    let table = ckpt.tensor(&format!("{dd}.freqs_cis"))?;
    let s = r + l;
    let (cv, sv) = rope_expanded(&RopeTable { positions: s, pairs: a.hd / 2, data: table.data.clone() });
    let cos = b.c_act(&[s, a.hd], &cv);
    let sin = b.c_act(&[s, a.hd], &sv);
    let seq = Seq { len: s, cos: &cos, sin: &sin, mask: None };
    for i in 0..v.decoder_layers {
        let [out, _, _] = block_seq(b, &x, &format!("{dd}.layers.{i}"), a, &seq)?;
        x = out;
    }
    let st = b.c_i64(&[1], &[r as i64]);
    let en = b.c_i64(&[1], &[s as i64]);
    let ax1 = b.c_i64(&[1], &[1]);
    let x = b.op("Slice", &[&x, &st, &en, &ax1], vec![]);
    let x = reshape(b, &x, &[0, g, g, z as i64]);
    let mut x = transpose(b, &x, &[0, 3, 1, 2]);
    let groups = |ch: usize| (ch / 4).min(32);
    let chs: Vec<usize> = v.cnn_chs.iter().rev().copied().collect();
    for (i, w) in chs.windows(2).enumerate() {
        let (ci, co) = (w[0], w[1]);
        let p = format!("{dd}.unpatchify.1.net.{i}");
        let hdn = group_norm(b, &x, &format!("{p}.block.0"), groups(ci))?;
        let hdn = silu(b, &hdn);
        let hdn = conv_t(b, &hdn, &format!("{p}.block.2.weight"), 2, 1)?;
        let hdn = group_norm(b, &hdn, &format!("{p}.block.3"), groups(co))?;
        let hdn = silu(b, &hdn);
        let hdn = conv(b, &hdn, &format!("{p}.block.5.weight"), 1, 1)?;
        let sc = conv_t(b, &x, &format!("{p}.shortcut.weight"), 2, 0)?;
        let y = add(b, &sc, &hdn);
        let h2 = group_norm(b, &y, &format!("{p}.block2.0"), groups(co))?;
        let h2 = silu(b, &h2);
        let h2 = conv(b, &h2, &format!("{p}.block2.2.weight"), 1, 1)?;
        let h2 = group_norm(b, &h2, &format!("{p}.block2.3"), groups(co))?;
        let h2 = silu(b, &h2);
        let h2 = conv(b, &h2, &format!("{p}.block2.5.weight"), 1, 1)?;
        x = add(b, &y, &h2);
    }
    let x = group_norm(b, &x, &format!("{dd}.conv_out.0"), 16)?;
    let x = silu(b, &x);
    let x = conv(b, &x, &format!("{dd}.conv_out.2.weight"), 1, 1)?;
    let lo = scalar(b, -1.0);
    let hi = scalar(b, 1.0);
    let x = b.op("Clip", &[&x, &lo, &hi], vec![]);
    let x = up(b, &x);
    let side = Dim::N(cfg.image_size);
    b.output(&x, "image", DType::Float32, vec![BATCH, Dim::N(3), side.clone(), side], "RGB image in [-1, 1]");
    Ok(())
}
