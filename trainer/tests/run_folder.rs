//! What `trainer fit` does with an existing run folder: a finished stage is left untouched, a resume
//! with another VAE, data or --limit is refused (--force starts afresh), the class count is checked
//! against the preset before any work, bad numeric flags fail before any work, and a resumed run is
//! bit-identical to one that never stopped.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::SystemTime;

use trainer::checkpoint;

mod common;
use common::{trainer, write_image_folder};

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn ok(mut c: Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

/// Runs `c`, expects exit code 1 and one `error: ` line containing every needle; returns the line.
fn one_line_error(mut c: Command, needles: &[&str]) -> String {
    let o = c.output().unwrap();
    let se = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(se.starts_with("error: ") && se.trim_end().lines().count() == 1, "{se}");
    assert!(!se.contains("panicked"), "{se}");
    for n in needles {
        assert!(se.contains(n), "'{n}' missing from: {se}");
    }
    se
}

fn stopped(mut c: Command, needle: &str) {
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains(needle), "{}", text(&o));
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn vae(data: &Path, out: &Path, steps: &str, extra: &[&str]) -> Command {
    let mut c = trainer();
    c.args(["fit", "--stage", "vae", "--preset", "tiny", "--quiet", "--batch", "4", "--warmup", "2"])
        .args(["--eval-images", "4", "--ckpt-every", "100", "--data", &s(data), "--out", &s(out), "--steps", steps])
        .args(extra);
    c
}

fn ar(vae_run: &Path, data: &Path, out: &Path, steps: &str, extra: &[&str]) -> Command {
    let mut c = trainer();
    c.args(["fit", "--stage", "ar", "--preset", "tiny", "--quiet", "--batch", "4", "--warmup", "2"])
        .args(["--ckpt-every", "100", "--vae", &s(vae_run), "--data", &s(data), "--out", &s(out), "--steps", steps])
        .args(extra);
    c
}

fn judge(data: &Path, out: &Path, steps: &str, extra: &[&str]) -> Command {
    let mut c = trainer();
    c.args(["fit", "--stage", "judge", "--preset", "tiny", "--quiet", "--batch", "4", "--warmup", "2"])
        .args(["--ckpt-every", "100", "--data", &s(data), "--out", &s(out), "--steps", steps])
        .args(extra);
    c
}

/// Every file of a folder with its bytes and modification time.
fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, SystemTime)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let modified = e.metadata().unwrap().modified().unwrap();
            (e.file_name().to_string_lossy().into_owned(), (std::fs::read(e.path()).unwrap(), modified))
        })
        .collect()
}

/// The two safetensors files hold the same tensor names with bit-identical values.
fn assert_bit_identical(a: &Path, b: &Path) {
    let (x, y) = (checkpoint::load(a).unwrap(), checkpoint::load(b).unwrap());
    assert_eq!(x.tensors.keys().collect::<Vec<_>>(), y.tensors.keys().collect::<Vec<_>>());
    for (name, t) in &x.tensors {
        assert!(t.equal(&y.tensors[name]), "{name} differs between {} and {}", a.display(), b.display());
    }
}

#[test]
fn resumed_runs_are_bit_identical_to_uninterrupted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_image_folder(&data, 6);
    let run = |name: &str| dir.path().join(name);

    // VAE (with flips): 8 steps in one go, or 3 + 2 + 3 in three sessions.
    ok(vae(&data, &run("vae-a"), "8", &["--flip"]));
    stopped(vae(&data, &run("vae-b"), "8", &["--flip", "--stop-after", "3"]), "stopped at step 3/8 (--stop-after 3)");
    assert!(!run("vae-b").join("vae.safetensors").exists(), "no final weights for a stopped run");
    stopped(vae(&data, &run("vae-b"), "8", &["--flip", "--stop-after", "2"]), "stopped at step 5/8");
    let out = ok(vae(&data, &run("vae-b"), "8", &["--flip", "--stop-after", "100"]));
    assert!(out.contains("vae: steps 8/8 (resumed from 5)"), "{out}");
    for f in ["vae.safetensors", "train-vae.safetensors"] {
        assert_bit_identical(&run("vae-a").join(f), &run("vae-b").join(f));
    }

    // AR on that VAE: the shipped EMA weights and the raw weights, moments and EMA of the checkpoint.
    let v = run("vae-a");
    ok(ar(&v, &data, &run("ar-a"), "8", &[]));
    stopped(ar(&v, &data, &run("ar-b"), "8", &["--stop-after", "3"]), "stopped at step 3/8 (--stop-after 3)");
    let out = ok(ar(&v, &data, &run("ar-b"), "8", &[]));
    assert!(out.contains("ar: steps 8/8 (resumed from 3)") && out.contains("using cached latents"), "{out}");
    for f in ["ar.safetensors", "train-ar.safetensors"] {
        assert_bit_identical(&run("ar-a").join(f), &run("ar-b").join(f));
    }

    // Judge (with flips).
    ok(judge(&data, &run("judge-a"), "8", &["--flip"]));
    stopped(judge(&data, &run("judge-b"), "8", &["--flip", "--stop-after", "4"]), "stopped at step 4/8");
    ok(judge(&data, &run("judge-b"), "8", &["--flip"]));
    for f in ["judge.safetensors", "train-judge.safetensors"] {
        assert_bit_identical(&run("judge-a").join(f), &run("judge-b").join(f));
    }
}

#[test]
fn a_finished_stage_rerun_leaves_every_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (data, r, j) = (dir.path().join("data"), dir.path().join("run"), dir.path().join("judge"));
    write_image_folder(&data, 4);
    ok(vae(&data, &r, "3", &[]));
    ok(ar(&r, &data, &r, "3", &[]));
    ok(judge(&data, &j, "3", &[]));
    let before = (snapshot(&r), snapshot(&j));
    for f in ["vae-metrics.json", "ar-metrics.json", "latents.safetensors", "config.json", "vae-recon.png"] {
        assert!(before.0.contains_key(f), "{f} missing");
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    // The same commands again, and with fewer steps: one line each, no work, no write.
    for steps in ["3", "2"] {
        for (c, stage) in [
            (vae(&data, &r, steps, &[]), "vae"),
            (ar(&r, &data, &r, steps, &[]), "ar"),
            (judge(&data, &j, steps, &[]), "judge"),
        ] {
            let out = ok(c);
            let want = format!(
                "{stage} stage already finished (3/3 steps); its files are left as they are — use a new --out or --force to retrain"
            );
            assert_eq!(out.trim_end(), want);
        }
    }
    assert!(snapshot(&r) == before.0 && snapshot(&j) == before.1, "a finished stage's files changed");
    // More steps than were run resume the finished run.
    let out = ok(vae(&data, &r, "4", &[]));
    assert!(out.contains("vae: steps 4/4 (resumed from 3)"), "{out}");
}

#[test]
fn resume_refuses_another_vae_data_or_limit_and_force_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let (data, other_data, v1, v2, r) = (p("data"), p("data2"), p("vae1"), p("vae2"), p("ar"));
    write_image_folder(&data, 6);
    write_image_folder(&other_data, 7);
    ok(vae(&data, &v1, "3", &[]));
    ok(vae(&data, &v2, "3", &["--seed", "1"]));
    stopped(ar(&v1, &data, &r, "6", &["--stop-after", "3"]), "stopped at step 3/6");
    let before = snapshot(&r);
    let ckpt = r.join("train-ar.safetensors");
    let meta = checkpoint::read_metadata(&ckpt).unwrap();
    let sha1 = trainer::identity::file_sha256(&v1.join("vae.safetensors")).unwrap();
    assert_eq!(meta["vae_sha256"], sha1);
    assert_eq!(meta["data_limit"], "none");
    let stamp = checkpoint::read_metadata(&r.join("latents.safetensors")).unwrap()["stamp"].clone();
    assert!(stamp.contains(&sha1) && stamp.contains(&meta["data_sha256"]), "{stamp}");

    let e = one_line_error(ar(&v2, &data, &r, "6", &[]), &["cannot resume", "the VAE differs", "--force"]);
    assert!(!e.contains("training data"), "{e}");
    one_line_error(ar(&v1, &other_data, &r, "6", &[]), &["the training data differs", "--force"]);
    one_line_error(ar(&v1, &data, &r, "6", &["--limit", "5"]), &["--limit was none, now 5"]);
    one_line_error(ar(&v2, &other_data, &r, "6", &[]), &["the VAE differs", "the training data differs"]);
    assert!(snapshot(&r) == before, "a refused resume changed the run folder");

    // --force: the AR stage starts afresh on the new VAE (latents encoded again), nothing else goes.
    std::fs::write(r.join("notes.txt"), b"mine").unwrap();
    let out = ok(ar(&v2, &data, &r, "6", &["--force"]));
    assert!(out.contains("ar: steps 6/6 (resumed from 0)") && !out.contains("cached latents"), "{out}");
    let sha2 = trainer::identity::file_sha256(&v2.join("vae.safetensors")).unwrap();
    assert_eq!(checkpoint::read_metadata(&ckpt).unwrap()["vae_sha256"], sha2);
    assert!(checkpoint::read_metadata(&r.join("latents.safetensors")).unwrap()["stamp"].contains(&sha2));
    assert_eq!(std::fs::read(r.join("notes.txt")).unwrap(), b"mine");
    // --force also retrains a finished stage.
    let out = ok(ar(&v2, &data, &r, "6", &["--force"]));
    assert!(out.contains("ar: steps 6/6 (resumed from 0)"), "{out}");

    // The VAE stage checks its data on resume too.
    let v3 = p("vae3");
    stopped(vae(&data, &v3, "6", &["--stop-after", "2"]), "stopped at step 2/6");
    one_line_error(vae(&other_data, &v3, "6", &[]), &["train-vae.safetensors", "the training data differs"]);
    let out = ok(vae(&other_data, &v3, "6", &["--force"]));
    assert!(out.contains("vae: steps 6/6 (resumed from 0)"), "{out}");

    // Final weights without a training checkpoint (an imported or copied run) are never trained over.
    std::fs::remove_file(v3.join("train-vae.safetensors")).unwrap();
    one_line_error(vae(&other_data, &v3, "6", &[]), &["without its training checkpoint", "--force"]);
}

#[test]
fn recipe_flags_are_recorded_resume_exactly_and_a_changed_recipe_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let data = p("data");
    write_image_folder(&data, 6);
    let with = |a: &[&'static str], b: &[&'static str]| [a, b].concat();

    // The official VAE recipe on the tiny preset: interrupted and resumed = one run; another recipe is refused.
    let official_vae =
        ["--recon-loss", "l1", "--init", "pytorch", "--decay-groups", "official", "--lr-schedule", "official"];
    ok(vae(&data, &p("v-a"), "6", &with(&official_vae, &["--decay-start", "4"])));
    stopped(vae(&data, &p("v-b"), "6", &with(&official_vae, &["--decay-start", "4", "--stop-after", "3"])), "3/6");
    let changed =
        ["--recon-loss", "mse", "--init", "pytorch", "--decay-groups", "official", "--lr-schedule", "official"];
    one_line_error(
        vae(&data, &p("v-b"), "6", &with(&changed, &["--decay-start", "4"])),
        &["--recon-loss was l1, now mse"],
    );
    one_line_error(vae(&data, &p("v-b"), "6", &official_vae), &["--decay-start was 4, now none"]);
    ok(vae(&data, &p("v-b"), "6", &with(&official_vae, &["--decay-start", "4"])));
    for f in ["vae.safetensors", "train-vae.safetensors"] {
        assert_bit_identical(&p("v-a").join(f), &p("v-b").join(f));
    }
    let recipe = &checkpoint::read_metadata(&p("v-a").join("train-vae.safetensors")).unwrap()["recipe"];
    assert!(recipe.contains(r#""--recon-loss":"l1""#) && recipe.contains(r#""--init":"pytorch""#), "{recipe}");

    // AR with 2 cached augmented views and the official EMA: exact resume; another --augment is refused.
    let v = p("v-a");
    let official_ar =
        ["--augment", "2", "--ema-warmup", "false", "--ema-decay", "0.9999", "--decay-groups", "official"];
    ok(ar(&v, &data, &p("a-a"), "6", &official_ar));
    stopped(ar(&v, &data, &p("a-b"), "6", &with(&official_ar, &["--stop-after", "3"])), "stopped at step 3/6");
    let changed = ["--augment", "3", "--ema-warmup", "false", "--ema-decay", "0.9999", "--decay-groups", "official"];
    one_line_error(ar(&v, &data, &p("a-b"), "6", &changed), &["--augment was 2, now 3"]);
    ok(ar(&v, &data, &p("a-b"), "6", &official_ar));
    for f in ["ar.safetensors", "train-ar.safetensors"] {
        assert_bit_identical(&p("a-a").join(f), &p("a-b").join(f));
    }
    let latents = checkpoint::load(&p("a-a").join("latents.safetensors")).unwrap();
    assert!(latents.metadata["stamp"].contains("augment 2 views, seed 0"), "{:?}", latents.metadata);
    assert_eq!(latents.tensors["labels"].size(), [2 * 6 * 2], "two views of 12 images");

    // A stage's recipe flag on another stage is an error, before any work.
    one_line_error(
        ar(&v, &data, &p("a-c"), "6", &["--recon-loss", "l1"]),
        &["--recon-loss applies to --stage vae only"],
    );
    one_line_error(vae(&data, &p("v-c"), "6", &["--augment", "2"]), &["--augment applies to --stage ar only"]);
    assert!(!p("a-c").exists() && !p("v-c").exists());
}

/// An ImageFolder with `n` classes of two 16×16 PNGs each.
fn classes_folder(root: &Path, n: usize) {
    for c in 0..n {
        let d = root.join(format!("class{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..2u8 {
            let v = (c as u8) * 40 + i * 10;
            image::RgbImage::from_pixel(16, 16, image::Rgb([v, 255 - v, v / 2]))
                .save(d.join(format!("{i}.png")))
                .unwrap();
        }
    }
}

#[test]
fn more_classes_than_the_preset_fail_before_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_image_folder(&data, 4);
    let v = dir.path().join("vae");
    ok(vae(&data, &v, "2", &[]));
    // The tiny preset has 4 classes (ids 0..4, 4 is the null class).
    for n in [5, 6] {
        let many = dir.path().join(format!("classes{n}"));
        classes_folder(&many, n);
        let out = dir.path().join(format!("ar{n}"));
        one_line_error(ar(&v, &many, &out, "2", &[]), &[&format!("has {n} classes but preset 'tiny' has 4")]);
        assert!(!out.exists(), "nothing is written");
    }
    let four = dir.path().join("classes4");
    classes_folder(&four, 4);
    ok(ar(&v, &four, &dir.path().join("ar4"), "2", &[]));
}

#[test]
fn bad_numeric_flags_fail_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_image_folder(&data, 2);
    let out = dir.path().join("run");
    let fit = |stage: &str, threads: &str, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_trainer"));
        c.args(["--threads", threads, "fit", "--stage", stage, "--preset", "tiny", "--quiet"])
            .args(["--vae", &s(&out), "--data", &s(&data), "--out", &s(&out)])
            .args(extra);
        c
    };
    let cases: [(&str, &str, &[&str], &str); 14] = [
        ("vae", "0", &[], "--threads must be ≥ 1 (got 0)"),
        ("vae", "1", &["--steps", "0"], "--steps must be ≥ 1 (got 0)"),
        ("ar", "1", &["--batch", "0"], "--batch must be ≥ 1 (got 0)"),
        ("vae", "1", &["--lr", "0"], "--lr must be a finite number > 0 (got 0)"),
        ("judge", "1", &["--lr", "NaN"], "--lr must be a finite number > 0 (got NaN)"),
        ("vae", "1", &["--kl-weight=-1"], "--kl-weight must be a finite number ≥ 0 (got -1)"),
        ("ar", "1", &["--ema-decay", "1"], "--ema-decay must be in [0, 1) (got 1)"),
        ("ar", "1", &["--ema-decay=-0.5"], "--ema-decay must be in [0, 1)"),
        ("vae", "1", &["--clip", "0"], "--clip must be a finite number > 0 (got 0)"),
        ("judge", "1", &["--clip", "inf"], "--clip must be a finite number > 0 (got inf)"),
        ("vae", "1", &["--ckpt-every", "0"], "--ckpt-every must be ≥ 1 (got 0)"),
        ("ar", "1", &["--limit", "0"], "--limit must be ≥ 1 (got 0)"),
        ("judge", "1", &["--eval-images", "0"], "--eval-images must be ≥ 1 (got 0)"),
        ("vae", "1", &["--stop-after", "0"], "--stop-after must be ≥ 1 (got 0)"),
    ];
    for (stage, threads, extra, needle) in cases {
        let line = one_line_error(fit(stage, threads, extra), &[needle]);
        assert!(line.starts_with("error: invalid argument: --"), "{line}");
        assert!(!out.exists(), "{stage} {extra:?}: the run folder was created");
    }
    let mut c = Command::new(env!("CARGO_BIN_EXE_trainer"));
    c.args(["--threads", "1", "sample", "--checkpoint", &s(&out), "--token-limit", "0", "--timing-json"])
        .arg(dir.path().join("t.json"));
    one_line_error(c, &["--token-limit must be ≥ 1 (got 0)"]);
    let mut c = Command::new(env!("CARGO_BIN_EXE_trainer"));
    c.args(["sample", "--threads", "0", "--checkpoint", &s(&out), "--out"]).arg(dir.path().join("g.png"));
    one_line_error(c, &["--threads must be ≥ 1 (got 0)"]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the data folder exists");
}
