# SphereAR toolchain. `make demo` and `make test` do everything on a fresh machine.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
RUN ?= runs/demo
PRESET ?= fmnist-32
VAE_STEPS ?= 1500
# The demo's VAE KL weight: 0.001 (the spherical default, 0.004, gave 24.6 dB and 86.2 % / FD 21.1; README).
VAE_KL ?= 0.001
AR_STEPS ?= 6000
AR_BATCH ?= 16
CFG ?= 5.0
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

# Posterior ablation (make ablation): spherical vs Gaussian latents, same budget, code path and evaluation.
ABL_POSTERIORS ?= spherical gaussian
ABL_SEEDS ?= 0 1
ABL_VAE_STEPS ?= 1000
ABL_AR_STEPS ?= 2000
# Training images of both stages (the AR stage encodes them all once): 10000 keeps the encoding short.
ABL_LIMIT ?= 10000
# KL weights per posterior, e.g. ABL_KL="spherical=0.001 gaussian=0.04" (unset: each posterior's default).
ABL_KL ?=
ABL_EVAL_PER_CLASS ?= 40
ABL_EVAL_STEPS ?= 10
ABL_RUNS ?= runs/ablation
ABL_EXPORTS ?= export/ablation
ABL_OUT ?= bench/ablation

.PHONY: setup build test demo bench bench-b ablation clean-demo help

help:
	@echo "make demo   - install, train the default model on Fashion-MNIST, write PNGs, print metrics"
	@echo "make test   - install, build and run the whole test suite"
	@echo "make setup  - install everything from registries (idempotent)"
	@echo "make bench  - speed table of the demo model; make bench-b: the same on a random SphereAR-B"
	@echo "make ablation - spherical vs Gaussian posterior, 2 seeds each (~60 min on 2 cores): bench/ablation/"

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

# Posterior ablation (paper §4.3, Fig. 4): for every posterior × seed a VAE and an AR model with the same steps,
# export, `runtime eval` at cfg 1–5 (the demo's judge), then the summary bench/ablation/ablation.{md,json,png}.
# Each run lives in $(ABL_RUNS)/<posterior>-seed<N>/; finished stages, exports and evaluations are reused, an
# interrupted stage resumes. About 20 min per run on one idle core with the defaults (README).
ablation: build $(JUDGE_EXPORT)/manifest.json
	@set -e; for p in $(ABL_POSTERIORS); do for s in $(ABL_SEEDS); do \
	  run=$(ABL_RUNS)/$$p-seed$$s; exp=$(ABL_EXPORTS)/$$p-seed$$s; \
	  kl=""; for kv in $(ABL_KL); do if [ "$${kv%%=*}" = "$$p" ]; then kl="--kl-weight $${kv#*=}"; fi; done; \
	  echo "== ablation: $$p posterior, seed $$s ($$run) $$kl =="; \
	  $(TRAINER) fit --stage vae --preset $(PRESET) --posterior $$p --data fashion-mnist --out $$run \
	    --steps $(ABL_VAE_STEPS) --seed $$s --limit $(ABL_LIMIT) $$kl --quiet; \
	  $(TRAINER) fit --stage ar --preset $(PRESET) --vae $$run --data fashion-mnist --out $$run \
	    --steps $(ABL_AR_STEPS) --batch $(AR_BATCH) --seed $$s --limit $(ABL_LIMIT) --quiet; \
	  if [ ! $$exp/manifest.json -nt $$run/ar.safetensors ]; then \
	    $(EXPORTER) onnx --checkpoint $$run --out $$exp --force; fi; \
	  if [ ! $$run/eval/eval.json -nt $$exp/manifest.json ]; then \
	    $(RUNTIME) eval --model $$exp --judge $(JUDGE_EXPORT) --per-class $(ABL_EVAL_PER_CLASS) --cfg 1,2,3,4,5 \
	      --steps $(ABL_EVAL_STEPS) --seed $$s --train-limit 10000 --out $$run/eval --quiet; fi; \
	done; done
	$(BENCH) ablation --runs $(ABL_RUNS) --out $(ABL_OUT)

$(RUN)/vae.safetensors:
	$(TRAINER) fit --stage vae --preset $(PRESET) --data fashion-mnist --out $(RUN) --steps $(VAE_STEPS) --kl-weight $(VAE_KL)

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
