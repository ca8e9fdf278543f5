"""Times ar_step and head_step of several exports of one checkpoint (fp32 first) in one process, and
reports each output's error against the first export's.

  time_quantized.py [--rows 2] [--iters 30] [--threads 2] EXPORT_DIR...

ar_step runs every row at the middle image token with a random KV cache bound in place (present.* = the same
OrtValues as past_key_values.*, as the runtime binds it); head_step at t = 0.5. Inputs are the same for
every export (seed 0). Prints one JSON line per (export, graph): median ms over --iters calls after 3
warm-up calls, and max |y - y_ref| / max |y_ref| and RMS(y - y_ref) / RMS(y_ref) of the first output.
"""
import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort


def session(path, threads):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def run_timed(fn, iters):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    m = json.load(open(os.path.join(a.exports[0], "manifest.json")))
    kv, rows = m["kv_cache"], a.rows
    rng = np.random.default_rng(0)
    d, dim = m["latent_dim"], m["config"]["ar"]["dim"]
    token = rng.standard_normal((rows, d)).astype(np.float32)
    position = np.full((rows,), m["cls_token_num"] + m["num_tokens"] // 2, dtype=np.int64)
    cache = [
        rng.standard_normal((rows, kv["heads"], kv["seq_len"], kv["head_dim"])).astype(np.float32)
        for _ in range(2 * kv["layers"])
    ]
    head_in = {
        "x_t": rng.standard_normal((rows, d)).astype(np.float32),
        "t": np.full((rows,), 0.5, dtype=np.float32),
        "condition": rng.standard_normal((rows, dim)).astype(np.float32),
    }
    ref = {}
    for ex in a.exports:
        mm = json.load(open(os.path.join(ex, "manifest.json")))
        for g in ["ar_step", "head_step"]:
            entry = mm["graphs"][g]
            s = session(os.path.join(ex, entry["file"]), a.threads)
            if g == "ar_step":
                io = s.io_binding()
                io.bind_cpu_input("token", token)
                io.bind_cpu_input("position", position)
                vals = [ort.OrtValue.ortvalue_from_numpy(c.copy()) for c in cache]
                for i in range(kv["layers"]):
                    for j, w in enumerate(["key", "value"]):
                        v = vals[2 * i + j]
                        io.bind_ortvalue_input(f"past_key_values.{i}.{w}", v)
                        io.bind_ortvalue_output(f"present.{i}.{w}", v)
                io.bind_output("condition")
                ms = run_timed(lambda: s.run_with_iobinding(io), a.iters)
                y = io.copy_outputs_to_cpu()[0]
            else:
                ms = run_timed(lambda: s.run(["velocity"], head_in), a.iters)
                y = s.run(["velocity"], head_in)[0]
            if g not in ref:
                ref[g] = y
            r = ref[g]
            max_rel = float(np.max(np.abs(y - r)) / np.max(np.abs(r)))
            rms_rel = float(np.sqrt(np.mean((y - r) ** 2)) / np.sqrt(np.mean(r**2)))
            p = entry.get("precision", {})
            print(
                json.dumps(
                    {
                        "export": os.path.basename(os.path.normpath(ex)),
                        "graph": g,
                        "kind": p.get("kind", m["precision"]["compute"]),
                        "accuracy_level": p.get("accuracy_level"),
                        "weight_mb": (p.get("weight_bytes") or 0) / 1e6,
                        "rows": rows,
                        "ms": round(ms, 2),
                        "max_rel_err": max_rel,
                        "rms_rel_err": rms_rel,
                    }
                ),
                flush=True,
            )
            del s


if __name__ == "__main__":
    main()
