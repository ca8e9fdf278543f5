//! The AR stage through the CLI: resume after an interrupted run, sampling, bad input.

use std::process::Output;

mod common;
use common::{trainer, write_image_folder};
use trainer::checkpoint;

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn ar_stage_resumes_from_its_checkpoint_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = (dir.path().join("data"), dir.path().join("run"));
    write_image_folder(&data, 6);
    let d = data.display().to_string();
    let r = run.display().to_string();
    ok(trainer()
        .args([
            "fit",
            "--stage",
            "vae",
            "--preset",
            "tiny",
            "--quiet",
            "--batch",
            "4",
            "--steps",
            "3",
            "--eval-images",
            "4",
        ])
        .args(["--data", &d, "--out", &r])
        .output()
        .unwrap());
    let ar = |steps: &str| {
        trainer()
            .args(["fit", "--stage", "ar", "--preset", "tiny", "--quiet", "--batch", "4", "--warmup", "2"])
            .args(["--ckpt-every", "3", "--steps", steps, "--vae", &r, "--data", &d, "--out", &r])
            .output()
            .unwrap()
    };
    // A first run of 6 steps, then the same command asked for 9: it resumes at 6 with the EMA restored.
    let first = ok(ar("6"));
    assert!(first.contains("ar: steps 6/6 (resumed from 0)"), "{first}");
    let ck = checkpoint::load(&run.join("train-ar.safetensors")).unwrap();
    assert_eq!(ck.metadata["step"], "6");
    assert!(ck.tensors.contains_key("ema.proj_in.weight") && ck.tensors.contains_key("optim.m.proj_in.weight"));
    let again = ok(ar("9"));
    assert!(again.contains("resuming AR training from step 6"), "{again}");
    assert!(again.contains("using cached latents"), "{again}");
    assert!(again.contains("ar: steps 9/9 (resumed from 6)"), "{again}");

    // The shipped file holds the EMA weights (not the raw ones) plus the VAE, in the official layout.
    let shipped = checkpoint::load(&run.join("ar.safetensors")).unwrap();
    let ck = checkpoint::load(&run.join("train-ar.safetensors")).unwrap();
    let name = "head.net.cond_embed.weight";
    let (ema, raw) = (&ck.tensors[&format!("ema.{name}")], &ck.tensors[name]);
    assert_eq!(f64::try_from((&shipped.tensors[name] - ema).abs().max()).unwrap(), 0.0);
    assert!(f64::try_from((raw - ema).abs().max()).unwrap() > 0.0);
    assert!(shipped.tensors.contains_key("vae.decoder.conv_out.2.weight"));

    let png = dir.path().join("grid.png");
    let out = ok(trainer()
        .args([
            "sample",
            "--checkpoint",
            &r,
            "--classes",
            "2,0",
            "--per-class",
            "3",
            "--steps",
            "2",
            "--quiet",
            "--out",
        ])
        .arg(&png)
        .output()
        .unwrap());
    assert!(out.contains("sampled 6 images"), "{out}");
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (3 * 16, 2 * 16), "3 columns per class row, edge to edge");

    // Bad sampling input: one line, no PNG.
    for (args, needle) in [
        (vec!["--classes", "4"], "class id 4 is outside 0..4"),
        (vec!["--classes", "-1"], "class id -1"),
        (vec!["--cfg", "0.5"], "cfg"),
        (vec!["--steps", "0"], "--steps"),
    ] {
        let bad = dir.path().join("bad.png");
        let o =
            trainer().args(["sample", "--checkpoint", &r, "--quiet", "--out"]).arg(&bad).args(&args).output().unwrap();
        let se = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && se.contains(needle), "{args:?}: {se}");
        assert_eq!(se.trim().lines().count(), 1, "{se}");
        assert!(!bad.exists());
    }
    // The AR stage without a VAE run is a clear error.
    let o = trainer()
        .args(["fit", "--stage", "ar", "--preset", "tiny", "--quiet", "--vae"])
        .arg(dir.path().join("none"))
        .args(["--data", &d, "--out", &r])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("train the VAE first"));
}
