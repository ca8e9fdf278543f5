//! Shared helpers of the end-to-end tests: random checkpoints, exports, tensor files for the python
//! ONNX Runtime helper (`tests/py/run_onnx.py`) and error measures.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::{Dtype, TensorView};
use tch::{Kind, Tensor};

/// The python with onnx + onnxruntime: `SPHEREAR_PYTHON`, else `<workspace>/.venv/bin/python`.
pub fn python() -> PathBuf {
    std::env::var_os("SPHEREAR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// Runs `tests/py/run_onnx.py ARGS`, panicking with its output on failure; returns stdout.
pub fn run_py(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/run_onnx.py");
    let out = Command::new(python()).arg(script).args(args).output().expect("cannot start python");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "run_onnx.py {args:?} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// A random-init checkpoint of `preset` and its fp32 and fp16 exports, in one temporary folder.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub ckpt: PathBuf,
    pub fp32: PathBuf,
    pub fp16: PathBuf,
}

pub fn fixture(preset: &str, seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let cfg = spherear_core::ModelConfig::preset(preset).unwrap();
    exporter::random::write_random(&cfg, &ckpt, seed, exporter::checkpoint::Stage::Ar).unwrap();
    let mut paths = Vec::new();
    for fp16 in [false, true] {
        let out = dir.path().join(if fp16 { "fp16" } else { "fp32" });
        let opts =
            exporter::ExportOptions { fp16, max_batch: 8, ..exporter::ExportOptions::new(&ckpt, &out) };
        exporter::export(&opts).unwrap();
        paths.push(out);
    }
    let fp16 = paths.pop().unwrap();
    let fp32 = paths.pop().unwrap();
    Fixture { dir, ckpt, fp32, fp16 }
}

/// Writes f32 / i64 tensors as a safetensors file.
pub fn write_tensors(path: &Path, tensors: &[(&str, &Tensor)]) {
    let bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (kind, dtype, size) = match t.kind() {
                Kind::Int64 => (Kind::Int64, Dtype::I64, 8),
                _ => (Kind::Float, Dtype::F32, 4),
            };
            let t = t.to_kind(kind).contiguous();
            let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
            let n: usize = shape.iter().product();
            let mut bytes = vec![0u8; n * size];
            t.copy_data_u8(&mut bytes, n);
            (name.to_string(), dtype, shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> =
        bufs.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

/// Reads a safetensors file of float tensors.
pub fn read_tensor(path: &Path, name: &str) -> Tensor {
    let f = trainer::checkpoint::load(path).unwrap();
    f.tensors.get(name).unwrap_or_else(|| panic!("{name} not in {}", path.display())).shallow_clone()
}

/// max |a − b| / max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-30)
}

/// Runs one graph of an export on `inputs`, returning output `name`.
pub fn run_graph(export: &Path, graph: &str, inputs: &[(&str, &Tensor)], output: &str) -> Tensor {
    let inp = export.join(format!(".{graph}.in.safetensors"));
    let out = export.join(format!(".{graph}.out.safetensors"));
    write_tensors(&inp, inputs);
    run_py(&[
        "run",
        export.join(format!("{graph}.onnx")).to_str().unwrap(),
        inp.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let t = read_tensor(&out, output);
    let _ = std::fs::remove_file(inp);
    let _ = std::fs::remove_file(out);
    t
}

/// Scales every tensor whose name starts with `prefix` in `ckpt/ar.safetensors` (metadata kept): e.g. a
/// tamed head, so that sampling a random model is smooth rather than chaotic.
pub fn scale_tensors(ckpt: &Path, prefix: &str, s: f32) {
    use safetensors::tensor::{Dtype, SafeTensors, TensorView};
    let p = ckpt.join("ar.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        assert_eq!(t.dtype(), Dtype::F32);
        let mut data = t.data().to_vec();
        if name.starts_with(prefix) {
            for c in data.chunks_exact_mut(4) {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * s;
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        bufs.push((name, t.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> =
        bufs.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    let meta = meta.metadata().clone();
    drop(st);
    safetensors::serialize_to_file(views, &meta, &p).unwrap();
}
