# vlmerge: two commands on a fresh clone: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml
VLMERGE := $(VENV)/bin/vlmerge
# Peers the benchmarks compare against (mergekit, minicons), in a venv of their own.
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
# Test processes (pytest-xdist): the tests wait on subprocesses and Slurm much of the time, so two
# workers finish sooner even on two cores. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS)

.PHONY: setup peers demo test test-fast bench gpu-check rehearsal clean

setup: $(STAMP)

$(STAMP): env/requirements.txt env/constraints.txt pyproject.toml env/setup.sh
	bash env/setup.sh $(VENV)
	touch $@

peers: $(PEERS_STAMP)

$(PEERS_STAMP): env/peers.txt env/constraints.txt
	python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet -r env/peers.txt
	@echo "peers: $(PEERS_VENV) ready ($$($(PEERS_VENV)/bin/python -c 'import torch, importlib.metadata as m; print("torch", torch.__version__, "mergekit", m.version("mergekit"), "minicons", m.version("minicons"))'))"
	touch $@

# The main job on the built-in demo world: every stage, then the sweep (each skips complete work).
demo: setup
	$(VLMERGE) pipeline --config $(CONFIG)

# Slurm and Chromium (Debian packages) are installed first when running as root.
test: setup
	bash env/system-packages.sh
	$(PYTEST)

# The fast part (no Slurm, no browser, no slow end-to-end tests): a few minutes.
test-fast: setup
	$(PYTEST) -m "not slurm and not browser and not slow"

bench: setup peers
	@set -e; for b in tests/bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

# Every stage that runs a model, on this machine's GPU(s), against the CPU (sized for 8 minutes; without a
# GPU it says so in one line). tests/test_gpu.py holds the CUDA paths' tests (make test runs them).
gpu-check: setup
	$(PY) tests/bench/gpu_check.py

# Takmaz et al.'s setup at the paper's shapes (6 × 768, 30,000 rows, length 150, fp32) on this machine's
# CPUs: train → best-text sweep → report, each stage's wall time and peak memory (about 30 minutes on 2 cores).
rehearsal: setup
	$(PY) tests/bench/rehearsal.py

clean:
	rm -rf outputs
