//! Judge classifier tests: weight names equal core's key list, save/load round trip, a short
//! Fashion-MNIST run that learns (loss falls, test accuracy well above chance) and resumes, and the CLI.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use spherear_core::data::parse_source;
use spherear_core::judge::{
    judge_keys, JudgeConfig, JUDGE_CONFIG_FILE, JUDGE_METRICS_FILE, JUDGE_TRAIN_FILE, JUDGE_WEIGHTS_FILE,
};
use tch::{Kind, Tensor};
use trainer::fit_judge::{fit_judge, JudgeFitArgs};
use trainer::judge::JudgeModel;

mod common;
use common::{trainer, write_image_folder};

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn judge_weights_follow_core_keys_and_round_trip() {
    tch::manual_seed(0);
    let cfg = JudgeConfig::default_for(32, 10);
    let m = JudgeModel::new(&cfg).unwrap();
    let ours: Vec<(String, Vec<i64>)> = m.weights().into_iter().map(|(k, t)| (k, t.size())).collect();
    let mut want: Vec<(String, Vec<i64>)> =
        judge_keys(&cfg).into_iter().map(|k| (k.name, k.shape.iter().map(|&s| s as i64).collect())).collect();
    want.sort();
    assert_eq!(ours, want);

    let x = Tensor::rand([5, 3, 32, 32], (Kind::Float, tch::Device::Cpu)) * 2.0 - 1.0;
    let (logits, features) = m.forward(&x);
    assert_eq!(logits.size(), vec![5, 10]);
    assert_eq!(features.size(), vec![5, 128]);
    assert!(features.min().double_value(&[]) >= 0.0, "features are after a ReLU");
    assert!(max_abs(&features) > 0.0);

    let dir = tempfile::tempdir().unwrap();
    m.save_folder(dir.path()).unwrap();
    tch::manual_seed(1);
    let back = JudgeModel::load(dir.path()).unwrap();
    let (l2, f2) = back.forward(&x);
    assert_eq!(max_abs(&(&l2 - &logits)), 0.0);
    assert_eq!(max_abs(&(&f2 - &features)), 0.0);
    // A different random judge differs, so the comparison above means something.
    assert!(max_abs(&(JudgeModel::new(&cfg).unwrap().forward(&x).0 - &logits)) > 1e-4);
    // The config file must describe the weights.
    JudgeConfig { feature_dim: 64, ..cfg }.save(&dir.path().join(JUDGE_CONFIG_FILE)).unwrap();
    let err = JudgeModel::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("judge-config.json"), "{err}");
}

fn args(out: PathBuf, steps: usize) -> JudgeFitArgs {
    let mut a = JudgeFitArgs::new(parse_source("fashion-mnist"), out, 32);
    a.train.steps = steps;
    a.train.batch = 64;
    a.train.warmup = 20;
    a.train.ckpt_every = 50;
    a.train.limit = Some(2000);
    a.train.progress = false;
    a.eval_images = Some(500);
    a
}

#[test]
fn short_fashion_mnist_run_learns_and_resumes() {
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let never = AtomicBool::new(false);

    let r1 = fit_judge(&args(out.clone(), 75), &never).unwrap();
    assert_eq!((r1.run.resumed_from, r1.run.steps_done, r1.run.interrupted), (0, 75, false));
    assert_eq!((r1.train_images, r1.test_images, r1.dataset.as_str()), (2000, 500, "fashion-mnist"));
    for f in [JUDGE_CONFIG_FILE, JUDGE_WEIGHTS_FILE, JUDGE_METRICS_FILE, JUDGE_TRAIN_FILE] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    let r2 = fit_judge(&args(out.clone(), 150), &never).unwrap();
    let (first, mid, last) = (r1.run.first_loss.unwrap(), r2.run.first_loss.unwrap(), r2.run.last_loss.unwrap());
    let acc = r2.test_accuracy.unwrap();
    let r1_last = r1.run.last_loss.unwrap();
    println!("judge: loss {first:.3} -> {r1_last:.3} | resumed {mid:.3} -> {last:.3}; test accuracy {acc:.3}");
    assert_eq!((r2.run.resumed_from, r2.run.steps_done), (75, 150));
    // The resumed run starts from the trained weights, not from scratch, and the loss keeps falling.
    assert!(mid < 0.6 * first, "resumed run starts at loss {mid}, the first run started at {first}");
    assert!(last < 0.4 * first, "loss fell only from {first} to {last}");
    assert!(acc > 0.6, "test accuracy {acc} (chance 0.1)");

    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(JUDGE_METRICS_FILE)).unwrap()).unwrap();
    assert_eq!(metrics["test_accuracy"].as_f64(), Some(acc));
    assert_eq!(metrics["resumed_from"].as_u64(), Some(75));
    assert_eq!(metrics["steps_done"].as_u64(), Some(150));
    let cfg = JudgeConfig::load(&out.join(JUDGE_CONFIG_FILE)).unwrap();
    assert_eq!(cfg, JudgeConfig::default_for(32, 10));
    // The written weights reproduce the reported accuracy's model.
    let m = JudgeModel::load(&out).unwrap();
    let test =
        spherear_core::data::load(&parse_source("fashion-mnist"), spherear_core::data::Split::Test, 32, Some(500))
            .unwrap();
    assert_eq!(trainer::fit_judge::accuracy(&m, &test), acc);
}

#[test]
fn judge_cli_runs_and_refuses_bad_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_image_folder(&data, 4);
    let out = dir.path().join("run");
    let o = trainer()
        .args(["fit", "--stage", "judge", "--preset", "tiny", "--quiet", "--steps", "6", "--batch", "4"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("judge: steps 6/6") && stdout.contains("judge test accuracy:"), "{stdout}");
    assert_eq!(JudgeConfig::load(&out.join(JUDGE_CONFIG_FILE)).unwrap(), JudgeConfig::default_for(16, 2));
    assert!(out.join(JUDGE_WEIGHTS_FILE).is_file());

    let bad_out = dir.path().join("bad");
    let o = trainer()
        .args(["fit", "--stage", "judge", "--quiet", "--data"])
        .arg(dir.path().join("no-such-data"))
        .arg("--out")
        .arg(&bad_out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!bad_out.exists());
}
