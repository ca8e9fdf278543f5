//! `runtime eval` end to end on a tiny random model, a random judge and a small ImageFolder dataset: every
//! number of the report is recomputed independently — the same images generated through the runtime,
//! scored by the **libtorch** judge (not the ONNX one), the Fréchet distance from the quality crate's statistics — and
//! must agree. Also the written files and a mismatched judge.

use std::path::Path;

use e2e::fixture;
use exporter::judge::{export_judge, JudgeExportOptions};
use quality::eval::{evaluate, quantize_like_png, EvalOptions, EvalReport, Judge};
use quality::stats::{frechet_distance, Gaussian};
use runtime::{GenerateRequest, Generator, GeneratorOptions};
use spherear_core::data::{self, Split};
use spherear_core::judge::JudgeConfig;
use tch::Tensor;
use trainer::judge::JudgeModel;

/// 4 classes of 16×16 images with class-dependent stripes plus per-image noise: train 6, test 5 per class.
fn write_dataset(root: &Path) {
    for (split, n) in [("train", 6), ("test", 5)] {
        for c in 0..4u32 {
            let dir = root.join(split).join(format!("class{c}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(16, 16, |x, y| {
                    let stripe = if (x / (c + 1)) % 2 == 0 { 200 } else { 40 };
                    let noise = ((x * 31 + y * 17 + i * 7 + c * 13) % 23) as u8;
                    image::Rgb([stripe + noise, (stripe / 2) + noise, (y * 8) as u8])
                });
                img.save(dir.join(format!("{i:02}.png"))).unwrap();
            }
        }
    }
}

/// (accuracy, features) of `images` under the tch judge.
fn tch_scores(m: &JudgeModel, images: &[f32], labels: &[i64]) -> (f64, Vec<f32>) {
    let n = labels.len() as i64;
    let x = Tensor::from_slice(images).view([n, 3, 16, 16]);
    let (logits, feats) = tch::no_grad(|| m.forward(&x));
    let pred = Vec::<i64>::try_from(logits.argmax(1, false)).unwrap();
    let hits = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
    (hits as f64 / labels.len() as f64, Vec::<f32>::try_from(feats.flatten(0, -1)).unwrap())
}

#[test]
fn eval_numbers_match_an_independent_recomputation() {
    tch::manual_seed(4);
    let fx = fixture("tiny", 9);
    let root = fx.dir.path().join("data");
    write_dataset(&root);
    let (run, jexp) = (fx.dir.path().join("judge-run"), fx.dir.path().join("judge"));
    let jcfg = JudgeConfig::default_for(16, 4);
    let jm = JudgeModel::new(&jcfg).unwrap();
    jm.save_folder(&run).unwrap();
    export_judge(&JudgeExportOptions { checkpoint: run, out: jexp.clone(), force: false }).unwrap();

    let g = Generator::load(&fx.fp32, &GeneratorOptions::default()).unwrap();
    let (env, _) = runtime::ortlib::environment(None).unwrap();
    let judge = Judge::load(&jexp, &env).unwrap();
    let out = fx.dir.path().join("eval");
    let o = EvalOptions {
        per_class: 3,
        cfgs: vec![1.0, 2.5],
        steps: vec![2],
        seed: 5,
        batch: 5,
        data: root.to_string_lossy().into_owned(),
        train_limit: None,
        out: Some(out.clone()),
    };
    let mut progressed = 0;
    let r = evaluate(g.manifest(), &judge, &o, |req| g.generate_images(req, |n| progressed += n)).unwrap();
    assert_eq!(progressed, 2 * 12 * 16, "progress counts images × tokens of both settings");
    assert_eq!((r.test_images, r.train_images, r.feature_dim), (20, 24, 128));
    assert_eq!(r.rows.len(), 3);

    let test = data::load(&data::parse_source(&o.data), Split::Test, 16, None).unwrap();
    let train = data::load(&data::parse_source(&o.data), Split::Train, 16, None).unwrap();
    let (test_acc, test_f) = tch_scores(&jm, &test.images, &test.labels);
    let (_, train_f) = tch_scores(&jm, &train.images, &train.labels);
    let test_g = Gaussian::fit(&test_f, 128).unwrap();
    let train_g = Gaussian::fit(&train_f, 128).unwrap();
    assert!((r.judge_test_accuracy.unwrap() - test_acc).abs() < 1e-12);

    // Reference row: the first 3 test images of each class vs the training split.
    let idx: Vec<usize> = (0..4).flat_map(|c| (0..3).map(move |i| c * 5 + i)).collect();
    let sub = test.subset(&idx);
    assert!(sub.labels.chunks(3).enumerate().all(|(c, l)| l.iter().all(|&x| x == c as i64)));
    let (acc, f) = tch_scores(&jm, &sub.images, &sub.labels);
    let fd = frechet_distance(&Gaussian::fit(&f, 128).unwrap(), &train_g).unwrap();
    let row = &r.rows[0];
    assert!(row.steps.is_none() && row.images == 12);
    assert!((row.accuracy - acc).abs() < 1e-12, "{} vs {acc}", row.accuracy);
    assert!((row.frechet_distance - fd).abs() <= 1e-3 * fd.max(1e-3), "{} vs {fd}", row.frechet_distance);

    // Generated rows: the same request through the runtime, quantised, scored by tch.
    for (row, cfg) in r.rows[1..].iter().zip([1.0f32, 2.5]) {
        let req = GenerateRequest::grid(&[0, 1, 2, 3], 3, cfg, 2, 5, 5).unwrap();
        let (tokens, _) = g.generate_tokens(&req, |_| {}).unwrap();
        let mut images = g.decode(&tokens, 5).unwrap();
        quantize_like_png(&mut images);
        let (acc, f) = tch_scores(&jm, &images, &req.classes);
        let fd = frechet_distance(&Gaussian::fit(&f, 128).unwrap(), &test_g).unwrap();
        assert_eq!((row.steps, row.cfg, row.images), (Some(2), Some(cfg), 12));
        assert!((row.accuracy - acc).abs() < 1e-12, "cfg {cfg}: {} vs {acc}", row.accuracy);
        assert!((row.frechet_distance - fd).abs() <= 1e-3 * fd, "cfg {cfg}: {} vs {fd}", row.frechet_distance);
        assert!(fd > 0.0);
    }
    // Random weights, yet CFG changes the images: the two settings must not score identically.
    assert_ne!(r.rows[1].frechet_distance, r.rows[2].frechet_distance);

    let back: EvalReport = serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(back.rows.len(), 3);
    let md = std::fs::read_to_string(out.join("eval.md")).unwrap();
    assert!(md.contains("| generated | 2 | 2.5 | 12 |") && md.contains("reference (real test vs train)"), "{md}");
    assert_eq!(image::open(out.join("eval.png")).unwrap().width(), 960);

    // A judge for another image size is refused before any generation.
    let (run2, jexp2) = (fx.dir.path().join("judge32-run"), fx.dir.path().join("judge32"));
    JudgeModel::new(&JudgeConfig::default_for(32, 4)).unwrap().save_folder(&run2).unwrap();
    export_judge(&JudgeExportOptions { checkpoint: run2, out: jexp2.clone(), force: false }).unwrap();
    let j32 = Judge::load(&jexp2, &env).unwrap();
    let e = evaluate(g.manifest(), &j32, &EvalOptions { out: None, ..o }, |req| g.generate_images(req, |_| {}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit the model"), "{e}");
}
