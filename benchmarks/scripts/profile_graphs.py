# Usage: .venv/bin/python benchmarks/scripts/profile_graphs.py EXPORT_DIR [POSITION]
# Op-type breakdown (ORT profiler) of SphereAR-B fp32 ar_step and head_step at 32 rows (batch 16 with CFG), 2 threads.
import json, sys, os, collections, numpy as np, onnxruntime as ort
d = sys.argv[1]; rows = 32; pos = int(sys.argv[2]) if len(sys.argv) > 2 else 140
def prof(g, feeds, n=20):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.enable_profiling = True
    so.profile_file_prefix = f"/tmp/prof_{g}"
    s = ort.InferenceSession(f"{d}/{g}.onnx", so, providers=["CPUExecutionProvider"])
    for _ in range(3): s.run(None, feeds)
    # restart the profile after warm-up
    f = s.end_profiling(); os.remove(f)
    so.enable_profiling = True
    s = ort.InferenceSession(f"{d}/{g}.onnx", so, providers=["CPUExecutionProvider"])
    if g == "ar_step":  # in place, as the runtime binds it: present.* is the past_key_values.* buffer
        io = s.io_binding(); vals = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        for k, v in vals.items(): io.bind_ortvalue_input(k, v)
        for o in s.get_outputs():
            if o.name.startswith("present."):
                io.bind_ortvalue_output(o.name, vals[o.name.replace("present.", "past_key_values.")])
            else: io.bind_output(o.name)
        call = lambda: s.run_with_iobinding(io)
    else:
        call = lambda: s.run(None, feeds)
    for _ in range(3): call()
    for _ in range(n): call()
    f = s.end_profiling(); ev = json.load(open(f)); os.remove(f)
    runs = [e for e in ev if e.get("cat") == "Session" and e["name"] == "model_run"][3:]
    total = sum(e["dur"] for e in runs) / len(runs)
    by = collections.Counter()
    t0 = runs[0]["ts"]
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
            by[e["args"]["op_name"]] += e["dur"]
    print(f"{g}: {total/1000:.2f} ms per call ({rows} rows)")
    for op, t in by.most_common(12):
        print(f"   {op:32s} {t/n/1000:8.3f} ms  {100*t/n/total:5.1f} %")
s0 = ort.InferenceSession(f"{d}/ar_step.onnx", providers=["CPUExecutionProvider"])
feeds = {}
for i in s0.get_inputs():
    if i.name == "token": feeds[i.name] = np.random.randn(rows, i.shape[1]).astype(np.float32)
    elif i.name == "position": feeds[i.name] = np.full(rows, pos, np.int64)
    else:
        shp = [rows] + list(i.shape[1:]); feeds[i.name] = (np.random.randn(*shp) * 0.5).astype(np.float32)
del s0
prof("ar_step", feeds)
s0 = ort.InferenceSession(f"{d}/head_step.onnx", providers=["CPUExecutionProvider"])
c = [i for i in s0.get_inputs() if i.name == "condition"][0].shape[1]; dd = s0.get_inputs()[0].shape[1]; del s0
prof("head_step", {"x_t": np.random.randn(rows, dd).astype(np.float32), "t": np.full(rows, 0.5, np.float32),
                   "condition": np.random.randn(rows, c).astype(np.float32)}, n=50)
