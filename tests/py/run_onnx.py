"""ONNX checks and runs for the Rust tests (until the Rust `ort` runtime lands).

Tensors travel as safetensors files (parsed here by hand: no extra package needed).

  run_onnx.py check MODEL.onnx...            onnx.checker full check + ONNX Runtime CPU session per model
  run_onnx.py run MODEL.onnx IN OUT          feed every tensor of IN whose name is a graph input; write all outputs
  run_onnx.py ar EXPORT_DIR IN OUT           IN: class_ids [B] int64, tokens [B, L, d]; runs ar_prefill, then
                                             ar_step for tokens 1..L-1 with present bound to the past buffers
                                             (in place, as the manifest says); OUT: conditions [B, L, dim]
  run_onnx.py ar_mixed EXPORT_DIR IN OUT K   the same for B = 2 with the rows K tokens apart: row 0 runs its
                                             first K steps alone, then both rows share each ar_step call at
                                             different positions, then row 1 finishes alone
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
        binding.bind_cpu_input("position", np.full(tokens.shape[0], cls + i - 1, dtype=np.int64))
        step.run_with_iobinding(binding)
        conds.append(binding.copy_outputs_to_cpu()[-1])
    assert all(v.data_ptr() == ptrs[n] for n, v in cache.items()), "the KV cache moved"
    write_st(out, {"conditions": np.stack(conds, axis=1)})


class Rows:
    """ar_step over a set of rows with their own KV caches, bound in place."""

    def __init__(self, step, cache):
        self.step, self.cache = step, {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for n, v in cache.items()}
        self.binding = step.io_binding()
        for n, v in self.cache.items():
            self.binding.bind_ortvalue_input(n.replace("present.", "past_key_values."), v)
            self.binding.bind_ortvalue_output(n, v)
        self.binding.bind_output("condition")

    def run(self, tokens, positions):
        self.binding.bind_cpu_input("token", np.ascontiguousarray(tokens))
        self.binding.bind_cpu_input("position", np.asarray(positions, dtype=np.int64))
        self.step.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()[-1]

    def rows(self, sel):
        return {n: v.numpy()[sel] for n, v in self.cache.items()}


def ar_mixed(export_dir, inp, out, k):
    feeds = read_st(inp)
    ids, tokens, k = feeds["class_ids"], feeds["tokens"], int(k)
    assert ids.shape[0] == 2
    pre = session(f"{export_dir}/ar_prefill.onnx")
    step = session(f"{export_dir}/ar_step.onnx")
    cls = json.load(open(f"{export_dir}/manifest.json"))["cls_token_num"]
    n_tok = tokens.shape[1]
    res = pre.run(None, {"class_ids": ids})
    names = [o.name for o in pre.get_outputs()]
    cache = {n: r for n, r in zip(names, res) if n.startswith("present.")}
    conds = np.zeros((2, n_tok, res[names.index("condition")].shape[1]), dtype=np.float32)
    conds[:, 0] = res[names.index("condition")]
    # Row 0 alone for tokens 1..K.
    solo = Rows(step, {n: v[0:1] for n, v in cache.items()})
    for i in range(1, k + 1):
        conds[0, i] = solo.run(tokens[0:1, i - 1], [cls + i - 1])[0]
    # Both rows in one call each, row 0 at token i + K, row 1 at token i.
    both = Rows(step, {n: np.concatenate([solo.rows(slice(0, 1))[n], v[1:2]]) for n, v in cache.items()})
    for i in range(1, n_tok - k):
        j = i + k
        c = both.run(np.stack([tokens[0, j - 1], tokens[1, i - 1]]), [cls + j - 1, cls + i - 1])
        conds[0, j], conds[1, i] = c[0], c[1]
    # Row 1 alone for its last K tokens.
    last = Rows(step, both.rows(slice(1, 2)))
    for i in range(n_tok - k, n_tok):
        conds[1, i] = last.run(tokens[1:2, i - 1], [cls + i - 1])[0]
    write_st(out, {"conditions": conds})


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
    elif cmd == "ar_mixed":
        ar_mixed(*args)
    elif cmd == "bench":
        bench(args[0], args[1], int(args[2]))
    else:
        sys.exit(f"unknown command {cmd}")
