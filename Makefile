# splitserve: the two quick-start commands are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
PACKAGES := engine kernels kv_transfer node prefill decode router launch protocol benchmarks

.PHONY: install run test lint typecheck unit faults fuzz-api clean proto

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: nixl and transformers declare an unpinned torch.
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[cluster,bench,kernels,dev]"
	touch $@

install: $(VENV)/.installed

# The main job: a local cluster (Redis, router, one prefill and one decode node on the
# built-in tiny model) that answers one chat request, then keeps serving until Ctrl-C.
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

# Fast tests in parallel over every core (pytest-xdist, one file per worker at a time);
# the slow multi-process ones (node clusters, two-process NIXL: timing-sensitive on few
# cores) after them, one at a time.
unit: install
	$(PY) -m pytest -q -m "not gpu and not slow" -n auto --dist loadfile tests
	$(PY) -m pytest -q -m "slow and not gpu" tests

# The fault suite alone (frozen, killed and flooded parts; `unit` runs it too).
faults: install
	$(PY) -m pytest -q -m faults tests

# Schemathesis against the router's own openapi.json (docs/reliability.md); its output is
# committed as docs/results/schemathesis.txt.
fuzz-api: install
	$(PIP) install -q -e ".[fuzz]"
	$(PY) scripts/fuzz_api.py --schemathesis $(VENV)/bin/schemathesis --out docs/results/schemathesis.txt

test: lint typecheck unit

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
