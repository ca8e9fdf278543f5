//! The HTTP front end: axum routes on a small tokio runtime of their own. Handlers only parse, validate,
//! queue and encode; the engine thread does all ONNX Runtime work.

use std::io::Cursor;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use image::{ImageFormat, RgbImage};
use serde::{Deserialize, Serialize};
use spherear_core::grid::to_u8_pixel;
use tokio::sync::oneshot;

use super::engine::{EngineMsg, Job, JobResult};
use super::{begin_drain, ImageOut, ImageParams, ServeError, Shared};
use crate::error::{one_line, Result, RuntimeError};

struct App {
    shared: Arc<Shared>,
    tx: mpsc::Sender<EngineMsg>,
}

/// Serves until stopped (the oneshot, or SIGTERM/SIGINT with `signals`), then drains the engine and joins it.
pub(crate) fn run(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    tx: mpsc::Sender<EngineMsg>,
    engine: JoinHandle<Result<()>>,
    stop: oneshot::Receiver<()>,
    signals: bool,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("serve-http")
        .enable_all()
        .build()
        .map_err(|e| RuntimeError::Io(format!("cannot start the HTTP runtime: {e}")))?;
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = Arc::new(App { shared: shared.clone(), tx: tx.clone() });
        let (sh, tx2) = (shared.clone(), tx.clone());
        let shutdown = async move {
            wait_for_stop(stop, signals).await;
            begin_drain(&sh, &tx2);
        };
        axum::serve(listener, router(app)).with_graceful_shutdown(shutdown).await
    });
    // Every connection is closed; waiting requests were answered 503 and running ones finished.
    begin_drain(&shared, &tx);
    drop(tx);
    rt.shutdown_timeout(Duration::from_secs(1));
    let engine = engine.join().map_err(|_| RuntimeError::Model("the engine thread panicked".into()))?;
    served.map_err(|e| RuntimeError::Io(format!("HTTP server: {e}")))?;
    engine
}

async fn wait_for_stop(stop: oneshot::Receiver<()>, signals: bool) {
    if signals {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            tokio::select! {
                _ = stop => {}
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("shutting down: finishing the running images");
            return;
        }
    }
    let _ = stop.await;
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/images", post(images))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(app)
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the answer: {e}")).into_response(),
    }
}

fn error(status: u16, reason: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &serde_json::json!({ "error": one_line(reason) }))
}

async fn not_found() -> Response {
    error(404, "not found: the API is POST /v1/images, GET /healthz, GET /metrics")
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let s = &app.shared;
    let (status, code) = if s.draining.load(Ordering::SeqCst) {
        ("draining", StatusCode::SERVICE_UNAVAILABLE)
    } else if !s.ready.load(Ordering::SeqCst) {
        ("down", StatusCode::SERVICE_UNAVAILABLE)
    } else {
        ("ok", StatusCode::OK)
    };
    json_response(
        code,
        &serde_json::json!({
            "status": status,
            "model": s.model,
            "classes": s.num_classes,
            "scheduler": s.config.scheduler.name(),
            "max_rows": s.config.max_batch,
            "active_rows": s.metrics.active_rows.load(Ordering::Relaxed),
            "queue_length": s.queued.load(Ordering::SeqCst),
        }),
    )
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let s = &app.shared;
    let up = s.ready.load(Ordering::SeqCst) && !s.draining.load(Ordering::SeqCst);
    let text = s.metrics.render(s.queued.load(Ordering::SeqCst), up);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// The request body of `POST /v1/images`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImagesBody {
    class: i64,
    #[serde(default)]
    cfg: Option<f64>,
    #[serde(default)]
    steps: Option<u64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    n: Option<u64>,
    /// Also return each image's tokens (JSON answers only).
    #[serde(default)]
    tokens: bool,
}


/// Parses and checks a request body; the error is the one-line 400 reason.
fn parse(shared: &Shared, body: &[u8]) -> std::result::Result<(ImageParams, bool), String> {
    let b: ImagesBody = serde_json::from_slice(body).map_err(|e| format!("malformed JSON body: {e}"))?;
    let c = &shared.config;
    if b.class < 0 || b.class as u64 >= shared.num_classes as u64 {
        return Err(format!(
            "class {} is outside 0..{} (the model has {} classes)",
            b.class, shared.num_classes, shared.num_classes
        ));
    }
    // A request that gives no cfg gets the model's default, as `runtime generate` does.
    let cfg = b.cfg.map_or(shared.default_cfg, |v| v as f32);
    if !(cfg.is_finite() && cfg >= 1.0) {
        return Err(format!("cfg must be a finite number >= 1 (1 = no guidance), got {}", b.cfg.unwrap_or(f64::NAN)));
    }
    let steps = b.steps.unwrap_or(shared.default_steps as u64);
    if steps == 0 || steps > c.max_steps as u64 {
        return Err(format!("steps must be in 1..={} (--max-steps), got {steps}", c.max_steps));
    }
    let n = b.n.unwrap_or(1);
    if n == 0 || n > c.max_n as u64 {
        return Err(format!("n must be in 1..={} (--max-n), got {n}", c.max_n));
    }
    Ok((ImageParams { class: b.class, cfg, steps: steps as usize, seed: b.seed.unwrap_or(0), n: n as usize }, b.tokens))
}

/// Whether the client asked for PNG bytes rather than JSON.
fn wants_png(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .any(|v| v == "image/png")
}

async fn images(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let r = images_inner(&app, &headers, &body).await;
    app.shared.metrics.count_status(r.status().as_u16());
    r
}

async fn images_inner(app: &App, headers: &HeaderMap, body: &[u8]) -> Response {
    let s = &app.shared;
    if s.draining.load(Ordering::SeqCst) {
        return error(503, &ServeError::ShuttingDown.to_string());
    }
    let (params, with_tokens) = match parse(s, body) {
        Ok(p) => p,
        Err(why) => return error(400, &why),
    };
    let max = s.config.max_queue;
    if let Err(queued) = s.queued.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| (q < max).then_some(q + 1)) {
        let retry_after_s = retry_after(s);
        let e = ServeError::QueueFull { queued, max, retry_after_s };
        let mut r = error(429, &e.to_string());
        if let Ok(v) = HeaderValue::from_str(&retry_after_s.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let arrived = Instant::now();
    let deadline = arrived + s.config.timeout;
    let (reply, rx) = oneshot::channel::<JobResult>();
    if app.tx.send(EngineMsg::Job(Job { params, arrived, deadline, reply })).is_err() {
        s.queued.fetch_sub(1, Ordering::SeqCst);
        return error(503, "the engine has stopped");
    }
    // The engine answers 504 at the deadline; this is only a backstop. Dropping `rx` (client gone, or
    // this backstop) tells the engine to free the request's slots.
    let answer = match tokio::time::timeout(s.config.timeout + Duration::from_secs(5), rx).await {
        Ok(Ok(a)) => a,
        Ok(Err(_)) => return error(500, "the engine stopped before answering"),
        Err(_) => {
            return error(
                504,
                &format!("request timed out after {:.1} s (--timeout-s)", s.config.timeout.as_secs_f64()),
            )
        }
    };
    let images = match answer {
        Ok(images) => images,
        Err(e) => return error(e.status(), &e.to_string()),
    };
    let size = s.image_size;
    let png = wants_png(headers);
    let encoded = tokio::task::spawn_blocking(move || encode(params, images, size, png, with_tokens)).await;
    match encoded {
        Ok(Ok(r)) => r,
        Ok(Err(why)) => error(500, &why),
        Err(e) => error(500, &format!("encoding task failed: {e}")),
    }
}

/// Seconds a client should wait after a 429: about one request's latency so far (at least 1 s).
fn retry_after(s: &Shared) -> u64 {
    let (sum, count) = s.metrics.latency_sum_count();
    if count == 0 {
        return 1;
    }
    ((sum / count as f64).ceil() as u64).clamp(1, 300)
}

/// One row of `images` ([3, size, size] in [−1, 1] each) as a PNG: the layout and pixels of
/// `runtime generate --per-class n --out grid.png` for one class (and of its per-image PNGs for n = 1).
pub fn encode_png(images: &[&[f32]], size: usize) -> std::result::Result<Vec<u8>, String> {
    let n = images.len();
    let (w, h) = (u32::try_from(n * size).map_err(|_| "grid too wide")?, size as u32);
    let mut canvas = RgbImage::new(w, h);
    let plane = size * size;
    for (j, img) in images.iter().enumerate() {
        if img.len() != 3 * plane {
            return Err(format!("image {j} has {} values, expected 3x{size}x{size}", img.len()));
        }
        for y in 0..size {
            for x in 0..size {
                let k = y * size + x;
                let px = [to_u8_pixel(img[k]), to_u8_pixel(img[plane + k]), to_u8_pixel(img[2 * plane + k])];
                canvas.put_pixel((j * size + x) as u32, y as u32, image::Rgb(px));
            }
        }
    }
    let mut buf = Cursor::new(Vec::new());
    canvas.write_to(&mut buf, ImageFormat::Png).map_err(|e| format!("cannot encode PNG: {e}"))?;
    Ok(buf.into_inner())
}

#[derive(Serialize)]
struct ImageJson {
    index: usize,
    png_base64: String,
    /// f32 little-endian [L, d], only with `"tokens": true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_base64: Option<String>,
    queue_wait_ms: f64,
    ttft_ms: f64,
    total_ms: f64,
}

#[derive(Serialize)]
struct ImagesJson {
    class: i64,
    cfg: f32,
    steps: usize,
    seed: u64,
    n: usize,
    images: Vec<ImageJson>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn encode(
    p: ImageParams,
    images: Vec<ImageOut>,
    size: usize,
    png: bool,
    with_tokens: bool,
) -> std::result::Result<Response, String> {
    if png {
        let views: Vec<&[f32]> = images.iter().map(|i| i.pixels.as_slice()).collect();
        let bytes = encode_png(&views, size)?;
        let max = |f: fn(&ImageOut) -> Duration| images.iter().map(f).max().unwrap_or_default();
        let mut r = Response::new(Body::from(bytes));
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        for (name, d) in [
            ("x-queue-wait-ms", max(|i| i.queue_wait)),
            ("x-ttft-ms", images.iter().map(|i| i.ttft).min().unwrap_or_default()),
            ("x-total-ms", max(|i| i.total)),
        ] {
            if let Ok(v) = HeaderValue::from_str(&ms(d).to_string()) {
                h.insert(name, v);
            }
        }
        return Ok(r);
    }
    let mut out = Vec::with_capacity(images.len());
    for i in &images {
        let bytes = encode_png(&[i.pixels.as_slice()], size)?;
        out.push(ImageJson {
            index: i.index,
            png_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            tokens_base64: with_tokens.then(|| {
                let raw: Vec<u8> = i.tokens.iter().flat_map(|v| v.to_le_bytes()).collect();
                base64::engine::general_purpose::STANDARD.encode(raw)
            }),
            queue_wait_ms: ms(i.queue_wait),
            ttft_ms: ms(i.ttft),
            total_ms: ms(i.total),
        });
    }
    let body = ImagesJson { class: p.class, cfg: p.cfg, steps: p.steps, seed: p.seed, n: p.n, images: out };
    Ok(json_response(StatusCode::OK, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_choice() {
        let mut h = HeaderMap::new();
        assert!(!wants_png(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(!wants_png(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json, IMAGE/PNG;q=0.9"));
        assert!(wants_png(&h));
    }

    #[test]
    fn png_grid_matches_the_cli_grid_canvas() {
        let dir = tempfile::tempdir().unwrap();
        let imgs: Vec<Vec<f32>> = (0..3).map(|j| (0..3 * 4).map(|v| ((v + j) as f32 / 7.0) - 0.8).collect()).collect();
        let mut canvas = spherear_core::grid::GridCanvas::new(3, 2, 3).unwrap();
        for (j, img) in imgs.iter().enumerate() {
            canvas.put(j, img).unwrap();
        }
        canvas.save(&dir.path().join("g.png")).unwrap();
        let views: Vec<&[f32]> = imgs.iter().map(|v| v.as_slice()).collect();
        assert_eq!(encode_png(&views, 2).unwrap(), std::fs::read(dir.path().join("g.png")).unwrap());
        assert!(encode_png(&[&[0.0; 5]], 2).is_err());
    }
}
