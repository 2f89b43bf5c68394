# The two commands: `make demo` and `make test`. Each creates .venv on first use and
# reinstalls only when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
RUNS ?= runs
export TF_CPP_MIN_LOG_LEVEL ?= 3
export TF_ENABLE_ONEDNN_OPTS ?= 0

.PHONY: demo test test-all bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# One stamp per install flavour; both depend on pyproject.toml.
$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps t5==0.9.4
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(BIN)/t5x-like vocab train --size 8000
	$(BIN)/t5x-like train --config configs/t5_span_corruption.py:tiny --workdir $(RUNS)/demo
	$(BIN)/t5x-like eval --checkpoint $(RUNS)/demo --samples 5 --json $(RUNS)/demo/eval.json
	$(BIN)/t5x-like report $(RUNS)/demo --out $(RUNS)/demo/report.md --title "make demo"

# Two pytest workers (pytest-xdist); --dist loadfile keeps each file, and so its module
# fixtures (trained runs, 8-device subprocesses), on one worker.
PYTEST_WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: $(VENV)/.installed-test
	$(PYTEST) --durations=60 -m "not slow" tests

test-all: $(VENV)/.installed-test
	$(PYTEST) tests

# Peers first; then our trainer's step on synthetic batches (tiny and small, batch 8, on CPU):
# tokens/s, TFLOP/s, MFU against a measured float32 matmul rate, XLA peak memory without and
# with remat. On a GPU/TPU host, `t5x-like bench` finds the peak in its table instead.
BENCH_FLAGS ?= --steps 3 --warmup 1 --batch 8 --remat none,full --peak-tflops measure
bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/t5_peers.py
	$(BIN)/python benchmarks/scan_overhead.py --rounds 3
	$(BIN)/python benchmarks/bert_peers.py
	$(BIN)/t5x-like bench --config configs/t5_span_corruption.py:tiny $(BENCH_FLAGS) \
		--json benchmarks/bench_tiny.json
	$(BIN)/t5x-like bench --config configs/t5_span_corruption.py:small $(BENCH_FLAGS) \
		--json benchmarks/bench_small.json

lint: $(VENV)/.installed-test
	$(BIN)/ruff check t5x_like tests configs benchmarks

clean:
	rm -rf $(VENV) $(RUNS)
