# SphereAR toolchain. `make demo` and `make test` do everything on a fresh machine.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
RUN ?= runs/demo
PRESET ?= fmnist-32
VAE_STEPS ?= 1500
AR_STEPS ?= 2000
AR_BATCH ?= 16
CFG ?= 3.0
SAMPLE_STEPS ?= 20
EXPORT ?= export/demo
JUDGE ?= runs/judge
JUDGE_EXPORT ?= export/judge
EVAL_PER_CLASS ?= 20
EVAL_STEPS ?= 10
TRAINER := ./target/release/trainer
RUNTIME := ./target/release/runtime
EXPORTER := ./target/release/exporter
BENCH := ./target/release/bench
CARGO_FLAGS ?= --release

# libtorch from the torch wheel in the venv (tch 0.26 needs libtorch 2.13.0 exactly).
LIBTORCH = $(shell $(PY) -c "import importlib.util,os; print(os.path.dirname(importlib.util.find_spec('torch').origin))" 2>/dev/null)
export LIBTORCH
export LIBTORCH_BYPASS_VERSION_CHECK := 0
export SPHEREAR_PYTHON := $(PY)

.PHONY: setup build test demo bench bench-b clean-demo help

help:
	@echo "make demo   - install, train the default model on Fashion-MNIST, write PNGs, print metrics"
	@echo "make test   - install, build and run the whole test suite"
	@echo "make setup  - install everything from registries (idempotent)"
	@echo "make bench  - speed table of the demo model; make bench-b: the same on a random SphereAR-B"

setup:
	@bash scripts/setup.sh

build: setup
	cargo build $(CARGO_FLAGS) --workspace

test: setup
	cargo test $(CARGO_FLAGS) --workspace

# Finished stages are reused (their weight files are make targets); an interrupted stage resumes.
demo: build $(RUN)/vae.safetensors $(RUN)/ar.safetensors $(EXPORT)/manifest.json $(JUDGE_EXPORT)/manifest.json
	$(RUNTIME) generate --model $(EXPORT) --per-class 8 --cfg $(CFG) --steps $(SAMPLE_STEPS) --seed 7 --batch 16 --out $(RUN)/grid.png
	@echo "== reference sampler (libtorch), same seed, for comparison =="
	$(TRAINER) sample --checkpoint $(RUN) --per-class 8 --cfg $(CFG) --steps $(SAMPLE_STEPS) --seed 7 --batch 16 --out $(RUN)/grid-tch.png
	@echo "== VAE (held-out PSNR, dB) =="; cat $(RUN)/vae-metrics.json; echo
	@echo "== AR =="; cat $(RUN)/ar-metrics.json; echo
	@echo "== quality: judge accuracy and Fréchet distance in judge features ($(EVAL_PER_CLASS) images per class) =="
	$(RUNTIME) eval --model $(EXPORT) --judge $(JUDGE_EXPORT) --per-class $(EVAL_PER_CLASS) --cfg 1,2,3,4,5 --steps $(EVAL_STEPS) --train-limit 10000 --out $(RUN)/eval --quiet
	@echo "== speed: runtime vs libtorch reference (batch 16, 10 steps, whole images; full table: make bench) =="
	@$(BENCH) speed --model $(EXPORT) --checkpoint $(RUN) --batch-sizes 16 --steps 10 --precision fp32 --tokens 0 --micro-seconds 0.5 --out $(RUN)/bench --quiet 2>&1 >/dev/null | grep ' steps 10 batch 16:'

# Speed table of the demo model across batch sizes, steps and precisions (bench/demo/speed.{md,json,png}).
bench: build $(EXPORT)/manifest.json
	$(BENCH) speed --model $(EXPORT) --checkpoint $(RUN) --out bench/demo

# The same on a random-init SphereAR-B (speed does not depend on the weights), fp32 and weight-only int8/int4:
# about 40 min on 2 cores.
bench-b: build
	test -f bench/spherear-b/ckpt/ar.safetensors || $(EXPORTER) random-checkpoint --preset spherear-b --out bench/spherear-b/ckpt
	$(BENCH) speed --checkpoint bench/spherear-b/ckpt --tokens 4 --precision fp32,w8,w4 --out bench/spherear-b

$(RUN)/vae.safetensors:
	$(TRAINER) fit --stage vae --preset $(PRESET) --data fashion-mnist --out $(RUN) --steps $(VAE_STEPS)

$(EXPORT)/manifest.json: $(RUN)/ar.safetensors
	$(EXPORTER) onnx --checkpoint $(RUN) --out $(EXPORT) --force

$(JUDGE)/judge.safetensors:
	$(TRAINER) fit --stage judge --data fashion-mnist --out $(JUDGE)

$(JUDGE_EXPORT)/manifest.json: $(JUDGE)/judge.safetensors
	$(EXPORTER) judge --checkpoint $(JUDGE) --out $(JUDGE_EXPORT) --force

$(RUN)/ar.safetensors: $(RUN)/vae.safetensors
	$(TRAINER) fit --stage ar --preset $(PRESET) --vae $(RUN) --data fashion-mnist --out $(RUN) --steps $(AR_STEPS) --batch $(AR_BATCH)

clean-demo:
	rm -rf $(RUN) $(EXPORT) $(JUDGE) $(JUDGE_EXPORT)
