#!/usr/bin/env bash
# Installs everything a fresh machine needs, from registries only. Idempotent: a second run takes seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SPHEREAR_VENV:-$ROOT/.venv}"
STAMP="$VENV/.setup-v1"
PY="${PYTHON:-python3}"

if [ ! -f "$STAMP" ]; then
  echo "[setup] creating python venv at $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # lean libtorch for tch 0.26 (CPU use; the CUDA runtime wheels only satisfy the loader)
  "$VENV/bin/pip" install -q --no-deps torch==2.13.0 "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-cupti==13.0.85.*"
  # onnxruntime for the runtime (ORT_DYLIB_PATH) and onnx for graph checks in tests
  "$VENV/bin/pip" install -q onnxruntime==1.31.1 onnx numpy
  touch "$STAMP"
else
  echo "[setup] venv ok ($VENV)"
fi
# Oracles of the calibration tests: onnxruntime's weight-only quantizer imports onnx_ir and its calibrator
# scipy, which the wheel does not declare; write_calibration_table needs flatbuffers.
"$VENV/bin/python" -c "import onnx_ir, scipy, flatbuffers" 2>/dev/null \
  || "$VENV/bin/pip" install -q onnx-ir==1.1.0 scipy==1.17.1 flatbuffers==25.12.19

if [ ! -d /usr/share/datasets/fashion-mnist ] || [ -z "$(ls -A /usr/share/datasets/fashion-mnist 2>/dev/null)" ]; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "[setup] fashion-mnist ok"
fi
