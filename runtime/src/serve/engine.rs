//! The serving engine: one thread that owns the AR sessions and a [`Pool`] of KV slots and runs token-level
//! continuous batching over it. Requests arrive through a channel; every iteration of the loop
//!
//! 1. takes new requests off the channel, drops requests whose client went away (the reply channel is
//!    closed) and fails requests past their deadline (504), freeing their rows;
//! 2. **admits** waiting images in arrival order while their rows fit (`--scheduler continuous`: at every
//!    token step; `static`: only when the pool is empty, so a batch starts when the previous one ended);
//! 3. runs **one token step** for every active image: `ar_step` over the rows that already have a token
//!    (each at its own position), `ar_prefill` over the rows admitted now, then the head: Euler–Maruyama
//!    over every image at once, images sorted by their step count so that head call k runs the prefix of
//!    images with at least k steps (each row with its own t);
//! 4. decodes the images that got their last token (one decoder run across all of them), answers the
//!    requests whose images are all done, and compacts the pool.
//!
//! **Same bits as `runtime generate`.** The unit of scheduling is one image. Image k of a request
//! `{class, cfg, steps, seed, n}` draws from noise stream k of `seed` ([`BatchNoise`] of one image starting
//! at k: the stream `--classes class --per-class n --seed seed` gives image k), follows the same
//! [`token_plan`] (token 0 under CFG unguided with two noise rows, each CFG half keeping its own token;
//! later tokens guided with one row fed to both halves), the same [`em_time_grid`] and the same head
//! integration as the core token loop ([`TokenHead`]: guidance, Euler–Maruyama and Euler updates, the
//! non-finite check and the projection) on the same per-row values, through the same graphs.
//! Rows of other images in the same call do not change a row's bits because every graph is row-independent
//! on ONNX Runtime CPU (tested: served images equal CLI images byte for byte under concurrent load).

use std::cmp::Reverse;
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ort::session::Session;
use spherear_core::noise::BatchNoise;
use spherear_core::sampler::{head_call_time, TokenHead};
use spherear_core::schedule::{em_time_grid, token_plan, TimeGrid};
use tokio::sync::oneshot;

use super::pool::Pool;
use super::{ImageOut, ImageParams, Scheduler, ServeError, Shared};
use crate::error::{Result, RuntimeError};
use crate::generator::{all_finite, lock, Generator, Tokens};

/// What a request gets back: its images in order, or why not.
pub type JobResult = std::result::Result<Vec<ImageOut>, ServeError>;

/// A validated request on its way to the engine.
pub struct Job {
    pub params: ImageParams,
    pub arrived: Instant,
    pub deadline: Instant,
    pub reply: oneshot::Sender<JobResult>,
}

/// Messages to the engine thread.
pub enum EngineMsg {
    Job(Job),
    /// Stop admitting requests that have not started (they get 503), finish the running ones, then exit.
    Drain,
}

struct Request {
    params: ImageParams,
    rows_per_image: usize,
    arrived: Instant,
    deadline: Instant,
    reply: Option<oneshot::Sender<JobResult>>,
    grid: Arc<TimeGrid>,
    /// Images admitted so far (images `0 .. admitted`).
    admitted: usize,
    results: Vec<Option<ImageOut>>,
    done: usize,
    /// Still counted in [`Shared::queued`] (not all images admitted yet).
    queued: bool,
}

/// One image being sampled.
struct Image {
    req: u64,
    /// Index within its request = its noise stream.
    k: usize,
    class: i64,
    cfg: f32,
    steps: usize,
    grid: Arc<TimeGrid>,
    noise: BatchNoise,
    /// Pool rows: `rows[0]` conditional, `rows[1]` null class (CFG only; only `rows[..n_rows]` are used).
    rows: [usize; 2],
    n_rows: usize,
    /// Next token to sample.
    token: usize,
    /// [L, d]: the sampled tokens.
    tokens: Vec<f32>,
    /// Head state of the current token (token 0 under CFG has two rows); after the token, what is fed back.
    head: TokenHead,
    head_row: usize,
    admitted: Instant,
    first_token: Option<Instant>,
    /// Failed this step (non-finite values): its request is answered 500 after the step.
    failed: Option<String>,
}

pub(crate) struct Engine {
    g: Arc<Generator>,
    shared: Arc<Shared>,
    scheduler: Scheduler,
    rx: Receiver<EngineMsg>,
    requests: HashMap<u64, Request>,
    /// Requests with images not admitted yet, in arrival order.
    queue: VecDeque<u64>,
    images: Vec<Image>,
    grids: HashMap<usize, Arc<TimeGrid>>,
    next_id: u64,
    draining: bool,
    disconnected: bool,
    /// Answers waiting for [`Engine::flush`].
    outbox: Vec<(oneshot::Sender<JobResult>, JobResult)>,
}

/// The three AR sessions, locked by the engine for its whole life.
struct Sessions<'a> {
    prefill: &'a mut Session,
    step: &'a mut Session,
    head: &'a mut Session,
}

impl Engine {
    pub(crate) fn new(g: Arc<Generator>, shared: Arc<Shared>, scheduler: Scheduler, rx: Receiver<EngineMsg>) -> Self {
        Engine {
            g,
            shared,
            scheduler,
            rx,
            requests: HashMap::new(),
            queue: VecDeque::new(),
            images: Vec::new(),
            grids: HashMap::new(),
            next_id: 0,
            draining: false,
            disconnected: false,
            outbox: Vec::new(),
        }
    }

    /// Runs until drained (or the channel closes) and no image is left. Errors only when the sessions or
    /// the pool cannot be set up; errors of a step are answered to the requests concerned (500).
    /// `up` gets `Ok` once the sessions are locked and the pool is allocated, or the reason why not.
    pub(crate) fn run(mut self, up: SyncSender<std::result::Result<(), String>>) -> Result<()> {
        let g = self.g.clone();
        let setup = (|| {
            let prefill = lock(&g.prefill, "ar_prefill")?;
            let step = lock(&g.step, "ar_step")?;
            let head = lock(&g.head, "head_step")?;
            let pool = Pool::new(g.manifest(), &prefill, &step, &head, self.shared.config.max_batch)?;
            Ok::<_, RuntimeError>((prefill, step, head, pool))
        })();
        let (mut prefill, mut step, mut head, mut pool) = match setup {
            Ok(v) => v,
            Err(e) => {
                let _ = up.send(Err(e.to_string()));
                return Err(e);
            }
        };
        let mut s = Sessions { prefill: &mut prefill, step: &mut step, head: &mut head };
        self.shared.ready.store(true, Ordering::SeqCst);
        let _ = up.send(Ok(()));
        loop {
            let idle = self.images.is_empty() && self.queue.is_empty();
            if idle && (self.draining || self.disconnected) {
                break;
            }
            self.receive(idle);
            self.expire(&mut pool);
            self.admit(&mut pool);
            self.publish(&pool);
            self.flush();
            if self.images.is_empty() {
                continue;
            }
            let outcome = catch_unwind(AssertUnwindSafe(|| self.step(&mut s, &mut pool)));
            let err = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(crate::error::one_line(&e.to_string())),
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown".into());
                    Some(format!("internal error (engine panic: {})", crate::error::one_line(&what)))
                }
            };
            if let Some(reason) = err {
                tracing::error!("engine step failed: {reason}");
                self.fail_active(&mut pool, &reason);
            }
            self.publish(&pool);
            self.flush();
        }
        self.shared.ready.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Takes messages off the channel; blocks (briefly) only when there is nothing to do.
    fn receive(&mut self, idle: bool) {
        if idle {
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(msg) => self.accept(msg),
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => {
                    self.disconnected = true;
                    return;
                }
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(msg) => self.accept(msg),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.disconnected = true;
                    break;
                }
            }
        }
    }

    fn accept(&mut self, msg: EngineMsg) {
        match msg {
            EngineMsg::Drain => {
                self.draining = true;
                // Requests that have not started get 503; started ones finish.
                let waiting: Vec<u64> = self
                    .queue
                    .iter()
                    .copied()
                    .filter(|id| self.requests.get(id).is_some_and(|r| r.admitted == 0))
                    .collect();
                for id in waiting {
                    self.answer(id, Err(ServeError::ShuttingDown));
                }
            }
            EngineMsg::Job(job) => {
                let Job { params, arrived, deadline, reply } = job;
                if self.draining {
                    self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                    let _ = reply.send(Err(ServeError::ShuttingDown));
                    return;
                }
                let grid = match self.grid(params.steps) {
                    Ok(g) => g,
                    Err(e) => {
                        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                        let _ = reply.send(Err(ServeError::Invalid(e.to_string())));
                        return;
                    }
                };
                let id = self.next_id;
                self.next_id += 1;
                let rows_per_image =
                    if token_plan(params.cfg, 0, self.g.manifest().num_tokens).doubled_batch { 2 } else { 1 };
                self.requests.insert(
                    id,
                    Request {
                        params,
                        rows_per_image,
                        arrived,
                        deadline,
                        reply: Some(reply),
                        grid,
                        admitted: 0,
                        results: (0..params.n).map(|_| None).collect(),
                        done: 0,
                        queued: true,
                    },
                );
                self.queue.push_back(id);
            }
        }
    }

    fn grid(&mut self, steps: usize) -> Result<Arc<TimeGrid>> {
        if let Some(g) = self.grids.get(&steps) {
            return Ok(g.clone());
        }
        let g = Arc::new(em_time_grid(steps)?);
        self.grids.insert(steps, g.clone());
        Ok(g)
    }

    /// Drops requests whose client went away and fails those past their deadline; frees their rows.
    fn expire(&mut self, pool: &mut Pool) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (&id, r) in &self.requests {
            if r.reply.as_ref().is_none_or(|tx| tx.is_closed()) {
                gone.push((id, None));
            } else if now >= r.deadline {
                let secs = r.deadline.duration_since(r.arrived).as_secs_f64();
                let msg = format!(
                    "request timed out after {secs:.1} s (--timeout-s) with {} of {} images done",
                    r.done, r.params.n
                );
                gone.push((id, Some(ServeError::Timeout(msg))));
            }
        }
        if gone.is_empty() {
            return;
        }
        for (id, err) in gone {
            match err {
                None => {
                    self.shared.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                    self.remove_request(id);
                }
                Some(e) => self.answer(id, Err(e)),
            }
        }
        self.compact(pool);
    }

    /// Admits waiting images in arrival order while their rows fit.
    fn admit(&mut self, pool: &mut Pool) {
        if self.scheduler == Scheduler::Static && pool.active > 0 {
            return;
        }
        let m = self.g.manifest();
        let (l, d) = (m.num_tokens, m.latent_dim);
        let now = Instant::now();
        while let Some(&id) = self.queue.front() {
            let Some(r) = self.requests.get_mut(&id) else {
                self.queue.pop_front();
                continue;
            };
            if self.draining && r.admitted == 0 {
                // Not started before the shutdown began (normally answered at the Drain message already).
                self.answer(id, Err(ServeError::ShuttingDown));
                continue;
            }
            while r.admitted < r.params.n && pool.active + r.rows_per_image <= pool.cap {
                let k = r.admitted;
                let first = pool.active;
                pool.active += r.rows_per_image;
                r.admitted += 1;
                self.images.push(Image {
                    req: id,
                    k,
                    class: r.params.class,
                    cfg: r.params.cfg,
                    steps: r.params.steps,
                    grid: r.grid.clone(),
                    noise: BatchNoise::new(r.params.seed, k as u64, 1),
                    rows: [first, first + r.rows_per_image - 1],
                    n_rows: r.rows_per_image,
                    token: 0,
                    tokens: vec![0.0; l * d],
                    head: TokenHead::new(1, d),
                    head_row: 0,
                    admitted: now,
                    first_token: None,
                    failed: None,
                });
                self.shared.metrics.queue_wait.observe(now.duration_since(r.arrived).as_secs_f64());
            }
            if r.admitted < r.params.n {
                break;
            }
            if r.queued {
                r.queued = false;
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            }
            self.queue.pop_front();
        }
    }

    /// Mirrors the engine state into the shared gauges.
    fn publish(&self, pool: &Pool) {
        let m = &self.shared.metrics;
        m.active_rows.store(pool.active, Ordering::Relaxed);
        m.active_images.store(self.images.len(), Ordering::Relaxed);
        let waiting: usize =
            self.queue.iter().filter_map(|id| self.requests.get(id)).map(|r| r.params.n - r.admitted).sum();
        m.waiting_images.store(waiting, Ordering::Relaxed);
    }

    /// Sends the answers of this iteration (after [`Engine::publish`], so that a client that got its answer
    /// reads gauges that already count its rows as free).
    fn flush(&mut self) {
        for (tx, result) in self.outbox.drain(..) {
            if tx.send(result).is_err() {
                self.shared.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Answers request `id` (if its client is still there; sent by [`Engine::flush`]) and removes it with
    /// its images.
    fn answer(&mut self, id: u64, result: JobResult) {
        let Some(r) = self.requests.get_mut(&id) else { return };
        let status = match &result {
            Ok(_) => 200,
            Err(e) => e.status(),
        };
        if status == 200 {
            self.shared.metrics.latency.observe(r.arrived.elapsed().as_secs_f64());
        }
        if let Some(tx) = r.reply.take() {
            self.outbox.push((tx, result));
        }
        self.remove_request(id);
    }

    /// Forgets request `id`: its images leave the pool (call [`Engine::compact`] after).
    fn remove_request(&mut self, id: u64) {
        if let Some(r) = self.requests.remove(&id) {
            if r.queued {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.queue.retain(|&q| q != id);
        self.images.retain(|img| img.req != id);
    }

    /// Moves the last active rows into the holes left by images that went away.
    fn compact(&mut self, pool: &mut Pool) {
        let active: usize = self.images.iter().map(|i| i.n_rows).sum();
        let mut used = vec![false; active];
        for img in &self.images {
            for &r in &img.rows[..img.n_rows] {
                if r < active {
                    used[r] = true;
                }
            }
        }
        let mut holes = (0..active).filter(|&r| !used[r]);
        for img in &mut self.images {
            for j in 0..img.n_rows {
                if img.rows[j] >= active {
                    if let Some(h) = holes.next() {
                        pool.move_row(img.rows[j], h);
                        img.rows[j] = h;
                        self.shared.metrics.row_moves.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        pool.active = active;
    }

    /// After a failed step: every active request gets 500 and the pool starts empty.
    fn fail_active(&mut self, pool: &mut Pool, reason: &str) {
        let mut ids: Vec<u64> = self.images.iter().map(|i| i.req).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.answer(id, Err(ServeError::Engine(reason.to_string())));
        }
        self.images.clear();
        pool.reset();
    }

    /// One token step for every active image (see the module documentation).
    fn step(&mut self, s: &mut Sessions, pool: &mut Pool) -> Result<()> {
        let g = self.g.clone();
        let m = g.manifest();
        let (l, d, dim, cls) = (m.num_tokens, m.latent_dim, pool.dim, m.cls_token_num);
        let t_step = Instant::now();

        // AR: rows of images that already have a token step at their own position; new rows are prefilled.
        let old_rows: usize = self.images.iter().filter(|i| i.token > 0).map(|i| i.n_rows).sum();
        let mut new_rows = 0;
        for img in &self.images {
            if img.token > 0 {
                for j in 0..img.n_rows {
                    let r = img.rows[j];
                    if r >= old_rows {
                        return Err(RuntimeError::Model(format!("internal: row {r} of a running image ≥ {old_rows}")));
                    }
                    // Token 0 under CFG left two rows in x (each half keeps its own); later tokens one, fed
                    // to both halves.
                    pool.token[r * d..(r + 1) * d].copy_from_slice(img.head.feed().row(j, d));
                    pool.position[r] = (cls + img.token - 1) as i64;
                }
            } else {
                new_rows += img.n_rows;
                pool.class_ids[img.rows[0]] = img.class;
                if img.n_rows == 2 {
                    pool.class_ids[img.rows[1]] = m.null_class_id as i64;
                }
            }
        }
        if old_rows + new_rows != pool.active {
            return Err(RuntimeError::Model(format!(
                "internal: {old_rows} running + {new_rows} new rows but {} active",
                pool.active
            )));
        }
        let metrics = &self.shared.metrics;
        if old_rows > 0 {
            pool.run_step(s.step, old_rows)?;
            metrics.ar_steps.fetch_add(1, Ordering::Relaxed);
            metrics.ar_rows.fetch_add(old_rows as u64, Ordering::Relaxed);
        }
        if new_rows > 0 {
            pool.run_prefill(s.prefill, old_rows, new_rows)?;
            metrics.prefills.fetch_add(1, Ordering::Relaxed);
        }
        for img in &mut self.images {
            let ok = img.rows[..img.n_rows].iter().all(|&r| all_finite(&pool.condition[r * dim..(r + 1) * dim]));
            if !ok {
                let graph = if img.token == 0 { "ar_prefill" } else { "ar_step" };
                img.failed = Some(format!(
                    "{graph} produced non-finite values (condition) at token {} of image {}: the export's weights are \
                     corrupt or the model diverged",
                    img.token, img.k
                ));
            }
        }

        // Head: images sorted by steps (descending), each with its head rows; call k runs the prefix of
        // images that have a call k (k < steps: EM step, k == steps: the final Euler step).
        let mut order: Vec<usize> = (0..self.images.len()).filter(|&i| self.images[i].failed.is_none()).collect();
        order.sort_by_key(|&i| Reverse(self.images[i].steps));
        let mut h = 0;
        for &i in &order {
            let img = &mut self.images[i];
            img.head_row = h;
            for j in 0..img.n_rows {
                let r = img.rows[j];
                pool.head_cond[(h + j) * dim..(h + j + 1) * dim]
                    .copy_from_slice(&pool.condition[r * dim..(r + 1) * dim]);
            }
            h += img.n_rows;
            img.head.begin(token_plan(img.cfg, img.token, l), 1, &mut img.noise)?;
        }
        let max_steps = order.first().map(|&i| self.images[i].steps).unwrap_or(0);
        let mut head_calls = 0u64;
        let mut head_rows = 0u64;
        for k in 0..=max_steps {
            let n_images = order.iter().take_while(|&&i| self.images[i].steps >= k).count();
            if n_images == 0 {
                break;
            }
            let last = &self.images[order[n_images - 1]];
            let rows = last.head_row + last.n_rows;
            for &i in &order[..n_images] {
                let img = &self.images[i];
                let t = head_call_time(&img.grid, k);
                let hr = img.head_row;
                let x_t = img.head.feed();
                for j in 0..img.n_rows {
                    pool.head_x[(hr + j) * d..(hr + j + 1) * d].copy_from_slice(x_t.row(j, d));
                    pool.head_t[hr + j] = t;
                }
            }
            pool.run_head(s.head, rows)?;
            head_calls += 1;
            head_rows += rows as u64;
            for &i in &order[..n_images] {
                let img = &mut self.images[i];
                let hr = img.head_row;
                let vel = &pool.head_v[hr * d..(hr + img.n_rows) * d];
                img.head.advance(&img.grid, k, vel, &mut img.noise)?;
            }
        }
        metrics.head_calls.fetch_add(head_calls, Ordering::Relaxed);
        metrics.head_rows.fetch_add(head_rows, Ordering::Relaxed);

        // Tokens: projection (unless the posterior is Gaussian), the image's token is the conditional row; x
        // keeps what is fed back.
        let now = Instant::now();
        let radius = m.token_radius();
        let mut sampled = 0u64;
        let mut finished = Vec::new();
        for &i in &order {
            let img = &mut self.images[i];
            if !img.head.finish(radius)? {
                img.failed = Some(format!(
                    "head_step produced non-finite values (velocity) at token {} of image {}: the export's weights are \
                     corrupt or the model diverged",
                    img.token, img.k
                ));
                continue;
            }
            let i_tok = img.token;
            img.tokens[i_tok * d..(i_tok + 1) * d].copy_from_slice(&img.head.x()[..d]);
            img.token += 1;
            sampled += 1;
            if img.first_token.is_none() {
                img.first_token = Some(now);
                if let Some(r) = self.requests.get(&img.req) {
                    metrics.ttft.observe(now.duration_since(r.arrived).as_secs_f64());
                }
            }
            if img.token == l {
                finished.push(i);
            }
        }
        metrics.tokens.fetch_add(sampled, Ordering::Relaxed);
        metrics.sample();
        metrics.step_seconds.observe(t_step.elapsed().as_secs_f64());

        self.finish_images(finished, pool)
    }

    /// Decodes the finished images in one decoder run, hands them to their requests, answers the requests
    /// that are complete or failed, and compacts the pool.
    fn finish_images(&mut self, finished: Vec<usize>, pool: &mut Pool) -> Result<()> {
        let m = self.g.manifest();
        let (l, d) = (m.num_tokens, m.latent_dim);
        let mut failed: Vec<(u64, String)> =
            self.images.iter().filter_map(|i| i.failed.clone().map(|why| (i.req, why))).collect();
        if !finished.is_empty() {
            let mut data = Vec::with_capacity(finished.len() * l * d);
            for &i in &finished {
                data.extend_from_slice(&self.images[i].tokens);
            }
            let tokens = Tokens { data, n: finished.len(), num_tokens: l, dim: d };
            let per = 3 * m.image_size * m.image_size;
            match self.g.decode(&tokens, finished.len()) {
                Ok(pixels) => {
                    self.shared.metrics.decoder_calls.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    for (j, &i) in finished.iter().enumerate() {
                        let img = &self.images[i];
                        let Some(r) = self.requests.get_mut(&img.req) else { continue };
                        let first = img.first_token.unwrap_or(now);
                        r.results[img.k] = Some(ImageOut {
                            index: img.k,
                            pixels: pixels[j * per..(j + 1) * per].to_vec(),
                            tokens: img.tokens.clone(),
                            queue_wait: img.admitted.duration_since(r.arrived),
                            ttft: first.duration_since(r.arrived),
                            total: now.duration_since(r.arrived),
                        });
                        r.done += 1;
                    }
                    self.shared.metrics.images.fetch_add(finished.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    let why = crate::error::one_line(&e.to_string());
                    failed.extend(finished.iter().map(|&i| (self.images[i].req, why.clone())));
                }
            }
            // Finished images leave the pool.
            let mut keep = vec![true; self.images.len()];
            for &i in &finished {
                keep[i] = false;
            }
            let mut it = keep.into_iter();
            self.images.retain(|_| it.next().unwrap_or(true));
        }
        failed.sort();
        failed.dedup_by(|a, b| a.0 == b.0);
        for (id, why) in failed {
            self.answer(id, Err(ServeError::Engine(why)));
        }
        let complete: Vec<u64> =
            self.requests.iter().filter(|(_, r)| r.done == r.params.n).map(|(&id, _)| id).collect();
        for id in complete {
            let results =
                self.requests.get_mut(&id).map(|r| r.results.drain(..).flatten().collect()).unwrap_or_default();
            self.answer(id, Ok(results));
        }
        self.compact(pool);
        Ok(())
    }
}
