//! `runtime generate` on real (random `tiny`) exports: streaming piece by piece equals one whole request,
//! Ctrl-C keeps the finished images and leaves no staging file, and a model that produces NaN/Inf stops
//! with an error naming the graph and the token instead of writing a black PNG.

mod common;
use common::{runtime, set_tensor, tiny_export};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runtime::output::{read_tokens, write_outputs};
use runtime::{GenerateRequest, Generator, GeneratorOptions, OutputOptions};

fn pngs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.retain(|n| n.ends_with(".png"));
    v.sort();
    v
}

#[test]
fn streamed_pieces_equal_one_whole_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = tiny_export(d, |_| {});
    let (grid, tokens) = (d.join("cli.png"), d.join("cli.safetensors"));
    let out = runtime()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--classes", "2,0,3", "--per-class", "3", "--cfg", "2.5", "--steps", "2", "--seed", "5"])
        .args(["--batch", "4", "--threads", "2", "--quiet", "--out"])
        .arg(&grid)
        .arg("--tokens-out")
        .arg(&tokens)
        .arg("--out-dir")
        .arg(d.join("each"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The same request in one library call (batches of 4 as well): identical bits.
    let g = Generator::load(&model, &GeneratorOptions { threads: Some(2), ..Default::default() }).unwrap();
    let req = GenerateRequest::grid(&[2, 0, 3], 3, 2.5, 2, 5, 4).unwrap();
    let (whole, _) = g.generate_tokens(&req, |_| {}).unwrap();
    assert_eq!(read_tokens(&tokens).unwrap(), whole);
    let images = g.decode(&whole, 4).unwrap();
    let opts = OutputOptions { grid: Some(d.join("lib.png")), cols: 3, ..Default::default() };
    write_outputs(&opts, &req.classes, &whole, &images, 16).unwrap();
    assert_eq!(std::fs::read(&grid).unwrap(), std::fs::read(d.join("lib.png")).unwrap());
    assert_eq!(pngs(&d.join("each")).len(), 9);
    assert_eq!(pngs(&d.join("each"))[8], "0008-class3.png");
}

#[test]
fn ctrl_c_keeps_finished_images_and_leaves_no_staging_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = tiny_export(d, |_| {});
    let each = d.join("each");
    let mut child = runtime()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--per-class", "5000", "--steps", "2", "--batch", "2", "--threads", "1", "--quiet"])
        .arg("--out-dir")
        .arg(&each)
        .arg("--out")
        .arg(d.join("grid.png"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while pngs(&each).len() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no image appeared");
        assert!(child.try_wait().unwrap().is_none(), "generate ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let written = pngs(&each).len();
    assert!(err.contains(&format!("interrupted: wrote {written} of 20000 images")), "{written}: {err}");
    assert!(written < 20000);
    let staging: Vec<_> = std::fs::read_dir(&each)
        .unwrap()
        .chain(std::fs::read_dir(d).unwrap())
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(staging.is_empty(), "{staging:?}");
    assert!(!d.join("grid.png").exists(), "an interrupted run writes no grid");
    // Every image that was written is complete.
    for name in pngs(&each) {
        assert_eq!(image::open(each.join(&name)).unwrap().width(), 16, "{name}");
    }
}

#[test]
fn non_finite_model_output_stops_with_the_graph_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Finite weights (the exporter refuses NaN/Inf) so large that the head's velocity overflows.
    let model = tiny_export(d, |p| set_tensor(p, "head.net.final_layer.linear.weight", 3e38));
    let grid = d.join("grid.png");
    let out = runtime()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--classes", "1", "--steps", "2", "--quiet", "--out"])
        .arg(&grid)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("head_step produced non-finite values (velocity) at token 0 of images 0..1"), "{err}");
    assert!(!grid.exists());
    // Corrupt AR weights: the transformer's condition is caught at the prefill.
    let d2 = d.join("ar");
    std::fs::create_dir(&d2).unwrap();
    let model = tiny_export(&d2, |p| set_tensor(p, "layers.0.attention.wo.weight", 3e38));
    let out = runtime()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--classes", "1,2", "--steps", "2", "--quiet", "--out"])
        .arg(&grid)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("ar_prefill produced non-finite values (condition) at token 0"), "{err}");
    assert!(!grid.exists());
}
