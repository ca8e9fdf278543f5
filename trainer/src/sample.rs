//! The reference sampler, faithful to the official one: the token loop of [`spherear_core::sampler`]
//! (prefill + KV-cached steps, Euler–Maruyama head sampling with a final 0.04 Euler step, the linear CFG
//! schedule including its token-0 behaviour, projection onto the radius-R sphere, all noise from
//! `spherear_core::noise` in its documented order) over the libtorch model. The ONNX runtime runs the same
//! loop over its graphs, so it reproduces these tokens up to float error.

use std::ops::ControlFlow;
use std::time::Instant;

use spherear_core::sampler::{sample_request, Feed, LoopShape, TokenBackend};
use spherear_core::timing::Timing;
use tch::{Device, Kind, Tensor};

use crate::ar::{ArModel, KvCache};
use crate::error::{Result, TrainError};

pub use spherear_core::request::SampleRequest;
pub use spherear_core::sampler::SampleStats;

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().flatten(0, -1))?)
}

fn rows_tensor(x: &[f32], d: usize) -> Tensor {
    Tensor::from_slice(x).view([(x.len() / d) as i64, d as i64])
}

/// The libtorch model as a [`TokenBackend`]: a fresh KV cache per batch; the condition embedding of the head
/// is computed once per token, at its first head call (timed as head work).
struct TchBackend<'m> {
    m: &'m ArModel,
    rows: usize,
    cache: Option<KvCache>,
    cond: Option<Tensor>,
    cond_emb: Option<Tensor>,
    cond_host: Vec<f32>,
    v: Vec<f32>,
}

impl TchBackend<'_> {
    fn cache(&mut self) -> Result<&mut KvCache> {
        self.cache.as_mut().ok_or_else(|| TrainError::Mismatch("internal: sampling before start_batch".into()))
    }

    fn set_condition(&mut self, c: Tensor) -> Result<&[f32]> {
        self.cond_host = to_vec(&c)?;
        self.cond = Some(c);
        self.cond_emb = None;
        Ok(&self.cond_host)
    }
}

impl TokenBackend for TchBackend<'_> {
    type Error = TrainError;

    fn start_batch(&mut self, rows: usize) -> Result<()> {
        self.rows = rows;
        self.cache = Some(KvCache::new(&self.m.config, rows));
        Ok(())
    }

    fn prefill(&mut self, class_ids: &[i64]) -> Result<&[f32]> {
        let m = self.m;
        let c = m.ar.prefill(&Tensor::from_slice(class_ids), self.cache()?);
        self.set_condition(c)
    }

    fn step(&mut self, tokens: Feed<'_>, token: usize) -> Result<&[f32]> {
        let m = self.m;
        let t = rows_tensor(&tokens.to_vec(), m.config.latent_dim);
        let c = m.ar.step(&t, token, self.cache()?);
        self.set_condition(c)
    }

    fn velocity(&mut self, x_t: Feed<'_>, t: f32) -> Result<&[f32]> {
        let head = &self.m.ar.head;
        let cond = self.cond.as_ref().ok_or_else(|| TrainError::Mismatch("internal: head before prefill".into()))?;
        let emb = self.cond_emb.get_or_insert_with(|| head.embed_condition(cond));
        let x = rows_tensor(x_t.rows, self.m.config.latent_dim);
        let x = if x_t.both_halves { Tensor::cat(&[&x, &x], 0) } else { x };
        let tt = Tensor::full([self.rows as i64], t as f64, (Kind::Float, Device::Cpu));
        self.v = to_vec(&head.forward_embedded(&x, &tt, emb))?;
        Ok(&self.v)
    }
}

/// Samples all images of a request in batches of `req.batch`: tokens [N, L, d] (on the radius-R sphere unless
/// the posterior is Gaussian).
pub fn sample_tokens(m: &ArModel, req: &SampleRequest, on_batch: impl FnMut(usize)) -> Result<Tensor> {
    sample_tokens_with_stats(m, req, on_batch).map(|(_, t)| t)
}

/// [`sample_tokens`] that also reports its work counters and per-stage timing (decoder via
/// [`decode_timed`]). `on_batch(n)` is called after each batch with its number of images. A model that
/// produces NaN/Inf stops it with [`spherear_core::CoreError::NonFinite`] naming the stage and the token.
pub fn sample_tokens_with_stats(
    m: &ArModel,
    req: &SampleRequest,
    mut on_batch: impl FnMut(usize),
) -> Result<(SampleStats, Tensor)> {
    req.validate(m.config.num_classes)?;
    let cfg = &m.config;
    let shape = LoopShape {
        num_tokens: cfg.num_tokens(),
        latent_dim: cfg.latent_dim,
        radius: cfg.token_radius(),
        null_class: cfg.null_class() as i64,
    };
    let mut backend =
        TchBackend { m, rows: 0, cache: None, cond: None, cond_emb: None, cond_host: Vec::new(), v: Vec::new() };
    let run = tch::no_grad(|| {
        sample_request(&mut backend, &shape, req, req.batch, |p| {
            if p.batch_done() {
                on_batch(p.images);
            }
            ControlFlow::Continue(())
        })
    })?;
    let ControlFlow::Continue((tokens, stats)) = run else {
        return Err(TrainError::Interrupted);
    };
    let (n, l, d) = (req.classes.len() as i64, shape.num_tokens as i64, shape.latent_dim as i64);
    Ok((stats, Tensor::from_slice(&tokens).view([n, l, d])))
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
