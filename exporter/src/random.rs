//! Random-init checkpoints for tests, benchmarks and size checks (`exporter random-checkpoint`): run
//! folders in exactly the layout the trainer writes, so the exporter, runtime and benchmarks can be
//! exercised without libtorch. Not part of the export API: compiled with the cargo feature `random-init`
//! (on through the default `cli` feature, which the `exporter` binary needs).

use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use spherear_core::config::WEIGHTS_FORMAT;
use spherear_core::judge::{judge_keys, JudgeConfig, JUDGE_CONFIG_FILE, JUDGE_STAGE, JUDGE_WEIGHTS_FILE};
use spherear_core::keys::{all_keys, vae_keys, KeySpec};
use spherear_core::rope::rope_2d;
use spherear_core::ModelConfig;

use crate::checkpoint::Stage;
use crate::error::{io_err, ExportError, Result};

/// Writes f32 tensors (`bufs[i]` little-endian bytes of `keys[i]`) to `path` atomically as safetensors with
/// our metadata (format, stage, config JSON).
fn write_weights(path: &Path, keys: &[KeySpec], bufs: &[Vec<u8>], stage: &str, config: String) -> Result<()> {
    let views = keys
        .iter()
        .zip(bufs)
        .map(|(k, b)| {
            TensorView::new(Dtype::F32, k.shape.clone(), b)
                .map(|v| (k.name.clone(), v))
                .map_err(|e| ExportError::Invalid(format!("{}: {e}", k.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [
        ("format".to_string(), WEIGHTS_FORMAT.to_string()),
        ("stage".to_string(), stage.to_string()),
        ("config".to_string(), config),
    ]
    .into();
    let bytes = safetensors::serialize(views, &Some(meta))
        .map_err(|e| ExportError::Io(format!("cannot serialise {}: {e}", path.display())))?;
    spherear_core::fsutil::write_atomic(path, &bytes)?;
    Ok(())
}

/// Writes a random-init checkpoint folder for `cfg`: config.json plus `ar.safetensors` with every official
/// key (`Stage::Ar`) or `vae.safetensors` with the `vae.*` keys (`Stage::Vae`). Linear/conv weights are uniform with variance 1/fan_in, norm weights 1 ± 0.1,
/// biases ±0.1, so activations stay O(1) and every parameter matters; the VAE RoPE buffers get their
/// real values. Meant for tests and size checks, not for sampling.
pub fn write_random(cfg: &ModelConfig, dir: &Path, seed: u64, stage: Stage) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let keys = match stage {
        Stage::Ar => all_keys(cfg),
        Stage::Vae => vae_keys(cfg),
    };
    let mut bufs = Vec::with_capacity(keys.len());
    for k in &keys {
        let n: usize = k.shape.iter().product();
        let data: Vec<f32> = if k.name.ends_with("freqs_cis") {
            rope_2d(cfg.grid(), cfg.vae.head_dim(), cfg.vae.register_tokens)?.data
        } else if k.shape.len() == 1 {
            let base = if k.name.ends_with(".weight") { 1.0 } else { 0.0 };
            (0..n).map(|_| base + rng.gen_range(-0.1f32..0.1)).collect()
        } else {
            let fan_in: usize = k.shape[1..].iter().product();
            let a = (3.0 / fan_in as f32).sqrt();
            (0..n).map(|_| rng.gen_range(-a..a)).collect()
        };
        bufs.push(data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    }
    write_weights(&dir.join(stage.weights_file()), &keys, &bufs, stage.name(), cfg.to_json())?;
    cfg.save(&dir.join("config.json"))?;
    Ok(())
}

/// Writes a random-init judge run folder (`judge-config.json` + `judge.safetensors`, no metrics) for tests:
/// weights uniform with variance 1/fan_in, biases ±0.1.
pub fn write_random_judge(cfg: &JudgeConfig, dir: &Path, seed: u64) -> Result<()> {
    cfg.validate()?;
    std::fs::create_dir_all(dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let keys = judge_keys(cfg);
    let bufs: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| {
            let n: usize = k.shape.iter().product();
            let a = if k.shape.len() == 1 { 0.1 } else { (3.0 / k.shape[1..].iter().product::<usize>() as f32).sqrt() };
            (0..n).flat_map(|_| rng.gen_range(-a..a).to_le_bytes()).collect()
        })
        .collect();
    write_weights(&dir.join(JUDGE_WEIGHTS_FILE), &keys, &bufs, JUDGE_STAGE, cfg.to_json())?;
    cfg.save(&dir.join(JUDGE_CONFIG_FILE))?;
    Ok(())
}
