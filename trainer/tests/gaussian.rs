//! The diagonal-Gaussian baseline (`--posterior gaussian`) through the CLI: the VAE records its posterior,
//! the AR stage inherits it (and refuses another), the latent scale is folded into the shipped VAE exactly,
//! and sampled tokens are not projected onto the sphere.

use std::path::Path;
use std::process::Output;

mod common;
use common::{trainer, write_image_folder};
use spherear_core::Posterior;
use tch::{Kind, Tensor};
use trainer::ar::ArModel;
use trainer::checkpoint;
use trainer::fit_vae::VaeModel;

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn fails(o: Output, needle: &str) {
    let se = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && se.contains(needle), "wanted '{needle}': {se}");
    assert_eq!(se.trim().lines().count(), 1, "{se}");
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn gaussian_vae_and_ar_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = (dir.path().join("data"), dir.path().join("run"));
    write_image_folder(&data, 6);
    let (d, r) = (data.display().to_string(), run.display().to_string());
    let vae = |posterior: &str| {
        trainer()
            .args(["fit", "--stage", "vae", "--preset", "tiny", "--quiet", "--batch", "4", "--steps", "3"])
            .args(["--eval-images", "4", "--posterior", posterior, "--data", &d, "--out", &r])
            .output()
            .unwrap()
    };
    let out = ok(vae("gaussian"));
    assert!(out.contains("held-out PSNR"), "{out}");
    let cfg = json(&run.join("config.json"));
    assert_eq!(cfg["vae"]["posterior"], "gaussian");
    let metrics = json(&run.join("vae-metrics.json"));
    assert!(metrics["psnr_mode_db"].as_f64().unwrap().is_finite(), "{metrics}");
    // quant_proj keeps its official name and gives (μ, log σ²): 2d outputs (tiny: d = 8, z = 32).
    let v = checkpoint::load(&run.join("vae.safetensors")).unwrap();
    assert_eq!(v.tensors["vae.quant_proj.weight"].size(), vec![16, 32]);
    assert_eq!(v.tensors["vae.quant_proj.bias"].size(), vec![16]);
    // The run folder now belongs to a Gaussian VAE: the spherical default is refused, naming both.
    fails(vae("spherical"), "was made with the gaussian posterior but spherical was asked for");

    let ar = |extra: &[&str]| {
        trainer()
            .args(["fit", "--stage", "ar", "--preset", "tiny", "--quiet", "--batch", "4", "--warmup", "1"])
            .args(["--steps", "3", "--vae", &r, "--data", &d, "--out", &r])
            .args(extra)
            .output()
            .unwrap()
    };
    fails(ar(&["--posterior", "spherical"]), "--posterior spherical but the VAE");
    assert!(!run.join("latents.safetensors").exists(), "refused before any work");
    let out = ok(ar(&["--posterior", "gaussian"]));
    assert!(out.contains("ar: steps 3/3"), "{out}");
    let lat = checkpoint::load(&run.join("latents.safetensors")).unwrap();
    assert!(lat.tensors.contains_key("mean") && lat.tensors.contains_key("logvar"));
    let s = json(&run.join("ar-metrics.json"))["latent_scale"].as_f64().expect("latent_scale recorded");
    // s is 1/√mean(μ² + σ²) over the cache.
    let (mean, logvar) = (&lat.tensors["mean"], &lat.tensors["logvar"]);
    let ms = (mean.square() + logvar.clamp(-30.0, 20.0).exp()).mean(Kind::Double).double_value(&[]);
    assert!((s * ms.sqrt() - 1.0).abs() < 1e-5, "scale {s} vs mean square {ms}");
    assert!((s - 1.0).abs() > 1e-3, "an untrained encoder's latents are not of unit RMS already ({s})");

    // The shipped VAE is the trained one with s folded in: it encodes to s·μ and decodes s·z like the
    // trained VAE decodes z.
    let trained = VaeModel::load(&run.join("vae.safetensors"), None).unwrap();
    let shipped = ArModel::load(&run).unwrap();
    assert_eq!(shipped.config.vae.posterior, Posterior::Gaussian);
    tch::manual_seed(0);
    let x = Tensor::rand([2, 3, 16, 16], (Kind::Float, tch::Device::Cpu)) * 2.0 - 1.0;
    tch::no_grad(|| {
        let (z0, z1) = (trained.vae.encode_mode(&x), shipped.vae.encode_mode(&x));
        assert!(max_abs(&(&z0 * s), &z1) < 1e-4 * z1.abs().max().double_value(&[]).max(1.0), "encoder not folded");
        let z = Tensor::randn([2, 16, 8], (Kind::Float, tch::Device::Cpu));
        let (a, b) = (trained.vae.decode(&z), shipped.vae.decode(&(&z * s)));
        assert!(max_abs(&a, &b) < 1e-4, "decoder not folded: {}", max_abs(&a, &b));
    });

    // Sampled tokens are not projected: their norms vary (a spherical model's are all R = √8).
    let tokens = dir.path().join("tokens.safetensors");
    ok(trainer()
        .args(["sample", "--checkpoint", &r, "--classes", "0,1", "--steps", "2", "--quiet"])
        .args(["--out", &dir.path().join("grid.png").display().to_string()])
        .args(["--tokens-out", &tokens.display().to_string()])
        .output()
        .unwrap());
    let t = checkpoint::load(&tokens).unwrap().tensors["tokens"].shallow_clone();
    let norms = t.norm_scalaropt_dim(2, [-1i64].as_slice(), false);
    let off = (norms - 8f64.sqrt()).abs().max().double_value(&[]);
    assert!(off > 0.1, "Gaussian tokens all of norm R (max deviation {off})");
}

#[test]
fn posterior_families_encode_as_documented() {
    tch::manual_seed(5);
    let x = Tensor::rand([3, 3, 16, 16], (Kind::Float, tch::Device::Cpu)) * 2.0 - 1.0;
    let r = 8f64.sqrt();
    let norms = |z: &Tensor| z.norm_scalaropt_dim(2, [-1i64].as_slice(), false);
    for family in [Posterior::PowerSpherical, Posterior::Gaussian, Posterior::GaussianNorm] {
        let mut cfg = spherear_core::ModelConfig::preset("tiny").unwrap();
        cfg.vae.posterior = family;
        let m = VaeModel::new(&cfg).unwrap();
        tch::no_grad(|| {
            let q = m.vae.posterior(&x);
            let (z, kl) = m.vae.encode(&x);
            let mode = m.vae.encode_mode(&x);
            assert_eq!(z.size(), vec![3, 16, 8]);
            let off = |t: &Tensor| (norms(t) - r).abs().max().double_value(&[]);
            match family {
                Posterior::Gaussian => {
                    assert!(off(&z) > 0.1 && off(&mode) > 0.1, "Gaussian tokens are not projected");
                    let trainer::vae::PosteriorParams::Gaussian { mean, logvar } = &q else { panic!("not Gaussian") };
                    assert_eq!(max_abs(&mode, mean), 0.0, "the mode is μ");
                    // The KL term: ½(μ² + σ² − 1 − log σ²) averaged over all N·L·d elements.
                    let want = ((mean.square() + logvar.exp() - 1.0 - logvar) * 0.5).mean(Kind::Double);
                    assert!((kl.double_value(&[]) - want.double_value(&[])).abs() < 1e-5 * want.double_value(&[]));
                }
                _ => assert!(off(&z) < 1e-4 && off(&mode) < 1e-4, "{family}: tokens off the sphere"),
            }
            assert!(kl.double_value(&[]) > 0.0);
        });
    }
}
