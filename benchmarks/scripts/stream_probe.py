# Usage: .venv/bin/python benchmarks/scripts/stream_probe.py [ROWS]
# fp32 MatMul chain with weights streamed from DRAM (SphereAR-B sized: 24 x (768x4096, 4096x768) = 604 MB), 32 rows.
import time, sys, numpy as np, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
m = int(sys.argv[1]) if len(sys.argv) > 1 else 32
L, d, h = 24, 768, 4096
nodes, inits, x = [], [], "x"
rng = np.random.default_rng(0)
for i in range(L):
    for j, (k, n) in enumerate([(d, h), (h, d)]):
        w = f"w{i}_{j}"; inits.append(numpy_helper.from_array((rng.standard_normal((k, n), dtype=np.float32) * 0.01), w))
        y = f"y{i}_{j}"; nodes.append(helper.make_node("MatMul", [x, w], [y])); x = y
g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, d])],
                      [helper.make_tensor_value_info(x, TensorProto.FLOAT, [m, d])], inits)
mdl = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
so = ort.SessionOptions(); so.intra_op_num_threads = 2
s = ort.InferenceSession(mdl.SerializeToString(), so, providers=["CPUExecutionProvider"])
xv = rng.standard_normal((m, d), dtype=np.float32)
for _ in range(3): s.run(None, {"x": xv})
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 5: s.run(None, {"x": xv}); n += 1
dt = (time.perf_counter() - t0) / n
flops = 2 * m * L * 2 * d * h; byts = L * 2 * d * h * 4
print(f"{m} rows: {dt*1e3:.1f} ms per chain; {flops/dt/1e9:.1f} GFLOP/s; {byts/dt/1e9:.1f} GB/s of weights; "
      f"FLOP time at 271 GFLOP/s {flops/271e9*1e3:.1f} ms, byte time at 26.2 GB/s {byts/26.2e9*1e3:.1f} ms")
