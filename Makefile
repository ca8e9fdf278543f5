# SphereAR toolchain. `make demo` and `make test` do everything on a fresh machine.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
RUN ?= runs/demo
PRESET ?= fmnist-32
VAE_STEPS ?= 3000
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

demo: build
	./target/release/trainer fit --stage vae --preset $(PRESET) --data fashion-mnist --out $(RUN) --steps $(VAE_STEPS)

clean-demo:
	rm -rf $(RUN)
