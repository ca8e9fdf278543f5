//! Every graph the exporter writes loads in ONNX Runtime and runs, without Python: a random `tiny` export in
//! fp32 and fp16 with GroupQueryAttention and with standard attention, and a random judge. Each graph gets
//! a CPU session and one batch-2 call on deterministic inputs (rows of `ar_step` at different positions);
//! every output the manifest declares must come back with its dtype and shape, and finite.
//!
//! The ONNX Runtime library is found as the runtime finds it: `$ORT_DYLIB_PATH`, else the onnxruntime
//! wheel in the workspace's `.venv` (`make setup`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use exporter::checkpoint::Stage;
use exporter::judge::{export_judge, JudgeExportOptions};
use exporter::random::{write_random, write_random_judge};
use exporter::{export, Attention, ExportOptions};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use spherear_core::judge::JudgeConfig;
use spherear_core::manifest::{Dim, IoSpec, TensorDType};
use spherear_core::ModelConfig;

const BATCH: usize = 2;

fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        return p.into();
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib).into_iter().flatten().flatten().map(|e| e.path()).collect();
    pythons.sort();
    for py in pythons.iter().rev() {
        let capi = py.join("site-packages/onnxruntime/capi");
        let mut libs: Vec<PathBuf> = std::fs::read_dir(&capi)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")))
            .collect();
        libs.sort();
        if let Some(p) = libs.pop() {
            return p;
        }
    }
    panic!("cannot find the ONNX Runtime library: set ORT_DYLIB_PATH or run `make setup` (onnxruntime wheel in .venv)")
}

fn environment() -> &'static Environment {
    static ENV: OnceLock<Environment> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = ort_library();
        let builder = ort::init_from(&path).unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()));
        builder.with_name("exporter-tests").build().expect("ONNX Runtime environment")
    })
}

/// A CPU session for `file`, or a panic naming the graph and ONNX Runtime's reason.
fn session(file: &Path) -> Session {
    fn refused<T>(file: &Path, e: impl std::fmt::Display) -> T {
        panic!("ONNX Runtime refuses {}: {e}", file.display())
    }
    let builder = Session::builder(environment()).unwrap_or_else(|e| refused(file, e));
    let mut builder = builder.with_intra_threads(1).unwrap_or_else(|e| refused(file, e));
    builder.commit_from_file(file).unwrap_or_else(|e| refused(file, e))
}

fn dims(spec: &IoSpec) -> Vec<usize> {
    spec.shape.iter().map(|d| if let Dim::N(n) = d { *n } else { BATCH }).collect()
}

/// A deterministic input for `spec`: values in [-1, 1] for floats; for the integer inputs, valid class
/// ids and each row at a different position.
fn input(spec: &IoSpec, cls: usize) -> DynValue {
    let shape = dims(spec);
    let n: usize = shape.iter().product();
    let wave = |i: usize| (i as f32 * 0.37).sin();
    match (spec.dtype, spec.name.as_str()) {
        (TensorDType::Int64, "position") => {
            Tensor::from_array((shape, vec![cls as i64, cls as i64 + 3])).unwrap().into_dyn()
        }
        (TensorDType::Int64, _) => Tensor::from_array((shape, (0..n as i64).collect::<Vec<_>>())).unwrap().into_dyn(),
        (TensorDType::Float32, "t") => Tensor::from_array((shape, vec![0.25f32, 0.75])).unwrap().into_dyn(),
        (TensorDType::Float32, _) => {
            Tensor::from_array((shape, (0..n).map(wave).collect::<Vec<_>>())).unwrap().into_dyn()
        }
        (TensorDType::Float16, _) => {
            let data: Vec<half::f16> = (0..n).map(|i| half::f16::from_f32(wave(i))).collect();
            Tensor::from_array((shape, data)).unwrap().into_dyn()
        }
    }
}

/// Runs `file` once on inputs for `inputs`; checks every declared output's dtype, shape and finiteness.
fn load_and_run(file: &Path, inputs: &[IoSpec], outputs: &[IoSpec], cls: usize) {
    let what = file.display();
    let mut s = session(file);
    let mut have: Vec<String> = s.inputs().iter().map(|i| i.name().to_string()).collect();
    let mut want: Vec<String> = inputs.iter().map(|i| i.name.clone()).collect();
    have.sort();
    want.sort();
    assert_eq!(have, want, "{what}: graph inputs vs manifest");
    let feed: Vec<(String, DynValue)> = inputs.iter().map(|i| (i.name.clone(), input(i, cls))).collect();
    let out = s.run(feed).unwrap_or_else(|e| panic!("{what}: ONNX Runtime cannot run it: {e}"));
    for spec in outputs {
        let v = out.get(spec.name.as_str()).unwrap_or_else(|| panic!("{what}: no output {}", spec.name));
        let (shape, finite): (Vec<i64>, bool) = match spec.dtype {
            TensorDType::Float32 => {
                let (sh, d) = v.try_extract_tensor::<f32>().unwrap_or_else(|e| panic!("{what} {}: {e}", spec.name));
                (sh.to_vec(), d.iter().all(|x| x.is_finite()))
            }
            TensorDType::Float16 => {
                let (sh, d) =
                    v.try_extract_tensor::<half::f16>().unwrap_or_else(|e| panic!("{what} {}: {e}", spec.name));
                (sh.to_vec(), d.iter().all(|x| x.is_finite()))
            }
            TensorDType::Int64 => {
                let (sh, _) = v.try_extract_tensor::<i64>().unwrap_or_else(|e| panic!("{what} {}: {e}", spec.name));
                (sh.to_vec(), true)
            }
        };
        let declared: Vec<i64> = dims(spec).iter().map(|&d| d as i64).collect();
        assert_eq!(shape, declared, "{what}: shape of {}", spec.name);
        assert!(finite, "{what}: {} is not finite", spec.name);
    }
}

#[test]
fn every_graph_of_a_tiny_export_loads_and_runs_in_onnx_runtime() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    let cfg = ModelConfig::preset("tiny").unwrap();
    write_random(&cfg, &ck, 11, Stage::Ar).unwrap();
    for fp16 in [false, true] {
        for attention in [Attention::Gqa, Attention::Standard] {
            let out = d.path().join(format!("{}-{}", if fp16 { "fp16" } else { "fp32" }, attention.name()));
            let m = export(&ExportOptions { fp16, attention, max_batch: 4, ..ExportOptions::new(&ck, &out) }).unwrap();
            assert_eq!(m.graphs.len(), 4);
            for (name, g) in &m.graphs {
                load_and_run(&out.join(&g.file), &g.inputs, &g.outputs, cfg.cls_token_num);
                println!("{} {name}: loads and runs", out.display());
            }
        }
    }
}

#[test]
fn the_judge_graph_loads_and_runs_in_onnx_runtime() {
    let d = tempfile::tempdir().unwrap();
    let (ck, out) = (d.path().join("run"), d.path().join("judge"));
    let cfg = JudgeConfig::default_for(16, 4);
    write_random_judge(&cfg, &ck, 5).unwrap();
    let m = export_judge(&JudgeExportOptions { checkpoint: ck, out: out.clone(), force: false }).unwrap();
    let spec = |name: &str, shape: Vec<Dim>| IoSpec {
        name: name.into(),
        dtype: TensorDType::Float32,
        shape,
        meaning: String::new(),
    };
    let batch = || Dim::Sym("batch".into());
    let image = spec("image", vec![batch(), Dim::N(cfg.in_channels), Dim::N(cfg.image_size), Dim::N(cfg.image_size)]);
    let outputs = [
        spec("logits", vec![batch(), Dim::N(cfg.num_classes)]),
        spec("features", vec![batch(), Dim::N(cfg.feature_dim)]),
    ];
    load_and_run(&out.join(&m.file), &[image], &outputs, 0);
}
