//! The quality gate of `calibration quantize` / `calibrate` on a random `tiny` export, with a random judge
//! over a 4-class ImageFolder of 16×16 images (the tiny preset's classes and size):
//! - with `--judge` the published export carries `gate.json`/`gate.md`: fp32 and quantized judge measures
//!   on the same images, token error, passed; the measures equal an independent recomputation;
//! - without `--judge`: token statistics only, not gated; `--no-gate`: no report;
//! - a gate nothing can pass (distance at most half of fp32's) ranks the layer groups, tries them, and
//!   writes nothing; a judge of another model is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::{fixture, scale_tensors};
use quality::eval::{Judge, TestSplit};
use runtime::{GenerateRequest, Generator, GeneratorOptions};
use spherear_core::judge::JudgeConfig;

fn calibration() -> Command {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("calibration");
    assert!(p.is_file(), "{} not built (cargo test --workspace builds it)", p.display());
    Command::new(p)
}

/// An ImageFolder with 4 classes of 6 distinct 16×16 patterns each (used as both splits).
fn image_folder(root: &Path) {
    for c in 0..4u32 {
        let d = root.join(format!("class{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..6u32 {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                let v = ((x * (c + 1) + y * (i + 2) + c * 40) % 256) as u8;
                image::Rgb([v, v.wrapping_mul(3), 255 - v])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

struct Setup {
    _fx: e2e::Fixture,
    fp32: PathBuf,
    judge: PathBuf,
    data: PathBuf,
    dir: PathBuf,
}

fn setup(seed: u64) -> Setup {
    let fx = fixture("tiny", seed);
    // The tamed head of runtime_generate.rs: sampling a random model is smooth rather than chaotic.
    scale_tensors(&fx.ckpt, "head.net.final_layer.linear.", 0.3);
    let dir = fx.dir.path().to_path_buf();
    let fp32 = dir.join("fp32-tamed");
    exporter::export(&exporter::ExportOptions { max_batch: 8, ..exporter::ExportOptions::new(&fx.ckpt, &fp32) })
        .unwrap();
    let run = dir.join("judge-run");
    exporter::random::write_random_judge(&JudgeConfig::default_for(16, 4), &run, seed).unwrap();
    let judge = dir.join("judge");
    exporter::judge::export_judge(&exporter::judge::JudgeExportOptions {
        checkpoint: run,
        out: judge.clone(),
        force: false,
    })
    .unwrap();
    let data = dir.join("images");
    image_folder(&data);
    Setup { _fx: fx, fp32, judge, data, dir }
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = calibration().args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn quantize_with_a_judge_publishes_a_gated_export() {
    let st = setup(41);
    let w8 = st.dir.join("w8");
    let (ok, stdout, stderr) = run(&[
        "quantize", "--model", s(&st.fp32), "--out", s(&w8), "--weights", "int8", "--judge", s(&st.judge), "--data",
        s(&st.data), "--gate-per-class", "3", "--gate-cfg", "2", "--gate-steps", "3", "--max-accuracy-drop", "100",
        "--max-distance-ratio", "100", "--quiet",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("Passed") && stdout.contains("gate.json"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(w8.join("gate.json")).unwrap()).unwrap();
    let r = &report["result"];
    assert_eq!(r["passed"], true);
    assert_eq!(r["images"], 12);
    assert_eq!(report["rounds"].as_array().unwrap().len(), 1);
    assert!(w8.join("gate.md").is_file());
    // The reported fp32 and quantized measures, recomputed independently: same request, same judge.
    let opts = GeneratorOptions { threads: Some(2), ..Default::default() };
    let (env, _) = runtime::ortlib::environment_with_threads(None, Some(2)).unwrap();
    let judge = Judge::load(&st.judge, &env).unwrap();
    let g32 = Generator::load(&st.fp32, &opts).unwrap();
    let split = TestSplit::load(&judge, g32.manifest(), s(&st.data)).unwrap();
    let req = GenerateRequest::grid(&[0, 1, 2, 3], 3, 2.0, 3, 0, 50).unwrap();
    for (dir, side) in [(&st.fp32, "fp32"), (&w8, "quantized")] {
        let g = Generator::load(dir, &opts).unwrap();
        let (t, _) = g.generate_tokens(&req, |_| {}).unwrap();
        let mut images = g.decode(&t, 50).unwrap();
        let (acc, fd) = split.score(&mut images, &req.classes).unwrap();
        assert!((r[side]["accuracy"].as_f64().unwrap() - acc).abs() < 1e-12, "{side}");
        assert!((r[side]["frechet_distance"].as_f64().unwrap() - fd).abs() < 1e-9 * fd.max(1.0), "{side}");
    }
    let t = &r["tokens"];
    assert!(t["rms"].as_f64().unwrap() > 0.0 && t["rms"].as_f64().unwrap() < 0.1, "{t}");
}

#[test]
fn without_a_judge_the_gate_reports_tokens_and_no_gate_skips_it() {
    let st = setup(42);
    let w4 = st.dir.join("w4");
    let (ok, stdout, stderr) =
        run(&["quantize", "--model", s(&st.fp32), "--out", s(&w4), "--weights", "int4", "--gate-steps", "2", "--quiet"]);
    assert!(ok, "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(w4.join("gate.json")).unwrap()).unwrap();
    assert!(report["result"]["passed"].is_null());
    assert_eq!(report["result"]["images"], 8, "2 per class, 4 classes");
    assert!(report["result"]["reasons"][0].as_str().unwrap().contains("no --judge"));
    assert!(stdout.contains("Not gated"), "{stdout}");
    // Without --gate-cfg the gate uses the model's own default guidance, as `runtime generate` does: 3 for
    // `tiny`, 5 for a model whose config is named `fmnist-32` (the same tiny weights under that name).
    assert_eq!(report["result"]["cfg"], 3.0);
    let renamed = st.dir.join("fp32-as-fmnist");
    std::fs::create_dir_all(&renamed).unwrap();
    for f in std::fs::read_dir(&st.fp32).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, renamed.join(f.file_name().unwrap())).unwrap();
    }
    let m = std::fs::read_to_string(renamed.join("manifest.json")).unwrap();
    assert_eq!(m.matches("\"name\": \"tiny\"").count(), 1, "one config name in the manifest");
    std::fs::write(renamed.join("manifest.json"), m.replace("\"name\": \"tiny\"", "\"name\": \"fmnist-32\"")).unwrap();
    let w4f = st.dir.join("w4-fmnist");
    let (ok, stdout, stderr) =
        run(&["quantize", "--model", s(&renamed), "--out", s(&w4f), "--weights", "int4", "--gate-steps", "2", "--quiet"]);
    assert!(ok, "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(w4f.join("gate.json")).unwrap()).unwrap();
    assert_eq!(report["result"]["cfg"], 5.0);
    let plain = st.dir.join("w4-plain");
    let (ok, _, stderr) = run(&["quantize", "--model", s(&st.fp32), "--out", s(&plain), "--weights", "int4", "--no-gate", "--quiet"]);
    assert!(ok, "{stderr}");
    assert!(plain.join("manifest.json").is_file() && !plain.join("gate.json").exists());
}

#[test]
fn a_gate_nothing_passes_ranks_the_groups_and_writes_nothing() {
    let st = setup(43);
    let out = st.dir.join("w4-strict");
    let (ok, stdout, stderr) = run(&[
        "quantize", "--model", s(&st.fp32), "--out", s(&out), "--weights", "int4", "--judge", s(&st.judge), "--data",
        s(&st.data), "--gate-per-class", "2", "--gate-steps", "2", "--max-distance-ratio", "0.5", "--quiet",
    ]);
    assert!(!ok, "{stdout}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("no candidate passes") && lines[0].contains("nothing written"), "{stderr}");
    assert!(stderr.contains("ranking") && stderr.contains("gate (kept "), "{stderr}");
    assert!(!out.exists());
    // A judge of another model (10 classes, 32 px) is refused before any candidate is built.
    let run10 = st.dir.join("judge10-run");
    exporter::random::write_random_judge(&JudgeConfig::default_for(32, 10), &run10, 1).unwrap();
    let judge10 = st.dir.join("judge10");
    exporter::judge::export_judge(&exporter::judge::JudgeExportOptions {
        checkpoint: run10,
        out: judge10.clone(),
        force: false,
    })
    .unwrap();
    let (ok, _, stderr) = run(&[
        "quantize", "--model", s(&st.fp32), "--out", s(&out), "--weights", "int8", "--judge", s(&judge10), "--data",
        s(&st.data), "--quiet",
    ]);
    assert!(!ok && stderr.contains("does not fit the model"), "{stderr}");
    assert!(!out.exists());
    let leftovers: Vec<String> = std::fs::read_dir(&st.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
