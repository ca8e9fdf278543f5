//! `bench speed` end to end on a tiny random checkpoint: runtime rows for fp32 (given export) and fp16
//! (exported by the benchmark from the checkpoint), reference rows from the real `trainer sample` binary,
//! exact call counts of the bounded (token-limited) timing, the analytic cost per row, and the written
//! JSON / markdown / PNG.

use std::path::PathBuf;

use benchmarks::cost::{ModelCost, Setting};
use benchmarks::speed::{self, Precision, SpeedOptions, SpeedReport};
use e2e::fixture;
use spherear_core::manifest::Manifest;
use spherear_core::ModelConfig;

/// `target/<profile>/trainer`, built by `cargo test --workspace` with the other binaries.
fn trainer_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("trainer");
    assert!(p.is_file(), "{} not built (cargo test --workspace builds it)", p.display());
    p
}

fn options(fx: &e2e::Fixture, out: PathBuf) -> SpeedOptions {
    SpeedOptions {
        models: vec![fx.fp32.clone()],
        checkpoint: Some(fx.ckpt.clone()),
        batch_sizes: vec![1, 3],
        steps: vec![2],
        precisions: vec![Precision::Fp32, Precision::Fp16],
        cfg: 2.0,
        tokens: 3,
        out,
        trainer: Some(trainer_bin()),
        no_baseline: false,
        threads: Some(1),
        micro_seconds: 0.05,
        ort_lib: None,
        progress: false,
    }
}

#[test]
fn bench_speed_rows_counts_costs_and_files() {
    let fx = fixture("tiny", 5);
    let out = fx.dir.path().join("bench");
    let mut o = options(&fx, out.clone());
    o.precisions.extend([Precision::W8, Precision::Int8]);
    let r = speed::run(&o).unwrap();
    let cfg = ModelConfig::preset("tiny").unwrap();
    assert_eq!(r.rows.len(), 8);
    assert_eq!((r.num_tokens, r.tokens_timed), (16, 3));
    // The fp16 export was made from the checkpoint because no fp16 --model was given.
    let m16 = Manifest::load(&out.join("export-fp16")).unwrap();
    assert_eq!(m16.precision.compute, spherear_core::manifest::TensorDType::Float16);
    // The w8 export was quantized from the fp32 --model.
    let m8 = Manifest::load(&out.join("export-w8")).unwrap();
    assert_eq!(m8.graph_precision("ar_step").unwrap().kind, Precision::W8);
    // And the int8 export was calibrated from it.
    let mi8 = Manifest::load(&out.join("export-int8")).unwrap();
    assert_eq!(mi8.graph_precision("head_step").unwrap().kind, Precision::Int8);
    let manifest = |p: Precision| match p {
        Precision::Fp32 => Manifest::load(&fx.fp32).unwrap(),
        Precision::Fp16 => m16.clone(),
        Precision::Int8 => mi8.clone(),
        _ => m8.clone(),
    };
    for row in &r.rows {
        for (who, t) in [("runtime", &row.runtime.timing), ("reference", &row.reference.as_ref().unwrap().timing)] {
            // 3 tokens: 1 prefill, 2 AR steps, 3 × (2 EM steps + 1 Euler) head calls, 1 decoder run.
            assert_eq!(
                (t.tokens_timed, t.num_tokens, t.prefill_calls, t.ar_step_calls, t.head_calls, t.decoder_calls),
                (3, 16, 1, 2, 9, 1),
                "{who} {row:?}"
            );
            assert_eq!((t.images, t.batch), (row.batch, row.batch));
            assert!(t.stages.head > 0.0 && t.stages.ar_step > 0.0 && t.stages.decoder > 0.0);
            assert!(t.peak_rss_bytes.unwrap() > 10 << 20, "{who}: peak RSS {:?}", t.peak_rss_bytes);
        }
        assert!(row.runtime.extrapolated);
        let rt = &row.runtime;
        assert!((rt.images_per_second * rt.seconds_per_image - 1.0).abs() < 1e-9);
        let reference = row.reference.as_ref().unwrap();
        assert!((row.speedup.unwrap() - rt.images_per_second / reference.images_per_second).abs() < 1e-9);
        // FLOPs from the model; bytes from what each export's graphs really read (manifest weight bytes).
        let bytes = if row.precision == Precision::Fp16 { 2 } else { 4 };
        let s = Setting { batch: row.batch, steps: 2, cfg: true, bytes_per_elem: bytes };
        let cost = ModelCost::new(&cfg).with_export_bytes(&manifest(row.precision));
        assert_eq!(row.flops_per_image, cost.per_image(&s).flops);
        assert_eq!(row.bytes_per_image, cost.per_image(&s).bytes);
        if row.precision == Precision::W8 {
            let fp32 = r.rows.iter().find(|x| x.precision == Precision::Fp32 && x.batch == row.batch).unwrap();
            // On `tiny` (K = 32 < block 128: every column pads to one block) the saving is small, but real.
            assert!(row.bytes_per_image < fp32.bytes_per_image);
        }
        assert!(row.pct_roofline > 0.0 && row.pct_bandwidth > 0.0 && row.pct_flops > 0.0);
        assert!(row.head_share > 0.0 && row.head_share < 1.0);
    }
    // All precisions share one reference run per (steps, batch).
    assert_eq!(r.rows[0].reference.as_ref().unwrap().timing, r.rows[2].reference.as_ref().unwrap().timing);
    assert_eq!(r.rows[0].reference.as_ref().unwrap().timing, r.rows[4].reference.as_ref().unwrap().timing);
    assert_eq!(r.rows[0].reference.as_ref().unwrap().timing, r.rows[6].reference.as_ref().unwrap().timing);
    assert!(r.machine.matmul_fp32.flops_per_s > 1e8 && r.machine.bandwidth.bytes_per_s > 1e8);
    assert!(r.machine.matmul_fp16.is_some());
    // The targets are about 10 steps, which this run does not have: reported as not measured.
    assert_eq!(r.targets.len(), 6);
    assert!(r.targets.iter().all(|t| t.measured.is_none() && t.met.is_none()));
    assert_eq!(r.projections.len(), 2 * 2 * 2);
    // Files: JSON round-trips, markdown has the sections, PNG is the chart.
    let back: SpeedReport = serde_json::from_str(&std::fs::read_to_string(out.join("speed.json")).unwrap()).unwrap();
    assert_eq!(back.rows.len(), 8);
    let md = std::fs::read_to_string(out.join("speed.md")).unwrap();
    assert!(md.contains("## Targets") && md.contains("NOT measured") && md.contains("| fp16 | 2 | 3 |"));
    let png = image::open(out.join("speed.png")).unwrap();
    assert_eq!((png.width(), png.height()), (960, 640));
}

#[test]
fn bench_speed_bad_input_is_one_clear_error() {
    let fx = fixture("tiny", 6);
    let out = fx.dir.path().join("bench");
    let mut o = options(&fx, out.clone());
    o.checkpoint = None;
    let e = speed::run(&o).unwrap_err().to_string();
    assert!(e.contains("no fp16 export") && e.contains("--checkpoint"), "{e}");
    let mut o = options(&fx, out.clone());
    o.batch_sizes = vec![0];
    assert!(speed::run(&o).unwrap_err().to_string().contains("--batch-sizes"));
    let mut o = options(&fx, out.clone());
    o.tokens = 1;
    assert!(speed::run(&o).unwrap_err().to_string().contains("--tokens"));
    let mut o = options(&fx, out.clone());
    o.checkpoint = Some(fx.dir.path().join("missing"));
    assert!(speed::run(&o).unwrap_err().to_string().contains("ar.safetensors"));
    assert!(!out.join("speed.json").exists());
}

/// A model that is not an export of the checkpoint is refused before anything is exported or measured
/// (it used to leave a stale export-fp16/ behind), and a run that fails midway leaves no earlier results
/// that look like its own.
#[test]
fn bench_speed_mismatched_inputs_and_failed_runs_leave_nothing_stale() {
    let fx = fixture("tiny", 6);
    let out = fx.dir.path().join("bench");
    let other = fx.dir.path().join("other");
    let mut cfg = spherear_core::ModelConfig::preset("tiny").unwrap();
    cfg.ar.n_layer = 3;
    exporter::random::write_random(&cfg, &other, 1, exporter::checkpoint::Stage::Ar).unwrap();
    let mut o = options(&fx, out.clone());
    o.checkpoint = Some(other);
    let e = speed::run(&o).unwrap_err().to_string();
    assert!(e.contains("differs from --checkpoint"), "{e}");
    assert!(!out.exists(), "nothing written for a refused run");
    // An earlier run's results, then a run that fails midway: its fp16 export would replace a folder of
    // user files.
    std::fs::create_dir_all(out.join("export-fp16")).unwrap();
    std::fs::write(out.join("export-fp16/notes.txt"), "mine").unwrap();
    std::fs::write(out.join("speed.json"), "{}").unwrap();
    let e = speed::run(&options(&fx, out.clone())).unwrap_err().to_string();
    assert!(e.contains("holding an export"), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("export-fp16/notes.txt")).unwrap(), "mine");
    for f in speed::RESULT_FILES {
        assert!(!out.join(f).exists(), "stale {f} left");
    }
}
