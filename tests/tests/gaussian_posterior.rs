//! The posterior choice end to end: a tiny VAE + AR model trained (a few steps) with the spherical and with the
//! Gaussian posterior, exported, and sampled by the runtime. The manifest records the posterior; spherical
//! tokens all have norm R, Gaussian ones do not (no projection anywhere); the runtime matches the libtorch
//! reference sampler on both, and its decoded images match the libtorch decoder.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use runtime::{GenerateRequest, Generator, GeneratorOptions};
use spherear_core::data::parse_source;
use spherear_core::Posterior;
use trainer::ar::ArModel;
use trainer::fit_ar::{fit_ar, ArFitArgs};
use trainer::fit_vae::{fit_vae, VaeFitArgs};
use trainer::sample::{decode, sample_tokens, SampleRequest};

/// Two classes of six 16×16 images (discs and stripes).
fn write_image_folder(root: &Path) {
    for (c, name) in ["discs", "stripes"].iter().enumerate() {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..6i32 {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                let on = if c == 0 {
                    let (dx, dy) = (x as i32 - 8, y as i32 - 8);
                    dx * dx + dy * dy < (3 + i) * (3 + i)
                } else {
                    (x as i32 + i) % 4 < 2
                };
                let v = if on { 220 } else { 30 };
                image::Rgb([v, v / 2, 255 - v])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// Trains the VAE (3 steps) and the AR model (3 steps) of `posterior` into `run`, exports it into `export`.
fn train_and_export(data: &Path, run: &Path, export: &Path, posterior: Posterior) {
    let stop = AtomicBool::new(false);
    let src = parse_source(&data.display().to_string());
    let mut v = VaeFitArgs::new("tiny", src.clone(), run.to_path_buf()).with_posterior(posterior);
    v.train.steps = 3;
    v.train.batch = 4;
    v.train.progress = false;
    v.eval_images = 4;
    fit_vae(&v, &stop).unwrap();
    let mut a = ArFitArgs::new(run.to_path_buf(), "tiny", src, run.to_path_buf());
    a.train.steps = 3;
    a.train.batch = 4;
    a.train.warmup = 1;
    a.train.progress = false;
    fit_ar(&a, &stop).unwrap();
    exporter::export(&exporter::ExportOptions { max_batch: 8, ..exporter::ExportOptions::new(run, export) }).unwrap();
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn gaussian_tokens_are_not_projected_and_the_runtime_follows_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_image_folder(&data);
    let radius = 8f32.sqrt();
    for posterior in [Posterior::PowerSpherical, Posterior::Gaussian] {
        let (run, export) = (dir.path().join(posterior.name()), dir.path().join(format!("{}-onnx", posterior.name())));
        train_and_export(&data, &run, &export, posterior);
        let text = std::fs::read_to_string(export.join("manifest.json")).unwrap();
        let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(manifest["posterior"], posterior.name());
        assert_eq!(manifest["config"]["vae"]["posterior"], posterior.name());

        let g = Generator::load(&export, &GeneratorOptions { threads: Some(2), ..Default::default() }).unwrap();
        assert_eq!(g.manifest().posterior, posterior);
        // cfg 1 (no guidance): the trained-for-3-steps model is smooth enough for token parity.
        let req = GenerateRequest::grid(&[0, 1], 2, 1.0, 2, 5, 4).unwrap();
        let (tokens, _) = g.generate_tokens(&req, |_| {}).unwrap();
        let norms: Vec<f32> =
            tokens.data.chunks(tokens.dim).map(|t| t.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
        let off = norms.iter().map(|n| (n - radius).abs()).fold(0.0, f32::max);
        println!(
            "{posterior}: token norms {:.3}..{:.3}, max |norm − R| {off:.3}",
            norms.iter().copied().fold(f32::MAX, f32::min),
            norms.iter().copied().fold(0.0, f32::max)
        );
        match posterior {
            Posterior::Gaussian => assert!(off > 0.1, "Gaussian tokens all of norm R (max deviation {off})"),
            _ => assert!(off < 1e-4, "spherical tokens off the sphere by {off}"),
        }

        // The libtorch reference sampler on the same checkpoint, noise and request: same tokens, same images.
        let m = ArModel::load(&run).unwrap();
        let sreq = SampleRequest { batch: 3, ..req.clone() };
        let want = sample_tokens(&m, &sreq, |_| {}).unwrap();
        let want_v = Vec::<f32>::try_from(want.flatten(0, -1)).unwrap();
        let scale = want_v.iter().fold(1f32, |a, v| a.max(v.abs()));
        let diff = max_abs(&tokens.data, &want_v);
        assert!(diff <= 1e-3 * scale, "{posterior}: runtime vs trainer tokens differ by {diff} (scale {scale})");
        let images = g.decode(&tokens, 4).unwrap();
        let want_img = Vec::<f32>::try_from(decode(&m, &want).flatten(0, -1)).unwrap();
        let img_diff = max_abs(&images, &want_img);
        assert!(img_diff < 1e-2, "{posterior}: decoded images differ by {img_diff}");
    }
}
