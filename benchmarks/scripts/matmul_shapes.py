# Usage: .venv/bin/python benchmarks/scripts/matmul_shapes.py
# fp32 MatMul rate of ONNX Runtime CPU (2 threads) at the shapes of SphereAR-B's batch-16 calls (32 rows) vs 1024^3.
import time, numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
def model(m, k, n):
    w = numpy_helper.from_array(np.random.randn(k, n).astype(np.float32) * 0.02, "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
def rate(m, k, n, secs=2.0):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    s = ort.InferenceSession(model(m, k, n).SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.randn(m, k).astype(np.float32)
    for _ in range(3): s.run(None, {"x": x})
    n_calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < secs: s.run(None, {"x": x}); n_calls += 1
    dt = (time.perf_counter() - t0) / n_calls
    return 2 * m * k * n / dt / 1e9, dt * 1e3
peak, _ = rate(1024, 1024, 1024)
print(f"1024x1024x1024: {peak:.1f} GFLOP/s")
for (m, k, n, what) in [(32, 768, 2304, "wqkv"), (32, 768, 768, "wo"), (32, 768, 4096, "w1 (2 x 2048)"), (32, 2048, 768, "w2"),
                        (32, 768, 2304, "head adaLN"), (32, 768, 1152, "head mlp in"), (32, 1152, 768, "head mlp out"), (2, 768, 2304, "wqkv, batch 1")]:
    r, ms = rate(m, k, n)
    print(f"{m}x{k}x{n} ({what}): {r:.1f} GFLOP/s = {100 * r / peak:.0f} % of 1024^3, {ms:.3f} ms")
