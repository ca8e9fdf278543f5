//! `runtime serve` on random `tiny` exports, through the real binary and real sockets on loopback:
//! served images are bit-identical to `runtime generate`'s under concurrent load (PNG bytes and tokens),
//! every error status, client disconnects, SIGTERM draining, /metrics and /healthz.

mod common;
use common::{runtime, set_tensor, tiny_export};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use exporter::checkpoint::Stage;
use exporter::random::write_random;
use exporter::{export, ExportOptions};
use runtime::output::read_tokens;
use runtime::serve::client::{self, HttpResponse};
use serde_json::{json, Value};
use spherear_core::manifest::Attention;
use spherear_core::ModelConfig;

const T: Duration = Duration::from_secs(60);

/// A `runtime serve` child process on a free loopback port.
struct Srv {
    child: Child,
    addr: SocketAddr,
    stderr: Option<JoinHandle<String>>,
}

impl Srv {
    fn start(model: &Path, args: &[&str]) -> Srv {
        let mut child = runtime()
            .args(["serve", "--model"])
            .arg(model)
            .args(["--port", "0", "--threads", "1"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("listening on http://")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse::<SocketAddr>().ok());
        match addr {
            Some(addr) => Srv { child, addr, stderr: Some(stderr) },
            None => {
                let _ = child.kill();
                panic!("no address in {line:?}: {}", stderr.join().unwrap())
            }
        }
    }

    fn post(&self, body: &Value, accept: &str) -> HttpResponse {
        client::post_json(self.addr, "/v1/images", body, accept, T).unwrap()
    }

    fn post_raw(&self, body: &[u8]) -> HttpResponse {
        client::request(self.addr, "POST", "/v1/images", &[("Content-Type", "application/json")], body, T).unwrap()
    }

    /// Posts from a thread; the answer and the instant it arrived come back through the handle.
    fn post_later(&self, body: Value, accept: &'static str) -> JoinHandle<(HttpResponse, Instant)> {
        let addr = self.addr;
        std::thread::spawn(move || {
            let r = client::post_json(addr, "/v1/images", &body, accept, T).unwrap();
            (r, Instant::now())
        })
    }

    fn metrics(&self) -> String {
        let r = client::get(self.addr, "/metrics", T).unwrap();
        assert_eq!(r.status, 200);
        r.text()
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics(), name).unwrap_or_else(|| panic!("no series {name}"))
    }

    /// Polls a metric until `ok` holds (panics after `secs`).
    fn wait_for(&self, name: &str, secs: u64, ok: impl Fn(f64) -> bool) {
        let t0 = Instant::now();
        loop {
            let v = self.metric(name);
            if ok(v) {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(secs), "{name} stayed at {v}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit (panics after 20 s); its exit code and stderr.
    fn exit(mut self) -> (Option<i32>, String) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "server did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        let err = self.stderr.take().map(|h| h.join().unwrap()).unwrap_or_default();
        (status.code(), err)
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value of an unlabelled series (or of `name{labels}` given whole) in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// `runtime generate` of one request into `dir`: grid.png, each/NNNN-classC.png, tokens.safetensors.
fn cli(model: &Path, dir: &Path, class: i64, cfg: f32, steps: usize, seed: u64, n: usize) {
    let out = runtime()
        .args(["generate", "--model"])
        .arg(model)
        .args(["--classes", &class.to_string(), "--per-class", &n.to_string(), "--cfg", &cfg.to_string()])
        .args(["--steps", &steps.to_string(), "--seed", &seed.to_string(), "--threads", "1", "--quiet", "--out"])
        .arg(dir.join("grid.png"))
        .arg("--out-dir")
        .arg(dir.join("each"))
        .arg("--tokens-out")
        .arg(dir.join("tokens.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Checks a served answer against the CLI's files for the same (class, cfg, steps, seed, n).
fn check_against_cli(model: &Path, dir: &Path, req: &Value, r: &HttpResponse) {
    assert_eq!(r.status, 200, "{req}: {}", r.text());
    let (class, cfg, steps, seed, n) = (
        req["class"].as_i64().unwrap(),
        req["cfg"].as_f64().unwrap() as f32,
        req["steps"].as_u64().unwrap() as usize,
        req["seed"].as_u64().unwrap(),
        req["n"].as_u64().unwrap() as usize,
    );
    let d = dir.join(format!("cli-{class}-{cfg}-{steps}-{seed}-{n}"));
    std::fs::create_dir_all(&d).unwrap();
    cli(model, &d, class, cfg, steps, seed, n);
    if r.header("content-type") == Some("image/png") {
        assert_eq!(r.body, std::fs::read(d.join("grid.png")).unwrap(), "{req}: PNG grid differs from the CLI's");
        return;
    }
    let v = r.json().unwrap();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), n);
    let tokens = read_tokens(&d.join("tokens.safetensors")).unwrap();
    let per = tokens.num_tokens * tokens.dim;
    for (k, img) in images.iter().enumerate() {
        assert_eq!(img["index"].as_u64(), Some(k as u64));
        let png = std::fs::read(d.join("each").join(format!("{k:04}-class{class}.png"))).unwrap();
        assert_eq!(b64(img["png_base64"].as_str().unwrap()), png, "{req}: image {k} PNG differs");
        let raw = b64(img["tokens_base64"].as_str().unwrap());
        let served: Vec<u32> = raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let want: Vec<u32> = tokens.data[k * per..(k + 1) * per].iter().map(|v| v.to_bits()).collect();
        assert_eq!(served, want, "{req}: image {k} tokens differ from the CLI's (bitwise)");
        for key in ["queue_wait_ms", "ttft_ms", "total_ms"] {
            assert!(img[key].as_f64().unwrap() >= 0.0, "{key}");
        }
        assert!(img["ttft_ms"].as_f64() <= img["total_ms"].as_f64());
    }
}

#[test]
fn served_images_are_bit_identical_to_the_cli_under_concurrent_load() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_export(dir.path(), |_| {});
    for sched in ["continuous", "static"] {
        let srv = Srv::start(&model, &["--max-batch", "8", "--max-steps", "200", "--scheduler", sched]);
        // X: 2 rows (cfg 1), long. A (6 rows, CFG) joins while X runs (X has ~3000 head calls to go); with
        // as many steps per token as X, X leaves first, so A's last rows move into X's slots. B..D queue and
        // join as rows free up, at other positions and step counts.
        let x = json!({"class": 0, "cfg": 1.0, "steps": 200, "seed": 11, "n": 2, "tokens": true});
        let a = json!({"class": 1, "cfg": 2.5, "steps": 200, "seed": 5, "n": 3, "tokens": true});
        let later = [
            (json!({"class": 3, "cfg": 4.0, "steps": 2, "seed": 2, "n": 1}), "image/png"),
            (json!({"class": 2, "cfg": 1.5, "steps": 5, "seed": 42, "n": 4, "tokens": true}), "application/json"),
            (json!({"class": 1, "cfg": 2.5, "steps": 3, "seed": 6, "n": 2}), "image/png"),
        ];
        let hx = srv.post_later(x.clone(), "application/json");
        if sched == "continuous" {
            srv.wait_for("spherear_tokens_total", 20, |v| v > 0.0);
        }
        let ha = srv.post_later(a.clone(), "application/json");
        let mut hs = Vec::new();
        for (i, (req, accept)) in later.iter().enumerate() {
            std::thread::sleep(Duration::from_millis(3 * i as u64));
            hs.push(srv.post_later(req.clone(), accept));
        }
        let (rx, _) = hx.join().unwrap();
        let (ra, _) = ha.join().unwrap();
        check_against_cli(&model, dir.path(), &x, &rx);
        check_against_cli(&model, dir.path(), &a, &ra);
        for ((req, _), h) in later.iter().zip(hs) {
            check_against_cli(&model, dir.path(), req, &h.join().unwrap().0);
        }
        let m = srv.metrics();
        assert_eq!(metric(&m, "spherear_requests_total{code=\"200\"}"), Some(5.0), "{m}");
        assert_eq!(metric(&m, "spherear_images_total"), Some(12.0));
        assert_eq!(metric(&m, "spherear_active_rows"), Some(0.0));
        if sched == "continuous" {
            // Rows of different requests shared steps, and compaction moved rows.
            assert!(metric(&m, "spherear_kv_row_moves_total").unwrap() > 0.0, "{m}");
            let (steps, rows) =
                (metric(&m, "spherear_ar_steps_total").unwrap(), metric(&m, "spherear_ar_step_rows_total").unwrap());
            assert!(rows / steps > 2.0, "{rows} rows over {steps} steps");
        }
    }
}

#[test]
fn fp16_and_standard_attention_exports_are_bit_identical_too() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    write_random(&ModelConfig::preset("tiny").unwrap(), &ck, 4, Stage::Ar).unwrap();
    for (name, fp16, attention) in [("fp16", true, Attention::Gqa), ("standard", false, Attention::Standard)] {
        let model = dir.path().join(name);
        export(&ExportOptions { fp16, attention, max_batch: 16, ..ExportOptions::new(&ck, &model) }).unwrap();
        let srv = Srv::start(&model, &["--max-batch", "4"]);
        let a = json!({"class": 2, "cfg": 3.0, "steps": 12, "seed": 9, "n": 2, "tokens": true});
        let b = json!({"class": 0, "cfg": 1.0, "steps": 3, "seed": 1, "n": 3, "tokens": true});
        let ha = srv.post_later(a.clone(), "application/json");
        srv.wait_for("spherear_tokens_total", 20, |v| v > 0.0);
        let hb = srv.post_later(b.clone(), "application/json");
        let out = dir.path().join(format!("{name}-cli"));
        check_against_cli(&model, &out, &a, &ha.join().unwrap().0);
        check_against_cli(&model, &out, &b, &hb.join().unwrap().0);
    }
}

#[test]
fn bad_requests_get_400_with_one_line_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_export(dir.path(), |_| {});
    let srv = Srv::start(&model, &["--max-steps", "20", "--max-n", "4"]);
    let cases: [(&[u8], &str); 11] = [
        (b"{not json", "malformed JSON"),
        (b"", "malformed JSON"),
        (br#"{"class": 1, "colour": 3}"#, "unknown field `colour`"),
        (br#"{"cfg": 2.0}"#, "missing field `class`"),
        (br#"{"class": 4}"#, "class 4 is outside 0..4"),
        (br#"{"class": -1}"#, "class -1 is outside 0..4"),
        (br#"{"class": 1, "cfg": 0.5}"#, "cfg must be a finite number >= 1"),
        (br#"{"class": 1, "steps": 0}"#, "steps must be in 1..=20"),
        (br#"{"class": 1, "steps": 21}"#, "steps must be in 1..=20 (--max-steps), got 21"),
        (br#"{"class": 1, "n": 5}"#, "n must be in 1..=4 (--max-n), got 5"),
        (br#"{"class": 1, "n": 0}"#, "n must be in 1..=4"),
    ];
    for (body, want) in cases {
        let r = srv.post_raw(body);
        let text = r.text();
        assert_eq!(r.status, 400, "{}: {text}", String::from_utf8_lossy(body));
        let why = r.json().unwrap()["error"].as_str().unwrap().to_string();
        assert!(why.contains(want), "{why} lacks {want}");
        assert!(!why.contains('\n'));
    }
    let r = srv.post_raw(br#"{"class": 1, "seed": "x"}"#);
    assert_eq!(r.status, 400);
    assert_eq!(client::get(srv.addr, "/nope", T).unwrap().status, 404);
    assert_eq!(client::get(srv.addr, "/v1/images", T).unwrap().status, 405);
    // The server still serves.
    let ok = srv.post(&json!({"class": 1, "steps": 2}), "application/json");
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(srv.metric("spherear_requests_total{code=\"400\"}"), 12.0);
}

#[test]
fn a_full_queue_gets_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_export(dir.path(), |_| {});
    let srv = Srv::start(&model, &["--max-batch", "2", "--max-queue", "1", "--max-steps", "5000"]);
    // A holds both rows for seconds; B waits (the queue is then full); C is refused.
    let _a = srv.post_later(json!({"class": 1, "cfg": 3.0, "steps": 5000}), "application/json");
    srv.wait_for("spherear_active_rows", 20, |v| v == 2.0);
    let _b = srv.post_later(json!({"class": 2, "steps": 1}), "application/json");
    srv.wait_for("spherear_queue_length", 20, |v| v == 1.0);
    let c = srv.post(&json!({"class": 0, "steps": 1}), "application/json");
    assert_eq!(c.status, 429, "{}", c.text());
    let retry: u64 = c.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(c.json().unwrap()["error"].as_str().unwrap().contains("--max-queue 1"));
    assert_eq!(srv.metric("spherear_requests_total{code=\"429\"}"), 1.0);
}

#[test]
fn a_timed_out_request_gets_504_and_frees_its_slots() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_export(dir.path(), |_| {});
    let srv = Srv::start(&model, &["--max-batch", "2", "--timeout-s", "0.5", "--max-steps", "5000"]);
    let t0 = Instant::now();
    let r = srv.post(&json!({"class": 1, "cfg": 3.0, "steps": 5000}), "application/json");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(r.json().unwrap()["error"].as_str().unwrap().contains("timed out after 0.5 s"));
    assert_eq!(srv.metric("spherear_active_rows"), 0.0);
    // The rows are free again: a CFG request (both rows) completes.
    let ok = srv.post(&json!({"class": 2, "cfg": 3.0, "steps": 2}), "image/png");
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.header("content-type"), Some("image/png"));
    assert_eq!(srv.metric("spherear_requests_total{code=\"504\"}"), 1.0);
}

#[test]
fn a_client_disconnect_frees_its_slots() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_export(dir.path(), |_| {});
    let srv = Srv::start(&model, &["--max-batch", "2", "--max-steps", "5000"]);
    let body = serde_json::to_vec(&json!({"class": 1, "cfg": 3.0, "steps": 5000, "n": 4})).unwrap();
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.write_all(&client::request_bytes(srv.addr, "POST", "/v1/images", &[], &body)).unwrap();
    srv.wait_for("spherear_active_rows", 20, |v| v == 2.0);
    drop(s);
    let t0 = Instant::now();
    srv.wait_for("spherear_requests_cancelled_total", 10, |v| v == 1.0);
    srv.wait_for("spherear_active_rows", 10, |v| v == 0.0);
    assert_eq!(srv.metric("spherear_queue_length"), 0.0);
    assert!(t0.elapsed() < Duration::from_secs(5));
    let ok = srv.post(&json!({"class": 2, "cfg": 3.0, "steps": 2}), "application/json");
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[test]
fn sigterm_finishes_running_images_refuses_new_connections_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_export(dir.path(), |_| {});
    let srv = Srv::start(&model, &["--max-batch", "2", "--max-steps", "3000"]);
    let running = srv.post_later(json!({"class": 1, "cfg": 3.0, "steps": 3000}), "image/png");
    srv.wait_for("spherear_active_rows", 20, |v| v == 2.0);
    let waiting = srv.post_later(json!({"class": 2, "steps": 1}), "application/json");
    srv.wait_for("spherear_queue_length", 20, |v| v == 1.0);
    let addr = srv.addr;
    let kill = Command::new("kill").args(["-TERM", &srv.child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    // New connections are refused while the running image finishes.
    let t0 = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "still accepting connections");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!running.is_finished(), "the running request ended before the listener closed");
    let (w, _) = waiting.join().unwrap();
    assert_eq!(w.status, 503, "{}", w.text());
    assert!(w.text().contains("shutting down"));
    let (r, _) = running.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(&r.body[1..4], b"PNG");
    let (code, err) = srv.exit();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("shutting down"), "{err}");
}

#[test]
fn metrics_are_prometheus_text_and_healthz_answers() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_export(dir.path(), |_| {});
    let srv = Srv::start(&model, &[]);
    let h = client::get(srv.addr, "/healthz", T).unwrap();
    assert_eq!(h.status, 200);
    let hv = h.json().unwrap();
    assert_eq!(hv["status"], "ok");
    assert_eq!(hv["classes"], 4);
    let r = srv.post(&json!({"class": 3, "cfg": 2.0, "steps": 3, "n": 2}), "application/json");
    assert_eq!(r.status, 200);
    let resp = client::get(srv.addr, "/metrics", T).unwrap();
    assert!(resp.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    let text = resp.text();
    // Exposition format: HELP/TYPE comments, then `name{labels} value` samples of declared families.
    let mut types = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["gauge", "counter", "histogram"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        assert!(v.is_finite() && v >= 0.0, "{line}");
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}') && labels.contains("=\""), "{line}");
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).map(String::as_str) == Some("histogram")))
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
    }
    for name in [
        "spherear_queue_length",
        "spherear_active_rows",
        "spherear_tokens_per_second",
        "spherear_images_per_second",
        "spherear_tokens_total",
        "spherear_images_total",
        "spherear_request_latency_seconds",
        "spherear_time_to_first_token_seconds",
        "spherear_queue_wait_seconds",
    ] {
        assert!(types.contains_key(name), "{name} missing:\n{text}");
    }
    assert_eq!(metric(&text, "spherear_images_total"), Some(2.0));
    assert_eq!(metric(&text, "spherear_tokens_total"), Some(2.0 * 16.0));
    assert!(metric(&text, "spherear_tokens_per_second").unwrap() > 0.0);
    assert_eq!(metric(&text, "spherear_request_latency_seconds_count"), Some(1.0));
    assert_eq!(metric(&text, "spherear_request_latency_seconds_bucket{le=\"+Inf\"}"), Some(1.0));
    assert_eq!(metric(&text, "spherear_time_to_first_token_seconds_count"), Some(2.0));
    // Buckets are cumulative.
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("spherear_request_latency_seconds_bucket"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
}

#[test]
fn engine_errors_are_500_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    // Finite weights so large that the head's velocity overflows (as in generate_cli.rs).
    let model = tiny_export(dir.path(), |p| set_tensor(p, "head.net.final_layer.linear.weight", 3e38));
    let srv = Srv::start(&model, &[]);
    for _ in 0..2 {
        let r = srv.post(&json!({"class": 1, "steps": 2, "n": 2}), "image/png");
        assert_eq!(r.status, 500, "{}", r.text());
        let why = r.json().unwrap()["error"].as_str().unwrap().to_string();
        assert!(why.contains("head_step produced non-finite values (velocity) at token 0"), "{why}");
    }
    assert_eq!(client::get(srv.addr, "/healthz", T).unwrap().status, 200);
    assert_eq!(srv.metric("spherear_active_rows"), 0.0);
    assert_eq!(srv.metric("spherear_requests_total{code=\"500\"}"), 2.0);
}

#[test]
fn serve_help_explains_every_flag_and_bad_flags_fail_fast() {
    let out = runtime().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model",
        "--host",
        "--port",
        "--max-batch",
        "--max-queue",
        "--timeout-s",
        "--max-steps",
        "--max-n",
        "--scheduler",
        "--provider",
        "--threads",
        "--ort-lib",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_export(dir.path(), |_| {});
    for (args, want) in [
        (vec!["--max-batch", "1"], "--max-batch must be >= 2"),
        (vec!["--timeout-s", "0"], "--timeout-s"),
        (vec!["--max-queue", "0"], "--max-queue must be >= 1"),
    ] {
        let out = runtime().args(["serve", "--model"]).arg(&model).args(["--port", "0"]).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want) && err.trim().lines().count() == 1, "{err}");
    }
    // A port in use is one clear error.
    let srv = Srv::start(&model, &[]);
    let out = runtime()
        .args(["serve", "--model"])
        .arg(&model)
        .args(["--port", &srv.addr.port().to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot listen on"), "{err}");
}
