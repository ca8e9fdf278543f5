//! The `runtime` binary on bad input: one `error: ...` line on stderr, exit status 1, no PNG written.
//! The export here is hand-made (a valid manifest of the `tiny` preset whose .onnx files are garbage), so
//! these tests need neither the exporter nor a real model: everything but the corrupt graph is rejected
//! before ONNX Runtime is touched. Parity with `trainer sample` on real exports is in tests/tests/runtime_generate.rs.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use spherear_core::manifest::*;
use spherear_core::ModelConfig;

fn io(name: &str, dtype: TensorDType, shape: Vec<Dim>) -> IoSpec {
    IoSpec { name: name.into(), dtype, shape, meaning: String::new() }
}

/// A manifest with the real graph signatures of `tiny`, graph files filled with garbage.
fn fake_export(dir: &Path, version: u32) {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let (b, f, i64t) = (Dim::Sym("batch".into()), TensorDType::Float32, TensorDType::Int64);
    let (d, dim, l, t) = (cfg.latent_dim, cfg.ar.dim, cfg.num_tokens(), cfg.ar_seq_len());
    let heads = cfg.ar.n_head;
    let kv = |n: String| io(&n, f, vec![b.clone(), Dim::N(heads), Dim::N(t), Dim::N(dim / heads)]);
    let present: Vec<IoSpec> =
        (0..cfg.ar.n_layer).flat_map(|i| [kv(format!("present.{i}.key")), kv(format!("present.{i}.value"))]).collect();
    let past: Vec<IoSpec> = (0..cfg.ar.n_layer)
        .flat_map(|i| [kv(format!("past_key_values.{i}.key")), kv(format!("past_key_values.{i}.value"))])
        .collect();
    let cond = io("condition", f, vec![b.clone(), Dim::N(dim)]);
    let graph = |name: &str, inputs: Vec<IoSpec>, outputs: Vec<IoSpec>| {
        std::fs::write(dir.join(format!("{name}.onnx")), b"not an onnx protobuf").unwrap();
        (name.to_string(), GraphEntry { file: format!("{name}.onnx"), doc: String::new(), inputs, outputs, precision: None })
    };
    let graphs: BTreeMap<String, GraphEntry> = [
        graph(
            "ar_prefill",
            vec![io("class_ids", i64t, vec![b.clone()])],
            [vec![cond.clone()], present.clone()].concat(),
        ),
        graph(
            "ar_step",
            [vec![io("token", f, vec![b.clone(), Dim::N(d)]), io("position", i64t, vec![b.clone()])], past].concat(),
            [vec![cond.clone()], present].concat(),
        ),
        graph(
            "head_step",
            vec![io("x_t", f, vec![b.clone(), Dim::N(d)]), io("t", f, vec![b.clone()]), cond],
            vec![io("velocity", f, vec![b.clone(), Dim::N(d)])],
        ),
        graph(
            "decoder",
            vec![io("tokens", f, vec![b.clone(), Dim::N(l), Dim::N(d)])],
            vec![io("image", f, vec![b, Dim::N(3), Dim::N(cfg.image_size), Dim::N(cfg.image_size)])],
        ),
    ]
    .into_iter()
    .collect();
    let mut m = Manifest::new(cfg, Stage::Ar, f, 8, Attention::Standard);
    m.format_version = version;
    m.producer = "runtime cli test".into();
    m.graphs = graphs;
    std::fs::write(dir.join(MANIFEST_FILE), m.to_json().unwrap()).unwrap();
    std::fs::write(dir.join("weights.bin"), b"").unwrap();
}

/// Runs `runtime ARGS`; asserts failure with one `error: ...` line containing `want`; returns stderr.
fn fails_with(args: &[&std::ffi::OsStr], want: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(want), "{args:?}: want '{want}' in {err}");
    err
}

/// Files in `dir` that a write may have left: staging files and PNGs.
fn staging_leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-") || n.ends_with(".png"))
        .collect()
}

/// Runs `runtime generate ARGS --out DIR/grid.png`; asserts failure with one error line and no PNG.
fn fails(dir: &Path, model: &Path, args: &[&str], want: &str) {
    let png = dir.join("grid.png");
    let out = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["generate", "--model"])
        .arg(model)
        .args(args)
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(want), "{args:?}: {err}");
    assert!(!png.exists(), "{args:?} left a PNG");
    assert!(staging_leftovers(dir).is_empty(), "{:?}", staging_leftovers(dir));
}

#[test]
fn bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("export");
    std::fs::create_dir(&model).unwrap();
    fake_export(&model, MANIFEST_VERSION);
    let d = dir.path();
    fails(d, &model, &["--classes", "0,4"], "class id 4 is outside 0..4");
    fails(d, &model, &["--classes", "-1"], "class id -1");
    fails(d, &model, &["--steps", "0"], "--steps");
    fails(d, &model, &["--batch", "0"], "--batch");
    fails(d, &model, &["--cfg", "0.5"], "cfg");
    fails(d, &model, &["--cfg", "NaN"], "cfg");
    fails(d, &model, &["--per-class", "0"], "--per-class");
    fails(d, &model, &["--threads", "0"], "--threads");
    fails(d, &model, &["--trt-fp16"], "--provider tensorrt");
    fails(d, &model, &["--provider", "cuda", "--strict-provider"], "--strict-provider");
}

#[test]
fn bad_exports() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails(d, &d.join("missing"), &[], "does not exist");
    let v2 = d.join("v2");
    std::fs::create_dir(&v2).unwrap();
    fake_export(&v2, MANIFEST_VERSION + 1);
    fails(d, &v2, &[], &format!("format version {} is not supported", MANIFEST_VERSION + 1));
    let corrupt = d.join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    fake_export(&corrupt, MANIFEST_VERSION);
    fails(d, &corrupt, &["--steps", "2"], "cannot load graph");
    fails(d, &corrupt, &["--ort-lib", "/nonexistent/libonnxruntime.so"], "--ort-lib");
    std::fs::remove_file(corrupt.join("head_step.onnx")).unwrap();
    fails(d, &corrupt, &[], "head_step.onnx is missing");
}

#[test]
fn truncated_weights_file_is_named_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("export");
    std::fs::create_dir(&model).unwrap();
    fake_export(&model, MANIFEST_VERSION);
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join(MANIFEST_FILE)).unwrap()).unwrap();
    m["weights"]["bytes"] = 1000.into();
    std::fs::write(model.join(MANIFEST_FILE), m.to_string()).unwrap();
    std::fs::write(model.join("weights.bin"), vec![0u8; 600]).unwrap();
    fails(d, &model, &[], "has 600 bytes but the manifest records 1000");
    std::fs::remove_file(model.join("weights.bin")).unwrap();
    fails(d, &model, &[], "weights.bin cannot be read");
}

/// Requests that cannot fit are refused before any work (they used to abort on a 51 GB allocation or
/// panic on a capacity overflow); outputs that make no sense are refused too.
#[test]
fn impossible_requests_and_outputs_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("export");
    std::fs::create_dir(&model).unwrap();
    fake_export(&model, MANIFEST_VERSION);
    let png = d.join("grid.png");
    let gen = |extra: &[&str]| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec!["generate".into(), "--model".into(), model.clone().into()];
        v.extend(extra.iter().map(|s| s.into()));
        v
    };
    let run = |extra: &[&str], want: &str| {
        let args = gen(extra);
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        fails_with(&refs, want)
    };
    let out = png.to_str().unwrap();
    run(&["--per-class", "100000000", "--out", out], "--out-dir");
    run(&["--per-class", "18446744073709551615", "--out", out], "too many images");
    run(&["--per-class", "18446744073709551615", "--out-dir", d.join("each").to_str().unwrap()], "too many images");
    run(&[], "nothing to write");
    run(&["--out", out, "--tokens-out", out], "two different files");
    run(&["--out", "/proc/spherear-grid.png"], "not writable");
    run(&["--out", d.join("no/such/folder/g.png").to_str().unwrap()], "does not exist");
    assert!(staging_leftovers(d).is_empty());
    assert!(!d.join("each").exists());
}

/// `--out` naming a symlink or a FIFO is refused and the path is left as it was (the old atomic writer
/// replaced it with a regular file, and as root `--out /dev/stdout` destroyed the device link).
#[cfg(unix)]
#[test]
fn special_output_paths_are_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("export");
    std::fs::create_dir(&model).unwrap();
    fake_export(&model, MANIFEST_VERSION);
    let target = d.join("precious.txt");
    std::fs::write(&target, "keep").unwrap();
    let link = d.join("link.png");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let fifo = d.join("fifo.png");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let grid = d.join("g.png");
    for (path, kind) in [(&link, "symbolic link"), (&fifo, "FIFO")] {
        let args: Vec<&std::ffi::OsStr> =
            vec!["generate".as_ref(), "--model".as_ref(), model.as_os_str(), "--out".as_ref(), path.as_os_str()];
        fails_with(&args, kind);
        let args: Vec<&std::ffi::OsStr> = vec![
            "generate".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--out".as_ref(),
            grid.as_os_str(),
            "--tokens-out".as_ref(),
            path.as_os_str(),
        ];
        fails_with(&args, kind);
    }
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_runtime")).args(["generate", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model",
        "--classes",
        "--per-class",
        "--cfg",
        "--steps",
        "--seed",
        "--batch",
        "--out",
        "--out-dir",
        "--tokens-out",
        "--provider",
        "--strict-provider",
        "--trt-engine-cache",
        "--trt-fp16",
        "--trt-int8",
        "--trt-int8-calibration-table",
        "--threads",
        "--ort-lib",
        "--quiet",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
}

/// `runtime eval` on bad input: one error line, exit 1, and the --out folder is never created.
#[test]
fn eval_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    fake_export(&model, MANIFEST_VERSION);
    let out_dir = dir.path().join("eval");
    let run = |judge: &Path, extra: &[&str], want: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_runtime"))
            .args(["eval", "--model"])
            .arg(&model)
            .arg("--judge")
            .arg(judge)
            .args(extra)
            .arg("--out")
            .arg(&out_dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{extra:?}: one line expected, got {err}");
        assert!(err.starts_with("error: ") && err.contains(want), "{extra:?}: want '{want}' in {err}");
        assert!(!out_dir.exists());
    };
    run(&dir.path().join("missing"), &[], "does not exist");
    // The model folder is an AR export, not a judge.
    run(&model, &[], "not a judge manifest");
    run(&model, &["--cfg", "0.5"], "cfg");
    run(&model, &["--steps", "0"], "--steps");
}
