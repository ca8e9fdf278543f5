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
TRAINER := ./target/release/trainer
RUNTIME := ./target/release/runtime
EXPORTER := ./target/release/exporter
CARGO_FLAGS ?= --release

# libtorch from the torch wheel in the venv (tch 0.26 needs libtorch 2.13.0 exactly).
LIBTORCH = $(shell $(PY) -c "import importlib.util,os; print(os.path.dirname(importlib.util.find_spec('torch').origin))" 2>/dev/null)
export LIBTORCH
export LIBTORCH_BYPASS_VERSION_CHECK := 0
export SPHEREAR_PYTHON := $(PY)

.PHONY: setup build test demo clean-demo help

help:
	@echo "make demo   - install, train the default model on Fashion-MNIST, write PNGs, print metrics"
	@echo "make test   - install, build and run the whole test suite"
	@echo "make setup  - install everything from registries (idempotent)"

setup:
	@bash scripts/setup.sh

build: setup
	cargo build $(CARGO_FLAGS) --workspace

test: setup
	cargo test $(CARGO_FLAGS) --workspace

# Finished stages are reused (their weight files are make targets); an interrupted stage resumes.
demo: build $(RUN)/vae.safetensors $(RUN)/ar.safetensors $(EXPORT)/manifest.json
	$(RUNTIME) generate --model $(EXPORT) --per-class 8 --cfg $(CFG) --steps $(SAMPLE_STEPS) --seed 7 --batch 16 --out $(RUN)/grid.png
	@echo "== reference sampler (libtorch), same seed, for comparison =="
	$(TRAINER) sample --checkpoint $(RUN) --per-class 8 --cfg $(CFG) --steps $(SAMPLE_STEPS) --seed 7 --batch 16 --out $(RUN)/grid-tch.png
	@echo "== VAE (held-out PSNR, dB) =="; cat $(RUN)/vae-metrics.json; echo
	@echo "== AR =="; cat $(RUN)/ar-metrics.json; echo

$(RUN)/vae.safetensors:
	$(TRAINER) fit --stage vae --preset $(PRESET) --data fashion-mnist --out $(RUN) --steps $(VAE_STEPS)

$(EXPORT)/manifest.json: $(RUN)/ar.safetensors
	$(EXPORTER) onnx --checkpoint $(RUN) --out $(EXPORT) --force

$(RUN)/ar.safetensors: $(RUN)/vae.safetensors
	$(TRAINER) fit --stage ar --preset $(PRESET) --vae $(RUN) --data fashion-mnist --out $(RUN) --steps $(AR_STEPS) --batch $(AR_BATCH)

clean-demo:
	rm -rf $(RUN) $(EXPORT)
