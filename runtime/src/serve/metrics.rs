//! Counters, gauges and histograms of the server, rendered as Prometheus text (exposition format 0.0.4)
//! by `GET /metrics`. Written by the engine thread and the HTTP handlers, read by the scrape; all atomics
//! or short mutexes, nothing blocks the engine.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0];

/// Window of the tokens/s and images/s gauges.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    inner: Mutex<HistInner>,
}

#[derive(Debug, Default, Clone)]
struct HistInner {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { inner: Mutex::new(HistInner { counts: vec![0; LATENCY_BUCKETS.len()], ..Default::default() }) }
    }
}

impl Histogram {
    pub fn observe(&self, v: f64) {
        if let Ok(mut h) = self.inner.lock() {
            if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| v <= b) {
                h.counts[i] += 1;
            }
            h.sum += v;
            h.count += 1;
        }
    }

    fn snapshot(&self) -> HistInner {
        self.inner.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.snapshot().count
    }

    /// (sum, count) of the observations.
    pub fn sum_count(&self) -> (f64, u64) {
        let s = self.snapshot();
        (s.sum, s.count)
    }
}

/// Everything `/metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    pub started: Instant,
    pub max_rows: usize,
    /// Gauges mirrored by the engine after every iteration.
    pub active_rows: AtomicUsize,
    pub active_images: AtomicUsize,
    pub waiting_images: AtomicUsize,
    /// Counters.
    pub tokens: AtomicU64,
    pub images: AtomicU64,
    pub ar_steps: AtomicU64,
    pub ar_rows: AtomicU64,
    pub prefills: AtomicU64,
    pub head_calls: AtomicU64,
    pub head_rows: AtomicU64,
    pub decoder_calls: AtomicU64,
    /// KV rows moved to keep the active rows contiguous.
    pub row_moves: AtomicU64,
    /// Requests whose client went away before the answer.
    pub cancelled: AtomicU64,
    /// Answers by HTTP status (engine answers and the handlers' own 400/429/503).
    statuses: Mutex<BTreeMap<u16, u64>>,
    /// Request latency (arrival → answer, successful requests), per-image time to first token and queue wait.
    pub latency: Histogram,
    pub ttft: Histogram,
    pub queue_wait: Histogram,
    /// Wall time of one engine token step (AR + head + decode of the images that finished).
    pub step_seconds: Histogram,
    /// (time, tokens, images) samples for the rate gauges.
    window: Mutex<VecDeque<(Instant, u64, u64)>>,
}

impl Metrics {
    pub fn new(max_rows: usize) -> Self {
        Metrics {
            started: Instant::now(),
            max_rows,
            active_rows: AtomicUsize::new(0),
            active_images: AtomicUsize::new(0),
            waiting_images: AtomicUsize::new(0),
            tokens: AtomicU64::new(0),
            images: AtomicU64::new(0),
            ar_steps: AtomicU64::new(0),
            ar_rows: AtomicU64::new(0),
            prefills: AtomicU64::new(0),
            head_calls: AtomicU64::new(0),
            head_rows: AtomicU64::new(0),
            decoder_calls: AtomicU64::new(0),
            row_moves: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            statuses: Mutex::new(BTreeMap::new()),
            latency: Histogram::default(),
            ttft: Histogram::default(),
            queue_wait: Histogram::default(),
            step_seconds: Histogram::default(),
            window: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts one answer with HTTP status `code`.
    pub fn count_status(&self, code: u16) {
        if let Ok(mut s) = self.statuses.lock() {
            *s.entry(code).or_insert(0) += 1;
        }
    }

    /// (sum, count) of the request latency histogram.
    pub fn latency_sum_count(&self) -> (f64, u64) {
        self.latency.sum_count()
    }

    /// Answers with status `code` so far.
    pub fn status_count(&self, code: u16) -> u64 {
        self.statuses.lock().map(|s| s.get(&code).copied().unwrap_or(0)).unwrap_or(0)
    }

    /// (tokens/s, images/s) over about the last [`RATE_WINDOW`]: from the newest sample at least that old
    /// (or the oldest one, or the start of the server) to now.
    fn rates(&self) -> (f64, f64) {
        self.sample();
        let now = Instant::now();
        let (tokens, images) = (self.tokens.load(Ordering::Relaxed), self.images.load(Ordering::Relaxed));
        let front = self.window.lock().ok().and_then(|w| w.front().copied());
        let (t0, k0, i0) = match front {
            Some(f) if now.duration_since(f.0) >= Duration::from_millis(500) => f,
            _ => (self.started, 0, 0),
        };
        let dt = now.duration_since(t0).as_secs_f64().max(1e-3);
        (tokens.saturating_sub(k0) as f64 / dt, images.saturating_sub(i0) as f64 / dt)
    }

    /// Records a rate sample (at most every 250 ms; the engine calls it every step, scrapes too).
    pub fn sample(&self) {
        let now = Instant::now();
        if let Ok(mut w) = self.window.lock() {
            if w.back().is_none_or(|b| now.duration_since(b.0) >= Duration::from_millis(250)) {
                w.push_back((now, self.tokens.load(Ordering::Relaxed), self.images.load(Ordering::Relaxed)));
            }
            // Keep the newest sample that is at least RATE_WINDOW old as the front.
            while w.len() >= 2 && w.get(1).is_some_and(|s| now.duration_since(s.0) >= RATE_WINDOW) {
                w.pop_front();
            }
        }
    }

    /// The Prometheus text of every series; `queued` is the request queue length.
    pub fn render(&self, queued: usize, ready: bool) -> String {
        let mut s = String::new();
        let gauge = |s: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", fmt(v));
        };
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let (tps, ips) = self.rates();
        gauge(
            &mut s,
            "spherear_up",
            "1 while the engine is running and accepting requests.",
            if ready { 1.0 } else { 0.0 },
        );
        gauge(
            &mut s,
            "spherear_queue_length",
            "Requests waiting for KV slots (not all images admitted yet).",
            queued as f64,
        );
        gauge(
            &mut s,
            "spherear_queue_images",
            "Images of waiting requests not admitted yet.",
            self.waiting_images.load(Ordering::Relaxed) as f64,
        );
        gauge(
            &mut s,
            "spherear_active_rows",
            "KV slot rows in use (CFG images use two).",
            self.active_rows.load(Ordering::Relaxed) as f64,
        );
        gauge(
            &mut s,
            "spherear_active_images",
            "Images being sampled.",
            self.active_images.load(Ordering::Relaxed) as f64,
        );
        gauge(&mut s, "spherear_max_rows", "KV slot rows of the pool (--max-batch).", self.max_rows as f64);
        gauge(&mut s, "spherear_tokens_per_second", "Tokens sampled per second over the last 10 s.", tps);
        gauge(&mut s, "spherear_images_per_second", "Images finished per second over the last 10 s.", ips);
        counter(&mut s, "spherear_tokens_total", "Tokens sampled.", self.tokens.load(Ordering::Relaxed));
        counter(&mut s, "spherear_images_total", "Images sampled and decoded.", self.images.load(Ordering::Relaxed));
        counter(&mut s, "spherear_ar_steps_total", "ar_step calls.", self.ar_steps.load(Ordering::Relaxed));
        counter(
            &mut s,
            "spherear_ar_step_rows_total",
            "Rows over all ar_step calls.",
            self.ar_rows.load(Ordering::Relaxed),
        );
        counter(&mut s, "spherear_prefills_total", "ar_prefill calls.", self.prefills.load(Ordering::Relaxed));
        counter(&mut s, "spherear_head_calls_total", "head_step calls.", self.head_calls.load(Ordering::Relaxed));
        counter(
            &mut s,
            "spherear_head_rows_total",
            "Rows over all head_step calls.",
            self.head_rows.load(Ordering::Relaxed),
        );
        counter(&mut s, "spherear_decoder_calls_total", "decoder calls.", self.decoder_calls.load(Ordering::Relaxed));
        counter(
            &mut s,
            "spherear_kv_row_moves_total",
            "KV rows moved into holes left by finished requests (active rows stay contiguous).",
            self.row_moves.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "spherear_requests_cancelled_total",
            "Requests whose client disconnected before the answer (their slots were freed).",
            self.cancelled.load(Ordering::Relaxed),
        );
        let _ = writeln!(s, "# HELP spherear_requests_total Answered requests by HTTP status.");
        let _ = writeln!(s, "# TYPE spherear_requests_total counter");
        let statuses = self.statuses.lock().map(|m| m.clone()).unwrap_or_default();
        for code in [200u16, 400, 429, 500, 503, 504] {
            let _ =
                writeln!(s, "spherear_requests_total{{code=\"{code}\"}} {}", statuses.get(&code).copied().unwrap_or(0));
        }
        for (code, n) in statuses.iter().filter(|(c, _)| ![200, 400, 429, 500, 503, 504].contains(*c)) {
            let _ = writeln!(s, "spherear_requests_total{{code=\"{code}\"}} {n}");
        }
        for (name, help, h) in [
            ("spherear_request_latency_seconds", "Arrival to answer of successful requests.", &self.latency),
            ("spherear_time_to_first_token_seconds", "Arrival to the image's first token, per image.", &self.ttft),
            (
                "spherear_queue_wait_seconds",
                "Arrival to the image's admission into a KV slot, per image.",
                &self.queue_wait,
            ),
            ("spherear_step_seconds", "Wall time of one engine token step.", &self.step_seconds),
        ] {
            let snap = h.snapshot();
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
            let mut cum = 0;
            for (b, c) in LATENCY_BUCKETS.iter().zip(&snap.counts) {
                cum += c;
                let _ = writeln!(s, "{name}_bucket{{le=\"{}\"}} {cum}", fmt(*b));
            }
            let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {}", snap.count);
            let _ = writeln!(s, "{name}_sum {}", fmt(snap.sum));
            let _ = writeln!(s, "{name}_count {}", snap.count);
        }
        s
    }
}

/// A sample value as Prometheus writes it (finite; no exponent surprises for small integers).
fn fmt(v: f64) -> String {
    if !v.is_finite() {
        return "0".into();
    }
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_text_is_well_formed() {
        let m = Metrics::new(8);
        m.latency.observe(0.003);
        m.latency.observe(0.3);
        m.latency.observe(1000.0);
        m.count_status(200);
        m.count_status(429);
        let text = m.render(2, true);
        assert!(text.contains("spherear_request_latency_seconds_bucket{le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("spherear_request_latency_seconds_bucket{le=\"0.5\"} 2\n"));
        assert!(text.contains("spherear_request_latency_seconds_bucket{le=\"600\"} 2\n"));
        assert!(text.contains("spherear_request_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("spherear_request_latency_seconds_count 3\n"));
        assert!(text.contains("spherear_queue_length 2\n"));
        assert!(text.contains("spherear_requests_total{code=\"429\"} 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }
}
