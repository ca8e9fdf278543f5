//! `bench serve`: a bounded open-loop load generator for `runtime serve` on loopback.
//!
//! The server runs in this process (one [`Generator`] loaded once, one [`Server`] per scheduler on a free
//! loopback port); the load runs over real HTTP connections. For each offered load λ (requests/s) and each
//! scheduler (`continuous`, `static`, alternating, a fresh server for each), requests arrive as a Poisson
//! process (exponential gaps from a seeded generator, so both schedulers see the same arrival times), at
//! most `--requests` of them and none after `--duration-s`; each is one `POST /v1/images` on its own
//! connection. Reported per setting:
//! completed requests, throughput (requests/s, images/s, tokens/s over first send → last answer),
//! end-to-end latency p50/p95/p99 as the client sees it, and time to first token p50/p95/p99 as the
//! server reports it (arrival → the request's first token). Everything stops by itself: arrivals are
//! bounded in count and time, each request has a client timeout, and the server is shut down at the end.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use quality::report::{markdown_table, write_line_chart, LineChart, Series};
use runtime::serve::client;
use runtime::serve::{Scheduler, ServeConfig, Server};
use runtime::{Generator, GeneratorOptions};
use serde::Serialize;
use serde_json::json;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ServeBenchOptions {
    pub model: PathBuf,
    /// Offered loads in requests/s; empty: derived from a measured capacity (see [`run`]).
    pub rates: Vec<f64>,
    /// Requests per setting at most.
    pub requests: usize,
    /// Seconds of arrivals per setting at most.
    pub duration_s: f64,
    pub max_batch: usize,
    pub steps: usize,
    pub cfg: f32,
    /// Images per request.
    pub n: usize,
    pub schedulers: Vec<Scheduler>,
    /// Server deadline per request (s).
    pub timeout_s: f64,
    pub threads: Option<usize>,
    pub ort_lib: Option<PathBuf>,
    pub seed: u64,
    pub out: PathBuf,
}

/// One (scheduler, offered load) setting.
#[derive(Debug, Clone, Serialize)]
pub struct RateRow {
    pub scheduler: String,
    pub offered_rps: f64,
    /// The realized arrival rate of the sampled Poisson process (requests − 1 over the last arrival time).
    pub arrival_rps: f64,
    pub sent: usize,
    pub ok: usize,
    /// Answers other than 200 and transport errors.
    pub failed: usize,
    pub wall_s: f64,
    pub throughput_rps: f64,
    pub images_per_s: f64,
    pub tokens_per_s: f64,
    pub latency_p50_s: f64,
    pub latency_p95_s: f64,
    pub latency_p99_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p95_s: f64,
    pub ttft_p99_s: f64,
    pub queue_wait_p50_s: f64,
    /// Engine token steps of this setting, their mean wall time, and the mean active rows per `ar_step`.
    pub engine_steps: u64,
    pub mean_step_ms: f64,
    pub mean_ar_rows: f64,
    /// `ar_prefill` and decoder calls of this setting.
    pub prefill_calls: u64,
    pub decoder_calls: u64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct ServeReport {
    pub model: String,
    pub max_batch: usize,
    pub steps: usize,
    pub cfg: f32,
    pub n: usize,
    pub num_tokens: usize,
    /// Measured capacity used to derive the rates (requests/s), when `--rates` was not given.
    pub capacity_rps: Option<f64>,
    pub rows: Vec<RateRow>,
}

/// One answered request.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ok: bool,
    sent: Instant,
    done: Instant,
    ttft_s: f64,
    queue_wait_s: f64,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// SplitMix64: the arrival process's generator (seeded, so every scheduler sees the same arrivals).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Poisson arrival offsets (s) at `rate` requests/s: at most `count`, none after `duration_s`.
pub fn arrivals(rate: f64, count: usize, duration_s: f64, seed: u64) -> Vec<f64> {
    let mut state = seed ^ rate.to_bits();
    let mut t = 0.0;
    let mut out = Vec::new();
    while out.len() < count {
        let u = ((splitmix(&mut state) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        t += -u.ln() / rate;
        if t > duration_s {
            break;
        }
        out.push(t);
    }
    out
}

struct Load<'a> {
    server: &'a Server,
    o: &'a ServeBenchOptions,
    classes: usize,
}

impl Load<'_> {
    fn body(&self, i: usize) -> serde_json::Value {
        json!({
            "class": i % self.classes, "cfg": self.o.cfg, "steps": self.o.steps,
            "seed": self.o.seed.wrapping_add(i as u64), "n": self.o.n,
        })
    }

    /// Sends one request per offset (from its own thread, at its time) and collects the answers.
    fn fire(&self, offsets: &[f64]) -> Vec<Sample> {
        let addr = self.server.addr();
        let timeout = Duration::from_secs_f64(self.o.timeout_s + 30.0);
        let start = Instant::now() + Duration::from_millis(20);
        let mut handles: Vec<JoinHandle<Sample>> = Vec::with_capacity(offsets.len());
        for (i, &t) in offsets.iter().enumerate() {
            let at = start + Duration::from_secs_f64(t);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let body = self.body(i);
            handles.push(std::thread::spawn(move || {
                let sent = Instant::now();
                let r = client::post_json(addr, "/v1/images", &body, "application/json", timeout);
                let done = Instant::now();
                let mut s = Sample { ok: false, sent, done, ttft_s: f64::NAN, queue_wait_s: f64::NAN };
                if let Ok(r) = r {
                    if r.status == 200 {
                        if let Ok(v) = r.json() {
                            let imgs = v["images"].as_array().cloned().unwrap_or_default();
                            let min =
                                |k: &str| imgs.iter().filter_map(|i| i[k].as_f64()).fold(f64::INFINITY, f64::min) / 1e3;
                            s = Sample { ok: true, ttft_s: min("ttft_ms"), queue_wait_s: min("queue_wait_ms"), ..s };
                        }
                    }
                }
                s
            }));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or(Sample {
                    ok: false,
                    sent: start,
                    done: Instant::now(),
                    ttft_s: f64::NAN,
                    queue_wait_s: f64::NAN,
                })
            })
            .collect()
    }
}

fn summarize(scheduler: Scheduler, rate: f64, samples: &[Sample], n: usize, tokens: usize) -> RateRow {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let first = samples.iter().map(|s| s.sent).min();
    let last = samples.iter().map(|s| s.done).max();
    let wall = match (first, last) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-9),
        _ => f64::NAN,
    };
    let mut lat: Vec<f64> = ok.iter().map(|s| s.done.duration_since(s.sent).as_secs_f64()).collect();
    let mut ttft: Vec<f64> = ok.iter().map(|s| s.ttft_s).filter(|v| v.is_finite()).collect();
    let mut qw: Vec<f64> = ok.iter().map(|s| s.queue_wait_s).filter(|v| v.is_finite()).collect();
    let rps = ok.len() as f64 / wall;
    RateRow {
        scheduler: scheduler.name().into(),
        offered_rps: rate,
        arrival_rps: rate,
        sent: samples.len(),
        ok: ok.len(),
        failed: samples.len() - ok.len(),
        wall_s: wall,
        throughput_rps: rps,
        images_per_s: rps * n as f64,
        tokens_per_s: rps * (n * tokens) as f64,
        latency_p50_s: percentile(&mut lat, 50.0),
        latency_p95_s: percentile(&mut lat, 95.0),
        latency_p99_s: percentile(&mut lat, 99.0),
        ttft_p50_s: percentile(&mut ttft, 50.0),
        ttft_p95_s: percentile(&mut ttft, 95.0),
        ttft_p99_s: percentile(&mut ttft, 99.0),
        queue_wait_p50_s: percentile(&mut qw, 50.0),
        engine_steps: 0,
        mean_step_ms: f64::NAN,
        mean_ar_rows: f64::NAN,
        prefill_calls: 0,
        decoder_calls: 0,
    }
}

/// Engine counters from `/metrics`: step seconds (sum, count), ar_step calls and rows, prefill and decoder
/// calls (zeros when the scrape fails).
fn engine_counters(server: &Server) -> [f64; 6] {
    let names = [
        "spherear_step_seconds_sum",
        "spherear_step_seconds_count",
        "spherear_ar_steps_total",
        "spherear_ar_step_rows_total",
        "spherear_prefills_total",
        "spherear_decoder_calls_total",
    ];
    let mut out = [0.0; 6];
    if let Ok(r) = client::get(server.addr(), "/metrics", Duration::from_secs(5)) {
        for line in r.text().lines() {
            if let Some((k, v)) = line.split_once(' ') {
                if let Some(i) = names.iter().position(|n| *n == k) {
                    out[i] = v.parse().unwrap_or(0.0);
                }
            }
        }
    }
    out
}

/// Waits until the server has no active rows (between settings).
fn wait_idle(server: &Server) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(r) = client::get(server.addr(), "/metrics", Duration::from_secs(5)) {
            let text = r.text();
            let busy = text.lines().any(|l| {
                (l.starts_with("spherear_active_rows ") || l.starts_with("spherear_queue_length "))
                    && !l.ends_with(" 0")
            });
            if !busy {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the benchmark and writes serve.json, serve.md and serve.png into `o.out`.
///
/// Without `rates`, the capacity is measured first (one burst of `max_batch / rows per image` requests
/// against the continuous scheduler: completed requests / time) and the offered loads are 0.25, 0.5,
/// 0.75, 1.0 and 1.25 times it.
pub fn run(o: &ServeBenchOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<ServeReport> {
    anyhow::ensure!(o.requests > 0 && o.duration_s > 0.0, "--requests and --duration-s must be > 0");
    // Arrival times and deadlines become `Duration`s, which cannot hold infinite or absurd seconds.
    anyhow::ensure!(
        o.duration_s <= spherear_core::validate::MAX_SECONDS,
        "--duration-s must be at most 1e6 seconds, got {}",
        o.duration_s
    );
    spherear_core::validate::seconds("--timeout-s", o.timeout_s)?;
    anyhow::ensure!(o.n > 0, "--n must be >= 1");
    anyhow::ensure!(o.rates.iter().all(|r| r.is_finite() && *r > 0.0), "--rates must be positive numbers");
    anyhow::ensure!(!o.schedulers.is_empty(), "give at least one --scheduler");
    spherear_core::fsutil::check_dir_output(&o.out)?;
    let options = GeneratorOptions { threads: o.threads, ort_lib: o.ort_lib.clone(), ..Default::default() };
    let g = Arc::new(Generator::load(&o.model, &options)?);
    let m = g.manifest();
    let (classes, tokens) = (m.num_classes, m.num_tokens);
    let rows_per_image = if o.cfg > 1.0 { 2 } else { 1 };
    let config = |scheduler| ServeConfig {
        host: "127.0.0.1".into(),
        port: 0,
        max_batch: o.max_batch,
        max_queue: 100_000,
        timeout: Duration::from_secs_f64(o.timeout_s),
        max_steps: o.steps.max(1),
        max_n: o.n.max(1),
        scheduler,
    };

    let mut capacity = None;
    let rates = if o.rates.is_empty() {
        let server = Server::start(g.clone(), config(Scheduler::Continuous), false)?;
        let load = Load { server: &server, o, classes };
        load.fire(&[0.0]); // warm-up
        let burst = (o.max_batch / (rows_per_image * o.n)).max(1);
        let samples = load.fire(&vec![0.0; burst]);
        server.shutdown()?;
        let ok = samples.iter().filter(|s| s.ok).count();
        anyhow::ensure!(ok > 0, "every calibration request failed");
        let wall = samples.iter().map(|s| s.done.duration_since(s.sent).as_secs_f64()).fold(0.0, f64::max);
        let cap = ok as f64 / wall;
        progress(&format!("capacity ≈ {cap:.2} requests/s ({burst} concurrent requests in {wall:.2} s)"));
        capacity = Some(cap);
        [0.25, 0.5, 0.75, 1.0, 1.25].iter().map(|f| f * cap).collect()
    } else {
        o.rates.clone()
    };

    // Schedulers alternate at every load (a fresh server each time, the same loaded model), so slow drifts of
    // the machine's background load hit both alike.
    let mut rows = Vec::new();
    for &rate in &rates {
        let offsets = arrivals(rate, o.requests, o.duration_s, o.seed);
        for &sched in &o.schedulers {
            let server = Server::start(g.clone(), config(sched), false)?;
            let load = Load { server: &server, o, classes };
            load.fire(&[0.0, 0.0]); // warm-up: first runs, allocator
            wait_idle(&server);
            let before = engine_counters(&server);
            let samples = load.fire(&offsets);
            let after = engine_counters(&server);
            let mut row = summarize(sched, rate, &samples, o.n, tokens);
            let delta = |k: usize| after[k] - before[k];
            row.engine_steps = delta(1) as u64;
            row.mean_step_ms = 1e3 * delta(0) / delta(1).max(1.0);
            row.mean_ar_rows = delta(3) / delta(2).max(1.0);
            row.prefill_calls = delta(4) as u64;
            row.decoder_calls = delta(5) as u64;
            row.arrival_rps = match offsets.last() {
                Some(&t) if offsets.len() > 1 && t > 0.0 => (offsets.len() - 1) as f64 / t,
                _ => rate,
            };
            progress(&format!(
                "{:<10} {:>7.2} req/s offered ({:.2} arrived): {}/{} ok, {:.2} req/s, p50 {:.2} s, p99 {:.2} s, \
                 TTFT p50 {:.3} s",
                row.scheduler,
                rate,
                row.arrival_rps,
                row.ok,
                row.sent,
                row.throughput_rps,
                row.latency_p50_s,
                row.latency_p99_s,
                row.ttft_p50_s
            ));
            rows.push(row);
            server.shutdown()?;
        }
    }
    let report = ServeReport {
        model: o.model.display().to_string(),
        max_batch: o.max_batch,
        steps: o.steps,
        cfg: o.cfg,
        n: o.n,
        num_tokens: tokens,
        capacity_rps: capacity,
        rows,
    };
    write(&report, o)?;
    Ok(report)
}

/// The markdown table of a report.
pub fn markdown(r: &ServeReport) -> String {
    let mut s = format!(
        "bench serve: {} — {} KV rows, steps {}, cfg {}, n {} per request ({} tokens per image){}\n\n",
        r.model,
        r.max_batch,
        r.steps,
        r.cfg,
        r.n,
        r.num_tokens,
        r.capacity_rps.map(|c| format!("; measured capacity {c:.2} req/s")).unwrap_or_default()
    );
    let f = |v: f64, p: usize| if v.is_finite() { format!("{v:.p$}") } else { "–".into() };
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|x| {
            vec![
                x.scheduler.clone(),
                f(x.offered_rps, 2),
                f(x.arrival_rps, 2),
                format!("{}/{}", x.ok, x.sent),
                f(x.throughput_rps, 2),
                f(x.images_per_s, 2),
                f(x.tokens_per_s, 0),
                f(x.latency_p50_s, 3),
                f(x.latency_p95_s, 3),
                f(x.latency_p99_s, 3),
                f(x.ttft_p50_s, 3),
                f(x.ttft_p95_s, 3),
                f(x.ttft_p99_s, 3),
                format!("{} × {} ms, {} rows", x.engine_steps, f(x.mean_step_ms, 2), f(x.mean_ar_rows, 1)),
                format!("{} / {}", x.prefill_calls, x.decoder_calls),
            ]
        })
        .collect();
    s.push_str(&markdown_table(
        &[
            "scheduler",
            "offered req/s",
            "arrived req/s",
            "ok/sent",
            "req/s",
            "images/s",
            "tokens/s",
            "p50 s",
            "p95 s",
            "p99 s",
            "TTFT p50 s",
            "TTFT p95 s",
            "TTFT p99 s",
            "engine steps × mean, mean rows",
            "prefill / decoder calls",
        ],
        &rows,
    ));
    s
}

fn write(r: &ServeReport, o: &ServeBenchOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&o.out)?;
    let json = serde_json::to_string_pretty(r)?;
    spherear_core::fsutil::write_atomic(&o.out.join("serve.json"), json.as_bytes())?;
    spherear_core::fsutil::write_atomic(&o.out.join("serve.md"), markdown(r).as_bytes())?;
    let mut series = Vec::new();
    for (k, sched) in o.schedulers.iter().enumerate() {
        let pts = |f: fn(&RateRow) -> f64| -> Vec<(f64, f64)> {
            r.rows
                .iter()
                .filter(|x| x.scheduler == sched.name() && f(x).is_finite())
                .map(|x| (x.offered_rps, f(x)))
                .collect()
        };
        series.push(Series { label: format!("{} p50", sched.name()), points: pts(|x| x.latency_p50_s), dashed: false, color: Some(k) });
        series.push(Series { label: format!("{} p99", sched.name()), points: pts(|x| x.latency_p99_s), dashed: true, color: Some(k) });
    }
    let chart = LineChart {
        title: format!(
            "runtime serve: latency vs offered load ({} rows, {} steps, cfg {})",
            r.max_batch, r.steps, r.cfg
        ),
        x_label: "offered load (requests/s)".into(),
        y_label: "end-to-end latency (s)".into(),
        log_x: false,
        log_y: false,
        series,
    };
    write_line_chart(&o.out.join("serve.png"), &chart)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_are_bounded_seeded_and_about_right() {
        let a = arrivals(10.0, 100_000, 1000.0, 3);
        assert_eq!(a, arrivals(10.0, 100_000, 1000.0, 3));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        let rate = a.len() as f64 / a.last().unwrap();
        assert!((rate - 10.0).abs() < 0.3, "{rate}");
        assert_eq!(arrivals(10.0, 5, 1000.0, 3).len(), 5);
        assert!(arrivals(10.0, 1000, 2.0, 3).iter().all(|&t| t <= 2.0));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), 50.0);
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut [3.0], 95.0), 3.0);
        assert!(percentile(&mut [], 50.0).is_nan());
    }

    #[test]
    fn bad_options_are_errors_before_any_work() {
        let ok = ServeBenchOptions {
            model: PathBuf::from("/nonexistent/export"),
            rates: vec![],
            requests: 4,
            duration_s: 2.0,
            max_batch: 4,
            steps: 2,
            cfg: 3.0,
            n: 1,
            schedulers: vec![Scheduler::Continuous],
            timeout_s: 10.0,
            threads: None,
            ort_lib: None,
            seed: 0,
            out: PathBuf::from("/nonexistent/out"),
        };
        // n = 0 divided the measured burst by zero; these seconds do not fit a Duration.
        for (o, want) in [
            (ServeBenchOptions { n: 0, ..ok.clone() }, "--n must be >= 1"),
            (ServeBenchOptions { timeout_s: 1e20, ..ok.clone() }, "--timeout-s must be"),
            (ServeBenchOptions { timeout_s: f64::INFINITY, ..ok.clone() }, "--timeout-s must be"),
            (ServeBenchOptions { duration_s: f64::INFINITY, ..ok.clone() }, "--duration-s must be at most"),
        ] {
            let e = run(&o, |_| {}).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
