# The README's commands. Everything runs inside a virtual environment ($(VENV)); torch is installed
# only when missing (TORCH_SPEC picks which), and the package is built against it without isolation.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# extra `rlhf-ext demo` options, e.g. make demo DEMO_ARGS="--seed 1 --output-dir /tmp/demo"
DEMO_ARGS ?=
STAMP := $(VENV)/.rlhf_ext-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -type f)

# `make gpu-check` runs on a CUDA machine's own python (with a CUDA torch), not the CPU venv: the venv's python
# only where one exists. Without a GPU it exits at once with code 2 and a one-line message. GPU_CHECK_ARGS: e.g.
# --out DIR, --budget SECONDS, --steps tests,bench, --skip-build (see scripts/gpu_check.py).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=

.PHONY: install lint format test test-all demo bench bench-full bench-peers gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel pybind11 ninja
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation -e ".[dev,label,tensorboard]"
	@touch $(STAMP)

install: $(STAMP)

# ruff (format + check, line length 120: pyproject.toml) over the whole repo; `make format` rewrites in place.
lint: install
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: install lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)
	RLHF_EXT_BENCH_QUICK=1 $(PY) -m pytest -q benchmarks --benchmark-disable -p no:cacheprovider

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/rlhf-ext demo $(DEMO_ARGS)

bench: install
	$(VENV)/bin/rlhf-ext bench

bench-full: install
	$(PY) -m pytest benchmarks --benchmark-columns=median,iqr,rounds

# The whole RL step against TRL (benchmarks/bench_peers.py). Each peer gets its own venv under .peers/ on first use
# (scripts/peer_venv.sh: `pip install --no-deps trl==X` over our venv's torch and transformers, never into $(VENV)).
# BENCH_PEERS_ARGS: e.g. --algos grpo --steps 4 --threads 2 --rounds 2 --out bench_peers.json
PEERS ?= .peers
TRL_GRPO ?= 1.16.0
TRL_PPO ?= 1.12.0
BENCH_PEERS_ARGS ?=

$(PEERS)/trl-%/bin/python: | $(STAMP)
	scripts/peer_venv.sh $(PEERS)/trl-$* trl==$* $(VENV)

bench-peers: install $(PEERS)/trl-$(TRL_GRPO)/bin/python $(PEERS)/trl-$(TRL_PPO)/bin/python
	$(PY) benchmarks/bench_peers.py --peer-python grpo=$(PEERS)/trl-$(TRL_GRPO)/bin/python \
		--peer-python ppo=$(PEERS)/trl-$(TRL_PPO)/bin/python $(BENCH_PEERS_ARGS)

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info rlhf_ext/*.so rlhf_ext/_build_record.py
