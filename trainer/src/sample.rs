//! The reference sampler, faithful to the official one: prefill + KV-cached steps, Euler–Maruyama head
//! sampling with a final 0.04 Euler step, the linear CFG schedule (including its token-0 behaviour),
//! projection of every token onto the radius-R sphere. All noise comes from `spherear_core::noise` in
//! its documented order, and every update rule from `spherear_core::schedule`, so the ONNX runtime can
//! reproduce these tokens exactly.

use spherear_core::noise::BatchNoise;
use spherear_core::schedule::{em_time_grid, em_update, euler_update, guide, token_plan, TimeGrid};
use spherear_core::sphere::project_rows;
use spherear_core::timing::Timing;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::ar::{ArModel, KvCache};
use crate::error::Result;

pub use spherear_core::request::SampleRequest;

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().flatten(0, -1))?)
}

fn rows_tensor(x: &[f32], d: usize) -> Tensor {
    Tensor::from_slice(x).view([(x.len() / d) as i64, d as i64])
}

/// Work counters of a sampling run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampleStats {
    /// Largest batch the AR transformer ran (2B under CFG, B without).
    pub max_ar_rows: usize,
    /// Rows evaluated by the diffusion head, summed over all evaluations.
    pub head_rows: usize,
    /// Per-stage time and call counts (the same accounting as the runtime's; decoder via [`decode_timed`]).
    pub timing: Timing,
}

/// Samples one token for `rows` rows with conditions `cond` [rows_c, dim].
/// Unguided: rows_c = rows and every row is its own sample. Guided: rows_c = 2·rows (conditional rows,
/// then null rows), x has `rows` rows and the velocity is v_u + g·(v_c − v_u).
fn sample_token(
    m: &ArModel,
    cond: &Tensor,
    x: &mut [f32],
    noise: &mut BatchNoise,
    rows_per_image: usize,
    guidance: Option<f32>,
    grid: &TimeGrid,
    stats: &mut SampleStats,
) -> Result<()> {
    let d = m.config.latent_dim;
    let head = &m.ar.head;
    let t0 = Instant::now();
    let cond_emb = head.embed_condition(cond);
    stats.timing.stages.head += t0.elapsed().as_secs_f64();
    let n_eval = cond.size()[0];
    let mut velocity = |x: &[f32], t: f32| -> Result<Vec<f32>> {
        stats.head_rows += n_eval as usize;
        let t0 = Instant::now();
        let xt = rows_tensor(x, d);
        let xt = if guidance.is_some() { Tensor::cat(&[&xt, &xt], 0) } else { xt };
        let tt = Tensor::full([n_eval], t as f64, (Kind::Float, Device::Cpu));
        let v = to_vec(&head.forward_embedded(&xt, &tt, &cond_emb))?;
        stats.timing.stages.head += t0.elapsed().as_secs_f64();
        stats.timing.head_calls += 1;
        match guidance {
            None => Ok(v),
            Some(g) => {
                let half = v.len() / 2;
                let mut out = vec![0f32; half];
                guide(&v[..half], &v[half..], g, &mut out)?;
                Ok(out)
            }
        }
    };
    noise.draw(x, d, rows_per_image)?;
    let mut eps = vec![0f32; x.len()];
    for k in 0..grid.steps {
        let v = velocity(x, grid.times[k])?;
        noise.draw(&mut eps, d, rows_per_image)?;
        em_update(x, &v, &eps, grid.times[k], grid.dt, grid.noise_scales[k])?;
    }
    let v = velocity(x, grid.last_t)?;
    euler_update(x, &v, grid.last_dt)?;
    project_rows(x, d, m.config.radius())?;
    Ok(())
}

/// Samples the tokens of images `first .. first + classes.len()` of a request: [B, L, d].
fn sample_batch(
    m: &ArModel,
    req: &SampleRequest,
    first: usize,
    classes: &[i64],
    stats: &mut SampleStats,
) -> Result<Tensor> {
    let cfg = &m.config;
    let (b, d, l) = (classes.len(), cfg.latent_dim, cfg.num_tokens());
    let grid = em_time_grid(req.steps)?;
    let doubled = token_plan(req.cfg, 0, l).doubled_batch;
    let mut ids = classes.to_vec();
    if doubled {
        ids.extend(std::iter::repeat(cfg.null_class() as i64).take(b));
    }
    let ids = Tensor::from_slice(&ids);
    let rows = ids.size()[0] as usize;
    stats.max_ar_rows = stats.max_ar_rows.max(rows);
    let mut cache = KvCache::new(cfg, rows);
    let mut noise = BatchNoise::new(req.seed, req.first_image + first as u64, b);
    let mut tokens = vec![0f32; b * l * d];
    let mut prev: Vec<f32> = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for i in 0..req.tokens_to_sample(l) {
            let token_start = Instant::now();
            let head_before = stats.timing.stages.head;
            let cond = if i == 0 {
                let c = m.ar.prefill(&ids, &mut cache);
                stats.timing.stages.prefill += token_start.elapsed().as_secs_f64();
                stats.timing.prefill_calls += 1;
                c
            } else {
                let c = m.ar.step(&rows_tensor(&prev, d), i, &mut cache);
                stats.timing.stages.ar_step += token_start.elapsed().as_secs_f64();
                stats.timing.ar_step_calls += 1;
                c
            };
            let ar_done = token_start.elapsed().as_secs_f64();
            let plan = token_plan(req.cfg, i, l);
            let mut x = vec![0f32; b * plan.noise_rows_per_image * d];
            let guidance = plan.guided.then_some(plan.guidance);
            sample_token(m, &cond, &mut x, &mut noise, plan.noise_rows_per_image, guidance, &grid, stats)?;
            // The image's token is the conditional row; the fed-back token goes to both CFG halves
            // (token 0 unguided under CFG: each half keeps its own sample).
            for j in 0..b {
                tokens[(j * l + i) * d..(j * l + i + 1) * d].copy_from_slice(&x[j * d..(j + 1) * d]);
            }
            prev = if doubled && plan.noise_rows_per_image == 1 { [x.as_slice(), x.as_slice()].concat() } else { x };
            let host = token_start.elapsed().as_secs_f64() - ar_done - (stats.timing.stages.head - head_before);
            stats.timing.stages.host += host.max(0.0);
        }
        Ok(())
    })?;
    Ok(Tensor::from_slice(&tokens).view([b as i64, l as i64, d as i64]))
}

/// Samples all images of a request in batches of `req.batch`: tokens [N, L, d] on the radius-R sphere.
pub fn sample_tokens(m: &ArModel, req: &SampleRequest, on_batch: impl FnMut(usize)) -> Result<Tensor> {
    sample_tokens_with_stats(m, req, on_batch).map(|(_, t)| t)
}

/// [`sample_tokens`] that also reports its work counters.
pub fn sample_tokens_with_stats(
    m: &ArModel,
    req: &SampleRequest,
    mut on_batch: impl FnMut(usize),
) -> Result<(SampleStats, Tensor)> {
    req.validate(m.config.num_classes)?;
    let mut stats = SampleStats::default();
    let mut parts = Vec::new();
    for (k, chunk) in req.classes.chunks(req.batch).enumerate() {
        parts.push(sample_batch(m, req, k * req.batch, chunk, &mut stats)?);
        on_batch(chunk.len());
        stats.timing.batches += 1;
    }
    let t = &mut stats.timing;
    t.images = req.classes.len();
    t.batch = req.batch.min(t.images);
    t.num_tokens = m.config.num_tokens();
    t.tokens_timed = req.tokens_to_sample(t.num_tokens);
    Ok((stats, Tensor::cat(&parts, 0)))
}

/// Decodes tokens [N, L, d] to images [N, 3, H, W] in [−1, 1] (decoder output clamped).
pub fn decode(m: &ArModel, tokens: &Tensor) -> Tensor {
    tch::no_grad(|| m.vae.decode(tokens).clamp(-1.0, 1.0))
}

/// [`decode`] in batches of `batch` images, adding the time and calls to `timing`.
pub fn decode_timed(m: &ArModel, tokens: &Tensor, batch: usize, timing: &mut Timing) -> Tensor {
    let n = tokens.size()[0];
    let mut parts = Vec::new();
    let mut start = 0;
    while start < n {
        let len = (batch as i64).min(n - start);
        let t0 = Instant::now();
        let img = decode(m, &tokens.narrow(0, start, len));
        timing.stages.decoder += t0.elapsed().as_secs_f64();
        timing.decoder_calls += 1;
        parts.push(img);
        start += len;
    }
    Tensor::cat(&parts, 0)
}
