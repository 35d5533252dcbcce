# splitserve: the two quick-start commands are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
MODEL_DIR ?= .models/tiny-llama

.PHONY: install run test lint typecheck unit clean proto

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: nixl and transformers declare an unpinned torch.
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[cluster,bench,kernels,dev]"
	touch $@

install: $(VENV)/.installed

$(MODEL_DIR)/config.json: | install
	$(VENV)/bin/splitserve make-tiny-model $(MODEL_DIR) --arch llama

# The main job: offline generation on the built-in tiny model.
run: install $(MODEL_DIR)/config.json
	$(VENV)/bin/splitserve generate --model $(MODEL_DIR) --max-tokens 32 --temperature 0 \
		--prompt "The quick brown fox" --prompt "Once upon a time"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m splitserve.protocol.gen --check

# Regenerate the gRPC stubs from protocol/node.proto.
proto: install
	$(PY) -m splitserve.protocol.gen

typecheck: install
	rm -rf build/mypy && mkdir -p build/mypy && ln -s "$(CURDIR)" build/mypy/splitserve
	cd build/mypy && MYPYPATH=. ../../$(VENV)/bin/mypy -p splitserve.engine

unit: install
	$(PY) -m pytest -q -m "not gpu" tests

test: lint typecheck unit

clean:
	rm -rf $(VENV) build .models .pytest_cache .mypy_cache .ruff_cache
