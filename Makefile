# Every target sets itself up on a fresh machine: a virtualenv, torch pinned for CPU, pdserve.
PYTHON ?= python3
VENV ?= .venv
# On CPU machines pin torch: an unpinned torch pulls several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install test test-unit test-e2e lint serve serve-colocated tiny-model bench mps-on mps-off clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,bench]"
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports  # the layer contracts in pyproject.toml

test: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: install
	$(BIN)/python -m pytest -q -m "not e2e"

test-e2e: install
	$(BIN)/python -m pytest -q -m e2e

tiny-model: install
	$(BIN)/pdserve make-tiny-model

# HAProxy takes HTTP straight to the ingress replicas (cluster/app.py); set it to 0 for Serve's
# Python proxy. Its threads: half the cores, 1 to 4 (bench/launcher.py: haproxy_threads).
HAPROXY ?= 1
HAPROXY_THREADS ?= $(shell n=$$(nproc); t=$$((n / 2)); [ $$t -lt 1 ] && t=1; [ $$t -gt 4 ] && t=4; echo $$t)
SERVE_ENV = RAY_SERVE_ENABLE_HA_PROXY=$(HAPROXY) RAY_SERVE_HAPROXY_NBTHREAD=$(HAPROXY_THREADS)

serve: install
	$(SERVE_ENV) $(BIN)/serve run configs/tiny.yaml

serve-colocated: install
	$(SERVE_ENV) $(BIN)/serve run configs/tiny-colocated.yaml

bench: install
	$(BIN)/python -m bench.compare configs/tiny-colocated.yaml configs/tiny.yaml \
		--workload shared-prefix --num-prompts 64 --out docs/bench-tiny-cpu.json \
		--plot-dir docs/img

# CUDA MPS for replicas that share a GPU (README, "One GPU, prefill and decode"): on before
# Ray starts, off after it stops.
mps-on:
	nvidia-cuda-mps-control -d

mps-off:
	echo quit | nvidia-cuda-mps-control

clean:
	rm -rf $(VENV) build *.egg-info
