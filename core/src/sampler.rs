//! The token loop of SphereAR sampling, written once for every sampler of the toolchain: the libtorch
//! reference sampler (`trainer sample`) and the ONNX Runtime generator (`runtime generate`) are two
//! [`TokenBackend`]s of [`sample_request`]; the serving engine (`runtime serve`), which schedules its own
//! rows, integrates each image's token with the same [`TokenHead`].
//!
//! For every batch of B images (a request is split into batches of `batch` images; image j of the request
//! draws noise stream `first_image + j` whatever the split, see [`crate::noise`]):
//!
//! 1. [`TokenBackend::start_batch`] with the AR rows: 2B under CFG (the B conditional rows, then B rows of the
//!    null class), B without.
//! 2. For each token i = 0 … n − 1 (n = L, or the request's token limit):
//!    - token 0: [`TokenBackend::prefill`] over the class ids; token i > 0: [`TokenBackend::step`] with token
//!      i − 1 as it was fed back ([`TokenHead::feed`]) at sequence position `cls + i − 1`. Either returns the
//!      head conditions, which must be finite.
//!    - the head integration of [`TokenHead`]: the [`token_plan`] of the linear CFG schedule, the start noise,
//!      then `steps` Euler–Maruyama steps and one final Euler step, each one [`TokenBackend::velocity`] call over
//!      all AR rows (guided: x fed to both CFG halves, v = v_u + g·(v_c − v_u)); x must end finite and is
//!      projected onto the radius-R sphere when [`LoopShape::radius`] is given (every posterior but the plain
//!      Gaussian one).
//!    - image j's token i is row j of x (its conditional row).
//!    - `on_tokens` is told; `ControlFlow::Break` stops the request.
//!
//! **Timing** ([`SampleStats::timing`]): every backend call is timed as its stage (prefill, ar_step, head;
//! `start_batch` is not a stage), and the rest of a token's wall time (noise, updates, guidance, projection) as
//! host time, the same way for every backend, so `bench speed` compares like with like.
//!
//! **Allocation.** The loop's buffers (x, ε, guided velocity, class ids) are allocated once per request and
//! grown when a batch needs more; the token loop itself allocates nothing (an error message only on error).

use std::ops::ControlFlow;
use std::time::Instant;

use crate::noise::BatchNoise;
use crate::request::SampleRequest;
use crate::schedule::{em_time_grid, em_update, euler_update, guide, token_plan, TimeGrid, TokenPlan};
use crate::sphere::project_rows;
use crate::timing::Timing;
use crate::CoreError;

/// Host rows handed to a backend: `rows` ([n, d], row-major), and under guidance the same rows once more for
/// the null-class half, so that the backend's input is [2n, d] = `rows` followed by `rows`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Feed<'a> {
    pub rows: &'a [f32],
    /// The rows go to both CFG halves (the token is guided).
    pub both_halves: bool,
}

impl Feed<'_> {
    /// Number of values of the backend's input.
    pub fn len(&self) -> usize {
        if self.both_halves {
            2 * self.rows.len()
        } else {
            self.rows.len()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Writes the backend's input into `dst` (exactly [`Feed::len`] values).
    pub fn write_to(&self, dst: &mut [f32]) -> Result<(), CoreError> {
        if dst.len() != self.len() {
            return Err(CoreError::Invalid(format!(
                "feeding {} values into an input of {}",
                self.len(),
                dst.len()
            )));
        }
        let n = self.rows.len();
        dst[..n].copy_from_slice(self.rows);
        if self.both_halves {
            dst[n..].copy_from_slice(self.rows);
        }
        Ok(())
    }

    /// The backend's input as one vector.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.len()];
        let n = self.rows.len();
        v[..n].copy_from_slice(self.rows);
        if self.both_halves {
            v[n..].copy_from_slice(self.rows);
        }
        v
    }

    /// Row `j` (d values) of the backend's input.
    pub fn row(&self, j: usize, d: usize) -> &[f32] {
        let n = self.rows.len() / d.max(1);
        let j = if self.both_halves && j >= n { j - n } else { j };
        &self.rows[j * d..(j + 1) * d]
    }
}

/// The AR transformer and the diffusion head of one model, run on host buffers. A backend serves one batch at
/// a time: [`TokenBackend::start_batch`], [`TokenBackend::prefill`], then per token [`TokenBackend::velocity`]
/// calls and (from token 1 on) one [`TokenBackend::step`].
pub trait TokenBackend {
    /// The backend's error; the loop's own errors (bad sizes, [`CoreError::NonFinite`]) convert into it.
    type Error: From<CoreError>;

    /// Prepares a batch of `rows` AR rows: a KV cache covering the whole sequence and its input/output
    /// buffers (allocated, or reused from the previous batch of the same size). Not timed as a stage.
    fn start_batch(&mut self, rows: usize) -> Result<(), Self::Error>;

    /// Runs the class tokens of `class_ids` (`rows` ids: the conditional rows, then under CFG the null-class
    /// rows) into the cache; returns the head conditions of image token 0, [rows, dim].
    fn prefill(&mut self, class_ids: &[i64]) -> Result<&[f32], Self::Error>;

    /// Feeds image token `token − 1` ([rows, d] as `tokens` describes it) at sequence position
    /// `cls + token − 1` of every row, updating the cache in place; returns the head conditions of image token
    /// `token`, [rows, dim].
    fn step(&mut self, tokens: Feed<'_>, token: usize) -> Result<&[f32], Self::Error>;

    /// The head's velocity at time `t` for `x_t` ([rows, d]) under the conditions of the last
    /// prefill/step; returns [rows, d] (unguided: the loop guides).
    fn velocity(&mut self, x_t: Feed<'_>, t: f32) -> Result<&[f32], Self::Error>;
}

/// What the loop needs to know about the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopShape {
    /// Tokens per image, L.
    pub num_tokens: usize,
    /// Token dimension, d.
    pub latent_dim: usize,
    /// Radius every sampled token is projected to (R for latents on the sphere); `None`: no projection
    /// (a Gaussian posterior, [`crate::ModelConfig::token_radius`]).
    pub radius: Option<f32>,
    /// Class id of the CFG null class.
    pub null_class: i64,
}

/// Work and time of a sampling run (both samplers report it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampleStats {
    pub images: usize,
    /// images × tokens sampled per image.
    pub tokens: usize,
    /// Wall time of token sampling (prefill, steps, head, noise, projection; no decoding).
    pub sample_seconds: f64,
    /// Largest batch the AR model ran (2B under CFG, B without).
    pub max_ar_rows: usize,
    /// Rows evaluated by the diffusion head, summed over all evaluations.
    pub head_rows: usize,
    pub batches: usize,
    /// Per-stage time and call counts of token sampling (the decoder is added by the caller's decode).
    pub timing: Timing,
}

impl SampleStats {
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.sample_seconds.max(1e-12)
    }
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.sample_seconds.max(1e-12)
    }
}

/// Progress after one token step of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenProgress {
    /// Images of the batch (each got one more token).
    pub images: usize,
    /// The token just sampled (0-based).
    pub token: usize,
    /// Tokens sampled per image in this request.
    pub tokens: usize,
}

impl TokenProgress {
    /// The batch's last token.
    pub fn batch_done(&self) -> bool {
        self.token + 1 >= self.tokens
    }
}

/// Time of head call `k` of a token: EM step k for k < steps, else the final Euler step.
pub fn head_call_time(grid: &TimeGrid, k: usize) -> f32 {
    if k < grid.steps {
        grid.times[k]
    } else {
        grid.last_t
    }
}

/// The head integration of one token for a group of images (a whole batch in [`sample_request`], one image
/// in the serving engine): the token's plan, x, ε and the guided velocity, in buffers that are reused.
///
/// Per token: [`TokenHead::begin`] (plan, start noise), then for k = 0 … steps a head call over
/// [`TokenHead::feed`] at [`head_call_time`] followed by [`TokenHead::advance`], then [`TokenHead::finish`].
/// x keeps the sampled rows until the next `begin`: image j's token is row j of [`TokenHead::x`], and
/// [`TokenHead::feed`] is what goes back into the AR model.
#[derive(Debug, Clone)]
pub struct TokenHead {
    d: usize,
    x: Vec<f32>,
    eps: Vec<f32>,
    v: Vec<f32>,
    x_len: usize,
    plan: TokenPlan,
}

impl TokenHead {
    /// Buffers for up to `images` images (2 rows each) of tokens of dimension `d`.
    pub fn new(images: usize, d: usize) -> Self {
        let n = 2 * images * d;
        TokenHead {
            d,
            x: vec![0.0; n],
            eps: vec![0.0; n],
            v: vec![0.0; n],
            x_len: 0,
            plan: token_plan(1.0, 0, 0),
        }
    }

    /// Grows the buffers to hold `images` images (allocates only when they are too small).
    pub fn reserve(&mut self, images: usize) {
        let n = 2 * images * self.d;
        if self.x.len() < n {
            for b in [&mut self.x, &mut self.eps, &mut self.v] {
                b.resize(n, 0.0);
            }
        }
    }

    /// Starts a token under `plan` for `images` images: draws the start noise x_0 (rows per image as planned).
    pub fn begin(&mut self, plan: TokenPlan, images: usize, noise: &mut BatchNoise) -> Result<(), CoreError> {
        let x_len = images * plan.noise_rows_per_image * self.d;
        if x_len > self.x.len() {
            return Err(CoreError::Invalid(format!(
                "token head: {images} images need {x_len} values, the buffers hold {}",
                self.x.len()
            )));
        }
        self.plan = plan;
        self.x_len = x_len;
        noise.draw(&mut self.x[..x_len], self.d, plan.noise_rows_per_image)
    }

    /// The current token's plan.
    pub fn plan(&self) -> &TokenPlan {
        &self.plan
    }

    /// x ([rows, d]: one row per image, or two at an unguided doubled token).
    pub fn x(&self) -> &[f32] {
        &self.x[..self.x_len]
    }

    /// x as the head and the AR model take it: guided, to both CFG halves.
    pub fn feed(&self) -> Feed<'_> {
        Feed { rows: &self.x[..self.x_len], both_halves: self.plan.guided }
    }

    /// Applies head call `k` (k < steps: Euler–Maruyama step k, drawing ε; k = steps: the final Euler step)
    /// with the head's raw `velocity` over [`TokenHead::feed`] (guided first: v = v_u + g·(v_c − v_u)).
    pub fn advance(
        &mut self,
        grid: &TimeGrid,
        k: usize,
        velocity: &[f32],
        noise: &mut BatchNoise,
    ) -> Result<(), CoreError> {
        let n = self.x_len;
        let need = if self.plan.guided { 2 * n } else { n };
        if velocity.len() < need || k > grid.steps {
            return Err(CoreError::Invalid(format!(
                "token head: call {k} of {} with {} velocity values, expected {need}",
                crate::schedule::head_evals(grid.steps),
                velocity.len()
            )));
        }
        let v = if self.plan.guided {
            guide(&velocity[..n], &velocity[n..2 * n], self.plan.guidance, &mut self.v[..n])?;
            &self.v[..n]
        } else {
            &velocity[..n]
        };
        if k < grid.steps {
            noise.draw(&mut self.eps[..n], self.d, self.plan.noise_rows_per_image)?;
            em_update(&mut self.x[..n], v, &self.eps[..n], grid.times[k], grid.dt, grid.noise_scales[k])
        } else {
            euler_update(&mut self.x[..n], v, grid.last_dt)
        }
    }

    /// Ends the token: `false` (x untouched) when x holds NaN/±Inf, else `true` with every row projected onto
    /// the sphere of radius `radius` when one is given (left as integrated when `None`).
    pub fn finish(&mut self, radius: Option<f32>) -> Result<bool, CoreError> {
        let x = &mut self.x[..self.x_len];
        if !x.iter().all(|v| v.is_finite()) {
            return Ok(false);
        }
        if let Some(r) = radius {
            project_rows(x, self.d, r)?;
        }
        Ok(true)
    }
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Samples every image of `req` in batches of `batch` images with `backend`: tokens [N, L, d] (a token
/// limit leaves the later tokens zero) and the run's stats; `Break` when `on_tokens` asked to stop (checked
/// after every token step). The request is expected to be validated by the caller.
pub fn sample_request<B: TokenBackend>(
    backend: &mut B,
    shape: &LoopShape,
    req: &SampleRequest,
    batch: usize,
    mut on_tokens: impl FnMut(TokenProgress) -> ControlFlow<()>,
) -> Result<ControlFlow<(), (Vec<f32>, SampleStats)>, B::Error> {
    let start = Instant::now();
    let (l, d) = (shape.num_tokens, shape.latent_dim);
    let batch = batch.max(1);
    let grid = em_time_grid(req.steps)?;
    let mut stats = SampleStats::default();
    let mut data = vec![0f32; req.classes.len() * l * d];
    let mut lp = BatchLoop {
        shape,
        req,
        grid: &grid,
        head: TokenHead::new(batch.min(req.classes.len()), d),
        ids: Vec::with_capacity(2 * batch),
    };
    for (k, chunk) in req.classes.chunks(batch).enumerate() {
        let first = k * batch;
        let out = &mut data[first * l * d..(first + chunk.len()) * l * d];
        if lp.run(backend, first, chunk, out, &mut stats, &mut on_tokens)?.is_break() {
            return Ok(ControlFlow::Break(()));
        }
        stats.batches += 1;
    }
    stats.images = req.classes.len();
    stats.tokens = stats.images * req.tokens_to_sample(l);
    stats.sample_seconds = secs(start);
    let t = &mut stats.timing;
    t.images = stats.images;
    t.batch = batch.min(stats.images);
    t.batches = stats.batches;
    t.num_tokens = l;
    t.tokens_timed = req.tokens_to_sample(l);
    Ok(ControlFlow::Continue((data, stats)))
}

/// The per-request state of [`sample_request`].
struct BatchLoop<'a> {
    shape: &'a LoopShape,
    req: &'a SampleRequest,
    grid: &'a TimeGrid,
    head: TokenHead,
    ids: Vec<i64>,
}

impl BatchLoop<'_> {
    /// Samples images `first .. first + classes.len()` of the request into `out` ([B, L, d]).
    fn run<B: TokenBackend>(
        &mut self,
        backend: &mut B,
        first: usize,
        classes: &[i64],
        out: &mut [f32],
        stats: &mut SampleStats,
        on_tokens: &mut impl FnMut(TokenProgress) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, B::Error> {
        let (req, grid) = (self.req, self.grid);
        let (b, d, l) = (classes.len(), self.shape.latent_dim, self.shape.num_tokens);
        let doubled = token_plan(req.cfg, 0, l).doubled_batch;
        self.ids.clear();
        self.ids.extend_from_slice(classes);
        if doubled {
            self.ids.extend(std::iter::repeat_n(self.shape.null_class, b));
        }
        let rows = self.ids.len();
        backend.start_batch(rows)?;
        stats.max_ar_rows = stats.max_ar_rows.max(rows);
        self.head.reserve(b);
        let first_image = req.first_image.wrapping_add(first as u64);
        let mut noise = BatchNoise::new(req.seed, first_image, b);
        let non_finite = |graph: &str, what: &str, token: usize| CoreError::NonFinite {
            graph: graph.into(),
            what: what.into(),
            at: format!("token {token} of images {first_image}..{}", first_image.wrapping_add(b as u64)),
        };
        let tokens = req.tokens_to_sample(l);
        for i in 0..tokens {
            let token_start = Instant::now();
            let head_before = stats.timing.stages.head;
            let (graph, condition) = if i == 0 {
                let c = backend.prefill(&self.ids)?;
                stats.timing.stages.prefill += secs(token_start);
                stats.timing.prefill_calls += 1;
                ("ar_prefill", c)
            } else {
                let c = backend.step(self.head.feed(), i)?;
                stats.timing.stages.ar_step += secs(token_start);
                stats.timing.ar_step_calls += 1;
                ("ar_step", c)
            };
            if !condition.iter().all(|v| v.is_finite()) {
                return Err(non_finite(graph, "condition", i).into());
            }
            let ar_done = secs(token_start);
            self.head.begin(token_plan(req.cfg, i, l), b, &mut noise)?;
            for k in 0..=grid.steps {
                let t0 = Instant::now();
                let v = backend.velocity(self.head.feed(), head_call_time(grid, k))?;
                stats.timing.stages.head += secs(t0);
                stats.timing.head_calls += 1;
                stats.head_rows += rows;
                self.head.advance(grid, k, v, &mut noise)?;
            }
            if !self.head.finish(self.shape.radius)? {
                return Err(non_finite("head_step", "velocity", i).into());
            }
            // The image's token is the conditional row; what is fed back ([`TokenHead::feed`]) goes to both CFG
            // halves (token 0 unguided under CFG: each half keeps its own sample).
            let x = self.head.x();
            for j in 0..b {
                out[(j * l + i) * d..(j * l + i + 1) * d].copy_from_slice(&x[j * d..(j + 1) * d]);
            }
            let host = secs(token_start) - ar_done - (stats.timing.stages.head - head_before);
            stats.timing.stages.host += host.max(0.0);
            if on_tokens(TokenProgress { images: b, token: i, tokens }).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sphere::project;

    /// A toy model on the host: condition = class id (+ 0.5 · token fed), velocity = −x_t + condition + t, with
    /// call counters and a record of every input.
    #[derive(Default)]
    struct Toy {
        d: usize,
        rows: usize,
        cond: Vec<f32>,
        v: Vec<f32>,
        starts: Vec<usize>,
        steps: Vec<(usize, Vec<f32>)>,
        velocity_inputs: Vec<Vec<f32>>,
        poison_at: Option<usize>,
    }

    impl TokenBackend for Toy {
        type Error = CoreError;
        fn start_batch(&mut self, rows: usize) -> Result<(), CoreError> {
            self.rows = rows;
            self.starts.push(rows);
            Ok(())
        }
        fn prefill(&mut self, class_ids: &[i64]) -> Result<&[f32], CoreError> {
            assert_eq!(class_ids.len(), self.rows);
            self.cond = class_ids.iter().map(|&c| c as f32).collect();
            Ok(&self.cond)
        }
        fn step(&mut self, tokens: Feed<'_>, token: usize) -> Result<&[f32], CoreError> {
            let t = tokens.to_vec();
            assert_eq!(t.len(), self.rows * self.d);
            for (r, c) in self.cond.iter_mut().enumerate() {
                *c += 0.5 * t[r * self.d];
            }
            if self.poison_at == Some(token) {
                self.cond[0] = f32::NAN;
            }
            self.steps.push((token, t));
            Ok(&self.cond)
        }
        fn velocity(&mut self, x_t: Feed<'_>, t: f32) -> Result<&[f32], CoreError> {
            let x = x_t.to_vec();
            assert_eq!(x.len(), self.rows * self.d);
            self.v = x.iter().enumerate().map(|(i, &x)| -x + self.cond[i / self.d] + t).collect();
            self.velocity_inputs.push(x);
            Ok(&self.v)
        }
    }

    fn shape(l: usize, d: usize) -> LoopShape {
        LoopShape { num_tokens: l, latent_dim: d, radius: Some(2.0), null_class: 9 }
    }

    fn request(classes: &[i64], cfg: f32, steps: usize, batch: usize) -> SampleRequest {
        SampleRequest { classes: classes.to_vec(), cfg, steps, seed: 5, first_image: 0, batch, token_limit: None }
    }

    fn run(toy: &mut Toy, req: &SampleRequest, l: usize) -> (Vec<f32>, SampleStats) {
        match sample_request(toy, &shape(l, toy.d), req, req.batch, |_| ControlFlow::Continue(())).unwrap() {
            ControlFlow::Continue(r) => r,
            ControlFlow::Break(()) => panic!("not cancelled"),
        }
    }

    #[test]
    fn feeds_write_both_halves() {
        let f = Feed { rows: &[1.0, 2.0, 3.0, 4.0], both_halves: true };
        assert_eq!(f.len(), 8);
        assert_eq!(f.to_vec(), vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!((f.row(1, 2), f.row(3, 2)), (&[3.0, 4.0][..], &[3.0, 4.0][..]));
        let mut dst = [0.0; 8];
        f.write_to(&mut dst).unwrap();
        assert_eq!(dst.to_vec(), f.to_vec());
        assert!(f.write_to(&mut [0.0; 4]).is_err());
        let g = Feed { rows: &[1.0, 2.0], both_halves: false };
        assert_eq!((g.len(), g.to_vec(), g.row(0, 2)), (2, vec![1.0, 2.0], &[1.0, 2.0][..]));
    }

    #[test]
    fn counts_plan_and_noise_order() {
        let (l, d, steps) = (3, 2, 2);
        let mut toy = Toy { d, ..Default::default() };
        let req = request(&[1, 2, 3], 3.0, steps, 2);
        let (tokens, stats) = run(&mut toy, &req, l);
        // Two batches (2 + 1 images), doubled under CFG.
        assert_eq!(toy.starts, vec![4, 2]);
        assert_eq!((stats.batches, stats.images, stats.tokens, stats.max_ar_rows), (2, 3, 9, 4));
        let t = &stats.timing;
        assert_eq!((t.prefill_calls, t.ar_step_calls, t.head_calls), (2, 4, 2 * l * (steps + 1)));
        assert_eq!((t.images, t.batch, t.batches, t.num_tokens, t.tokens_timed), (3, 2, 2, 3, 3));
        assert_eq!(stats.head_rows, (4 + 2) * l * (steps + 1));
        // Every token is on the sphere.
        for tok in tokens.chunks(d) {
            let n = tok.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((n - 2.0).abs() < 1e-5, "{n}");
        }
        // Token 0 under CFG: 2 noise rows per image, unguided, each half keeps its own token (fed as is);
        // token 1 on: guided, the one token goes to both halves.
        let (tok1, fed1) = &toy.steps[0];
        assert_eq!(*tok1, 1);
        assert_eq!(&fed1[..d], &tokens[..d], "image 0's token 0 is its conditional row");
        assert_ne!(&fed1[..d], &fed1[2 * d..3 * d], "each CFG half keeps its own token 0");
        let (_, fed2) = &toy.steps[1];
        assert_eq!(&fed2[..2 * d], &fed2[2 * d..], "a guided token goes to both halves");
        assert_eq!(&fed2[..d], &tokens[d..2 * d]);
        // The start noise of batch 1 is image 2's stream, whatever the batch split.
        let mut noise = BatchNoise::new(5, 2, 1);
        let mut x0 = vec![0.0; 2 * d];
        noise.draw(&mut x0, d, 2).unwrap();
        let first_call_of_batch_1 = &toy.velocity_inputs[l * (steps + 1)];
        assert_eq!(first_call_of_batch_1, &x0);
        // Batch size does not change the result (the toy is row-independent).
        let mut toy1 = Toy { d, ..Default::default() };
        assert_eq!(run(&mut toy1, &request(&[1, 2, 3], 3.0, steps, 1), l).0, tokens);
    }

    #[test]
    fn limits_cancellation_and_non_finite() {
        let (l, d) = (4, 2);
        let mut toy = Toy { d, ..Default::default() };
        let req = SampleRequest { token_limit: Some(2), ..request(&[1, 2], 1.0, 1, 2) };
        let (tokens, stats) = run(&mut toy, &req, l);
        assert_eq!(toy.starts, vec![2], "no doubling at cfg 1");
        assert_eq!((stats.tokens, stats.timing.tokens_timed, stats.timing.ar_step_calls), (4, 2, 1));
        assert!(tokens[2 * d..4 * d].iter().all(|&v| v == 0.0), "tokens past the limit stay zero");

        let mut seen = Vec::new();
        let mut toy = Toy { d, ..Default::default() };
        let r = sample_request(&mut toy, &shape(l, d), &request(&[1, 2], 2.0, 1, 1), 1, |p| {
            seen.push((p.images, p.token, p.batch_done()));
            if p.token == 1 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert!(r.is_break());
        assert_eq!(seen, vec![(1, 0, false), (1, 1, false)]);

        let mut toy = Toy { d, poison_at: Some(2), ..Default::default() };
        let e = sample_request(&mut toy, &shape(l, d), &request(&[1, 2, 3], 2.0, 1, 2), 2, |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("ar_step produced non-finite values (condition) at token 2 of images 0..2"), "{e}");
    }

    #[test]
    fn projection_only_with_a_radius() {
        // The same request with and without a radius: identical up to the projection of every token.
        let (l, d) = (3, 2);
        let req = request(&[1, 2], 3.0, 2, 2);
        let mut toy = Toy { d, ..Default::default() };
        let (on, _) = run(&mut toy, &req, l);
        let mut toy = Toy { d, ..Default::default() };
        let free = match sample_request(&mut toy, &LoopShape { radius: None, ..shape(l, d) }, &req, 2, |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
        {
            ControlFlow::Continue((t, _)) => t,
            ControlFlow::Break(()) => panic!("not cancelled"),
        };
        let norms: Vec<f32> = free.chunks(d).map(|t| t.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
        assert!(norms.iter().any(|n| (n - 2.0).abs() > 0.1), "unprojected tokens all of norm 2: {norms:?}");
        // Token 0 of each image is sampled before anything is fed back: the projection is the only difference.
        for j in 0..2 {
            let row = &free[j * l * d..j * l * d + d];
            assert_eq!(project(row, 2.0).unwrap(), on[j * l * d..j * l * d + d].to_vec());
        }
    }

    #[test]
    fn token_head_matches_the_update_rules() {
        // One image, guided token: x_0 from the stream, v guided, EM step then the Euler step, projection.
        let (d, l) = (3, 8);
        let grid = em_time_grid(1).unwrap();
        let plan = token_plan(3.0, 2, l);
        let mut head = TokenHead::new(1, d);
        let mut noise = BatchNoise::new(1, 4, 1);
        head.begin(plan, 1, &mut noise).unwrap();
        let mut want_noise = BatchNoise::new(1, 4, 1);
        let mut x = vec![0.0; d];
        want_noise.draw(&mut x, d, 1).unwrap();
        assert_eq!(head.x(), &x[..]);
        assert_eq!(head.feed().len(), 2 * d);
        let raw = [0.1f32, 0.2, 0.3, -0.1, 0.0, 0.4];
        let mut v = vec![0.0; d];
        guide(&raw[..d], &raw[d..], plan.guidance, &mut v).unwrap();
        let mut eps = vec![0.0; d];
        want_noise.draw(&mut eps, d, 1).unwrap();
        head.advance(&grid, 0, &raw, &mut noise).unwrap();
        em_update(&mut x, &v, &eps, 0.0, grid.dt, grid.noise_scales[0]).unwrap();
        assert_eq!(head.x(), &x[..]);
        head.advance(&grid, 1, &raw, &mut noise).unwrap();
        euler_update(&mut x, &v, grid.last_dt).unwrap();
        assert_eq!(head.x(), &x[..]);
        assert!(head.finish(Some(4.0)).unwrap());
        project_rows(&mut x, d, 4.0).unwrap();
        assert_eq!(head.x(), &x[..]);
        assert!(head.advance(&grid, 2, &raw, &mut noise).is_err(), "only steps + 1 calls");
        assert!(head.advance(&grid, 0, &raw[..d], &mut noise).is_err(), "guided needs both halves");
        assert_eq!((head_call_time(&grid, 0), head_call_time(&grid, 1)), (0.0, grid.last_t));
        // A non-finite x is reported and left as it is.
        head.begin(token_plan(1.0, 0, l), 1, &mut noise).unwrap();
        head.advance(&grid, 1, &[f32::NAN; 3], &mut noise).unwrap();
        assert!(!head.finish(Some(4.0)).unwrap());
        assert!(head.x().iter().all(|v| v.is_nan()));
        assert!(head.begin(token_plan(3.0, 0, l), 2, &mut noise).is_err(), "2 images in buffers for 1");
    }
}
