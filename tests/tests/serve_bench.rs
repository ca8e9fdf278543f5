//! `bench serve` end to end on a tiny random export: both schedulers at two offered loads, every request
//! answered, percentiles ordered, and the JSON / markdown / PNG written.

use std::time::Duration;

use benchmarks::serve::{self, ServeBenchOptions};
use e2e::fixture;
use runtime::serve::Scheduler;

#[test]
fn bench_serve_compares_schedulers_and_writes_reports() {
    let fx = fixture("tiny", 7);
    let out = fx.dir.path().join("serve");
    let o = ServeBenchOptions {
        model: fx.fp32.clone(),
        rates: vec![20.0, 200.0],
        requests: 8,
        duration_s: 2.0,
        max_batch: 4,
        steps: 2,
        cfg: 2.0,
        n: 1,
        schedulers: vec![Scheduler::Continuous, Scheduler::Static],
        timeout_s: 60.0,
        threads: Some(1),
        ort_lib: None,
        seed: 3,
        out: out.clone(),
    };
    let t0 = std::time::Instant::now();
    let mut lines = Vec::new();
    let r = serve::run(&o, |l| lines.push(l.to_string())).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(60));
    assert_eq!(r.rows.len(), 4);
    assert_eq!(lines.len(), 4, "{lines:?}");
    for (row, (sched, rate)) in
        r.rows.iter().zip([("continuous", 20.0), ("static", 20.0), ("continuous", 200.0), ("static", 200.0)])
    {
        assert_eq!((row.scheduler.as_str(), row.offered_rps), (sched, rate));
        assert_eq!((row.ok, row.failed), (row.sent, 0), "{row:?}");
        assert!(row.sent >= 1 && row.sent <= 8);
        assert!(row.latency_p50_s <= row.latency_p95_s && row.latency_p95_s <= row.latency_p99_s, "{row:?}");
        assert!(row.ttft_p50_s <= row.latency_p99_s && row.ttft_p50_s >= 0.0, "{row:?}");
        assert!(row.throughput_rps > 0.0 && row.tokens_per_s == row.throughput_rps * 16.0);
    }
    let md = std::fs::read_to_string(out.join("serve.md")).unwrap();
    assert!(md.contains("| continuous | 20.00 |") && md.contains("| static | 200.00 |"), "{md}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("serve.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 4);
    let png = image::open(out.join("serve.png")).unwrap();
    assert_eq!((png.width(), png.height()), (960, 640));
    // Bad options are refused before any work.
    let bad = ServeBenchOptions { rates: vec![-1.0], ..o };
    assert!(serve::run(&bad, |_| {}).unwrap_err().to_string().contains("--rates"));
}
