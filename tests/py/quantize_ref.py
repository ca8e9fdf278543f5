"""Reference side of the calibration tests: ONNX Runtime's own weight-only quantizer.

  quantize_ref.py compare SRC.onnx OURS.onnx BITS BLOCK ACC [KEEP,...] [NAME=INT ...]
      Quantizes SRC (an fp32 export graph) with onnxruntime.quantization.matmul_nbits_quantizer
      (MatMulNBitsQuantizer + DefaultWeightOnlyQuantConfig(block_size=BLOCK, bits=BITS, is_symmetric=True,
      accuracy_level=ACC)), excluding MatMuls whose weight is not a checkpoint tensor (external data) and
      those whose checkpoint key starts with a KEEP entry ('-' for none), then compares every MatMulNBits
      node of the reference with OURS: op, domain, inputs, outputs, attributes, and the dims, dtype and
      bytes of every initializer it reads. Then runs both in ONNX Runtime on the same random inputs (int64
      inputs set to NAME=INT, default 0) and reports the largest output difference. Prints JSON.
  quantize_ref.py bytes MODEL.onnx
      Initializer bytes of a graph: {"weights": read whole per call, "lookups": only Gather tables}. Prints JSON.
"""
import json
import logging
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

try:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
except ModuleNotFoundError as e:  # onnxruntime does not declare onnx-ir, which its quantizer imports
    sys.exit(f"quantize_ref.py: {e}: the reference quantizer needs `pip install onnx-ir==1.1.0` (scripts/setup.sh)")

logging.disable(logging.INFO)  # the quantizer logs every node at INFO


def checkpoint_key(name):
    return name[:-2] if name.endswith(".T") else name


def external(t):
    return t.data_location == onnx.TensorProto.EXTERNAL


def tensor_bytes(t, base):
    if external(t):
        return int({e.key: e.value for e in t.external_data}["length"])
    return numpy_helper.to_array(t, base).nbytes


def session(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def feeds(sess, ints, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in i.shape]
        if i.type == "tensor(int64)":
            out[i.name] = np.full(shape, ints.get(i.name, 0), dtype=np.int64)
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def compare(src, ours, bits, block, acc, keep, ints):
    raw = onnx.load(src, load_external_data=False)
    inits = {t.name: t for t in raw.graph.initializer}
    exclude = []
    for n in raw.graph.node:
        if n.op_type != "MatMul":
            continue
        t = inits.get(n.input[1])
        if t is None or not external(t) or any(checkpoint_key(t.name).startswith(k) for k in keep):
            exclude.append(n.name)
    model = onnx.load(src)  # with external data
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=acc, bits=bits)
    q = MatMulNBitsQuantizer(model, algo_config=cfg, nodes_to_exclude=exclude)
    q.process()
    ref = q.model.model
    mine = onnx.load(ours)
    ref_inits = {t.name: t for t in ref.graph.initializer}
    my_inits = {t.name: t for t in mine.graph.initializer}
    my_nodes = {n.name: n for n in mine.graph.node}
    mismatches, compared, nbytes = [], 0, 0

    def attrs(n):
        return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}

    ref_q = [n for n in ref.graph.node if n.op_type == "MatMulNBits"]
    for rn in ref_q:
        mn = my_nodes.get(rn.name)
        if mn is None:
            mismatches.append(f"node {rn.name}: missing in ours")
            continue
        for what, a, b in [
            ("op", (rn.domain, rn.op_type), (mn.domain, mn.op_type)),
            ("inputs", list(rn.input), list(mn.input)),
            ("outputs", list(rn.output), list(mn.output)),
            ("attributes", attrs(rn), attrs(mn)),
        ]:
            if a != b:
                mismatches.append(f"node {rn.name}: {what} {b} != reference {a}")
        for name in rn.input[1:]:
            rt, mt = ref_inits.get(name), my_inits.get(name)
            if rt is None or mt is None:
                mismatches.append(f"initializer {name}: missing ({'ours' if mt is None else 'reference'})")
                continue
            ra, ma = numpy_helper.to_array(rt), numpy_helper.to_array(mt)
            if rt.data_type != mt.data_type or list(rt.dims) != list(mt.dims):
                mismatches.append(f"initializer {name}: {mt.data_type} {list(mt.dims)} != {rt.data_type} {list(rt.dims)}")
                continue
            rb, mb = ra.tobytes(), ma.tobytes()
            if rb != mb:
                diff = int(np.count_nonzero(np.frombuffer(rb, np.uint8) != np.frombuffer(mb, np.uint8)))
                mismatches.append(f"initializer {name}: {diff} of {len(rb)} bytes differ")
            compared += 1
            nbytes += len(rb)
    ours_q = [n.name for n in mine.graph.node if n.op_type == "MatMulNBits"]
    extra = sorted(set(ours_q) - {n.name for n in ref_q})
    if extra:
        mismatches.append(f"ours has MatMulNBits nodes the reference has not: {extra}")
    ref_mm = sorted(n.name for n in ref.graph.node if n.op_type == "MatMul")
    my_mm = sorted(n.name for n in mine.graph.node if n.op_type == "MatMul")
    if ref_mm != my_mm:
        mismatches.append(f"unquantized MatMuls differ: ours {my_mm} vs reference {ref_mm}")

    rs, ms = session(ref), session(ours)
    f = feeds(ms, ints)
    r_out = rs.run(None, f)
    m_out = ms.run(None, f)
    names = [o.name for o in ms.get_outputs()]
    max_diff = {n: float(np.max(np.abs(a - b))) if a.size else 0.0 for n, a, b in zip(names, r_out, m_out)}
    print(
        json.dumps(
            {
                "reference_matmulnbits": len(ref_q),
                "ours_matmulnbits": len(ours_q),
                "excluded": len(exclude),
                "compared_initializers": compared,
                "compared_bytes": nbytes,
                "mismatches": mismatches,
                "max_output_diff": max(max_diff.values()) if max_diff else 0.0,
                "max_abs_output": float(max(np.max(np.abs(a)) for a in r_out)),
            }
        )
    )


def graph_bytes(path):
    m = onnx.load(path, load_external_data=False)
    base = os.path.dirname(path)
    whole, table = set(), set()
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            (table if (n.op_type == "Gather" and n.domain == "" and i == 0) else whole).add(name)
    w = sum(tensor_bytes(t, base) for t in m.graph.initializer if t.name in whole)
    l = sum(tensor_bytes(t, base) for t in m.graph.initializer if t.name not in whole and t.name in table)
    print(json.dumps({"weights": w, "lookups": l}))


def main():
    cmd = sys.argv[1]
    if cmd == "compare":
        src, ours, bits, block, acc = sys.argv[2:7]
        rest = sys.argv[7:]
        keep = [k for k in rest[0].split(",") if k and k != "-"] if rest else []
        ints = dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in rest[1:])
        compare(src, ours, int(bits), int(block), int(acc), keep, ints)
    elif cmd == "bytes":
        graph_bytes(sys.argv[2])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
