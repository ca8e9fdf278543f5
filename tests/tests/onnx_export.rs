//! Exported graphs against the tch reference modules, on a random-init `tiny` checkpoint:
//! every graph passes the ONNX full check and loads in ONNX Runtime (CPU), fp32 and fp16; fp32 outputs
//! match tch to 1e-4·max|out|, fp16 outputs to 2e-2·max|out| (the error is printed).

use e2e::{fixture, read_tensor, rel_err, run_graph, run_py, write_tensors, Fixture};
use tch::{Kind, Tensor};
use trainer::ar::ArModel;

const FP32_TOL: f64 = 1e-4;
const FP16_TOL: f64 = 2e-2;

fn setup(seed: u64) -> (Fixture, ArModel) {
    tch::manual_seed(seed as i64);
    let fx = fixture("tiny", seed);
    let m = ArModel::load(&fx.ckpt).unwrap();
    (fx, m)
}

fn check(what: &str, fp32: f64, fp16: f64) {
    println!(
        "parity {what}: fp32 rel err {fp32:.2e} (tol {FP32_TOL:.0e}), fp16 rel err {fp16:.2e} (tol {FP16_TOL:.0e})"
    );
    assert!(fp32 <= FP32_TOL, "{what} fp32: {fp32:e}");
    assert!(fp16 < FP16_TOL, "{what} fp16: {fp16:e}");
}

/// Random tokens on the radius-R sphere, [B, L, d].
fn sphere_tokens(m: &ArModel, b: i64) -> Tensor {
    let c = &m.config;
    let z = Tensor::randn([b, c.num_tokens() as i64, c.latent_dim as i64], (Kind::Float, tch::Device::Cpu));
    m.vae.normalize(&z)
}

#[test]
fn every_graph_passes_the_full_check_and_loads_in_ort() {
    let fx = fixture("tiny", 1);
    for dir in [&fx.fp32, &fx.fp16] {
        let files: Vec<String> = ["ar_prefill", "ar_step", "head_step", "decoder"]
            .iter()
            .map(|g| dir.join(format!("{g}.onnx")).to_string_lossy().into_owned())
            .collect();
        let args: Vec<&str> = std::iter::once("check").chain(files.iter().map(String::as_str)).collect();
        let out = run_py(&args);
        assert_eq!(out.lines().filter(|l| l.starts_with("ok ")).count(), 4, "{out}");
    }
}

#[test]
fn decoder_matches_tch() {
    let (fx, m) = setup(2);
    let z = sphere_tokens(&m, 2);
    let want = tch::no_grad(|| m.vae.decode(&z)).clamp(-1.0, 1.0);
    let errs: Vec<f64> = [&fx.fp32, &fx.fp16]
        .iter()
        .map(|d| rel_err(&run_graph(d, "decoder", &[("tokens", &z)], "image"), &want))
        .collect();
    check("decoder", errs[0], errs[1]);
}

#[test]
fn head_step_matches_tch() {
    let (fx, m) = setup(3);
    let c = &m.config;
    let n = 6;
    let x = Tensor::randn([n, c.latent_dim as i64], (Kind::Float, tch::Device::Cpu));
    let t = Tensor::rand([n], (Kind::Float, tch::Device::Cpu));
    let cond = Tensor::randn([n, c.ar.dim as i64], (Kind::Float, tch::Device::Cpu));
    let want = tch::no_grad(|| m.ar.head.forward(&x, &t, &cond));
    let inputs = [("x_t", &x), ("t", &t), ("condition", &cond)];
    let errs: Vec<f64> =
        [&fx.fp32, &fx.fp16].iter().map(|d| rel_err(&run_graph(d, "head_step", &inputs, "velocity"), &want)).collect();
    check("head_step", errs[0], errs[1]);
}

/// Prefill + ar_step with the cache filled by earlier steps (bound in place), against the full causal
/// forward: condition of token 0 (prefill), tokens 1, 7 and the last one, and overall.
#[test]
fn ar_prefill_and_steps_match_the_full_forward() {
    let (fx, m) = setup(4);
    let c = &m.config;
    let l = c.num_tokens() as i64;
    let z = sphere_tokens(&m, 2);
    let ids = Tensor::from_slice(&[1i64, c.null_class() as i64]);
    let want = tch::no_grad(|| m.ar.conditions(&z, &ids));
    let mut errs = Vec::new();
    for dir in [&fx.fp32, &fx.fp16] {
        let (inp, out) = (dir.join("ar.in.safetensors"), dir.join("ar.out.safetensors"));
        write_tensors(&inp, &[("class_ids", &ids), ("tokens", &z)]);
        run_py(&["ar", dir.to_str().unwrap(), inp.to_str().unwrap(), out.to_str().unwrap()]);
        let got = read_tensor(&out, "conditions");
        let per: Vec<(i64, f64)> =
            [0, 1, 7, l - 1].iter().map(|&i| (i, rel_err(&got.select(1, i), &want.select(1, i)))).collect();
        println!("{}: per token {per:?}", dir.display());
        errs.push(per.iter().map(|p| p.1).fold(rel_err(&got, &want), f64::max));
    }
    check("ar prefill+step (tokens 0, 1, 7, last, all)", errs[0], errs[1]);
}

/// `ar_step` with the two attention implementations, rows at different positions in one call (row 0 five
/// tokens ahead of row 1, as continuous batching runs them): every row's conditions equal the full
/// forward's, and equal those of the same row stepped with all rows at one position.
#[test]
fn ar_step_rows_at_different_positions_match_each_row_alone() {
    let (fx, m) = setup(5);
    let z = sphere_tokens(&m, 2);
    let ids = Tensor::from_slice(&[2i64, 0]);
    let want = tch::no_grad(|| m.ar.conditions(&z, &ids));
    let standard = fx.dir.path().join("standard");
    let opts = exporter::ExportOptions {
        max_batch: 8,
        attention: exporter::Attention::Standard,
        ..exporter::ExportOptions::new(&fx.ckpt, &standard)
    };
    exporter::export(&opts).unwrap();
    for (dir, tol) in [(&fx.fp32, FP32_TOL), (&standard, FP32_TOL), (&fx.fp16, FP16_TOL)] {
        let m = spherear_core::manifest::Manifest::load(dir).unwrap();
        let (inp, lock, mixed) =
            (dir.join("rows.in.safetensors"), dir.join("rows.lock.safetensors"), dir.join("rows.mixed.safetensors"));
        write_tensors(&inp, &[("class_ids", &ids), ("tokens", &z)]);
        run_py(&["ar", dir.to_str().unwrap(), inp.to_str().unwrap(), lock.to_str().unwrap()]);
        run_py(&["ar_mixed", dir.to_str().unwrap(), inp.to_str().unwrap(), mixed.to_str().unwrap(), "5"]);
        let (lock, mixed) = (read_tensor(&lock, "conditions"), read_tensor(&mixed, "conditions"));
        let (e_ref, e_lock) = (rel_err(&mixed, &want), rel_err(&mixed, &lock));
        let kind = m.kv_cache.unwrap().attention.name();
        println!("{} ({kind}, {:?}): vs full forward {e_ref:.2e}, vs same-position steps {e_lock:.2e}", dir.display(), m.precision.compute);
        assert!(e_ref <= tol, "{kind}: {e_ref:e}");
        // Only the row count of the matrix products differs: float rounding, far below the tolerance.
        assert!(e_lock <= tol / 10.0, "{kind}: {e_lock:e}");
    }
}
