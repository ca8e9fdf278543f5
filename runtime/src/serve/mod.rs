//! `runtime serve`: an HTTP image service with token-level continuous batching.
//!
//! - [`Server`]: loads nothing itself; takes a loaded [`Generator`], starts the engine thread and the HTTP
//!   front end (axum on a small tokio runtime), and stops gracefully (stop accepting, answer waiting
//!   requests 503, finish the running ones, exit).
//! - `engine` (private): the scheduler and the token loop over a pool of KV slots, on its own thread —
//!   ONNX Runtime never runs on a tokio worker. Handlers talk to it through a channel and get their
//!   answer through a oneshot; a dropped oneshot (client gone) frees the request's slots.
//! - `pool` (private): the KV slot pool (active rows contiguous, ORT tensors bound as views over it).
//! - [`metrics`]: the Prometheus text of `GET /metrics`.
//! - [`client`]: a minimal blocking HTTP/1.1 client (tests and `bench serve`).
//!
//! API (see the README): `POST /v1/images` `{"class": 3, "cfg": 3.0, "steps": 10, "seed": 7, "n": 1}` →
//! JSON with base64 PNGs and per-image timing (and the tokens with `"tokens": true`), or with
//! `Accept: image/png` one PNG (n = 1) or a 1 × n PNG grid; `GET /healthz`; `GET /metrics`. Image k of a request is bit-identical to image k of
//! `runtime generate --classes class --per-class n --cfg cfg --steps steps --seed seed`.

pub mod client;
mod engine;
mod http;
pub mod metrics;
mod pool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use spherear_core::schedule::MAX_STEPS;

use crate::error::{Result, RuntimeError};
use crate::generator::Generator;
use crate::provider::Provider;
use engine::{Engine, EngineMsg};
use metrics::Metrics;

/// When waiting images may enter the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Scheduler {
    /// At every token step, as soon as rows are free (continuous / in-flight batching).
    #[default]
    Continuous,
    /// Only when the pool is empty: a batch of up to `max_batch` rows starts when the previous one ended.
    Static,
}

impl Scheduler {
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Continuous => "continuous",
            Scheduler::Static => "static",
        }
    }
}

/// Server settings (the `runtime serve` flags).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    /// 0 picks a free port ([`Server::addr`] tells which).
    pub port: u16,
    /// KV slot rows (CFG images take two).
    pub max_batch: usize,
    /// Requests that may wait for slots; more get 429.
    pub max_queue: usize,
    /// Per-request deadline from arrival; past it the request gets 504 and its slots are freed.
    pub timeout: Duration,
    pub max_steps: usize,
    pub max_n: usize,
    pub scheduler: Scheduler,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            max_batch: 16,
            max_queue: 64,
            timeout: Duration::from_secs(60),
            max_steps: 100,
            max_n: 16,
            scheduler: Scheduler::Continuous,
        }
    }
}

impl ServeConfig {
    /// Checks the settings (before the model is loaded where possible).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(RuntimeError::Invalid(m.to_string()));
        if self.max_batch < 2 {
            return bad("--max-batch must be >= 2 (an image under CFG takes two KV rows)");
        }
        if self.max_queue == 0 {
            return bad("--max-queue must be >= 1");
        }
        if self.timeout.is_zero() {
            return bad("--timeout-s must be > 0");
        }
        if self.max_steps == 0 || self.max_n == 0 {
            return bad("--max-steps and --max-n must be >= 1");
        }
        if self.max_steps > MAX_STEPS {
            return Err(RuntimeError::Invalid(format!(
                "--max-steps must be at most {MAX_STEPS}, got {}",
                self.max_steps
            )));
        }
        Ok(())
    }
}

/// One request's sampling parameters (validated).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageParams {
    pub class: i64,
    pub cfg: f32,
    pub steps: usize,
    pub seed: u64,
    pub n: usize,
}

/// One finished image: pixels [3, H, W] in [−1, 1] and its timing from the request's arrival.
#[derive(Debug, Clone)]
pub struct ImageOut {
    /// Index within the request (= its noise stream).
    pub index: usize,
    pub pixels: Vec<f32>,
    /// The sampled tokens [L, d] (on the radius-R sphere unless the posterior is gaussian).
    pub tokens: Vec<f32>,
    /// Arrival → admission into a KV slot.
    pub queue_wait: Duration,
    /// Arrival → first token sampled.
    pub ttft: Duration,
    /// Arrival → decoded.
    pub total: Duration,
}

/// Why a request got no images; each maps to one HTTP status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    /// 400.
    #[error("{0}")]
    Invalid(String),
    /// 429.
    #[error("the queue is full ({queued} requests waiting, --max-queue {max}); retry after {retry_after_s} s")]
    QueueFull { queued: usize, max: usize, retry_after_s: u64 },
    /// 504.
    #[error("{0}")]
    Timeout(String),
    /// 500: the engine failed on this request (ONNX Runtime error, non-finite values).
    #[error("{0}")]
    Engine(String),
    /// 503.
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl ServeError {
    pub fn status(&self) -> u16 {
        match self {
            ServeError::Invalid(_) => 400,
            ServeError::QueueFull { .. } => 429,
            ServeError::Timeout(_) => 504,
            ServeError::Engine(_) => 500,
            ServeError::ShuttingDown => 503,
        }
    }
}

/// State shared by the engine and the handlers.
pub(crate) struct Shared {
    pub config: ServeConfig,
    pub metrics: Metrics,
    /// Requests not fully admitted (the queue `--max-queue` bounds).
    pub queued: AtomicUsize,
    /// The engine is running.
    pub ready: AtomicBool,
    /// Shutdown began: no new requests.
    pub draining: AtomicBool,
    pub num_classes: usize,
    pub image_size: usize,
    /// Steps of a request that gives none: the manifest's default, capped by `max_steps`.
    pub default_steps: usize,
    /// Guidance scale of a request that gives none: the model's default (`ModelConfig::default_cfg`).
    pub default_cfg: f32,
    pub model: String,
}

/// A running server: engine thread + HTTP thread.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<JoinHandle<Result<()>>>,
}

/// Bytes of the KV pool for `rows` rows of export `g`.
pub fn pool_bytes(g: &Generator, rows: usize) -> Result<u64> {
    Ok(pool::kv_bytes_per_row(g.manifest())? * rows as u64)
}

impl Server {
    /// Starts the engine (allocates the KV pool) and binds `host:port`; returns once both are up. With
    /// `signals`, SIGTERM and SIGINT start a graceful shutdown (the CLI); otherwise only
    /// [`Server::shutdown`] does.
    pub fn start(g: Arc<Generator>, config: ServeConfig, signals: bool) -> Result<Server> {
        config.validate()?;
        let m = g.manifest();
        if g.provider().active == Provider::TensorRt && config.max_batch > m.max_batch {
            return Err(RuntimeError::Invalid(format!(
                "--max-batch {} exceeds the export's TensorRT profile ({} rows); re-export with a larger --max-batch",
                config.max_batch, m.max_batch
            )));
        }
        let bytes = pool_bytes(&g, config.max_batch)?;
        if let Some(avail) = spherear_core::timing::available_memory_bytes() {
            if bytes > avail / 2 {
                return Err(RuntimeError::Invalid(format!(
                    "a KV pool of {} rows needs {:.1} GiB, more than half of the {:.1} GiB available; lower --max-batch",
                    config.max_batch,
                    bytes as f64 / (1u64 << 30) as f64,
                    avail as f64 / (1u64 << 30) as f64
                )));
            }
        }
        let listener = std::net::TcpListener::bind((config.host.as_str(), config.port))
            .map_err(|e| RuntimeError::Io(format!("cannot listen on {}:{}: {e}", config.host, config.port)))?;
        listener.set_nonblocking(true).map_err(|e| RuntimeError::Io(format!("listener: {e}")))?;
        let addr = listener.local_addr().map_err(|e| RuntimeError::Io(format!("listener: {e}")))?;
        let shared = Arc::new(Shared {
            metrics: Metrics::new(config.max_batch),
            queued: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            num_classes: m.num_classes,
            image_size: m.image_size,
            default_steps: m.sampler.default_steps.clamp(1, config.max_steps),
            default_cfg: m.config.default_cfg(),
            model: g.dir().display().to_string(),
            config,
        });

        let (tx, rx) = mpsc::channel::<EngineMsg>();
        let (up_tx, up_rx) = mpsc::sync_channel::<std::result::Result<(), String>>(1);
        let engine = Engine::new(g, shared.clone(), shared.config.scheduler, rx);
        let engine_thread = std::thread::Builder::new()
            .name("serve-engine".into())
            .spawn(move || engine.run(up_tx))
            .map_err(|e| RuntimeError::Io(format!("cannot start the engine thread: {e}")))?;
        match up_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                let _ = engine_thread.join();
                return Err(RuntimeError::Model(why));
            }
            Err(_) => {
                return Err(match engine_thread.join() {
                    Ok(Err(e)) => e,
                    _ => RuntimeError::Model("the engine thread stopped while starting".into()),
                })
            }
        }

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let http = std::thread::Builder::new()
            .name("serve-http".into())
            .spawn(move || http::run(listener, sh, tx, engine_thread, stop_rx, signals))
            .map_err(|e| RuntimeError::Io(format!("cannot start the HTTP thread: {e}")))?;
        Ok(Server { addr, shared, stop: Some(stop_tx), http: Some(http) })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers so far with HTTP status `code` (tests, benchmarks).
    pub fn status_count(&self, code: u16) -> u64 {
        self.shared.metrics.status_count(code)
    }

    /// Graceful shutdown: stop accepting, answer waiting requests 503, finish running ones, join.
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join()
    }

    /// Blocks until the server stops (a signal, with `signals`).
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.http.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(RuntimeError::Model("the HTTP thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.join();
    }
}

/// Marks the server as draining and tells the engine (idempotent).
pub(crate) fn begin_drain(shared: &Shared, tx: &mpsc::Sender<EngineMsg>) {
    if !shared.draining.swap(true, Ordering::SeqCst) {
        let _ = tx.send(EngineMsg::Drain);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_steps_is_bounded_at_startup() {
        assert!(ServeConfig::default().validate().is_ok());
        let e = ServeConfig { max_steps: MAX_STEPS + 1, ..ServeConfig::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("--max-steps must be at most 1000000"), "{e}");
    }
}
