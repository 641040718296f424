# Two commands set everything up on a fresh clone: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests and the quickstart never touch the network.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install quickstart test test-slow test-all style quality bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python recipes/quickstart.py --config recipes/quickstart.yaml

# Tests train tiny models: one intra-op thread each is as fast on an idle machine, and far faster on a busy one
# (several torch processes spinning two threads each on two cores mostly wait for each other).
# `make test` is the default suite (under 15 minutes on 2 cores); the long subprocess runs (every documented
# command as written, kills and resumes at every point, notebooks, real-weights strategies) are marked slow and
# run by `make test-slow`; CI runs both.
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

test: $(STAMP)
	$(PYTEST) -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -m slow

test-all: $(STAMP)
	$(PYTEST)

style: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

quality: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Every CPU benchmark (benchmarks/gpu.sh is for a GPU machine); BENCH_ARGS=--quick for short variants.
BENCHMARKS := $(filter-out benchmarks/_common.py benchmarks/gpu_bench.py,$(wildcard benchmarks/*.py))
bench: $(STAMP)
	for script in $(BENCHMARKS); do $(BIN)/python $$script $(BENCH_ARGS) || exit 1; done

clean:
	rm -rf outputs data/quickstart .pytest_cache
