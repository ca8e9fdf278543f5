//! Machine peaks for the roofline, measured the way the runtime computes: a large matrix product through
//! ONNX Runtime (the same MatMul kernels the graphs use), and a multi-threaded streaming read of a buffer
//! much larger than the caches (the memory bandwidth weights are re-read at).

use std::time::Instant;

use ort::session::Session;
use ort::value::Tensor;
use serde::{Deserialize, Serialize};

use exporter::onnx::{model_proto, value_info, DType, Dim};
use onnx_protobuf::{GraphProto, NodeProto};
use protobuf::Message;
use runtime::error::ort_err;
use runtime::{Result, RuntimeError};

/// A measured matrix-multiply rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MatmulRate {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub dtype: String,
    pub flops_per_s: f64,
    pub runs: usize,
}

/// A measured read bandwidth.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bandwidth {
    pub buffer_bytes: usize,
    pub threads: usize,
    pub bytes_per_s: f64,
    pub runs: usize,
}

/// A one-node graph `C = A · B` with A [m, k] and B [k, n] as inputs, in `dtype` (float32 or float16):
/// the probe that measures a machine's matrix-multiply rate through ONNX Runtime.
fn matmul_model(m: usize, k: usize, n: usize, dtype: DType) -> Result<Vec<u8>> {
    let node = NodeProto {
        op_type: "MatMul".into(),
        input: vec!["A".into(), "B".into()],
        output: vec!["C".into()],
        name: "matmul".into(),
        ..Default::default()
    };
    let graph = GraphProto {
        node: vec![node],
        name: "matmul_probe".into(),
        input: vec![value_info("A", dtype, &[Dim::N(m), Dim::N(k)]), value_info("B", dtype, &[Dim::N(k), Dim::N(n)])],
        output: vec![value_info("C", dtype, &[Dim::N(m), Dim::N(n)])],
        ..Default::default()
    };
    model_proto(graph, "matmul probe")
        .write_to_bytes()
        .map_err(|e| RuntimeError::Model(format!("cannot serialise the matmul probe: {e}")))
}

/// Best-of-runs rate of `C = A·B` ([m,k]·[k,n]) through ONNX Runtime, for at least `min_seconds`.
pub fn matmul_rate(
    env: &ort::environment::Environment,
    threads: Option<usize>,
    (m, k, n): (usize, usize, usize),
    fp16: bool,
    min_seconds: f64,
) -> Result<MatmulRate> {
    let dtype = if fp16 { DType::Float16 } else { DType::Float32 };
    let bytes = matmul_model(m, k, n, dtype)?;
    let mut b = Session::builder(env).map_err(ort_err("matmul probe"))?;
    if let Some(t) = threads {
        b = b.with_intra_threads(t).map_err(ort_err("matmul probe threads"))?;
    }
    let mut session = b.commit_from_memory(&bytes).map_err(ort_err("loading the matmul probe"))?;
    let a: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
    let bm: Vec<f32> = (0..k * n).map(|i| ((i % 5) as f32 - 2.0) * 0.01).collect();
    let mut io = session.create_binding().map_err(ort_err("matmul probe binding"))?;
    // Keep the inputs alive as long as the binding.
    let (_a32, _b32, _a16, _b16);
    if fp16 {
        let h = |v: &[f32]| v.iter().map(|x| half::f16::from_f32(*x)).collect::<Vec<_>>();
        _a16 = Tensor::from_array(([m, k], h(&a))).map_err(ort_err("probe A"))?;
        _b16 = Tensor::from_array(([k, n], h(&bm))).map_err(ort_err("probe B"))?;
        io.bind_input("A", &_a16).map_err(ort_err("bind A"))?;
        io.bind_input("B", &_b16).map_err(ort_err("bind B"))?;
    } else {
        _a32 = Tensor::from_array(([m, k], a)).map_err(ort_err("probe A"))?;
        _b32 = Tensor::from_array(([k, n], bm)).map_err(ort_err("probe B"))?;
        io.bind_input("A", &_a32).map_err(ort_err("bind A"))?;
        io.bind_input("B", &_b32).map_err(ort_err("bind B"))?;
    }
    let mem = session.allocator().memory_info();
    io.bind_output_to_device("C", &mem).map_err(ort_err("bind C"))?;
    session.run_binding(&io).map_err(ort_err("matmul probe"))?; // warm-up
    let flops = 2.0 * (m * k * n) as f64;
    let (mut best, mut runs, start) = (f64::INFINITY, 0, Instant::now());
    while runs < 3 || start.elapsed().as_secs_f64() < min_seconds {
        let t0 = Instant::now();
        session.run_binding(&io).map_err(ort_err("matmul probe"))?;
        best = best.min(t0.elapsed().as_secs_f64());
        runs += 1;
    }
    Ok(MatmulRate { m, k, n, dtype: format!("{dtype:?}").to_lowercase(), flops_per_s: flops / best, runs })
}

fn sum_chunk(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { sum_chunk_avx2(x) };
    }
    sum_chunk_portable(x)
}

/// The portable loop compiled with AVX2 enabled (256-bit loads and adds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_chunk_avx2(x: &[f32]) -> f32 {
    sum_chunk_portable(x)
}

#[inline(always)]
fn sum_chunk_portable(x: &[f32]) -> f32 {
    // 16 independent accumulators: the compiler vectorises this into full-width adds, so the loop is
    // limited by memory, not by the add latency chain.
    let mut acc = [0f32; 16];
    for c in x.chunks_exact(16) {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum()
}

/// Best-of-runs read bandwidth of `threads` threads summing disjoint parts of a `bytes` buffer.
pub fn read_bandwidth(bytes: usize, threads: usize, min_seconds: f64) -> Bandwidth {
    let threads = threads.max(1);
    let n = (bytes / 4).max(16 * threads);
    let buf: Vec<f32> = (0..n).map(|i| (i & 0xff) as f32).collect();
    let part = n.div_ceil(threads);
    let run = || {
        std::thread::scope(|s| {
            let hs: Vec<_> = buf.chunks(part).map(|c| s.spawn(move || sum_chunk(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum::<f32>()
        })
    };
    std::hint::black_box(run()); // warm-up (page faults already taken by the fill)
    let (mut best, mut runs, start) = (f64::INFINITY, 0, Instant::now());
    while runs < 3 || start.elapsed().as_secs_f64() < min_seconds {
        let t0 = Instant::now();
        std::hint::black_box(run());
        best = best.min(t0.elapsed().as_secs_f64());
        runs += 1;
    }
    Bandwidth { buffer_bytes: n * 4, threads, bytes_per_s: (n * 4) as f64 / best, runs }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sum_is_exact_on_small_integers() {
        let v: Vec<f32> = (0..1000).map(|i| (i % 3) as f32).collect();
        // Only whole 16-element chunks are read: 992 values.
        let want: f32 = v[..992].iter().sum();
        assert_eq!(sum_chunk(&v), want);
    }

    #[test]
    fn bandwidth_is_positive_and_plausible() {
        let b = read_bandwidth(64 << 20, 2, 0.05);
        // Anything from a slow VM (1 GB/s) to a big server (2 TB/s).
        assert!(b.bytes_per_s > 1e9 && b.bytes_per_s < 2e12, "{}", b.bytes_per_s);
        assert!(b.runs >= 3);
    }
}
