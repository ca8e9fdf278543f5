//! The `calibration` binary: --help, a successful run, and bad input as one `error:` line with exit code 1
//! and no output folder. (Byte identity with ONNX Runtime's quantizer and the runtime check are in
//! `tests/tests/calibration_quantize.rs`.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Exports {
    dir: tempfile::TempDir,
    fp32: PathBuf,
    fp16: PathBuf,
}

fn exports() -> Exports {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let cfg = spherear_core::ModelConfig::preset("tiny").unwrap();
    exporter::random::write_random(&cfg, &ckpt, 3, exporter::checkpoint::Stage::Ar).unwrap();
    let mut out = Vec::new();
    for fp16 in [false, true] {
        let o = dir.path().join(if fp16 { "fp16" } else { "fp32" });
        let opts = exporter::ExportOptions { fp16, max_batch: 8, ..exporter::ExportOptions::new(&ckpt, &o) };
        exporter::export(&opts).unwrap();
        out.push(o);
    }
    let fp16 = out.pop().unwrap();
    let fp32 = out.pop().unwrap();
    Exports { dir, fp32, fp16 }
}

fn calibration(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_calibration")).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `calibration quantize --model MODEL --out OUT ARGS`; asserts exit 1, one `error:` line containing
/// `want`, nothing on stdout, and the output folder as it was (absent, or an earlier export left untouched).
fn fails(model: &Path, out: &Path, args: &[&str], want: &str) {
    let before = std::fs::read(out.join("manifest.json")).ok();
    let o = calibration(&[&["quantize", "--model", s(model), "--out", s(out), "--quiet"], args].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(want), "{args:?}: want '{want}': {err}");
    assert!(o.stdout.is_empty(), "{args:?}");
    assert_eq!(std::fs::read(out.join("manifest.json")).ok(), before, "{args:?}: output untouched");
    if before.is_none() {
        assert!(!out.exists(), "{args:?}: no output folder");
    }
}

#[test]
fn help_explains_the_options() {
    let o = calibration(&["quantize", "--help"]);
    assert!(o.status.success());
    let h = String::from_utf8_lossy(&o.stdout);
    for want in
        ["MatMulNBits", "--weights", "int4", "--block-size", "--accuracy-level", "int8 compute", "--keep", "decoder"]
    {
        assert!(h.contains(want), "--help lacks {want}:\n{h}");
    }
}

#[test]
fn quantizes_and_refuses_bad_input() {
    let ex = exports();
    let out = ex.dir.path().join("w4");
    let o = calibration(&["quantize", "--model", s(&ex.fp32), "--out", s(&out), "--weights", "int4", "--quiet"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("int4 weights, block size 32, accuracy level 4"), "{stdout}");
    assert!(stdout.contains("ar_step") && stdout.contains("w4 (9 of 9 weight MatMuls"), "{stdout}");
    assert!(stdout.contains("decoder     fp32 (not selected)"), "{stdout}");
    assert!(out.join("manifest.json").is_file() && out.join("weights.bin").is_file());

    let new = ex.dir.path().join("new");
    fails(&out, &new, &["--weights", "int8"], "already quantized");
    fails(&ex.fp16, &new, &["--weights", "int8"], "fp16 export");
    fails(&ex.fp32, &new, &["--weights", "int8", "--graphs", "ar_step,head"], "unknown graph 'head'");
    fails(&ex.fp32, &new, &["--weights", "int8", "--keep", "head.net.nope."], "--keep 'head.net.nope.' matches no");
    fails(&ex.fp32, &new, &["--weights", "int4", "--block-size", "48"], "--block-size must be a power of two >= 16");
    fails(&ex.fp32, &new, &["--weights", "int4", "--block-size", "8"], "(got 8)");
    fails(&ex.dir.path().join("missing"), &new, &["--weights", "int4"], "does not exist");
    // An existing export at --out needs --force; then it is replaced.
    fails(&ex.fp32, &out, &["--weights", "int8"], "--force");
    let o =
        calibration(&["quantize", "--model", s(&ex.fp32), "--out", s(&out), "--weights", "int8", "--force", "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = spherear_core::manifest::Manifest::load(&out).unwrap();
    assert_eq!(m.graph_precision("head_step").unwrap().kind, spherear_core::manifest::PrecisionKind::W8);
    assert_eq!(m.graph_precision("head_step").unwrap().block_size, Some(128));
}

/// `calibration calibrate`: --help, a run, and bad input (one `error:` line, exit 1, no output folder).
#[test]
fn calibrate_runs_and_refuses_bad_input() {
    let o = calibration(&["calibrate", "--help"]);
    assert!(o.status.success());
    let h = String::from_utf8_lossy(&o.stdout);
    for want in ["--images", "--method", "--percentile", "--cfg", "--steps", "--seed", "--graphs", "TensorRT", "QDQ"] {
        assert!(h.contains(want), "calibrate --help lacks {want}");
    }
    let ex = exports();
    let out = ex.dir.path().join("int8");
    let run = |model: &Path, out: &Path, args: &[&str]| {
        calibration(&[&["calibrate", "--model", s(model), "--out", s(out), "--threads", "2", "--quiet"], args].concat())
    };
    let o = run(&ex.fp32, &out, &["--images", "2", "--method", "minmax", "--calls-per-graph", "4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("QLinearMatMul") && text.contains("TensorRT table"), "{text}");
    assert!(out.join("tensorrt/calibration.flatbuffers").is_file() && out.join("calibration.json").is_file());
    let bad = ex.dir.path().join("bad");
    let fails = |model: &Path, args: &[&str], want: &str| {
        let o = run(model, &bad, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with("error: ") && err.contains(want), "{args:?}: want '{want}': {err}");
        assert!(!bad.exists(), "{args:?}: no output folder");
    };
    fails(&ex.fp32, &["--images", "0"], "--images must be >= 1");
    fails(&ex.fp32, &["--images", "2", "--method", "kl"], "unknown --method 'kl'");
    fails(&ex.fp32, &["--images", "2", "--method", "percentile", "--percentile", "120"], "--percentile must be in");
    fails(&out, &["--images", "2"], "already quantized");
    fails(&ex.fp16, &["--images", "2"], "fp16 export");
    fails(&ex.dir.path().join("missing"), &["--images", "2"], "does not exist");
}
