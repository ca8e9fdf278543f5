//! The checkpoint layout: every weight name and shape of a SphereAR model for a given config, in the
//! order of the official state dict. The names are the official PyTorch keys, so official checkpoints,
//! our trainer's checkpoints and the exporter's inputs all share one vocabulary.
//!
//! The VAE's RoPE tables (`vae.encoder.freqs_cis`, `vae.decoder.freqs_cis`) are persistent buffers in the
//! official code and so are listed; the AR model's table is not (it is rebuilt from the config).

use crate::config::{ffn_hidden, head_hidden, ModelConfig};

/// Size of the sinusoidal time embedding fed to `head.net.time_embed.mlp.0`.
pub const TIME_FREQ_DIM: usize = 256;

/// One named tensor of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub name: String,
    pub shape: Vec<usize>,
}

struct Out(Vec<KeySpec>);

impl Out {
    fn add(&mut self, name: impl Into<String>, shape: &[usize]) {
        self.0.push(KeySpec { name: name.into(), shape: shape.to_vec() });
    }
    fn block(&mut self, p: &str, dim: usize) {
        let h = ffn_hidden(dim);
        self.add(format!("{p}.attention.wqkv.weight"), &[3 * dim, dim]);
        self.add(format!("{p}.attention.wo.weight"), &[dim, dim]);
        self.add(format!("{p}.feed_forward.w1.weight"), &[2 * h, dim]);
        self.add(format!("{p}.feed_forward.w2.weight"), &[dim, h]);
        self.add(format!("{p}.attention_norm.weight"), &[dim]);
        self.add(format!("{p}.ffn_norm.weight"), &[dim]);
    }
    fn norm_affine(&mut self, p: &str, c: usize) {
        self.add(format!("{p}.weight"), &[c]);
        self.add(format!("{p}.bias"), &[c]);
    }
    fn linear(&mut self, p: &str, out: usize, inp: usize) {
        self.add(format!("{p}.weight"), &[out, inp]);
        self.add(format!("{p}.bias"), &[out]);
    }
}

/// Keys of the S-VAE (`vae.*`).
pub fn vae_keys(cfg: &ModelConfig) -> Vec<KeySpec> {
    let v = &cfg.vae;
    let (z, d) = (v.z_channels, cfg.latent_dim);
    let rope = [v.register_tokens + cfg.num_tokens(), v.head_dim() / 2, 2];
    let mut o = Out(Vec::new());
    let e = "vae.encoder";
    o.add(format!("{e}.freqs_cis"), &rope);
    o.add(format!("{e}.conv_in.weight"), &[v.cnn_chs[0], 3, 3, 3]);
    for (i, w) in v.cnn_chs.windows(2).enumerate() {
        let (a, b) = (w[0], w[1]);
        let p = format!("{e}.patchify.0.net.{i}");
        o.norm_affine(&format!("{p}.block.0"), a);
        o.add(format!("{p}.block.2.weight"), &[b, a, 3, 3]);
        o.norm_affine(&format!("{p}.block.3"), b);
        o.add(format!("{p}.block.5.weight"), &[b, b, 3, 3]);
        o.add(format!("{p}.shortcut.weight"), &[b, a, 2, 2]);
    }
    o.add(format!("{e}.register_token.weight"), &[v.register_tokens, z]);
    for i in 0..v.encoder_layers {
        o.block(&format!("{e}.layers.{i}"), z);
    }
    o.add(format!("{e}.norm.weight"), &[z]);
    o.add(format!("{e}.output.weight"), &[z, z]);
    let dd = "vae.decoder";
    o.add(format!("{dd}.freqs_cis"), &rope);
    o.add(format!("{dd}.conv_in.1.weight"), &[z, z, 3, 3]);
    o.add(format!("{dd}.register_token.weight"), &[v.register_tokens, z]);
    for i in 0..v.decoder_layers {
        o.block(&format!("{dd}.layers.{i}"), z);
    }
    let rev: Vec<usize> = v.cnn_chs.iter().rev().copied().collect();
    for (i, w) in rev.windows(2).enumerate() {
        let (a, b) = (w[0], w[1]);
        let p = format!("{dd}.unpatchify.1.net.{i}");
        o.norm_affine(&format!("{p}.block.0"), a);
        o.add(format!("{p}.block.2.weight"), &[a, b, 4, 4]);
        o.norm_affine(&format!("{p}.block.3"), b);
        o.add(format!("{p}.block.5.weight"), &[b, b, 3, 3]);
        o.add(format!("{p}.shortcut.weight"), &[a, b, 2, 2]);
        o.norm_affine(&format!("{p}.block2.0"), b);
        o.add(format!("{p}.block2.2.weight"), &[b, b, 3, 3]);
        o.norm_affine(&format!("{p}.block2.3"), b);
        o.add(format!("{p}.block2.5.weight"), &[b, b, 3, 3]);
    }
    let c0 = v.cnn_chs[0];
    o.norm_affine(&format!("{dd}.conv_out.0"), c0);
    o.add(format!("{dd}.conv_out.2.weight"), &[3, c0, 3, 3]);
    o.linear("vae.quant_proj", v.posterior.quant_proj_out(d), z);
    o.add("vae.post_quant_proj.weight", &[z, d]);
    o.0
}

/// Keys of the AR transformer and its diffusion head (everything but `vae.*`).
pub fn ar_keys(cfg: &ModelConfig) -> Vec<KeySpec> {
    let a = &cfg.ar;
    let (dim, d, c) = (a.dim, cfg.latent_dim, a.head_dim);
    let mut o = Out(Vec::new());
    o.add("cls_embedding.weight", &[cfg.num_classes + 1, dim * cfg.cls_token_num]);
    o.linear("proj_in", dim, d);
    o.add("emb_norm.weight", &[dim]);
    for i in 0..a.n_layer {
        o.block(&format!("layers.{i}"), dim);
    }
    o.add("norm.weight", &[dim]);
    o.add("pos_for_diff.weight", &[cfg.num_tokens(), dim]);
    let h = "head.net";
    o.linear(&format!("{h}.time_embed.mlp.0"), c, TIME_FREQ_DIM);
    o.linear(&format!("{h}.time_embed.mlp.2"), c, c);
    o.linear(&format!("{h}.cond_embed"), c, dim);
    o.linear(&format!("{h}.input_proj"), c, d);
    let hh = head_hidden(c);
    for i in 0..a.head_blocks {
        let p = format!("{h}.res_blocks.{i}");
        o.norm_affine(&format!("{p}.norm"), c);
        o.linear(&format!("{p}.w1"), 2 * hh, c);
        o.linear(&format!("{p}.w2"), c, hh);
    }
    for i in 0..a.head_adaln_blocks {
        o.linear(&format!("{h}.ada_ln_blocks.{i}"), 3 * c, c);
    }
    o.linear(&format!("{h}.final_layer.ada_ln_modulation"), 2 * c, c);
    o.linear(&format!("{h}.final_layer.linear"), d, c);
    o.0
}

/// The whole model in the official order: `vae.*` first, then the AR model.
pub fn all_keys(cfg: &ModelConfig) -> Vec<KeySpec> {
    let mut k = vae_keys(cfg);
    k.extend(ar_keys(cfg));
    k
}

/// Number of scalars in a key list.
pub fn param_count(keys: &[KeySpec]) -> usize {
    keys.iter().map(|k| k.shape.iter().product::<usize>()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed copy of the official SphereAR-B key list (../shared/official-state-dict-B.txt).
    const OFFICIAL_B: &str = include_str!("../../tests/fixtures/official-state-dict-B.txt");

    #[test]
    fn spherear_b_layout_equals_the_official_list_line_by_line() {
        let cfg = ModelConfig::preset("spherear-b").unwrap();
        let ours: Vec<String> = all_keys(&cfg).iter().map(|k| format!("{} {:?}", k.name, k.shape)).collect();
        let official: Vec<&str> = OFFICIAL_B.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(official.len(), 404);
        assert_eq!(ours.len(), official.len());
        for (o, f) in ours.iter().zip(&official) {
            assert_eq!(o, f);
        }
    }

    #[test]
    fn parameter_counts_of_the_presets() {
        // Paper: ~208M / 479M / 943M for B / L / H without the VAE; the official B key list sums to 204.5M.
        let count = |p: &str| param_count(&ar_keys(&ModelConfig::preset(p).unwrap()));
        let (b, l, h) = (count("spherear-b"), count("spherear-l"), count("spherear-h"));
        println!("AR+head parameters: B {b}, L {l}, H {h}");
        assert!((200_000_000..212_000_000).contains(&b), "{b}");
        assert!((470_000_000..490_000_000).contains(&l), "{l}");
        assert!((925_000_000..960_000_000).contains(&h), "{h}");
    }
}
