"""ONNX checks and runs for the Rust tests (until the Rust `ort` runtime lands).

Tensors travel as safetensors files (parsed here by hand: no extra package needed).

  run_onnx.py check MODEL.onnx...            onnx.checker full check + ONNX Runtime CPU session per model
  run_onnx.py run MODEL.onnx IN OUT          feed every tensor of IN whose name is a graph input; write all outputs
  run_onnx.py ar EXPORT_DIR IN OUT           IN: class_ids [B] int64, tokens [B, L, d]; runs ar_prefill, then
                                             ar_step for tokens 1..L-1 with present bound to the past buffers
                                             (in place, as the manifest says); OUT: conditions [B, L, dim]
  run_onnx.py bench MODEL.onnx IN ITERS      mean milliseconds per run (inputs from IN)
"""
import json
import struct
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

DT = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "F64": np.float64, "I32": np.int32}
TD = {np.dtype(v): k for k, v in DT.items()}


def read_st(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[base + a : base + b], dtype=DT[info["dtype"]]).reshape(info["shape"]).copy()
    return out


def write_st(path, tensors):
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        raw = arr.tobytes()
        header[name] = {"dtype": TD[arr.dtype], "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def check(paths):
    for p in paths:
        onnx.checker.check_model(p, full_check=True)
        s = session(p)
        print(f"ok {p}: inputs {[i.name for i in s.get_inputs()][:4]} outputs {[o.name for o in s.get_outputs()][:4]}")


def run(path, inp, out):
    s = session(path)
    feeds = read_st(inp)
    names = [i.name for i in s.get_inputs()]
    res = s.run(None, {n: feeds[n] for n in names})
    write_st(out, {o.name: r for o, r in zip(s.get_outputs(), res)})


def ar(export_dir, inp, out):
    feeds = read_st(inp)
    ids, tokens = feeds["class_ids"], feeds["tokens"]
    pre = session(f"{export_dir}/ar_prefill.onnx")
    step = session(f"{export_dir}/ar_step.onnx")
    manifest = json.load(open(f"{export_dir}/manifest.json"))
    cls = manifest["cls_token_num"]
    res = pre.run(None, {"class_ids": ids})
    names = [o.name for o in pre.get_outputs()]
    conds = [res[names.index("condition")]]
    cache = {n: ort.OrtValue.ortvalue_from_numpy(r) for n, r in zip(names, res) if n.startswith("present.")}
    ptrs = {n: v.data_ptr() for n, v in cache.items()}
    binding = step.io_binding()
    for n, v in cache.items():
        binding.bind_ortvalue_input(n.replace("present.", "past_key_values."), v)
        binding.bind_ortvalue_output(n, v)
    binding.bind_output("condition")
    for i in range(1, tokens.shape[1]):
        binding.bind_cpu_input("token", np.ascontiguousarray(tokens[:, i - 1]))
        binding.bind_cpu_input("position", np.array([cls + i - 1], dtype=np.int64))
        step.run_with_iobinding(binding)
        conds.append(binding.copy_outputs_to_cpu()[-1])
    assert all(v.data_ptr() == ptrs[n] for n, v in cache.items()), "the KV cache moved"
    write_st(out, {"conditions": np.stack(conds, axis=1)})


def bench(path, inp, iters):
    s = session(path)
    feeds = read_st(inp)
    feeds = {i.name: feeds[i.name] for i in s.get_inputs()}
    s.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(iters):
        s.run(None, feeds)
    print(f"{(time.perf_counter() - t0) / iters * 1e3:.3f} ms")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "check":
        check(args)
    elif cmd == "run":
        run(*args)
    elif cmd == "ar":
        ar(*args)
    elif cmd == "bench":
        bench(args[0], args[1], int(args[2]))
    else:
        sys.exit(f"unknown command {cmd}")
