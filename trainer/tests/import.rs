//! `trainer import` on committed official-format fixtures (tests/fixtures/official, made by make_fixtures.py).

use std::path::PathBuf;
use std::process::Command;

use spherear_core::torch_pickle::read_torch_checkpoint;
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
    let direct = ArModel::new(&cfg);
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
