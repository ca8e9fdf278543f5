//! S-VAE tests: official key layout, overfitting, checkpoints, resume after a kill, Ctrl-C, bad input.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spherear_core::ModelConfig;
use tch::{Kind, Tensor};
use trainer::checkpoint;
use trainer::fit_vae::{batch_tensor, train_ckpt_path, train_step, VaeModel};
use trainer::optim::{AdamW, AdamWConfig};
use trainer::recipe::ReconLoss;

mod common;
use common::{trainer, write_image_folder};

fn official_keys(prefix: &str) -> BTreeMap<String, Vec<i64>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/official-state-dict-B.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| {
            let (k, s) = l.split_once(' ').unwrap();
            let dims = s.trim_matches(|c| c == '[' || c == ']').split(',').map(|d| d.trim().parse().unwrap()).collect();
            (k.to_string(), dims)
        })
        .collect()
}

#[test]
fn spherear_b_vae_keys_and_shapes_equal_the_official_list() {
    let cfg = ModelConfig::preset("spherear-b").unwrap();
    let m = VaeModel::new(&cfg).unwrap();
    let ours: BTreeMap<String, Vec<i64>> = m.vs.variables().into_iter().map(|(k, t)| (k, t.size())).collect();
    let official = official_keys("vae.");
    assert_eq!(official.len(), 202, "fixture should hold 202 vae.* lines");
    // The persistent RoPE buffers are part of both lists.
    assert!(ours.contains_key("vae.encoder.freqs_cis") && ours.contains_key("vae.decoder.freqs_cis"));
    let missing: Vec<_> = official.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !official.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
    for (k, s) in &official {
        assert_eq!(&ours[k], s, "shape of {k}");
    }
    // freqs_cis is not trained.
    let trainable = m.vs.trainable_variables().len();
    assert_eq!(trainable, official.len() - 2);
}

/// A small deterministic image set: 16 images of smooth coloured patterns in [−1, 1].
fn pattern_images(n: i64, size: i64) -> Tensor {
    let y = Tensor::arange(size, (Kind::Float, tch::Device::Cpu)).view([1, 1, size, 1]) / size as f64;
    let x = Tensor::arange(size, (Kind::Float, tch::Device::Cpu)).view([1, 1, 1, size]) / size as f64;
    let k = Tensor::arange(n, (Kind::Float, tch::Device::Cpu)).view([n, 1, 1, 1]);
    let c = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([1, 3, 1, 1]);
    ((&x * (&k + 1.0) * 3.0 + &y * &c * 2.0 + &k).sin() * 0.9).to_kind(Kind::Float)
}

#[test]
fn tiny_vae_overfits_16_images() {
    tch::manual_seed(0);
    let cfg = ModelConfig::preset("tiny").unwrap();
    let m = VaeModel::new(&cfg).unwrap();
    let mut opt = AdamW::new(&m.vs, |n| n.starts_with("vae."), AdamWConfig::default());
    let x = pattern_images(16, cfg.image_size as i64);
    let mut losses = Vec::new();
    for _ in 0..300 {
        losses.push(train_step(&m, &mut opt, &x, 0.004, 1.0, 2e-3, ReconLoss::Mse).loss);
    }
    let first = losses[..5].iter().sum::<f64>() / 5.0;
    let last = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    println!("tiny VAE overfit: loss {first:.4} -> {last:.4} ({:.1}x)", first / last);
    assert!(last * 5.0 <= first, "loss fell only from {first} to {last}");
}

#[test]
fn checkpoint_save_then_load_gives_identical_outputs() {
    tch::manual_seed(3);
    let cfg = ModelConfig::preset("tiny").unwrap();
    let m = VaeModel::new(&cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vae.safetensors");
    m.save_weights(&p).unwrap();
    tch::manual_seed(4);
    let m2 = VaeModel::load(&p, Some(&cfg)).unwrap();
    let x = pattern_images(4, cfg.image_size as i64);
    let a = m.reconstruct(&x, false);
    let b = m2.reconstruct(&x, false);
    assert_eq!(f64::try_from((a - b).abs().max()).unwrap(), 0.0);
    // A freshly initialised model differs, so the comparison above is meaningful.
    let m3 = VaeModel::new(&cfg).unwrap();
    assert!(f64::try_from((m3.reconstruct(&x, false) - m.reconstruct(&x, false)).abs().max()).unwrap() > 1e-4);
    // Wrong preset for a checkpoint is named.
    let err = VaeModel::load(&p, Some(&ModelConfig::preset("fmnist-32").unwrap())).err().unwrap().to_string();
    assert!(err.contains("preset 'tiny'") && err.contains("'fmnist-32'"), "{err}");
}

#[test]
fn dataset_batches_feed_the_model() {
    let dir = tempfile::tempdir().unwrap();
    write_image_folder(dir.path(), 4);
    let ds = spherear_core::data::load(
        &spherear_core::data::parse_source(dir.path().to_str().unwrap()),
        spherear_core::data::Split::Train,
        16,
        None,
    )
    .unwrap();
    let t = batch_tensor(&ds, &[0, 1, 2], None);
    assert_eq!(t.size(), vec![3, 3, 16, 16]);
    let lo = f64::try_from(t.min()).unwrap();
    let hi = f64::try_from(t.max()).unwrap();
    assert!(lo >= -1.0 && hi <= 1.0 && hi > lo);
}

// ---------- the CLI: resume after a kill, Ctrl-C, bad input ----------

fn fit_args(data: &Path, out: &Path, steps: usize) -> Vec<String> {
    [
        "fit",
        "--stage",
        "vae",
        "--preset",
        "tiny",
        "--quiet",
        "--batch",
        "8",
        "--eval-images",
        "8",
        "--ckpt-every",
        "5",
        "--warmup",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--data".into(), data.display().to_string(), "--out".into(), out.display().to_string()])
    .chain(["--steps".into(), steps.to_string()])
    .collect()
}

fn ckpt_step(out: &Path) -> Option<usize> {
    let p = train_ckpt_path(out);
    let f = checkpoint::load(&p).ok()?;
    f.meta(&p, "step").ok()?.parse().ok()
}

fn wait_for_step(out: &Path, at_least: usize) -> usize {
    let t0 = Instant::now();
    loop {
        if let Some(s) = ckpt_step(out) {
            if s >= at_least {
                return s;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn killed_run_resumes_at_its_saved_step() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("run"));
    write_image_folder(&data, 8);
    let steps = 4000;
    let mut child =
        trainer().args(fit_args(&data, &out, steps)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_step(&out, 10);
    child.kill().unwrap(); // SIGKILL: no chance to write anything more
    child.wait().unwrap();
    let saved = ckpt_step(&out).unwrap();
    assert!(saved >= 10 && saved < steps, "saved step {saved}");
    // Rerunning the same command (with fewer total steps so the test stays short) resumes there.
    let total = saved + 6;
    let o = trainer().args(fit_args(&data, &out, total)).output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{se}");
    assert!(se.contains(&format!("resuming VAE training from step {saved}")), "{se}");
    assert!(so.contains(&format!("steps {total}/{total} (resumed from {saved})")), "{so}");
    assert_eq!(ckpt_step(&out), Some(total));
    assert!(out.join("vae.safetensors").exists() && out.join("vae-recon.png").exists());
    // A finished run rerun does no more steps and says so.
    let o = trainer().args(fit_args(&data, &out, total)).output().unwrap();
    let so = String::from_utf8_lossy(&o.stdout);
    assert!(so.contains(&format!("vae stage already finished ({total}/{total} steps)")), "{so}");
}

#[test]
fn ctrl_c_writes_a_checkpoint_before_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("run"));
    write_image_folder(&data, 8);
    let mut args = fit_args(&data, &out, 100000);
    // Checkpoints only through Ctrl-C: the periodic interval is beyond the run.
    let i = args.iter().position(|a| a == "--ckpt-every").unwrap();
    args[i + 1] = "1000000".into();
    let child = trainer().args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(ckpt_step(&out).is_none());
    let st = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{se}");
    let saved = ckpt_step(&out).expect("checkpoint written on Ctrl-C");
    assert!(saved > 0);
    assert!(se.contains(&format!("stopped at step {saved}/100000")), "{se}");
    assert!(!out.join("vae.safetensors").exists(), "no final weights for an interrupted run");
}

fn assert_one_line_error(o: &std::process::Output, needle: &str) {
    let se = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure");
    assert!(se.contains(needle), "stderr lacks '{needle}': {se}");
    assert!(!se.contains("panicked"), "{se}");
    assert_eq!(se.trim().lines().count(), 1, "one error line expected: {se}");
}

#[test]
fn bad_input_gives_one_clear_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("run"));
    write_image_folder(&data, 4);

    // Missing data.
    let o = trainer().args(fit_args(&dir.path().join("nope"), &out, 5)).output().unwrap();
    assert_one_line_error(&o, "nope");
    assert!(!out.join("vae.safetensors").exists());

    // Empty data folder.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = trainer().args(fit_args(&empty, &out, 5)).output().unwrap();
    assert_one_line_error(&o, "empty");

    // Corrupt checkpoint.
    let o = trainer().args(fit_args(&data, &out, 5)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(train_ckpt_path(&out), b"\x10\x00\x00\x00\x00\x00\x00\x00garbage").unwrap();
    let o = trainer().args(fit_args(&data, &out, 10)).output().unwrap();
    assert_one_line_error(&o, "not a valid safetensors file");

    // Wrong preset for an existing run.
    let mut args = fit_args(&data, &out, 10);
    let i = args.iter().position(|a| a == "tiny").unwrap();
    args[i] = "fmnist-32".into();
    let o = trainer().args(&args).output().unwrap();
    assert_one_line_error(&o, "preset 'tiny'");

    // Unknown preset.
    args[i] = "spherear-q".into();
    let o = trainer().args(&args).output().unwrap();
    assert_one_line_error(&o, "unknown preset");
}
