"""Oracle of the `calibration calibrate` tests: ONNX Runtime's own python calibration code.

Commands (JSON on the last stdout line):
  ranges IN.json            entropy thresholds (HistogramCollector.get_entropy_threshold) and symmetric
                            percentile thresholds (HistogramCollector.compute_percentile) of given histograms
  collect IN.json           HistogramCollector.collect_value / collect_absolute_value over given batches
  tables DIR IN.json OURS   write_calibration_table(TensorsData) into DIR, then parse DIR's and OURS'
                            calibration.flatbuffers with ORT's TrtTable reader
  optimized MODEL           op counts of ONNX Runtime CPU's optimized form of MODEL (what fused)
  graph_error FP32 INT8     run ar_prefill, ar_step, head_step of both exports on the same inputs; max abs
                            error / max |fp32 output| per graph
"""

import json
import os
import sys
import tempfile
from collections import Counter

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization.calibrate import (
    CalibrationMethod,
    HistogramCollector,
    TensorData,
    TensorsData,
)


def collector(method, bins, percentile=99.99, symmetric=False):
    return HistogramCollector(method, symmetric, bins, 128, percentile, "same")


def f32(v):
    return np.array(v, dtype=np.float32)


def ranges(path):
    spec = json.load(open(path))
    out = []
    for h in spec["hists"]:
        counts = np.array(h["counts"], dtype=np.int64)
        edges = np.array(h["edges"], dtype=np.float32)
        mn, mx = f32(h["min"]), f32(h["max"])
        if h["kind"] == "signed":
            c = collector("entropy", len(counts))
            lo, hi = c.get_entropy_threshold((counts, edges, mn, mx, f32(h["threshold"])), 128)
        else:
            c = collector("percentile", len(counts), percentile=h["percentile"], symmetric=True)
            c.histogram_dict = {"t": (counts, edges, mn, mx)}
            lo, hi = c.compute_percentile()["t"][:2]
        out.append([float(lo), float(hi)])
    return out


def collect(path):
    spec = json.load(open(path))
    res = {}
    for kind, method, sym in [("signed", "entropy", False), ("abs", "percentile", True)]:
        c = collector(method, spec["bins"], symmetric=sym)
        for b in spec["batches"]:
            c.collect({"t": [f32(b)]})
        h = c.histogram_dict["t"]
        res[kind] = {
            "counts": [int(x) for x in h[0]],
            "edges": [float(x) for x in h[1]],
            "min": float(h[2]),
            "max": float(h[3]),
        }
    return res


def read_table(path):
    from onnxruntime.quantization.CalTableFlatBuffers.TrtTable import TrtTable

    buf = open(path, "rb").read()
    t = TrtTable.GetRootAsTrtTable(buf, 0)
    return [[t.Dict(i).Key().decode(), t.Dict(i).Value().decode()] for i in range(t.DictLength())]


def tables(out_dir, path, ours):
    from onnxruntime.quantization.quant_utils import write_calibration_table

    spec = json.load(open(path))
    method = getattr(CalibrationMethod, spec["method"])
    data = {k: TensorData(lowest=f32(-a), highest=f32(a)) for k, a in sorted(spec["table"].items())}
    write_calibration_table(TensorsData(method, data), dir=out_dir)
    return {
        "oracle": read_table(os.path.join(out_dir, "calibration.flatbuffers")),
        "ours": read_table(os.path.join(ours, "calibration.flatbuffers")),
    }


def optimized(model):
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.bin")
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        import onnx

        m = onnx.load(os.path.join(d, "opt.onnx"), load_external_data=False)
        return dict(Counter(n.op_type for n in m.graph.node))


def graph_error(fp32, int8):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = lambda d, g: ort.InferenceSession(os.path.join(d, g + ".onnx"), so, providers=["CPUExecutionProvider"])
    man = json.load(open(os.path.join(fp32, "manifest.json")))
    rng = np.random.default_rng(0)
    classes = np.arange(8, dtype=np.int64) % man["num_classes"]
    b, d, radius = len(classes), man["latent_dim"], man["radius"]
    res = {}

    def err(a, r):
        return float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-30))

    outs = {}
    for k, exp in (("fp32", fp32), ("int8", int8)):
        s = sess(exp, "ar_prefill")
        outs[k] = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"class_ids": classes})))
    res["ar_prefill"] = err(outs["int8"]["condition"], outs["fp32"]["condition"])
    token = rng.standard_normal((b, d)).astype(np.float32)
    token *= radius / np.linalg.norm(token, axis=1, keepdims=True)
    feed = {"token": token, "position": np.full((b,), man["cls_token_num"], dtype=np.int64)}
    for name, v in outs["fp32"].items():
        if name.startswith("present."):
            feed[name.replace("present.", "past_key_values.")] = v
    conds = {k: sess(exp, "ar_step").run(["condition"], feed)[0] for k, exp in (("fp32", fp32), ("int8", int8))}
    res["ar_step"] = err(conds["int8"], conds["fp32"])
    hfeed = {
        "x_t": rng.standard_normal((b, d)).astype(np.float32),
        "t": np.full((b,), 0.5, dtype=np.float32),
        "condition": outs["fp32"]["condition"],
    }
    v = {k: sess(exp, "head_step").run(["velocity"], hfeed)[0] for k, exp in (("fp32", fp32), ("int8", int8))}
    res["head_step"] = err(v["int8"], v["fp32"])
    return res


def main():
    cmd = sys.argv[1]
    if cmd == "ranges":
        r = ranges(sys.argv[2])
    elif cmd == "collect":
        r = collect(sys.argv[2])
    elif cmd == "tables":
        r = tables(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "optimized":
        r = optimized(sys.argv[2])
    elif cmd == "graph_error":
        r = graph_error(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown command {cmd}")
    sys.stdout.flush()
    print(json.dumps(r))


if __name__ == "__main__":
    main()
