//! `trainer import` on committed official-format fixtures (tests/fixtures/official, made by make_fixtures.py).

use std::path::PathBuf;
use std::process::Command;

use trainer::torch_pickle::read_torch_checkpoint;
use spherear_core::ModelConfig;
use tch::{Device, Kind, Tensor};
use trainer::ar::{ArModel, KvCache};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/official").join(name)
}

/// Every output of a model on fixed inputs: conditions (full + cached), head velocity, decoded image.
fn outputs(m: &ArModel) -> Vec<Tensor> {
    tch::manual_seed(0);
    let cfg = &m.config;
    let (l, d) = (cfg.num_tokens() as i64, cfg.latent_dim as i64);
    let z = Tensor::randn([2, l, d], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[1i64, cfg.null_class() as i64]);
    tch::no_grad(|| {
        let c = m.ar.conditions(&z, &ids);
        let mut cache = KvCache::new(cfg, 2);
        let c0 = m.ar.prefill(&ids, &mut cache);
        let v = m.ar.head.forward(&z.select(1, 0), &Tensor::from_slice(&[0.3f32, 0.7]), &c0);
        vec![c, c0, v, m.vae.decode(&z)]
    })
}

#[test]
fn import_gives_the_same_outputs_as_loading_the_tensors_directly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("imported");
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["import", "--official"])
        .arg(fixture("tiny-official.pt"))
        .args(["--preset", "tiny", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(so.contains("from the 'ema' state dict"), "{so}");
    let imported = ArModel::load(&out).unwrap();

    // Direct: the same tensors copied straight into a fresh model.
    let cfg = ModelConfig::preset("tiny").unwrap();
    let direct = ArModel::new(&cfg).unwrap();
    let ck = read_torch_checkpoint(&fixture("tiny-official.pt")).unwrap();
    tch::no_grad(|| {
        for (name, mut var) in direct.vs.variables() {
            let raw = &ck.tensors[&name];
            let shape: Vec<i64> = raw.shape.iter().map(|&s| s as i64).collect();
            var.copy_(&Tensor::from_slice(&raw.data).view(shape.as_slice()));
        }
    });
    for (a, b) in outputs(&imported).iter().zip(outputs(&direct)) {
        assert_eq!(f64::try_from((a - &b).abs().max()).unwrap(), 0.0);
    }
    // And the values are the fixture's (not, say, the `model` dict's).
    let want = ck.tensors["head.net.final_layer.linear.bias"].data.clone();
    let got = imported.vs.variables()["head.net.final_layer.linear.bias"].shallow_clone();
    assert_eq!(Vec::<f32>::try_from(got).unwrap(), want);
}

fn import_error(file: &str, preset: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["import", "--official"])
        .arg(fixture(file))
        .args(["--preset", preset, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(!out.join("ar.safetensors").exists(), "no output on failure");
    let se = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(se.trim().lines().count(), 1, "{se}");
    se
}

#[test]
fn renamed_or_reshaped_keys_are_named_in_the_error() {
    let e = import_error("tiny-renamed.pt", "tiny");
    assert!(
        e.contains("missing head.net.cond_embed.weight") && e.contains("unexpected head.net.cond_embedding.weight"),
        "{e}"
    );
    let e = import_error("tiny-reshaped.pt", "tiny");
    assert!(e.contains("proj_in.weight: shape [8, 32]"), "{e}");
    let e = import_error("tiny-official.pt", "fmnist-32");
    assert!(e.contains("does not match preset 'fmnist-32'"), "{e}");
    let e = import_error("tiny-evil.pt", "tiny");
    assert!(e.contains("refusing to load") && e.contains("system"), "{e}");
}

fn import(official: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["import", "--official"])
        .arg(official)
        .args(["--preset", "tiny", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = if e.path().is_file() { std::fs::read(e.path()).unwrap() } else { Vec::new() };
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    v.sort();
    v
}

fn failed_one_line(o: &std::process::Output, needle: &str) {
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{se}");
    assert!(se.contains(needle) && se.trim().lines().count() == 1, "{se}");
}

#[test]
fn import_replaces_an_existing_run_only_with_force_and_never_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    // An earlier run made with another preset.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    ModelConfig::preset("fmnist-32").unwrap().save(&run.join("config.json")).unwrap();
    std::fs::write(run.join("ar.safetensors"), b"earlier weights").unwrap();
    std::fs::write(run.join("train-ar.safetensors"), b"earlier checkpoint").unwrap();
    let before = files(&run);

    failed_one_line(&import(&fixture("tiny-official.pt"), &run, &[]), "pass --force");
    assert_eq!(files(&run), before);
    // A failed import with --force leaves the run as it was, and no staging folder.
    failed_one_line(&import(&fixture("tiny-renamed.pt"), &run, &["--force"]), "missing head.net.cond_embed.weight");
    assert_eq!(files(&run), before);
    assert_eq!(files(dir.path()).len(), 1, "{:?}", files(dir.path()).iter().map(|f| &f.0).collect::<Vec<_>>());
    // --force replaces the run folder whole.
    let o = import(&fixture("tiny-official.pt"), &run, &["--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names: Vec<String> = files(&run).into_iter().map(|f| f.0).collect();
    assert_eq!(names, ["ar.safetensors", "config.json"]);
    assert_eq!(ArModel::load(&run).unwrap().config, ModelConfig::preset("tiny").unwrap());
    assert_eq!(files(dir.path()).len(), 1, "no staging folder left");

    // A folder that does not hold a run is never replaced.
    let user = dir.path().join("user");
    std::fs::create_dir(&user).unwrap();
    std::fs::write(user.join("notes.txt"), b"mine").unwrap();
    failed_one_line(&import(&fixture("tiny-official.pt"), &user, &["--force"]), "remove or rename it yourself");
    assert_eq!(std::fs::read(user.join("notes.txt")).unwrap(), b"mine");
    // Nor one that holds the checkpoint being imported.
    let inside = dir.path().join("inside");
    std::fs::create_dir(&inside).unwrap();
    ModelConfig::preset("tiny").unwrap().save(&inside.join("config.json")).unwrap();
    std::fs::copy(fixture("tiny-official.pt"), inside.join("official.pt")).unwrap();
    failed_one_line(&import(&inside.join("official.pt"), &inside, &["--force"]), "contains this command's input");
    assert!(inside.join("official.pt").is_file() && !inside.join("ar.safetensors").exists());
}

/// `trainer sample` checks its outputs before sampling: an unwritable folder, a symlink, or one file given
/// for two outputs fail at once with one line, and nothing is written or replaced.
#[test]
fn sample_outputs_are_checked_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    assert!(import(&fixture("tiny-official.pt"), &run, &[]).status.success());
    let sample = |out: &std::path::Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["--threads", "1", "sample", "--checkpoint"])
            .arg(&run)
            .args(["--classes", "1", "--steps", "1", "--quiet", "--out"])
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    failed_one_line(&sample(std::path::Path::new("/proc/spherear-grid.png"), &[]), "not writable");
    let g = dir.path().join("g.png");
    failed_one_line(&sample(&g, &["--tokens-out", g.to_str().unwrap()]), "two outputs");
    let target = dir.path().join("precious.txt");
    std::fs::write(&target, "keep").unwrap();
    let link = dir.path().join("link.png");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    failed_one_line(&sample(&link, &[]), "symbolic link");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(!g.exists());
    // And a good request writes its grid.
    assert!(sample(&g, &[]).status.success());
    assert!(g.is_file());
}
