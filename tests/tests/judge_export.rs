//! `exporter judge` against the tch judge: the graph passes the ONNX full check, and ONNX Runtime's
//! `logits` and `features` match tch to 1e-4·max|out| on a random judge; the manifest loads with core's
//! `JudgeManifest::load`.

use e2e::{read_tensor, rel_err, run_py, write_tensors};
use exporter::judge::{export_judge, JudgeExportOptions};
use spherear_core::judge::{JudgeConfig, JudgeManifest, JUDGE_GRAPH_FILE, JUDGE_METRICS_FILE};
use tch::{Kind, Tensor};
use trainer::judge::JudgeModel;

const FP32_TOL: f64 = 1e-4;

#[test]
fn judge_onnx_matches_tch_and_manifest_loads() {
    tch::manual_seed(11);
    let dir = tempfile::tempdir().unwrap();
    let (run, out) = (dir.path().join("run"), dir.path().join("export"));
    let cfg = JudgeConfig::default_for(32, 10);
    let m = JudgeModel::new(&cfg).unwrap();
    m.save_folder(&run).unwrap();
    std::fs::write(run.join(JUDGE_METRICS_FILE), r#"{"test_accuracy": 0.875, "dataset": "fashion-mnist"}"#).unwrap();
    let manifest = export_judge(&JudgeExportOptions { checkpoint: run, out: out.clone(), force: false }).unwrap();

    let loaded = JudgeManifest::load(&out).unwrap();
    assert_eq!(loaded, manifest);
    assert_eq!((loaded.config, loaded.test_accuracy, loaded.dataset.as_str()), (cfg, Some(0.875), "fashion-mnist"));
    let graph = out.join(&loaded.file);
    assert_eq!(loaded.file, JUDGE_GRAPH_FILE);
    let checked = run_py(&["check", graph.to_str().unwrap()]);
    assert!(checked.contains("inputs ['image'] outputs ['logits', 'features']"), "{checked}");

    // Batch 7: four Fashion-MNIST test images (as training sees them) and three uniform-noise images in [-1, 1].
    let src = spherear_core::data::parse_source("fashion-mnist");
    let real = spherear_core::data::load(&src, spherear_core::data::Split::Test, 32, Some(4)).unwrap();
    let real = trainer::fit_judge::batch(&real, &[0, 1, 2, 3], None).0;
    let noise = Tensor::rand([3, 3, 32, 32], (Kind::Float, tch::Device::Cpu)) * 2.0 - 1.0;
    let x = Tensor::cat(&[real, noise], 0);
    let (want_logits, want_features) = m.forward(&x);
    let (inp, res) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    write_tensors(&inp, &[("image", &x)]);
    run_py(&["run", graph.to_str().unwrap(), inp.to_str().unwrap(), res.to_str().unwrap()]);
    let (logits, features) = (read_tensor(&res, "logits"), read_tensor(&res, "features"));
    let (el, ef) = (rel_err(&logits, &want_logits), rel_err(&features, &want_features));
    println!("judge parity: logits rel err {el:.2e}, features rel err {ef:.2e} (tol {FP32_TOL:.0e})");
    assert!(want_features.abs().max().double_value(&[]) > 1e-3, "features must not be all zero");
    assert!(el <= FP32_TOL, "logits: {el:e}");
    assert!(ef <= FP32_TOL, "features: {ef:e}");
    assert_eq!(
        Vec::<i64>::try_from(logits.argmax(-1, false)).unwrap(),
        Vec::<i64>::try_from(want_logits.argmax(-1, false)).unwrap()
    );
}
